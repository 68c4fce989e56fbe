"""Where the train-step gap to PyTorch comes from on CPU: single kernels, lensjax vs PyTorch.

Times, for both frameworks in the same run (alternating, best of `--repeats`):
  - a 3 x 3, stride-1, "same" convolution at each stage of the stride-1 ResNet-18
    of bench_train.py (`resnet18_64`: batch 8, maps 64 / 32 / 16 / 8 px with 64 /
    128 / 256 / 512 channels) and the first level of the diffusion UNet (`unet_150`:
    batch 2, 152 px, 32 channels): forward, input gradient, weight gradient and
    forward + both gradients, as lensjax runs it ("lensjax ms": the implementation
    `layers.Conv`'s "auto" picks on this machine, compiled with
    `lensjax.compilation`: by default oneDNN's forward and input gradient, as
    lensjax runs them without a persistent compilation cache; with --no-onednn,
    LENSJAX_ONEDNN=0), as XLA's own
    convolution ("XLA ms": `layers.conv_xla`, what lensjax ran before oneDNN; weight
    gradient on image strips below batch 4) and as a bare convolution with XLA's
    default (YNNPACK convolutions, "YNN ms");
  - the 3 x 3 / 2 max pool of the ResNet-18 ImageNet stem (`resnet18_150`: batch 16,
    75 px, 64 channels), forward + backward: lensjax's `layers.max_pool` and XLA's
    reduce_window with its own gradient (in the "YNN ms" column: XLA's default);
  - float32 matmuls: a square one and the shapes of the ViT-S MAE step
    (544 tokens x 384 features, batch 32 x 17 visible tokens).
It prints GFLOP/s of each side and their ratio, so the train-step ratios of
bench_train.py can be traced to the kernels that cause them. `--alternatives`
also times the rejected ways around XLA's convolution at the 8 x 64 x 64 x 64
layer (building the im2col patch matrix; the weight gradient as nine shifted
matmuls), the weight gradient of the UNet's batch-2 layer on image strips, and
the exact GELU. `--weight-grads CASES` times the weight gradient of every 3 x 3,
stride-1 convolution whose weight gradient is XLA's (`layers.weight_grad`) in
bench_train.py's steps of CASES (resnet18_64, resnet18_150, unet_150) against
PyTorch's, and their sum per step (the layers read from the models,
`weight_grad_convs`).

    python experiments/benchmarks/bench_kernels.py                 # about 2 minutes on 2 cores
    python experiments/benchmarks/bench_kernels.py --alternatives
    python experiments/benchmarks/bench_kernels.py --no-onednn     # lensjax with LENSJAX_ONEDNN=0
    python experiments/benchmarks/bench_kernels.py --weight-grads resnet18_64,resnet18_150,unet_150
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from bench_machine import cpu_description  # noqa: E402  (names the CPU model)

from bench_noise import best_seconds  # noqa: E402  (best of n calls, blocked on)

from lensjax import compilation  # noqa: E402
from lensjax.models import onednn  # noqa: E402

# (batch, map size, channels) of the 3 x 3 convolutions of resnet18_64, one per
# stage, and of the first level of unet_150.
CONV_SHAPES = ((8, 64, 64), (8, 32, 128), (8, 16, 256), (8, 8, 512), (2, 152, 32))
# (batch, map size, channels) of the max pool of resnet18_150's ImageNet stem.
POOL_SHAPE = (16, 75, 64)
# (m, k, n) float32 matmuls: square, then ViT-S MAE encoder shapes (qkv and MLP).
MATMUL_SHAPES = ((1024, 1024, 1024), (544, 384, 1152), (544, 384, 1536), (544, 1536, 384))


def bare_conv(x, w):
    """A SAME 3 x 3 convolution as XLA sees it without lensjax's layers."""
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def bare_weight_grad(x, dy, w):
    """XLA's own weight gradient of `bare_conv` (w only gives the shape)."""
    return jax.vjp(lambda w: bare_conv(x, w), w)[1](dy)[0]


def lensjax_conv(channels: int, size: int, impl: str):
    """The convolution function of `impl` ("auto": what `layers.Conv` picks for this layer)."""
    from lensjax.models import layers

    if impl == "auto":
        impl = layers.choose_conv_impl((3, 3), channels, (1, 1), (size, size))
    return {"onednn": layers.conv_onednn, "xla": layers.conv_xla,
            "patches": layers.conv_patches}[impl], impl


