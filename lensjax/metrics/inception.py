"""The FID Inception-v3 network in Flax NNX, and its weights read from a local PyTorch file.

    model = load_fid_inception("/data/pt_inception-2015-12-05-6726825d.pth")   # or an .npz
    features = fid_features(model, images, batch_size=50)   # images (N, H, W, 1|3) in [0, 1] -> (N, 2048)

FID is defined by one network: the TensorFlow Inception graph of 2015-12-05 as
ported to PyTorch by pytorch-fid (weights `pt_inception-2015-12-05-6726825d.pth`).
This module rebuilds that network layer for layer, so that the PyTorch state dict
loads unchanged and the 2048-d pool3 features match pytorch-fid's:

- Trunk: torchvision's Inception3 (Conv2d_1a_3x3 ... Mixed_7c; every conv is
  conv (no bias) + BatchNorm(eps=0.001, running statistics) + ReLU), with the FID
  variants of four block types: FIDInceptionA and FIDInceptionC (Mixed_5b-d,
  Mixed_6b-e) and the first FIDInceptionE (Mixed_7b) average-pool their pool
  branch 3x3/stride 1/padding 1 with count_include_pad=False (padding is not
  counted in the mean, as in TensorFlow); the last FIDInceptionE (Mixed_7c)
  max-pools that branch instead. Output: global average pool of Mixed_7c, 2048-d.
  The classifier (`fc`, 1008 classes) is not needed and its weights are ignored.
- Padding: PyTorch's explicit symmetric padding, output size
  floor((n + 2p - k) / s) + 1, never XLA's "SAME"; max pools pad with -inf
  (3x3/stride 2 pools use no padding at all).
- Input: images in [0, 1], grey ones repeated to 3 channels, resized to 299x299
  with PyTorch's `F.interpolate(mode="bilinear", align_corners=False)` (half-pixel
  centres: source = (dst + 0.5) * in / out - 0.5, clamped at 0, no antialiasing,
  so downsampling is plain 2-tap bilinear too), then mapped to [-1, 1] by 2x - 1.
- Layout: NHWC activations, HWIO kernels (PyTorch's OIHW weights are transposed
  on loading). Convolutions and the resize run at `precision="highest"` by
  default so that GPUs do not silently use TF32 for float32 work.

Weight files: a PyTorch checkpoint (zip or the older stream format) read by
`lensjax.metrics.torch_checkpoint` without torch, or an `.npz` with the same keys.
Nothing is downloaded.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from lensjax import compilation
from lensjax.metrics.torch_checkpoint import read_state_dict

Array = jax.Array

INPUT_SIZE = 299
FEATURE_DIM = 2048
BATCH_NORM_EPSILON = 1e-3
PRECISIONS = {"highest": lax.Precision.HIGHEST, "high": lax.Precision.HIGH,
              "default": lax.Precision.DEFAULT}

# ============================================================================
# PyTorch-convention operations (NHWC)
# ============================================================================


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def conv2d(x: Array, kernel: Array, strides: int | Sequence[int] = 1,
           padding: int | Sequence[int] = 0,
           precision: lax.Precision = lax.Precision.HIGHEST) -> Array:
    """PyTorch Conv2d (no bias) in NHWC: x (N, H, W, Cin), kernel (kh, kw, Cin, Cout) -> (N, Ho, Wo, Cout).

    `padding` (ph, pw) zero-pads both sides; Ho = floor((H + 2 ph - kh) / sh) + 1.
    """
    ph, pw = _pair(padding)
    return lax.conv_general_dilated(x, kernel, _pair(strides), ((ph, ph), (pw, pw)),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=precision)


def max_pool(x: Array, window: int, stride: int, padding: int = 0) -> Array:
    """PyTorch max_pool2d in NHWC (padding counts as -inf): x (N, H, W, C) -> (N, Ho, Wo, C)."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                             pad)


def _valid_counts(size: int, window: int, stride: int, padding: int) -> np.ndarray:
    """Number of unpadded positions under each window along one axis (PyTorch pooling)."""
    out = (size + 2 * padding - window) // stride + 1
    starts = np.arange(out) * stride - padding
    return np.minimum(starts + window, size) - np.maximum(starts, 0)


