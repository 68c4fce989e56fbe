"""MSE, PSNR, SSIM and the bicubic baseline of lensjax.metrics.image_quality.

References: scikit-image's `peak_signal_noise_ratio`, `mean_squared_error` and
`structural_similarity(..., data_range=1.0, win_size=7)` in float64 (whose
defaults, K1=0.01, K2=0.03, a uniform window and sample covariance, are the
EVALUATION.md convention), on random, smooth and lensing-like images; and for
bicubic upsampling an independent numpy implementation of the documented
convention (Keys a=-0.5, half-pixel centres, out-of-image taps dropped and the
rest renormalised) plus exactness on linear and quadratic ramps away from the
border, which cubic convolution reproduces.
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from lensjax.metrics import image_quality as iq


def _image_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Named (pred, target) stacks (N, H, W) in float64."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:33] / 40.0
    blobs = np.stack([np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s ** 2))
                      for cx, cy, s in rng.uniform([0.2, 0.2, 0.05], [0.6, 0.8, 0.2], (3, 3))])
    radius = np.hypot(xx - 0.4, yy - 0.5)
    ring = np.exp(-((radius - 0.25) / 0.03) ** 2)                      # an Einstein-ring-like arc
    target_ring = np.stack([ring, 0.3 * ring + 0.2, ring * (xx > 0.4)])
    return {
        "uniform noise": (rng.uniform(size=(3, 40, 33)), rng.uniform(size=(3, 40, 33))),
        "smooth + noise": (np.clip(blobs + 0.05 * rng.normal(size=blobs.shape), 0, 1), blobs),
        "ring, narrow range": (np.clip(target_ring + 0.02 * rng.normal(size=target_ring.shape), 0, 1),
                               target_ring),
    }


@pytest.mark.parametrize("name", list(_image_pairs()))
@pytest.mark.parametrize("trailing_channel", [False, True])
def test_batched_metrics_match_scikit_image(name, trailing_channel):
    pred, target = _image_pairs()[name]
    args = (pred[..., None], target[..., None]) if trailing_channel else (pred, target)
    mses = np.asarray(iq.batch_mse(*args))
    psnrs = np.asarray(iq.batch_psnr(*args))
    ssims = np.asarray(iq.batch_ssim(*args))
    assert mses.shape == psnrs.shape == ssims.shape == (3,)
    for i in range(3):
        assert mses[i] == pytest.approx(mean_squared_error(target[i], pred[i]), rel=1e-5)
        assert psnrs[i] == pytest.approx(peak_signal_noise_ratio(target[i], pred[i], data_range=1.0),
                                         abs=1e-4)
        assert ssims[i] == pytest.approx(
            structural_similarity(pred[i], target[i], data_range=1.0, win_size=7), abs=1e-5)


def test_single_image_functions_and_other_settings():
    pred, target = _image_pairs()["smooth + noise"]
    assert iq.ssim(pred[0], target[0]) == pytest.approx(
        structural_similarity(pred[0], target[0], data_range=1.0), abs=1e-5)
    assert iq.ssim(pred[1, ..., None], target[1, ..., None], data_range=2.0, win_size=5) == pytest.approx(
        structural_similarity(pred[1], target[1], data_range=2.0, win_size=5), abs=1e-5)
    assert iq.psnr(pred[2], target[2], data_range=2.0) == pytest.approx(
        peak_signal_noise_ratio(target[2], pred[2], data_range=2.0), abs=1e-4)
    assert iq.mse(pred[2], target[2]) == pytest.approx(mean_squared_error(target[2], pred[2]), rel=1e-5)


def test_ssim_uses_the_given_data_range_not_the_image_range():
    pred, target = _image_pairs()["ring, narrow range"]
    fixed = iq.ssim(pred[1], target[1])
    per_image = structural_similarity(pred[1], target[1], data_range=np.ptp(target[1]))
    assert fixed == pytest.approx(structural_similarity(pred[1], target[1], data_range=1.0), abs=1e-5)
    assert abs(fixed - per_image) > 1e-3


def test_identical_images_and_symmetry():
    pred, target = _image_pairs()["uniform noise"]
    assert iq.psnr(target[0], target[0]) == np.inf
    assert iq.mse(target[0], target[0]) == 0.0
    assert iq.ssim(target[0], target[0]) == pytest.approx(1.0, abs=1e-6)
    assert iq.ssim(pred[0], target[0]) == pytest.approx(iq.ssim(target[0], pred[0]), abs=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: iq.batch_mse(np.zeros((2, 8, 8)), np.zeros((2, 8, 9))), "shapes differ"),
    (lambda: iq.batch_ssim(np.zeros((2, 6, 8)), np.zeros((2, 6, 8))), "smaller than win_size"),
    (lambda: iq.batch_ssim(np.zeros((1, 9, 9)), np.zeros((1, 9, 9)), win_size=4), "odd"),
    (lambda: iq.batch_psnr(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3))), r"\(N, H, W, 1\)"),
    (lambda: iq.psnr(np.zeros((2, 8, 8)), np.zeros((2, 8, 8))), r"\(H, W\) or \(H, W, 1\)"),
    (lambda: iq.bicubic_upsample(np.zeros((1, 4, 4)), 1.5), "positive integer"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------
# Bicubic baseline
# ----------------------------------------------------------------------------

def keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys (1981) cubic convolution kernel."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_weights(size: int, factor: int) -> np.ndarray:
    """(size*factor, size) interpolation matrix: half-pixel centres, taps outside dropped, renormalised."""
    out = np.arange(size * factor)
    source = (out + 0.5) / factor - 0.5
    weights = keys_cubic(source[:, None] - np.arange(size)[None, :])
    return weights / weights.sum(axis=1, keepdims=True)


def test_bicubic_matches_an_independent_implementation():
    images = np.random.default_rng(1).uniform(size=(2, 9, 7, 1))
    rows, cols = bicubic_weights(9, 2), bicubic_weights(7, 2)
    expected = np.einsum("ih,jw,nhwc->nijc", rows, cols, images)
    out = np.asarray(iq.bicubic_upsample(images, 2))
    assert out.shape == (2, 18, 14, 1)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    out3 = np.asarray(iq.bicubic_upsample(images[..., 0], 3))     # (N, h, w) and factor 3
    expected3 = np.einsum("ih,jw,nhw->nij", bicubic_weights(9, 3), bicubic_weights(7, 3), images[..., 0])
    np.testing.assert_allclose(out3, expected3, atol=1e-5)


@pytest.mark.parametrize("factor", [2, 3])
def test_bicubic_is_exact_on_ramps_away_from_the_border(factor):
    size = 12
    coords = np.arange(size, dtype=np.float64)
    linear = (0.03 * coords[:, None] + 0.05 * coords[None, :] + 0.1)[None, ..., None]
    quadratic = (0.004 * (coords[:, None] - 5.0) ** 2 + 0.002 * coords[None, :] ** 2)[None, ..., None]
    fine = (np.arange(size * factor) + 0.5) / factor - 0.5     # source coordinate of each output pixel
    inner = slice(2 * factor, (size - 2) * factor)             # at least 2 LR pixels from the border
    expected_linear = 0.03 * fine[:, None] + 0.05 * fine[None, :] + 0.1
    expected_quadratic = 0.004 * (fine[:, None] - 5.0) ** 2 + 0.002 * fine[None, :] ** 2
    for image, expected in ((linear, expected_linear), (quadratic, expected_quadratic)):
        out = np.asarray(iq.bicubic_upsample(image, factor))[0, ..., 0]
        np.testing.assert_allclose(out[inner, inner], expected[inner, inner], atol=1e-5)
