"""Image-quality metrics for super-resolution: MSE, PSNR, SSIM, and the bicubic baseline.

Written in jax.numpy (no Flax, no TensorFlow) so that a whole held-out batch is
scored on the accelerator; inputs may be numpy or jax arrays. Batched
functions take (N, H, W) or (N, H, W, 1) and return per-image (N,) float32
arrays; `mse`, `psnr`, `ssim` take one (H, W) or (H, W, 1) image and return a
float. Predictions are scored as given (no clipping to the data range).

Conventions (shared/EVALUATION.md; the tests compare with scikit-image):
  mse   mean of (pred - target)^2 over the image.
  psnr  10 log10(data_range^2 / mse), +inf for identical images
        (`skimage.metrics.peak_signal_noise_ratio(target, pred, data_range=1.0)`).
  ssim  `skimage.metrics.structural_similarity(pred, target, data_range=1.0,
        win_size=7)` defaults: a uniform 7x7 window, K1 = 0.01, K2 = 0.03,
        sample (co)variances (the window's N/(N-1) correction,
        `use_sample_covariance=True`), and the mean of the SSIM map over the
        pixels at least (7-1)//2 = 3 from the border, i.e. exactly over the
        windows that lie inside the image; so only "valid" windows are computed.
        data_range is fixed by the caller (1.0), never taken per image.
        Variances are computed from mean-subtracted images to keep float32
        accurate; agreement with scikit-image's float64 is ~1e-6.

`bicubic_upsample` is the super-resolution baseline (and the residual base of
`lensjax.models.superres`): `jax.image.resize(method="bicubic")`, i.e. Keys'
cubic convolution with a = -0.5, half-pixel-centred sampling, and at the
borders the taps that fall outside the image dropped and the remaining weights
renormalised to sum to 1. PIL, OpenCV and PyTorch instead clamp (replicate) the
border pixel, and PyTorch/OpenCV use a = -0.75, so their outputs differ within
two output pixels of the border; scipy.ndimage.zoom(order=3) is a cubic
B-spline interpolation, a different filter altogether.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SSIM_K1 = 0.01
SSIM_K2 = 0.03
DEFAULT_WIN_SIZE = 7


def _as_image_batch(images, name: str) -> Array:
    """(N, H, W) or (N, H, W, 1) -> (N, H, W) float32."""
    x = jnp.asarray(images, dtype=jnp.float32)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W) or (N, H, W, 1), got {np.shape(images)}")
    return x


def _as_pair(pred, target) -> tuple[Array, Array]:
    pred = _as_image_batch(pred, "pred")
    target = _as_image_batch(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {pred.shape} vs {target.shape}")
    return pred, target


def _single(image, name: str) -> Array:
    """(H, W) or (H, W, 1) -> (1, H, W)."""
    ndim = np.ndim(image)
    if ndim not in (2, 3) or (ndim == 3 and np.shape(image)[-1] != 1):
        raise ValueError(f"{name} must have shape (H, W) or (H, W, 1), got {np.shape(image)}")
    return jnp.asarray(image)[None]


def batch_mse(pred, target) -> Array:
    """Per-image mean squared error: (N, H, W[, 1]) x2 -> (N,) float32."""
    pred, target = _as_pair(pred, target)
    return jnp.mean(jnp.square(pred - target), axis=(1, 2))


def batch_psnr(pred, target, data_range: float = 1.0) -> Array:
    """Per-image PSNR in dB, 10 log10(data_range^2 / mse): (N, H, W[, 1]) x2 -> (N,) float32."""
    return 10.0 * jnp.log10(data_range ** 2 / batch_mse(pred, target))


def _window_mean(x: Array, win_size: int) -> Array:
    """Mean over every win x win window lying inside the image: (N, H, W) -> (N, H-win+1, W-win+1)."""
    height, width = x.shape[1:]
    rows = sum(x[:, i:i + height - win_size + 1] for i in range(win_size))
    box = sum(rows[:, :, j:j + width - win_size + 1] for j in range(win_size))
    return box / float(win_size * win_size)


@functools.partial(jax.jit, static_argnames=("win_size",))
def _ssim(pred: Array, target: Array, data_range: Array, win_size: int) -> Array:
    # SSIM is invariant to a common shift of both images only through the
    # (co)variances; the means enter A1 and B1. So the (co)variances come from
    # mean-subtracted images (no float32 cancellation) and the means from the
    # originals.
    shift = jnp.mean(target, axis=(1, 2), keepdims=True)
    x, y = pred - shift, target - shift
    mx, my = _window_mean(x, win_size), _window_mean(y, win_size)
    n = win_size * win_size
    sample = n / (n - 1.0)
    vx = sample * (_window_mean(x * x, win_size) - mx * mx)
    vy = sample * (_window_mean(y * y, win_size) - my * my)
    vxy = sample * (_window_mean(x * y, win_size) - mx * my)
    ux, uy = mx + shift, my + shift
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return jnp.mean(ssim_map, axis=(1, 2))


def batch_ssim(pred, target, data_range: float = 1.0, win_size: int = DEFAULT_WIN_SIZE) -> Array:
    """Per-image SSIM, scikit-image conventions (module docstring): (N, H, W[, 1]) x2 -> (N,) float32."""
    pred, target = _as_pair(pred, target)
    if win_size < 2 or win_size % 2 == 0:
        raise ValueError(f"win_size must be odd and >= 3, got {win_size}")
    if min(pred.shape[1:]) < win_size:
        raise ValueError(f"images of size {pred.shape[1:]} are smaller than win_size {win_size}")
    return _ssim(pred, target, jnp.float32(data_range), win_size)


def mse(pred, target) -> float:
    """Mean squared error of one image pair, (H, W) or (H, W, 1) each."""
    return float(batch_mse(_single(pred, "pred"), _single(target, "target"))[0])


def psnr(pred, target, data_range: float = 1.0) -> float:
    """PSNR in dB of one image pair, (H, W) or (H, W, 1) each; +inf if identical."""
    return float(batch_psnr(_single(pred, "pred"), _single(target, "target"), data_range)[0])


def ssim(pred, target, data_range: float = 1.0, win_size: int = DEFAULT_WIN_SIZE) -> float:
    """SSIM of one image pair, (H, W) or (H, W, 1) each (scikit-image conventions)."""
    return float(batch_ssim(_single(pred, "pred"), _single(target, "target"), data_range,
                            win_size)[0])


def bicubic_upsample(images, factor: int) -> Array:
    """Bicubic upsampling by an integer factor f: (N, h, w[, C]) -> (N, h*f, w*f[, C]) float32.

    Conventions in the module docstring (jax.image.resize "bicubic").
    """
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    x = jnp.asarray(images, dtype=jnp.float32)
    if x.ndim not in (3, 4):
        raise ValueError(f"images must have shape (N, h, w) or (N, h, w, C), got {x.shape}")
    shape = (x.shape[0], x.shape[1] * int(factor), x.shape[2] * int(factor), *x.shape[3:])
    return jax.image.resize(x, shape, method="bicubic")
