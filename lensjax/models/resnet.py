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

Convolutions use `lensjax.models.layers.Conv`, whose `conv_impl` ("xla", "patches",
"auto") picks the fastest implementation per layer on CPU; see that module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lensjax.models import register
from lensjax.models.layers import CONV_IMPLS, BatchNorm, Conv, materialize, max_pool

Array = jax.Array

STEMS = ("auto", "small", "imagenet")
# stem="auto" uses the ImageNet stem from this image size up.
IMAGENET_STEM_MIN_SIZE = 128


def _batch_norm(features: int, *, dtype: Any, zero_scale: bool = False,
                rngs: nnx.Rngs) -> BatchNorm:
    # momentum 0.9 (PyTorch's 0.1): running statistics settle within the few
    # hundred steps of short lensing runs; Flax's 0.99 default lags far behind.
    return BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=dtype,
                     scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
                     rngs=rngs)


def _block_output(shortcut: Array, residual: Array, fence: Array) -> Array:
    """relu(shortcut + residual), stored once on CPU (`layers.materialize`): the next
    block's convolutions and the backward pass read it instead of each recomputing it.
    fence: the block's last BatchNorm scale."""
    return materialize(nnx.relu(shortcut + residual), fence)


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
        return _block_output(x, y, self.bn2.scale[...])


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
        return _block_output(x, y, self.bn3.scale[...])


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
            y = max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                         fence=self.stem_bn.scale[...])
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
