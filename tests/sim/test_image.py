"""Noiseless lensed, PSF-convolved images from lensjax building blocks vs lenstronomy's ImageModel.

The lensjax image is assembled exactly as the DeepLense presets do it:
pixel_coordinates -> SIE + SHEAR (+ padded point masses) deflections -> elliptical
Sersic at the ray-traced positions -> (bin_supersampled) -> times pixel area ->
convolve_gaussian_psf. The reference is lenstronomy.ImSim.image_model.ImageModel
on a PixelGrid whose pixel (i, j) = (row, column) sits at
ra = ra_at_xy_0 + scale * j, dec = dec_at_xy_0 + scale * i, i.e.
transform_pix2angle = scale * identity and the grid centred on (0, 0); this is
lensjax's convention (x along W, y along H, centred). lenstronomy's GAUSSIAN PSF
is scipy.ndimage.gaussian_filter(mode='nearest', truncate=truncation); with
supersampling (and the default supersampling_convolution=False) lenstronomy
averages the sub-pixels first and convolves on the regular grid, as lensjax does.

Every configuration runs >= 20 random draws of lens and source parameters and
requires |image - reference| <= 1e-4 * max(reference) in float32 (1e-9 in float64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lenstronomy.Data.pixel_grid import PixelGrid
from lenstronomy.Data.psf import PSF
from lenstronomy.ImSim.image_model import ImageModel
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.LightModel.light_model import LightModel

from lensjax.sim import instrument, light, profiles

NUM_DRAWS = 20
NUM_POINT_MASSES = 6  # slots; each draw fills 0..NUM_POINT_MASSES of them, the rest is zero padding
RTOL = {"float32": 1e-4, "float64": 1e-9}

# name: (num_pix, pixel_scale, supersampling, psf fwhm or None, psf truncation)
CONFIGS = {
    "model_i": (150, 0.05, 1, 0.087, 3.0),                 # DeepLenseSim Model I
    "euclid_odd": (63, 0.101, 1, 0.16, 5.0),               # Model II optics, odd size
    "supersampled": (75, 0.08, 2, 2 * 0.08 * instrument.FWHM_PER_SIGMA, 2.5),  # PyLensing-like PSF
    "supersampled_no_psf": (64, 0.06, 2, None, 0.0),
}

LENS_KEYS = ("theta_E", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2")
SOURCE_KEYS = ("amp", "R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y")


def _draw(seed: int, dtype) -> dict[str, np.ndarray]:
    """Lens (SIE + shear + point masses) and source (Sersic) parameters, NUM_DRAWS of each."""
    rng = np.random.RandomState(seed)
    n, k = NUM_DRAWS, NUM_POINT_MASSES
    p = {
        "lens_theta_E": rng.uniform(0.5, 2.0, n),
        "lens_e1": rng.uniform(-0.3, 0.3, n), "lens_e2": rng.uniform(-0.3, 0.3, n),
        "lens_center_x": rng.uniform(-0.3, 0.3, n), "lens_center_y": rng.uniform(-0.3, 0.3, n),
        "lens_gamma1": rng.uniform(-0.1, 0.1, n), "lens_gamma2": rng.uniform(-0.1, 0.1, n),
        "source_amp": rng.uniform(1.0, 50.0, n),
        "source_R_sersic": rng.uniform(0.1, 1.0, n),
        "source_n_sersic": rng.uniform(0.5, 4.0, n),
        "source_e1": rng.uniform(-0.3, 0.3, n), "source_e2": rng.uniform(-0.3, 0.3, n),
        "source_center_x": rng.uniform(-0.35, 0.35, n),
        "source_center_y": rng.uniform(-0.35, 0.35, n),
    }
    theta = rng.uniform(0.01, 0.15, (n, k))
    theta[np.arange(k)[None, :] >= rng.randint(0, k + 1, n)[:, None]] = 0.0  # padding
    radius, angle = rng.uniform(0.25, 2.0, (n, k)), rng.uniform(0, 2 * np.pi, (n, k))
    p.update(pm_theta_E=theta, pm_x=radius * np.cos(angle), pm_y=radius * np.sin(angle))
    return {key: np.asarray(v, dtype) for key, v in p.items()}


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _lensjax_images(p, num_pix, pixel_scale, supersampling, fwhm, truncation, dtype):
    """Images (NUM_DRAWS, H, W) from the lensjax building blocks, vmapped over draws."""
    x, y = instrument.pixel_coordinates(num_pix, pixel_scale, supersampling, dtype=dtype)

    def one(q):
        ax, ay = profiles.deflection_sie(x, y, q["lens_theta_E"], q["lens_e1"], q["lens_e2"],
                                         q["lens_center_x"], q["lens_center_y"])
        sx, sy = profiles.deflection_shear(x, y, q["lens_gamma1"], q["lens_gamma2"])
        px, py = profiles.deflection_point_masses(x, y, q["pm_theta_E"], q["pm_x"], q["pm_y"])
        surface = light.sersic_ellipse(x - ax - sx - px, y - ay - sy - py, q["source_amp"],
                                       q["source_R_sersic"], q["source_n_sersic"], q["source_e1"],
                                       q["source_e2"], q["source_center_x"], q["source_center_y"])
        image = instrument.bin_supersampled(surface, supersampling) * pixel_scale**2
        if fwhm is not None:
            image = instrument.convolve_gaussian_psf(image, fwhm, pixel_scale, truncation)
        return image

    return jax.vmap(one)(p)


def _lenstronomy_images(p, num_pix, pixel_scale, supersampling, fwhm, truncation):
    """Reference images from lenstronomy's ImageModel, one per draw (float64)."""
    corner = -(num_pix - 1) / 2.0 * pixel_scale
    grid = PixelGrid(nx=num_pix, ny=num_pix, transform_pix2angle=np.eye(2) * pixel_scale,
                     ra_at_xy_0=corner, dec_at_xy_0=corner)
    psf = (PSF(psf_type="NONE") if fwhm is None else
           PSF(psf_type="GAUSSIAN", fwhm=fwhm, pixel_size=pixel_scale, truncation=truncation))
    model = ImageModel(grid, psf,
                       lens_model_class=LensModel(["SIE", "SHEAR"] + ["POINT_MASS"] * NUM_POINT_MASSES),
                       source_model_class=LightModel(["SERSIC_ELLIPSE"]),
                       kwargs_numerics={"supersampling_factor": supersampling})
    images = []
    for i in range(NUM_DRAWS):
        kwargs_lens = [
            {k: float(p["lens_" + k][i]) for k in ("theta_E", "e1", "e2", "center_x", "center_y")},
            {"gamma1": float(p["lens_gamma1"][i]), "gamma2": float(p["lens_gamma2"][i]),
             "ra_0": 0.0, "dec_0": 0.0},
        ] + [{"theta_E": float(t), "center_x": float(cx), "center_y": float(cy)}
             for t, cx, cy in zip(p["pm_theta_E"][i], p["pm_x"][i], p["pm_y"][i])]
        kwargs_source = [{k: float(p["source_" + k][i]) for k in SOURCE_KEYS}]
        images.append(model.image(kwargs_lens=kwargs_lens,
                                  kwargs_source=kwargs_source))
    return np.stack(images)