def avg_pool_exclude_padding(x: Array, window: int, stride: int, padding: int) -> Array:
    """PyTorch avg_pool2d(count_include_pad=False) in NHWC: x (N, H, W, C) -> (N, Ho, Wo, C).

    Each window's sum is divided by the number of real (unpadded) pixels in it,
    which is what TensorFlow's average pool did in the original FID graph.
    """
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    sums = lax.reduce_window(x, 0.0, lax.add, (1, window, window, 1), (1, stride, stride, 1), pad)
    counts = np.outer(_valid_counts(x.shape[1], window, stride, padding),
                      _valid_counts(x.shape[2], window, stride, padding))
    return sums / jnp.asarray(counts[None, :, :, None], x.dtype)


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) weights of PyTorch bilinear interpolation, align_corners=False.

    Output pixel i samples source coordinate (i + 0.5) * in / out - 0.5, clamped
    below at 0 (as PyTorch does), from its two neighbouring input pixels; no
    antialiasing filter, so this is also what PyTorch does when downsampling.
    """
    scale = in_size / out_size
    source = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    frac = source - low
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), low), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), high), frac)
    return weights


def resize_bilinear(images: Array, size: tuple[int, int],
                    precision: lax.Precision = lax.Precision.HIGHEST) -> Array:
    """Resize images (N, H, W, C) to (N, size[0], size[1], C) as PyTorch bilinear, align_corners=False."""
    height, width = images.shape[1:3]
    if (height, width) == tuple(size):
        return images
    rows = jnp.asarray(bilinear_resize_matrix(height, size[0]), images.dtype)
    cols = jnp.asarray(bilinear_resize_matrix(width, size[1]), images.dtype)
    images = jnp.einsum("ph,nhwc->npwc", rows, images, precision=precision)
    return jnp.einsum("qw,npwc->npqc", cols, images, precision=precision)


# ============================================================================
# The network
# ============================================================================


class BasicConv2d(nnx.Module):
    """Conv (no bias) + BatchNorm(eps=0.001, running statistics) + ReLU, PyTorch padding, NHWC.

    Parameters: `kernel` (kh, kw, Cin, Cout) and `bn` (scale, bias, mean, var);
    the PyTorch names are `conv.weight` (Cout, Cin, kh, kw) and `bn.{weight, bias,
    running_mean, running_var}`.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] = 1, padding: int | Sequence[int] = 0, *,
                 precision: str = "highest"):
        self.kernel_size = _pair(kernel_size)
        self.strides = _pair(strides)
        self.padding = _pair(padding)
        self.precision = precision
        shape = (*self.kernel_size, in_features, out_features)
        # Weights only ever come from a checkpoint (`load_state_dict`); until then
        # kernels are zero and BatchNorm is the identity. (Random initialisation
        # would cost tens of seconds of per-shape compilation on CPU for nothing.)
        self.kernel = nnx.Param(jnp.zeros(shape, jnp.float32))
        self.bn = nnx.BatchNorm(out_features, use_running_average=True,
                                epsilon=BATCH_NORM_EPSILON, rngs=nnx.Rngs(0))

    def __call__(self, x: Array) -> Array:
        """x (N, H, W, Cin) -> (N, Ho, Wo, Cout)."""
        y = conv2d(x, self.kernel[...], self.strides, self.padding, PRECISIONS[self.precision])
        return nnx.relu(self.bn(y))


