"""Layers shared by lensjax's networks (ResNet, UNet, ViT).

Convolution implementation (`conv_impl`)
----------------------------------------
XLA:CPU convolutions are very uneven: some shapes are fast, others are 10-60x
slower than the same maths written as a matmul (e.g. fwd+bwd of a 3x3 conv on a
32x2x2x512 input: 800 ms as a convolution, 13 ms as a matmul). `Conv` therefore
offers four implementations of one function (same kernel (kh, kw, cin, cout),
SAME padding, same strides):

  "xla"      `lax.conv_general_dilated`, as `nnx.Conv`.
  "patches"  im2col by kh*kw explicit strided slices of the padded input,
             concatenated in (kh, kw, cin) order, then one matmul with the kernel
             reshaped to (kh*kw*cin, cout). (`lax.conv_general_dilated_patches`
             was measured too; it is itself a convolution and was 3-10x slower
             than "xla" on CPU, so it is not used.)
  "onednn"   CPU only: the forward pass and (stride 1) the input gradient in
             oneDNN, through the oneDNN runtime inside jaxlib's XLA:CPU
             (`lensjax.models.onednn`); XLA's weight gradient. Same values as
             "xla" to float32 rounding.
  "auto"     decided per layer at trace time by `choose_conv_impl`: "xla" on
             GPU/TPU; on CPU, where oneDNN convolutions are available
             (`onednn.available()`: by default where no persistent compilation
             cache is configured; LENSJAX_ONEDNN=1 / 0 forces it), "onednn" for
             float32 stride-1 convolutions with a kernel larger than 1x1 and
             more than one input channel;
             "patches" for 1x1 kernels (plain matmuls), a single input channel
             (the stem), strides > 1, cin >= 512, or output maps of at most
             4 pixels (2x2); "xla" for every other convolution.

Evidence for "onednn" (same machine, jitted fwd+bwd of one layer as lensjax
compiles it, huge pages, best of 8, ms; one-off timing): stride 1, 3x3:
8x8x8x512 38.9 patches / 41.1 xla / 35.2 onednn; 16x5x5x512 30.4 / 33.4 / 26.7;
64x2x2x128 1.72 / 10.6 / 1.76. Strided layers and single-channel stems stay on
"patches": 8x64x64 64->128 /2 30.7 / 32.3 / 35.9; 16x150x150 1->64 7x7/2
33.1 / 50.9 / 46.9; 8x64x64 1->64 3.9 / 9.9 / 10.5. Per pass
(`experiments/benchmarks/bench_kernels.py`), oneDNN's forward and input gradient
are 10-35% faster than XLA's at every 3x3 shape of the benchmarked networks, and
at or above PyTorch's. Whole train steps, same process, alternating single
steps, median of 21 (one-off): ResNet-18 64 px 1.07x, ResNet-18 150 px 1.07x,
UNet 1.02-1.06x faster than without oneDNN (the rule below). oneDNN is on by
default where no persistent compilation cache is configured (LENSJAX_ONEDNN;
`lensjax.models.onednn` says why).

Evidence for the rest of the CPU rule, without oneDNN (2-core AMD EPYC, jax 0.10.2,
compiled as lensjax compiles its networks: XLA's own convolution, not YNNPACK's, see
`lensjax.compilation`; jitted fwd+bwd of one conv at the shapes and batch sizes of
the benchmarked networks, best of 5 interleaved runs, ms; from
`python experiments/benchmarks/bench_conv.py --layers`):

  batch  input    cin->cout  k s    xla  patches     batch  input    cin->cout  k s    xla  patches
    8    64x64     1->64     3 1    4.0     1.6        16  150x150    1->64     7 2   41.2    34.7
    8    64x64    64->64     3 1   52.1    83.3        16   38x38    64->64     3 1   36.2    59.1
    8    64x64    64->128    3 2   24.2    30.1        16   38x38    64->128    3 2   16.6    16.5
    8    64x64    64->128    1 2    4.7     3.0        16   19x19   128->128    3 1   27.8    43.0
    8    32x32   128->128    3 1   40.4    60.1        16   10x10   256->256    3 1   28.0    30.9
    8    32x32   128->256    3 2   20.3    20.1        16    5x5    512->512    3 1   31.5    29.4
    8    16x16   256->256    3 1   35.9    39.9         2  152x152   32->32     3 1   35.6    58.4
    8    16x16   256->512    3 2   20.9    18.3         2  152x152   64->32     3 1   63.2    96.9
    8     8x8    512->512    3 1   39.1    37.7         2  152x152   32->32     3 2   14.5     7.9
   64    16x16    16->16     3 1    2.7     3.1         2   76x76    64->64     3 1   23.8    28.6
   64    16x16    16->32     3 2    1.4     1.0         2   38x38    64->64     3 1    6.0     4.7
   64     8x8     32->32     3 1    1.8     2.4         2   19x19   128->128    3 1    4.5     4.0
   64     4x4     64->64     3 1    1.5     1.6        32   64x64    64->64     3 1  225.5   356.5
   64     4x4     64->128    3 2    3.4     0.8        32   16x16   256->256    3 1  146.6   195.1
   64     2x2    128->128    3 1   10.0     1.6

XLA:CPU's stride-1 convolutions beat im2col for every map of 4x4 pixels and
more up to cin 256 (im2col writes kh*kw copies of the input); strided
convolutions (whose gradients are dilated convolutions), 1x1 convolutions, the
single-channel stem, the 512-channel stage and 2x2 maps are as fast or faster as
patches. "auto" picks the faster implementation or one within 20% of it in every
row except 2 x 38x38 64->64 (6.0 vs 4.7 ms). The rule was set when XLA:CPU ran
convolutions through YNNPACK (that table is in the git history) and holds for
both. Whole ResNet-18 steps with the 512-channel and strided layers on "xla"
were not faster. (An earlier rule, "patches" for every cin >= 32, lost 1.1-1.3x
on whole ResNet-18 and UNet train steps against this one; `bench_train.py` times
the networks.)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from lensjax.models import onednn

Array = jax.Array

CONV_IMPLS = ("xla", "patches", "onednn", "auto")
# CPU rule of "auto" (see the module docstring): input-channel count from which
# "patches" is used at every map size, and the output-map size (pixels per
# image) up to which it is used at every channel count.
PATCHES_MIN_CHANNELS = 512
PATCHES_MAX_OUTPUT_PIXELS = 4

he_normal = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_output_size(input_size: Sequence[int], strides: Sequence[int]) -> tuple[int, int]:
    """(Ho, Wo) of a SAME convolution of an (H, W) input: ceil(H / sh), ceil(W / sw)."""
    return tuple(-(-int(n) // int(s)) for n, s in zip(input_size, strides))


def choose_conv_impl(kernel_size: Sequence[int], in_features: int,
                     strides: Sequence[int] = (1, 1), output_size: Sequence[int] | None = None,
                     backend: str | None = None, dtype: Any = jnp.float32,
                     onednn_available: bool | None = None) -> str:
    """The implementation "auto" resolves to for one layer: "xla" off CPU; on CPU see the module docstring.

    output_size: (Ho, Wo) of the layer, when known (at trace time it is).
    onednn_available: whether oneDNN convolutions work here (default: `onednn.available()`).
    """
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu":
        return "xla"
    kh, kw = kernel_size
    strided = any(int(s) > 1 for s in strides)
    if onednn_available is None:
        onednn_available = onednn.available(backend)
    if (onednn_available and jnp.dtype(dtype) == jnp.float32 and kh * kw > 1 and in_features > 1
            and not strided):
        return "onednn"
    tiny_map = (output_size is not None
                and int(output_size[0]) * int(output_size[1]) <= PATCHES_MAX_OUTPUT_PIXELS)
    if (kh * kw == 1 or in_features == 1 or strided or tiny_map
            or in_features >= PATCHES_MIN_CHANNELS):
        return "patches"
    return "xla"


def _same_padding(size: int, kernel: int, stride: int) -> tuple[tuple[int, int], int]:
    """(low, high) padding and output size of TensorFlow/XLA "SAME" padding along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2), out


