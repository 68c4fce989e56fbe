"""lensjax.metrics.fid against independent computations.

References: scipy.linalg.sqrtm of s1 s2 (the textbook route) on random SPD
covariances; the closed form sum (sqrt(a_i) - sqrt(b_i))^2 for diagonal
covariances; for rank-deficient covariances (N < D) the identity
Tr((s1 s2)^{1/2}) = nuclear norm of X1c X2c^T / sqrt((n1 - 1)(n2 - 1)) on the
centred data matrices, which needs no matrix square root at all; np.cov for the
streaming statistics.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from lensjax.metrics import fid


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    assert np.max(np.abs(np.imag(covmean))) < 1e-6 * np.max(np.abs(covmean))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(np.real(covmean)))


@pytest.mark.parametrize("dim", [16, 33, 64])
def test_matches_scipy_sqrtm_on_random_gaussians(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    sigma1, sigma2 = _random_spd(rng, dim), _random_spd(rng, dim)
    expected = _scipy_frechet(mu1, sigma1, mu2, sigma2)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_diagonal_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, size=24), rng.uniform(0.1, 3.0, size=24)
    mu1, mu2 = rng.normal(size=24), rng.normal(size=24)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_equal_means_scaled_covariance():
    # N(0, I) vs N(0, c^2 I) in D dims: D (1 - c)^2.
    dim, c = 20, 1.7
    got = fid.frechet_distance(np.zeros(dim), np.eye(dim), np.zeros(dim), c ** 2 * np.eye(dim))
    assert got == pytest.approx(dim * (1 - c) ** 2, rel=1e-12)


def test_zero_for_a_set_against_itself_and_symmetric():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(200, 48)) @ rng.normal(size=(48, 48)) + 3.0
    other = rng.normal(size=(150, 48)) * 1.3
    assert fid.fid_from_features(features, features) <= 1e-6 * np.trace(np.cov(features.T))
    ab = fid.fid_from_features(features, other)
    assert ab > 1.0
    assert fid.fid_from_features(other, features) == pytest.approx(ab, rel=1e-10)


def test_rank_deficient_covariances_match_nuclear_norm_identity():
    rng = np.random.default_rng(3)
    n1, n2, dim = 10, 14, 40  # N < D: both covariances are singular
    x1 = rng.normal(size=(n1, dim)) + 0.5
    x2 = rng.normal(size=(n2, dim)) * 0.7
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    trace_sqrt = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    mu1, sigma1 = fid.gaussian_stats(x1)
    mu2, sigma2 = fid.gaussian_stats(x2)
    # Null directions carry round-off of order sqrt(eps) into the square roots.
    assert fid.trace_sqrt_product(sigma1, sigma2) == pytest.approx(trace_sqrt, rel=5e-8)
    diff = mu1 - mu2
    expected = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    assert fid.fid_from_features(x1, x2) == pytest.approx(expected, rel=5e-8)


def test_gaussian_stats_is_numpy_mean_and_cov():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(30, 5)).astype(np.float32)
    mu, sigma = fid.gaussian_stats(features)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64).T), rtol=1e-12)


def test_streaming_stats_equal_one_shot_stats():
    rng = np.random.default_rng(5)
    # A large common offset: raw sums of x x^T would lose digits here.
    features = rng.normal(size=(103, 12)) * 0.01 + 1e3
    stats = fid.FeatureStats()
    for start, stop in [(0, 1), (1, 40), (40, 40), (40, 97), (97, 103)]:
        stats.update(features[start:stop])
    assert stats.count == 103
    mu, sigma = stats.stats()
    ref_mu, ref_sigma = fid.gaussian_stats(features)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-13)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-9, atol=1e-12 * np.abs(ref_sigma).max())
    assert fid.fid_from_features(stats, features) == pytest.approx(0.0, abs=1e-9)


def test_merging_accumulators_equals_one_accumulator():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(17, 6)), rng.normal(size=(9, 6)) + 2.0
    merged = fid.FeatureStats().update(a).merge(fid.FeatureStats().update(b))
    ref_mu, ref_sigma = fid.gaussian_stats(np.concatenate([a, b]))
    mu, sigma = merged.stats()
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-13)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-12)


def test_errors():
    rng = np.random.default_rng(7)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid.gaussian_stats(rng.normal(size=(1, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid.FeatureStats().update(rng.normal(size=(1, 4))).stats()
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid.fid_from_features(rng.normal(size=(1, 4)), rng.normal(size=(5, 4)))
    with pytest.raises(ValueError, match="dimensions differ"):
        fid.fid_from_features(rng.normal(size=(5, 4)), rng.normal(size=(5, 3)))
    with pytest.raises(ValueError, match="dimensions differ"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"covariance \(D, D\)"):
        fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="positive semi-definite"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.diag([1.0, -0.5, 1.0]))
    with pytest.raises(ValueError, match="dimension 3"):
        fid.FeatureStats().update(rng.normal(size=(4, 4))).update(rng.normal(size=(4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        fid.gaussian_stats(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="matrix"):
        fid.gaussian_stats(np.zeros(5))
