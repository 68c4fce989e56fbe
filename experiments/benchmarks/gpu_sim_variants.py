"""GPU-only: lensjax simulator throughput for both point-mass strategies and several batch sizes.

    python experiments/benchmarks/gpu_sim_variants.py
"""
import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import jax
from lensjax.sim import get_preset, profiles


def rate(preset, label, batch, seconds=2.0):
    key = jax.random.key(0)
    jax.block_until_ready(preset.sample(key, batch, label=label))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3:
        jax.block_until_ready(preset.sample(jax.random.fold_in(key, n), batch, label=label))
        n += 1
    return n * batch / (time.perf_counter() - start)


print(jax.devices(), jax.__version__, flush=True)
for strategy in ("reduce", "scan"):
    profiles.POINT_MASS_STRATEGY = strategy
    for name, label in (("model_i", "no_sub"), ("model_i", "cdm"), ("model_i", "axion"),
                        ("model_ii", "axion"), ("common_test", "sphere")):
        for batch in (1024, 8192):
            preset = get_preset(name)
            print(f"{strategy:6s} {name:11s} {label:6s} batch {batch:6d} {rate(preset, label, batch):12.0f} img/s",
                  flush=True)
        jax.clear_caches()
