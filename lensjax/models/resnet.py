"""ResNet-18/34/50 in Flax NNX for single-channel lensing images.

    model = get_model("resnet18", num_classes=3, rngs=nnx.Rngs(0), width=16, image_size=150)
    logits = model(images)            # images (B, H, W, in_channels) -> logits (B, num_classes)
    model.eval()                      # BatchNorm uses running statistics; model.train() undoes it

Blocks follow He et al. (2016): BasicBlock (two 3x3) for 18/34, Bottleneck
(1x1, 3x3, 1x1, expansion 4, stride on the 3x3) for 50; projection shortcuts
(1x1 conv + BatchNorm) wherever the shape changes; global average pool and a
Dense head. Stems: "imagenet" (7x7 stride 2 + 3x3 max pool stride 2, for 150 px
DeepLense images) or "small" (3x3 stride 1, no pool, for 64 px and below);
"auto" picks imagenet when `image_size >= 128`. Computation runs in `dtype`
(float32 or bfloat16); parameters and the returned logits stay float32.

Convolution implementation (`conv_impl`)
----------------------------------------
XLA:CPU convolutions are very uneven: some shapes are fast, others are 10-60x
slower than the same maths written as a matmul (e.g. fwd+bwd of a 3x3 conv on a
32x2x2x512 input: 800 ms as a convolution, 13 ms as a matmul). `Conv` therefore
offers three implementations of one function (same kernel (kh, kw, cin, cout),
SAME padding, same strides):

  "xla"      `lax.conv_general_dilated`, as `nnx.Conv`.
  "patches"  im2col by kh*kw explicit strided slices of the padded input,
             concatenated in (kh, kw, cin) order, then one matmul with the kernel
             reshaped to (kh*kw*cin, cout). (`lax.conv_general_dilated_patches`
             was measured too; it is itself a convolution and was 3-10x slower
             than "xla" on CPU, so it is not used.)
  "auto"     decided per layer at trace time by `choose_conv_impl`: "xla" on
             GPU/TPU; on CPU "patches" unless the kernel is spatial (kh*kw > 1)
             and 1 < cin < 32, where "xla" is used.

Evidence for the CPU rule (2-core CPU, jax 0.10.2, batch 32, jitted fwd+bwd of
one conv, ms; "patches" = slices + matmul):

  3x3 stride 1      input      xla  patches     1x1 / stem          xla  patches
  64x64   cin=8                 13      43      1x1  64x64 16->64   176     27
  32x32   cin=16                 8      20      1x1  64x64 64->16   118     24
  75x75   cin=16                49     119      1x1 s2 32x32 64->128 16      5
  64x64   cin=24               122     152      3x3 64x64 1->64     128     17
  64x64   cin=32               233     200      7x7 s2 150x150 1->64 265    88
  16x16   cin=32                 9       6
  64x64   cin=64              1321     486
  38x38   cin=64               796     189
  16x16   cin=256              299     255
  2x2     cin=512              800      13

So the deciding quantity on this CPU is the input channel count, not the
spatial size: narrow spatial convolutions (cin 2..31) are the only ones where
XLA's convolution wins; 1x1 convs (pure matmuls), the single-channel stem and
everything with cin >= 32 are faster as patches. Whole-network timings
(experiments/benchmarks/bench_conv.py, ResNet-18 train step fwd+bwd, batch 32):
see the table in that script's docstring; "auto" is the fastest or within noise
of the fastest in every case measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from lensjax.models import register

Array = jax.Array

CONV_IMPLS = ("xla", "patches", "auto")
STEMS = ("auto", "small", "imagenet")
# Smallest input-channel count at which im2col + matmul beats XLA:CPU for a
# spatial (kh*kw > 1) kernel; see the module docstring.
PATCHES_MIN_CHANNELS = 32
# stem="auto" uses the ImageNet stem from this image size up.
IMAGENET_STEM_MIN_SIZE = 128

_he_normal = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def choose_conv_impl(kernel_size: Sequence[int], in_features: int,
                     backend: str | None = None) -> str:
    """The implementation "auto" resolves to: "xla" off CPU; on CPU see the module docstring."""
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu":
        return "xla"
    kh, kw = kernel_size
    if kh * kw == 1 or in_features == 1 or in_features >= PATCHES_MIN_CHANNELS:
        return "patches"
    return "xla"


def _same_padding(size: int, kernel: int, stride: int) -> tuple[tuple[int, int], int]:
    """(low, high) padding and output size of TensorFlow/XLA "SAME" padding along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2), out


