"""ViT super-resolution network (Test VI.B): 75 x 75 -> 150 x 150 lensing images.

    model = get_model("vit_superres", rngs=nnx.Rngs(0), lr_size=75, scale=2, patch_size=5,
                      variant="S")
    hr = model(lr)                    # lr (B, 75, 75, 1) -> hr (B, 150, 150, 1), float32

Architecture: output = bicubic_upsample(lr) + residual(lr), so the network only
learns what bicubic interpolation misses; the last convolution starts at zero,
so an untrained model is exactly the bicubic baseline of the evaluation.
The residual branch:

  1. `encoder` (lensjax.models.vit.ViTEncoder) on the LR image, padded (by edge
     replication, `pad_mode`) up to a multiple of `patch_size` when needed:
     tokens (B, 1 + gh*gw, width); [CLS] dropped; tokens laid out as a
     (B, gh, gw, width) feature map and projected to `decoder_features` (F).
  2. 3x3 conv F -> F*p*p and pixel shuffle by p: back to the (padded) LR grid,
     (B, gh*p, gw*p, F); GELU.
  3. The (padded) LR pixels are concatenated (sub-patch detail the tokens may
     not carry), 3x3 conv F+C -> F*s*s and pixel shuffle by s = `scale`:
     (B, gh*p*s, gw*p*s, F); GELU; 3x3 conv F -> C (zero-initialised).
  4. Crop the padding (times s) away: (B, lr*s, lr*s, C).

Patch size and weight transfer: with patch 5 a 75 px image is a 15 x 15 grid
(no padding, the default). To warm-start from an MAE pretrained on 64 px images
the patch embedding must have the same shape, i.e. the same `patch_size` (and
in_channels, width, depth, heads, mlp_dim): e.g. an MAE with patch 8 transfers to
`patch_size=8` here, which pads 75 -> 80 (a 10 x 10 grid). Position embeddings
are fixed sin-cos functions of the grid, so the different grid needs no
parameter. The encoder lives at attribute `encoder`, so MAE parameters
`encoder/...` load by path; the decoder here is new and trains from scratch.

Pixel shuffle (depth-to-space) orders channels as (row offset, column offset,
feature); it is learned end to end, so this only matters for porting weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lensjax.metrics.image_quality import bicubic_upsample
from lensjax.models import register
from lensjax.models.layers import CONV_IMPLS, Conv
from lensjax.models.vit import ViTEncoder, resolve_size, vit_layer_id, xavier_linear

Array = jax.Array

PAD_MODES = ("edge", "reflect", "constant")
DEFAULT_SR_PATCH_SIZE = 5


def pixel_shuffle(x: Array, factor: int) -> Array:
    """Depth-to-space: (B, H, W, r*r*C) -> (B, H*r, W*r, C), channels ordered (row, col, C)."""
    batch, height, width, channels = x.shape
    if channels % (factor * factor):
        raise ValueError(f"{channels} channels cannot be shuffled by a factor {factor}")
    out = channels // (factor * factor)
    x = x.reshape(batch, height, width, factor, factor, out)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(batch, height * factor, width * factor, out)


def padding_to_multiple(size: int, multiple: int) -> tuple[int, int]:
    """(before, after) padding that brings `size` up to a multiple of `multiple`, split evenly."""
    total = -size % multiple
    return total // 2, total - total // 2


class ViTSuperRes(nnx.Module):
    """LR images (B, lr_size, lr_size, C) -> SR images (B, lr_size*scale, lr_size*scale, C), float32."""

    def __init__(self, *, lr_size: int = 75, scale: int = 2, patch_size: int | None = None,
                 in_channels: int = 1, variant: str = "S", width: int | None = None,
                 depth: int | None = None, num_heads: int | None = None, mlp_dim: int | None = None,
                 decoder_features: int = 64, pad_mode: str = "edge", conv_impl: str = "auto",
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        if scale < 1 or lr_size < 1 or decoder_features < 1:
            raise ValueError(f"lr_size, scale and decoder_features must be >= 1, got "
                             f"{lr_size}, {scale}, {decoder_features}")
        if patch_size is None and "/" not in variant:
            patch_size = DEFAULT_SR_PATCH_SIZE
        size = resolve_size(variant, patch_size=patch_size, width=width, depth=depth,
                            num_heads=num_heads, mlp_dim=mlp_dim)
        self.lr_size = lr_size
        self.scale = scale
        self.in_channels = in_channels
        self.pad_mode = pad_mode
        self.dtype = dtype
        self.pad = padding_to_multiple(lr_size, size.patch_size)
        self.encoder = ViTEncoder(image_size=lr_size + sum(self.pad), patch_size=size.patch_size,
                                  in_channels=in_channels, variant=variant, width=size.width,
                                  depth=size.depth, num_heads=size.num_heads, mlp_dim=size.mlp_dim,
                                  dtype=dtype, rngs=rngs)
        p, f = self.encoder.patch_size, decoder_features
        conv = dict(conv_impl=conv_impl, dtype=dtype, use_bias=True, rngs=rngs)
        self.neck = xavier_linear(self.encoder.width, f, dtype=dtype, rngs=rngs)
        self.patch_upsample = Conv(f, f * p * p, 3, **conv)
        self.scale_upsample = Conv(f + in_channels, f * scale * scale, 3, **conv)
        self.out = Conv(f, in_channels, 3, kernel_init=nnx.initializers.zeros, **conv)

    def residual(self, lr: Array) -> Array:
        """The learned correction to bicubic: (B, lr, lr, C) -> (B, lr*scale, lr*scale, C) in `dtype`."""
        (lo, hi) = self.pad
        padded = lr
        if lo or hi:
            padded = jnp.pad(lr, ((0, 0), (lo, hi), (lo, hi), (0, 0)), mode=self.pad_mode)
        tokens = self.encoder(padded)[:, 1:]
        rows, cols = self.encoder.grid
        x = self.neck(tokens).reshape(tokens.shape[0], rows, cols, -1)
        x = nnx.gelu(pixel_shuffle(self.patch_upsample(x), self.encoder.patch_size), approximate=False)
        x = jnp.concatenate([x, padded.astype(x.dtype)], axis=-1)
        x = nnx.gelu(pixel_shuffle(self.scale_upsample(x), self.scale), approximate=False)
        x = self.out(x)
        s, size = self.scale, self.lr_size * self.scale
        return x[:, lo * s:lo * s + size, lo * s:lo * s + size]

    @property
    def num_layers(self) -> int:
        """Layers for layer-wise LR decay: embedding, blocks, decoder (see `vit_layer_id`)."""
        return self.encoder.depth + 1

    def layer_id(self, path: str) -> int:
        return vit_layer_id(path, self.encoder.depth)

    def __call__(self, lr: Array) -> Array:
        """SR image (B, lr_size*scale, lr_size*scale, C) float32 = bicubic(lr) + residual(lr)."""
        expected = (self.lr_size, self.lr_size, self.in_channels)
        if lr.ndim != 4 or tuple(lr.shape[1:]) != expected:
            raise ValueError(f"expected LR images of shape (B, {self.lr_size}, {self.lr_size}, "
                             f"{self.in_channels}), got {lr.shape}")
        return bicubic_upsample(lr, self.scale) + self.residual(lr).astype(jnp.float32)


@register("vit_superres")
def vit_superres(*, rngs: nnx.Rngs, **kwargs: Any) -> ViTSuperRes:
    """ViT super-resolution; kwargs as `ViTSuperRes` (lr_size, scale, patch_size, variant, ...)."""
    return ViTSuperRes(rngs=rngs, **kwargs)
