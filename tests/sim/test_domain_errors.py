"""Bad simulator inputs raise ValueError naming the parameter (lensjax.sim.domain checks).

Checks run on concrete values (Python numbers, numpy arrays, concrete jax
arrays) and are skipped on tracers, so the same functions stay usable under
jit / vmap / grad: both halves are tested here.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lensjax.sim as sim
from lensjax.sim import cosmology, instrument, light, profiles

X = jnp.linspace(-1.0, 1.0, 5)
Y = jnp.linspace(-0.5, 0.7, 5)
NAN = float("nan")


def _raises(name: str):
    """pytest.raises(ValueError) whose message names `name` as a word."""
    return pytest.raises(ValueError, match=rf"(?<![\w]){re.escape(name)}(?![\w])")


# ----------------------------------------------------------------------------
# Mass profiles
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-0.1, NAN, np.array([0.5, -1e-3]), jnp.asarray(-2.0)])
def test_negative_or_nan_theta_e_raises(bad):
    """theta_E < 0 or NaN (Python, numpy or concrete jax value) is rejected by every mass profile."""
    with _raises("theta_E"):
        profiles.deflection_sis(X, Y, bad)
    with _raises("theta_E"):
        profiles.deflection_sie(X, Y, bad, 0.1, 0.0)
    with _raises("theta_E"):
        profiles.deflection_point_mass(X, Y, bad)


def test_negative_point_masses_raise():
    """A negative entry among the padded point masses is rejected; zero padding is allowed."""
    centres = jnp.zeros(3)
    with _raises("theta_E"):
        profiles.deflection_point_masses(X, Y, jnp.array([0.1, -0.01, 0.0]), centres, centres)
    with _raises("theta_E"):
        profiles.deflection_point_masses(X, Y, np.array([0.1, NAN, 0.0]), centres, centres)
    profiles.deflection_point_masses(X, Y, jnp.array([0.1, 0.0, 0.0]), centres, centres)


@pytest.mark.parametrize("q", [1.5, 0.0, -0.2, NAN, np.array([0.5, 1.0001])])
def test_axis_ratio_outside_unit_interval_raises(q):
    """phi_q_to_ellipticity needs 0 < q <= 1 (q = 1 itself is the round case and allowed)."""
    with _raises("q"):
        profiles.phi_q_to_ellipticity(0.3, q)
    e1, e2 = profiles.phi_q_to_ellipticity(0.3, 1.0)
    assert float(e1) == 0.0 and float(e2) == 0.0


def test_negative_shear_magnitude_raises():
    """shear_polar_to_cartesian needs gamma >= 0 (the angle carries the sign)."""
    with _raises("gamma"):
        profiles.shear_polar_to_cartesian(0.2, -0.05)


# ----------------------------------------------------------------------------
# Light
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs", [
    ("amp", dict(amp=-1.0)),
    ("R_sersic", dict(R_sersic=0.0)),
    ("R_sersic", dict(R_sersic=-0.3)),
    ("n_sersic", dict(n_sersic=0.0)),
    ("n_sersic", dict(n_sersic=NAN)),
])
def test_bad_sersic_parameters_raise(name, kwargs):
    """sersic_ellipse / sersic_total_flux reject amp < 0, R_sersic <= 0 and n_sersic <= 0."""
    params = dict(amp=1.0, R_sersic=0.3, n_sersic=1.0)
    params.update(kwargs)
    with _raises(name):
        light.sersic_ellipse(X, Y, params["amp"], params["R_sersic"], params["n_sersic"], 0.1, 0.0)
    if name != "amp":
        with _raises(name):
            light.sersic_total_flux(params["amp"], params["R_sersic"], params["n_sersic"])


# ----------------------------------------------------------------------------
# Instrument
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("num_pix", [0, -4, 2.0, True, None])
def test_empty_or_non_integer_grid_raises(num_pix):
    """pixel_coordinates needs a positive integer num_pix (0 would be an empty grid)."""
    with _raises("num_pix"):
        instrument.pixel_coordinates(num_pix, 0.05)


@pytest.mark.parametrize("name, args", [
    ("supersampling", (10, 0.05, 0)),
    ("pixel_scale", (10, 0.0)),
    ("pixel_scale", (10, -0.05)),
    ("pixel_scale", (10, NAN)),
])
def test_bad_grid_parameters_raise(name, args):
    """pixel_coordinates rejects supersampling < 1 and pixel_scale <= 0 or NaN."""
    with _raises(name):
        instrument.pixel_coordinates(*args)


def test_bad_binning_raises():
    """bin_supersampled / mean_pool reject factors < 1 and images not divisible by the factor."""
    image = jnp.ones((2, 6, 6))
    with _raises("supersampling"):
        instrument.bin_supersampled(image, 0)
    with _raises("supersampling"):
        instrument.bin_supersampled(image, 4)  # 6 is not divisible by 4
    with _raises("factor"):
        instrument.mean_pool(image, 0)
    with _raises("factor"):
        instrument.mean_pool(image, 4)
    assert instrument.bin_supersampled(image, 3).shape == (2, 2, 2)


@pytest.mark.parametrize("name, kwargs", [
    ("fwhm", dict(fwhm=0.0)),
    ("fwhm", dict(fwhm=-0.1)),
    ("pixel_scale", dict(pixel_scale=0.0)),
    ("pixel_scale", dict(pixel_scale=-0.05)),
    ("truncation", dict(truncation=0.0)),
])
def test_bad_psf_parameters_raise(name, kwargs):
    """convolve_gaussian_psf rejects fwhm, pixel_scale and truncation <= 0, naming them."""
    params = dict(fwhm=0.1, pixel_scale=0.05, truncation=3.0)
    params.update(kwargs)
    with _raises(name):
        instrument.convolve_gaussian_psf(jnp.ones((8, 8)), **params)


def test_bad_noise_parameters_raise():
    """Noise models reject exposure_time <= 0, background_rms < 0 and sky_level < 0."""
    key = jax.random.key(0)
    model = jnp.ones((4, 4))
    with _raises("exposure_time"):
        instrument.noise_model_i(key, model, 0.0)
    with _raises("exposure_time"):
        instrument.noise_model_i(key, model, jnp.asarray(-100.0))
    with _raises("background_rms"):
        instrument.noise_model_i(key, model, 1000.0, background_rms=-0.01)
    with _raises("exposure_time"):
        instrument.noise_sky_poisson(key, model, -300.0, 0.1)
    with _raises("sky_level"):
        instrument.noise_sky_poisson(key, model, 300.0, -0.1)


@pytest.mark.parametrize("field, value", [
    ("pixel_scale", 0.0), ("seeing", -0.1), ("exposure_time", 0.0), ("ccd_gain", 0.0),
    ("read_noise", -1.0), ("num_exposures", 0), ("num_exposures", 2.5)])
def test_bad_single_band_raises(field, value):
    """SingleBand rejects non-positive pixel scale, seeing, exposure, gain, negative read noise
    and a non-integer or zero number of exposures."""
    fields = {f: getattr(instrument.EUCLID_VIS, f) for f in (
        "name", "pixel_scale", "seeing", "exposure_time", "num_exposures", "sky_brightness",
        "magnitude_zero_point", "read_noise", "ccd_gain")}
    fields[field] = value
    with _raises(field):
        instrument.SingleBand(**fields)


# ----------------------------------------------------------------------------
# Cosmology
# ----------------------------------------------------------------------------

def test_bad_cosmology_inputs_raise():
    """Negative or NaN masses, bad redshift order, z < 0, h0 <= 0 and omega_m outside [0, 1] raise."""
    with _raises("mass_msun"):
        cosmology.einstein_radius_point_mass(-1e10)
    with _raises("mass_msun"):
        cosmology.einstein_radius_point_mass(np.array([1e10, -1.0]))
    with _raises("mass_msun"):
        cosmology.einstein_radius_point_mass(NAN)
    with _raises("z_source"):
        cosmology.einstein_radius_point_mass(1e10, z_lens=1.0, z_source=0.5)
    with _raises("z"):
        cosmology.comoving_distance_mpc(-0.1)
    with _raises("z"):
        cosmology.comoving_distance_mpc(NAN)
    with _raises("h0"):
        cosmology.comoving_distance_mpc(1.0, h0=0.0)
    with _raises("h0"):
        cosmology.luminosity_distance_mpc(1.0, h0=-70.0)
    with _raises("omega_m"):
        cosmology.comoving_distance_mpc(1.0, omega_m=1.2)
    assert math.isfinite(cosmology.einstein_radius_point_mass(0.0))


# ----------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------

def test_unknown_preset_lists_valid_names():
    """get_preset('nope') raises ValueError naming the bad preset and listing every valid name."""
    with pytest.raises(ValueError) as info:
        sim.get_preset("model_iv")
    message = str(info.value)
    assert "model_iv" in message
    assert len(sim.PRESET_NAMES) >= 7
    for name in sim.PRESET_NAMES:
        assert name in message, f"{name!r} missing from: {message}"
    for name in sim.PRESET_NAMES:  # and every listed name is accepted
        sim.get_preset(name)


def test_bad_preset_overrides_raise():
    """Unknown override fields and out-of-domain values raise ValueError naming them."""
    with _raises("no_such_field"):
        sim.get_preset("model_i", no_such_field=1)
    with _raises("num_pix"):
        sim.get_preset("model_i", num_pix=0)
    with _raises("pixel_scale"):
        sim.get_preset("common_test", pixel_scale=-0.05)
    with _raises("source_q_range"):
        sim.get_preset("common_test", source_q_range=(0.7, 1.3))


def test_bad_sample_arguments_raise():
    """Preset.sample rejects batch_size < 1 and an unknown class, listing the valid classes."""
    preset = sim.get_preset("model_i")
    with _raises("batch_size"):
        preset.sample(jax.random.key(0), 0)
    with pytest.raises(ValueError) as info:
        preset.sample(jax.random.key(0), 2, label="vortex")
    for name in preset.class_names:
        assert name in str(info.value)


# ----------------------------------------------------------------------------
# Tracers are not checked
# ----------------------------------------------------------------------------

def test_checks_are_skipped_under_jit_vmap_and_grad():
    """Inside jit / vmap / grad the values are unknown, so no check fires (and nothing crashes)."""
    jitted = jax.jit(lambda t: profiles.deflection_sis(X, Y, t)[0])
    out = np.asarray(jitted(-1.0))  # negative, but traced: computed, not checked
    np.testing.assert_allclose(out, -np.asarray(profiles.deflection_sis(X, Y, 1.0)[0]), rtol=1e-6)
    batched = jax.vmap(lambda q: profiles.phi_q_to_ellipticity(0.2, q)[0])(jnp.array([0.5, 1.5]))
    assert batched.shape == (2,)
    grad = jax.grad(lambda amp: jnp.sum(light.sersic_ellipse(X, Y, amp, 0.3, 1.0, 0.0, 0.0)))(-1.0)
    assert np.isfinite(float(grad))
    noisy = jax.jit(instrument.noise_model_i)(jax.random.key(0), jnp.ones((4, 4)),
                                              jnp.asarray(-5.0))
    assert noisy.shape == (4, 4)
