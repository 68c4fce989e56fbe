"""lensjax.metrics.inception: PyTorch-convention ops, the FID Inception structure, weight loading.

References: explicit numpy loops for convolution (NCHW/OIHW, as PyTorch defines
it), max/avg pooling (count_include_pad=False) and PyTorch's bilinear resize
formula; jax.image.resize without antialiasing; torchvision's documented
feature-map sizes and parameter count (inception_v3: 27,161,264 parameters,
of which AuxLogits and fc are not part of the FID trunk); torchvision's branch
order inside each block. Checkpoints are written in torch.save's layouts by
small writers below (zip format and the older stream format) and, when torch is
installed, by torch.save itself.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import types
import zipfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lensjax.metrics import inception

# ----------------------------------------------------------------------------
# Writers of torch.save layouts (no torch needed)
# ----------------------------------------------------------------------------

_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class _Storage:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, data


class _Tensor:
    """A strided view of a _Storage that pickles the way a torch tensor does."""

    def __init__(self, storage: _Storage, offset: int, shape, stride, rebuild):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.rebuild = rebuild  # the stand-in torch._utils._rebuild_tensor_v2

    def __reduce__(self):
        return (self.rebuild, (self.storage, self.offset, tuple(self.shape), tuple(self.stride),
                                  False, collections.OrderedDict()))


def _fake_torch_modules():
    """Patch sys.modules with stand-ins so pickle writes GLOBAL torch._utils._rebuild_tensor_v2 etc."""
    torch_module = types.ModuleType("torch")
    utils_module = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only used for pickling")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_module._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch_module._utils = utils_module
    for name in _STORAGE_NAMES.values():
        setattr(torch_module, name, type(name, (), {"__module__": "torch"}))
    return torch_module, mock.patch.dict(sys.modules, {"torch": torch_module,
                                                       "torch._utils": utils_module})


def _layout_tensors(state_dict: dict[str, np.ndarray], rebuild):
    """Tensors over storages: >= 2-D arrays stored column-major (reversed strides), all
    1-D float32 arrays packed into one shared storage at offsets, the rest contiguous."""
    tensors, storages = collections.OrderedDict(), []
    packed = [a for a in state_dict.values() if a.ndim == 1 and a.dtype == np.float32]
    shared = _Storage("0", np.concatenate(packed) if packed else np.zeros(0, np.float32))
    storages.append(shared)
    offset = 0
    for name, array in state_dict.items():
        if array.ndim == 1 and array.dtype == np.float32:
            tensors[name] = _Tensor(shared, offset, array.shape, (1,), rebuild)
            offset += array.size
            continue
        # (np.asfortranarray would turn a 0-d array into shape (1,).)
        column_major = np.asfortranarray(array) if array.ndim >= 2 else np.array(array)
        storage = _Storage(str(len(storages)), column_major.ravel(order="K"))
        storages.append(storage)
        stride = tuple(s // array.itemsize for s in column_major.strides)
        tensors[name] = _Tensor(storage, 0, array.shape, stride, rebuild)
    return tensors, storages


def _pickle_state_dict(tensors, torch_module, legacy: bool) -> bytes:
    buffer = io.BytesIO()

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                pid = ("storage", getattr(torch_module, _STORAGE_NAMES[obj.data.dtype]), obj.key,
                       "cpu", obj.data.size)
                return pid + (None,) if legacy else pid
            return None

    _Pickler(buffer, protocol=2).dump(tensors)
    return buffer.getvalue()


def write_torch_zip(path, state_dict: dict[str, np.ndarray]) -> None:
    """torch >= 1.6 layout: archive/data.pkl, archive/byteorder, archive/data/<key>, archive/version."""
    torch_module, patch = _fake_torch_modules()
    with patch:
        tensors, storages = _layout_tensors(state_dict, torch_module._utils._rebuild_tensor_v2)
        data_pkl = _pickle_state_dict(tensors, torch_module, legacy=False)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for storage in storages:
            archive.writestr(f"archive/data/{storage.key}", storage.data.astype(
                storage.data.dtype.newbyteorder("<")).tobytes())
        archive.writestr("archive/version", "3\n")


def write_torch_legacy(path, state_dict: dict[str, np.ndarray]) -> None:
    """torch < 1.6 stream layout: magic, protocol, sys info, pickle, keys, sized storages."""
    torch_module, patch = _fake_torch_modules()
    with patch:
        tensors, storages = _layout_tensors(state_dict, torch_module._utils._rebuild_tensor_v2)
        main = _pickle_state_dict(tensors, torch_module, legacy=True)
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 8}}, f, protocol=2)
        f.write(main)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for storage in storages:
            f.write(struct.pack("<q", storage.data.size))
            f.write(storage.data.astype(storage.data.dtype.newbyteorder("<")).tobytes())


# ----------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return inception.FIDInceptionV3()


@pytest.fixture(scope="module")
def random_state_dict(model):
    """Random weights of the right shapes (He-scaled, so activations stay O(1)), plus the
    keys a real pt_inception file also holds (fc, num_batches_tracked)."""
    rng = np.random.default_rng(0)
    state = {}
    for key, shape in inception.expected_state_dict_shapes(model).items():
        if key.endswith("conv.weight"):
            array = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith("running_var"):
            array = rng.uniform(0.5, 1.5, size=shape)
        elif key.endswith("bn.weight"):
            array = rng.uniform(0.5, 1.5, size=shape)
        else:
            array = 0.1 * rng.normal(size=shape)
        state[key] = array.astype(np.float32)
        if key.endswith("running_var"):
            state[key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
    state["fc.weight"] = rng.normal(size=(1008, 2048)).astype(np.float32)
    state["fc.bias"] = np.zeros(1008, np.float32)
    return state


@pytest.fixture(scope="module")
def loaded_model(tmp_path_factory, random_state_dict):
    path = tmp_path_factory.mktemp("weights") / "pt_inception-fixture.pth"
    write_torch_zip(path, random_state_dict)
    return inception.load_fid_inception(path)


# ----------------------------------------------------------------------------
# PyTorch-convention operations against numpy loops
# ----------------------------------------------------------------------------

def _torch_conv_reference(x_nchw, weight_oihw, stride, padding):
    (sh, sw), (ph, pw) = stride, padding
    x = np.pad(x_nchw, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    _, _, kh, kw = weight_oihw.shape
    out_h = (x.shape[2] - kh) // sh + 1
    out_w = (x.shape[3] - kw) // sw + 1
    out = np.zeros((x.shape[0], weight_oihw.shape[0], out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            window = x[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
            out[:, :, i, j] = np.einsum("ncab,ocab->no", window, weight_oihw)
    return out


@pytest.mark.parametrize("kernel,stride,padding", [
    ((3, 3), (2, 2), (0, 0)),   # Conv2d_1a_3x3, reductions: VALID with floor
    ((3, 3), (1, 1), (0, 0)),   # Conv2d_2a_3x3
    ((1, 7), (1, 1), (0, 3)),   # factorised 7x7
    ((7, 1), (1, 1), (3, 0)),
    ((5, 5), (1, 1), (2, 2)),
    ((3, 3), (2, 2), (1, 1)),
])
def test_conv2d_matches_pytorch_definition(kernel, stride, padding):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 10, 9)).astype(np.float32)  # NCHW, odd and even sizes
    weight = rng.normal(size=(4, 3, *kernel)).astype(np.float32)
    expected = _torch_conv_reference(x.astype(np.float64), weight.astype(np.float64), stride, padding)
    got = inception.conv2d(jnp.asarray(x.transpose(0, 2, 3, 1)),
                           jnp.asarray(weight.transpose(2, 3, 1, 0)), stride, padding)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=1e-5,
                               atol=1e-5)


def _pool_reference(x, window, stride, padding, reduce):
    """NHWC pooling by explicit loops over the unpadded pixels of each window."""
    n, h, w, c = x.shape
    out_h = (h + 2 * padding - window) // stride + 1
    out_w = (w + 2 * padding - window) // stride + 1
    out = np.zeros((n, out_h, out_w, c))
    for i in range(out_h):
        for j in range(out_w):
            rows = [r for r in range(i * stride - padding, i * stride - padding + window)
                    if 0 <= r < h]
            cols = [q for q in range(j * stride - padding, j * stride - padding + window)
                    if 0 <= q < w]
            values = x[:, rows][:, :, cols].reshape(n, -1, c)
            out[:, i, j] = reduce(values, axis=1)
    return out


@pytest.mark.parametrize("size", [(9, 8), (7, 7)])
def test_max_pool_3x3_stride2_no_padding(size):
    x = np.random.default_rng(1).normal(size=(2, *size, 3)).astype(np.float32)
    got = np.asarray(inception.max_pool(jnp.asarray(x), 3, 2))
    assert got.shape[1:3] == ((size[0] - 3) // 2 + 1, (size[1] - 3) // 2 + 1)
    np.testing.assert_array_equal(got, _pool_reference(x, 3, 2, 0, np.max))


def test_max_pool_padding_is_minus_infinity():
    # All-negative input: zero padding would show up as 0 at the borders.
    x = -1.0 - np.random.default_rng(2).uniform(size=(1, 5, 6, 2)).astype(np.float32)
    got = np.asarray(inception.max_pool(jnp.asarray(x), 3, 1, 1))
    np.testing.assert_array_equal(got, _pool_reference(x, 3, 1, 1, np.max))
    assert np.all(got < -1.0)


def test_avg_pool_excludes_padding_from_the_count():
    x = np.random.default_rng(3).uniform(1, 2, size=(2, 5, 6, 3)).astype(np.float32)
    got = np.asarray(inception.avg_pool_exclude_padding(jnp.asarray(x), 3, 1, 1))
    np.testing.assert_allclose(got, _pool_reference(x, 3, 1, 1, np.mean), rtol=1e-6)
    # Corner: mean of the 2x2 real pixels, not their sum / 9.
    np.testing.assert_allclose(got[:, 0, 0], x[:, :2, :2].mean(axis=(1, 2)), rtol=1e-6)


def _torch_bilinear_reference(in_size, out_size):
    """PyTorch's upsample_bilinear2d index arithmetic (align_corners=False), one pixel at a time."""
    weights = np.zeros((out_size, in_size))
    scale = in_size / out_size
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        src = 0.0 if src < 0 else src
        i0 = int(src)
        step = 1 if i0 < in_size - 1 else 0
        lam1 = src - i0
        weights[i, i0] += 1 - lam1
        weights[i, i0 + step] += lam1
    return weights


