"""Distances for the DeepLenseSim recipes (flat LambdaCDM, no radiation).

Computed on the host once per preset with numpy quadrature; the values are
constants of a preset, so nothing here runs inside jit.
"""

from __future__ import annotations

import numpy as np

SPEED_OF_LIGHT_KM_S = 299792.458
# Physical constants in SI, matching astropy.constants (CODATA 2018 / IAU 2015).
GRAVITATIONAL_CONSTANT_SI = 6.67430e-11
SPEED_OF_LIGHT_SI = 299792458.0
SOLAR_MASS_KG = 1.988409870698051e30
MEGAPARSEC_M = 3.085677581491367e22
ARCSEC_PER_RADIAN = 180.0 / np.pi * 3600.0


def comoving_distance_mpc(z: float, h0: float = 70.0, omega_m: float = 0.3) -> float:
    """Line-of-sight comoving distance in Mpc of a flat LambdaCDM universe."""
    if not z >= 0:  # also rejects NaN
        raise ValueError(f"redshift z must be >= 0, got {z}")
    if not h0 > 0:
        raise ValueError(f"h0 must be > 0 (km/s/Mpc), got {h0}")
    if not 0.0 <= omega_m <= 1.0:
        raise ValueError(f"omega_m must lie in [0, 1], got {omega_m}")
    # Gauss-Legendre on 1/E(z) is smooth, so 64 nodes reach float64 precision.
    nodes, weights = np.polynomial.legendre.leggauss(64)
    zs = 0.5 * z * (nodes + 1.0)
    inv_e = 1.0 / np.sqrt(omega_m * (1.0 + zs) ** 3 + (1.0 - omega_m))
    return float(SPEED_OF_LIGHT_KM_S / h0 * 0.5 * z * np.sum(weights * inv_e))


def luminosity_distance_mpc(z: float, h0: float = 70.0, omega_m: float = 0.3) -> float:
    """Luminosity distance in Mpc of a flat LambdaCDM universe."""
    return (1.0 + z) * comoving_distance_mpc(z, h0, omega_m)


def einstein_radius_point_mass(
    mass_msun: float | np.ndarray,
    z_lens: float = 0.5,
    z_source: float = 1.0,
    h0: float = 70.0,
    omega_m: float = 0.3,
) -> float | np.ndarray:
    """Einstein radius in arcsec of a point mass, as DeepLenseSim computes it.

    theta_E = sqrt(4 G M / c^2 * D_LS / (D_L D_S)) with LUMINOSITY distances and
    D_LS = D_S - D_L. This is the published recipe (not the textbook angular
    diameter version); 1e12 Msun at z 0.5 -> 1.0 gives 1.2815 arcsec.
    """
    mass = np.asarray(mass_msun, dtype=np.float64)
    if not np.all(mass >= 0):  # also rejects NaN
        raise ValueError(f"mass_msun must be >= 0, got {mass_msun}")
    if not z_source > z_lens >= 0:
        raise ValueError(f"need z_source > z_lens >= 0, got z_lens={z_lens}, z_source={z_source}")
    d_l = luminosity_distance_mpc(z_lens, h0, omega_m) * MEGAPARSEC_M
    d_s = luminosity_distance_mpc(z_source, h0, omega_m) * MEGAPARSEC_M
    d_ls = d_s - d_l
    theta_rad = np.sqrt(
        4.0 * GRAVITATIONAL_CONSTANT_SI * mass * SOLAR_MASS_KG / SPEED_OF_LIGHT_SI**2
        * d_ls / (d_l * d_s)
    )
    theta = theta_rad * ARCSEC_PER_RADIAN
    return float(theta) if np.ndim(theta) == 0 else theta
