"""Random draws and noise models of lensjax.sim.instrument vs scipy / lenstronomy / their formulae.

(a) Poisson draws: `poisson_from_uniform` is a deterministic map u -> count, so
    evaluating it on a fine stratified grid of u gives its exact distribution
    (up to 2^-22 per jump); that is compared with scipy.stats.poisson (total
    variation). Random draws from `poisson(key, rate)` are then checked for mean,
    variance and total variation against scipy with sampling-error allowances.
(b) Model I noise (SIMULATION.md): image_real = t (model + shot + background) with
    shot of variance model / t and background ~ N(0, rms^2); stored =
    Poisson(clip(image_real, 0)). Without clipping, the law of total variance gives
    E = t model and Var = E[image_real] + Var(image_real) = t model + (t model + t^2 rms^2)
    = 2 t model + t^2 rms^2. With model = 0 (pure clipped background, sigma = t rms):
    E = sigma / sqrt(2 pi), Var = E + sigma^2 / 2 - sigma^2 / (2 pi).
(c) SingleBand noise: mean = model, variance = background_noise^2 + model / t_total,
    with background_noise and the variance taken from lenstronomy's SingleBand.
(d) PyLensing sky + Poisson noise: counts ~ Poisson((image + sky) t), out = counts / t - sky:
    E = image, Var = (image + sky) / t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lenstronomy.SimulationAPI.ObservationConfig.HST import HST
from lenstronomy.SimulationAPI.observation_api import SingleBand
from scipy import stats

from lensjax.sim import instrument

RATES = (0.1, 2.0, 2.9, 3.0, 3.1, 5.0, 9.9, 10.0, 50.0, 1000.0)
NUM_SAMPLES = 2_000_000  # per rate; the sampling TV of an exact Poisson(1000) is ~0.0035 at this size

_poisson_from_uniform = jax.jit(instrument.poisson_from_uniform)
_poisson = jax.jit(instrument.poisson, static_argnames="exact")


def _total_variation(counts: np.ndarray, rate: float, weights=None) -> float:
    """TV distance between the empirical pmf of integer `counts` and scipy's Poisson(rate) pmf."""
    counts = counts.astype(np.int64)
    assert counts.min() >= 0
    top = max(int(counts.max()), int(stats.poisson.isf(1e-12, rate))) + 1
    empirical = np.bincount(counts, weights=weights, minlength=top)[:top]
    empirical = empirical / empirical.sum()
    reference = stats.poisson.pmf(np.arange(top), rate)
    return 0.5 * (np.abs(empirical - reference).sum() + stats.poisson.sf(top - 1, rate))


def _sampling_tv(rate: float, n: int) -> float:
    """Expected TV between n exact Poisson(rate) samples and the pmf: sum_k sqrt(2 p_k / (pi n)) / 2."""
    pmf = stats.poisson.pmf(np.arange(int(stats.poisson.isf(1e-12, rate)) + 1), rate)
    return 0.5 * float(np.sum(np.sqrt(2.0 * pmf * (1.0 - pmf) / (np.pi * n))))


def _assert_mean_var(samples: np.ndarray, mean: float, var: float, kurtosis_excess: float = 0.0,
                     num_se: float = 5.0, what: str = ""):
    """Sample mean and variance within num_se standard errors of the expected values.

    SE(mean) = sqrt(var / N); SE(var) = var sqrt((2 + kurtosis_excess) / N).
    """
    n = samples.size
    samples = samples.astype(np.float64)
    se_mean = np.sqrt(var / n)
    se_var = var * np.sqrt((2.0 + kurtosis_excess) / n)
    assert abs(samples.mean() - mean) <= num_se * se_mean, (
        f"{what}: mean {samples.mean():.6g} vs {mean:.6g} (SE {se_mean:.3g})")
    assert abs(samples.var() - var) <= num_se * se_var, (
        f"{what}: variance {samples.var():.6g} vs {var:.6g} (SE {se_var:.3g})")


