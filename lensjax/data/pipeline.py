"""One entry point from `config.data` to iterators of global, sharded batches.

config.data.source = "sim": `lensjax.sim` presets generated on device
(`data.simulated`); "tfds": the official DeepLense layouts through the TFDS
builders of `data.deeplense` (TensorFlow is imported only on that path).
Both give dicts {"image": (B, H, W, 1) float32, "label": (B,) int32, ...}; the
held-out iterator adds "mask": (B,) bool, False on padding of the last batch.
"""

from __future__ import annotations

from typing import Iterator

import jax
import ml_collections
import numpy as np

from lensjax import parallel
from lensjax.data import simulated
from lensjax.sim import get_preset

Batch = dict[str, jax.Array]


def preset_from_config(data: ml_collections.ConfigDict):
    overrides = dict(data.get("preset_overrides", {}) or {})
    return get_preset(data.preset, **overrides)


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Class names of the configured data, in label order."""
    if config.data.source == "sim":
        return preset_from_config(config.data).class_names
    from lensjax.data import deeplense
    return tuple(deeplense.class_names(config.data.tfds_name))


def train_iterator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   start_step: int = 0) -> Iterator[Batch]:
    """Training batches from `start_step` on (a resumed run continues the same stream)."""
    data = config.data
    if data.source == "sim":
        stream = simulated.SimulatedStream(preset_from_config(data), config.train.batch_size,
                                           mesh, config.seed, "train", data.augment)
        return stream.iterate(start_step)
    if data.source == "tfds":
        return _tfds_train(config, mesh, start_step)
    raise ValueError(f"config.data.source must be 'sim' or 'tfds', got {data.source!r}")


def heldout_iterator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     split: str = "heldout") -> Iterator[Batch]:
    """The fixed evaluation set, whole batches with a validity mask.

    split="heldout": the reported set (simulated: its own key stream; tfds: the
    val/test split). split="selection": the model-selection set (simulated: a
    third key stream; tfds: the 10% of train held back for selection).
    """
    data = config.data
    batch_size = config.eval.batch_size
    if data.source == "sim":
        num = data.heldout_examples if split == "heldout" else data.selection_examples
        stream = simulated.SimulatedStream(preset_from_config(data), batch_size, mesh,
                                           config.seed, split, augment=False)
        num_batches = -(-num // batch_size)
        for i in range(num_batches):
            batch = stream.batch(i)
            valid = np.arange(i * batch_size, (i + 1) * batch_size) < num
            batch["mask"] = parallel.global_array_from_host(valid, parallel.batch_sharding(mesh))
            yield batch
        return
    if data.source == "tfds":
        yield from _tfds_heldout(config, mesh, split)
        return
    raise ValueError(f"config.data.source must be 'sim' or 'tfds', got {data.source!r}")


def describe(config: ml_collections.ConfigDict, split: str = "heldout") -> dict:
    """What a report needs to say about the data: source, preset or dataset, split, size."""
    data = config.data
    if data.source == "sim":
        num = data.heldout_examples if split == "heldout" else data.selection_examples
        return {"source": "sim", "preset": preset_from_config(data).describe(),
                "split": f"simulated stream '{split}' (seed {config.seed}), disjoint from training",
                "num_examples": int(num)}
    return {"source": "tfds", "dataset": data.tfds_name, "manual_dir": data.manual_dir,
            "split": split}


# ----------------------------------------------------------------------------
# TFDS (official layouts)
# ----------------------------------------------------------------------------

def _local_numpy_batches(ds, local_batch: int, drop_remainder: bool):
    ds = ds.batch(local_batch, drop_remainder=drop_remainder).prefetch(2)
    return ds.as_numpy_iterator()


def _to_model_batch(example: dict) -> dict:
    return {"image": example["image"].astype(np.float32),
            "label": example["label"].astype(np.int32)}


def _tfds_train(config, mesh, start_step: int) -> Iterator[Batch]:
    from lensjax.data import deeplense
    data = config.data
    local_batch = parallel.check_global_batch(config.train.batch_size, mesh)
    ds = deeplense.load(data.tfds_name, data.manual_dir, deeplense.train_split(data.tfds_name),
                        data_dir=data.get("data_dir"))
    ds = ds.shard(jax.process_count(), jax.process_index())
    # A fixed-seed shuffle makes the stream a function of the step alone, so
    # skipping start_step batches resumes it exactly.
    ds = ds.shuffle(data.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
    ds = ds.repeat().skip(start_step * local_batch)
    aug_key = simulated.stream_key(config.seed, "tfds_augment")
    for step, example in enumerate(_local_numpy_batches(ds, local_batch, True), start_step):
        batch = parallel.global_batch_from_local(_to_model_batch(example), mesh)
        if data.augment:
            batch["image"] = _augment_sharded(mesh)(jax.random.fold_in(aug_key, step),
                                                    batch["image"])
        yield batch


_AUGMENT_CACHE: dict = {}


def _augment_sharded(mesh):
    if mesh not in _AUGMENT_CACHE:
        _AUGMENT_CACHE[mesh] = jax.jit(simulated.dihedral_augment,
                                       out_shardings=parallel.batch_sharding(mesh))
    return _AUGMENT_CACHE[mesh]


def _tfds_heldout(config, mesh, split: str) -> Iterator[Batch]:
    from lensjax.data import deeplense
    data = config.data
    local_batch = parallel.check_global_batch(config.eval.batch_size, mesh)
    name = (deeplense.heldout_split(data.tfds_name) if split == "heldout"
            else deeplense.selection_split(data.tfds_name))
    ds = deeplense.load(data.tfds_name, data.manual_dir, name, data_dir=data.get("data_dir"))
    ds = ds.shard(jax.process_count(), jax.process_index())
    for example in _local_numpy_batches(ds, local_batch, False):
        batch = _to_model_batch(example)
        n = len(batch["label"])
        mask = np.zeros(local_batch, bool)
        mask[:n] = True
        batch = {k: np.concatenate([v, np.zeros((local_batch - n,) + v.shape[1:], v.dtype)])
                 for k, v in batch.items()}
        batch["mask"] = mask
        yield parallel.global_batch_from_local(batch, mesh)