def conv_patches(x: Array, kernel: Array, strides: Sequence[int]) -> Array:
    """SAME convolution as im2col + matmul: x (B, H, W, cin), kernel (kh, kw, cin, cout) -> (B, Ho, Wo, cout)."""
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
    out = patches.reshape(-1, kh * kw * cin) @ kernel.reshape(kh * kw * cin, cout)
    return out.reshape(batch, out_h, out_w, cout)


def conv_xla(x: Array, kernel: Array, strides: Sequence[int]) -> Array:
    """SAME convolution with lax.conv_general_dilated (what nnx.Conv computes)."""
    return lax.conv_general_dilated(x, kernel, tuple(strides), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv(nnx.Module):
    """2-D SAME convolution, NHWC, with a selectable implementation (see module docstring).

    Parameters match `nnx.Conv`: `kernel` (kh, kw, cin, cout) and optional `bias` (cout,).
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] = 1, *, use_bias: bool = False,
                 conv_impl: str = "auto", dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, kernel_init: Any = _he_normal,
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

    def resolved_impl(self) -> str:
        """"xla" or "patches": what this layer runs on the current default backend."""
        if self.conv_impl == "auto":
            return choose_conv_impl(self.kernel_size, self.in_features)
        return self.conv_impl

    def __call__(self, x: Array) -> Array:
        """x (B, H, W, in_features) -> (B, ceil(H/sh), ceil(W/sw), out_features) in `dtype`."""
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        if self.resolved_impl() == "patches":
            y = conv_patches(x, kernel, self.strides)
        else:
            y = conv_xla(x, kernel, self.strides)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def set_conv_impl(model: nnx.Module, conv_impl: str) -> nnx.Module:
    """Switch every `Conv` inside `model` to `conv_impl` in place (parameters unchanged); returns model."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    for _, module in model.iter_modules():
        if isinstance(module, Conv):
            module.conv_impl = conv_impl
    return model


def _batch_norm(features: int, *, dtype: Any, zero_scale: bool = False,
                rngs: nnx.Rngs) -> nnx.BatchNorm:
    # momentum 0.9 (PyTorch's 0.1): running statistics settle within the few
    # hundred steps of short lensing runs; Flax's 0.99 default lags far behind.
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=dtype,
                         scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
                         rngs=rngs)


