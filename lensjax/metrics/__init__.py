"""Evaluation maths without TensorFlow: ROC/AUC (numpy), Frechet distances and the FID
Inception network, image quality (jax.numpy), physical statistics of lensing images."""
