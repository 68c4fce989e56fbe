"""Distances and point-mass Einstein radii of lensjax.sim.cosmology vs astropy and the published numbers.

The DeepLenseSim recipe uses astropy's FlatLambdaCDM(H0=70, Om0=0.3, Ob0=0.05)
and theta_E = sqrt(4 G M / c^2 * D_LS / (D_L D_S)) with LUMINOSITY distances and
D_LS = D_S - D_L. astropy's default Tcmb0 = 0 K means no radiation term, so Ob0
(part of Om0) leaves every distance unchanged: that is checked here too, since it
is what lets lensjax drop Ob0.
"""

from __future__ import annotations

import astropy.constants as const
import astropy.units as u
import numpy as np
import pytest
from astropy.cosmology import FlatLambdaCDM

from lensjax.sim import cosmology

REDSHIFTS = (0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 3.7, 6.0)


def _theta_e_astropy(mass_msun, z_lens=0.5, z_source=1.0, cosmo=None):
    """The published formula evaluated entirely with astropy (distances, G, c, Msun)."""
    cosmo = cosmo or FlatLambdaCDM(H0=70, Om0=0.3, Ob0=0.05)
    d_l = cosmo.luminosity_distance(z_lens)
    d_s = cosmo.luminosity_distance(z_source)
    theta = np.sqrt(4 * const.G * mass_msun * u.Msun / const.c**2 * (d_s - d_l) / (d_l * d_s))
    return theta.decompose().value * u.rad.to(u.arcsec)


def test_published_einstein_radii():
    """1e12 Msun -> 1.2815" and 3e8 Msun -> 0.02220" (z 0.5 -> 1.0), as DeepLenseSim prints them."""
    assert abs(cosmology.einstein_radius_point_mass(1e12) - 1.2815) < 1e-4
    assert abs(cosmology.einstein_radius_point_mass(3e8) - 0.02220) < 1e-5


def test_einstein_radius_matches_astropy_formula():
    """einstein_radius_point_mass equals the formula evaluated with astropy (several M and z)."""
    for mass in (1e6, 3e8, 1e10, 1e12, 3e10 / 100):
        np.testing.assert_allclose(cosmology.einstein_radius_point_mass(mass),
                                   _theta_e_astropy(mass), rtol=1e-7)
    for z_lens, z_source in ((0.2, 0.6), (0.5, 2.0), (1.0, 3.0)):
        np.testing.assert_allclose(
            cosmology.einstein_radius_point_mass(1e11, z_lens, z_source),
            _theta_e_astropy(1e11, z_lens, z_source), rtol=1e-7)
    cosmo = FlatLambdaCDM(H0=67.7, Om0=0.31)
    np.testing.assert_allclose(
        cosmology.einstein_radius_point_mass(1e11, 0.4, 1.5, h0=67.7, omega_m=0.31),
        _theta_e_astropy(1e11, 0.4, 1.5, cosmo), rtol=1e-7)


def test_einstein_radius_scales_as_sqrt_mass():
    """theta_E(M) / theta_E(M0) = sqrt(M / M0); arrays in give arrays out; M = 0 gives 0."""
    masses = np.array([0.0, 1e6, 2.5e7, 3e8, 1e10, 1e12])
    theta = cosmology.einstein_radius_point_mass(masses)
    assert isinstance(theta, np.ndarray) and theta.shape == masses.shape
    np.testing.assert_allclose(theta, cosmology.einstein_radius_point_mass(1e12)
                               * np.sqrt(masses / 1e12), rtol=1e-12)
    assert theta[0] == 0.0
    assert isinstance(cosmology.einstein_radius_point_mass(1e10), float)


@pytest.mark.parametrize("h0, omega_m", [(70.0, 0.3), (67.7, 0.31), (70.0, 1.0), (50.0, 0.05)])
def test_distances_match_astropy(h0, omega_m):
    """Comoving and luminosity distances equal astropy's FlatLambdaCDM (Tcmb0 = 0) to 1e-6."""
    cosmo = FlatLambdaCDM(H0=h0, Om0=omega_m)
    for z in REDSHIFTS:
        ref_c = cosmo.comoving_distance(z).to_value(u.Mpc)
        ref_l = cosmo.luminosity_distance(z).to_value(u.Mpc)
        ours_c = cosmology.comoving_distance_mpc(z, h0, omega_m)
        ours_l = cosmology.luminosity_distance_mpc(z, h0, omega_m)
        if z == 0:
            assert ours_c == 0.0 and ours_l == 0.0
            continue
        np.testing.assert_allclose(ours_c, ref_c, rtol=1e-6, err_msg=f"z={z}")
        np.testing.assert_allclose(ours_l, ref_l, rtol=1e-6, err_msg=f"z={z}")


def test_baryon_density_does_not_change_flat_lcdm_distances():
    """The recipe's Ob0 = 0.05 is irrelevant: with Tcmb0 = 0, astropy gives identical distances."""
    with_baryons = FlatLambdaCDM(H0=70, Om0=0.3, Ob0=0.05)
    without = FlatLambdaCDM(H0=70, Om0=0.3)
    assert with_baryons.Tcmb0.value == 0.0
    z = np.array(REDSHIFTS[1:])
    np.testing.assert_allclose(with_baryons.luminosity_distance(z).value,
                               without.luminosity_distance(z).value, rtol=1e-12)
    for zi in z:
        np.testing.assert_allclose(cosmology.luminosity_distance_mpc(zi),
                                   with_baryons.luminosity_distance(zi).to_value(u.Mpc), rtol=1e-6)


def test_physical_constants_match_astropy():
    """G, c, the solar mass and the megaparsec agree with astropy (CODATA 2018 / IAU 2015)."""
    np.testing.assert_allclose(cosmology.GRAVITATIONAL_CONSTANT_SI, const.G.si.value, rtol=1e-12)
    np.testing.assert_allclose(cosmology.SPEED_OF_LIGHT_SI, const.c.si.value, rtol=1e-12)
    np.testing.assert_allclose(cosmology.SPEED_OF_LIGHT_KM_S, const.c.to_value(u.km / u.s),
                               rtol=1e-12)
    np.testing.assert_allclose(cosmology.SOLAR_MASS_KG, const.M_sun.si.value, rtol=1e-12)
    np.testing.assert_allclose(cosmology.MEGAPARSEC_M, u.Mpc.to(u.m), rtol=1e-12)
    np.testing.assert_allclose(cosmology.ARCSEC_PER_RADIAN, u.rad.to(u.arcsec), rtol=1e-12)