class BasicBlock(nnx.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_features: int, features: int, strides: int, *, dtype: Any,
                 conv_impl: str, zero_init_residual: bool, rngs: nnx.Rngs):
        conv = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
        self.conv1 = Conv(in_features, features, 3, strides, **conv)
        self.bn1 = _batch_norm(features, dtype=dtype, rngs=rngs)
        self.conv2 = Conv(features, features, 3, 1, **conv)
        self.bn2 = _batch_norm(features, dtype=dtype, zero_scale=zero_init_residual, rngs=rngs)
        if strides != 1 or in_features != features:
            self.shortcut_conv = Conv(in_features, features, 1, strides, **conv)
            self.shortcut_bn = _batch_norm(features, dtype=dtype, rngs=rngs)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    def __call__(self, x: Array) -> Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.shortcut_conv is not None:
            x = self.shortcut_bn(self.shortcut_conv(x))
        return nnx.relu(x + y)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand x4, residual (ResNet-50, "v1.5")."""

    expansion = 4

    def __init__(self, in_features: int, features: int, strides: int, *, dtype: Any,
                 conv_impl: str, zero_init_residual: bool, rngs: nnx.Rngs):
        conv = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
        out_features = features * self.expansion
        self.conv1 = Conv(in_features, features, 1, 1, **conv)
        self.bn1 = _batch_norm(features, dtype=dtype, rngs=rngs)
        self.conv2 = Conv(features, features, 3, strides, **conv)
        self.bn2 = _batch_norm(features, dtype=dtype, rngs=rngs)
        self.conv3 = Conv(features, out_features, 1, 1, **conv)
        self.bn3 = _batch_norm(out_features, dtype=dtype, zero_scale=zero_init_residual, rngs=rngs)
        if strides != 1 or in_features != out_features:
            self.shortcut_conv = Conv(in_features, out_features, 1, strides, **conv)
            self.shortcut_bn = _batch_norm(out_features, dtype=dtype, rngs=rngs)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    def __call__(self, x: Array) -> Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        if self.shortcut_conv is not None:
            x = self.shortcut_bn(self.shortcut_conv(x))
        return nnx.relu(x + y)


def resolve_stem(stem: str, image_size: int) -> str:
    """"small" or "imagenet" for a `stem` setting and the input `image_size` (pixels per side)."""
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if stem == "auto":
        return "imagenet" if image_size >= IMAGENET_STEM_MIN_SIZE else "small"
    return stem


class ResNet(nnx.Module):
    """ResNet classifier: images (B, H, W, in_channels) -> logits (B, num_classes), float32."""

    def __init__(self, stage_sizes: Sequence[int], block: type[BasicBlock] | type[Bottleneck],
                 num_classes: int, *, in_channels: int = 1, width: int = 64, stem: str = "auto",
                 image_size: int = 64, dtype: Any = jnp.float32, conv_impl: str = "auto",
                 zero_init_residual: bool = False, rngs: nnx.Rngs):
        if num_classes < 1 or in_channels < 1 or width < 1:
            raise ValueError(f"num_classes, in_channels and width must be >= 1, got "
                             f"{num_classes}, {in_channels}, {width}")
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        self.stem = resolve_stem(stem, image_size)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.dtype = dtype
        conv = dict(conv_impl=conv_impl, dtype=dtype, rngs=rngs)
        if self.stem == "imagenet":
            self.stem_conv = Conv(in_channels, width, 7, 2, **conv)
        else:
            self.stem_conv = Conv(in_channels, width, 3, 1, **conv)
        self.stem_bn = _batch_norm(width, dtype=dtype, rngs=rngs)
        blocks = []
        in_features = width
        for stage, num_blocks in enumerate(stage_sizes):
            features = width * 2 ** stage
            for index in range(num_blocks):
                strides = 2 if stage > 0 and index == 0 else 1
                blocks.append(block(in_features, features, strides, dtype=dtype,
                                    conv_impl=conv_impl, zero_init_residual=zero_init_residual,
                                    rngs=rngs))
                in_features = features * block.expansion
        self.blocks = nnx.List(blocks)
        self.num_features = in_features
        self.head = nnx.Linear(in_features, num_classes, dtype=dtype, rngs=rngs)

    def features(self, x: Array) -> Array:
        """Pooled penultimate features: (B, H, W, in_channels) -> (B, num_features) in `dtype`."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"expected images of shape (B, H, W, {self.in_channels}), got {x.shape}")
        y = nnx.relu(self.stem_bn(self.stem_conv(x)))
        if self.stem == "imagenet":
            y = nnx.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in self.blocks:
            y = block(y)
        return jnp.mean(y, axis=(1, 2))

    def __call__(self, x: Array) -> Array:
        """Logits (B, num_classes), float32 whatever the compute dtype."""
        return self.head(self.features(x)).astype(jnp.float32)


@register("resnet18")
def resnet18(*, num_classes: int, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
    """ResNet-18 (BasicBlock, stages 2-2-2-2); kwargs as `ResNet`."""
    return ResNet((2, 2, 2, 2), BasicBlock, num_classes, rngs=rngs, **kwargs)


@register("resnet34")
def resnet34(*, num_classes: int, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
    """ResNet-34 (BasicBlock, stages 3-4-6-3); kwargs as `ResNet`."""
    return ResNet((3, 4, 6, 3), BasicBlock, num_classes, rngs=rngs, **kwargs)


@register("resnet50")
def resnet50(*, num_classes: int, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
    """ResNet-50 (Bottleneck, stages 3-4-6-3); kwargs as `ResNet`."""
    return ResNet((3, 4, 6, 3), Bottleneck, num_classes, rngs=rngs, **kwargs)
