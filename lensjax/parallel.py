"""Device mesh, shardings and multi-host start-up.

One mesh axis, `data`, over every device of every process: batches are sharded
along it, parameters are replicated (or, with `config.mesh.fsdp_min_size`, large
parameters are sharded along their largest divisible axis: FSDP).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(multihost: bool | None = None) -> None:
    """Start jax.distributed when asked (`multihost=True`) or when the environment
    says so (SLURM with several tasks, or JAX_COORDINATOR_ADDRESS set).

    Must run before any other JAX call. Auto-detects SLURM and TPU pods; on
    localhost pass JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
    """
    env = os.environ
    if multihost is None:
        multihost = (int(env.get("SLURM_NTASKS", "1")) > 1
                     or "JAX_COORDINATOR_ADDRESS" in env)
    if not multihost:
        return
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in env:
        kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env["JAX_NUM_PROCESSES"]),
                      process_id=int(env["JAX_PROCESS_ID"]))
        if env.get("JAX_PLATFORMS", "") == "cpu":  # CPU-only processes talk through gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


def hide_accelerators_from_tensorflow() -> None:
    """Import TensorFlow with its GPUs hidden, so that it never allocates accelerator
    memory that JAX owns (TensorFlow takes a GPU's memory at its first op there).

    lensjax uses TensorFlow only through TFDS / tf.data and clu's metric writers; both
    call this before TensorFlow's first op. Once TensorFlow has initialised its
    devices, hiding them raises RuntimeError: then it is too late, and nothing changes.
    """
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over the first `num_devices` devices (default: all), axis `data`."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are visible")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices[:n])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`; other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_global_batch(global_batch_size: int, mesh: jax.sharding.Mesh) -> int:
    """Per-process batch size; ValueError unless the batch splits evenly over devices."""
    n = mesh.size
    if global_batch_size % n:
        raise ValueError(f"batch_size={global_batch_size} must be divisible by the number of "
                         f"devices ({n}); set --config.train.batch_size to a multiple of {n}")
    return global_batch_size // jax.process_count()


def param_shardings(params, mesh: jax.sharding.Mesh, fsdp_min_size: int | None = None):
    """Shardings for a parameter pytree: replicated, or FSDP for arrays of at least
    `fsdp_min_size` elements (sharded along their largest axis divisible by the mesh)."""
    def rule(x):
        shape = np.shape(x)
        if fsdp_min_size is None or int(np.prod(shape)) < fsdp_min_size:
            return replicated(mesh)
        axes = sorted(range(len(shape)), key=lambda a: -shape[a])
        for axis in axes:
            if shape[axis] % mesh.size == 0:
                spec = [None] * len(shape)
                spec[axis] = DATA_AXIS
                return NamedSharding(mesh, P(*spec))
        return replicated(mesh)
    return jax.tree.map(rule, params)


def global_batch_from_local(local: dict, mesh: jax.sharding.Mesh) -> dict:
    """Host-local numpy shards -> one global jax.Array per entry, sharded on `data`."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole (global) value of an array as numpy, on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def global_array_from_host(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a numpy value that every process holds in full."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
