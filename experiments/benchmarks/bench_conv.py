"""Convolution implementations for the ResNet: "xla" vs "patches" vs "auto".

Times one jitted ResNet-18 training-step gradient (forward + backward, BatchNorm
in training mode, softmax cross-entropy) per `conv_impl`, with identical
parameters, and prints ms per step (median of `--repeats`, after compilation).
`--layers` times single 3x3 / 1x1 / stem convolutions instead (the per-layer
evidence for the "auto" rule in lensjax/models/layers.py).

    python experiments/benchmarks/bench_conv.py                     # network table
    python experiments/benchmarks/bench_conv.py --layers            # per-layer table
    python experiments/benchmarks/bench_conv.py --widths 16 --sizes 64 --repeats 3

Result on the 2-core development CPU (jax 0.10.2, batch 32, ms per fwd+bwd):

    width  image  stem        xla   patches     auto
       16     64  small       ...
(filled in below by the run recorded in the module docstring of layers.py)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from lensjax.models import get_model  # noqa: E402
from lensjax.models import layers  # noqa: E402
from lensjax.models.layers import (CONV_IMPLS, choose_conv_impl, conv_patches,  # noqa: E402
                                   conv_xla, set_conv_impl)


def _interleaved_ms(fns: dict, args: dict, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` wall time (ms) per variant, after one compiling call each.

    Variants are timed round-robin and the minimum is kept: on a shared 2-core
    machine other processes inflate individual timings, and interleaving keeps
    that load from biasing one variant.
    """
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            best[name] = min(best[name], 1e3 * (time.perf_counter() - start))
    return best


def time_network(width: int, image_size: int, batch_size: int, impls: list[str],
                 repeats: int, num_classes: int = 3) -> dict[str, float]:
    """ms per ResNet-18 gradient step for each conv_impl, same parameters and batch."""
    model = get_model("resnet18", num_classes=num_classes, rngs=nnx.Rngs(0), width=width,
                      image_size=image_size)
    key_x, key_y = jax.random.split(jax.random.key(1))
    images = jax.random.normal(key_x, (batch_size, image_size, image_size, 1))
    labels = jax.random.randint(key_y, (batch_size,), 0, num_classes)
    fns, args = {}, {}
    for impl in impls:
        set_conv_impl(model, impl)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params, rest, images, labels, graphdef=graphdef):
            # copy=True: fresh Variables at this trace level, so BatchNorm may update them.
            net = nnx.merge(graphdef, params, rest, copy=True)
            logits = net(images)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, nnx.state(net, nnx.BatchStat)

        fns[impl] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        args[impl] = (params, rest, images, labels)
    results = _interleaved_ms(fns, args, repeats)
    print(f"  width={width} image={image_size} {results}", file=sys.stderr, flush=True)
    return results


# (H, cin, cout, kernel, stride): shapes that occur in ResNet-18/50 at widths 8-64.
LAYER_CASES = (
    (64, 8, 8, 3, 1), (32, 16, 16, 3, 1), (75, 16, 16, 3, 1), (64, 24, 24, 3, 1),
    (64, 32, 32, 3, 1), (16, 32, 32, 3, 1), (64, 64, 64, 3, 1), (38, 64, 64, 3, 1),
    (16, 256, 256, 3, 1), (2, 512, 512, 3, 1), (64, 16, 32, 3, 2), (32, 128, 256, 3, 2),
    (64, 16, 64, 1, 1), (64, 64, 16, 1, 1), (32, 64, 128, 1, 2),
    (64, 1, 64, 3, 1), (150, 1, 64, 7, 2),
)


def time_layers(batch_size: int, repeats: int) -> list[tuple]:
    """ms per jitted fwd+bwd of one SAME convolution, xla vs patches, for LAYER_CASES."""
    rows = []
    key = jax.random.key(0)
    for size, cin, cout, k, stride in LAYER_CASES:
        x = jax.random.normal(key, (batch_size, size, size, cin))
        w = jax.random.normal(key, (k, k, cin, cout)) * (2.0 / (k * k * cout)) ** 0.5
        fns = {name: jax.jit(jax.grad(
                   lambda x, w, conv=conv: jnp.sum(conv(x, w, (stride, stride)) ** 2), argnums=(0, 1)))
               for name, conv in (("xla", conv_xla), ("patches", conv_patches))}
        times = _interleaved_ms(fns, {name: (x, w) for name in fns}, repeats)
        auto = choose_conv_impl((k, k), cin, backend="cpu")
        rows.append((size, cin, cout, k, stride, times["xla"], times["patches"], auto))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 150])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", nargs="+", default=list(CONV_IMPLS), choices=CONV_IMPLS)
    parser.add_argument("--layers", action="store_true", help="time single convolutions instead")
    parser.add_argument("--auto-min-channels", type=int, default=None,
                        help="override layers.PATCHES_MIN_CHANNELS (the CPU rule of 'auto')")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.auto_min_channels is not None:
        layers.PATCHES_MIN_CHANNELS = args.auto_min_channels
    print(f"# jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
          f"batch {args.batch_size}, best of {args.repeats} interleaved runs; "
          f"auto: patches on CPU when cin >= {layers.PATCHES_MIN_CHANNELS}, 1x1 or cin == 1")
    if args.layers:
        print("# ms per jitted fwd+bwd of one SAME convolution (patches = slices + matmul)")
        print(f"{'input':>9} {'cin':>5} {'cout':>5} {'kernel':>6} {'stride':>6} "
              f"{'xla':>9} {'patches':>9} {'auto(cpu)':>9}")
        for size, cin, cout, k, stride, t_xla, t_patches, auto in time_layers(args.batch_size,
                                                                              args.repeats):
            print(f"{f'{size}x{size}':>9} {cin:5d} {cout:5d} {f'{k}x{k}':>6} {stride:6d} "
                  f"{t_xla:9.1f} {t_patches:9.1f} {auto:>9}")
        return 0
    print("# ms per ResNet-18 gradient step (forward + backward, BatchNorm training mode)")
    print(f"{'width':>5} {'image':>5} {'stem':>8} " + " ".join(f"{impl:>9}" for impl in args.impls))
    for width in args.widths:
        for size in args.sizes:
            times = time_network(width, size, args.batch_size, args.impls, args.repeats)
            stem = "imagenet" if size >= 128 else "small"
            print(f"{width:5d} {size:5d} {stem:>8} " + " ".join(f"{times[i]:9.1f}" for i in args.impls),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
