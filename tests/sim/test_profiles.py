"""Deflection angles of lensjax.sim.profiles against lenstronomy (the reference code).

Every profile is evaluated for >= 20 random parameter draws on a fixed set of
points (a regular grid plus random points), in float32 and float64, and compared
with lenstronomy.LensModel.alpha on the very same (dtype-rounded) inputs. The
comparison is per point on the deflection VECTOR: |alpha - alpha_ref| <= rtol *
|alpha_ref| + atol, with rtol = 1e-4 (float32) / 1e-9 (float64) and a small atol
relative to the field scale. Points closer than MIN_DISTANCE to a profile centre
are left out: there the profiles are singular and only the floor conventions
(which differ between the codes by design) decide the value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.Util import param_util

from lensjax.sim import profiles

NUM_DRAWS = 24
MIN_DISTANCE = 0.02  # arcsec
RTOL = {"float32": 1e-4, "float64": 1e-9}
DTYPES = ("float32", "float64")


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

def _points(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 13x13 grid over [-2.4, 2.4]^2 (it contains the origin) plus 80 random points in [-3, 3]^2."""
    axis = np.linspace(-2.4, 2.4, 13)
    gx, gy = np.meshgrid(axis, axis)
    rng = np.random.RandomState(seed)
    rx, ry = rng.uniform(-3.0, 3.0, (2, 80))
    return np.concatenate([gx.ravel(), rx]), np.concatenate([gy.ravel(), ry])