class FIDInceptionA(nnx.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(excl. pad)-1x1 -> 224 + pool_features."""

    def __init__(self, in_features: int, pool_features: int, *, precision: str):
        conv = dict(precision=precision)
        self.branch1x1 = BasicConv2d(in_features, 64, 1, **conv)
        self.branch5x5_1 = BasicConv2d(in_features, 48, 1, **conv)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **conv)
        self.branch3x3dbl_1 = BasicConv2d(in_features, 64, 1, **conv)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **conv)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **conv)
        self.branch_pool = BasicConv2d(in_features, pool_features, 1, **conv)

    def __call__(self, x: Array) -> Array:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(avg_pool_exclude_padding(x, 3, 1, 1))
        return jnp.concatenate([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nnx.Module):
    """35 -> 17 reduction: 3x3/s2 | 1x1-3x3-3x3/s2 | maxpool 3x3/s2 -> 480 + in_features."""

    def __init__(self, in_features: int, *, precision: str):
        conv = dict(precision=precision)
        self.branch3x3 = BasicConv2d(in_features, 384, 3, strides=2, **conv)
        self.branch3x3dbl_1 = BasicConv2d(in_features, 64, 1, **conv)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **conv)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, strides=2, **conv)

    def __call__(self, x: Array) -> Array:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), branch3x3dbl, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionC(nnx.Module):
    """17x17 block with factorised 7x7 convs (1x7, 7x1), avgpool excl. pad -> 768."""

    def __init__(self, in_features: int, channels_7x7: int, *, precision: str):
        conv = dict(precision=precision)
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_features, 192, 1, **conv)
        self.branch7x7_1 = BasicConv2d(in_features, c7, 1, **conv)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **conv)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **conv)
        self.branch7x7dbl_1 = BasicConv2d(in_features, c7, 1, **conv)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **conv)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **conv)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **conv)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **conv)
        self.branch_pool = BasicConv2d(in_features, 192, 1, **conv)

    def __call__(self, x: Array) -> Array:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(avg_pool_exclude_padding(x, 3, 1, 1))
        return jnp.concatenate([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nnx.Module):
    """17 -> 8 reduction: 1x1-3x3/s2 | 1x1-1x7-7x1-3x3/s2 | maxpool 3x3/s2 -> 512 + in_features."""

    def __init__(self, in_features: int, *, precision: str):
        conv = dict(precision=precision)
        self.branch3x3_1 = BasicConv2d(in_features, 192, 1, **conv)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, strides=2, **conv)
        self.branch7x7x3_1 = BasicConv2d(in_features, 192, 1, **conv)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **conv)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **conv)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, strides=2, **conv)

    def __call__(self, x: Array) -> Array:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionE(nnx.Module):
    """8x8 block with split 1x3/3x1 branches -> 2048; pool branch "avg" (excl. pad, Mixed_7b) or "max" (Mixed_7c)."""

    def __init__(self, in_features: int, pool: str, *, precision: str):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        conv = dict(precision=precision)
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_features, 320, 1, **conv)
        self.branch3x3_1 = BasicConv2d(in_features, 384, 1, **conv)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **conv)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **conv)
        self.branch3x3dbl_1 = BasicConv2d(in_features, 448, 1, **conv)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **conv)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **conv)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **conv)
        self.branch_pool = BasicConv2d(in_features, 192, 1, **conv)

    def __call__(self, x: Array) -> Array:
        branch3x3 = self.branch3x3_1(x)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "avg":
            pooled = avg_pool_exclude_padding(x, 3, 1, 1)
        else:
            pooled = max_pool(x, 3, 1, 1)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3),
            self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl),
            self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
    """FID Inception-v3 up to pool3: images (N, H, W, 1|3) in [0, 1] -> features (N, 2048).

    Attribute names follow the PyTorch module names, so a state-dict key such as
    `Mixed_6b.branch7x7_2.conv.weight` addresses `model.Mixed_6b.branch7x7_2.kernel`.
    A new model has zero kernels; weights come from `load_fid_inception` or
    `load_state_dict`.
    """

    def __init__(self, *, precision: str = "highest"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        conv = dict(precision=precision)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, strides=2, **conv)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **conv)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **conv)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **conv)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **conv)
        self.Mixed_5b = FIDInceptionA(192, 32, **conv)
        self.Mixed_5c = FIDInceptionA(256, 64, **conv)
        self.Mixed_5d = FIDInceptionA(288, 64, **conv)
        self.Mixed_6a = InceptionB(288, **conv)
        self.Mixed_6b = FIDInceptionC(768, 128, **conv)
        self.Mixed_6c = FIDInceptionC(768, 160, **conv)
        self.Mixed_6d = FIDInceptionC(768, 160, **conv)
        self.Mixed_6e = FIDInceptionC(768, 192, **conv)
        self.Mixed_7a = InceptionD(768, **conv)
        self.Mixed_7b = FIDInceptionE(1280, "avg", **conv)
        self.Mixed_7c = FIDInceptionE(2048, "max", **conv)

    def preprocess(self, images: Array) -> Array:
        """images (N, H, W[, 1|3]) in [0, 1] -> network input (N, 299, 299, 3) in [-1, 1]."""
        images = jnp.asarray(images, jnp.float32)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be (N, H, W), (N, H, W, 1) or (N, H, W, 3), got shape "
                             f"{images.shape}")
        if images.shape[-1] == 1:
            images = jnp.repeat(images, 3, axis=-1)
        images = resize_bilinear(images, (INPUT_SIZE, INPUT_SIZE), PRECISIONS[self.precision])
        return 2.0 * images - 1.0

    def pool3(self, x: Array) -> Array:
        """Network input (N, 299, 299, 3) in [-1, 1] -> pool3 features (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool(x, 3, 2)
        x = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))

    def __call__(self, images: Array) -> Array:
        """images (N, H, W[, 1|3]) in [0, 1] -> pool3 features (N, 2048), float32."""
        return self.pool3(self.preprocess(images))


# ============================================================================
# State dict <-> model
# ============================================================================

