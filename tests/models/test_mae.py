"""Masked autoencoder of lensjax.models.mae: masking, loss, model and warm starts.

Masking invariants are checked on every sample (kept and masked patches
partition the grid, counts follow the ratio, `restore` undoes the shuffle, masks
are unbiased); the loss against a numpy reference and by invariance (it ignores
predictions on visible patches); the model by invariance (predictions do not
depend on the pixels of masked patches, which the encoder must never see);
optimisation by real optax steps; warm starts by loading MAE parameters into a
classifier and a super-resolution model with lensjax.checkpointing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lensjax.models import get_model, mae, vit
from tests.models.test_vit import (adam_losses, encoder_param_count, param_count, run,
                                   transformer_param_count)

TINY = dict(width=32, depth=2, num_heads=2)
SMALL_MAE = dict(image_size=16, patch_size=4, width=32, depth=1, num_heads=2, decoder_width=16,
                 decoder_depth=1, decoder_heads=2)


def _images(batch: int, size: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(batch, size, size, 1)),
                       dtype=jnp.float32)


def _pixel_mask(mask: jax.Array, patch_size: int) -> np.ndarray:
    """Patch mask (B, rows*cols) of a square grid -> pixel mask (B, H, W, 1)."""
    mask = np.asarray(mask)
    side = int(np.sqrt(mask.shape[1]))
    grid = mask.reshape(-1, side, side)
    return np.repeat(np.repeat(grid, patch_size, 1), patch_size, 2)[..., None]


@pytest.fixture(scope="module")
def small_mae() -> mae.MAE:
    return get_model("mae", rngs=nnx.Rngs(0), **SMALL_MAE)


# ----------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("num_patches, ratio, kept", [
    (64, 0.75, 16), (49, 0.75, 12), (100, 0.9, 10), (10, 0.0, 10), (16, 0.5, 8), (64, 0.99, 0),
])
def test_num_kept_is_the_floor_of_the_visible_fraction(num_patches, ratio, kept):
    if kept == 0:
        with pytest.raises(ValueError, match="no visible patch"):
            mae.num_kept(num_patches, ratio)
    else:
        assert mae.num_kept(num_patches, ratio) == kept


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_unit_interval_raises(ratio):
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        mae.random_masking(jax.random.key(0), 16, 2, ratio)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        get_model("mae", rngs=nnx.Rngs(0), mask_ratio=ratio, **SMALL_MAE)


@pytest.mark.parametrize("num_patches, ratio", [(64, 0.75), (49, 0.6), (16, 0.0)])
def test_masking_partitions_the_patches(num_patches, ratio):
    batch = 5
    keep, mask, restore = (np.asarray(a) for a in
                           mae.random_masking(jax.random.key(3), num_patches, batch, ratio))
    kept = mae.num_kept(num_patches, ratio)
    assert keep.shape == (batch, kept) and mask.shape == restore.shape == (batch, num_patches)
    for b in range(batch):
        visible = set(keep[b].tolist())
        masked = set(np.flatnonzero(mask[b] == 1).tolist())
        assert len(visible) == kept and len(masked) == num_patches - kept
        assert visible.isdisjoint(masked) and visible | masked == set(range(num_patches))
        assert set(np.unique(mask[b]).tolist()) <= {0.0, 1.0}
        np.testing.assert_array_equal(np.sort(restore[b]), np.arange(num_patches))
        # The shuffle that restore undoes starts with the visible patches.
        shuffle = np.argsort(restore[b])
        np.testing.assert_array_equal(shuffle[:kept], keep[b])
        np.testing.assert_array_equal(shuffle[restore[b]], np.arange(num_patches))


def test_restore_puts_visible_tokens_and_mask_tokens_in_place():
    batch, num_patches, ratio = 3, 16, 0.75
    keep, mask, restore = mae.random_masking(jax.random.key(7), num_patches, batch, ratio)
    tokens = jax.random.normal(jax.random.key(8), (batch, num_patches, 4))
    mask_token = jnp.full((batch, num_patches - keep.shape[1], 4), 99.0)
    shuffled = jnp.concatenate([mae.gather_tokens(tokens, keep), mask_token], axis=1)
    unshuffled = np.asarray(mae.gather_tokens(shuffled, restore))
    mask = np.asarray(mask).astype(bool)
    np.testing.assert_array_equal(unshuffled[~mask], np.asarray(tokens)[~mask])
    np.testing.assert_array_equal(unshuffled[mask], 99.0)


def test_masks_depend_on_the_key_and_differ_between_samples():
    _, mask_a, _ = mae.random_masking(jax.random.key(0), 64, 4, 0.75)
    _, mask_b, _ = mae.random_masking(jax.random.key(1), 64, 4, 0.75)
    _, mask_a2, _ = mae.random_masking(jax.random.key(0), 64, 4, 0.75)
    mask_a, mask_b = np.asarray(mask_a), np.asarray(mask_b)
    np.testing.assert_array_equal(mask_a, np.asarray(mask_a2))
    assert not np.array_equal(mask_a, mask_b)
    assert len({row.tobytes() for row in mask_a}) == 4


def test_every_patch_is_masked_with_probability_ratio():
    batch, num_patches, ratio = 4000, 16, 0.75
    _, mask, _ = mae.random_masking(jax.random.key(11), num_patches, batch, ratio)
    frequency = np.asarray(mask).mean(axis=0)
    sigma = np.sqrt(ratio * (1 - ratio) / batch)
    assert np.all(np.abs(frequency - ratio) < 5 * sigma), frequency


# ----------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------

def _loss_inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pred, target (3, 16, 12) and a mask (3, 16) with 12 masked patches per row."""
    rng = np.random.default_rng(seed)
    pred = rng.normal(size=(3, 16, 12)).astype(np.float32)
    target = (rng.normal(size=(3, 16, 12)) * 2.0 + 0.5).astype(np.float32)
    mask = np.ones((3, 16), np.float32)
    for row in mask:
        row[rng.choice(16, 4, replace=False)] = 0.0
    return pred, target, mask


