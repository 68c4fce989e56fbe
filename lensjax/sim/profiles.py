"""Deflection angles of lens mass profiles, in lenstronomy's parameterisation.

All functions are pure jax.numpy, broadcast over their arguments and keep the
dtype of the coordinates (float32 by default, float64 when x64 is enabled).
Angles are in arcsec. Each returns the deflection (alpha_x, alpha_y) such that
the source-plane position is (x - alpha_x, y - alpha_y).

Conventions (checked against lenstronomy in tests/sim/test_profiles.py):
- ellipticity (e1, e2): c = |(e1, e2)|, q = (1 - c) / (1 + c), phi = atan2(e2, e1) / 2.
- SIE is lenstronomy's NIE with a vanishing core; theta_E is the product-average
  Einstein radius, so the Keeton deflection uses b = theta_E * sqrt(q).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lensjax.sim import domain

Array = jax.Array

# lenstronomy's SIE keeps a core of 1e-10 arcsec so that the centre is finite.
SIE_CORE_ARCSEC = 1e-10
# Smallest ellipticity modulus treated as elliptical; below it the exact
# spherical limit is used (the elliptical formula divides by sqrt(1 - q^2)).
_ROUND_EPS = 1e-7


def ellipticity_to_phi_q(e1: Array, e2: Array) -> tuple[Array, Array]:
    """(e1, e2) -> (position angle phi in rad, axis ratio q); lenstronomy caps c at 0.9999."""
    c = jnp.minimum(jnp.hypot(e1, e2), 0.9999)
    return jnp.arctan2(e2, e1) / 2.0, (1.0 - c) / (1.0 + c)


def phi_q_to_ellipticity(phi: Array, q: Array) -> tuple[Array, Array]:
    """(position angle phi in rad, axis ratio q in (0, 1]) -> (e1, e2)."""
    domain.check_in_range("q", q, 0.0, 1.0, low_inclusive=False)
    c = (1.0 - q) / (1.0 + q)
    return c * jnp.cos(2.0 * phi), c * jnp.sin(2.0 * phi)


def shear_polar_to_cartesian(angle: Array, gamma: Array) -> tuple[Array, Array]:
    """Shear magnitude and angle (rad) -> (gamma1, gamma2), lenstronomy's convention."""
    domain.check_nonnegative("gamma", gamma)
    return gamma * jnp.cos(2.0 * angle), gamma * jnp.sin(2.0 * angle)


def _rotate(x: Array, y: Array, angle: Array) -> tuple[Array, Array]:
    """Coordinates in a frame rotated by `angle` (lenstronomy's util.rotate)."""
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return x * cos + y * sin, -x * sin + y * cos


def _safe_sqrt(value: Array) -> Array:
    """sqrt with a finite gradient at 0 (the gradient there is taken as 0)."""
    positive = value > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, value, 1.0)), 0.0)


def deflection_sis(x: Array, y: Array, theta_E: Array, center_x: Array = 0.0,
                   center_y: Array = 0.0) -> tuple[Array, Array]:
    """Singular isothermal sphere: alpha = theta_E * r_hat. Shapes broadcast."""
    domain.check_nonnegative("theta_E", theta_E)
    dx, dy = x - center_x, y - center_y
    r = jnp.sqrt(dx * dx + dy * dy)
    scale = theta_E / jnp.maximum(r, jnp.finfo(dx.dtype).tiny ** 0.5)
    return scale * dx, scale * dy


def deflection_sie(x: Array, y: Array, theta_E: Array, e1: Array, e2: Array,
                   center_x: Array = 0.0, center_y: Array = 0.0) -> tuple[Array, Array]:
    """Singular isothermal ellipsoid (lenstronomy SIE = NIE with s -> 0). Shapes broadcast."""
    domain.check_nonnegative("theta_E", theta_E)
    e1 = jnp.asarray(e1, dtype=jnp.result_type(x))
    e2 = jnp.asarray(e2, dtype=jnp.result_type(x))
    c = jnp.minimum(_safe_sqrt(e1 * e1 + e2 * e2), 0.9999)
    phi = jnp.arctan2(e2, e1) / 2.0
    q = (1.0 - c) / (1.0 + c)
    # 1 - q^2 = 4c / (1 + c)^2 exactly; the direct form cancels badly in float32.
    k = 2.0 * _safe_sqrt(c) / (1.0 + c)
    b = theta_E * jnp.sqrt(q)
    s = SIE_CORE_ARCSEC / jnp.sqrt(q)
    xr, yr = _rotate(x - center_x, y - center_y, phi)
    psi = jnp.sqrt(q * q * (s * s + xr * xr) + yr * yr)
    u = xr / (psi + s)
    v = yr / (psi + q * q * s)
    elliptical = k > _ROUND_EPS
    k_safe = jnp.where(elliptical, k, 1.0)
    # arctan(k u) / k -> u as k -> 0 (the SIS limit), likewise arctanh.
    ax_r = b * jnp.where(elliptical, jnp.arctan(k_safe * u) / k_safe, u)
    ay_r = b * jnp.where(elliptical, jnp.arctanh(k_safe * v) / k_safe, v)
    return _rotate(ax_r, ay_r, -phi)


