"""UNet noise-prediction network in Flax NNX for single-channel lensing images.

    model = get_model("unet", rngs=nnx.Rngs(0, dropout=1), image_size=150, base_width=64,
                      channel_mults=(1, 2, 2, 4), attention_resolutions=(19,))
    prediction = model(x_t, t)        # x_t (B, H, W, 1), t (B,) -> (B, H, W, 1) float32

Architecture (Ho et al. 2020, with Nichol & Dhariwal 2021's scale-shift norm):
a 3x3 stem; per resolution level `num_res_blocks` residual blocks (GroupNorm,
SiLU, 3x3 conv; the time embedding scales and shifts the second GroupNorm),
optional multi-head self-attention after each block, a stride-2 3x3 conv down
between levels; a middle block (res, attention, res) at the lowest resolution;
the mirror-image decoder with `num_res_blocks + 1` blocks per level fed by skip
connections, nearest-neighbour x2 upsampling + 3x3 conv; GroupNorm, SiLU and a
zero-initialised 3x3 conv out. The time embedding is sinusoidal in the integer
step t followed by a 2-layer MLP of width 4 * base_width. The last conv of every
residual block, attention projection and output conv start at zero, so the
freshly built network is the zero function and each block starts as identity.

Sizes. With L = len(channel_mults) - 1 downsamplings, an H x W input is padded
to the next multiples of 2^L (150 -> 152 for L = 3) and the output cropped back,
so the image is never resampled. The padding is "reflect", split evenly between
the two sides: the padded band then has the same intensity and noise statistics
as the neighbouring pixels at every noise level, whereas a constant band would
be an artificial edge whose contrast changes with t (model-space background is
-1, not 0). It is at most 2^L - 1 pixels and is discarded by the crop.

`attention_resolutions` are feature-map SIZES in pixels per side, measured for an
`image_size` input after padding: level i has size padded_size / 2^i, e.g.
152, 76, 38, 19 for image_size=150 and four levels. They are turned into level
indices at construction (`attention_levels`), so the model also accepts other
input sizes, with attention at the same levels. A size that is no level's size
raises ValueError.

Dropout. `model.train()` / `model.eval()` switch it on and off (nnx convention).
Randomness comes from the `rngs` argument of `__call__` when given, e.g. the
training step's key: `model(x_t, t, rngs=nnx.Rngs(dropout=jax.random.fold_in(rng, 1)))`,
which makes the masks a function of (seed, step) so a resumed run repeats them.
Without it, the stream forked at construction from `rngs` (its "dropout" stream,
falling back to "default") is used and advanced; it lives in the non-Param model
state. With dropout=0 no randomness is needed.

Computation runs in `dtype` (float32 or bfloat16); parameters, the time
embedding and the returned prediction are float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lensjax.models import register
from lensjax.models.layers import CONV_IMPLS, Conv, GroupNorm, dot_product_attention

Array = jax.Array

# Period scale of the sinusoidal time embedding (Vaswani et al. 2017).
MAX_PERIOD = 10000.0


def timestep_embedding(t: Array, dim: int, max_period: float = MAX_PERIOD) -> Array:
    """Sinusoidal embedding [sin | cos] of timesteps t (B,) -> (B, dim) float32."""
    if dim < 2 or dim % 2:
        raise ValueError(f"time embedding dimension must be even and >= 2, got {dim}")
    half = dim // 2
    frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(t, jnp.float32)[:, None] * frequencies[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def padded_size(size: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= size."""
    return -(-size // multiple) * multiple


def pad_to_multiple(x: Array, multiple: int) -> tuple[Array, tuple[int, int, int, int]]:
    """Reflect-pad x (B, H, W, C) so H and W are multiples of `multiple`.

    Returns the padded array and (top, bottom, left, right) padding, split evenly
    (the extra pixel of an odd total goes to bottom/right).
    """
    _, height, width, _ = x.shape
    pad_h = padded_size(height, multiple) - height
    pad_w = padded_size(width, multiple) - width
    top, left = pad_h // 2, pad_w // 2
    pads = (top, pad_h - top, left, pad_w - left)
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (pads[0], pads[1]), (pads[2], pads[3]), (0, 0)), mode="reflect")
    return x, pads


def crop_padding(x: Array, pads: tuple[int, int, int, int]) -> Array:
    """Undo `pad_to_multiple`: x (B, H + top + bottom, W + left + right, C) -> (B, H, W, C)."""
    top, bottom, left, right = pads
    return x[:, top:x.shape[1] - bottom, left:x.shape[2] - right, :]