@pytest.mark.parametrize("in_size,out_size", [(2, 4), (64, 299), (150, 299), (512, 299), (7, 3)])
def test_bilinear_resize_matrix_matches_pytorch_formula(in_size, out_size):
    np.testing.assert_allclose(inception.bilinear_resize_matrix(in_size, out_size),
                               _torch_bilinear_reference(in_size, out_size), atol=1e-12)


def test_bilinear_resize_known_values_and_jax_reference():
    # F.interpolate([0, 1], size=4, mode="bilinear", align_corners=False) = [0, .25, .75, 1].
    np.testing.assert_allclose(inception.bilinear_resize_matrix(2, 4) @ np.array([0.0, 1.0]),
                               [0.0, 0.25, 0.75, 1.0])
    rng = np.random.default_rng(4)
    for shape, size in [((2, 16, 12, 3), (29, 31)), ((1, 40, 36, 1), (17, 13))]:
        images = jnp.asarray(rng.uniform(size=shape).astype(np.float32))
        got = inception.resize_bilinear(images, size)
        expected = jax.image.resize(images, (shape[0], *size, shape[3]), "linear", antialias=False)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-6)


def test_preprocess_repeats_grey_and_maps_to_minus_one_one(model):
    grey = np.random.default_rng(5).uniform(size=(2, 20, 24, 1)).astype(np.float32)
    from_grey = np.asarray(model.preprocess(grey))
    from_rgb = np.asarray(model.preprocess(np.repeat(grey, 3, axis=-1)))
    assert from_grey.shape == (2, 299, 299, 3)
    np.testing.assert_array_equal(from_grey, from_rgb)
    np.testing.assert_array_equal(np.asarray(model.preprocess(grey[..., 0])), from_grey)
    assert from_grey.min() >= -1.0 and from_grey.max() <= 1.0
    already = np.random.default_rng(6).uniform(size=(1, 299, 299, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model.preprocess(already)), 2 * already - 1, atol=1e-7)