def deflection_shear(x: Array, y: Array, gamma1: Array, gamma2: Array,
                     ra_0: Array = 0.0, dec_0: Array = 0.0) -> tuple[Array, Array]:
    """External shear (lenstronomy SHEAR). Shapes broadcast."""
    dx, dy = x - ra_0, y - dec_0
    return gamma1 * dx + gamma2 * dy, gamma2 * dx - gamma1 * dy


def _point_mass_min_radius_sq(dtype) -> float:
    # lenstronomy floors r at 1e-25; float32 cannot square that, so floor r^2
    # at the smallest normal number instead. Only a pixel centred on a mass sees it.
    return float(jnp.finfo(dtype).tiny)


def deflection_point_mass(x: Array, y: Array, theta_E: Array, center_x: Array = 0.0,
                          center_y: Array = 0.0) -> tuple[Array, Array]:
    """Point mass (lenstronomy POINT_MASS): alpha = theta_E^2 r_vec / r^2. Shapes broadcast."""
    domain.check_nonnegative("theta_E", theta_E)
    dx, dy = x - center_x, y - center_y
    r2 = jnp.maximum(dx * dx + dy * dy, _point_mass_min_radius_sq(dx.dtype))
    scale = theta_E * theta_E / r2
    return scale * dx, scale * dy


def deflection_point_masses(x: Array, y: Array, theta_E: Array, center_x: Array,
                            center_y: Array) -> tuple[Array, Array]:
    """Sum of K point masses on one image plane.

    x, y: (..., H, W) or any shape P; theta_E, center_x, center_y: (K,).
    Returns two arrays of the shape of x. Padding with theta_E = 0 adds nothing,
    which gives static shapes for a variable number of subhaloes.
    """
    domain.check_nonnegative("theta_E", theta_E)
    theta_E_sq = jnp.asarray(theta_E, dtype=x.dtype) ** 2
    masses = (theta_E_sq, jnp.asarray(center_x, x.dtype), jnp.asarray(center_y, x.dtype))
    strategy = point_mass_strategy()
    if strategy == "reduce":
        return _point_masses_reduce(x, y, *masses)
    if strategy == "unroll":
        return _point_masses_unrolled(x, y, *masses)
    return _point_masses_scan(x, y, *masses)


# "unroll" writes the K masses as K terms of one elementwise fusion, so both
# accumulators stay in registers (best on CPU: 1.2-2.2x faster per pair than
# "scan" on 64^2-210^2 grids in chunks of 4 images; the simulator keeps chunks
# under CPU_CHUNK_PIXELS, beyond which this fusion falls out of cache). "scan"
# keeps one (H, W) accumulator in memory and walks the masses (compiles fastest);
# "reduce" writes the sum as one fused reduction over K (best on GPUs, where XLA
# keeps it in registers; a (H, W, K) intermediate thrashes a CPU's cache).
# "auto" picks "unroll" on CPU and "reduce" elsewhere.
POINT_MASS_STRATEGY = "auto"
POINT_MASS_STRATEGIES = ("auto", "unroll", "scan", "reduce")


def point_mass_strategy() -> str:
    """The point-mass summation in use: 'unroll', 'scan' or 'reduce'."""
    if POINT_MASS_STRATEGY not in POINT_MASS_STRATEGIES:
        raise ValueError(f"POINT_MASS_STRATEGY must be one of {POINT_MASS_STRATEGIES}, "
                         f"got {POINT_MASS_STRATEGY!r}")
    if POINT_MASS_STRATEGY != "auto":
        return POINT_MASS_STRATEGY
    return "unroll" if jax.default_backend() == "cpu" else "reduce"


def _add_point_mass(ax, ay, x, y, theta_E_sq, center_x, center_y, r2_min):
    """Accumulators (ax, ay) plus the deflection of one point mass (theta_E^2 given)."""
    dx, dy = x - center_x, y - center_y
    scale = theta_E_sq / jnp.maximum(dx * dx + dy * dy, r2_min)
    return ax + scale * dx, ay + scale * dy


def _point_masses_scan(x, y, theta_E_sq, center_x, center_y):
    r2_min = _point_mass_min_radius_sq(x.dtype)

    def add_one(carry, mass):
        return _add_point_mass(*carry, x, y, *mass, r2_min), None

    zeros = jnp.zeros_like(x)
    (ax, ay), _ = jax.lax.scan(add_one, (zeros, zeros), (theta_E_sq, center_x, center_y))
    return ax, ay


def _point_masses_unrolled(x, y, theta_E_sq, center_x, center_y):
    r2_min = _point_mass_min_radius_sq(x.dtype)
    ax = ay = jnp.zeros_like(x)
    for k in range(theta_E_sq.shape[0]):
        ax, ay = _add_point_mass(ax, ay, x, y, theta_E_sq[k], center_x[k], center_y[k], r2_min)
    # Materialise the sums: otherwise XLA may copy the K-term fusion into each of
    # its consumers and evaluate it several times.
    return jax.lax.optimization_barrier((ax, ay))


def _point_masses_reduce(x, y, theta_E_sq, center_x, center_y):
    dx = x[..., None] - center_x
    dy = y[..., None] - center_y
    scale = theta_E_sq / jnp.maximum(dx * dx + dy * dy, _point_mass_min_radius_sq(x.dtype))
    return jnp.sum(scale * dx, axis=-1), jnp.sum(scale * dy, axis=-1)
