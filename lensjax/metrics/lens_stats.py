"""Physical statistics of lensing image sets: pixel-intensity histograms and power spectra.

Reported beside FID/FLD for generated images (shared/EVALUATION.md): they say in
physical terms *what* differs (the flux distribution, or structure at some
angular scale), where a Frechet distance gives one number.

Pixel histograms: both sets are histogrammed over the same bins (pixel values
are clipped into `range` first, so saturated or negative generated pixels
land in the edge bins instead of vanishing), normalised to probabilities, and
compared with the Jensen-Shannon distance in bits,

    JSD(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m),  m = (p + q) / 2,   distance = sqrt(JSD),

which is symmetric, finite when a bin is empty in one set, a metric, and lies in
[0, 1] (0: identical histograms, 1: disjoint supports). It equals
`scipy.spatial.distance.jensenshannon(p, q, base=2)`.

Power spectra: for an image x (H, W) with pixel scale d (arcsec) the 2-D power
spectral density is P(k) = d^2 |FFT(x)(k)|^2 / (H W) at the FFT frequencies
k = (kx, ky) in cycles per arcsec (1/arcsec). With this normalisation the
integral of P over the k-plane, sum_k P(k) dkx dky with dkx = 1/(W d),
dky = 1/(H d), equals the mean of x^2 (Parseval), and white noise of variance
s^2 has flat P = s^2 d^2 (units intensity^2 arcsec^2). No window is applied: the
periodic FFT treats the image as a torus, which is harmless for lensing cutouts
whose borders are dark sky. The mean is not subtracted, so the k = 0 bin measures
the mean intensity: P(0) = d^2 H W mean(x)^2.

Radial average: modes are grouped by |k| into bins of width dk = 1/(min(H, W) d)
centred at 0, dk, 2 dk, ... (mode k goes to bin floor(|k| / dk + 1/2)); the bins run
out to the corner modes (|k| up to sqrt(2) x Nyquist), so every mode is counted
once. The radial spectrum is the mean of P over the modes of a bin and over the
images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_BINS = 64
DEFAULT_RANGE = (0.0, 1.0)


def _as_image_stack(images: Any, name: str) -> np.ndarray:
    """(N, H, W) float64 from images (N, H, W) or (N, H, W, 1)."""
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 4:
        if images.shape[-1] != 1:
            raise ValueError(f"{name} must be single-channel (N, H, W, 1), got shape {images.shape}")
        images = images[..., 0]
    if images.ndim != 3 or images.shape[0] < 1:
        raise ValueError(f"{name} must be (N, H, W) or (N, H, W, 1) with N >= 1, got shape "
                         f"{images.shape}")
    if not np.all(np.isfinite(images)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return images


# ----------------------------------------------------------------------------
# Pixel-intensity histograms
# ----------------------------------------------------------------------------

def pixel_histogram(images: Any, bins: int = DEFAULT_BINS,
                    range: tuple[float, float] = DEFAULT_RANGE
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Probability of each intensity bin over all pixels of images (N, H, W[, 1]).

    `range` follows `np.histogram`'s argument of that name.

    Returns (edges (bins + 1,), probabilities (bins,)) summing to 1; values outside
    `range` are clipped into the edge bins.
    """
    images = _as_image_stack(images, "images")
    low, high = range
    if not high > low or bins < 1:
        raise ValueError(f"need bins >= 1 and range low < high, got {bins} and {range}")
    counts, edges = np.histogram(np.clip(images, low, high), bins=bins, range=(low, high))
    return edges, counts / counts.sum()


def jensen_shannon_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance in bits, in [0, 1], between probability vectors p (K,) and q (K,)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"p and q must be 1-D of equal length, got shapes {p.shape} and {q.shape}")
    p = p / p.sum()
    q = q / q.sum()
    m = (p + q) / 2

    def kl_to_m(x: np.ndarray) -> float:
        support = x > 0  # 0 log 0 = 0; m > 0 wherever x > 0
        return float(np.sum(x[support] * np.log2(x[support] / m[support])))

    divergence = (kl_to_m(p) + kl_to_m(q)) / 2
    return float(np.sqrt(max(divergence, 0.0)))


