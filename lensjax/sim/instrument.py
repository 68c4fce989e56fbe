"""Instrument: pixel grids, Gaussian PSF, noise models and normalisation.

Image arrays are (..., H, W) with x (arcsec) increasing along W and y along H;
pixel centres sit symmetrically about the optical axis at (0, 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import scipy.special

from lensjax.sim import domain

Array = jax.Array

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


# ----------------------------------------------------------------------------
# Pixel grids
# ----------------------------------------------------------------------------

def pixel_coordinates(num_pix: int, pixel_scale: float, supersampling: int = 1,
                      dtype=jnp.float32) -> tuple[Array, Array]:
    """Sky coordinates (arcsec) of the pixel (or sub-pixel) centres.

    Returns x, y of shape (num_pix * supersampling,) * 2, centred on (0, 0).
    """
    domain.check_positive_int("num_pix", num_pix)
    domain.check_positive_int("supersampling", supersampling)
    domain.check_positive("pixel_scale", pixel_scale)
    n = num_pix * supersampling
    step = pixel_scale / supersampling
    axis = (np.arange(n) - (n - 1) / 2.0) * step
    x, y = np.meshgrid(axis, axis)
    return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def bin_supersampled(image: Array, supersampling: int) -> Array:
    """Mean over supersampling x supersampling blocks: (..., H*s, W*s) -> (..., H, W)."""
    domain.check_positive_int("supersampling", supersampling)
    if supersampling == 1:
        return image
    *lead, hs, ws = image.shape
    s = supersampling
    if hs % s or ws % s:
        raise ValueError(f"image size {hs}x{ws} is not divisible by supersampling={s}")
    return image.reshape(*lead, hs // s, s, ws // s, s).mean(axis=(-3, -1))


def mean_pool(image: Array, factor: int) -> Array:
    """factor x factor mean pooling of the last two axes (the VI.B LR operator)."""
    domain.check_positive_int("factor", factor)
    *_, h, w = image.shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by factor={factor}")
    return bin_supersampled(image, factor)


# ----------------------------------------------------------------------------
# PSF
# ----------------------------------------------------------------------------

def gaussian_kernel_1d(sigma_pix: float, truncation: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps exactly as scipy.ndimage.gaussian_filter builds them."""
    domain.check_positive("sigma_pix", sigma_pix)
    domain.check_positive("truncation", truncation)
    radius = int(truncation * float(sigma_pix) + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma_pix) ** 2)
    return taps / taps.sum()


def _filter_axis_nearest(image: Array, taps: np.ndarray, axis: int) -> Array:
    """1-D filter along `axis` with scipy's mode='nearest' edges; shape of image."""
    radius = len(taps) // 2
    size = image.shape[axis]

    def shifted_sum(starts: list[int], width: int = 1) -> Array:
        """sum_i taps[i] * image[starts[i] : starts[i] + width] along axis, in tap order."""
        out = None
        for start, weight in zip(starts, taps):
            term = jax.lax.slice_in_dim(image, start, start + width, axis=axis) * weight
            out = term if out is None else out + term
        return out

    def at(index: int) -> Array:
        """Output `index` (width 1 along axis): its taps read the clamped inputs."""
        return shifted_sum([min(max(index + i - radius, 0), size - 1) for i in range(len(taps))])

    if size <= 2 * radius:
        return jnp.concatenate([at(i) for i in range(size)], axis=axis)
    # The interior is a sum of shifted slices of the image; only the `radius`
    # outputs at each end read the replicated edge, one by one. Padding the whole
    # image instead (jnp.pad, mode="edge") makes XLA:CPU read every input through
    # a concatenate, a select per read: the PSF of 64 model_ii images took 1.06 ms
    # on one core that way and takes 0.28 ms this way, with the same values (the
    # same products summed in the same order).
    interior = shifted_sum(list(range(len(taps))), size - 2 * radius)
    return jnp.concatenate([at(i) for i in range(radius)] + [interior]
                           + [at(i) for i in range(size - radius, size)], axis=axis)


def convolve_gaussian_psf(image: Array, fwhm: float, pixel_scale: float,
                          truncation: float = 3.0) -> Array:
    """Gaussian PSF, as scipy.ndimage.gaussian_filter(mode='nearest') on (..., H, W).

    fwhm and pixel_scale in arcsec; the kernel is cut at `truncation` sigma.
    """
    domain.check_positive("fwhm", fwhm)
    domain.check_positive("pixel_scale", pixel_scale)
    sigma_pix = float(fwhm) / FWHM_PER_SIGMA / float(pixel_scale)
    taps = gaussian_kernel_1d(sigma_pix, truncation).astype(np.dtype(image.dtype))
    return _filter_axis_nearest(_filter_axis_nearest(image, taps, -1), taps, -2)


