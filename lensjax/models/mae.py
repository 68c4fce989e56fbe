"""Masked autoencoder (MAE, He et al. 2021) in Flax NNX: the lensjax foundation model.

    mae = get_model("mae", rngs=nnx.Rngs(0), image_size=64, patch_size=8, variant="S")
    out = mae(images, rng)            # images (B, 64, 64, 1), rng a jax.random key
    out.loss                          # () float32: MSE on masked patches only
    out.pred                          # (B, N, p*p*C) float32: predicted patches, N = 64
    out.mask                          # (B, N) float32: 1 = masked (hidden from the encoder)
    panels = mae.reconstruct(images, rng)   # images for reconstruction figures

Pretraining: each image's patches are randomly split (`random_masking`) into a
visible subset (fraction 1 - mask_ratio) and a masked one. The encoder
(`lensjax.models.vit.ViTEncoder`, attribute `encoder`, so that a classifier or
super-resolution model warm-starts from it by parameter path) sees only the
visible patches. A lightweight decoder maps its tokens to `decoder_width`,
puts a shared learned mask token at every masked position, restores the
original patch order, adds fixed sin-cos position embeddings, runs
`decoder_depth` transformer blocks and predicts every patch's pixels. The loss
(`mae_loss`) is the mean squared error over masked patches only, against raw
pixels or, with `norm_pix_loss`, against each patch normalised by its own mean
and standard deviation.

Defaults suit 64 x 64 single-channel lensing images: patch 8 (an 8 x 8 grid),
mask ratio 0.75, decoder width 128, depth 2, 4 heads. `norm_pix_loss` defaults
to False: lensing images are mostly sky background, whose patches normalised
to unit variance are pure noise that no model can predict.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lensjax.models import register
from lensjax.models.vit import (ViTEncoder, layer_norm, patchify, sincos_position_embedding,
                                token_init, transformer_blocks, unpatchify, xavier_linear)

Array = jax.Array

DEFAULT_MASK_RATIO = 0.75
NORM_PIX_EPSILON = 1e-6
# num_kept tolerates this much float round-off in num_patches * (1 - mask_ratio)
# (e.g. 100 * (1 - 0.9) = 9.999999999999998 keeps 10 patches, not 9).
KEEP_ROUNDING_TOLERANCE = 1e-6


class MAEOutput(NamedTuple):
    """What `MAE.__call__` returns (a pytree, so it passes through jax.jit)."""

    loss: Array   # () float32
    pred: Array   # (B, N, p*p*C) float32, patches in the original (unshuffled) order
    mask: Array   # (B, N) float32, 1 = masked


# ----------------------------------------------------------------------------
# Masking and loss (pure functions)
# ----------------------------------------------------------------------------

def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K, the visible patches per image: floor(N * (1 - mask_ratio)) as in MAE (float round-off tolerant).

    Raises ValueError unless 0 <= mask_ratio < 1 and at least one patch stays visible.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    kept = int(num_patches * (1.0 - mask_ratio) + KEEP_ROUNDING_TOLERANCE)
    if kept < 1:
        raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch out of {num_patches}")
    return kept


def random_masking(rng: Array, num_patches: int, batch: int, mask_ratio: float
                   ) -> tuple[Array, Array, Array]:
    """Per-image random split of N patches -> (keep_indices, mask, restore).

    Shapes: keep_indices (B, K) int32, mask (B, N) float32, restore (B, N) int32.

    Each image's patch order is shuffled by argsort of uniform noise; the first
    K = `num_kept(N, mask_ratio)` shuffled patches stay visible (`keep_indices`,
    in shuffled order). `mask[b, n]` is 1 if patch n is masked. `restore[b, n]`
    is the position of patch n in the shuffled order, so for a sequence in
    shuffled order (visible tokens then mask tokens),
    `take_along_axis(seq, restore[..., None], axis=1)` puts every token back at
    its original patch position.
    """
    kept = num_kept(num_patches, mask_ratio)
    noise = jax.random.uniform(rng, (batch, num_patches))
    shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    restore = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
    mask = (restore >= kept).astype(jnp.float32)
    return shuffle[:, :kept], mask, restore


def normalize_patches(patches: Array, eps: float = NORM_PIX_EPSILON) -> Array:
    """Each patch (..., D) minus its mean, divided by sqrt(var + eps), var with Bessel's correction.

    The unbiased variance (ddof=1) is the MAE reference's (torch.var default).
    """
    mean = jnp.mean(patches, axis=-1, keepdims=True)
    var = jnp.var(patches, axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + eps)


def mae_loss(pred: Array, target_patches: Array, mask: Array, norm_pix_loss: bool = False) -> Array:
    """MSE over masked patches only: pred, target (B, N, D), mask (B, N) 1 = masked -> () float32.

    Per-patch mean squared error averaged over the masked patches of the whole
    batch (0 if none is masked); with `norm_pix_loss` the targets are
    `normalize_patches(target)`.
    """
    pred = pred.astype(jnp.float32)
    target = target_patches.astype(jnp.float32)
    if norm_pix_loss:
        target = normalize_patches(target)
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def gather_tokens(tokens: Array, indices: Array) -> Array:
    """tokens (B, N, D) at per-image indices (B, K) -> (B, K, D)."""
    return jnp.take_along_axis(tokens, indices[..., None], axis=1)


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------

class MAEDecoder(nnx.Module):
    """Encoder tokens of visible patches (B, 1 + K, width) + restore (B, N) -> patch pixels (B, N, p*p*C)."""

    def __init__(self, encoder_width: int, patch_dim: int, grid: tuple[int, int], *,
                 width: int = 128, depth: int = 2, num_heads: int = 4, mlp_dim: int | None = None,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if width % num_heads or width % 4:
            raise ValueError(f"decoder_width {width} must be divisible by decoder_heads {num_heads} "
                             "and by 4")
        self.grid = tuple(grid)
        self.width = width
        self.embed = xavier_linear(encoder_width, width, dtype=dtype, rngs=rngs)
        self.mask_token = nnx.Param(token_init(rngs.params(), (1, 1, width), jnp.float32))
        self.blocks = transformer_blocks(width, depth, num_heads,
                                         4 * width if mlp_dim is None else mlp_dim,
                                         dtype=dtype, rngs=rngs)
        self.norm = layer_norm(width, dtype=dtype, rngs=rngs)
        self.pred = xavier_linear(width, patch_dim, dtype=dtype, rngs=rngs)

    def __call__(self, latent: Array, restore: Array) -> Array:
        x = self.embed(latent)
        cls, visible = x[:, :1], x[:, 1:]
        batch, num_patches = restore.shape
        mask_tokens = jnp.broadcast_to(self.mask_token[...].astype(x.dtype),
                                       (batch, num_patches - visible.shape[1], self.width))
        # Shuffled order (visible, then masked) back to the original patch order.
        x = gather_tokens(jnp.concatenate([visible, mask_tokens], axis=1), restore)
        x = x + jnp.asarray(sincos_position_embedding(self.width, *self.grid), dtype=x.dtype)
        x = jnp.concatenate([cls, x], axis=1)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:].astype(jnp.float32)


class MAE(nnx.Module):
    """Masked autoencoder: `encoder` (ViTEncoder) + `decoder` (MAEDecoder); see module docstring."""

    def __init__(self, *, image_size: int | tuple[int, int] = 64, patch_size: int | None = None,
                 in_channels: int = 1, variant: str = "S", width: int | None = None,
                 depth: int | None = None, num_heads: int | None = None, mlp_dim: int | None = None,
                 mask_ratio: float = DEFAULT_MASK_RATIO, norm_pix_loss: bool = False,
                 decoder_width: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
                 decoder_mlp_dim: int | None = None, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.encoder = ViTEncoder(image_size=image_size, patch_size=patch_size,
                                  in_channels=in_channels, variant=variant, width=width, depth=depth,
                                  num_heads=num_heads, mlp_dim=mlp_dim, dtype=dtype, rngs=rngs)
        num_kept(self.encoder.num_patches, mask_ratio)   # fail now, not at the first call
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.patch_size = self.encoder.patch_size
        patch_dim = self.patch_size ** 2 * in_channels
        self.decoder = MAEDecoder(self.encoder.width, patch_dim, self.encoder.grid,
                                  width=decoder_width, depth=decoder_depth, num_heads=decoder_heads,
                                  mlp_dim=decoder_mlp_dim, dtype=dtype, rngs=rngs)

    def forward_masked(self, images: Array, rng: Array, mask_ratio: float | None = None
                       ) -> tuple[Array, Array]:
        """Predicted patches (B, N, p*p*C) float32 and mask (B, N) (1 = masked) for a fresh masking."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        tokens = self.encoder.embed_patches(images)
        keep, mask, restore = random_masking(rng, self.encoder.num_patches, images.shape[0], ratio)
        latent = self.encoder.encode_tokens(gather_tokens(tokens, keep))
        return self.decoder(latent, restore), mask

    def __call__(self, images: Array, rng: Array, mask_ratio: float | None = None) -> MAEOutput:
        """images (B, H, W, C), rng key -> MAEOutput(loss (), pred (B, N, p*p*C), mask (B, N))."""
        pred, mask = self.forward_masked(images, rng, mask_ratio)
        loss = mae_loss(pred, patchify(images, self.patch_size), mask, self.norm_pix_loss)
        return MAEOutput(loss, pred, mask)

    def reconstruct(self, images: Array, rng: Array, mask_ratio: float | None = None) -> dict[str, Array]:
        """Images for reconstruction panels and the per-image masked-pixel MSE.

        Returns, all float32: "masked_input" (B, H, W, C), the input with masked
        patches set to 0; "reconstruction" (B, H, W, C), every predicted patch;
        "pasted" (B, H, W, C), visible input patches with predictions in the
        masked ones; "mask" (B, H, W, C), 1 on masked pixels; "masked_mse" (B,),
        pixel MSE of the prediction over each image's masked patches. With
        `norm_pix_loss` the predictions are per-patch normalised, so they are
        shown de-normalised with each true patch's mean and standard deviation
        (as MAE's own figures do): the masked-pixel MSE then measures structure,
        not the patch brightness, which comes from the target.
        """
        images = images.astype(jnp.float32)
        pred, mask = self.forward_masked(images, rng, mask_ratio)
        target = patchify(images, self.patch_size)
        if self.norm_pix_loss:
            mean = jnp.mean(target, axis=-1, keepdims=True)
            std = jnp.sqrt(jnp.var(target, axis=-1, keepdims=True, ddof=1) + NORM_PIX_EPSILON)
            pred = pred * std + mean
        patch_mask = mask[..., None]
        per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
        masked_mse = jnp.sum(per_patch * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        to_image = lambda patches: unpatchify(patches, self.patch_size, self.encoder.grid)  # noqa: E731
        return {
            "masked_input": to_image(target * (1.0 - patch_mask)),
            "reconstruction": to_image(pred),
            "pasted": to_image(target * (1.0 - patch_mask) + pred * patch_mask),
            "mask": to_image(jnp.broadcast_to(patch_mask, target.shape)),
            "masked_mse": masked_mse,
        }


@register("mae")
def mae(*, rngs: nnx.Rngs, **kwargs: Any) -> MAE:
    """Masked autoencoder; kwargs as `MAE` (image_size, patch_size, variant, mask_ratio, decoder_*, ...)."""
    return MAE(rngs=rngs, **kwargs)