def level_sizes(image_size: int, num_levels: int) -> tuple[int, ...]:
    """Feature-map size at each level for an `image_size` input after padding."""
    size = padded_size(image_size, 2 ** (num_levels - 1))
    return tuple(size // 2 ** level for level in range(num_levels))


def attention_levels(attention_resolutions: Sequence[int], image_size: int,
                     num_levels: int) -> tuple[int, ...]:
    """Level indices of the feature-map sizes `attention_resolutions`; ValueError if one is not."""
    sizes = level_sizes(image_size, num_levels)
    unknown = [size for size in attention_resolutions if size not in sizes]
    if unknown:
        raise ValueError(f"attention_resolutions {tuple(attention_resolutions)} contains "
                         f"{unknown}, which are not feature-map sizes of this UNet; for image_size="
                         f"{image_size} the sizes per level are {sizes}")
    return tuple(sorted(sizes.index(size) for size in set(attention_resolutions)))


def _group_norm(features: int, num_groups: int, dtype: Any, rngs: nnx.Rngs) -> GroupNorm:
    return GroupNorm(features, num_groups=num_groups, epsilon=1e-5, dtype=dtype, rngs=rngs)


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-conv twice, time embedding as scale-shift of the second norm, residual."""

    def __init__(self, in_features: int, features: int, time_features: int, *, num_groups: int,
                 dropout: float, dtype: Any, conv_impl: str, rngs: nnx.Rngs):
        conv = dict(conv_impl=conv_impl, dtype=dtype, use_bias=True, rngs=rngs)
        self.norm1 = _group_norm(in_features, num_groups, dtype, rngs)
        self.conv1 = Conv(in_features, features, 3, **conv)
        self.time_proj = nnx.Linear(time_features, 2 * features, dtype=dtype, rngs=rngs)
        self.norm2 = _group_norm(features, num_groups, dtype, rngs)
        # Without dropout, keep no random stream in the model state.
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0.0 else None)
        self.conv2 = Conv(features, features, 3, kernel_init=nnx.initializers.zeros, **conv)
        self.shortcut = (Conv(in_features, features, 1, **conv) if in_features != features
                         else None)

    def __call__(self, x: Array, time_embedding: Array, rngs: nnx.Rngs | None = None) -> Array:
        """x (B, H, W, in_features), time_embedding (B, time_features) -> (B, H, W, features)."""
        h = self.conv1(self.norm1.silu(x))
        scale, shift = jnp.split(self.time_proj(nnx.silu(time_embedding)), 2, axis=-1)
        # SiLU(norm2(h) (1 + scale) + shift), one written-out gradient (GroupNorm.silu).
        h = self.conv2(self.dropout(self.norm2.silu(h, scale, shift), rngs=rngs))
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip.astype(h.dtype) + h


class AttentionBlock(nnx.Module):
    """Multi-head self-attention over all H*W positions, GroupNorm'd input, residual."""

    def __init__(self, features: int, *, num_heads: int, num_groups: int, dtype: Any,
                 rngs: nnx.Rngs):
        if features % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the {features} channels of "
                             f"an attention level")
        self.num_heads = num_heads
        self.norm = _group_norm(features, num_groups, dtype, rngs)
        self.qkv = nnx.Linear(features, 3 * features, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(features, features, dtype=dtype,
                               kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        """x (B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, features = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, height * width, 3, self.num_heads,
                                             features // self.num_heads)
        out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        out = self.proj(out.reshape(batch, height, width, features))
        return x.astype(out.dtype) + out


class Downsample(nnx.Module):
    """Stride-2 3x3 convolution: (B, H, W, C) -> (B, H/2, W/2, C) for even H, W."""

    def __init__(self, features: int, *, dtype: Any, conv_impl: str, rngs: nnx.Rngs):
        self.conv = Conv(features, features, 3, 2, use_bias=True, conv_impl=conv_impl,
                         dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 convolution: (B, H, W, C) -> (B, 2H, 2W, C),
    computed without the upsampled copy (`upsample_conv`)."""

    def __init__(self, features: int, *, dtype: Any, conv_impl: str, rngs: nnx.Rngs):
        self.conv = Conv(features, features, 3, 1, use_bias=True, conv_impl=conv_impl,
                         dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return upsample_conv(x, self.conv)


# Rows of the 3 x 3 kernel that each tap of a 2 x 2 kernel gathers, per output phase:
# phase 0 (even output rows) reads input rows (i - 1, i) with kernel rows (0) and (1, 2);
# phase 1 (odd rows) reads (i, i + 1) with kernel rows (0, 1) and (2).
_PHASE_TAPS = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                        [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], np.float32)  # (phase, tap, kernel row)


def upsample_conv(x: Array, conv: Conv) -> Array:
    """conv(nearest-neighbour x2 upsampling of x), computed on x's own grid.

    x (B, H, W, C), conv a 3 x 3 stride-1 SAME `Conv` -> (B, 2H, 2W, conv.out_features).
    Each of the four output phases (even/odd row, even/odd column) is a 2 x 2
    convolution of x with sums of the 3 x 3 kernel's taps; one convolution with the
    four phases' kernels side by side computes all of them: 16 instead of 36
    multiply-adds per input pixel and output channel, and no upsampled copy of x.
    """
    kernel = conv.kernel[...]
    if kernel.shape[:2] != (3, 3) or tuple(conv.strides) != (1, 1):
        raise ValueError(f"upsample_conv needs a 3 x 3 stride-1 Conv, got kernel {kernel.shape[:2]} "
                         f"and strides {tuple(conv.strides)}")
    cin, cout = kernel.shape[2:]
    batch, height, width, _ = x.shape
    # (tap_h, tap_w, cin, phase_h, phase_w, cout) -> one 2 x 2 kernel with 4 * cout outputs.
    phases = jnp.einsum("atk,bsl,klio->tsiabo", _PHASE_TAPS, _PHASE_TAPS, kernel.astype(jnp.float32))
    phases = phases.reshape(2, 2, cin, 4 * cout)
    # Pad one row and column in front: with SAME padding of the 2 x 2 kernel (one
    # behind), output (i, j) then covers input rows i - 1, i and columns j - 1, j.
    padded = jnp.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))
    z = conv.convolve(padded, phases).reshape(batch, height + 1, width + 1, 2, 2, cout)
    rows = [jnp.stack([z[:, a:a + height, b:b + width, a, b] for b in (0, 1)], axis=3)
            for a in (0, 1)]                                                 # (B, H, W, 2, C') each
    y = jnp.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, cout)
    if conv.bias is not None:
        y = y + conv.bias[...].astype(y.dtype)
    return y