# Every configuration in float32; float64 on two of them to keep the suite fast.
@pytest.mark.parametrize("config, dtype", [(c, "float32") for c in CONFIGS]
                         + [("model_i", "float64"), ("supersampled", "float64")])
def test_lensed_image_matches_lenstronomy(config, dtype):
    """Noiseless lensed (SIE + shear + point masses), PSF-convolved Sersic images equal lenstronomy's."""
    num_pix, pixel_scale, supersampling, fwhm, truncation = CONFIGS[config]
    seed = list(CONFIGS).index(config) + 1
    p = _draw(seed, dtype)
    with jax.enable_x64(dtype == "float64"):
        ours = np.asarray(_lensjax_images({k: jnp.asarray(v) for k, v in p.items()}, num_pix,
                                          pixel_scale, supersampling, fwhm, truncation, dtype))
    assert ours.shape == (NUM_DRAWS, num_pix, num_pix) and ours.dtype == np.dtype(dtype)
    ref = _lenstronomy_images(p, num_pix, pixel_scale, supersampling, fwhm, truncation)
    assert np.any(p["pm_theta_E"] == 0) and np.any(p["pm_theta_E"] > 0)
    for i in range(NUM_DRAWS):
        peak = ref[i].max()
        assert peak > 0
        err = np.abs(ours[i] - ref[i]).max() / peak
        assert err <= RTOL[dtype], f"{config} draw {i}: max error {err:.2e} of the peak"


