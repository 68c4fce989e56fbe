"""Surface brightness of lensjax.sim.light against lenstronomy's SERSIC_ELLIPSE.

For >= 20 random Sersic parameter draws the profile is evaluated on a grid plus
random points, in float32 and float64, and compared with
lenstronomy.LightModel.LightModel(['SERSIC_ELLIPSE']).surface_brightness on the
same (dtype-rounded) inputs: relative 1e-4 (float32) and 1e-9 (float64), with a
small absolute floor relative to the peak of each draw. Total flux and the
magnitude -> amp conversion are checked against lenstronomy's own formulae.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lenstronomy.LightModel.light_model import LightModel
from lenstronomy.Util import data_util

from lensjax.sim import light

NUM_DRAWS = 24
RTOL = {"float32": 1e-4, "float64": 1e-9}
DTYPES = ("float32", "float64")
KEYS = ("amp", "R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y")

_sersic = jax.jit(jax.vmap(light.sersic_ellipse, in_axes=(None, None, 0, 0, 0, 0, 0, 0, 0)))


def _points() -> tuple[np.ndarray, np.ndarray]:
    """A 15x15 grid over [-1.5, 1.5]^2 (contains the origin) plus 100 random points in [-2, 2]^2."""
    axis = np.linspace(-1.5, 1.5, 15)
    gx, gy = np.meshgrid(axis, axis)
    rx, ry = np.random.RandomState(0).uniform(-2.0, 2.0, (2, 100))
    return np.concatenate([gx.ravel(), rx]), np.concatenate([gy.ravel(), ry])


def _draw(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    n = NUM_DRAWS
    return {
        "amp": rng.uniform(0.5, 50.0, n),
        "R_sersic": rng.uniform(0.1, 1.0, n),
        "n_sersic": rng.uniform(0.5, 4.0, n),
        "e1": rng.uniform(-0.3, 0.3, n),
        "e2": rng.uniform(-0.3, 0.3, n),
        "center_x": rng.uniform(-0.5, 0.5, n),
        "center_y": rng.uniform(-0.5, 0.5, n),
    }


def _reference(x, y, kw) -> np.ndarray:
    return np.asarray(LightModel(["SERSIC_ELLIPSE"]).surface_brightness(
        np.asarray(x, np.float64), np.asarray(y, np.float64), [kw]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sersic_ellipse_matches_lenstronomy(dtype):
    """sersic_ellipse equals lenstronomy SERSIC_ELLIPSE (product-average radius, b_n, smoothing).

    Includes points at the exact centre of some draws (the 1e-4" smoothing floor
    must agree there too) and far out in the wings (values ~1e-10 of the peak).
    """
    p = {k: np.asarray(v, dtype) for k, v in _draw(1).items()}
    # Put a few profile centres exactly on grid points (the origin and (0.2143, -0.4286)).
    axis = np.linspace(-1.5, 1.5, 15).astype(dtype)
    p["center_x"][:3] = [0.0, axis[9], axis[4]]
    p["center_y"][:3] = [0.0, axis[3], axis[8]]
    x, y = (np.asarray(a, dtype) for a in _points())
    with jax.enable_x64(dtype == "float64"):
        out = np.asarray(_sersic(*(jnp.asarray(a, dtype) for a in (x, y)),
                                 *(jnp.asarray(p[k], dtype) for k in KEYS)))
    assert out.dtype == np.dtype(dtype)
    for i in range(NUM_DRAWS):
        kw = {k: float(p[k][i]) for k in KEYS}
        ref = _reference(x, y, kw)
        np.testing.assert_allclose(out[i], ref, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-3 * ref.max(),
                                   err_msg=f"draw {i}: {kw}")


def test_sersic_round_and_extreme_indices():
    """Round profiles (e1 = e2 = 0) and the edges of the n range (0.5, 4) also match, in float64."""
    x, y = _points()
    with jax.enable_x64(True):
        for n_sersic in (0.5, 1.0, 2.5, 4.0):
            for e1, e2 in ((0.0, 0.0), (0.3, -0.3)):
                kw = dict(amp=3.0, R_sersic=0.3, n_sersic=n_sersic, e1=e1, e2=e2,
                          center_x=0.1, center_y=-0.05)
                out = np.asarray(light.sersic_ellipse(jnp.asarray(x), jnp.asarray(y), **kw))
                ref = _reference(x, y, kw)
                np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-12 * ref.max(),
                                           err_msg=str(kw))


@pytest.mark.parametrize("n_sersic", [0.25, 0.5, 1.0, 2.0, 4.0])
def test_sersic_fixed_index_fast_power_matches_lenstronomy_and_traced_path(n_sersic):
    """A Python-number n with 1/n in {4, 2, 1, 1/2, 1/4} takes products / square roots
    instead of exp(log(r) / n); in float32 it equals lenstronomy (rtol 1e-4) and the
    traced-n path (rtol 2e-6)."""
    x, y = (jnp.asarray(a, jnp.float32) for a in _points())
    kw = dict(amp=3.0, R_sersic=0.3, e1=0.2, e2=-0.1, center_x=0.1, center_y=-0.05)
    fast = np.asarray(light.sersic_ellipse(x, y, n_sersic=n_sersic, **kw))
    traced = np.asarray(jax.jit(lambda n: light.sersic_ellipse(x, y, n_sersic=n, **kw))(
        jnp.float32(n_sersic)))
    ref = _reference(np.asarray(x), np.asarray(y), dict(kw, n_sersic=n_sersic))
    floor = 1e-7 * ref.max()
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=floor)
    np.testing.assert_allclose(fast, traced, rtol=2e-6, atol=floor)


def test_sersic_total_flux_matches_lenstronomy():
    """sersic_total_flux equals LightModel.total_flux (analytic integral, product-average radius)."""
    p = _draw(2)
    model = LightModel(["SERSIC_ELLIPSE"])
    with jax.enable_x64(True):
        ours = np.asarray(light.sersic_total_flux(jnp.asarray(p["amp"]), jnp.asarray(p["R_sersic"]),
                                                  jnp.asarray(p["n_sersic"])))
    ours32 = np.asarray(light.sersic_total_flux(jnp.asarray(p["amp"], jnp.float32),
                                                jnp.asarray(p["R_sersic"], jnp.float32),
                                                jnp.asarray(p["n_sersic"], jnp.float32)))
    for i in range(NUM_DRAWS):
        kw = {k: float(p[k][i]) for k in KEYS}
        ref = model.total_flux([kw])[0]
        np.testing.assert_allclose(ours[i], ref, rtol=1e-9, err_msg=str(kw))
        np.testing.assert_allclose(ours32[i], ref, rtol=1e-4, err_msg=str(kw))


def test_sersic_total_flux_matches_numerical_integral():
    """The flux of sersic_ellipse summed on a fine grid equals sersic_total_flux (independent check).

    An elliptical n = 1 profile (R = 0.3") integrated on 0.005" pixels over a 12" box.
    """
    kw = dict(amp=2.0, R_sersic=0.3, n_sersic=1.0, e1=0.2, e2=-0.1, center_x=0.0, center_y=0.0)
    step = 0.005
    axis = (np.arange(2400) - 1199.5) * step
    gx, gy = np.meshgrid(axis, axis)
    with jax.enable_x64(True):
        image = np.asarray(light.sersic_ellipse(jnp.asarray(gx), jnp.asarray(gy), **kw))
        total = float(light.sersic_total_flux(kw["amp"], kw["R_sersic"], kw["n_sersic"]))
    np.testing.assert_allclose(image.sum() * step**2, total, rtol=1e-4)


def test_sersic_amp_from_magnitude_matches_lenstronomy():
    """amp from (magnitude, zero point) gives a total flux of magnitude2cps(magnitude, zero point).

    Checked both ways: lenstronomy's total_flux of the returned amp, and
    data_util.magnitude2cps / total_flux(amp=1), for Model II-like settings and random ones.
    """
    rng = np.random.RandomState(3)
    model = LightModel(["SERSIC_ELLIPSE"])
    cases = [(20.0, 24.0, 0.25, 1.0)] + [
        (rng.uniform(17, 26), rng.uniform(22, 27), rng.uniform(0.1, 1.0), rng.uniform(0.5, 4.0))
        for _ in range(20)]
    for magnitude, zero_point, r_sersic, n_sersic in cases:
        with jax.enable_x64(True):
            amp = float(light.sersic_amp_from_magnitude(magnitude, zero_point, r_sersic, n_sersic))
        amp32 = float(light.sersic_amp_from_magnitude(np.float32(magnitude), np.float32(zero_point),
                                                      np.float32(r_sersic), np.float32(n_sersic)))
        cps = data_util.magnitude2cps(magnitude, zero_point)
        kw = dict(R_sersic=r_sersic, n_sersic=n_sersic, e1=0.1, e2=-0.2, center_x=0, center_y=0)
        flux_amp1 = model.total_flux([dict(kw, amp=1.0)])[0]
        np.testing.assert_allclose(amp, cps / flux_amp1, rtol=1e-9)
        np.testing.assert_allclose(model.total_flux([dict(kw, amp=amp)])[0], cps, rtol=1e-9)
        np.testing.assert_allclose(amp32, cps / flux_amp1, rtol=1e-4)