# Keys of the PyTorch checkpoint that the feature extractor does not use.
IGNORED_KEYS = ("fc.weight", "fc.bias")


def _conv_layers(model: nnx.Module) -> dict[str, BasicConv2d]:
    return {".".join(str(p) for p in path): module for path, module in nnx.iter_modules(model)
            if isinstance(module, BasicConv2d)}


def expected_state_dict_shapes(model: FIDInceptionV3) -> dict[str, tuple[int, ...]]:
    """{PyTorch state-dict key: PyTorch shape} of every weight the model needs."""
    shapes = {}
    for prefix, layer in _conv_layers(model).items():
        kh, kw, cin, cout = layer.kernel.shape
        shapes[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{name}"] = (cout,)
    return shapes


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict(model: FIDInceptionV3, state_dict: Mapping[str, np.ndarray]) -> FIDInceptionV3:
    """Copy a PyTorch FID Inception state dict into `model` in place (strict); returns model.

    Conv weights (Cout, Cin, kh, kw) become kernels (kh, kw, Cin, Cout); BatchNorm
    weight/bias/running_mean/running_var become bn.scale/bias/mean/var. `fc.*` and
    `*.bn.num_batches_tracked` are ignored; any other difference raises a ValueError
    naming the missing, unexpected and mis-shaped keys.
    """
    expected = expected_state_dict_shapes(model)
    layers = _conv_layers(model)
    ignored = set(IGNORED_KEYS) | {f"{prefix}.bn.num_batches_tracked" for prefix in layers}
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected and key not in ignored]
    mismatched = [f"{key} {tuple(np.shape(state_dict[key]))} (expected {expected[key]})"
                  for key in expected if key in state_dict
                  and tuple(np.shape(state_dict[key])) != expected[key]]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise ValueError("state dict does not fit the FID Inception network; " + "; ".join(problems))
    for prefix, layer in layers.items():
        weight = np.asarray(state_dict[f"{prefix}.conv.weight"], np.float32)
        layer.kernel[...] = jnp.asarray(weight.transpose(2, 3, 1, 0))
        for torch_name, variable in (("weight", layer.bn.scale), ("bias", layer.bn.bias),
                                     ("running_mean", layer.bn.mean),
                                     ("running_var", layer.bn.var)):
            variable[...] = jnp.asarray(np.asarray(state_dict[f"{prefix}.bn.{torch_name}"],
                                                   np.float32))
    return model


def load_fid_inception(path: str | Path, *, precision: str = "highest") -> FIDInceptionV3:
    """The FID Inception network with weights from a local .pth (torch.save state dict) or .npz."""
    state_dict = read_state_dict(path)
    model = FIDInceptionV3(precision=precision)
    return load_state_dict(model, state_dict)


# ============================================================================
# Feature extraction
# ============================================================================


def _pool3_features_fn(graphdef: nnx.GraphDef, state: nnx.State, images: Array) -> Array:
    return nnx.merge(graphdef, state)(images)


@functools.lru_cache(maxsize=None)
def _jitted_pool3_features() -> Callable:
    # Jitted on first use (not at import, which would start the backend). The graph
    # definition is static: one program per network structure and batch shape.
    return compilation.jit(_pool3_features_fn, static_argnums=0)


def fid_features(model: FIDInceptionV3, images: Any, batch_size: int = 50, *,
                 progress: bool = False) -> np.ndarray:
    """Pool3 features (N, 2048) float32 of images (N, H, W[, 1|3]) in [0, 1], in jitted batches.

    The last batch is zero-padded to the batch size so one compiled program
    serves every batch. Generated images should be clipped to [0, 1] first, as
    they would be when saved as image files for other FID tools.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = np.asarray(images, np.float32)
    if images.ndim not in (3, 4) or images.shape[0] < 1:
        raise ValueError(f"images must be (N, H, W[, C]) with N >= 1, got shape {images.shape}")
    num_images = images.shape[0]
    batch_size = min(batch_size, num_images)
    graphdef, state = nnx.split(model)
    starts = range(0, num_images, batch_size)
    if progress:
        from tqdm import tqdm  # only needed for the progress bar
        starts = tqdm(starts, desc="FID features", unit="batch")
    features = []
    for start in starts:
        batch = images[start:start + batch_size]
        count = batch.shape[0]
        if count < batch_size:
            pad = np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        pool3 = _jitted_pool3_features()(graphdef, state, jnp.asarray(batch))
        features.append(np.asarray(pool3)[:count])
    return np.concatenate(features)
