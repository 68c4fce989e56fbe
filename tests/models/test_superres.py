"""ViT super-resolution network of lensjax.models.superres.

Checks: pixel shuffle against its index definition; padding arithmetic; shapes
at 75 -> 150 with and without padding; an untrained model is exactly the
bicubic baseline (zero-initialised last convolution); the crop after padding is
aligned with the LR pixels (a hand-set decoder that copies LR pixels must give
their nearest-neighbour upsampling); real optax steps lower the SR loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lensjax.metrics.image_quality import bicubic_upsample
from lensjax.models import get_model, superres
from tests.models.test_vit import adam_losses, run

TINY = dict(width=32, depth=2, num_heads=2)
# Tests share these two configurations so that compiled code is reused.
SR75 = dict(lr_size=75, scale=2, decoder_features=8, **TINY)
SR10 = dict(lr_size=10, scale=2, variant="S/5", decoder_features=4, width=16, depth=1, num_heads=2)


def _lr(batch: int, size: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(batch, size, size, 1)),
                       dtype=jnp.float32)


def test_pixel_shuffle_matches_its_definition():
    r, channels = 3, 2
    x = np.random.default_rng(0).normal(size=(2, 4, 5, r * r * channels)).astype(np.float32)
    y = np.asarray(superres.pixel_shuffle(jnp.asarray(x), r))
    assert y.shape == (2, 12, 15, channels)
    for h in range(4):
        for w in range(5):
            for i in range(r):
                for j in range(r):
                    offset = (i * r + j) * channels
                    np.testing.assert_array_equal(y[:, h * r + i, w * r + j],
                                                  x[:, h, w, offset:offset + channels])
    with pytest.raises(ValueError, match="cannot be shuffled"):
        superres.pixel_shuffle(jnp.zeros((1, 2, 2, 5)), 2)


@pytest.mark.parametrize("size, multiple, expected", [(75, 5, (0, 0)), (75, 8, (2, 3)),
                                                      (75, 4, (0, 1)), (64, 8, (0, 0))])
def test_padding_to_multiple(size, multiple, expected):
    assert superres.padding_to_multiple(size, multiple) == expected


@pytest.mark.parametrize("patch_size, pad, grid", [(5, (0, 0), (15, 15)), (8, (2, 3), (10, 10))])
def test_shapes_and_untrained_model_is_bicubic(patch_size, pad, grid):
    model = get_model("vit_superres", rngs=nnx.Rngs(0), patch_size=patch_size, **SR75)
    assert model.pad == pad and model.encoder.grid == grid
    lr = _lr(2, 75)
    out = run(model, "__call__", lr)
    assert out.shape == (2, 150, 150, 1) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(bicubic_upsample(lr, 2)), atol=1e-6)


def test_crop_after_padding_is_aligned_with_the_lr_pixels():
    model = get_model("vit_superres", rngs=nnx.Rngs(1), patch_size=8, **SR75)
    assert model.pad == (2, 3)
    # Decoder that ignores the tokens and copies the LR pixel into every output:
    # the residual must be gelu(nearest-neighbour upsampled LR), pixel for pixel.
    model.patch_upsample.kernel[...] = jnp.zeros_like(model.patch_upsample.kernel[...])
    model.patch_upsample.bias[...] = jnp.zeros_like(model.patch_upsample.bias[...])
    copy_lr = np.zeros(model.scale_upsample.kernel.shape, np.float32)
    copy_lr[1, 1, 8, :] = 1.0            # input channel 8 = the concatenated LR pixels
    model.scale_upsample.kernel[...] = jnp.asarray(copy_lr)
    model.scale_upsample.bias[...] = jnp.zeros_like(model.scale_upsample.bias[...])
    take_first = np.zeros(model.out.kernel.shape, np.float32)
    take_first[1, 1, 0, 0] = 1.0
    model.out.kernel[...] = jnp.asarray(take_first)
    lr = _lr(2, 75)
    residual = np.asarray(run(model, "__call__", lr)) - np.asarray(bicubic_upsample(lr, 2))
    nearest = np.repeat(np.repeat(np.asarray(lr), 2, 1), 2, 2)
    np.testing.assert_allclose(residual, np.asarray(jax.nn.gelu(nearest, approximate=False)), atol=1e-5)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="pad_mode"):
        get_model("vit_superres", rngs=nnx.Rngs(0), pad_mode="wrap", **TINY)
    with pytest.raises(ValueError, match="contradicts"):
        get_model("vit_superres", rngs=nnx.Rngs(0), variant="S/5", patch_size=8, **TINY)
    model = get_model("vit_superres", rngs=nnx.Rngs(0), **SR10)
    assert model.encoder.patch_size == 5 and model.encoder.grid == (2, 2)
    with pytest.raises(ValueError, match=r"\(B, 10, 10, 1\)"):
        model(jnp.zeros((1, 20, 20, 1)))


def test_optax_steps_lower_the_loss():
    model = get_model("vit_superres", rngs=nnx.Rngs(0), **SR10)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:20, 0:20] / 20.0
    hr = np.stack([np.sin(2 * np.pi * (a * xx + b * yy)) for a, b in rng.uniform(1, 3, (4, 2))])
    hr = jnp.asarray(0.5 + 0.4 * hr[..., None], jnp.float32)
    lr = hr.reshape(4, 10, 2, 10, 2, 1).mean(axis=(2, 4))
    losses = adam_losses(model, lambda m: jnp.mean(jnp.square(m(lr) - hr)), steps=8)
    assert losses[-1] < 0.9 * losses[0], losses