def pixel_histogram_distance(a_images: Any, b_images: Any, bins: int = DEFAULT_BINS,
                             range: tuple[float, float] = DEFAULT_RANGE) -> float:
    """Jensen-Shannon distance (bits, in [0, 1]) between the pixel histograms of two image sets.

    a_images (Na, H, W[, 1]) and b_images (Nb, H', W'[, 1]); see the module docstring.
    """
    _, p = pixel_histogram(a_images, bins, range)
    _, q = pixel_histogram(b_images, bins, range)
    return jensen_shannon_distance(p, q)


# ----------------------------------------------------------------------------
# Power spectra
# ----------------------------------------------------------------------------

def power_spectrum_2d(images: Any, pixel_scale_arcsec: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-D power spectral density of images (N, H, W[, 1]) -> (ky (H,), kx (W,), P (N, H, W)).

    Frequencies in 1/arcsec in `np.fft.fftfreq` order; P in intensity^2 arcsec^2
    (see the module docstring for the normalisation).
    """
    if not pixel_scale_arcsec > 0:
        raise ValueError(f"pixel_scale_arcsec must be > 0, got {pixel_scale_arcsec}")
    images = _as_image_stack(images, "images")
    _, height, width = images.shape
    spectrum = np.fft.fft2(images, axes=(-2, -1))
    power = np.abs(spectrum) ** 2 * (pixel_scale_arcsec ** 2 / (height * width))
    ky = np.fft.fftfreq(height, d=pixel_scale_arcsec)
    kx = np.fft.fftfreq(width, d=pixel_scale_arcsec)
    return ky, kx, power


def radial_bin_index(height: int, width: int, pixel_scale_arcsec: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Radial bin of every FFT mode (H, W) (int) and the bin centres k (K,) in 1/arcsec.

    Mode k goes to bin floor(|k| / dk + 1/2) (halves round up), dk = 1/(min(H, W) d).
    """
    shortest = min(height, width)
    # |k| / dk from integer frequency indices, so that ties (e.g. |k| = 4.5 dk on
    # non-square grids) are exact and round the same way on every platform.
    rows = np.fft.fftfreq(height) * height * (shortest / height)
    cols = np.fft.fftfreq(width) * width * (shortest / width)
    index = np.floor(np.hypot(rows[:, None], cols[None, :]) + 0.5).astype(np.int64)
    bin_width = 1.0 / (shortest * pixel_scale_arcsec)
    return index, bin_width * np.arange(index.max() + 1)


def radial_power_spectrum(images: Any, pixel_scale_arcsec: float
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of images (N, H, W[, 1]) -> (k (K,) in 1/arcsec, P (K,)).

    P is the mean 2-D power (intensity^2 arcsec^2) over the modes of each |k| bin
    and over the images; bins holding no mode (possible for very elongated
    images) are dropped.
    """
    _, _, power = power_spectrum_2d(images, pixel_scale_arcsec)
    index, k = radial_bin_index(power.shape[1], power.shape[2], pixel_scale_arcsec)
    mean_power = power.mean(axis=0)
    sums = np.bincount(index.ravel(), weights=mean_power.ravel(), minlength=k.size)
    counts = np.bincount(index.ravel(), minlength=k.size)
    occupied = counts > 0
    return k[occupied], sums[occupied] / counts[occupied]


def power_spectrum_ratio(generated: Any, real: Any, pixel_scale_arcsec: float
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Per-|k| ratio P_generated / P_real of radial spectra -> (k (K,) in 1/arcsec, ratio (K,)).

    Both sets must share the image size (N may differ). The ratio is NaN in a
    bin where the real images have no power.
    """
    generated = _as_image_stack(generated, "generated images")
    real = _as_image_stack(real, "real images")
    if generated.shape[1:] != real.shape[1:]:
        raise ValueError(f"image sizes differ: generated {generated.shape[1:]} and real "
                         f"{real.shape[1:]}")
    k, power_generated = radial_power_spectrum(generated, pixel_scale_arcsec)
    _, power_real = radial_power_spectrum(real, pixel_scale_arcsec)
    ratio = np.full_like(power_real, np.nan)
    np.divide(power_generated, power_real, out=ratio, where=power_real > 0)
    return k, ratio