# ----------------------------------------------------------------------------
# (a) Poisson draws
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("rate", RATES)
def test_poisson_from_uniform_distribution_matches_scipy(rate):
    """The exact law of poisson_from_uniform (stratified u grid) is within TV 0.003 of Poisson(rate).

    Below the switch rate (POISSON_INVERSION_MAX_RATE) the CDF inversion is exact, so the distance must vanish up to the
    grid resolution; above it the third-order Cornish-Fisher quantile is an
    approximation and the documented bound is TV < 0.003 (just above the switch,
    falling with the rate). Mean and variance of the law are checked too.
    """
    n = 2**22
    u = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n  # exact in float32
    counts = np.asarray(_poisson_from_uniform(u, jnp.full((n,), rate, jnp.float32)))
    assert np.all(counts == np.round(counts)) and counts.min() >= 0
    tv = _total_variation(counts, rate)
    if rate < instrument.POISSON_INVERSION_MAX_RATE:
        assert tv < 1e-5, f"exact inversion: TV {tv:.2e} at rate {rate}"
    else:
        assert tv < 0.003, f"TV {tv:.4f} at rate {rate}"
    np.testing.assert_allclose(counts.mean(), rate, rtol=1e-3)
    np.testing.assert_allclose(counts.var(), rate, rtol=1e-2)


@pytest.mark.parametrize("exact", [False, True])
def test_poisson_random_draws_match_scipy(exact):
    """poisson(key, rate): mean and variance within 5 SE and TV < 0.01 vs scipy, for every rate.

    N = 2e6 draws per rate (2.5e5 for the slower exact sampler, whose rate-1000
    TV is then dominated by sampling noise and is not judged).

    All rates are drawn in ONE call (a (len(RATES), N) rate array), as in an image
    whose pixels straddle the inversion / normal-quantile switch at POISSON_INVERSION_MAX_RATE.
    exact=True (jax.random.poisson) is held to the same checks.
    """
    rates = np.array(RATES, np.float32)
    n = NUM_SAMPLES if not exact else NUM_SAMPLES // 8
    draws = np.asarray(_poisson(jax.random.key(0), jnp.broadcast_to(rates[:, None], (len(rates), n)),
                                exact=exact))
    assert draws.dtype == np.float32 and draws.shape == (len(rates), n)
    for rate, row in zip(RATES, draws):
        # Poisson: var = rate, excess kurtosis = 1 / rate.
        _assert_mean_var(row, rate, rate, 1.0 / rate, what=f"rate {rate}")
        # Even exact Poisson samples sit a TV of ~_sampling_tv away from the pmf; the
        # 0.01 bound is only meaningful where that noise floor is well below it.
        if _sampling_tv(rate, n) < 0.005:
            tv = _total_variation(row, rate)
            assert tv < 0.01, f"rate {rate}: TV {tv:.4f}"
        else:
            assert exact and rate == 1000.0  # the only case too noisy to judge at this size


def test_poisson_keys_and_edge_rates():
    """Same key -> same draws, other key -> others; rate 0 gives 0; negative rates act as 0."""
    rate = jnp.full((1000,), 5.0, jnp.float32)
    a = np.asarray(_poisson(jax.random.key(1), rate, exact=False))
    b = np.asarray(_poisson(jax.random.key(1), rate, exact=False))
    c = np.asarray(_poisson(jax.random.key(2), rate, exact=False))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    zero = np.asarray(_poisson(jax.random.key(3), jnp.zeros((1000,)), exact=False))
    assert np.all(zero == 0)
    negative = np.asarray(_poisson(jax.random.key(3), jnp.full((1000,), -4.0), exact=False))
    assert np.all(negative == 0)


# ----------------------------------------------------------------------------
# (b) Model I noise
# ----------------------------------------------------------------------------

_noise_model_i = jax.jit(instrument.noise_model_i, static_argnames=("background_rms", "exact_poisson"))


@pytest.mark.parametrize("model_value, exposure, exact", [
    (0.5, 1000.0, False), (0.2, 10**3.5, False), (0.5, 1000.0, True)])
