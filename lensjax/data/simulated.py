"""On-device streams of simulated data from `lensjax.sim`, sharded over the mesh.

Example n of a stream is simulated from `fold_in(stream_key, n)` (batch `step`
holds examples step * B ... step * B + B - 1), generated inside a jit whose output is sharded on the `data` axis: each device
(and each host) computes only its own examples, with no host round trip, and a
resumed run sees exactly the batches of an uninterrupted one. Train, selection and
held-out streams use disjoint keys (`stream_key(seed, "train")` vs `"heldout"`).

Batches: {"image": (B, H, W, 1), "label": (B,) int32} for labelled presets;
{"lr": (B, h, w, 1), "hr": (B, H, W, 1), "label"} for the `superres` preset.
"""

from __future__ import annotations

import zlib
from typing import Iterator

import jax
import jax.numpy as jnp

from lensjax import parallel
from lensjax.data import transforms
from lensjax.sim import Preset

Array = jax.Array


def stream_key(seed: int, stream: str) -> Array:
    """Root key of a named stream ("train", "heldout", ...): disjoint across names."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(stream.encode()) & 0x7FFFFFFF)


def is_superres(preset: Preset) -> bool:
    """Whether the preset yields LR/HR pairs (params["lr_image"])."""
    return hasattr(preset, "lr_shape")


class SimulatedStream:
    """Infinite stream of global batches (see the module docstring for the keys).

    label: force every example to one class (name or index), e.g. "no_sub" for MAE
    pretraining; None keeps the balanced class cycle. params_keys: latent
    parameters to include, e.g. ("axion_mass_ev",) for regression targets.
    """

    def __init__(self, preset: Preset, global_batch_size: int, mesh: jax.sharding.Mesh,
                 seed: int, stream: str = "train", augment: bool = True,
                 normalization: str = "none", label: int | str | None = None,
                 params_keys: tuple[str, ...] = ()):
        parallel.check_global_batch(global_batch_size, mesh)
        transforms.check_normalization(normalization)
        self.preset = preset
        self.batch_size = global_batch_size
        self.mesh = mesh
        self.key = stream_key(seed, stream)
        self.augment = augment
        self.normalization = normalization
        self.label = None if label in (None, "") else preset.label_index(label)
        self.params_keys = tuple(params_keys)
        self._generate = jax.jit(self._batch, out_shardings=parallel.batch_sharding(mesh))

    def _batch(self, step: Array) -> dict[str, Array]:
        # Example n of a stream is simulated from fold_in(stream key, n) whatever the
        # batch size, so an evaluation set holds the same images for every eval batch
        # size and device count.
        images, labels, params = self.preset.sample(self.key, self.batch_size, label=self.label,
                                                    start_index=step * self.batch_size)
        key = jax.random.fold_in(self.key, step)
        if is_superres(self.preset):
            batch = {"lr": params["lr_image"], "hr": images, "label": labels}
        else:
            batch = {"image": images, "label": labels}
        batch.update({name: params[name] for name in self.params_keys})
        return transforms.apply(batch, jax.random.fold_in(key, 1 << 30), self.normalization,
                                self.augment)

    def batch(self, step: int) -> dict[str, Array]:
        """Global batch number `step` (deterministic in seed, stream and step)."""
        return self._generate(jnp.asarray(step, jnp.int32))

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, Array]]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1