class UNet(nnx.Module):
    """Diffusion UNet: x_t (B, H, W, in_channels), t (B,) -> (B, H, W, out_channels) float32.

    Args:
      in_channels, out_channels: image channels in and out (out defaults to in).
      base_width: channels of the first level; level i has base_width * channel_mults[i].
      channel_mults: one entry per resolution level; len - 1 downsamplings.
      num_res_blocks: residual blocks per level in the encoder (decoder: one more).
      attention_resolutions: feature-map sizes (pixels per side, for an
        `image_size` input after padding) whose levels get self-attention.
      image_size: the input size the attention sizes refer to (any size runs).
      num_heads: attention heads; must divide the width of every attention level.
      mid_attention: self-attention between the two middle residual blocks.
      dropout: rate before the second conv of every residual block.
      num_groups: GroupNorm groups; must divide every level width.
      dtype: computation dtype (parameters stay float32).
      conv_impl: see `lensjax.models.layers.Conv`.
    """

    def __init__(self, *, in_channels: int = 1, out_channels: int | None = None,
                 base_width: int = 64, channel_mults: Sequence[int] = (1, 2, 2, 4),
                 num_res_blocks: int = 2, attention_resolutions: Sequence[int] = (19,),
                 image_size: int = 150, num_heads: int = 4, mid_attention: bool = True,
                 dropout: float = 0.0, num_groups: int = 32, dtype: Any = jnp.float32,
                 conv_impl: str = "auto", rngs: nnx.Rngs):
        channel_mults = tuple(int(m) for m in channel_mults)
        out_channels = in_channels if out_channels is None else out_channels
        if min(in_channels, out_channels, base_width, num_res_blocks, image_size) < 1:
            raise ValueError("in_channels, out_channels, base_width, num_res_blocks and image_size "
                             f"must be >= 1, got {in_channels}, {out_channels}, {base_width}, "
                             f"{num_res_blocks}, {image_size}")
        if not channel_mults or min(channel_mults) < 1:
            raise ValueError(f"channel_mults must be a non-empty sequence of positive integers, "
                             f"got {channel_mults}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        widths = [base_width * mult for mult in channel_mults]
        if num_groups < 1 or any(width % num_groups for width in widths):
            raise ValueError(f"num_groups={num_groups} must divide every level width {widths} "
                             f"(base_width * channel_mults)")
        levels_with_attention = attention_levels(attention_resolutions, image_size, len(widths))
        attention_widths = [widths[level] for level in levels_with_attention]
        if mid_attention:
            attention_widths.append(widths[-1])
        if num_heads < 1 or any(width % num_heads for width in attention_widths):
            raise ValueError(f"num_heads={num_heads} must divide the width of every attention "
                             f"level {sorted(set(attention_widths))}")
        if base_width % 2:
            raise ValueError(f"base_width must be even (it sizes the sinusoidal time embedding), "
                             f"got {base_width}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_levels = len(channel_mults)
        self.size_multiple = 2 ** (self.num_levels - 1)
        self.attention_levels = levels_with_attention
        self.base_width = base_width
        self.dtype = dtype

        time_features = 4 * base_width
        self.time_mlp1 = nnx.Linear(base_width, time_features, rngs=rngs)
        self.time_mlp2 = nnx.Linear(time_features, time_features, rngs=rngs)

        block = dict(time_features=time_features, num_groups=num_groups, dropout=dropout,
                     dtype=dtype, conv_impl=conv_impl, rngs=rngs)
        attention = dict(num_heads=num_heads, num_groups=num_groups, dtype=dtype, rngs=rngs)
        sampling = dict(dtype=dtype, conv_impl=conv_impl, rngs=rngs)

        self.stem = Conv(in_channels, base_width, 3, use_bias=True, conv_impl=conv_impl,
                         dtype=dtype, rngs=rngs)
        # Encoder: one entry per residual block (with its optional attention) and
        # per downsampling; every entry's output is a skip connection.
        down_blocks, down_attention, downsamples = [], [], []
        skip_widths = [base_width]
        width = base_width
        for level, level_width in enumerate(widths):
            for _ in range(num_res_blocks):
                down_blocks.append(ResBlock(width, level_width, **block))
                down_attention.append(AttentionBlock(level_width, **attention)
                                      if level in self.attention_levels else None)
                width = level_width
                skip_widths.append(width)
            if level < self.num_levels - 1:
                downsamples.append(Downsample(width, **sampling))
                skip_widths.append(width)
        self.down_blocks = nnx.List(down_blocks)
        self.down_attention = nnx.List(down_attention)
        self.downsamples = nnx.List(downsamples)

        self.mid_block1 = ResBlock(width, width, **block)
        self.mid_attention = AttentionBlock(width, **attention) if mid_attention else None
        self.mid_block2 = ResBlock(width, width, **block)

        up_blocks, up_attention, upsamples = [], [], []
        for level in reversed(range(self.num_levels)):
            for _ in range(num_res_blocks + 1):
                up_blocks.append(ResBlock(width + skip_widths.pop(), widths[level], **block))
                up_attention.append(AttentionBlock(widths[level], **attention)
                                    if level in self.attention_levels else None)
                width = widths[level]
            if level > 0:
                upsamples.append(Upsample(width, **sampling))
        assert not skip_widths, skip_widths
        self.up_blocks = nnx.List(up_blocks)
        self.up_attention = nnx.List(up_attention)
        self.upsamples = nnx.List(upsamples)

        self.out_norm = _group_norm(width, num_groups, dtype, rngs)
        self.out_conv = Conv(width, out_channels, 3, use_bias=True, conv_impl=conv_impl,
                             dtype=dtype, kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.num_res_blocks = num_res_blocks

    def time_embedding(self, t: Array, batch: int) -> Array:
        """Timesteps t (B,) or () -> embedding (B, 4 * base_width) float32."""
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        h = self.time_mlp1(timestep_embedding(t, self.base_width))
        return self.time_mlp2(nnx.silu(h))

    def __call__(self, x: Array, t: Array, *, rngs: nnx.Rngs | None = None) -> Array:
        """Prediction (B, H, W, out_channels) float32 for x_t (B, H, W, in_channels), steps t (B,).

        `rngs` (optional) supplies the dropout randomness; see the module docstring.
        """
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"expected x of shape (B, H, W, {self.in_channels}), got {x.shape}")
        embedding = self.time_embedding(t, x.shape[0]).astype(self.dtype)
        h, pads = pad_to_multiple(x.astype(self.dtype), self.size_multiple)

        h = self.stem(h)
        skips = [h]
        blocks = iter(zip(self.down_blocks, self.down_attention))
        for level in range(self.num_levels):
            for _ in range(self.num_res_blocks):
                res_block, attention = next(blocks)
                h = res_block(h, embedding, rngs)
                if attention is not None:
                    h = attention(h)
                skips.append(h)
            if level < self.num_levels - 1:
                h = self.downsamples[level](h)
                skips.append(h)

        h = self.mid_block1(h, embedding, rngs)
        if self.mid_attention is not None:
            h = self.mid_attention(h)
        h = self.mid_block2(h, embedding, rngs)

        blocks = iter(zip(self.up_blocks, self.up_attention))
        upsamples = iter(self.upsamples)
        for level in reversed(range(self.num_levels)):
            for _ in range(self.num_res_blocks + 1):
                res_block, attention = next(blocks)
                h = res_block(jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1),
                              embedding, rngs)
                if attention is not None:
                    h = attention(h)
            if level > 0:
                h = next(upsamples)(h)

        h = self.out_conv(self.out_norm.silu(h))
        return crop_padding(h, pads).astype(jnp.float32)


@register("unet")
def unet(*, rngs: nnx.Rngs, **kwargs: Any) -> UNet:
    """Diffusion UNet; kwargs as `UNet` (base_width, channel_mults, attention_resolutions, ...)."""
    return UNet(rngs=rngs, **kwargs)
