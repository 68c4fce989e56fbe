"""Vision Transformer (ViT) encoder and classifier in Flax NNX for lensing images.

    model = get_model("vit", num_classes=3, rngs=nnx.Rngs(0), variant="S", patch_size=8,
                      image_size=64)
    logits = model(images)                  # (B, 64, 64, 1) -> (B, num_classes), float32

    encoder = ViTEncoder(image_size=64, patch_size=8, variant="Ti", rngs=nnx.Rngs(0))
    tokens = encoder.embed_patches(images)  # (B, N, width), N = (64 / 8) ** 2 = 64
    latent = encoder.encode_tokens(tokens[:, :16])   # any subset of patches (MAE)
                                            # -> (B, 1 + 16, width), [CLS] first

Architecture (Dosovitskiy et al. 2021, as used by MAE, He et al. 2021):
images are cut into non-overlapping p x p patches (`patchify`), each flattened
patch is mapped to `width` features by one linear layer (the same function as a
p x p convolution with stride p), a fixed 2-D sin-cos position embedding is
added, a learned [CLS] token is prepended (with no position embedding, as MAE's
all-zero [CLS] position), then `depth` pre-norm blocks (LayerNorm -> multi-head
self-attention -> residual; LayerNorm -> MLP (GELU, exact erf form) ->
residual) and a final LayerNorm. LayerNorm epsilon is 1e-6; linear layers use
Xavier-uniform weights and zero biases; the [CLS] token starts as N(0, 0.02^2).

Sizes: `variant` is "Ti" (width 192, depth 12, 3 heads), "S" (384, 12, 6),
"B" (768, 12, 12) or "L" (1024, 24, 16), optionally with the patch size appended
("S/8"); `width`, `depth`, `num_heads`, `mlp_dim` (default 4 * width) override
the variant. `patch_size` defaults to the one in the variant, else 8.

Position embeddings are NOT parameters: they are recomputed (and cached) from
the patch grid by `sincos_position_embedding`, so they are absent from
`nnx.state(model, nnx.Param)`, from optimiser state and from checkpoints, and
an encoder built for another grid (e.g. 80 px images for super-resolution)
carries every parameter of one pretrained on 64 px images with the same patch
size, width and depth. Warm starts copy parameters by path: the encoder lives
at attribute `encoder` of every model here (classifier, MAE, super-resolution).

Computation runs in `dtype` (float32 or bfloat16); parameters stay float32, and
LayerNorm statistics and attention softmax are computed in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lensjax.models import register
from lensjax.models.layers import LayerNorm, dense_dot_general, dot_product_attention

Array = jax.Array

VARIANTS: dict[str, tuple[int, int, int]] = {
    # name: (width, depth, num_heads)
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}
DEFAULT_PATCH_SIZE = 8
MLP_RATIO = 4
LAYER_NORM_EPSILON = 1e-6
POOLS = ("cls", "mean")

xavier_uniform = nnx.initializers.xavier_uniform()
token_init = nnx.initializers.normal(0.02)


class ViTSize(NamedTuple):
    """Resolved transformer size."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int


def resolve_size(variant: str = "S", *, patch_size: int | None = None, width: int | None = None,
                 depth: int | None = None, num_heads: int | None = None,
                 mlp_dim: int | None = None) -> ViTSize:
    """Width, depth, heads, MLP size and patch size of `variant` ("S" or "S/8") after overrides."""
    name, _, variant_patch = variant.partition("/")
    if name not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; valid names: {', '.join(VARIANTS)} "
                         "(optionally with '/patch_size', e.g. 'S/8')")
    if variant_patch:
        if not variant_patch.isdigit():
            raise ValueError(f"patch size in variant {variant!r} must be an integer")
        if patch_size is not None and patch_size != int(variant_patch):
            raise ValueError(f"patch_size={patch_size} contradicts variant {variant!r}")
        patch_size = int(variant_patch)
    base_width, base_depth, base_heads = VARIANTS[name]
    width = base_width if width is None else width
    depth = base_depth if depth is None else depth
    num_heads = base_heads if num_heads is None else num_heads
    mlp_dim = MLP_RATIO * width if mlp_dim is None else mlp_dim
    patch_size = DEFAULT_PATCH_SIZE if patch_size is None else patch_size
    if min(width, depth, num_heads, mlp_dim, patch_size) < 1:
        raise ValueError(f"width, depth, num_heads, mlp_dim and patch_size must be >= 1, got "
                         f"{width}, {depth}, {num_heads}, {mlp_dim}, {patch_size}")
    if width % num_heads:
        raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    if width % 4:
        # Two sin-cos halves (rows, columns), each split into sin and cos.
        raise ValueError(f"width {width} must be divisible by 4 for 2-D sin-cos position embeddings")
    return ViTSize(width, depth, num_heads, mlp_dim, patch_size)


def grid_shape(image_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid (rows, columns) of an image of `image_size` (int or (H, W)) cut into p x p patches."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch_size {patch_size}; "
                         "pad or crop the images, or choose another patch size")
    return height // patch_size, width // patch_size


