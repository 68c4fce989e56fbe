"""Surface brightness profiles, in lenstronomy's parameterisation.

`sersic_ellipse` is lenstronomy's SERSIC_ELLIPSE: `amp` is the surface brightness
at R_sersic (per arcsec^2), the radius is the product average of the major and
minor axes, and b_n = 1.9992 n - 0.3271. Pure jax.numpy; shapes broadcast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lensjax.sim import domain

Array = jax.Array

# lenstronomy floors R and R_sersic at this radius (arcsec) to keep the centre finite.
SERSIC_SMOOTHING_ARCSEC = 1e-4


def sersic_b_n(n_sersic: Array) -> Array:
    """Ciotti-Bertin style approximation b_n = 1.9992 n - 0.3271, floored at 1e-5."""
    return jnp.maximum(1.9992 * n_sersic - 0.3271, 1e-5)


def elliptical_radius_product_average(x: Array, y: Array, e1: Array, e2: Array,
                                      center_x: Array = 0.0, center_y: Array = 0.0) -> Array:
    """Radius whose circles are the ellipses of (e1, e2), scaled by the product average."""
    dx, dy = x - center_x, y - center_y
    norm = jnp.sqrt(jnp.maximum(jnp.abs(1.0 - e1 * e1 - e2 * e2), 1e-6))
    xp = ((1.0 - e1) * dx - e2 * dy) / norm
    yp = (-e2 * dx + (1.0 + e1) * dy) / norm
    return jnp.sqrt(xp * xp + yp * yp)


def sersic_ellipse(x: Array, y: Array, amp: Array, R_sersic: Array, n_sersic: Array,
                   e1: Array, e2: Array, center_x: Array = 0.0,
                   center_y: Array = 0.0) -> Array:
    """Surface brightness of an elliptical Sersic profile at (x, y); shape of x."""
    domain.check_nonnegative("amp", amp)
    domain.check_positive("R_sersic", R_sersic)
    domain.check_positive("n_sersic", n_sersic)
    radius = elliptical_radius_product_average(x, y, e1, e2, center_x, center_y)
    r_frac = jnp.maximum(radius, SERSIC_SMOOTHING_ARCSEC) / jnp.maximum(
        R_sersic, SERSIC_SMOOTHING_ARCSEC)
    exponent = -sersic_b_n(n_sersic) * (_power_inverse_n(r_frac, n_sersic) - 1.0)
    return amp * jnp.exp(exponent)


# r ** (1/n) for fixed Sersic indices whose power is a product or square root:
# exact, and on XLA:CPU the log + exp they replace cost about half of a
# DeepLenseSim (n = 1) image without noise.
_EXACT_POWERS = {
    1.0: lambda r: r,
    2.0: lambda r: r * r,
    4.0: lambda r: jnp.square(r * r),
    0.5: jnp.sqrt,
    0.25: lambda r: jnp.sqrt(jnp.sqrt(r)),
}


def _power_inverse_n(r: Array, n_sersic: Array) -> Array:
    """r ** (1 / n_sersic) for r > 0; exact products / square roots for a fixed n in 1/4, 1/2, 1, 2, 4."""
    if isinstance(n_sersic, (int, float, np.number)) and 1.0 / float(n_sersic) in _EXACT_POWERS:
        return _EXACT_POWERS[1.0 / float(n_sersic)](r)
    # exp/log: one transcendental fewer than pow on XLA:CPU.
    return jnp.exp(jnp.log(r) / n_sersic)


def sersic_total_flux(amp: Array, R_sersic: Array, n_sersic: Array) -> Array:
    """Flux integrated to infinity of `sersic_ellipse` (product-average radius)."""
    domain.check_positive("R_sersic", R_sersic)
    domain.check_positive("n_sersic", n_sersic)
    b_n = sersic_b_n(n_sersic)
    log_gamma = jax.scipy.special.gammaln(2.0 * n_sersic)
    return (amp * R_sersic**2 * 2.0 * jnp.pi * n_sersic
            * jnp.exp(b_n + log_gamma - 2.0 * n_sersic * jnp.log(b_n)))


def sersic_amp_from_magnitude(magnitude: Array, zero_point: Array, R_sersic: Array,
                              n_sersic: Array) -> Array:
    """`amp` (counts/s per arcsec^2 at R_sersic) whose total flux has this magnitude."""
    counts_per_second = 10.0 ** (-0.4 * (magnitude - zero_point))
    return counts_per_second / sersic_total_flux(1.0, R_sersic, n_sersic)
