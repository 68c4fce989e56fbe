"""Transforms applied to every batch, whatever its source (simulated or TFDS).

One function per transform, all pure and jittable, so the simulated stream and the
official files go through exactly the same maths: `normalize` (the one place where
image values are rescaled; pretraining and fine-tuning must use the same method,
which `lensjax.train` checks on warm starts) and `dihedral_augment`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

NORMALIZATIONS = ("none", "minmax", "standardize")
# Guards against constant images (an empty field after noise-free simulation).
_EPS = 1e-8


def check_normalization(method: str) -> str:
    if method not in NORMALIZATIONS:
        raise ValueError(f"config.data.normalization must be one of {NORMALIZATIONS}, got {method!r}")
    return method


def effective_normalization(data) -> str:
    """The scaling images reach the model with: config.data.normalization, or, when that
    is "none", the scaling their source stored them with (`stored_normalization`).
    `data` is a config.data ConfigDict or the "data" dict of a workdir's config.json."""
    method = data.get("normalization", "none") or "none"
    if method == "none":
        return data.get("stored_normalization", "none") or "none"
    return method


def normalize(images: Array, method: str) -> Array:
    """Per-image rescaling of (B, H, W, C) images; returns the same shape, float32.

    "none": unchanged; "minmax": (x - min) / (max - min), to [0, 1] as the official
    Common Test I files are stored; "standardize": zero mean, unit variance.
    Raw DeepLenseSim values (Poisson counts, e-/s) span orders of magnitude
    between images, so networks that regress pixels (MAE, diffusion) need one of
    the latter two.
    """
    check_normalization(method)
    images = images.astype(jnp.float32)
    if method == "none":
        return images
    axes = tuple(range(1, images.ndim))
    if method == "minmax":
        low = jnp.min(images, axis=axes, keepdims=True)
        high = jnp.max(images, axis=axes, keepdims=True)
        return (images - low) / jnp.maximum(high - low, _EPS)
    mean = jnp.mean(images, axis=axes, keepdims=True)
    std = jnp.std(images, axis=axes, keepdims=True)
    return (images - mean) / jnp.maximum(std, _EPS)


def dihedral_augment(key: Array, images: Array) -> Array:
    """A random one of the 8 rotations/flips per image: (B, H, W, C) -> same shape.

    Lensing images have no preferred orientation, so all 8 are equally valid. The
    choice depends only on `key` and the batch position, so the same key applied
    to an HR and an LR batch transforms each pair alike.
    """
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"dihedral augmentation needs square images, got {images.shape}")
    choice = jax.random.randint(key, (images.shape[0],), 0, 8)

    def one(image, c):
        rotated = jax.lax.switch(c % 4, [lambda im, k=k: jnp.rot90(im, k, axes=(0, 1))
                                         for k in range(4)], image)
        return jnp.where(c >= 4, rotated[:, ::-1], rotated)

    return jax.vmap(one)(images, choice)


def image_keys(batch: dict) -> tuple[str, ...]:
    """Entries of a batch that are images (B, H, W, C): "image", or "lr" and "hr"."""
    return tuple(k for k in ("image", "lr", "hr") if k in batch)


def apply(batch: dict, key: Array, normalization: str, augment: bool) -> dict:
    """Normalise every image entry and (optionally) apply one shared dihedral augmentation.

    For super-resolution pairs the LR image is normalised on its own; with the
    default "none" (the [0, 1] VI.B data) the pair stays exactly consistent.
    """
    out = dict(batch)
    for name in image_keys(batch):
        images = normalize(batch[name], normalization)
        out[name] = dihedral_augment(key, images) if augment else images
    return out
