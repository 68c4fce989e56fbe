"""Convolution implementations for the ResNet: "xla" vs "patches" vs "auto".

Times one jitted ResNet-18 training-step gradient (forward + backward, BatchNorm
in training mode, softmax cross-entropy) per `conv_impl`, with identical
parameters, and prints ms per step (best of `--repeats` interleaved runs, after
compilation). `--layers` times single convolutions instead, at the shapes and
batch sizes of the networks in bench_train.py: the per-layer evidence for the
"auto" rule, recorded in the docstring of lensjax/models/layers.py.

    python experiments/benchmarks/bench_conv.py --layers            # per-layer table (minutes)
    python experiments/benchmarks/bench_conv.py                     # network table
    python experiments/benchmarks/bench_conv.py --widths 16 --sizes 64 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from bench_machine import cpu_description  # noqa: E402  (names the CPU model)

from lensjax import compilation  # noqa: E402  (XLA convolutions on CPU, as lensjax compiles)
from lensjax.models import get_model  # noqa: E402
from lensjax.models import layers  # noqa: E402
from lensjax.models.layers import (CONV_IMPLS, choose_conv_impl, conv_output_size,  # noqa: E402
                                   conv_patches, conv_xla, set_conv_impl)


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

        fns[impl] = compilation.jit(jax.value_and_grad(loss_fn, has_aux=True))
        args[impl] = (params, rest, images, labels)
    results = _interleaved_ms(fns, args, repeats)
    print(f"  width={width} image={image_size} {results}", file=sys.stderr, flush=True)
    return results


# (batch, H, cin, cout, kernel, stride): the layers of the networks in
# bench_train.py at its CPU batch sizes (ResNet-18 width 64 at 64 px and 150 px,
# the width-16 demo ResNet-18, the base-width-32 UNet at 152 px) and two at batch 32.
LAYER_CASES = (
    (8, 64, 1, 64, 3, 1), (8, 64, 64, 64, 3, 1), (8, 64, 64, 128, 3, 2), (8, 64, 64, 128, 1, 2),
    (8, 32, 128, 128, 3, 1), (8, 32, 128, 256, 3, 2), (8, 16, 256, 256, 3, 1),
    (8, 16, 256, 512, 3, 2), (8, 8, 512, 512, 3, 1),
    (16, 150, 1, 64, 7, 2), (16, 38, 64, 64, 3, 1), (16, 38, 64, 128, 3, 2),
    (16, 19, 128, 128, 3, 1), (16, 10, 256, 256, 3, 1), (16, 5, 512, 512, 3, 1),
    (64, 16, 16, 16, 3, 1), (64, 16, 16, 32, 3, 2), (64, 8, 32, 32, 3, 1), (64, 4, 64, 64, 3, 1),
    (64, 4, 64, 128, 3, 2), (64, 2, 128, 128, 3, 1),
    (2, 152, 32, 32, 3, 1), (2, 152, 64, 32, 3, 1), (2, 152, 32, 32, 3, 2), (2, 76, 64, 64, 3, 1),
    (2, 38, 64, 64, 3, 1), (2, 19, 128, 128, 3, 1),
    (32, 64, 64, 64, 3, 1), (32, 16, 256, 256, 3, 1),
)


def time_layers(repeats: int, batch_size: int | None = None) -> list[tuple]:
    """ms per jitted fwd+bwd of one SAME convolution, xla vs patches, for LAYER_CASES
    (each at its own batch size unless `batch_size` is given)."""
    rows = []
    key = jax.random.key(0)
    for case_batch, size, cin, cout, k, stride in LAYER_CASES:
        batch = batch_size or case_batch
        x = jax.random.normal(key, (batch, size, size, cin))
        w = jax.random.normal(key, (k, k, cin, cout)) * (2.0 / (k * k * cout)) ** 0.5
        fns = {name: compilation.jit(jax.grad(
                   lambda x, w, conv=conv: jnp.sum(conv(x, w, (stride, stride)) ** 2), argnums=(0, 1)))
               for name, conv in (("xla", conv_xla), ("patches", conv_patches))}
        times = _interleaved_ms(fns, {name: (x, w) for name in fns}, repeats)
        auto = choose_conv_impl((k, k), cin, (stride, stride),
                                conv_output_size((size, size), (stride, stride)), backend="cpu")
        rows.append((batch, size, cin, cout, k, stride, times["xla"], times["patches"], auto))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 150])
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch (default: 32 for networks, each layer case's own for --layers)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", nargs="+", default=list(CONV_IMPLS), choices=CONV_IMPLS)
    parser.add_argument("--layers", action="store_true", help="time single convolutions instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    print(f"# jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPUs, {cpu_description()}, load average "
          f"{os.getloadavg()[0]:.2f}; best of {args.repeats} interleaved runs; auto on CPU: patches "
          f"for 1x1, cin == 1, stride > 1, cin >= {layers.PATCHES_MIN_CHANNELS} or output maps of "
          f"<= {layers.PATCHES_MAX_OUTPUT_PIXELS} pixels, else xla")
    if args.layers:
        print("# ms per jitted fwd+bwd of one SAME convolution (patches = slices + matmul)")
        print(f"{'batch':>5} {'input':>9} {'cin':>5} {'cout':>5} {'kernel':>6} {'stride':>6} "
              f"{'xla':>9} {'patches':>9} {'auto(cpu)':>9}")
        for batch, size, cin, cout, k, stride, t_xla, t_patches, auto in time_layers(
                args.repeats, args.batch_size):
            print(f"{batch:5d} {f'{size}x{size}':>9} {cin:5d} {cout:5d} {f'{k}x{k}':>6} {stride:6d} "
                  f"{t_xla:9.1f} {t_patches:9.1f} {auto:>9}", flush=True)
        return 0
    batch_size = args.batch_size or 32
    print(f"# ms per ResNet-18 gradient step (forward + backward, BatchNorm training mode), "
          f"batch {batch_size}")
    print(f"{'width':>5} {'image':>5} {'stem':>8} " + " ".join(f"{impl:>9}" for impl in args.impls))
    for width in args.widths:
        for size in args.sizes:
            times = time_network(width, size, batch_size, args.impls, args.repeats)
            stem = "imagenet" if size >= 128 else "small"
            print(f"{width:5d} {size:5d} {stem:>8} " + " ".join(f"{times[i]:9.1f}" for i in args.impls),
                  flush=True)
    return 0


if __name__ == "__main__":
    from lensjax import hugepages
    hugepages.restart_with_hugepages()
    sys.exit(main())
