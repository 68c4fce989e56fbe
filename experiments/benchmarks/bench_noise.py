"""Cost of the simulator's random words and of the Model I noise, per 150 x 150 image.

Times, in one jitted batch (default 256 images, best of `--repeats`):
  - the Threefry-2x32 words of one image: jax's primitive
    (`jax.extend.random.threefry_2x32`) vs `instrument.threefry_2x32_elementwise`
    (bit-identical; `instrument.random_words` uses the latter on CPU);
  - a `model_i` no_sub image with its noise and with noise="none", which says
    what share of an image the noise costs.

    python experiments/benchmarks/bench_noise.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.extend
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from lensjax.sim import get_preset, instrument  # noqa: E402

PIXELS = 150 * 150


def best_seconds(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls of fn() (after one warm-up call that compiles)."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def words_jax(key_data, n: int):
    return jax.extend.random.threefry_2x32(key_data, jnp.arange(2 * n, dtype=jnp.uint32))


def words_elementwise(key_data, n: int):
    half = jnp.arange(n, dtype=jnp.uint32)
    first, second = instrument.threefry_2x32_elementwise(key_data, half, half + jnp.uint32(n))
    return jnp.concatenate([first, second])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    batch, repeats = args.batch_size, args.repeats
    print(f"# jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; batch {batch}, best of {repeats}; ms per 150 x 150 image; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    key_data = jax.random.key_data(jax.random.key(0))
    n = batch * PIXELS // 2
    fns = {name: jax.jit(lambda k, f=f: f(k, n))
           for name, f in (("jax threefry_2x32", words_jax),
                           ("threefry_2x32_elementwise", words_elementwise))}
    same = bool(jnp.all(fns["jax threefry_2x32"](key_data)
                        == fns["threefry_2x32_elementwise"](key_data)))
    print(f"random words, {PIXELS} per image (identical: {same})")
    times = {name: best_seconds(lambda f=f: f(key_data), repeats) / batch * 1e3
             for name, f in fns.items()}
    for name, ms in times.items():
        print(f"  {name:<28} {ms:8.4f}")
    print(f"  speed-up {times['jax threefry_2x32'] / times['threefry_2x32_elementwise']:.2f}x")
    print("model_i no_sub image, one jitted sample call")
    key = jax.random.key(1)
    images = {}
    for noise in ("model_i", "none"):
        preset = get_preset("model_i", noise=noise)
        images[noise] = best_seconds(lambda p=preset: p.sample(key, batch, label=0),
                                     repeats) / batch * 1e3
        print(f"  noise={noise:<22} {images[noise]:8.4f}")
    print(f"  noise share of an image {1 - images['none'] / images['model_i']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
