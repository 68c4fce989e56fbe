"""FSDP memory: parameter + optimiser-state bytes per device, replicated vs sharded, 1 vs 8 devices.

For ViT-B/8 and ViT-L/8 classifiers (lensjax.tasks.classification, AdamW with the
library's defaults) the train state is built abstractly (`train.init_state(...,
abstract=True)`: shapes only, no memory) and laid out with the shardings that
`train.jit_train_step` uses (`train.state_shardings`), with and without
`config.mesh.fsdp_min_size`, on a mesh of 1 and of 8 devices (8 fake CPU
devices: XLA_FLAGS is set below, before JAX starts). Bytes per device are summed
from each array's shard on that device (`sharding.devices_indices_map`); the
table shows the most loaded device. Parameter counts do not depend on the image
size (position embeddings are not parameters), so a 32 px model has the
parameters of a 64 px one.

Then one real FSDP training step runs on 8 devices (ViT-B, 32 px images, batch 8),
and the bytes of its materialised state, summed over each device's addressable
shards, are checked against the computed table.

    python experiments/benchmarks/bench_fsdp.py                   # ~1-2 minutes on 2 cores
    python experiments/benchmarks/bench_fsdp.py --step-variants B,L  # also a ViT-L step
                                                                  # (~6 GB of host memory)
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # 8 fake CPU devices; must precede JAX's start-up
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # XLA's SPMD partitioner warns (hundreds of lines) that it replicates the small
    # attention tensors of the 8-device step; TF_CPP_MIN_LOG_LEVEL=0 shows them.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import collections  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from lensjax import configlib, parallel, tasks, train  # noqa: E402

NUM_DEVICES = 8
IMAGE_SIZE = 32
PATCH_SIZE = 8


def vit_config(variant: str, batch_size: int, fsdp_min_size: int):
    """A ViT classifier config (Common Test I classes) with the library's optimiser defaults."""
    config = configlib.base_config()
    config.task = "classification"
    config.data.preset = "common_test"
    config.model = dict(name="vit", kwargs=dict(variant=variant, patch_size=PATCH_SIZE,
                                                image_size=IMAGE_SIZE))
    config.train.batch_size = batch_size
    config.mesh.fsdp_min_size = fsdp_min_size
    return config


def bytes_per_device(tree, shardings) -> dict:
    """{device: bytes} of a pytree of arrays or ShapeDtypeStructs laid out with `shardings`."""
    totals = collections.Counter()
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shape, itemsize = tuple(leaf.shape), np.dtype(leaf.dtype).itemsize
        for device, index in sharding.devices_indices_map(shape).items():
            sizes = [len(range(*s.indices(n))) for s, n in zip(index, shape)]
            totals[device] += math.prod(sizes) * itemsize
    return totals


def addressable_bytes_per_device(tree) -> dict:
    """{device: bytes} of materialised arrays, from their addressable shards."""
    totals = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] += shard.data.nbytes
    return totals


def state_table(variant: str, fsdp_min_size: int) -> list[dict]:
    """Rows (devices, layout, params/optimiser/total bytes on the most loaded device)."""
    task = tasks.get_task("classification")
    rows = []
    for num_devices in (1, NUM_DEVICES):
        mesh = parallel.make_mesh(num_devices)
        for layout, min_size in (("replicated", 0), ("fsdp", fsdp_min_size)):
            config = vit_config(variant, num_devices, min_size)
            _, state, _ = train.init_state(config, task, abstract=True)
            shardings = train.state_shardings(state, mesh, min_size or None)
            parts = {key: bytes_per_device(state[key], shardings[key])
                     for key in ("params", "opt_state")}
            total = bytes_per_device(state, shardings)
            busiest = max(total, key=total.get)
            rows.append(dict(variant=variant, devices=num_devices, layout=layout,
                             num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"])),
                             params=parts["params"][busiest], opt_state=parts["opt_state"][busiest],
                             total=total[busiest]))
    return rows