def numpy_mae_loss(pred, target, mask, norm_pix_loss: bool) -> float:
    """Reference: per-patch MSE averaged over the masked patches, float64."""
    pred, target, mask = (np.asarray(a, np.float64) for a in (pred, target, mask))
    if norm_pix_loss:
        target = ((target - target.mean(-1, keepdims=True))
                  / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6))
    return float(((pred - target) ** 2).mean(-1)[mask == 1].mean())


def numpy_patchify(images: np.ndarray, p: int) -> np.ndarray:
    batch, height, width, channels = images.shape
    x = images.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, -1, p * p * channels)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_matches_numpy(norm_pix_loss):
    loss = mae.mae_loss(*_loss_inputs(), norm_pix_loss=norm_pix_loss)
    assert float(loss) == pytest.approx(numpy_mae_loss(*_loss_inputs(), norm_pix_loss), rel=1e-5)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_uses_masked_patches_only(norm_pix_loss):
    pred, target, mask = _loss_inputs()
    loss = float(mae.mae_loss(pred, target, mask, norm_pix_loss))
    noise = np.random.default_rng(5).normal(size=pred.shape).astype(np.float32) * 10.0
    visible_changed = pred + noise * (1.0 - mask)[..., None]
    masked_changed = pred + noise * mask[..., None]
    assert float(mae.mae_loss(visible_changed, target, mask, norm_pix_loss)) == pytest.approx(loss,
                                                                                           rel=1e-6)
    assert abs(float(mae.mae_loss(masked_changed, target, mask, norm_pix_loss)) - loss) > 1.0
    assert float(mae.mae_loss(pred, target, np.zeros_like(mask))) == 0.0


def test_normalized_patches_have_zero_mean_and_unit_variance():
    _, target, _ = _loss_inputs()
    normalized = np.asarray(mae.normalize_patches(target), np.float64)
    np.testing.assert_allclose(normalized.mean(-1), 0.0, atol=1e-5)
    # unit variance up to eps / var (var ~ 4 here)
    np.testing.assert_allclose(normalized.var(-1, ddof=1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------

def test_shapes_parameters_and_loss_on_64px_images():
    model = get_model("mae", rngs=nnx.Rngs(0), image_size=64, patch_size=8, **TINY)
    images = _images(2, 64)
    out = run(model, "__call__", images, jax.random.key(1))
    assert isinstance(out, mae.MAEOutput)
    assert out.loss.shape == () and out.loss.dtype == jnp.float32
    assert out.pred.shape == (2, 64, 64) and out.mask.shape == (2, 64)
    np.testing.assert_array_equal(np.asarray(out.mask).sum(1), 48)
    expected = numpy_mae_loss(out.pred, numpy_patchify(np.asarray(images), 8), out.mask, False)
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    # No position-embedding tables among the parameters (decoder 128 wide, 2 blocks, 4 heads).
    decoder = 32 * 128 + 128 + 128 + transformer_param_count(128, 2, 512) + 2 * 128 + 128 * 64 + 64
    assert param_count(model) == encoder_param_count(32, 2, 128, 8, 1) + decoder
    assert jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))) == []