def jax_conv_fns(batch: int, size: int, channels: int, options: dict, impl: str | None):
    """(forward, input gradient, weight gradient, forward + both gradients) of one
    convolution, jitted with `options`: lensjax's `impl` ("auto", "xla") or, for None,
    the bare `lax.conv_general_dilated` with XLA's own gradients."""
    from lensjax.models import layers

    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    w = jax.random.normal(jax.random.key(1), (3, 3, channels, channels)) * 0.05
    dy = jax.random.normal(jax.random.key(2), (batch, size, size, channels))
    if impl is None:
        conv, name = bare_conv, "bare"
    else:
        fn, name = lensjax_conv(channels, size, impl)
        conv = lambda x, w: fn(x, w, (1, 1))  # noqa: E731
    if name == "onednn":
        padding = layers.same_padding((size, size), (3, 3), (1, 1))
        input_grad = lambda x, w, dy: onednn.input_grad(dy, w, padding)  # noqa: E731
    else:
        input_grad = lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]  # noqa: E731
    if name in ("onednn", "xla"):
        weight_grad = lambda x, w, dy: layers.weight_grad(x, dy, w)  # noqa: E731
    else:
        weight_grad = lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]  # noqa: E731
    both = jax.grad(lambda x, w: jnp.sum(jnp.square(conv(x, w))), argnums=(0, 1))
    jitted = [jax.jit(f, compiler_options=options) for f in (conv, input_grad, weight_grad, both)]
    args = ((x, w), (x, w, dy), (x, w, dy), (x, w))
    return [lambda f=f, a=a: jax.block_until_ready(f(*a)) for f, a in zip(jitted, args)]


def pool_fns(torch, options: dict):
    """Forward + backward of the ResNet-18 stem's 3 x 3 / 2 max pool (padding 1):
    lensjax's `layers.max_pool`, XLA's reduce_window with its default gradient
    (select-and-scatter), and PyTorch's max_pool2d."""
    from lensjax.models import layers

    batch, size, channels = POOL_SHAPE
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (batch, size, size, channels)))
    window, strides, padding = (3, 3), (2, 2), ((1, 1), (1, 1))

    def both(pool):
        grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.square(pool(x)))), compiler_options=options)
        return lambda: jax.block_until_ready(grad(x))

    x_torch = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous().requires_grad_(True)

    def torch_both():
        x_torch.grad = None
        torch.nn.functional.max_pool2d(x_torch, 3, 2, 1).square().sum().backward()
    pools = (layers.max_pool, layers.max_pool_xla)
    return (*(both(lambda x, pool=pool: pool(x, window, strides, padding)) for pool in pools),
            torch_both)


