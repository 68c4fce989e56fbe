"""Comparing image sets in feature spaces: FLD and FID of generated images.

FLD is the Frechet distance between Gaussians fitted to the pooled penultimate
features (`model.features`) of a classifier trained by lensjax, restored from its
workdir, so it needs no download; images are resized to the classifier's input size
(`pipeline.image_shape` of its config) and normalised as its training data were. It is
never called FID, which is the same distance in the 2048-d pool3 space of the FID
Inception network (`lensjax.metrics.inception`) with the pt_inception-2015-12-05
weights read from a local file.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lensjax import parallel
from lensjax.data import pipeline, transforms

Array = jax.Array

# FID is only comparable with at least this many images per set.
MIN_FID_SAMPLES = 5000


def _classifier_features(model: nnx.Module, images: Array, *, image_size: int,
                         normalization: str) -> Array:
    """Penultimate features (B, D) float32 of images (B, H, W, 1) in [0, 1], resized to the
    classifier's input size and normalised as its training data were."""
    if images.shape[1:3] != (image_size, image_size):
        images = jax.image.resize(images, (images.shape[0], image_size, image_size,
                                           images.shape[3]), method="linear", antialias=True)
    return model.features(transforms.normalize(images, normalization)).astype(jnp.float32)


class LensingEncoder:
    """The feature space of FLD: pooled penultimate features of a trained lensjax
    classifier (`model.features`), restored from its workdir. Works offline."""

    def __init__(self, workdir: str | Path, checkpoint: str = "best"):
        from lensjax import evaluate
        config, trained, record = evaluate.restore_workdir(workdir, checkpoint)
        if not hasattr(trained.model(), "features"):
            raise ValueError(f"{workdir} holds a {config.task} run of {config.model.name!r}, "
                             "which has no features(images) method; FLD needs a lensjax "
                             "classifier workdir (e.g. configs/common_resnet18.py)")
        self.mesh = trained.mesh
        self.image_size = int(pipeline.image_shape(config)[0])
        self.normalization = config.data.get("normalization", "none")
        self._features = trained.jit(
            functools.partial(_classifier_features, image_size=self.image_size,
                              normalization=self.normalization),
            out_shardings=parallel.batch_sharding(self.mesh))
        self.record = {"workdir": str(workdir), "checkpoint": record, "task": config.task,
                       "model": config.model.name,
                       "input": f"resized to {self.image_size}x{self.image_size} (bilinear, "
                                f"antialiased), normalization {self.normalization!r}"}

    def __call__(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Features (N, D) float32 of images (N, H, W, 1) in [0, 1], sharded over the mesh."""
        images = np.asarray(images, np.float32)
        batch_size = -(-batch_size // self.mesh.size) * self.mesh.size
        sharding = parallel.batch_sharding(self.mesh)
        features = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            count = len(chunk)
            chunk = np.concatenate([chunk, np.zeros((batch_size - count, *chunk.shape[1:]),
                                                    np.float32)])
            out = self._features(parallel.global_array_from_host(chunk, sharding))
            features.append(parallel.to_host(out)[:count])
        return np.concatenate(features)


def fld_metric(config: ml_collections.ConfigDict, generated: np.ndarray,
               real: np.ndarray) -> dict:
    """FLD between two image sets, or a "skipped" status without config.eval.fld_workdir."""
    from lensjax.metrics import fid
    workdir = config.eval.get("fld_workdir", "")
    if not workdir:
        return {"status": "skipped: no classifier workdir given (config.eval.fld_workdir)"}
    encoder = LensingEncoder(workdir, config.eval.get("fld_checkpoint", "best"))
    batch = int(config.eval.batch_size)
    features_generated, features_real = encoder(generated, batch), encoder(real, batch)
    return {"value": fid.fid_from_features(features_generated, features_real),
            "num_generated": len(generated), "num_real": len(real),
            "feature_dim": int(features_real.shape[1]), "encoder": encoder.record}


def fid_metric(config: ml_collections.ConfigDict, generated: np.ndarray,
               real: np.ndarray) -> dict:
    """FID between two image sets, or a "skipped" status without config.eval.inception_weights."""
    from lensjax.metrics import fid, inception
    path = config.eval.get("inception_weights", "")
    if not path:
        return {"status": "skipped: no weights file given (set config.eval.inception_weights to "
                          "a local pt_inception-2015-12-05-6726825d.pth)"}
    if not Path(path).is_file():
        raise FileNotFoundError(f"config.eval.inception_weights={path} is not a file")
    network = inception.load_fid_inception(path)
    batch = int(config.eval.get("fid_batch_size", 50))
    progress = jax.process_index() == 0
    features_generated = inception.fid_features(network, generated, batch, progress=progress)
    features_real = inception.fid_features(network, real, batch, progress=progress)
    result = {"value": fid.fid_from_features(features_generated, features_real),
              "num_generated": len(generated), "num_real": len(real), "weights": str(path),
              "features": "2048-d pool3 of the FID Inception network; grey repeated to 3 "
                          "channels, bilinear resize to 299x299"}
    if min(len(generated), len(real)) < MIN_FID_SAMPLES:
        result["note"] = (f"fewer than {MIN_FID_SAMPLES} images per set: not comparable with "
                          "published FIDs")
    return result