def test_predictions_ignore_the_pixels_of_masked_patches(small_mae):
    images = _images(2, 16)
    rng = jax.random.key(4)
    out = run(small_mae, "__call__", images, rng)
    pixel_mask = _pixel_mask(out.mask, 4)
    noise = 5.0 * np.random.default_rng(9).normal(size=images.shape).astype(np.float32)
    same = run(small_mae, "__call__", images + noise * pixel_mask, rng)
    np.testing.assert_array_equal(np.asarray(same.mask), np.asarray(out.mask))
    np.testing.assert_allclose(np.asarray(same.pred), np.asarray(out.pred), atol=1e-5)
    changed = run(small_mae, "__call__", images + noise * (1 - pixel_mask), rng)
    assert np.max(np.abs(np.asarray(changed.pred) - np.asarray(out.pred))) > 1e-2


def test_norm_pix_loss_uses_normalized_targets_and_reconstructs_panels():
    model = get_model("mae", rngs=nnx.Rngs(0), norm_pix_loss=True, **SMALL_MAE)
    images = _images(2, 16)
    rng = jax.random.key(2)
    out = run(model, "__call__", images, rng)
    target = numpy_patchify(np.asarray(images, np.float64), 4)
    assert float(out.loss) == pytest.approx(numpy_mae_loss(out.pred, target, out.mask, True), rel=1e-5)
    assert abs(float(out.loss) - numpy_mae_loss(out.pred, target, out.mask, False)) > 1e-3
    # Same key, same mask: the panels show this pass's predictions de-normalised
    # with each true patch's mean and standard deviation.
    panels = {k: np.asarray(v) for k, v in run(model, "reconstruct", images, rng).items()}
    mean, std = target.mean(-1), np.sqrt(target.var(-1, ddof=1) + 1e-6)
    np.testing.assert_allclose(numpy_patchify(panels["reconstruction"], 4),
                               np.asarray(out.pred) * std[..., None] + mean[..., None], atol=1e-5)
    np.testing.assert_array_equal(numpy_patchify(panels["mask"], 4)[..., 0], np.asarray(out.mask))
    _check_panels(panels, np.asarray(images))


def _check_panels(panels: dict, images: np.ndarray) -> None:
    for name in ("masked_input", "reconstruction", "pasted", "mask"):
        assert panels[name].shape == images.shape
    masked = panels["mask"] == 1
    np.testing.assert_array_equal(panels["masked_input"][masked], 0.0)
    np.testing.assert_array_equal(panels["masked_input"][~masked], images[~masked])
    np.testing.assert_array_equal(panels["pasted"][~masked], images[~masked])
    np.testing.assert_array_equal(panels["pasted"][masked], panels["reconstruction"][masked])
    for b in range(images.shape[0]):
        expected = np.mean((panels["reconstruction"][b] - images[b])[masked[b]] ** 2)
        assert panels["masked_mse"][b] == pytest.approx(expected, rel=1e-5)


def test_reconstruction_panels_with_another_mask_ratio(small_mae):
    images = _images(2, 16)
    # The per-call mask ratio overrides the configured 0.75.
    panels = {k: np.asarray(v) for k, v in run(small_mae, "reconstruct", images, jax.random.key(3),
                                               mask_ratio=0.5).items()}
    assert (panels["mask"] == 1).mean() == pytest.approx(0.5)
    _check_panels(panels, np.asarray(images))


def test_optax_steps_lower_the_loss(small_mae):
    images = _images(4, 16)
    rng = jax.random.key(0)
    losses = adam_losses(small_mae, lambda model: model(images, rng).loss, steps=6)
    assert losses[-1] < 0.7 * losses[0], losses


# ----------------------------------------------------------------------------
# Warm starts: MAE encoder -> classifier / super-resolution, by parameter path
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["vit", "vit_superres"])
def test_mae_encoder_loads_into_downstream_models(target, small_mae):
    from lensjax import checkpointing
    encoder_kwargs = {k: v for k, v in SMALL_MAE.items() if not k.startswith("decoder")}
    if target == "vit":
        model = get_model("vit", num_classes=3, rngs=nnx.Rngs(1), **encoder_kwargs)
    else:   # 15 px LR images, padded to 16 for patch 4
        encoder_kwargs.pop("image_size")
        model = get_model("vit_superres", rngs=nnx.Rngs(1), lr_size=15, decoder_features=4,
                          **encoder_kwargs)
    params = nnx.state(model, nnx.Param)
    source = nnx.to_pure_dict(nnx.state(small_mae, nnx.Param))
    pure, copied = checkpointing.warm_start_params(nnx.to_pure_dict(params), source)
    encoder_paths = {"/" + "/".join(map(str, path))
                     for path, _ in nnx.to_flat_state(nnx.state(model.encoder, nnx.Param))}
    assert {path.removeprefix("/encoder") for path in copied} == encoder_paths
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(model, params)
    images = _images(2, 16)
    np.testing.assert_allclose(np.asarray(run(model.encoder, "__call__", images)),
                               np.asarray(run(small_mae.encoder, "__call__", images)), atol=1e-6)
