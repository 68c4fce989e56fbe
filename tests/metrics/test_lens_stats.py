"""lensjax.metrics.lens_stats: histogram distance and power spectra.

References: scipy.spatial.distance.jensenshannon (base 2) and hand-worked
histograms; Parseval's theorem; the flat spectrum of white noise; the spectral
line of a sinusoid at a known frequency in 1/arcsec; an explicit per-mode loop
for the radial binning.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.spatial.distance

from lensjax.metrics import lens_stats


# ----------------------------------------------------------------------------
# Pixel histograms
# ----------------------------------------------------------------------------

def test_histogram_distance_zero_for_identical_sets_and_positive_for_shifted():
    rng = np.random.default_rng(0)
    images = rng.beta(2, 5, size=(8, 16, 16, 1))
    assert lens_stats.pixel_histogram_distance(images, images) == 0.0
    # Same distribution in a different order / grouping of images: still 0.
    assert lens_stats.pixel_histogram_distance(images, images[::-1].reshape(4, 32, 16)) == 0.0
    shifted = np.clip(images + 0.1, 0, 1)
    assert lens_stats.pixel_histogram_distance(images, shifted) > 0.1


def test_histogram_distance_hand_checked_values():
    # All pixels 0.1 vs all 0.9: disjoint supports -> distance 1 bit.
    a = np.full((2, 4, 4), 0.1)
    b = np.full((3, 4, 4), 0.9)
    assert lens_stats.pixel_histogram_distance(a, b, bins=10) == pytest.approx(1.0)
    # p = (1/2, 1/2, 0), q = (0, 1/2, 1/2) over three bins: m = (1/4, 1/2, 1/4),
    # KL(p||m) = KL(q||m) = 1/2 bit -> JSD = 1/2, distance = sqrt(1/2).
    a = np.array([[[0.1, 0.5]]])
    b = np.array([[[0.5, 0.9]]])
    assert lens_stats.pixel_histogram_distance(a, b, bins=3) == pytest.approx(np.sqrt(0.5))


def test_histogram_distance_matches_scipy_jensenshannon():
    rng = np.random.default_rng(1)
    a, b = rng.beta(2, 5, size=(4, 20, 20)), rng.beta(2.5, 4, size=(6, 20, 20))
    _, p = lens_stats.pixel_histogram(a, bins=32)
    _, q = lens_stats.pixel_histogram(b, bins=32)
    expected = scipy.spatial.distance.jensenshannon(p, q, base=2)
    assert lens_stats.pixel_histogram_distance(a, b, bins=32) == pytest.approx(expected, rel=1e-10)


def test_out_of_range_pixels_go_to_edge_bins():
    edges, probs = lens_stats.pixel_histogram(np.array([[[-0.5, 0.25, 1.5, 0.75]]]), bins=4)
    np.testing.assert_allclose(edges, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(probs, [0.25, 0.25, 0.0, 0.5])


# ----------------------------------------------------------------------------
# Power spectra
# ----------------------------------------------------------------------------

def test_parseval():
    rng = np.random.default_rng(2)
    images = rng.uniform(size=(3, 24, 40))
    scale = 0.05
    ky, kx, power = lens_stats.power_spectrum_2d(images, scale)
    dkx, dky = 1 / (40 * scale), 1 / (24 * scale)
    np.testing.assert_allclose(np.diff(np.sort(kx)), dkx, rtol=1e-12)
    np.testing.assert_allclose(power.sum(axis=(1, 2)) * dkx * dky, (images ** 2).mean(axis=(1, 2)),
                               rtol=1e-12)


def test_radial_binning_matches_explicit_loop():
    rng = np.random.default_rng(3)
    images = rng.normal(size=(2, 12, 16, 1))
    scale = 0.1
    k, radial = lens_stats.radial_power_spectrum(images, scale)
    bin_width = 1 / (12 * scale)  # 1 / (shorter side in arcsec)
    sums, counts = {}, {}
    for i in range(12):
        for j in range(16):
            cycles_y = i if i < 6 else i - 12  # cycles across the image
            cycles_x = j if j < 8 else j - 16
            # |k| / bin_width = hypot(cycles_x * 12 / 16, cycles_y), rounded half up.
            b = int(np.floor(np.hypot(cycles_x * 0.75, cycles_y) + 0.5))
            p = np.mean([abs(np.fft.fft2(im[..., 0])[i, j]) ** 2 for im in images])
            p *= scale ** 2 / (12 * 16)
            sums[b] = sums.get(b, 0.0) + p
            counts[b] = counts.get(b, 0) + 1
    bins = sorted(sums)
    np.testing.assert_allclose(k, np.array(bins) * bin_width, rtol=1e-12)
    np.testing.assert_allclose(radial, [sums[b] / counts[b] for b in bins], rtol=1e-10)
    # Mode counts times mean power integrate to <x^2> (Parseval through the bins).
    total = sum(sums[b] for b in bins) / (12 * scale * 16 * scale)
    assert total == pytest.approx(np.mean(images ** 2), rel=1e-10)


def test_white_noise_is_flat_and_independent_sets_have_ratio_one():
    rng = np.random.default_rng(4)
    sigma, scale, size = 0.3, 0.08, 64
    a = sigma * rng.normal(size=(16, size, size))
    b = sigma * rng.normal(size=(16, size, size, 1))
    k, power = lens_stats.radial_power_spectrum(a, scale)
    bin_index = np.rint(k * size * scale)
    # Bins 16..32 (inside Nyquist) hold >= ~50 independent modes per image, so
    # their means scatter by ~4%; outer corner bins and bin 1 hold only a few.
    many_modes = (bin_index >= 16) & (bin_index <= size // 2)
    inside_nyquist = (bin_index >= 1) & (bin_index <= size // 2)
    np.testing.assert_allclose(power[many_modes], sigma ** 2 * scale ** 2, rtol=0.15)
    k2, ratio = lens_stats.power_spectrum_ratio(a, b, scale)
    np.testing.assert_array_equal(k, k2)
    assert np.all((ratio[inside_nyquist] > 0.5) & (ratio[inside_nyquist] < 2.0))
    assert np.median(ratio[inside_nyquist]) == pytest.approx(1.0, abs=0.05)
    np.testing.assert_allclose(ratio[many_modes], 1.0, atol=0.2)


def test_sinusoid_peaks_at_its_frequency():
    scale, size, cycles = 0.1, 64, 8  # 8 cycles over 6.4 arcsec: 1.25 / arcsec
    x = np.arange(size) * scale
    yy, xx = np.meshgrid(x, x, indexing="ij")
    # A wave along a diagonal direction: |k| = hypot(1.25, 1.25 * 3/4).
    kx, ky = cycles / (size * scale), 6 / (size * scale)
    image = 0.5 + 0.4 * np.sin(2 * np.pi * (kx * xx + ky * yy))
    k, power = lens_stats.radial_power_spectrum(image[None], scale)
    nonzero = k > 0
    peak = k[nonzero][np.argmax(power[nonzero])]
    assert peak == pytest.approx(np.hypot(kx, ky), abs=0.5 / (size * scale))
    assert peak == pytest.approx(1.5625, abs=0.08)


def test_errors():
    with pytest.raises(ValueError, match="image sizes differ"):
        lens_stats.power_spectrum_ratio(np.zeros((2, 8, 8)), np.zeros((2, 8, 6)), 0.1)
    with pytest.raises(ValueError, match="single-channel"):
        lens_stats.radial_power_spectrum(np.zeros((2, 8, 8, 3)), 0.1)
    with pytest.raises(ValueError, match="pixel_scale_arcsec"):
        lens_stats.radial_power_spectrum(np.zeros((2, 8, 8)), 0.0)
    with pytest.raises(ValueError, match="range"):
        lens_stats.pixel_histogram(np.zeros((1, 4, 4)), range=(1.0, 0.0))