def test_noise_model_i_mean_and_variance(model_value, exposure, exact):
    """Stored counts of a constant model: E = t model, Var = 2 t model + t^2 rms^2 (no clipping).

    model * t >= 500 counts and image_real has >= 15 sigma of room above 0, so
    the clip is negligible. The total is Poisson-over-Gaussian: close to normal.
    """
    rms = 0.01
    shape = (2, 250, 400) if not exact else (100, 1000)
    model = jnp.full(shape, model_value, jnp.float32)
    out = np.asarray(_noise_model_i(jax.random.key(4), model, jnp.float32(exposure),
                                    background_rms=rms, exact_poisson=exact))
    assert out.shape == shape and out.dtype == np.float32
    assert np.all(out == np.round(out)) and out.min() >= 0  # stored values are counts
    mean = exposure * model_value
    var = 2.0 * exposure * model_value + exposure**2 * rms**2
    _assert_mean_var(out, mean, var, kurtosis_excess=0.1, what="Model I")


def test_noise_model_i_clipped_background():
    """Model = 0: stored = Poisson(max(N(0, (t rms)^2), 0)); mean and variance of the clipped law."""
    rms, exposure = 0.01, 2000.0
    sigma = exposure * rms
    out = np.asarray(_noise_model_i(jax.random.key(5), jnp.zeros((1000, 500), jnp.float32),
                                    jnp.float32(exposure), background_rms=rms, exact_poisson=False))
    mean = sigma / np.sqrt(2 * np.pi)
    var = mean + sigma**2 / 2 - sigma**2 / (2 * np.pi)
    # Half the mass sits at 0: heavy-tailed, so allow a generous kurtosis in the SE.
    _assert_mean_var(out, mean, var, kurtosis_excess=3.0, what="Model I, model = 0")
    assert 0.5 < np.mean(out == 0) < 0.55  # P(clip) = 1/2, plus Poisson zeros of small rates


def test_noise_model_i_mean_tracks_model_per_pixel():
    """Pixel by pixel, the stored image averages t * model over noise draws (a non-constant model)."""
    model = jnp.linspace(0.05, 2.0, 40, dtype=jnp.float32).reshape(5, 8)
    exposure = 1500.0
    keys = jax.random.split(jax.random.key(6), 20000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: instrument.noise_model_i(
        k, model, jnp.float32(exposure))))(keys))
    expected_mean = exposure * np.asarray(model)
    expected_var = 2 * exposure * np.asarray(model) + exposure**2 * 0.01**2
    se = np.sqrt(expected_var / keys.shape[0])
    assert np.all(np.abs(draws.mean(0) - expected_mean) <= 5 * se)
    np.testing.assert_allclose(draws.var(0), expected_var, rtol=0.06)


# ----------------------------------------------------------------------------
# (c) lenstronomy SingleBand noise
# ----------------------------------------------------------------------------

def _lenstronomy_band(band: instrument.SingleBand) -> SingleBand:
    return SingleBand(pixel_scale=band.pixel_scale, exposure_time=band.exposure_time,
                      magnitude_zero_point=band.magnitude_zero_point, read_noise=band.read_noise,
                      ccd_gain=band.ccd_gain, sky_brightness=band.sky_brightness, seeing=band.seeing,
                      num_exposures=band.num_exposures, data_count_unit="e-")


def test_hst_band_matches_lenstronomy_config():
    """HST_WFC3_F160W holds lenstronomy's ObservationConfig WFC3_F160W numbers."""
    kwargs = HST(band="WFC3_F160W", psf_type="GAUSSIAN").kwargs_single_band()
    band = instrument.HST_WFC3_F160W
    for name in ("pixel_scale", "seeing", "exposure_time", "num_exposures", "sky_brightness",
                 "magnitude_zero_point", "read_noise", "ccd_gain"):
        assert getattr(band, name) == pytest.approx(kwargs[name]), name


def test_euclid_band_holds_the_recipe_numbers():
    """EUCLID_VIS is the Model II recipe's band (SIMULATION.md), not lenstronomy 1.14's newer one."""
    band = instrument.EUCLID_VIS
    assert (band.pixel_scale, band.seeing, band.exposure_time, band.num_exposures) == (
        0.101, 0.16, 565.0, 4)
    assert (band.sky_brightness, band.magnitude_zero_point, band.read_noise, band.ccd_gain) == (
        22.35, 24.0, 4.2, 3.1)