# ----------------------------------------------------------------------------
# Patches and position embeddings (pure functions)
# ----------------------------------------------------------------------------

def patchify(images: Array, patch_size: int) -> Array:
    """Non-overlapping patches: (B, H, W, C) -> (B, N, p*p*C), N = (H/p)(W/p), row-major grid.

    Each patch is flattened in (row-in-patch, column-in-patch, channel) order.
    """
    batch, height, width, channels = images.shape
    rows, cols = grid_shape((height, width), patch_size)
    p = patch_size
    x = images.reshape(batch, rows, p, cols, p, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(batch, rows * cols, p * p * channels)


def unpatchify(patches: Array, patch_size: int, grid: tuple[int, int] | None = None) -> Array:
    """Inverse of `patchify`: (B, N, p*p*C) -> (B, rows*p, cols*p, C); `grid` defaults to square."""
    batch, num_patches, dim = patches.shape
    p = patch_size
    if dim % (p * p):
        raise ValueError(f"patch dimension {dim} is not a multiple of patch_size**2 = {p * p}")
    channels = dim // (p * p)
    if grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches do not form a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    rows, cols = grid
    if rows * cols != num_patches:
        raise ValueError(f"grid {grid} does not hold {num_patches} patches")
    x = patches.reshape(batch, rows, cols, p, p, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(batch, rows * p, cols * p, channels)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """Sin-cos embedding of positions (P,) -> (P, dim): [sin(pos w_k), cos(pos w_k)], k < dim/2.

    w_k = 10000^(-2k/dim), as in the Transformer and MAE.
    """
    if dim % 2:
        raise ValueError(f"1-D sin-cos embedding dimension must be even, got {dim}")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.asarray(positions, dtype=np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=64)
def sincos_position_embedding(dim: int, rows: int, cols: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding of a (rows, cols) patch grid -> (rows*cols, dim) float32.

    MAE convention: token k = i * cols + j (row i, column j); the first dim/2
    features embed the column j, the last dim/2 the row i, each with `sincos_1d`.
    The returned array is read-only (it is cached).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dimension must be divisible by 4, got {dim}")
    row_index, col_index = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    embedding = np.concatenate([sincos_1d(dim // 2, col_index), sincos_1d(dim // 2, row_index)],
                               axis=1).astype(np.float32)
    embedding.setflags(write=False)
    return embedding


# ----------------------------------------------------------------------------
# Transformer blocks
# ----------------------------------------------------------------------------

def xavier_linear(in_features: int, out_features: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    """Linear layer (in_features -> out_features) with Xavier-uniform kernel and zero bias,
    float32 params; its matmuls are `dense_dot_general`'s (oneDNN on CPU)."""
    return nnx.Linear(in_features, out_features, dtype=dtype, kernel_init=xavier_uniform,
                      dot_general=dense_dot_general, rngs=rngs)


def layer_norm(features: int, *, dtype: Any, rngs: nnx.Rngs) -> LayerNorm:
    """LayerNorm over the last axis (`features`) with epsilon 1e-6 (nnx.LayerNorm's
    parameters and values; `layers.LayerNorm`, with a written-out gradient)."""
    return LayerNorm(features, epsilon=LAYER_NORM_EPSILON, dtype=dtype, rngs=rngs)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with one fused q/k/v projection: (B, T, D) -> (B, T, D)."""

    def __init__(self, width: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = xavier_linear(width, 3 * width, dtype=dtype, rngs=rngs)
        self.proj = xavier_linear(width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        batch, length, width = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, width // self.num_heads)
        # dot_product_attention takes (B, T, heads, head_dim) and computes the
        # logits and softmax in float32 even for bfloat16 inputs.
        out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return self.proj(out.reshape(batch, length, width))


class MLP(nnx.Module):
    """Two linear layers with an exact (erf) GELU between: (..., D) -> (..., D)."""

    def __init__(self, width: int, mlp_dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.fc1 = xavier_linear(width, mlp_dim, dtype=dtype, rngs=rngs)
        self.fc2 = xavier_linear(mlp_dim, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(nnx.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)); (B, T, D) -> (B, T, D)."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.norm1 = layer_norm(width, dtype=dtype, rngs=rngs)
        self.attn = SelfAttention(width, num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(width, dtype=dtype, rngs=rngs)
        self.mlp = MLP(width, mlp_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def transformer_blocks(width: int, depth: int, num_heads: int, mlp_dim: int, *, dtype: Any,
                       rngs: nnx.Rngs) -> nnx.List:
    """`depth` transformer `Block`s in an nnx.List (parameter paths blocks/0, blocks/1, ...)."""
    return nnx.List([Block(width, num_heads, mlp_dim, dtype=dtype, rngs=rngs) for _ in range(depth)])


# ----------------------------------------------------------------------------
# Encoder and classifier
# ----------------------------------------------------------------------------

class ViTEncoder(nnx.Module):
    """ViT encoder: images (B, H, W, C) -> tokens (B, 1 + N, width), [CLS] first, final LayerNorm."""

    def __init__(self, *, image_size: int | tuple[int, int] = 64, patch_size: int | None = None,
                 in_channels: int = 1, variant: str = "S", width: int | None = None,
                 depth: int | None = None, num_heads: int | None = None,
                 mlp_dim: int | None = None, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        size = resolve_size(variant, patch_size=patch_size, width=width, depth=depth,
                            num_heads=num_heads, mlp_dim=mlp_dim)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.image_shape = ((image_size, image_size) if isinstance(image_size, int)
                            else tuple(image_size))
        self.patch_size = size.patch_size
        self.grid = grid_shape(self.image_shape, size.patch_size)
        self.in_channels = in_channels
        self.width = size.width
        self.depth = size.depth
        self.num_heads = size.num_heads
        self.mlp_dim = size.mlp_dim
        self.dtype = dtype
        patch_dim = size.patch_size ** 2 * in_channels
        self.patch_embed = xavier_linear(patch_dim, size.width, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, size.width), jnp.float32))
        self.blocks = transformer_blocks(size.width, size.depth, size.num_heads, size.mlp_dim,
                                         dtype=dtype, rngs=rngs)
        self.norm = layer_norm(size.width, dtype=dtype, rngs=rngs)

    @property
    def num_patches(self) -> int:
        """N, the number of patches (tokens without [CLS]) of one image."""
        return self.grid[0] * self.grid[1]

    def position_embedding(self) -> np.ndarray:
        """Fixed sin-cos position embedding of this encoder's grid: (N, width) float32 (not a parameter)."""
        return sincos_position_embedding(self.width, *self.grid)

    def embed_patches(self, images: Array) -> Array:
        """Patch tokens with position embeddings, no [CLS]: (B, H, W, C) -> (B, N, width) in `dtype`."""
        expected = (*self.image_shape, self.in_channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}), got {images.shape}")
        tokens = self.patch_embed(patchify(images, self.patch_size))
        return tokens + jnp.asarray(self.position_embedding(), dtype=tokens.dtype)

    def encode_tokens(self, tokens: Array) -> Array:
        """Transformer on any subset of embedded patch tokens: (B, K, width) -> (B, 1 + K, width).

        `tokens` come from `embed_patches` (position embeddings already added), e.g.
        the visible patches kept by MAE masking; output index 0 is [CLS].
        """
        cls = jnp.broadcast_to(self.cls_token[...].astype(tokens.dtype), (tokens.shape[0], 1, self.width))
        x = jnp.concatenate([cls, tokens], axis=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def __call__(self, images: Array) -> Array:
        """All tokens: (B, H, W, C) -> (B, 1 + N, width) in `dtype`; index 0 is [CLS]."""
        return self.encode_tokens(self.embed_patches(images))


def vit_layer_id(path: str, depth: int) -> int:
    """Layer index of a parameter path for layer-wise LR decay (BEiT / MAE fine-tuning).

    "encoder/patch_embed/...", "encoder/cls_token": 0; "encoder/blocks/<i>/...": i + 1;
    everything after the last block (final norm, heads, decoders): depth + 1.
    """
    parts = path.split("/")
    if parts[:1] == ["encoder"] and len(parts) > 1:
        if parts[1] in ("patch_embed", "cls_token"):
            return 0
        if parts[1] == "blocks":
            return int(parts[2]) + 1
    return depth + 1


class ViTClassifier(nnx.Module):
    """ViT classifier: images (B, H, W, C) -> logits (B, num_classes), float32.

    `pool="cls"` classifies the [CLS] token, `pool="mean"` the mean of the patch
    tokens (both after the encoder's final LayerNorm). The head starts at zero.
    """

    def __init__(self, num_classes: int, *, pool: str = "cls", rngs: nnx.Rngs, **encoder_kwargs: Any):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.num_classes = num_classes
        self.pool = pool
        self.encoder = ViTEncoder(rngs=rngs, **encoder_kwargs)
        self.num_features = self.encoder.width
        self.head = nnx.Linear(self.encoder.width, num_classes, dtype=self.encoder.dtype,
                               kernel_init=nnx.initializers.zeros, rngs=rngs)

    @property
    def num_layers(self) -> int:
        """Layers for layer-wise LR decay: embedding, blocks, head (see `vit_layer_id`)."""
        return self.encoder.depth + 1

    def layer_id(self, path: str) -> int:
        return vit_layer_id(path, self.encoder.depth)

    def features(self, images: Array) -> Array:
        """Pooled encoder features: (B, H, W, C) -> (B, width) in the compute dtype."""
        tokens = self.encoder(images)
        return tokens[:, 0] if self.pool == "cls" else jnp.mean(tokens[:, 1:], axis=1)

    def __call__(self, images: Array) -> Array:
        """Logits (B, num_classes), float32 whatever the compute dtype."""
        return self.head(self.features(images)).astype(jnp.float32)


@register("vit")
def vit(*, num_classes: int, rngs: nnx.Rngs, **kwargs: Any) -> ViTClassifier:
    """ViT classifier; kwargs: pool and those of `ViTEncoder` (image_size, patch_size, variant, ...)."""
    return ViTClassifier(num_classes, rngs=rngs, **kwargs)