def test_basic_conv_is_conv_batchnorm_eps_0p001_relu():
    rng = np.random.default_rng(7)
    layer = inception.BasicConv2d(3, 5, (1, 3), padding=(0, 1))
    weight = rng.normal(size=(5, 3, 1, 3)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 5), rng.normal(size=5)
    mean, var = rng.normal(size=5), rng.uniform(1e-4, 1e-2, 5)  # small var: eps matters
    layer.kernel[...] = jnp.asarray(weight.transpose(2, 3, 1, 0))
    for variable, value in ((layer.bn.scale, gamma), (layer.bn.bias, beta),
                            (layer.bn.mean, mean), (layer.bn.var, var)):
        variable[...] = jnp.asarray(value, jnp.float32)
    x = rng.normal(size=(2, 3, 4, 6))
    conv = _torch_conv_reference(x, weight.astype(np.float64), (1, 1), (0, 1))
    bn = ((conv - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-3) * gamma[:, None, None]
          + beta[:, None, None])
    expected = np.maximum(bn, 0).transpose(0, 2, 3, 1)
    got = np.asarray(layer(jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# Network structure
# ----------------------------------------------------------------------------

def test_parameter_count_and_layer_shapes_match_torchvision(model):
    shapes = inception.expected_state_dict_shapes(model)
    conv_keys = [k for k in shapes if k.endswith("conv.weight")]
    assert len(conv_keys) == 94  # Inception-v3 trunk: 94 conv layers
    # torchvision inception_v3: 27,161,264 parameters; AuxLogits holds
    # 128*768 + 2*128 + 768*128*25 + 2*768 + 768*1000 + 1000 and fc 2048*1000 + 1000.
    aux = 128 * 768 + 2 * 128 + 768 * 128 * 25 + 2 * 768 + 768 * 1000 + 1000
    fc = 2048 * 1000 + 1000
    trainable = sum(int(np.prod(shapes[k])) for k in shapes
                    if k.endswith(("conv.weight", "bn.weight", "bn.bias")))
    assert trainable == 27_161_264 - aux - fc
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_6e.branch7x7dbl_2.conv.weight"] == (192, 192, 7, 1)
    assert shapes["Mixed_7b.branch3x3_2b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)


def test_feature_map_sizes_follow_torchvision(model):
    def shape_after(fn, shape):
        return jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, jnp.float32)).shape

    stem = [(model.Conv2d_1a_3x3, (1, 149, 149, 32)), (model.Conv2d_2a_3x3, (1, 147, 147, 32)),
            (model.Conv2d_2b_3x3, (1, 147, 147, 64)),
            (lambda x: inception.max_pool(x, 3, 2), (1, 73, 73, 64)),
            (model.Conv2d_3b_1x1, (1, 73, 73, 80)), (model.Conv2d_4a_3x3, (1, 71, 71, 192)),
            (lambda x: inception.max_pool(x, 3, 2), (1, 35, 35, 192))]
    blocks = [(model.Mixed_5b, (1, 35, 35, 256)), (model.Mixed_5c, (1, 35, 35, 288)),
              (model.Mixed_5d, (1, 35, 35, 288)), (model.Mixed_6a, (1, 17, 17, 768)),
              (model.Mixed_6b, (1, 17, 17, 768)), (model.Mixed_6c, (1, 17, 17, 768)),
              (model.Mixed_6d, (1, 17, 17, 768)), (model.Mixed_6e, (1, 17, 17, 768)),
              (model.Mixed_7a, (1, 8, 8, 1280)), (model.Mixed_7b, (1, 8, 8, 2048)),
              (model.Mixed_7c, (1, 8, 8, 2048))]
    shape = (1, 299, 299, 3)
    for fn, expected in stem + blocks:
        shape = shape_after(fn, shape)
        assert shape == expected
    assert shape_after(model, (3, 64, 64, 1)) == (3, 2048)


def _jitted(module, x):
    """module(x) as one compiled program (far quicker than op-by-op on a busy CPU)."""
    return np.asarray(jax.jit(lambda inputs: module(inputs))(x))


def _set_bias(layer, value):
    layer.bn.bias[...] = jnp.full(layer.bn.bias.shape, value, jnp.float32)


# torchvision's concatenation order: (last layer of each branch, its width); "pool" is the
# parameter-free max-pool branch of the reduction blocks, which passes the input through.
BLOCK_LAYOUTS = {
    "A": (lambda: inception.FIDInceptionA(16, 8, precision="highest"), 16, 5,
          [("branch1x1", 64), ("branch5x5_2", 64), ("branch3x3dbl_3", 96), ("branch_pool", 8)]),
    "B": (lambda: inception.InceptionB(16, precision="highest"), 16, 9,
          [("branch3x3", 384), ("branch3x3dbl_3", 96), ("pool", 16)]),
    "C": (lambda: inception.FIDInceptionC(16, 8, precision="highest"), 16, 5,
          [("branch1x1", 192), ("branch7x7_3", 192), ("branch7x7dbl_5", 192),
           ("branch_pool", 192)]),
    "D": (lambda: inception.InceptionD(16, precision="highest"), 16, 9,
          [("branch3x3_2", 320), ("branch7x7x3_4", 192), ("pool", 16)]),
    "E": (lambda: inception.FIDInceptionE(16, "avg", precision="highest"), 16, 5,
          [("branch1x1", 320), ("branch3x3_2a", 384), ("branch3x3_2b", 384),
           ("branch3x3dbl_3a", 384), ("branch3x3dbl_3b", 384), ("branch_pool", 192)]),
}


@pytest.mark.parametrize("name", sorted(BLOCK_LAYOUTS))
def test_block_concatenation_order(name):
    """Zero kernels + a distinct BatchNorm bias on each branch's last layer: each branch
    then outputs its constant, which must land in torchvision's channel slice."""
    build, in_features, size, layout = BLOCK_LAYOUTS[name]
    block = build()
    input_value = 0.25
    expected = []
    for index, (branch, width) in enumerate(layout):
        if branch == "pool":
            expected.append(np.full(width, input_value))
        else:
            _set_bias(getattr(block, branch), index + 1.0)
            expected.append(np.full(width, index + 1.0))
    x = jnp.full((1, size, size, in_features), input_value, jnp.float32)
    out = _jitted(block, x)
    np.testing.assert_array_equal(out[0, 0, 0], np.concatenate(expected))
    assert np.all(out == out[:, :1, :1])


@pytest.mark.parametrize("pool,reduce", [("avg", np.mean), ("max", np.max)])
def test_inception_e_pool_branch_kinds(pool, reduce):
    """Mixed_7b average-pools (excluding padding), Mixed_7c max-pools its pool branch."""
    block = inception.FIDInceptionE(4, pool, precision="highest")
    kernel = np.zeros((1, 1, 4, 192), np.float32)
    kernel[0, 0, 2, 0] = 1.0  # output channel 0 of branch_pool = input channel 2
    block.branch_pool.kernel[...] = jnp.asarray(kernel)
    x = np.random.default_rng(8).uniform(0.1, 1, size=(1, 5, 6, 4)).astype(np.float32)
    out = _jitted(block, jnp.asarray(x))
    pooled = _pool_reference(x, 3, 1, 1, reduce)[..., 2]
    eps_scale = 1 / np.sqrt(1 + 1e-3)  # identity BatchNorm still divides by sqrt(var + eps)
    np.testing.assert_allclose(out[..., 2048 - 192], pooled * eps_scale, rtol=1e-5)


def test_full_network_uses_fid_pool_variants(model):
    assert model.Mixed_7b.pool == "avg"
    assert model.Mixed_7c.pool == "max"


# ----------------------------------------------------------------------------
# Reading checkpoints and loading weights
# ----------------------------------------------------------------------------

def _assert_loaded(model, state_dict):
    layers = 0
    for key, weight in state_dict.items():
        if not key.endswith(".conv.weight"):
            continue
        prefix = key[: -len(".conv.weight")]
        layer = model
        for part in prefix.split("."):
            layer = getattr(layer, part)
        np.testing.assert_array_equal(np.asarray(layer.kernel[...]), weight.transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(np.asarray(layer.bn.scale[...]), state_dict[f"{prefix}.bn.weight"])
        np.testing.assert_array_equal(np.asarray(layer.bn.bias[...]), state_dict[f"{prefix}.bn.bias"])
        np.testing.assert_array_equal(np.asarray(layer.bn.mean[...]),
                                      state_dict[f"{prefix}.bn.running_mean"])
        np.testing.assert_array_equal(np.asarray(layer.bn.var[...]),
                                      state_dict[f"{prefix}.bn.running_var"])
        layers += 1
    assert layers == 94


def test_every_weight_loads_to_its_place_from_a_torch_zip(loaded_model, random_state_dict):
    _assert_loaded(loaded_model, random_state_dict)


def _assert_same_state(read, expected):
    assert set(read) == set(expected)
    for key, array in expected.items():
        assert read[key].dtype == array.dtype and read[key].shape == array.shape, key
        np.testing.assert_array_equal(read[key], array)


def test_stream_format_and_npz_read_the_same(tmp_path, random_state_dict):
    legacy = tmp_path / "legacy.pth"
    write_torch_legacy(legacy, random_state_dict)
    _assert_same_state(inception.read_state_dict(legacy), random_state_dict)
    npz = tmp_path / "weights.npz"
    np.savez(npz, **random_state_dict)
    _assert_same_state(inception.read_state_dict(npz), random_state_dict)


def test_strided_views_and_dtypes_survive_a_small_zip(tmp_path):
    rng = np.random.default_rng(9)
    state = {"a": rng.normal(size=(3, 4, 2)).astype(np.float32),
             "b": rng.normal(size=5).astype(np.float32),
             "c": rng.normal(size=7).astype(np.float32),  # shares b's storage at offset 5
             "steps": np.array(123456789012, np.int64)}
    path = tmp_path / "small.pth"
    write_torch_zip(path, state)
    with zipfile.ZipFile(path) as archive:
        assert set(archive.namelist()) == {"archive/data.pkl", "archive/byteorder",
                                           "archive/version", "archive/data/0",
                                           "archive/data/1", "archive/data/2"}
    _assert_same_state(inception.read_state_dict(path), state)


def test_state_dict_errors_name_the_keys(model, random_state_dict):
    state = dict(random_state_dict)
    del state["Mixed_6c.branch7x7dbl_3.conv.weight"]
    state["AuxLogits.conv0.conv.weight"] = np.zeros((128, 768, 1, 1), np.float32)
    state["Mixed_7c.branch_pool.bn.running_var"] = np.ones(191, np.float32)
    with pytest.raises(ValueError) as error:
        inception.load_state_dict(model, state)
    message = str(error.value)
    assert "missing keys: Mixed_6c.branch7x7dbl_3.conv.weight" in message
    assert "unexpected keys: AuxLogits.conv0.conv.weight" in message
    assert "Mixed_7c.branch_pool.bn.running_var (191,) (expected (192,))" in message


def test_restricted_unpickler_refuses_foreign_globals(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"x": Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"\.print, which"):
        inception.read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="never"):
        inception.read_state_dict(tmp_path / "absent.pth")
    not_a_checkpoint = tmp_path / "random.bin"
    not_a_checkpoint.write_bytes(np.random.default_rng(10).bytes(256))
    with pytest.raises(ValueError, match="neither"):
        inception.read_state_dict(not_a_checkpoint)


def test_files_written_by_real_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    base = torch.from_numpy(rng.normal(size=12).astype(np.float32))
    tensors = collections.OrderedDict([
        ("conv.weight", torch.from_numpy(weight)),
        ("transposed", torch.from_numpy(weight[:, :, 0, 0].copy()).t()),  # non-contiguous
        ("base", base),
        ("offset_view", base[3:9]),  # shares base's storage at offset 3
        ("bn.num_batches_tracked", torch.tensor(7, dtype=torch.long)),
    ])
    expected = {key: value.numpy().copy() for key, value in tensors.items()}
    for zip_format in (True, False):
        path = tmp_path / f"torch_{zip_format}.pth"
        torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
        _assert_same_state(inception.read_state_dict(path), expected)


# ----------------------------------------------------------------------------
# Features of the whole network (one jitted forward on 2 images)
# ----------------------------------------------------------------------------

def test_fid_features_shape_finite_deterministic(loaded_model):
    rng = np.random.default_rng(12)
    image = rng.uniform(size=(1, 48, 48, 1)).astype(np.float32)
    images = np.concatenate([image, np.clip(image[:, ::-1] * 0.5 + 0.2, 0, 1)])
    features = inception.fid_features(loaded_model, images, batch_size=2)
    assert features.shape == (2, 2048) and features.dtype == np.float32
    assert np.all(np.isfinite(features))
    assert np.all(features >= 0)  # a mean of ReLU outputs
    assert np.std(features) > 0 and not np.allclose(features[0], features[1])
    again = inception.fid_features(loaded_model, images, batch_size=2)
    np.testing.assert_array_equal(features, again)
