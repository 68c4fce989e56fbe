"""One entry point from `config.data` to iterators of global, sharded batches.

config.data.source = "sim": `lensjax.sim` presets generated on device
(`data.simulated`); "tfds": the official DeepLense layouts through the TFDS
builders of `data.deeplense` (TensorFlow is imported only on that path).
Both give the same dicts: {"image": (B, H, W, 1) float32, "label": (B,) int32}, or
{"lr", "hr", "label"} for super-resolution pairs, after the same
`transforms.apply` (normalisation `config.data.normalization`, dihedral
augmentation `config.data.augment` for training only). Held-out iterators add
"mask": (B,) bool, False on padding of the last batch, and "index": (B,) int32,
the example's position in its split (a fixed per-example seed for evaluation).
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Iterator, TypeVar

import jax
import ml_collections
import numpy as np

from lensjax import parallel
from lensjax.data import simulated, transforms
from lensjax.sim import get_preset

Batch = dict[str, jax.Array]
SPLITS = ("train", "selection", "heldout")
T = TypeVar("T")
# Simulated training batches computed ahead of the train step, and the thread doing it.
PREFETCH_BATCHES = 2
PREFETCH_THREAD = "lensjax-prefetch"
_END = object()  # the producer's last item: the source is exhausted


def preset_from_config(data: ml_collections.ConfigDict):
    overrides = dict(data.get("preset_overrides", {}) or {})
    return get_preset(data.preset, **overrides)


def pixel_scale(data: ml_collections.ConfigDict) -> float | None:
    """Arcsec per pixel of the simulated images (for figure axes); None for files on disk."""
    return preset_from_config(data).pixel_scale if data.source == "sim" else None


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Class names of the configured data, in label order."""
    if config.data.source == "sim":
        return preset_from_config(config.data).class_names
    from lensjax.data import deeplense
    return tuple(deeplense.class_names(config.data.tfds_name))


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, 1) of the configured images (HR for super-resolution): the simulator
    preset's, or the official layout's."""
    if config.data.source == "sim":
        return tuple(preset_from_config(config.data).image_shape)
    from lensjax.data import deeplense
    return (*deeplense.image_hw(config.data.tfds_name), 1)


def _check_source(data: ml_collections.ConfigDict) -> None:
    if data.source not in ("sim", "tfds"):
        raise ValueError(f"config.data.source must be 'sim' or 'tfds', got {data.source!r}")
    if data.source == "tfds" and not data.get("manual_dir") and not data.get("data_dir"):
        raise ValueError("config.data.source='tfds' needs --config.data.manual_dir=DIR (the "
                         "folder holding the official files) or a prepared --config.data.data_dir")


def _num_examples(config: ml_collections.ConfigDict, split: str) -> int:
    return int(config.data.heldout_examples if split == "heldout"
               else config.data.selection_examples)


def _sim_stream(config, mesh, batch_size: int, split: str) -> simulated.SimulatedStream:
    data = config.data
    return simulated.SimulatedStream(
        preset_from_config(data), batch_size, mesh, config.seed, split,
        augment=bool(data.augment) and split == "train",
        normalization=data.get("normalization", "none"), label=data.get("label") or None,
        params_keys=tuple(data.get("params_keys", ()) or ()))


def train_iterator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   start_step: int = 0) -> Iterator[Batch]:
    """Training batches from `start_step` on (a resumed run continues the same stream)."""
    _check_source(config.data)
    if config.data.source == "sim":
        batches = _sim_stream(config, mesh, config.train.batch_size, "train").iterate(start_step)
        # On one device, generation runs on a second thread beside the step. Not on
        # a mesh of several: jax dispatches those programs asynchronously anyway, and
        # programs with collectives must start in the same order on every device and
        # process, which a second launching thread would not keep (a two-process run
        # aborted in gloo with it).
        return prefetch_in_background(batches, PREFETCH_BATCHES) if mesh.size == 1 else batches
    return _tfds_train(config, mesh, start_step)


class _Raised:
    """An exception of the producer thread, delivered in order to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