def test_pixel_orientation_matches_lenstronomy_coordinates():
    """pixel_coordinates: x along W (columns), y along H (rows), centred, as the PixelGrid used here."""
    for num_pix, scale, ss in ((5, 0.1, 1), (6, 0.05, 1), (4, 0.2, 3)):
        x, y = map(np.asarray, instrument.pixel_coordinates(num_pix, scale, ss, dtype=jnp.float32))
        n = num_pix * ss
        step = scale / ss
        corner = -(n - 1) / 2.0 * step
        grid = PixelGrid(nx=n, ny=n, transform_pix2angle=np.eye(2) * step,
                         ra_at_xy_0=corner, dec_at_xy_0=corner)
        ra, dec = grid.pixel_coordinates
        np.testing.assert_allclose(x, ra, atol=1e-6)
        np.testing.assert_allclose(y, dec, atol=1e-6)
        # lenstronomy's supersampled sub-pixel centres of the regular grid are the same points.
        if ss > 1:
            from lenstronomy.ImSim.Numerics.grid import RegularGrid
            sub = RegularGrid(num_pix, num_pix, np.eye(2) * scale, -(num_pix - 1) / 2 * scale,
                              -(num_pix - 1) / 2 * scale, supersampling_factor=ss)
            sx, sy = sub.coordinates_evaluate
            np.testing.assert_allclose(np.sort(x.ravel()), np.sort(sx), atol=1e-6)
            np.testing.assert_allclose(np.sort(y.ravel()), np.sort(sy), atol=1e-6)


@pytest.mark.parametrize("sigma_pix, truncation, shape", [
    (0.739, 3.0, (40, 40)), (0.672, 5.0, (33, 47)), (2.0, 2.5, (30, 30)), (3.3, 4.0, (9, 12)),
])
def test_gaussian_psf_matches_scipy_gaussian_filter(sigma_pix, truncation, shape):
    """convolve_gaussian_psf equals scipy.ndimage.gaussian_filter(mode='nearest') on random images.

    Includes a kernel wider than the image (edge handling) and a non-square image.
    """
    from scipy import ndimage
    rng = np.random.RandomState(4)
    image = rng.exponential(size=(3,) + shape)
    pixel_scale = 0.05
    fwhm = sigma_pix * pixel_scale * instrument.FWHM_PER_SIGMA
    convolve = jax.jit(functools.partial(instrument.convolve_gaussian_psf, fwhm=fwhm,
                                         pixel_scale=pixel_scale, truncation=truncation))
    with jax.enable_x64(True):
        ours = np.asarray(convolve(jnp.asarray(image)))
    for b in range(3):
        ref = ndimage.gaussian_filter(image[b], sigma_pix, mode="nearest", truncate=truncation)
        np.testing.assert_allclose(ours[b], ref, rtol=1e-12, atol=1e-14)


def test_bin_supersampled_matches_lenstronomy_re_size():
    """bin_supersampled is the block mean of lenstronomy's image_util.re_size."""
    from lenstronomy.Util import image_util
    image = np.random.RandomState(5).normal(size=(2, 24, 36))
    for s in (1, 2, 3, 4):
        with jax.enable_x64(True):
            ours = np.asarray(instrument.bin_supersampled(jnp.asarray(image), s))
        for b in range(2):
            ref = image_util.re_size(image[b], s) if s > 1 else image[b]
            np.testing.assert_allclose(ours[b], ref, rtol=1e-12, atol=1e-14)