@pytest.mark.parametrize("band", [instrument.EUCLID_VIS, instrument.HST_WFC3_F160W],
                         ids=lambda b: b.name)
def test_single_band_background_matches_lenstronomy(band):
    """background_noise, sky level and total exposure equal lenstronomy's SingleBand (same numbers)."""
    ref = _lenstronomy_band(band)
    np.testing.assert_allclose(band.background_noise, ref.background_noise, rtol=1e-12)
    np.testing.assert_allclose(band.sky_cps_per_pixel, ref.sky_brightness * band.pixel_scale**2,
                               rtol=1e-12)
    np.testing.assert_allclose(band.total_exposure_time, ref.exposure_time, rtol=1e-12)


@pytest.mark.parametrize("band", [instrument.EUCLID_VIS, instrument.HST_WFC3_F160W],
                         ids=lambda b: b.name)
def test_noise_single_band_mean_and_variance(band):
    """noise_single_band, levels 0 .. 20 e-/s: mean = model, var = lenstronomy's estimate_noise^2."""
    levels = np.array([0.0, 0.05, 0.5, 5.0, 20.0], np.float32)
    n = 100_000
    model = jnp.asarray(np.broadcast_to(levels[:, None], (len(levels), n)))
    noisy = np.asarray(jax.jit(instrument.noise_single_band, static_argnums=2)(
        jax.random.key(7), model, band))
    assert noisy.shape == model.shape and noisy.dtype == np.float32
    expected_var = _lenstronomy_band(band).estimate_noise(levels.astype(np.float64)) ** 2
    for level, var, row in zip(levels, expected_var, noisy):
        _assert_mean_var(row, float(level), float(var), what=f"{band.name} level {level}")


# ----------------------------------------------------------------------------
# (d) PyLensing sky + Poisson noise
# ----------------------------------------------------------------------------

_noise_sky_poisson = jax.jit(instrument.noise_sky_poisson, static_argnames=("exact_poisson",))


@pytest.mark.parametrize("exact", [False, True])
def test_noise_sky_poisson_mean_and_variance(exact):
    """out = Poisson((image + sky) t) / t - sky: mean = image, var = (image + sky) / t.

    PyLensing numbers (t = 300 s, sky 0.1) give rates 30 .. 390; a second sky
    level (0.005) puts the zero pixels at rate 1.5 on the exact-inversion branch.
    """
    levels = np.array([0.0, 0.05, 0.5, 1.2], np.float32)
    n = 100_000 if not exact else 25_000
    image = jnp.asarray(np.broadcast_to(levels[:, None], (len(levels), n)))
    exposure = 300.0
    for sky in (0.1, 0.005):
        out = np.asarray(_noise_sky_poisson(jax.random.key(8), image, exposure, sky,
                                            exact_poisson=exact))
        assert out.dtype == np.float32
        for level, row in zip(levels, out):
            rate = (level + sky) * exposure
            _assert_mean_var(row, float(level), float((level + sky) / exposure),
                             kurtosis_excess=1.0 / rate, what=f"sky {sky}, level {level}")


@pytest.mark.parametrize("shape", [(7,), (3, 5), (150, 150)])
def test_random_words_equal_jax_threefry(shape):
    """The elementwise Threefry used on CPU gives exactly jax's Threefry-2x32 words
    (so the simulated streams do not depend on which of the two computes them)."""
    import math

    import jax.extend
    key = jax.random.key(1234)
    size = math.prod(shape)
    expected = jax.extend.random.threefry_2x32(
        jax.random.key_data(key), jnp.arange(size + size % 2, dtype=jnp.uint32))[:size]
    words = jax.jit(lambda k: instrument.random_words(k, shape))(key)
    np.testing.assert_array_equal(np.asarray(words).ravel(), np.asarray(expected))
    x0 = jnp.arange(5, dtype=jnp.uint32)
    pair = instrument.threefry_2x32_elementwise(jax.random.key_data(key), x0, x0 + 5)
    np.testing.assert_array_equal(np.concatenate([np.asarray(p) for p in pair]),
                                  np.asarray(jax.extend.random.threefry_2x32(
                                      jax.random.key_data(key), jnp.arange(10, dtype=jnp.uint32))))
