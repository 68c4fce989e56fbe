"""On-device streams of simulated data from `lensjax.sim`, sharded over the mesh.

Batch `step` of a stream is `preset.sample(fold_in(stream_key, step), batch)`,
generated inside a jit whose output is sharded on the `data` axis: each device
(and each host) computes only its own examples, with no host round trip, and a
resumed run sees exactly the batches of an uninterrupted one. Train and held-out
streams use disjoint keys (`stream_key(seed, "train")` vs `"heldout"`).
"""

from __future__ import annotations

import zlib
from typing import Iterator

import jax
import jax.numpy as jnp

from lensjax import parallel
from lensjax.sim import Preset

Array = jax.Array


def stream_key(seed: int, stream: str) -> Array:
    """Root key of a named stream ("train", "heldout", ...): disjoint across names."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(stream.encode()) & 0x7FFFFFFF)


def dihedral_augment(key: Array, images: Array) -> Array:
    """A random one of the 8 rotations/flips per image: (B, H, W, C) -> same shape.

    Lensing images have no preferred orientation, so all 8 are equally valid.
    """
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"dihedral augmentation needs square images, got {images.shape}")
    choice = jax.random.randint(key, (images.shape[0],), 0, 8)

    def one(image, c):
        rotated = jax.lax.switch(c % 4, [lambda im, k=k: jnp.rot90(im, k, axes=(0, 1))
                                         for k in range(4)], image)
        return jnp.where(c >= 4, rotated[:, ::-1], rotated)

    return jax.vmap(one)(images, choice)


class SimulatedStream:
    """Infinite stream of global batches {"image": (B, H, W, 1), "label": (B,), ...}."""

    def __init__(self, preset: Preset, global_batch_size: int, mesh: jax.sharding.Mesh,
                 seed: int, stream: str = "train", augment: bool = True,
                 params_keys: tuple[str, ...] = ()):
        parallel.check_global_batch(global_batch_size, mesh)
        self.preset = preset
        self.batch_size = global_batch_size
        self.mesh = mesh
        self.key = stream_key(seed, stream)
        self.augment = augment
        self.params_keys = tuple(params_keys)
        self._generate = jax.jit(self._batch, out_shardings=parallel.batch_sharding(mesh))

    def _batch(self, step: Array) -> dict[str, Array]:
        key = jax.random.fold_in(self.key, step)
        images, labels, params = self.preset.sample(key, self.batch_size)
        if self.augment:
            images = dihedral_augment(jax.random.fold_in(key, 1 << 30), images)
        batch = {"image": images, "label": labels}
        batch.update({name: params[name] for name in self.params_keys})
        return batch

    def batch(self, step: int) -> dict[str, Array]:
        """Global batch number `step` (deterministic in seed, stream and step)."""
        return self._generate(jnp.asarray(step, jnp.int32))

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, Array]]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


def heldout_batches(preset: Preset, num_examples: int, global_batch_size: int,
                    mesh: jax.sharding.Mesh, seed: int) -> Iterator[dict[str, Array]]:
    """A fixed held-out set of `num_examples` (rounded up to whole batches), never
    augmented, from the "heldout" stream: disjoint from every training batch."""
    stream = SimulatedStream(preset, global_batch_size, mesh, seed, stream="heldout",
                             augment=False)
    num_batches = -(-num_examples // global_batch_size)
    for i in range(num_batches):
        yield stream.batch(i)