def _as_dtype(tree, dtype):
    """Round every array of a dict/tuple to `dtype` (numpy), so both codes see the same inputs."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=dtype), tree)


def _call(fn, dtype, *args):
    """Call a jitted function on numpy args of `dtype` (x64 enabled for float64); numpy outputs."""
    with jax.enable_x64(dtype == "float64"):
        out = fn(*[jnp.asarray(a, dtype=dtype) for a in args])
        out = jax.tree_util.tree_map(np.asarray, out)
    for leaf in jax.tree_util.tree_leaves(out):
        assert leaf.dtype == np.dtype(dtype), f"output dtype {leaf.dtype} != input dtype {dtype}"
    return out


def _assert_vectors_close(ax, ay, ref_x, ref_y, rtol, mask=None, what=""):
    """Per point: |alpha - ref| <= rtol |ref| + rtol * 1e-3 * max|ref| (masked points skipped)."""
    ax, ay, ref_x, ref_y = (np.asarray(a, np.float64) for a in (ax, ay, ref_x, ref_y))
    err = np.hypot(ax - ref_x, ay - ref_y)
    norm = np.hypot(ref_x, ref_y)
    if mask is None:
        mask = np.ones_like(norm, bool)
    assert mask.sum() > 0.5 * mask.size, "too many points masked out"
    bound = rtol * norm + rtol * 1e-3 * np.max(norm[mask])
    bad = mask & ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {bad.sum()} points exceed rtol={rtol}; worst relative error "
        f"{np.max(err[mask] / np.maximum(norm[mask], 1e-300)):.3e}")


def _far_from(x, y, cx, cy):
    """Mask of points at least MIN_DISTANCE from every centre (cx, cy arrays of any shape)."""
    cx, cy = np.atleast_1d(cx), np.atleast_1d(cy)
    dist = np.hypot(x[:, None] - cx[None, :], y[:, None] - cy[None, :])
    return np.all(dist >= MIN_DISTANCE, axis=1)


def _draw(seed: int) -> dict[str, np.ndarray]:
    """NUM_DRAWS parameter sets in the ranges of the DeepLense recipes (and somewhat beyond)."""
    rng = np.random.RandomState(seed)
    n = NUM_DRAWS
    return {
        "theta_E": rng.uniform(0.1, 2.0, n),
        "e1": rng.uniform(-0.3, 0.3, n),
        "e2": rng.uniform(-0.3, 0.3, n),
        "center_x": rng.uniform(-0.5, 0.5, n),
        "center_y": rng.uniform(-0.5, 0.5, n),
        "gamma1": rng.uniform(-0.1, 0.1, n),
        "gamma2": rng.uniform(-0.1, 0.1, n),
    }


def _lenstronomy_alpha(models, x, y, kwargs_list):
    ax, ay = LensModel(models).alpha(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                     kwargs_list)
    return np.asarray(ax), np.asarray(ay)


# Jitted once per dtype: points are shared (None), parameters vmapped over draws.
_sis = jax.jit(jax.vmap(profiles.deflection_sis, in_axes=(None, None, 0, 0, 0)))
_sie = jax.jit(jax.vmap(profiles.deflection_sie, in_axes=(None, None, 0, 0, 0, 0, 0)))
_shear = jax.jit(jax.vmap(profiles.deflection_shear, in_axes=(None, None, 0, 0, 0, 0)))
_point_mass = jax.jit(jax.vmap(profiles.deflection_point_mass, in_axes=(None, None, 0, 0, 0)))


# ----------------------------------------------------------------------------
# Deflections vs lenstronomy
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_sis_matches_lenstronomy(dtype):
    """SIS deflection (alpha = theta_E r_hat) equals lenstronomy 'SIS' for random draws."""
    p = _as_dtype(_draw(1), dtype)
    x, y = _as_dtype(_points(), dtype)
    ax, ay = _call(_sis, dtype, x, y, p["theta_E"], p["center_x"], p["center_y"])
    for i in range(NUM_DRAWS):
        kw = {k: float(p[k][i]) for k in ("theta_E", "center_x", "center_y")}
        rx, ry = _lenstronomy_alpha(["SIS"], x, y, [kw])
        _assert_vectors_close(ax[i], ay[i], rx, ry, RTOL[dtype],
                              _far_from(x, y, kw["center_x"], kw["center_y"]), f"SIS draw {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sie_matches_lenstronomy(dtype):
    """SIE (lenstronomy's NIE with a 1e-10 core) deflection equals lenstronomy 'SIE' for random draws.

    Checks the (e1, e2) -> (phi, q) convention, the product-average theta_E and Keeton's formulae.
    """
    p = _as_dtype(_draw(2), dtype)
    x, y = _as_dtype(_points(), dtype)
    ax, ay = _call(_sie, dtype, x, y, p["theta_E"], p["e1"], p["e2"], p["center_x"], p["center_y"])
    for i in range(NUM_DRAWS):
        kw = {k: float(p[k][i]) for k in ("theta_E", "e1", "e2", "center_x", "center_y")}
        rx, ry = _lenstronomy_alpha(["SIE"], x, y, [kw])
        _assert_vectors_close(ax[i], ay[i], rx, ry, RTOL[dtype],
                              _far_from(x, y, kw["center_x"], kw["center_y"]), f"SIE draw {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_shear_matches_lenstronomy(dtype):
    """External shear (gamma1, gamma2) about (ra_0, dec_0) equals lenstronomy 'SHEAR'."""
    p = _as_dtype(_draw(3), dtype)
    x, y = _as_dtype(_points(), dtype)
    ax, ay = _call(_shear, dtype, x, y, p["gamma1"], p["gamma2"], p["center_x"], p["center_y"])
    for i in range(NUM_DRAWS):
        kw = {"gamma1": float(p["gamma1"][i]), "gamma2": float(p["gamma2"][i]),
              "ra_0": float(p["center_x"][i]), "dec_0": float(p["center_y"][i])}
        rx, ry = _lenstronomy_alpha(["SHEAR"], x, y, [kw])
        _assert_vectors_close(ax[i], ay[i], rx, ry, RTOL[dtype], what=f"SHEAR draw {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_point_mass_matches_lenstronomy(dtype):
    """Point mass (alpha = theta_E^2 r_vec / r^2) equals lenstronomy 'POINT_MASS'."""
    p = _as_dtype(_draw(4), dtype)
    x, y = _as_dtype(_points(), dtype)
    ax, ay = _call(_point_mass, dtype, x, y, p["theta_E"], p["center_x"], p["center_y"])
    for i in range(NUM_DRAWS):
        kw = {k: float(p[k][i]) for k in ("theta_E", "center_x", "center_y")}
        rx, ry = _lenstronomy_alpha(["POINT_MASS"], x, y, [kw])
        _assert_vectors_close(ax[i], ay[i], rx, ry, RTOL[dtype],
                              _far_from(x, y, kw["center_x"], kw["center_y"]),
                              f"POINT_MASS draw {i}")


@pytest.mark.parametrize("strategy", ["unroll", "scan", "reduce"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_point_masses_match_lenstronomy_sum(dtype, strategy, monkeypatch):
    """The padded sum of point masses equals lenstronomy's sum of 'POINT_MASS' terms,
    for each summation strategy (unrolled terms, lax.scan, fused reduction).

    Each draw has K = 12 slots of which 2..10 hold masses (subhalo-like theta_E
    0.005..0.3") at random slots; the rest are zero-mass padding whose centres
    sit at (0, 0), which is also one of the evaluation points: padding must add
    exactly nothing there (no NaN from 0/0). lenstronomy sees only the real masses.
    """
    k = 12
    rng = np.random.RandomState(5)
    theta_e = np.zeros((NUM_DRAWS, k))
    cx, cy = np.zeros((2, NUM_DRAWS, k))
    for i in range(NUM_DRAWS):
        slots = rng.choice(k, size=rng.randint(2, 11), replace=False)
        theta_e[i, slots] = rng.uniform(0.005, 0.3, len(slots))
        cx[i, slots], cy[i, slots] = rng.uniform(-2.0, 2.0, (2, len(slots)))
    theta_e, cx, cy = _as_dtype((theta_e, cx, cy), dtype)
    x, y = _as_dtype(_points(), dtype)
    assert np.any((x == 0) & (y == 0)), "the point set should contain the padding centre (0, 0)"
    monkeypatch.setattr(profiles, "POINT_MASS_STRATEGY", strategy)
    assert profiles.point_mass_strategy() == strategy
    # A fresh jit: the strategy is read when the function is traced.
    point_masses = jax.jit(jax.vmap(profiles.deflection_point_masses, in_axes=(None, None, 0, 0, 0)))
    ax, ay = _call(point_masses, dtype, x, y, theta_e, cx, cy)
    assert np.all(np.isfinite(ax)) and np.all(np.isfinite(ay))
    for i in range(NUM_DRAWS):
        real = theta_e[i] > 0
        kwargs = [{"theta_E": float(t), "center_x": float(a), "center_y": float(b)}
                  for t, a, b in zip(theta_e[i, real], cx[i, real], cy[i, real])]
        rx, ry = _lenstronomy_alpha(["POINT_MASS"] * len(kwargs), x, y, kwargs)
        _assert_vectors_close(ax[i], ay[i], rx, ry, RTOL[dtype],
                              _far_from(x, y, cx[i, real], cy[i, real]),
                              f"point masses draw {i}")


def test_unknown_point_mass_strategy_names_the_valid_ones(monkeypatch):
    monkeypatch.setattr(profiles, "POINT_MASS_STRATEGY", "fast")
    with pytest.raises(ValueError, match="unroll"):
        profiles.point_mass_strategy()


def _vortex_draws(seed: int, count: int):
    """(theta_E, center_x, center_y, angle, half_length) per draw: axion-vortex-like segments
    from 0.03" to 3" half-length (the recipe's range), some centred off the origin."""
    rng = np.random.RandomState(seed)
    return (rng.uniform(0.005, 0.05, count), rng.uniform(-0.3, 0.3, count),
            rng.uniform(-0.3, 0.3, count), rng.uniform(0.0, 2.0 * np.pi, count),
            10.0 ** rng.uniform(np.log10(0.03), np.log10(3.0), count))


def _line(method: str, num_points: int, monkeypatch):
    """deflection_point_mass_line with LINE_SUM = method, jitted and vmapped over draws."""
    monkeypatch.setattr(profiles, "LINE_SUM", method)
    return jax.jit(jax.vmap(
        lambda x, y, t, cx, cy, a, h: profiles.deflection_point_mass_line(x, y, t, cx, cy, a, h,
                                                                          num_points),
        in_axes=(None, None, 0, 0, 0, 0, 0)))


@pytest.mark.parametrize("method", ["direct", "euler_maclaurin"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_point_mass_line_matches_lenstronomy_sum(dtype, method, monkeypatch):
    """100 equal point masses on a segment (the axion vortex) equal lenstronomy's sum of 100
    'POINT_MASS' terms at the same positions, summed term by term or with the
    closed-form runs of `deflection_point_mass_line` (whose truncation is far
    below float32 rounding: float64 holds it to 1e-6)."""
    n = 100
    draws = _as_dtype(_vortex_draws(21, NUM_DRAWS), dtype)
    x, y = _as_dtype(_points(), dtype)
    ax, ay = _call(_line(method, n, monkeypatch), dtype, x, y, *draws)
    assert profiles.line_sum_method(np.dtype(dtype), n) == method
    assert np.all(np.isfinite(ax)) and np.all(np.isfinite(ay))
    rtol = RTOL[dtype] if method == "direct" else {"float32": 1e-4, "float64": 1e-6}[dtype]
    for i, (theta_e, cx, cy, angle, half) in enumerate(zip(*draws)):
        along = np.linspace(-1.0, 1.0, n) * float(half)
        mx, my = float(cx) + along * np.cos(float(angle)), float(cy) + along * np.sin(float(angle))
        kwargs = [{"theta_E": float(theta_e), "center_x": a, "center_y": b} for a, b in zip(mx, my)]
        rx, ry = _lenstronomy_alpha(["POINT_MASS"] * n, x, y, kwargs)
        _assert_vectors_close(ax[i], ay[i], rx, ry, rtol, _far_from(x, y, mx, my),
                              f"{method} line draw {i} (half-length {float(half):.3g})")


def test_point_mass_line_closed_form_equals_direct_sum_on_a_pixel_grid(monkeypatch):
    """On a 64 x 64 image grid (a row of pixels on the segment's line included), float64:
    the closed form is within 1e-7 of the largest deflection of the direct sum."""
    axis = (np.arange(64) - 31.5) * 0.101
    gx, gy = (a.ravel() for a in np.meshgrid(axis, axis))
    draws = _vortex_draws(22, 12)
    # A segment along the first pixel row: those pixels lie on its line (b = 0).
    draws[1][0], draws[2][0], draws[3][0], draws[4][0] = 0.0, float(gy[0]), 0.0, 2.5
    direct = _call(_line("direct", 100, monkeypatch), "float64", gx, gy, *draws)
    closed = _call(_line("euler_maclaurin", 100, monkeypatch), "float64", gx, gy, *draws)
    for i in range(12):
        scale = np.max(np.hypot(direct[0][i], direct[1][i]))
        err = np.hypot(closed[0][i] - direct[0][i], closed[1][i] - direct[1][i])
        assert np.all(np.isfinite(err)) and err.max() <= 1e-7 * scale, (i, err.max() / scale)


def test_point_mass_line_gradients_match_the_direct_sum(monkeypatch):
    """d(sum w . alpha) / d(theta_E, centre, angle, half-length) of the closed form equals
    that of the term-by-term sum (float64), away from the masses."""
    x, y = _points()
    rng = np.random.RandomState(23)
    wx, wy = rng.normal(size=(2, x.shape[0]))
    gradients = {}
    for method in ("direct", "euler_maclaurin"):
        monkeypatch.setattr(profiles, "LINE_SUM", method)
        with jax.enable_x64(True):
            def total(p, method=method):
                ax, ay = profiles.deflection_point_mass_line(
                    jnp.asarray(x), jnp.asarray(y), p[0], p[1], p[2], p[3], p[4], 100)
                return jnp.sum(wx * ax + wy * ay)
            p = jnp.asarray([0.02, 0.1, -0.2, 0.7, 1.3], jnp.float64)
            gradients[method] = np.asarray(jax.grad(total)(p))
    assert np.all(np.isfinite(gradients["euler_maclaurin"]))
    np.testing.assert_allclose(gradients["euler_maclaurin"], gradients["direct"], rtol=1e-6)


def test_line_sum_method_choice_and_errors(monkeypatch):
    assert profiles.line_sum_method(np.float32, 100) == "euler_maclaurin"
    assert profiles.line_sum_method(np.float64, 100) == "direct"
    assert profiles.line_sum_method(np.float32, profiles.LINE_DIRECT_MAX_POINTS) == "direct"
    monkeypatch.setattr(profiles, "LINE_SUM", "euler_maclaurin")
    # A window that holds every mass is the direct sum.
    assert profiles.line_sum_method(np.float32, 2 * profiles.LINE_WINDOW + 1) == "direct"
    monkeypatch.setattr(profiles, "LINE_SUM", "fast")
    with pytest.raises(ValueError, match="euler_maclaurin"):
        profiles.line_sum_method(np.float32, 100)
    with pytest.raises(ValueError, match="num_points"):
        profiles.deflection_point_mass_line(0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 1.0, 1)
    with pytest.raises(ValueError, match="half_length"):
        profiles.deflection_point_mass_line(0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 100)


def test_float32_arctan_matches_numpy():
    """The vectorisable float32 arctan of the closed form is within 3 ulp of numpy's."""
    t = np.concatenate([np.linspace(-60.0, 60.0, 200_001), 10.0 ** np.linspace(-30, 30, 601),
                        -(10.0 ** np.linspace(-30, 30, 601)), [0.0, np.inf, -np.inf]]).astype(np.float32)
    got = np.asarray(jax.jit(profiles._arctan)(jnp.asarray(t)), np.float64)
    want = np.arctan(t.astype(np.float64))
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(got - want) <= 3 * np.maximum(ulp, np.finfo(np.float32).tiny))


def test_padded_point_masses_all_zero_is_zero():
    """A fully padded (all theta_E = 0) list deflects by exactly 0 everywhere, centres included."""
    x, y = _as_dtype(_points(), "float32")
    zeros = np.zeros(5, np.float32)
    ax, ay = profiles.deflection_point_masses(jnp.asarray(x), jnp.asarray(y), zeros,
                                              zeros, zeros)
    assert np.array_equal(np.asarray(ax), np.zeros_like(x))
    assert np.array_equal(np.asarray(ay), np.zeros_like(y))


# ----------------------------------------------------------------------------
# Limits and parameter conversions
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_sie_round_limit_is_sis(dtype):
    """SIE with e1 = e2 = 0 (and tiny |e|) equals lenstronomy's SIS with the same theta_E.

    lenstronomy itself caps q at 1 - 1e-8 in its SIE, so its SIS is the exact reference.
    The SIE keeps a 1e-10" core (as lenstronomy's does), which changes alpha by a
    relative core / r: points within 0.2" of the centre are left out so that this
    stays below the float64 tolerance.
    """
    p = _as_dtype(_draw(6), dtype)
    x, y = _as_dtype(_points(), dtype)
    for scale in (0.0, 1e-12, 1e-6):
        e1 = np.full(NUM_DRAWS, scale, dtype)
        e2 = np.full(NUM_DRAWS, -0.5 * scale, dtype)
        ax, ay = _call(_sie, dtype, x, y, p["theta_E"], e1, e2, p["center_x"], p["center_y"])
        for i in range(NUM_DRAWS):
            kw = {k: float(p[k][i]) for k in ("theta_E", "center_x", "center_y")}
            rx, ry = _lenstronomy_alpha(["SIS"], x, y, [kw])
            # |e| = 1e-6 changes the field by O(1e-6) relative: allowed for on top.
            rtol = RTOL[dtype] + 4 * scale
            keep = np.hypot(x - kw["center_x"], y - kw["center_y"]) >= 0.2
            _assert_vectors_close(ax[i], ay[i], rx, ry, rtol, keep,
                                  f"SIE(|e|={scale}) vs SIS draw {i}")


def test_ellipticity_conversions_match_lenstronomy():
    """(e1, e2) <-> (phi, q) conversions equal lenstronomy's param_util and invert each other."""
    rng = np.random.RandomState(7)
    e1, e2 = rng.uniform(-0.6, 0.6, (2, 50))
    with jax.enable_x64(True):
        phi, q = profiles.ellipticity_to_phi_q(jnp.asarray(e1), jnp.asarray(e2))
        e1_back, e2_back = profiles.phi_q_to_ellipticity(phi, q)
        phi, q, e1_back, e2_back = map(np.asarray, (phi, q, e1_back, e2_back))
    ref_phi, ref_q = param_util.ellipticity2phi_q(e1, e2)
    np.testing.assert_allclose(phi, ref_phi, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(q, ref_q, rtol=1e-12)
    ref_e1, ref_e2 = param_util.phi_q2_ellipticity(ref_phi, ref_q)
    np.testing.assert_allclose(e1_back, ref_e1, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(e2_back, ref_e2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(e1_back, e1, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(e2_back, e2, rtol=1e-12, atol=1e-14)

    # phi, q -> e -> phi, q (q in (0, 1], any phi): also the default float32 path.
    phi_in = rng.uniform(-np.pi, np.pi, 50)
    q_in = rng.uniform(0.05, 1.0, 50)
    ref_e1, ref_e2 = param_util.phi_q2_ellipticity(phi_in, q_in)
    f_e1, f_e2 = profiles.phi_q_to_ellipticity(jnp.asarray(phi_in, jnp.float32),
                                               jnp.asarray(q_in, jnp.float32))
    np.testing.assert_allclose(np.asarray(f_e1), ref_e1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(f_e2), ref_e2, rtol=1e-5, atol=1e-6)
    _, q_back = profiles.ellipticity_to_phi_q(f_e1, f_e2)
    np.testing.assert_allclose(np.asarray(q_back), q_in, rtol=1e-5)


def test_ellipticity_cap_matches_lenstronomy():
    """|e| >= 1 is capped at 0.9999 exactly as lenstronomy does (q = 1/19999)."""
    e1 = np.array([1.0, 0.0, 3.0, -0.99995])
    e2 = np.array([0.0, -1.5, 4.0, 0.0])
    with jax.enable_x64(True):
        phi, q = map(np.asarray, profiles.ellipticity_to_phi_q(jnp.asarray(e1), jnp.asarray(e2)))
    ref_phi, ref_q = param_util.ellipticity2phi_q(e1, e2)
    np.testing.assert_allclose(phi, ref_phi, rtol=1e-12)
    np.testing.assert_allclose(q, ref_q, rtol=1e-12)


def test_shear_polar_to_cartesian_matches_lenstronomy():
    """shear_polar_to_cartesian(angle, gamma) equals param_util.shear_polar2cartesian(phi, gamma)."""
    rng = np.random.RandomState(8)
    angle = rng.uniform(-np.pi, np.pi, 40)
    gamma = rng.uniform(0.0, 0.3, 40)
    with jax.enable_x64(True):
        g1, g2 = map(np.asarray, profiles.shear_polar_to_cartesian(jnp.asarray(angle),
                                                                   jnp.asarray(gamma)))
    ref1, ref2 = param_util.shear_polar2cartesian(angle, gamma)
    np.testing.assert_allclose(g1, ref1, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g2, ref2, rtol=1e-12, atol=1e-15)
    ref_phi, ref_gamma = param_util.shear_cartesian2polar(g1, g2)
    np.testing.assert_allclose(ref_gamma, gamma, rtol=1e-12)


# ----------------------------------------------------------------------------
# Differentiability
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, fn, power", [
    ("SIS", profiles.deflection_sis, 1),
    ("SIE", profiles.deflection_sie, 1),
    ("POINT_MASS", profiles.deflection_point_mass, 2),
])
def test_grad_theta_e_is_finite_and_exact(name, fn, power):
    """d/d theta_E of a weighted sum of deflections is finite and equals power * sum / theta_E.

    SIS and SIE are linear in theta_E, a point mass is quadratic, so the exact
    derivative follows from lenstronomy's alpha. Draws include the round SIE
    (e1 = e2 = 0) and a centre exactly on one of the points (x = y = 0), where
    the gradient over all points must still be finite; the value is compared on
    points away from the centre (weights zeroed within MIN_DISTANCE).
    """
    x, y = _as_dtype(_points(), "float32")
    rng = np.random.RandomState(10)
    wx, wy = rng.normal(size=(2, x.shape[0])).astype(np.float32)

    @jax.jit
    def grad(theta_e, shape, cx, cy, weight_x, weight_y):
        def total(t):
            ax, ay = fn(jnp.asarray(x), jnp.asarray(y), t, *shape, cx, cy)
            return jnp.sum(weight_x * ax + weight_y * ay)
        return jax.grad(total)(theta_e)

    for i in range(6):
        theta_e = np.float32(rng.uniform(0.1, 2.0))
        cx, cy = (0.0, 0.0) if i == 0 else rng.uniform(-0.5, 0.5, 2)
        cx, cy = np.float32(cx), np.float32(cy)
        kw = {"theta_E": float(theta_e), "center_x": float(cx), "center_y": float(cy)}
        shape = ()
        if name == "SIE":
            e1, e2 = (0.0, 0.0) if i < 2 else rng.uniform(-0.3, 0.3, 2)
            shape = (np.float32(e1), np.float32(e2))
            kw.update(e1=float(shape[0]), e2=float(shape[1]))
        g_all = float(grad(theta_e, shape, cx, cy, wx, wy))
        assert np.isfinite(g_all), f"{name}: non-finite d/d theta_E for {kw}"
        keep = _far_from(x, y, cx, cy)
        g = float(grad(theta_e, shape, cx, cy, wx * keep, wy * keep))
        rx, ry = _lenstronomy_alpha([name], x, y, [kw])
        expected = power * np.sum((wx * rx + wy * ry)[keep]) / theta_e
        scale = power * np.sum((np.abs(wx * rx) + np.abs(wy * ry))[keep]) / theta_e
        assert abs(g - expected) <= 1e-4 * scale, (name, kw, g, expected)


def test_grad_point_masses_padding_and_values():
    """Gradient of the padded point-mass sum wrt each theta_E is finite; padding slots get exactly 0.

    For a real slot k the derivative is 2 * (slot k's weighted deflection) / theta_E_k,
    taken from lenstronomy's single POINT_MASS.
    """
    x, y = _as_dtype(_points(), "float32")
    rng = np.random.RandomState(11)
    wx, wy = rng.normal(size=(2, x.shape[0])).astype(np.float32)
    theta_e = np.array([0.2, 0.0, 0.05, 0.0, 0.3], np.float32)
    cx = np.array([1.0, 0.0, -0.7, 0.0, 0.4], np.float32)
    cy = np.array([0.3, 0.0, 1.1, 0.0, -1.3], np.float32)

    def total(t):
        ax, ay = profiles.deflection_point_masses(jnp.asarray(x), jnp.asarray(y), t,
                                                  jnp.asarray(cx), jnp.asarray(cy))
        return jnp.sum(wx * ax + wy * ay)

    g = np.asarray(jax.grad(total)(jnp.asarray(theta_e)))
    assert np.all(np.isfinite(g))
    assert g[1] == 0.0 and g[3] == 0.0
    for k in (0, 2, 4):
        kw = {"theta_E": float(theta_e[k]), "center_x": float(cx[k]), "center_y": float(cy[k])}
        rx, ry = _lenstronomy_alpha(["POINT_MASS"], x, y, [kw])
        expected = 2.0 * np.sum(wx * rx + wy * ry) / theta_e[k]
        scale = 2.0 * np.sum(np.abs(wx * rx) + np.abs(wy * ry)) / theta_e[k]
        assert abs(g[k] - expected) <= 1e-4 * scale, (k, g[k], expected)


def test_grad_sie_wrt_ellipticity_and_centre_matches_finite_differences():
    """d alpha / d(e1, e2, center) of the SIE (float64) equals central differences of lenstronomy."""
    x, y = _points()
    x, y = x[:60], y[:60]
    rng = np.random.RandomState(12)
    h = 1e-6
    names = ("e1", "e2", "center_x", "center_y")
    with jax.enable_x64(True):
        jac = jax.jit(jax.jacfwd(
            lambda p: jnp.stack(profiles.deflection_sie(jnp.asarray(x), jnp.asarray(y), p[0], p[1],
                                                        p[2], p[3], p[4]))))
        for _ in range(5):
            kw = {"theta_E": rng.uniform(0.1, 2.0), "e1": rng.uniform(-0.3, 0.3),
                  "e2": rng.uniform(-0.3, 0.3), "center_x": rng.uniform(-0.5, 0.5),
                  "center_y": rng.uniform(-0.5, 0.5)}
            p = jnp.asarray([kw[k] for k in ("theta_E",) + names], jnp.float64)
            j = np.asarray(jac(p))  # (2, P, 5)
            keep = _far_from(x, y, kw["center_x"], kw["center_y"])
            for col, name in enumerate(names, start=1):
                plus, minus = dict(kw), dict(kw)
                plus[name] += h
                minus[name] -= h
                fd = (np.stack(_lenstronomy_alpha(["SIE"], x, y, [plus]))
                      - np.stack(_lenstronomy_alpha(["SIE"], x, y, [minus]))) / (2 * h)
                np.testing.assert_allclose(j[:, keep, col], fd[:, keep], rtol=1e-5,
                                           atol=1e-6 * np.max(np.abs(fd)), err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_sie_wrt_ellipticity_at_round_point_matches_finite_differences(dtype):
    """At exactly e1 = e2 = 0, where the position angle is undefined, d alpha / d(e1, e2)
    is finite and equals central differences of lenstronomy's SIE across the round point."""
    x, y = _points()
    keep = _far_from(x, y, 0.1, -0.2)
    x, y = _as_dtype((x[keep], y[keep]), dtype)
    h = 1e-5
    with jax.enable_x64(dtype == "float64"):
        jac = jax.jacfwd(lambda e: jnp.stack(profiles.deflection_sie(
            jnp.asarray(x), jnp.asarray(y), 1.3, e[0], e[1], 0.1, -0.2)))
        j = np.asarray(jac(jnp.zeros(2, dtype)), np.float64)  # (2, P, 2)
    assert np.all(np.isfinite(j))
    for col, name in enumerate(("e1", "e2")):
        plus = {"theta_E": 1.3, "e1": 0.0, "e2": 0.0, "center_x": 0.1, "center_y": -0.2}
        minus = dict(plus)
        plus[name], minus[name] = h, -h
        fd = (np.stack(_lenstronomy_alpha(["SIE"], x, y, [plus]))
              - np.stack(_lenstronomy_alpha(["SIE"], x, y, [minus]))) / (2 * h)
        np.testing.assert_allclose(j[..., col], fd, rtol=0,
                                   atol={"float32": 1e-5, "float64": 1e-8}[dtype] * np.max(np.abs(fd)),
                                   err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sie_matches_lenstronomy_on_both_sides_of_the_near_round_switch(dtype):
    """Just below `sie_near_round_modulus` (first-order expansion) and just above it
    (Keeton's formula) the SIE equals lenstronomy's to the dtype's tolerance, so the
    switch leaves no step in the field."""
    switch = profiles.sie_near_round_modulus(dtype)
    p = _as_dtype(_draw(8), dtype)
    x, y = _as_dtype(_points(), dtype)
    angles = np.random.RandomState(3).uniform(0.0, 2.0 * np.pi, NUM_DRAWS)
    for modulus in (0.98 * switch, 1.02 * switch):
        e1, e2 = _as_dtype((modulus * np.cos(angles), modulus * np.sin(angles)), dtype)
        ax, ay = _call(_sie, dtype, x, y, p["theta_E"], e1, e2, p["center_x"], p["center_y"])
        for i in range(NUM_DRAWS):
            kw = {"theta_E": float(p["theta_E"][i]), "e1": float(e1[i]), "e2": float(e2[i]),
                  "center_x": float(p["center_x"][i]), "center_y": float(p["center_y"][i])}
            rx, ry = _lenstronomy_alpha(["SIE"], x, y, [kw])
            keep = _far_from(x, y, kw["center_x"], kw["center_y"])
            _assert_vectors_close(ax[i], ay[i], rx, ry, RTOL[dtype], keep,
                                  f"SIE(|e|={modulus:.3g}) draw {i}")