def run_fsdp_step(variant: str, fsdp_min_size: int) -> tuple[float, float, dict, dict]:
    """One real FSDP train step on 8 devices: (loss, seconds incl. compile, bytes measured, computed)."""
    task = tasks.get_task("classification")
    config = vit_config(variant, NUM_DEVICES, fsdp_min_size)
    mesh = parallel.make_mesh(NUM_DEVICES)
    graphdef, state, tx = train.init_state(config, task)
    step_fn, shardings = train.build_train_step(graphdef, task, tx, config, state, mesh)
    state = jax.device_put(state, shardings)
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(size=(NUM_DEVICES, IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32),
             "label": (np.arange(NUM_DEVICES) % 3).astype(np.int32)}
    batch = jax.device_put(batch, parallel.batch_sharding(mesh))
    start = time.perf_counter()
    state, step_metrics = step_fn(state, batch, jax.random.key(0))
    loss = float(step_metrics.compute()["loss"])
    seconds = time.perf_counter() - start
    if int(state["step"]) != 1 or not np.isfinite(loss):
        raise AssertionError(f"FSDP step failed: step {int(state['step'])}, loss {loss}")
    measured = addressable_bytes_per_device(state)
    computed = bytes_per_device(state, shardings)
    if dict(measured) != dict(computed):
        raise AssertionError(f"addressable shard bytes {dict(measured)} != computed {dict(computed)}")
    return loss, seconds, measured, computed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="B,L", help="ViT sizes for the memory table")
    parser.add_argument("--step-variants", default="B",
                        help="ViT sizes that also run one FSDP step on 8 devices ('' for none)")
    parser.add_argument("--fsdp-min-size", type=int, default=2 ** 16,
                        help="config.mesh.fsdp_min_size: arrays of at least this many elements "
                             "are sharded")
    args = parser.parse_args(argv)
    if jax.device_count() < NUM_DEVICES:
        parser.error(f"needs {NUM_DEVICES} devices, found {jax.device_count()} (JAX was started "
                     "before this script could ask for 8 fake CPU devices)")

    gib = 2.0 ** 30
    print(f"FSDP memory per device | jax {jax.__version__} | {jax.devices()[0].device_kind} x"
          f"{jax.device_count()} | ViT/{PATCH_SIZE} classifiers, AdamW | fsdp_min_size "
          f"{args.fsdp_min_size} | bytes on the most loaded device")
    header = (f"{'model':<6} {'params':>7} {'devices':>7} {'layout':<10} {'params GiB':>10} "
              f"{'opt GiB':>8} {'total GiB':>9} {'vs 1 device':>11}")
    print(header)
    print("-" * len(header))
    for variant in args.variants.split(","):
        rows = state_table(variant, args.fsdp_min_size)
        single = next(r["total"] for r in rows if r["devices"] == 1 and r["layout"] == "replicated")
        for row in rows:
            print(f"ViT-{variant:<2} {row['num_params'] / 1e6:6.0f}M {row['devices']:7d} "
                  f"{row['layout']:<10} {row['params'] / gib:10.3f} {row['opt_state'] / gib:8.3f} "
                  f"{row['total'] / gib:9.3f} {single / row['total']:10.2f}x", flush=True)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for variant in filter(None, args.step_variants.split(",")):
        fsdp = next(r for r in state_table(variant, args.fsdp_min_size)
                    if r["devices"] == NUM_DEVICES and r["layout"] == "fsdp")
        # The 8 fake devices share host memory; gradients and the initial state add
        # about three unsharded copies of the parameters.
        needed = NUM_DEVICES * fsdp["total"] + 3 * fsdp["num_params"] * 4
        if needed > 0.7 * available:
            print(f"skipped the ViT-{variant} step: it needs ~{needed / gib:.1f} GiB of host memory, "
                  f"{available / gib:.1f} GiB are free")
            continue
        loss, seconds, measured, _ = run_fsdp_step(variant, args.fsdp_min_size)
        print(f"one FSDP step, ViT-{variant} on {NUM_DEVICES} devices: loss {loss:.4f}, "
              f"{seconds:.1f} s with compilation; materialised state per device "
              f"{max(measured.values()) / gib:.3f} GiB (= computed)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
