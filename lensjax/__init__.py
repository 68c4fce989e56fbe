"""lensjax: deep learning on strong gravitational lensing images, in JAX."""

__version__ = "0.1.0"