# ----------------------------------------------------------------------------
# Random draws
# ----------------------------------------------------------------------------

# Below this rate Poisson draws are exact inversions of the CDF; above it a
# Cornish-Fisher normal quantile is used (see `poisson_from_uniform`).
POISSON_INVERSION_MAX_RATE = 3.0


def _inversion_steps(resolution: float) -> int:
    """CDF steps after which P(X > steps | the switch rate) < resolution / 2.

    Uniforms never come closer to 1 than half their resolution, so more steps
    could not change any draw.
    """
    tail = 1.0 - math.exp(-POISSON_INVERSION_MAX_RATE)
    prob, steps = math.exp(-POISSON_INVERSION_MAX_RATE), 0
    while tail > resolution / 2.0 and steps < 100:
        steps += 1
        prob *= POISSON_INVERSION_MAX_RATE / steps
        tail -= prob
    return steps


def uniform_to_normal(u: Array) -> Array:
    """Standard normal quantile of uniforms in (0, 1)."""
    return jax.scipy.special.ndtri(u)


def poisson_from_uniform(u: Array, rate: Array, z: Array | None = None,
                         resolution: float | None = None) -> Array:
    """Poisson(rate) draws from uniforms u in (0, 1), elementwise; float result.

    rate < 3: exact inversion of the Poisson CDF (unrolled, vectorised).
    rate >= 3: X = round(rate + s z + (z^2 - 1) / 6 + (z - z^3) / (72 s)), with
    z = Phi^-1(u) and s = sqrt(rate - 1/12): the Cornish-Fisher quantile to third
    order (skewness and kurtosis terms), its spread set so that the variance after
    rounding (+1/12) is the rate. Total variation to Poisson(rate) < 0.003 just
    above the switch, 0.0018 at rate 5, 0.0006 at 10 (tested against scipy); the
    second-order quantile used before gave 0.0051 at rate 5. jax.random.poisson
    is exact but ~30x slower batched on CPU.
    z: Phi^-1(u) if already known; resolution: spacing of the values u can take
    (default: the dtype's epsilon), which bounds the inversion steps needed.
    """
    rate = jnp.maximum(rate, 0.0)
    small = rate < POISSON_INVERSION_MAX_RATE
    rate_small = jnp.where(small, rate, 0.0)
    if resolution is None:
        resolution = float(jnp.finfo(u.dtype).eps)

    # X = #{k : u > CDF(k)}, with both sides scaled by e^rate: u e^rate against
    # the partial sums of rate^j / j!. Unrolled with constant 1/k! (4x faster on
    # XLA:CPU than a fori_loop) and an integer count: four operations per step.
    scaled_u = u * jnp.exp(rate_small)
    power, partial_sum = jnp.ones_like(u), jnp.ones_like(u)
    count = jnp.zeros(u.shape, jnp.int32)
    for k in range(1, _inversion_steps(resolution) + 1):
        count = count + (scaled_u > partial_sum).astype(jnp.int32)
        power = power * rate_small
        partial_sum = partial_sum + power * np.asarray(1.0 / math.factorial(k), u.dtype)
    count = count.astype(u.dtype)
    if z is None:
        z = uniform_to_normal(u)
    rate_big = jnp.maximum(rate, POISSON_INVERSION_MAX_RATE)
    spread = jnp.sqrt(rate_big - 1.0 / 12.0)
    quantile = rate_big + spread * z + (z * z - 1.0) / 6.0 + (z - z * z * z) / (72.0 * spread)
    big = jnp.maximum(jnp.round(quantile), 0.0)
    return jnp.where(small, count, big)


def poisson(key: Array, rate: Array, exact: bool = False) -> Array:
    """Poisson draws of the shape of `rate` (float). exact=True uses jax.random.poisson."""
    if exact:
        return jax.random.poisson(key, jnp.maximum(rate, 0.0), rate.shape).astype(rate.dtype)
    return poisson_from_uniform(_open_uniform(key, rate.shape, rate.dtype), rate)


def _open_uniform(key: Array, shape, dtype) -> Array:
    """Uniforms in (0, 1) at the midpoints of 2^24 cells (float32's resolution near 1)."""
    cells = (random_words(key, shape) >> 8).astype(dtype)
    return (cells + 0.5) * (2.0**-24)


UNIFORM_16BIT_RESOLUTION = 2.0**-16