def conv_patches(x: Array, kernel: Array, strides: Sequence[int]) -> Array:
    """SAME convolution as im2col + matmul: x (B, H, W, cin), kernel (kh, kw, cin, cout) -> (B, Ho, Wo, cout).

    The matmul is `dense_dot_general`'s (oneDNN on CPU: no copy of the transposed
    patch matrix for the weight gradient)."""
    kh, kw, cin, cout = kernel.shape
    batch, height, width, channels = x.shape
    if channels != cin:
        raise ValueError(f"input has {channels} channels but the kernel expects {cin}")
    sh, sw = strides
    pad_h, out_h = _same_padding(height, kh, sh)
    pad_w, out_w = _same_padding(width, kw, sw)
    if any(pad_h + pad_w):
        x = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
    # One strided slice per kernel tap; concatenating them in (kh, kw, cin) order
    # matches kernel.reshape(kh * kw * cin, cout).
    taps = [lax.slice(x, (0, i, j, 0), (batch, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, cin),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    out = dense_dot_general(patches.reshape(-1, kh * kw * cin), kernel.reshape(kh * kw * cin, cout),
                            (((1,), (0,)), ((), ())))
    return out.reshape(batch, out_h, out_w, cout)


_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _conv_same(x: Array, kernel: Array, strides: Sequence[int] = (1, 1)) -> Array:
    return lax.conv_general_dilated(x, kernel, tuple(strides), "SAME",
                                    dimension_numbers=_DIMENSIONS)


# On CPU, the weight gradient of a stride-1 convolution of fewer images than this
# is computed on horizontal strips of the images (see `strip_count`).
STRIP_WEIGHT_GRAD_MIN_BATCH = 4


def conv_xla(x: Array, kernel: Array, strides: Sequence[int]) -> Array:
    """SAME convolution with lax.conv_general_dilated (what nnx.Conv computes).

    On CPU a stride-1 convolution takes its weight gradient from `weight_grad`
    (same values, summed in another order; on image strips for batches under
    STRIP_WEIGHT_GRAD_MIN_BATCH).
    """
    if jax.default_backend() == "cpu" and tuple(int(s) for s in strides) == (1, 1):
        return _conv_cpu(x, kernel)
    return _conv_same(x, kernel, strides)


def strip_count(batch: int, height: int) -> int:
    """Horizontal strips per image for a CPU weight gradient: enough for
    STRIP_WEIGHT_GRAD_MIN_BATCH strips in all, at most one per row.

    XLA:CPU's weight gradient contracts over the batch, and with 2 images it is slow:
    18 ms at 2 x 152 x 152 x 32 -> 32, against 7.0-7.8 ms on 2 strips per image
    (`experiments/benchmarks/bench_kernels.py --alternatives` times both).
    """
    return max(1, min(height, -(-STRIP_WEIGHT_GRAD_MIN_BATCH // batch)))


def _strip_bands(x: Array, dy: Array, kernel_hw: Sequence[int], strips: int
                 ) -> tuple[Array, Array]:
    """Image strips for a VALID weight gradient that equals the SAME convolution's.

    x (B, H, W, cin), dy (B, H, W, cout) -> bands (B * strips, rows + kh - 1,
    W + kw - 1, cin) and dy_bands (B * strips, rows, W, cout): each image cut into
    `strips` bands of `rows` output rows, each with the kh - 1 input rows around
    it (rows past H are zero padding).
    """
    kh, kw = int(kernel_hw[0]), int(kernel_hw[1])
    batch, height, width, channels = x.shape
    rows = -(-height // strips)
    extra = rows * strips - height
    (top, bottom), _ = _same_padding(height, kh, 1)
    (left, right), _ = _same_padding(width, kw, 1)
    padded = jnp.pad(x, ((0, 0), (top, bottom + extra), (left, right), (0, 0)))
    bands = jnp.stack([padded[:, i * rows:i * rows + rows + kh - 1] for i in range(strips)], axis=1)
    bands = bands.reshape(batch * strips, rows + kh - 1, width + kw - 1, channels)
    dy_bands = jnp.pad(dy, ((0, 0), (0, extra), (0, 0), (0, 0)))
    return bands, dy_bands.reshape(batch * strips, rows, width, dy.shape[-1])


def _behind_conditional(fn, a: Array, fence: Array) -> Array:
    """fn(a) computed inside a conditional whose predicate XLA cannot fold, on CPU.

    A conditional is a fusion boundary: its branch sees `a` as a parameter, so `a` is
    materialised once, and the elementwise ops that produce it (a BatchNorm, a ReLU,
    a residual sum) are neither fused into fn nor recomputed there.
    `lax.optimization_barrier` is not a boundary (XLA:CPU removes it before fusion).
    The predicate reads one element of `fence` (small and replicated: a kernel or a
    scale), so XLA cannot fold the conditional away; both branches are fn.
    Elsewhere fn(a) itself.
    """
    if jax.default_backend() != "cpu":
        return fn(a)
    first = fence.reshape(-1)[0]
    return lax.cond(first == first, fn, fn, a)


def transpose_unfused(a: Array, axes: Sequence[int], fence: Array) -> Array:
    """`jnp.transpose(a, axes)` as a copy of `a` materialised, on CPU.

    XLA:CPU fuses the elementwise ops that produce `a` (a BatchNorm, a ReLU, a
    padding) into the loop of a transpose that consumes it, and that loop reads
    each of their operands across strides: ReLU(2x + 1) of 8 x 64 x 64 x 64
    transposed to channels-first takes 6.3-8.5 ms, the transpose of the
    materialised array 1.3 ms (a blocked copy). `_behind_conditional` keeps them
    apart. Elsewhere a plain transpose.
    """
    return _behind_conditional(lambda a: jnp.transpose(a, tuple(axes)), a, fence)


def _stored_once(a: Array, fence: Array) -> Array:
    """`a` copied into its own buffer behind `_behind_conditional` on CPU, so that its
    producers run once; no gradient rule (see `materialize` for one)."""
    # Branches that return `a` itself would be folded away: each returns a copy.
    return _behind_conditional(jnp.copy, a, fence)


@jax.custom_vjp
def materialize(a: Array, fence: Array) -> Array:
    """`a`, computed once into its own buffer on CPU, for every consumer to read.

    XLA:CPU fuses a chain of elementwise ops into each of its consumers and
    recomputes it there: a ResNet block's output, relu(BatchNorm(conv) + shortcut),
    where the shortcut is the previous block's output, is rebuilt from every
    earlier convolution output back to the last materialised array, once for each
    of the nine taps of the next stage's strided convolution and again for the
    weight gradients and the backward ReLU. Behind a conditional
    (`_behind_conditional`, which costs one copy) it is computed once: ResNet-18's
    step reads and writes 10% fewer bytes (XLA's cost analysis, 2.89 -> 2.62 GB at
    64 px) and runs 1.02-1.03x faster at 64 px (at 150 px 0.996-1.004x: no change
    beyond the runs' spread). fence: a small replicated array
    (the block's last BatchNorm scale). The gradient passes through unchanged.
    Elsewhere `a` itself.
    """
    return _stored_once(a, fence)


def _materialize_fwd(a, fence):
    return materialize(a, fence), fence


def _materialize_bwd(fence, da):
    return da, jnp.zeros_like(fence)


materialize.defvjp(_materialize_fwd, _materialize_bwd)


def weight_grad(x: Array, dy: Array, kernel: Array, strips: int | None = None) -> Array:
    """Gradient of a stride-1 SAME convolution w.r.t. its kernel, as lensjax computes it on CPU.

    x (B, H, W, cin), dy (B, H, W, cout), kernel (kh, kw, cin, cout) -> (kh, kw, cin,
    cout) in dy's dtype. XLA's convolution over the batch (the channels of x as its
    batch, the images as its features), with x transposed channels-first by
    `transpose_unfused`. Batches under STRIP_WEIGHT_GRAD_MIN_BATCH are cut into
    image strips first (`strips`, default `strip_count(B, H)`; `_strip_bands`).
    The values of `jax.vjp` of the convolution, summed in another order.
    """
    kh, kw = kernel.shape[:2]
    strips = strip_count(x.shape[0], x.shape[1]) if strips is None else int(strips)
    if strips > 1:
        x, dy = _strip_bands(x, dy, (kh, kw), strips)
        padding = ((0, 0), (0, 0))
    else:
        padding = same_padding(x.shape[1:3], (kh, kw), (1, 1))
    x_t = transpose_unfused(x, (3, 1, 2, 0), kernel)                     # (cin, H, W, B)
    dy_t = jnp.transpose(dy, (1, 2, 0, 3))                               # (H, W, B, cout)
    grad = lax.conv_general_dilated(x_t, dy_t, (1, 1), padding,
                                    dimension_numbers=_DIMENSIONS)       # (cin, kh, kw, cout)
    return jnp.transpose(grad, (1, 2, 0, 3))


@jax.custom_vjp
def _conv_cpu(x: Array, kernel: Array) -> Array:
    return _conv_same(x, kernel)


def _conv_cpu_fwd(x, kernel):
    return _conv_same(x, kernel), (x, kernel)


def _conv_cpu_bwd(residuals, dy):
    x, kernel = residuals
    dx = jax.vjp(lambda x: _conv_same(x, kernel), x)[1](dy)[0]
    return dx, weight_grad(x, dy, kernel).astype(kernel.dtype)


_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


def same_padding(input_size: Sequence[int], kernel_size: Sequence[int],
                 strides: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) of a SAME convolution, as lax.conv_general_dilated pads."""
    return tuple(_same_padding(int(n), int(k), int(s))[0]
                 for n, k, s in zip(input_size, kernel_size, strides))


def conv_onednn(x: Array, kernel: Array, strides: Sequence[int]) -> Array:
    """SAME convolution by oneDNN (CPU): the values of `conv_xla`, computed faster.

    x (B, H, W, cin) float32, kernel (kh, kw, cin, cout) -> (B, Ho, Wo, cout). The
    forward pass and, for stride 1, the input gradient run in oneDNN
    (`lensjax.models.onednn`); the weight gradient is XLA's (on image strips for
    batches under STRIP_WEIGHT_GRAD_MIN_BATCH), as is the input gradient of strided
    convolutions. Raises RuntimeError where oneDNN convolutions are unavailable.
    """
    if not onednn.available():
        raise RuntimeError(
            "conv_impl='onednn' needs XLA:CPU's oneDNN convolutions, which are off here: set "
            f"{onednn.ENV_SWITCH}=1 to switch them on (now {onednn.describe_setting()}, backend "
            f"{jax.default_backend()!r}; they run on CPU with a jaxlib that passes lensjax's "
            "oneDNN probe), or use conv_impl='auto' or 'xla'")
    strides = tuple(int(s) for s in strides)
    padding = same_padding(x.shape[1:3], kernel.shape[:2], strides)
    return _conv_onednn(x, kernel, strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_onednn(x, kernel, strides, padding):
    return onednn.conv(x, kernel, strides, padding)


def _conv_onednn_fwd(x, kernel, strides, padding):
    return onednn.conv(x, kernel, strides, padding), (x, kernel)


def _conv_onednn_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    if strides != (1, 1):
        return jax.vjp(lambda x, k: _conv_same(x, k, strides), x, kernel)[1](dy)
    dkernel = weight_grad(x, dy, kernel)
    if strip_count(x.shape[0], x.shape[1]) > 1:
        # The strips' pad and stack copies run on one thread each; overlapping them
        # with oneDNN's two-thread input gradient stalls it, so the input gradient
        # waits for the weight gradient (UNet step 1.02-1.04x faster in two A/Bs).
        dy, dkernel = lax.optimization_barrier((dy, dkernel))
    return onednn.input_grad(dy, kernel, padding), dkernel.astype(kernel.dtype)


_conv_onednn.defvjp(_conv_onednn_fwd, _conv_onednn_bwd)


# ----------------------------------------------------------------------------
# Dense layers
# ----------------------------------------------------------------------------

def dense_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                      preferred_element_type=None, **kwargs) -> Array:
    """`lax.dot_general` for `nnx.Linear(dot_general=...)`: lhs (..., K) @ rhs (K, N).

    On CPU, for float32 operands where oneDNN is available, the product and its
    gradients are oneDNN matmuls (`onednn.matmul`; the weight gradient x^T dy reads x
    transposed in place, where XLA:CPU copies it); elsewhere, and for any other
    contraction, dtype or option, it is lax.dot_general itself.
    """
    (contract, batch) = dimension_numbers
    standard = (tuple(contract[0]) == (lhs.ndim - 1,) and tuple(contract[1]) == (0,)
                and not batch[0] and not batch[1] and rhs.ndim == 2)
    if (not standard or precision is not None or preferred_element_type is not None
            or kwargs.get("out_sharding") is not None
            or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32 or not onednn.available()):
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
    out = _dense(lhs.reshape(-1, lhs.shape[-1]), rhs)
    return out.reshape(*lhs.shape[:-1], rhs.shape[1])


@jax.custom_vjp
def _dense(x: Array, kernel: Array) -> Array:
    return onednn.matmul(x, kernel)


def _dense_fwd(x, kernel):
    return onednn.matmul(x, kernel), (x, kernel)


def _dense_bwd(residuals, dy):
    x, kernel = residuals
    return (onednn.matmul(dy, kernel, transpose_b=True), onednn.matmul(x, dy, transpose_a=True))


_dense.defvjp(_dense_fwd, _dense_bwd)


# ----------------------------------------------------------------------------
# Batch normalisation
# ----------------------------------------------------------------------------

def _norm_dtype(dtype: Any, *arrays: Array):
    """The dtype Flax's normalisation layers compute in: `dtype`, else the common
    dtype of the input, parameters and statistics."""
    return jnp.dtype(dtype) if dtype is not None else jnp.result_type(*arrays)


def _last_axis_only(axes: int | Sequence[int], ndim: int) -> bool:
    """Whether `axes` names only the last of `ndim` axes."""
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return len(axes) == 1 and axes[0] % ndim == ndim - 1


def _channel_stats(x: Array) -> tuple[Array, Array]:
    """Mean and variance (C,) of x (..., C) over every axis but the last, as
    nnx.BatchNorm computes them: E[x^2] - E[x]^2, clipped at 0."""
    flat = x.reshape(-1, x.shape[-1])
    count = flat.shape[0]
    mean = jnp.sum(flat, axis=0) / count
    mean_sq = jnp.sum(flat * flat, axis=0) / count
    return mean, jnp.maximum(mean_sq - mean * mean, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float
                     ) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm of float32 x (..., C) with scale, bias (C,).

    Returns (y like x, batch mean (C,), batch variance (C,)): nnx.BatchNorm's values
    with its batch statistics, and a written-out gradient (two reductions per
    channel and one elementwise pass), which also carries gradients that reach the
    returned mean and variance. Forward + backward 1.4-2.1x faster than
    differentiating nnx.BatchNorm on CPU at ResNet-18's shapes (8 x 64 x 64 x 64:
    1.78 vs 3.77 ms; one-off timing).
    """
    return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
    mean, var = _channel_stats(x)
    inv_std = lax.rsqrt(var + epsilon)
    gain = inv_std * scale                                   # y = x * gain + shift
    y = x * gain + (bias - mean * gain)
    return (y, mean, var), (x, mean, inv_std, scale)


def _batch_norm_bwd(epsilon, residuals, cotangents):
    """With x_hat = (x - mean) inv_std, g = dy scale and n values per channel:
    dx = inv_std (g - mean(g) - x_hat mean(g x_hat)) + dmean / n + 2 dvar (x - mean) / n;
    dscale = sum(dy x_hat), dbias = sum(dy)."""
    dy, dmean, dvar = cotangents
    x, mean, inv_std, scale = residuals
    flat_dy = dy.reshape(-1, dy.shape[-1])
    count = flat_dy.shape[0]
    sum_dy = jnp.sum(flat_dy, axis=0)
    sum_dy_xhat = (jnp.sum(flat_dy * x.reshape(flat_dy.shape), axis=0) - mean * sum_dy) * inv_std
    mean_g_xhat = sum_dy_xhat * scale / count
    # dx = dy * a - x * b + c, one elementwise pass.
    a = inv_std * scale
    b = inv_std * inv_std * mean_g_xhat - 2.0 * dvar / count
    c = (inv_std * inv_std * mean_g_xhat * mean - inv_std * sum_dy * scale / count
         + dmean / count - 2.0 * dvar * mean / count)
    return dy * a - x * b + c, sum_dy_xhat, sum_dy


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` (same parameters, statistics, running averages and modes)
    whose training-mode pass over float32 maps is `batch_norm_train`, with its
    written-out gradient (ResNet-18 train steps 1.03-1.04x faster on CPU, one-off
    A/B). Other cases (running averages, masks, `axis_name`, other dtypes or
    axes) are nnx.BatchNorm's own."""

    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None) -> Array:
        """x (..., C) -> (..., C)."""
        running = self.use_running_average if use_running_average is None else use_running_average
        if (running or mask is not None or self.axis_name is not None
                or self.scale is None or self.bias is None or not _last_axis_only(self.axis, x.ndim)
                or _norm_dtype(self.dtype, x, self.scale[...], self.bias[...], self.mean[...],
                               self.var[...]) != jnp.float32):
            return super().__call__(x, use_running_average, mask=mask)
        y, mean, var = batch_norm_train(x.astype(jnp.float32), self.scale[...], self.bias[...],
                                        float(self.epsilon))
        momentum = self.momentum
        self.mean[...] = lax.stop_gradient(momentum * self.mean[...] + (1 - momentum) * mean)
        self.var[...] = lax.stop_gradient(momentum * self.var[...] + (1 - momentum) * var)
        return y


# ----------------------------------------------------------------------------
# Layer normalisation
# ----------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, bias: Array, epsilon: float) -> Array:
    """LayerNorm of float32 x (..., D) over its last axis, with scale, bias (D,).

    nnx.LayerNorm's values (variance E[x^2] - E[x]^2, clipped at 0) with a
    written-out gradient: two row reductions and one elementwise pass for x, and a
    column sum each for scale and bias. The ViT-S MAE train step is 1.02-1.03x
    faster on CPU than when differentiating nnx.LayerNorm (two one-off A/Bs: 446 ->
    434 and 434 -> 426 ms).
    """
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    mean_sq = jnp.mean(x * x, axis=-1, keepdims=True)
    inv_std = lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + epsilon)
    x_hat = (x - mean) * inv_std
    return x_hat * scale + bias, (x_hat, inv_std, scale)


def _layer_norm_bwd(epsilon, residuals, dy):
    """With g = dy scale: dx = inv_std (g - mean(g) - x_hat mean(g x_hat)) per row;
    dscale = sum(dy x_hat), dbias = sum(dy) over rows."""
    x_hat, inv_std, scale = residuals
    g = dy * scale
    dx = inv_std * (g - jnp.mean(g, axis=-1, keepdims=True)
                    - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True))
    rows_dy, rows_x_hat = dy.reshape(-1, dy.shape[-1]), x_hat.reshape(-1, dy.shape[-1])
    return dx, jnp.sum(rows_dy * rows_x_hat, axis=0), jnp.sum(rows_dy, axis=0)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.LayerNorm):
    """`nnx.LayerNorm` (same parameters, options and values) whose pass over float32
    features on the last axis is `layer_norm`, with its written-out gradient.
    Other cases (masks, `axis_name`, other axes or dtypes, no scale or bias) are
    nnx.LayerNorm's own."""

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """x (..., D) -> (..., D)."""
        if (mask is not None or self.axis_name is not None or self.scale is None
                or self.bias is None or not _last_axis_only(self.reduction_axes, x.ndim)
                or not _last_axis_only(self.feature_axes, x.ndim)
                or _norm_dtype(self.dtype, x, self.scale[...], self.bias[...]) != jnp.float32):
            return super().__call__(x, mask=mask)
        return layer_norm(x.astype(jnp.float32), self.scale[...], self.bias[...],
                          float(self.epsilon))


# ----------------------------------------------------------------------------
# Group normalisation
# ----------------------------------------------------------------------------

def _group_stats(x: Array, groups: int) -> tuple[Array, Array]:
    """Mean and variance (B, G) of NHWC x over (H, W, channels of the group), float32.

    Sums per (image, channel) come first, with channels contiguous, then the group
    sums of those; variance as E[x^2] - E[x]^2, as nnx.GroupNorm computes it.
    """
    batch, height, width, channels = x.shape
    flat = x.astype(jnp.float32).reshape(batch, height * width, channels)
    count = height * width * (channels // groups)
    mean = _group_sums(jnp.sum(flat, axis=1), groups) / count
    mean_sq = _group_sums(jnp.sum(flat * flat, axis=1), groups) / count
    return mean, jnp.maximum(mean_sq - mean * mean, 0.0)


def _group_sums(per_channel: Array, groups: int) -> Array:
    """(B, C) per-channel values -> (B, G) sums over each group's channels."""
    return per_channel.reshape(per_channel.shape[0], groups, -1).sum(-1)


def _expand_groups(values: Array, channels: int) -> Array:
    """(B, G) group values -> (B, C), each channel its group's value.

    On CPU, with several channels per group, as a product with the (G, C) group
    membership matrix: XLA:CPU fuses a repeat into every element of the (B, H, W, C)
    pass that broadcasts its result, with a division by the group size in each index
    that keeps that pass from vectorising (GroupNorm + SiLU forward, 2 x 152 x 152 x
    96 in 32 groups, one core: 11.7 ms, against 2.5 ms for the same affine map and
    SiLU on stored coefficients); a dot is computed on its own. Exact: each output
    is one value times 1 plus zeros.
    """
    batch, groups = values.shape
    size = channels // groups
    if size == 1:
        return values
    if jax.default_backend() != "cpu":
        return jnp.repeat(values, size, axis=1)
    membership = (jnp.arange(channels) // size == jnp.arange(groups)[:, None]).astype(values.dtype)
    return jnp.dot(values, membership, precision=lax.Precision.HIGHEST)


def _per_channel(values: Array, channels: int) -> Array:
    """(B, G) group values -> (B, 1, 1, C), each channel its group's value."""
    return _expand_groups(values, channels).reshape(values.shape[0], 1, 1, channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: Array, scale: Array, bias: Array, groups: int, epsilon: float) -> Array:
    """GroupNorm of NHWC x (B, H, W, C) with per-channel scale, bias (C,) float32.

    Statistics in float32; the result has x's dtype. Same values as nnx.GroupNorm;
    the gradient is written out (two reductions per (image, channel) and one
    elementwise pass), 1.2-4x faster forward + backward than differentiating
    nnx.GroupNorm on CPU at the UNet's shapes, e.g. 2 x 76 x 76 x 64 in 32 groups:
    0.58 vs 2.35 ms (PyTorch 0.34 ms; one-off timing).
    """
    return _group_norm_fwd(x, scale, bias, groups, epsilon)[0]


def _group_moments(x: Array, groups: int, epsilon: float) -> tuple[Array, Array]:
    """Group mean and 1 / sqrt(variance + epsilon), (B, G) each, of NHWC x."""
    mean, var = _group_stats(x, groups)
    return mean, lax.rsqrt(var + epsilon)


def _group_norm_affine(mean, inv_std, scale, bias):
    """Per-(image, channel) gain and shift (B, 1, 1, C) of GroupNorm(x) = x gain + shift,
    from the group statistics (B, G) and the parameters (C,)."""
    channels = scale.shape[-1]
    gain = _per_channel(inv_std, channels) * scale
    return gain, bias - _per_channel(mean, channels) * gain


def _group_norm_fwd(x, scale, bias, groups, epsilon):
    mean, inv_std = _group_moments(x, groups, epsilon)
    gain, shift = _group_norm_affine(mean, inv_std, scale, bias)
    return (x * gain + shift).astype(x.dtype), (x, mean, inv_std, scale)


def _group_norm_grads(dz, x, mean, inv_std, scale, groups, modulation=None):
    """Gradients through z = GroupNorm(x) * modulation (per image and channel) for the
    cotangent dz (B, H, W, C), given the forward pass's group mean and inv_std (B, G).

    With x_hat = (x - mean) inv_std, dy = dz modulation and g = dy scale, per group:
    dx = inv_std (g - mean(g) - x_hat mean(g x_hat)); dscale = sum(dy x_hat), dbias =
    sum(dy). Two reductions per (image, channel) and one elementwise pass. Returns
    (dx float32 like x, dscale (C,), dbias (C,), sum(dz) (B, C), sum(dz x_hat) (B, C)).
    """
    batch, height, width, channels = x.shape
    size = channels // groups
    dz32, x32 = dz.astype(jnp.float32), x.astype(jnp.float32)
    flat = (batch, height * width, channels)
    sum_dz = jnp.sum(dz32.reshape(flat), axis=1)                            # (B, C)
    sum_dz_x = jnp.sum((dz32 * x32).reshape(flat), axis=1)
    mean_c, inv_c = (_expand_groups(v, channels) for v in (mean, inv_std))
    sum_dz_xhat = (sum_dz_x - mean_c * sum_dz) * inv_c                      # (B, C)
    if modulation is None:
        sum_dy, sum_dy_xhat, gain = sum_dz, sum_dz_xhat, scale
    else:
        sum_dy, sum_dy_xhat = sum_dz * modulation, sum_dz_xhat * modulation
        gain = scale * modulation[:, None, None, :]
    count = height * width * size
    mean_g = _group_sums(sum_dy * scale, groups) / count
    mean_g_xhat = _group_sums(sum_dy_xhat * scale, groups) / count
    # The expanded statistics above serve the elementwise pass too: (B, C) -> (B, 1, 1, C).
    inv, mu = (v.reshape(batch, 1, 1, channels) for v in (inv_c, mean_c))
    m_g, m_gx = (_per_channel(v, channels) for v in (mean_g, mean_g_xhat))
    # dx = dz * (inv gain) + x * (-inv^2 m_gx) + (inv^2 m_gx mu - inv m_g), one pass.
    dx = dz32 * (inv * gain) - x32 * (inv * inv * m_gx) + (inv * inv * m_gx * mu - inv * m_g)
    return dx, jnp.sum(sum_dy_xhat, 0), jnp.sum(sum_dy, 0), sum_dz, sum_dz_xhat


def _group_norm_bwd(groups, epsilon, residuals, dy):
    x, mean, inv_std, scale = residuals
    dx, dscale, dbias = _group_norm_grads(dy, x, mean, inv_std, scale, groups)[:3]
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def group_norm_silu(x: Array, scale: Array, bias: Array, film_scale: Array, film_shift: Array,
                    groups: int, epsilon: float) -> Array:
    """SiLU(GroupNorm(x) * (1 + film_scale) + film_shift) of NHWC x (B, H, W, C).

    scale, bias (C,) are the GroupNorm's parameters; film_scale, film_shift (B, C)
    float32 modulate each image's channels (a diffusion UNet's time embedding; zeros
    for none). The value of `jax.nn.silu` applied to that composition, computed in
    float32 and returned in x's dtype. The gradient is written out: the forward pass
    stores no activation besides x (SiLU's sigmoid is recomputed), and the gradients
    of film_scale and film_shift come from the two per-(image, channel) reductions
    that the GroupNorm's gradient needs anyway.
    """
    return _group_norm_silu_fwd(x, scale, bias, film_scale, film_shift, groups, epsilon)[0]


def _modulated_affine(mean, inv_std, scale, bias, film_scale, film_shift):
    """Per-(image, channel) gain and offset (B, 1, 1, C) of z = x gain + offset =
    GroupNorm(x) (1 + film_scale) + film_shift, from the group statistics (B, G)."""
    gain, shift = _group_norm_affine(mean, inv_std, scale, bias)
    modulation = (1.0 + film_scale)[:, None, None, :]
    return gain * modulation, shift * modulation + film_shift[:, None, None, :]


def _group_norm_silu_fwd(x, scale, bias, film_scale, film_shift, groups, epsilon):
    mean, inv_std = _group_moments(x, groups, epsilon)
    gain, offset = _modulated_affine(mean, inv_std, scale, bias, film_scale, film_shift)
    z = x.astype(jnp.float32) * gain + offset
    return (z * jax.nn.sigmoid(z)).astype(x.dtype), (x, mean, inv_std, scale, bias, film_scale,
                                                      film_shift)


def _group_norm_silu_bwd(groups, epsilon, residuals, d_out):
    """With z = y (1 + s) + t, y = x_hat scale + bias and dz = d_out SiLU'(z), per image
    and channel: dt = sum(dz), ds = sum(dz y) = scale sum(dz x_hat) + bias sum(dz);
    the GroupNorm's own gradient is `_group_norm_grads` with modulation 1 + s. z and
    its sigmoid are recomputed from x and the stored statistics."""
    x, mean, inv_std, scale, bias, film_scale, film_shift = residuals
    gain, offset = _modulated_affine(mean, inv_std, scale, bias, film_scale, film_shift)
    z = x.astype(jnp.float32) * gain + offset
    sig = jax.nn.sigmoid(z)
    dz = d_out.astype(jnp.float32) * sig * (1.0 + z * (1.0 - sig))
    dx, dscale, dbias, sum_dz, sum_dz_xhat = _group_norm_grads(dz, x, mean, inv_std, scale, groups,
                                                               1.0 + film_scale)
    d_film_scale = sum_dz_xhat * scale + sum_dz * bias
    return (dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype),
            d_film_scale.astype(film_scale.dtype), sum_dz.astype(film_shift.dtype))


group_norm_silu.defvjp(_group_norm_silu_fwd, _group_norm_silu_bwd)


class GroupNorm(nnx.Module):
    """GroupNorm over NHWC maps: the parameters (`scale`, `bias`), values and dtype
    rules of `nnx.GroupNorm`, with `group_norm`'s written-out gradient."""

    def __init__(self, num_features: int, *, num_groups: int, epsilon: float = 1e-5,
                 dtype: Any = None, param_dtype: Any = jnp.float32, rngs: nnx.Rngs | None = None):
        if num_groups < 1 or num_features % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_features={num_features}")
        self.num_groups, self.epsilon, self.dtype = num_groups, epsilon, dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

    def __call__(self, x: Array) -> Array:
        """x (B, H, W, C) -> (B, H, W, C) in `dtype` (default: x's and the parameters' common dtype)."""
        scale, bias = self.scale[...], self.bias[...]
        out_dtype = _norm_dtype(self.dtype, x, scale, bias)
        return group_norm(x.astype(out_dtype), scale.astype(jnp.float32), bias.astype(jnp.float32),
                          self.num_groups, float(self.epsilon))

    def silu(self, x: Array, film_scale: Array | None = None, film_shift: Array | None = None
             ) -> Array:
        """SiLU(self(x) * (1 + film_scale) + film_shift) by `group_norm_silu`: x (B, H, W, C),
        film_scale and film_shift (B, C) or None (no modulation) -> (B, H, W, C)."""
        scale, bias = self.scale[...], self.bias[...]
        out_dtype = _norm_dtype(self.dtype, x, scale, bias)
        zeros = jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32)
        film_scale = zeros if film_scale is None else film_scale.astype(jnp.float32)
        film_shift = zeros if film_shift is None else film_shift.astype(jnp.float32)
        return group_norm_silu(x.astype(out_dtype), scale.astype(jnp.float32),
                               bias.astype(jnp.float32), film_scale, film_shift,
                               self.num_groups, float(self.epsilon))


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------

def dot_product_attention(query: Array, key: Array, value: Array) -> Array:
    """Softmax attention without mask: (B, T, heads, head_dim) each -> (B, T, heads, head_dim).

    Logits and softmax are computed in float32 whatever the input dtype, and the
    weights are cast back to it for the product with `value`, as
    `jax.nn.dot_product_attention` does; that function is used off CPU (where it
    may pick a fused cuDNN kernel). On XLA:CPU the plain einsum / exp / sum below
    is 1.1-2.2x faster forward + backward than it (UNet 2 x 361 tokens x 4 heads:
    4.7 vs 10.4 ms; ViT-S MAE 32 x 17 x 6: 1.5 vs 1.9 ms; one-off timing). In
    whole train steps the difference is within this machine's noise (MAE 1.005x;
    UNet 0.96x and 1.04x in two in-process A/Bs).
    """
    if jax.default_backend() != "cpu":
        return jax.nn.dot_product_attention(query, key, value)
    scale = 1.0 / float(query.shape[-1]) ** 0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                        preferred_element_type=jnp.float32) * scale
    logits = logits - lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)


# ----------------------------------------------------------------------------
# Max pooling
# ----------------------------------------------------------------------------

def max_pool(x: Array, window: Sequence[int], strides: Sequence[int],
             padding: Sequence[tuple[int, int]], fence: Array | None = None) -> Array:
    """Max pooling of NHWC maps, as `nnx.max_pool` (padding counts as -inf).

    x (B, H, W, C) -> (B, Ho, Wo, C); window, strides: (kh, kw), (sh, sw); padding:
    ((top, bottom), (left, right)). On CPU the gradient is `_max_pool_strided`'s:
    XLA:CPU's gradient of a reduce_window max (select-and-scatter) takes 58 ms
    forward + backward for the ResNet-18 stem's 3x3 / 2 pool of 16 x 75 x 75 x 64,
    this one 8 ms and PyTorch's 26 ms (`experiments/benchmarks/bench_kernels.py`).
    Same values; a tie goes to the first maximum of the window in row-major
    order, as in XLA and PyTorch.

    fence: optional small replicated array (a parameter, e.g. the preceding
    BatchNorm's scale). Given, the gradient's window-argmax map and incoming
    gradient are materialised once (`_stored_once`) instead of being
    recomputed by XLA:CPU for each of the kh * kw placements of every input pixel:
    inside the ResNet-18 step at 150 px that gradient took 11.3 ms.
    """
    window, strides = tuple(int(k) for k in window), tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if jax.default_backend() == "cpu":
        return _max_pool_strided(x, fence, window, strides, padding)
    return max_pool_xla(x, window, strides, padding)


def max_pool_xla(x: Array, window: Sequence[int], strides: Sequence[int],
                 padding: Sequence[tuple[int, int]]) -> Array:
    """`max_pool` as one lax.reduce_window (XLA's gradient: select-and-scatter)."""
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                             ((0, 0), *padding, (0, 0)))


def _pool_taps(x_padded: Array, window, strides, out_hw):
    """The window's kh * kw strided views of the padded input, each (B, Ho, Wo, C), row-major."""
    (sh, sw), (ho, wo) = strides, out_hw
    batch, _, _, channels = x_padded.shape
    return [lax.slice(x_padded, (0, i, j, 0), (batch, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1,
                                               channels), (1, sh, sw, 1))
            for i in range(window[0]) for j in range(window[1])]


def _pool_forward(x, window, strides, padding):
    x_padded = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    out_hw = tuple((x_padded.shape[1 + a] - window[a]) // strides[a] + 1 for a in range(2))
    taps = _pool_taps(x_padded, window, strides, out_hw)
    y = taps[0]
    for tap in taps[1:]:
        y = jnp.maximum(y, tap)
    return y, taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _max_pool_strided(x: Array, fence: Array | None, window, strides, padding) -> Array:
    return _pool_forward(x, window, strides, padding)[0]


def _max_pool_strided_fwd(x, fence, window, strides, padding):
    y, taps = _pool_forward(x, window, strides, padding)
    # Which tap holds the window's (first) maximum: one small int array for the backward pass.
    first = jnp.full(y.shape, len(taps), jnp.int32)
    for k in reversed(range(len(taps))):
        first = jnp.where(taps[k] == y, k, first)
    if fence is not None:
        first = _stored_once(first, fence)
    return y, (first, x.shape, fence)


def _max_pool_strided_bwd(window, strides, padding, residuals, dy):
    """dx: each output's gradient goes to its window's first maximum. Tap k's share is
    placed on the input grid by an interior-padded lax.pad; the kh * kw placements
    sum in one elementwise fusion (no scatter)."""
    first, x_shape, fence = residuals
    if fence is not None:
        dy = _stored_once(dy, fence)
    (top, bottom), (left, right) = padding
    padded_hw = (x_shape[1] + top + bottom, x_shape[2] + left + right)
    out_hw = dy.shape[1:3]
    zero = jnp.zeros((), dy.dtype)
    dx_padded = None
    for k in range(window[0] * window[1]):
        offsets = divmod(k, window[1])
        placement = [(0, 0, 0)]
        for a in range(2):
            placement.append((offsets[a], padded_hw[a] - offsets[a] - (out_hw[a] - 1) * strides[a] - 1,
                              strides[a] - 1))
        placed = lax.pad(jnp.where(first == k, dy, zero), zero, (*placement, (0, 0, 0)))
        dx_padded = placed if dx_padded is None else dx_padded + placed
    dx = dx_padded[:, top:top + x_shape[1], left:left + x_shape[2], :]
    return dx, None if fence is None else jnp.zeros_like(fence)


_max_pool_strided.defvjp(_max_pool_strided_fwd, _max_pool_strided_bwd)


class Conv(nnx.Module):
    """2-D SAME convolution, NHWC, with a selectable implementation (see module docstring).

    Parameters match `nnx.Conv`: `kernel` (kh, kw, cin, cout) and optional `bias` (cout,).
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] = 1, *, use_bias: bool = False,
                 conv_impl: str = "auto", dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, kernel_init: Any = he_normal,
                 rngs: nnx.Rngs):
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        self.kernel_size = ((kernel_size, kernel_size) if isinstance(kernel_size, int)
                            else tuple(kernel_size))
        self.strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
        self.in_features = in_features
        self.out_features = out_features
        self.conv_impl = conv_impl
        self.dtype = dtype
        shape = (*self.kernel_size, in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def resolved_impl(self, input_size: Sequence[int] | None = None,
                      kernel_size: Sequence[int] | None = None) -> str:
        """"xla", "patches" or "onednn": what this layer runs on the current default backend
        for an input of spatial size `input_size` (H, W) (None: decide without the map size),
        with its kernel or one of `kernel_size` (see `convolve`)."""
        if self.conv_impl == "auto":
            output_size = None if input_size is None else conv_output_size(input_size, self.strides)
            kernel_size = self.kernel_size if kernel_size is None else tuple(kernel_size)
            return choose_conv_impl(kernel_size, self.in_features, self.strides, output_size,
                                    dtype=self.dtype)
        return self.conv_impl

    def __call__(self, x: Array) -> Array:
        """x (B, H, W, in_features) -> (B, ceil(H/sh), ceil(W/sw), out_features) in `dtype`."""
        y = self.convolve(x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def convolve(self, x: Array, kernel: Array) -> Array:
        """SAME convolution of x (B, H, W, in_features) with `kernel` (kh, kw, in_features,
        n) by this layer's strides, dtype and implementation rule; no bias. For layers
        that compute with a kernel derived from their own (`unet.upsample_conv`)."""
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        impl = self.resolved_impl(x.shape[1:3], kernel.shape[:2])
        if impl == "patches":
            return conv_patches(x, kernel, self.strides)
        if impl == "onednn":
            return conv_onednn(x, kernel, self.strides)
        return conv_xla(x, kernel, self.strides)


def set_conv_impl(model: nnx.Module, conv_impl: str) -> nnx.Module:
    """Switch every `Conv` inside `model` to `conv_impl` in place (parameters unchanged); returns model."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Conv):
            module.conv_impl = conv_impl
    return model