def prefetch_in_background(items: Iterator[T], size: int = PREFETCH_BATCHES) -> Iterator[T]:
    """Yield `items` in order while a daemon thread computes up to `size` ahead.

    Where jax runs CPU programs on the calling thread (`lensjax.hugepages` switches
    asynchronous CPU dispatch off), this lets the simulator's program run beside the
    train step instead of between steps, as asynchronous dispatch did. An exception
    raised by `items` is raised here, at its place in the order. Closing or dropping
    the returned generator stops the thread and waits for the item in progress.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
        except BaseException as error:  # noqa: BLE001  (handed to the consumer)
            offer(_Raised(error))
            return
        offer(_END)

    def consume() -> Iterator[T]:
        worker = threading.Thread(target=produce, name=PREFETCH_THREAD, daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, _Raised):
                    raise item.error
                yield item
        finally:
            stop.set()
            # Let an item in progress finish, so no jax call outlives the consumer
            # (a daemon thread inside jax at interpreter exit can crash it).
            worker.join(timeout=60)

    return consume()


def heldout_iterator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     split: str = "heldout", limit: int | None = None) -> Iterator[Batch]:
    """A fixed evaluation set, whole batches with "mask" and "index".

    split="heldout": the reported set (simulated: its own key stream; tfds: the
    val/test split). split="selection": the model-selection set (simulated: a
    third key stream; tfds: the 10% of train held back for selection).
    limit: use at most this many examples (e.g. a quick look at a large set).
    """
    if split not in ("heldout", "selection"):
        raise ValueError(f"split must be 'heldout' or 'selection', got {split!r}")
    _check_source(config.data)
    if config.data.source == "tfds":
        yield from _tfds_heldout(config, mesh, split, limit)
        return
    batch_size = config.eval.batch_size
    num = _num_examples(config, split) if limit is None else min(limit, _num_examples(config, split))
    stream = _sim_stream(config, mesh, batch_size, split)
    sharding = parallel.batch_sharding(mesh)
    for i in range(-(-num // batch_size)):
        batch = stream.batch(i)
        index = np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.int32)
        batch["mask"] = parallel.global_array_from_host(index < num, sharding)
        batch["index"] = parallel.global_array_from_host(index, sharding)
        yield batch


def describe(config: ml_collections.ConfigDict, split: str = "heldout") -> dict:
    """What a report says about the data: source, preset or dataset, split, size."""
    data = config.data
    common = {"normalization": data.get("normalization", "none"),
              "label": data.get("label") or "all classes"}
    if data.source == "sim":
        return {"source": "sim", "preset": preset_from_config(data).describe(),
                "split": f"simulated stream '{split}' (seed {config.seed}), disjoint from the "
                         "training stream", "num_examples": _num_examples(config, split), **common}
    from lensjax.data import deeplense
    name = (deeplense.heldout_split(data.tfds_name) if split == "heldout"
            else deeplense.selection_split(data.tfds_name))
    return {"source": "tfds", "dataset": data.tfds_name, "manual_dir": data.manual_dir,
            "split": name, "split_seed": int(data.get("split_seed", 0)),
            "num_examples": _tfds_num_examples(config, name), **common}


def record_split(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Write workdir/split.json: the file lists (tfds) or the stream seeds (sim)."""
    data = config.data
    if data.source == "tfds":
        from lensjax.data import deeplense
        return deeplense.record_split(workdir, data.tfds_name, data.manual_dir,
                                      split_seed=int(data.get("split_seed", 0)))
    path = Path(workdir) / "split.json"
    record = {"sim": {
        "preset": preset_from_config(data).describe(), "seed": int(config.seed),
        "streams": {name: {"key": f"fold_in(key({config.seed}), crc32('{name}'))",
                           "num_examples": "unbounded" if name == "train"
                           else _num_examples(config, name)} for name in SPLITS},
        "note": "example n of a stream is simulated from fold_in(stream key, n); the "
                "streams are disjoint"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------
# TFDS (official layouts)
# ----------------------------------------------------------------------------

def _tfds_dataset(config, split_name: str):
    from lensjax.data import deeplense
    data = config.data
    ds = deeplense.load(data.tfds_name, data.manual_dir or None, split_name,
                        data_dir=data.get("data_dir") or None,
                        split_seed=int(data.get("split_seed", 0)))
    if data.get("label"):
        names = deeplense.class_names(data.tfds_name)
        if data.label not in names:
            raise ValueError(f"config.data.label={data.label!r} is not a class of "
                             f"{data.tfds_name} {names}")
        wanted = names.index(data.label)
        ds = ds.filter(lambda example: example["label"] == wanted)
    return ds


def _tfds_num_examples(config, split_name: str) -> int:
    from lensjax.data import deeplense
    data = config.data
    builder = deeplense.build(data.tfds_name, data.manual_dir or None,
                              data.get("data_dir") or None,
                              split_seed=int(data.get("split_seed", 0)))
    return int(builder.info.splits[split_name].num_examples)


def _to_model_batch(example: dict) -> dict:
    if "hr" in example:
        batch = {"lr": example["lr"].astype(np.float32), "hr": example["hr"].astype(np.float32)}
    else:
        batch = {"image": example["image"].astype(np.float32)}
    n = len(next(iter(batch.values())))
    batch["label"] = (example["label"].astype(np.int32) if "label" in example
                      else np.zeros(n, np.int32))
    return batch


_TRANSFORM_CACHE: dict = {}


def _transform_sharded(mesh, normalization: str, augment: bool):
    """jit of transforms.apply on global batches, cached per (mesh, settings)."""
    cache_key = (mesh, normalization, augment)
    if cache_key not in _TRANSFORM_CACHE:
        _TRANSFORM_CACHE[cache_key] = jax.jit(
            lambda batch, key: transforms.apply(batch, key, normalization, augment),
            out_shardings=parallel.batch_sharding(mesh))
    return _TRANSFORM_CACHE[cache_key]


def _tfds_train(config, mesh, start_step: int) -> Iterator[Batch]:
    from lensjax.data import deeplense
    data = config.data
    local_batch = parallel.check_global_batch(config.train.batch_size, mesh)
    ds = _tfds_dataset(config, deeplense.train_split(data.tfds_name))
    ds = ds.shard(jax.process_count(), jax.process_index())
    # A fixed-seed shuffle makes the stream a function of the step alone, so
    # skipping start_step batches resumes it exactly.
    ds = ds.shuffle(data.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
    ds = ds.repeat().batch(local_batch, drop_remainder=True).skip(start_step).prefetch(2)
    transform = _transform_sharded(mesh, data.get("normalization", "none"), bool(data.augment))
    aug_key = simulated.stream_key(config.seed, "tfds_augment")
    for step, example in enumerate(ds.as_numpy_iterator(), start_step):
        batch = parallel.global_batch_from_local(_to_model_batch(example), mesh)
        yield transform(batch, jax.random.fold_in(aug_key, step))


def _tfds_heldout(config, mesh, split: str, limit: int | None) -> Iterator[Batch]:
    """Every process yields the same number of batches (padding with masked examples),
    so collectives inside the evaluation step never wait on a process that ran out."""
    from lensjax.data import deeplense
    data = config.data
    local_batch = parallel.check_global_batch(config.eval.batch_size, mesh)
    name = (deeplense.heldout_split(data.tfds_name) if split == "heldout"
            else deeplense.selection_split(data.tfds_name))
    count, process = jax.process_count(), jax.process_index()
    # With a class filter the unfiltered count is an upper bound: the surplus
    # batches are fully masked.
    total = _tfds_num_examples(config, name)
    if limit is not None:
        total = min(total, limit)
    num_batches = -(-(-(-total // count)) // local_batch)
    ds = _tfds_dataset(config, name).take(total).shard(count, process).batch(local_batch)
    empty = {k: np.zeros((0, *spec.shape[1:]), spec.dtype.as_numpy_dtype)
             for k, spec in ds.element_spec.items()}
    examples = ds.as_numpy_iterator()
    transform = _transform_sharded(mesh, data.get("normalization", "none"), False)
    for i in range(num_batches):
        batch = _to_model_batch(next(examples, empty))
        n = len(batch["label"])
        batch = {k: np.concatenate([v, np.zeros((local_batch - n, *v.shape[1:]), v.dtype)])
                 for k, v in batch.items()}
        batch["mask"] = np.arange(local_batch) < n
        # ds.shard(count, process) holds elements process, process + count, ...
        batch["index"] = ((i * local_batch + np.arange(local_batch)) * count + process
                          ).astype(np.int32)
        yield transform(parallel.global_batch_from_local(batch, mesh), jax.random.key(0))