# Rotation constants of Threefry-2x32 (Salmon et al. 2011), rounds 0-3 and 4-7.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry_2x32_elementwise(key_data: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
    """Threefry-2x32 with 20 rounds on uint32 counter pairs (x0, x1) of any shape.

    Bit-identical to `jax.extend.random.threefry_2x32` (tested), written as plain
    elementwise jnp operations: XLA:CPU fuses them into one vectorised loop, 2.6x
    faster than jax's own lowering of the primitive on the development CPU.
    key_data: (2,) uint32.
    """
    k0, k1 = key_data[0], key_data[1]
    schedule = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + k0, x1 + k1
    for r in range(20):
        rotation = _THREEFRY_ROTATIONS[(r // 4) % 2][r % 4]
        x0 = x0 + x1
        x1 = (x1 << jnp.uint32(rotation)) | (x1 >> jnp.uint32(32 - rotation))
        x1 = x1 ^ x0
        if r % 4 == 3:  # key injection after every 4 rounds
            s = r // 4 + 1
            x0 = x0 + schedule[s % 3]
            x1 = x1 + schedule[(s + 1) % 3] + jnp.uint32(s)
    return x0, x1


def random_words(key: Array, shape) -> Array:
    """Random uint32 words of `shape`, deterministic in `key`.

    For threefry keys, both 32-bit outputs of each Threefry-2x32 block are used
    (counters 0 .. n-1, as jax's non-partitionable mode does); jax.random.bits
    in its default partitionable mode spends a whole block per word, twice the work.
    The words equal `jax.extend.random.threefry_2x32(key_data, arange(n))` on every
    backend; on CPU they are computed by `threefry_2x32_elementwise` (faster there).
    """
    if jax.random.key_impl(key) != "threefry2x32":  # e.g. rbg keys
        return jax.random.bits(key, shape, jnp.uint32)
    size = math.prod(shape)
    padded = size + size % 2
    key_data = jax.random.key_data(key)
    if jax.default_backend() == "cpu":
        half = jnp.arange(padded // 2, dtype=jnp.uint32)
        first, second = threefry_2x32_elementwise(key_data, half, half + jnp.uint32(padded // 2))
        words = jnp.concatenate([first, second])
    else:
        words = jax.extend.random.threefry_2x32(key_data, jnp.arange(padded, dtype=jnp.uint32))
    return words[:size].reshape(shape)


@functools.lru_cache(maxsize=None)
def _normal_quantiles_16bit(dtype_name: str) -> np.ndarray:
    """Phi^-1 at the 2^16 midpoints (k + 1/2) / 2^16, computed in float64."""
    grid = (np.arange(65536, dtype=np.float64) + 0.5) * UNIFORM_16BIT_RESOLUTION
    return scipy.special.ndtri(grid).astype(dtype_name)


def uniforms_16bit(key: Array, shape, dtype=jnp.float32
                   ) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """Two independent 16-bit uniforms in (0, 1) of `shape` from one 32-bit word each.

    Returns ((u1, z1), (u2, z2)): u at the midpoints (k + 1/2) / 2^16 (never 0 or
    1) and z = Phi^-1(u) exactly, looked up in a 2^16-entry table (a gather is
    ~3x cheaper than evaluating ndtri). 16-bit uniforms shift no inverse-CDF
    probability by more than 2^-16 and cut normal tails at 4.3 sigma (mass 2e-5).
    """
    bits = random_words(key, shape)
    table = jnp.asarray(_normal_quantiles_16bit(jnp.dtype(dtype).name))
    out = []
    for index in ((bits >> 16).astype(jnp.int32), (bits & 0xFFFF).astype(jnp.int32)):
        u = (index.astype(dtype) + 0.5) * UNIFORM_16BIT_RESOLUTION
        out.append((u, jnp.take(table, index, mode="clip")))
    return out[0], out[1]


def standard_normal(key: Array, shape, dtype=jnp.float32) -> Array:
    """N(0, 1) draws."""
    return jax.random.normal(key, shape, dtype)


# ----------------------------------------------------------------------------
# Noise models
# ----------------------------------------------------------------------------

def noise_model_i(key: Array, model: Array, exposure_time: Array,
                  background_rms: float = 0.01, exact_poisson: bool = False) -> Array:
    """DeepLenseSim Model I noise; returns the stored image in counts, shape of `model`.

    image_real = t * (model + poisson_part + background), poisson_part ~
    N(0, model / t) (lenstronomy's add_poisson), background ~ N(0, rms^2);
    stored = Poisson(max(image_real, 0)).

    The two Gaussian terms are drawn as their sum, one N(0, model / t + rms^2)
    (the same distribution), and the normal and the Poisson uniform share one
    32-bit random word (16 bits each, see `uniforms_16bit`): the random bits
    are the simulator's main cost on CPU. exact_poisson=True draws both at full
    resolution, with jax.random.poisson.
    """
    domain.check_positive("exposure_time", exposure_time)
    domain.check_nonnegative("background_rms", background_rms)
    sigma = jnp.sqrt(jnp.maximum(model, 0.0) / exposure_time + background_rms**2)
    if exact_poisson:
        k_gauss, k_count = jax.random.split(key)
        gauss = standard_normal(k_gauss, model.shape, model.dtype)
        image_real = exposure_time * (model + gauss * sigma)
        return poisson(k_count, jnp.maximum(image_real, 0.0), exact=True)
    (_, z_gauss), (u_count, z_count) = uniforms_16bit(key, model.shape, model.dtype)
    image_real = exposure_time * (model + z_gauss * sigma)
    return poisson_from_uniform(u_count, jnp.maximum(image_real, 0.0), z=z_count,
                                resolution=UNIFORM_16BIT_RESOLUTION)


@dataclasses.dataclass(frozen=True)
class SingleBand:
    """A lenstronomy SingleBand observation (data in electrons per second)."""

    name: str
    pixel_scale: float          # arcsec / pixel
    seeing: float               # Gaussian PSF FWHM, arcsec
    exposure_time: float        # seconds per exposure
    num_exposures: int
    sky_brightness: float       # mag / arcsec^2
    magnitude_zero_point: float  # mag giving 1 e-/s
    read_noise: float           # e- per exposure
    ccd_gain: float             # e- / ADU (kept for reference; data are in e-)

    def __post_init__(self):
        for field in ("pixel_scale", "seeing", "exposure_time", "ccd_gain"):
            domain.check_positive(field, getattr(self, field))
        domain.check_nonnegative("read_noise", self.read_noise)
        domain.check_positive_int("num_exposures", self.num_exposures)

    @property
    def total_exposure_time(self) -> float:
        return self.exposure_time * self.num_exposures

    @property
    def sky_cps_per_pixel(self) -> float:
        """Sky level in e-/s per pixel."""
        return 10.0 ** (-0.4 * (self.sky_brightness - self.magnitude_zero_point)) * self.pixel_scale**2

    @property
    def background_noise(self) -> float:
        """Gaussian sigma of read + sky noise per pixel, in e-/s (lenstronomy's bkg_noise)."""
        t = self.total_exposure_time
        return math.sqrt(self.num_exposures * self.read_noise**2 + t * self.sky_cps_per_pixel) / t


# The DeepLenseSim recipe's numbers (shared/SIMULATION.md). lenstronomy 1.14's own
# Euclid config differs (566 s, sky 22.3, zero point 25.72); its F160W matches.
EUCLID_VIS = SingleBand(name="Euclid VIS", pixel_scale=0.101, seeing=0.16, exposure_time=565.0,
                        num_exposures=4, sky_brightness=22.35, magnitude_zero_point=24.0,
                        read_noise=4.2, ccd_gain=3.1)
HST_WFC3_F160W = SingleBand(name="HST WFC3 F160W", pixel_scale=0.08, seeing=0.08,
                            exposure_time=5400.0, num_exposures=1, sky_brightness=22.3,
                            magnitude_zero_point=25.96, read_noise=4.0, ccd_gain=2.5)


def noise_single_band(key: Array, model_cps: Array, band: SingleBand) -> Array:
    """lenstronomy's SimAPI.noise_for_model: Gaussian background + Gaussian shot noise (e-/s).

    Both terms are drawn as one normal of the summed variance (same distribution).
    """
    t = band.total_exposure_time
    sigma = jnp.sqrt(band.background_noise**2 + jnp.maximum(model_cps, 0.0) / t)
    return model_cps + standard_normal(key, model_cps.shape, model_cps.dtype) * sigma


def noise_sky_poisson(key: Array, image: Array, exposure_time: float, sky_level: float,
                      exact_poisson: bool = False) -> Array:
    """PyLensing imaging noise: Poisson counts of (image + sky) * t, back in image units minus sky."""
    domain.check_positive("exposure_time", exposure_time)
    domain.check_nonnegative("sky_level", sky_level)
    counts = poisson(key, (image + sky_level) * exposure_time, exact=exact_poisson)
    return counts / exposure_time - sky_level


# ----------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------

def min_max_normalise(image: Array) -> Array:
    """Per-image min-max scaling of (..., H, W) to [0, 1] (a constant image maps to 0)."""
    lo = image.min(axis=(-2, -1), keepdims=True)
    hi = image.max(axis=(-2, -1), keepdims=True)
    span = hi - lo
    scaled = jnp.clip((image - lo) / jnp.where(span > 0, span, 1.0), 0.0, 1.0)
    # XLA may divide by multiplying with a reciprocal; pin the maximum to exactly 1.
    return jnp.where(span > 0, jnp.where(image == hi, 1.0, scaled), 0.0)