def torch_conv_fns(torch, batch: int, size: int, channels: int):
    """PyTorch's (forward, input gradient, weight gradient, forward + both gradients)."""
    layer = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    x = torch.randn(batch, channels, size, size)
    dy = torch.randn(batch, channels, size, size)
    x_grad = x.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            layer(x)

    def grad(mask):
        def run():
            torch.ops.aten.convolution_backward(dy, x, layer.weight, None, [1, 1], [1, 1], [1, 1],
                                                False, [0, 0], 1, mask)
        return run

    def both():
        layer.zero_grad(set_to_none=True)
        x_grad.grad = None
        layer(x_grad).square().sum().backward()
    return forward, grad([True, False, False]), grad([False, True, False]), both


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--alternatives", action="store_true",
                        help="also time the rejected convolution formulations and the GELU")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch intra-op threads (default: the cores JAX may use)")
    parser.add_argument("--weight-grads", default="",
                        help="comma-separated convolutional bench_train.py cases (e.g. "
                             "resnet18_64,resnet18_150,unet_150): also time the weight "
                             "gradient of each of their 3 x 3 stride-1 convolutions, summed "
                             "over the step")
    parser.add_argument("--no-onednn", action="store_true",
                        help="lensjax's column without oneDNN's kernels (sets LENSJAX_ONEDNN=0)")
    args = parser.parse_args(argv)
    weight_grad_cases = [c for c in args.weight_grads.split(",") if c]
    if weight_grad_cases:
        from bench_train import CASES
        valid = [name for name, case in CASES.items() if case.kind != "mae"]
        unknown = sorted(set(weight_grad_cases) - set(valid))
        if unknown:
            parser.error(f"--weight-grads: unknown case(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(valid)}")
    if args.no_onednn:
        os.environ[onednn.ENV_SWITCH] = "0"
    import torch  # benchmark-only reference (requirements-bench.txt)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores)
    print(f"# jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, {cpu_description()}, {cores} cores, load average "
          f"{os.getloadavg()[0]:.2f}; float32, best of {args.repeats}; "
          f"{onednn.describe_setting()}")
    print(f"{'kernel':<40} {'lensjax ms':>10} {'XLA ms':>8} {'YNN ms':>8} {'torch ms':>9} "
          f"{'lensjax GFLOP/s':>16} {'torch GFLOP/s':>14} {'lensjax / torch':>16}")

    def row(name, flops, ours, theirs, ynn=None, xla=None):
        t_ours, t_theirs = best_seconds(ours, args.repeats), best_seconds(theirs, args.repeats)
        extra = [f"{best_seconds(fn, args.repeats) * 1e3:8.2f}" if fn else f"{'-':>8}"
                 for fn in (xla, ynn)]
        print(f"{name:<40} {t_ours * 1e3:10.2f} {extra[0]} {extra[1]} {t_theirs * 1e3:9.2f} "
              f"{flops / t_ours / 1e9:16.1f} {flops / t_theirs / 1e9:14.1f} "
              f"{t_theirs / t_ours:15.2f}x", flush=True)

    # lensjax's options (XLA convolutions on CPU) vs XLA's default (YNNPACK's).
    options = compilation.compiler_options()
    for batch, size, channels in CONV_SHAPES:
        flops = 2.0 * batch * size * size * channels * channels * 9
        impl = lensjax_conv(channels, size, "auto")[1]
        ours = jax_conv_fns(batch, size, channels, options, "auto")
        xla = jax_conv_fns(batch, size, channels, options, "xla")
        ynn = jax_conv_fns(batch, size, channels, {}, None)
        theirs = torch_conv_fns(torch, batch, size, channels)
        name = f"conv3x3 {batch}x{size}x{size}x{channels}"
        for k, part in enumerate((f"fwd ({impl})", "input grad", "weight grad", "fwd+bwd")):
            row(f"{name} {part}", flops * (3 if k == 3 else 1), ours[k], theirs[k], ynn[k], xla[k])
    ours, xla_default, theirs = pool_fns(torch, options)
    batch, size, channels = POOL_SHAPE
    row(f"maxpool3x3/2 {batch}x{size}x{size}x{channels} fwd+bwd",
        9.0 * batch * channels * (-(-size // 2)) ** 2, ours, theirs, ynn=xla_default)
    for m, k, n in MATMUL_SHAPES:
        a, b = (np.random.default_rng(0).standard_normal(s).astype(np.float32) for s in ((m, k), (k, n)))
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        matmul = jax.jit(jnp.matmul)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        row(f"matmul {m}x{k}x{n}", 2.0 * m * k * n,
            lambda: jax.block_until_ready(matmul(ja, jb)), lambda: torch.matmul(ta, tb))
    if args.alternatives:
        time_alternatives(torch, args.repeats)
    for case in weight_grad_cases:
        time_weight_grads(torch, case, args.repeats)
    return 0


def weight_grad_convs(case_name: str) -> tuple[int, tuple]:
    """(batch, layers) of bench_train.py case `case_name`: its 3 x 3 stride-1
    convolutions whose weight gradient lensjax leaves to XLA (`layers.weight_grad`),
    in the order of the forward pass, each as (layers with this shape, map size, cin,
    cout, upsampling).

    Read from one abstract forward pass of the case's model (`jax.eval_shape`, no
    arrays) with `layers.Conv.convolve` recording every convolution that the CPU rule
    with oneDNN on sends to "onednn" (stride 1, k x k > 1, cin > 1); the strided ones
    and single-channel stems run on "patches", whose weight gradient is a matmul. An
    upsampling layer's 3 x 3 convolution runs on the upsampled map in PyTorch and, in
    lensjax (`unet.upsample_conv`), as a 2 x 2 convolution with 4 x cout outputs on
    the input map padded by one row and column: it is listed as the 3 x 3 layer.
    """
    import collections
    from unittest import mock

    from flax import nnx

    from bench_train import CASES, NUM_CLASSES
    from lensjax.models import get_model, layers

    case = CASES[case_name]
    kwargs = dict(case.kwargs, image_size=case.image_size)
    if case.kind == "classifier":
        kwargs["num_classes"] = NUM_CLASSES
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: get_model(case.model, rngs=nnx.Rngs(0), **kwargs)))
    seen = collections.Counter()
    convolve = layers.Conv.convolve

    def recording(self, x, kernel):
        kh, kw, cin, cout = kernel.shape
        output = layers.conv_output_size(x.shape[1:3], self.strides)
        if layers.choose_conv_impl((kh, kw), cin, self.strides, output, backend="cpu",
                                   onednn_available=True) == "onednn":
            if x.shape[1] != x.shape[2] or (kh, kw) not in ((2, 2), (3, 3)):
                raise ValueError(f"{case_name}: a {kh} x {kw} convolution of {x.shape}: "
                                 "only square maps and 3 x 3 (or upsampling 2 x 2) kernels")
            if (kh, kw) == (2, 2):
                seen[(2 * (x.shape[1] - 1), cin, cout // 4, True)] += 1
            else:
                seen[(x.shape[1], cin, cout, False)] += 1
        return convolve(self, x, kernel)

    def forward(state, images):
        model = nnx.merge(graphdef, state)
        if case.kind == "diffusion":
            return model(images, jnp.zeros((images.shape[0],), jnp.int32))
        return model(images)

    images = jax.ShapeDtypeStruct((case.batch_size, case.image_size, case.image_size, 1),
                                  jnp.float32)
    with mock.patch.object(layers.Conv, "convolve", recording):
        jax.eval_shape(forward, state, images)
    return case.batch_size, tuple((count, *shape) for shape, count in seen.items())


def time_weight_grads(torch, case: str, repeats: int) -> None:
    """ms of each layer's weight gradient in `case`'s step, lensjax (`layers.weight_grad`,
    on image strips below batch 4) vs PyTorch (`torch.nn.grad.conv2d_weight`), and
    their sums per step."""
    from lensjax.models import layers

    batch, convs = weight_grad_convs(case)
    upsampling_note = ("; upsampling layers: lensjax's 2 x 2 phase convolution"
                       if any(conv[-1] for conv in convs) else "")
    print(f"\nweight gradients of the {case} step's 3 x 3 stride-1 convolutions, batch {batch} "
          f"(ms, best of {repeats}{upsampling_note})")
    totals = np.zeros(2)
    for count, size, cin, cout, upsampling in convs:
        # lensjax's convolution: (map size, kernel size, outputs).
        ours = (size // 2 + 1, 2, 4 * cout) if upsampling else (size, 3, cout)
        x = jax.random.normal(jax.random.key(0), (batch, ours[0], ours[0], cin))
        dy = jax.random.normal(jax.random.key(1), (batch, ours[0], ours[0], ours[2]))
        kernel = jnp.zeros((ours[1], ours[1], cin, ours[2]))
        grad = jax.jit(lambda x, dy, kernel=kernel: layers.weight_grad(x, dy, kernel),
                       compiler_options=compilation.compiler_options())
        x_torch, dy_torch = torch.randn(batch, cin, size, size), torch.randn(batch, cout, size, size)
        ms = np.array([best_seconds(fn, repeats) * 1e3 for fn in (
            lambda: jax.block_until_ready(grad(x, dy)),
            lambda: torch.nn.grad.conv2d_weight(x_torch, (cout, cin, 3, 3), dy_torch, padding=1))])
        totals += count * ms
        print(f"  {count:2d} x {batch}x{size}x{size} {cin:3d}->{cout:<3d}"
              f"{' (upsampling)' if upsampling else '':13s} lensjax {ms[0]:7.2f}  "
              f"PyTorch {ms[1]:7.2f}  lensjax / PyTorch {ms[1] / ms[0]:.2f}x", flush=True)
    print(f"  per step: lensjax {totals[0]:.1f} ms, PyTorch {totals[1]:.1f} ms "
          f"({totals[1] / totals[0]:.2f}x)")


def time_alternatives(torch, repeats: int) -> None:
    """ms of the rejected convolution formulations, and of the exact GELU vs PyTorch."""
    batch, size, channels = CONV_SHAPES[0]
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    dy = jax.random.normal(jax.random.key(2), (batch, size, size, channels))
    w = jnp.zeros((3, 3, channels, channels))

    def shifted(x):
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return [padded[:, i:i + size, j:j + size, :] for i in range(3) for j in range(3)]

    def im2col(x):
        return jnp.concatenate(shifted(x), -1).reshape(-1, 9 * channels)

    def weight_grad_shifted(x, dy):
        rows = [s.reshape(-1, channels).T @ dy.reshape(-1, channels) for s in shifted(x)]
        return jnp.stack(rows).reshape(3, 3, channels, channels)

    print(f"\nalternatives at conv3x3 {batch}x{size}x{size}x{channels} (ms, best of {repeats})")
    for name, fn, fn_args in (("im2col patch matrix alone", im2col, (x,)),
                              ("weight gradient, nine shifted matmuls", weight_grad_shifted, (x, dy)),
                              ("weight gradient, XLA convolution",
                               lambda x, dy: bare_weight_grad(x, dy, w), (x, dy))):
        jitted = jax.jit(fn, compiler_options=compilation.compiler_options())
        ms = best_seconds(lambda: jax.block_until_ready(jitted(*fn_args)), repeats) * 1e3
        print(f"  {name:<40} {ms:8.2f}")
    time_strip_weight_grad(repeats)
    rows = np.random.default_rng(0).standard_normal((4 * 544, 1536)).astype(np.float32)
    jrows, trows = jnp.asarray(rows), torch.from_numpy(rows)
    trows_grad = trows.clone().requires_grad_(True)
    gelu = jax.jit(lambda v: jax.nn.gelu(v, approximate=False))
    gelu_grad = jax.jit(jax.grad(lambda v: jnp.sum(jax.nn.gelu(v, approximate=False))))

    def torch_both():
        trows_grad.grad = None
        torch.nn.functional.gelu(trows_grad).sum().backward()
    print(f"exact GELU on {rows.shape[0]} x {rows.shape[1]} (ms): XLA forward "
          f"{best_seconds(lambda: jax.block_until_ready(gelu(jrows)), repeats) * 1e3:.2f}, "
          f"forward + backward {best_seconds(lambda: jax.block_until_ready(gelu_grad(jrows)), repeats) * 1e3:.2f}; "
          f"PyTorch forward {best_seconds(lambda: torch.nn.functional.gelu(trows), repeats) * 1e3:.2f}, "
          f"forward + backward {best_seconds(torch_both, repeats) * 1e3:.2f}")


def time_strip_weight_grad(repeats: int) -> None:
    """ms of the weight gradient at the UNet's first level (batch 2): XLA's, YNNPACK's,
    and lensjax's on image strips (`layers.weight_grad`)."""
    from lensjax.models import layers

    batch, size, channels = CONV_SHAPES[-1]
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    dy = jax.random.normal(jax.random.key(2), (batch, size, size, channels))
    w = jnp.zeros((3, 3, channels, channels))

    strips = layers.strip_count(batch, size)
    print(f"weight gradient at conv3x3 {batch}x{size}x{size}x{channels} (ms, best of {repeats})")
    for name, fn, options in (
            ("XLA convolution", lambda x, dy: bare_weight_grad(x, dy, w),
             compilation.compiler_options()),
            ("YNNPACK convolution", lambda x, dy: bare_weight_grad(x, dy, w), {}),
            (f"XLA on {strips} strips per image (lensjax)",
             lambda x, dy: layers.weight_grad(x, dy, w, strips),
             compilation.compiler_options())):
        jitted = jax.jit(fn, compiler_options=options)
        ms = best_seconds(lambda: jax.block_until_ready(jitted(x, dy)), repeats) * 1e3
        print(f"  {name:<40} {ms:8.2f}")


if __name__ == "__main__":
    from lensjax import hugepages
    hugepages.restart_with_hugepages()
    sys.exit(main())
