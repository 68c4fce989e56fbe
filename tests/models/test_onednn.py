"""oneDNN convolutions (lensjax.models.onednn and conv_impl="onednn") against lax.

The custom call must give `lax.conv_general_dilated`'s values for every layout
lensjax uses it with (NHWC input, HWIO kernel, and the HWOI kernel of the input
gradient), for odd and even sizes, uneven padding and strides; the "onednn" Conv
must have lax's values and gradients; under a sharded jit over the 8 fake devices
it must be split along the batch axis (no gather of the activations) and give
the single-device values; under vmap it must give lax's values; it must be off
unless LENSJAX_ONEDNN=1. Every test here opts in, and keeps its programs out of
the session's persistent compilation cache (they cannot be serialised).
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lensjax import compilation
from lensjax.models import get_model, layers, onednn

_REQUIREMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "requirements.txt")

with onednn.switch(True):
    _AVAILABLE = onednn.available()
requires_onednn = pytest.mark.skipif(not _AVAILABLE,
                                     reason="this jaxlib/backend runs no oneDNN convolutions")


@pytest.fixture(autouse=True)
def _opted_in_without_the_persistent_cache(monkeypatch):
    monkeypatch.setenv(onednn.ENV_SWITCH, "1")
    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)   # no cache writes
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)


def test_available_with_the_pinned_jaxlib_on_cpu():
    """The jaxlib of requirements.txt runs the call: a failing probe must not pass unnoticed."""
    pinned = next(line.split("==")[1].strip() for line in open(_REQUIREMENTS)
                  if line.startswith("jaxlib=="))
    if jax.default_backend() != "cpu" or jax.lib.__version__ != pinned:
        pytest.skip(f"jaxlib {jax.lib.__version__} on {jax.default_backend()}, pinned {pinned}")
    assert onednn.available()
    assert not onednn.available("gpu")


def _lax_conv(x, kernel, strides=(1, 1), padding="SAME"):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _assert_close_to_scale(actual, expected, tol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    assert float(np.max(np.abs(actual - expected))) <= tol * scale


def _arrays(batch, height, width, cin, kernel_hw, cout, seed=0):
    key_x, key_w, key_dy = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(key_x, (batch, height, width, cin))
    kernel = jax.random.normal(key_w, (*kernel_hw, cin, cout)) / np.sqrt(cin * np.prod(kernel_hw))
    return x, kernel, key_dy


@requires_onednn
@pytest.mark.parametrize("shape, kernel_hw, strides, padding", [
    ((2, 9, 7, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),
    ((1, 8, 8, 4), (2, 2), (1, 1), ((0, 1), (0, 1))),     # even kernel, SAME's uneven padding
    ((3, 11, 10, 5), (3, 3), (2, 2), ((1, 1), (0, 1))),   # strided, uneven padding
    ((2, 6, 9, 2), (5, 3), (1, 2), ((2, 2), (0, 0))),     # non-square kernel and strides
])
def test_forward_equals_lax(shape, kernel_hw, strides, padding):
    x, kernel, _ = _arrays(*shape, kernel_hw, 6)
    got = jax.jit(lambda x, k: onednn.conv(x, k, strides, padding))(x, kernel)
    _assert_close_to_scale(got, _lax_conv(x, kernel, strides, padding))


@requires_onednn
def test_hwoi_kernel_reads_the_features_swapped():
    x, kernel, _ = _arrays(2, 7, 7, 4, (3, 3), 6)
    swapped = jnp.transpose(kernel, (0, 1, 3, 2))           # (kh, kw, cout, cin)
    got = onednn.conv(x, swapped, (1, 1), ((1, 1), (1, 1)), kernel_layout="HWOI")
    _assert_close_to_scale(got, _lax_conv(x, kernel))
    with pytest.raises(KeyError):
        onednn.conv(x, kernel, (1, 1), ((1, 1), (1, 1)), kernel_layout="OIHW")


@requires_onednn
@pytest.mark.parametrize("shape, kernel_hw", [((2, 10, 9, 3), (3, 3)), ((1, 8, 8, 4), (2, 2)),
                                             ((2, 7, 6, 5), (5, 3))])
def test_input_grad_equals_laxs(shape, kernel_hw):
    x, kernel, key_dy = _arrays(*shape, kernel_hw, 7)
    padding = layers.same_padding(shape[1:3], kernel_hw, (1, 1))
    y, vjp = jax.vjp(lambda x: _lax_conv(x, kernel), x)
    dy = jax.random.normal(key_dy, y.shape)
    got = jax.jit(lambda dy, k: onednn.input_grad(dy, k, padding))(dy, kernel)
    _assert_close_to_scale(got, vjp(dy)[0])


@requires_onednn
@pytest.mark.parametrize("batch, strides", [(1, 1), (2, 1), (8, 1), (4, 2)])
def test_conv_onednn_values_and_gradients_equal_laxs(batch, strides):
    # Batches 1 and 2 take the weight gradient on strips, 8 on whole images, stride 2 lax's backward.
    x, kernel, _ = _arrays(batch, 12, 11, 5, (3, 3), 7, seed=batch)

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k)))

    ours = compilation.jit(jax.value_and_grad(
        loss(lambda x, k: layers.conv_onednn(x, k, (strides, strides))), (0, 1)))
    ref = jax.jit(jax.value_and_grad(loss(lambda x, k: _lax_conv(x, k, (strides, strides))), (0, 1)))
    (value, grads), (ref_value, ref_grads) = ours(x, kernel), ref(x, kernel)
    # The loss sums terms of both signs: compare it to the size of its terms (float32
    # rounding of a cancelling sum differs between CPUs' kernels), not to its own value.
    terms = float(jnp.sum(jnp.abs(jnp.sin(_lax_conv(x, kernel, (strides, strides))))))
    assert abs(float(value) - float(ref_value)) <= 1e-7 * terms
    for got, want in zip(grads, ref_grads):
        _assert_close_to_scale(got, want)
    hlo = ours.lower(x, kernel).as_text()
    assert hlo.count(onednn.CUSTOM_CALL_TARGET) == (2 if strides == 1 else 1)


@requires_onednn
def test_sharded_jit_splits_the_batch_and_keeps_the_values():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x, kernel, _ = _arrays(16, 10, 9, 4, (3, 3), 8)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ks = jax.device_put(kernel, NamedSharding(mesh, P(None, None, None, "data")))   # as FSDP shards it
    step = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(layers.conv_onednn(x, k, (1, 1)))),
                            (0, 1)))
    (dx, dk), (dx1, dk1) = step(xs, ks), step(x, kernel)
    _assert_close_to_scale(dx, dx1)
    _assert_close_to_scale(dk, dk1)
    compiled = step.lower(xs, ks).compile().as_text()
    calls = re.findall(r"= f32\[([\d,]+)\]\S* custom-call\(.*" + re.escape(onednn.CUSTOM_CALL_TARGET),
                       compiled)
    assert calls and all(shape.startswith("2,") for shape in calls), calls   # 16 / 8 images each
    assert not re.search(r"f32\[16,10,9,\d+\]\S* all-gather", compiled)      # activations stay split


@requires_onednn
def test_the_switch_and_the_rule(monkeypatch):
    assert layers.choose_conv_impl((3, 3), 64, backend="cpu", onednn_available=True) == "onednn"
    assert layers.choose_conv_impl((3, 3), 512, output_size=(2, 2), backend="cpu",
                                   onednn_available=True) == "onednn"
    assert layers.choose_conv_impl((3, 3), 64, backend="cpu", dtype=jnp.bfloat16,
                                   onednn_available=True) == "xla"
    for args in (((3, 3), 64, (2, 2)), ((1, 1), 64), ((3, 3), 1)):   # strided, 1x1, stem
        assert layers.choose_conv_impl(*args, backend="cpu", onednn_available=True) == "patches"
    assert layers.choose_conv_impl((3, 3), 64, backend="gpu", onednn_available=True) == "xla"
    assert layers.choose_conv_impl((3, 3), 64, backend="cpu") == "onednn"
    x, kernel, _ = _arrays(1, 5, 5, 2, (3, 3), 2)
    cache_dir = jax.config.jax_compilation_cache_dir
    try:
        # Unset or "auto": on without a persistent compilation cache, off with one.
        for setting in (None, "auto", " AUTO "):
            if setting is None:
                monkeypatch.delenv(onednn.ENV_SWITCH)
            else:
                monkeypatch.setenv(onednn.ENV_SWITCH, setting)
            jax.config.update("jax_compilation_cache_dir", None)
            assert not onednn.persistent_cache_configured() and onednn.available()
            assert onednn.describe_setting() == (
                f"LENSJAX_ONEDNN={'' if setting is None else setting!r} (oneDNN kernels on, "
                "persistent compilation cache off)")
            assert layers.choose_conv_impl((3, 3), 64, backend="cpu") == "onednn"
            jax.config.update("jax_compilation_cache_dir", cache_dir or "/tmp/lensjax-cache")
            assert onednn.persistent_cache_configured() and not onednn.available()
            assert onednn.describe_setting().endswith(
                "(oneDNN kernels off, persistent compilation cache on)")
            assert layers.choose_conv_impl((3, 3), 64, backend="cpu") == "xla"
        # "0" is off and "1" on, with or without a cache.
        for cache in (None, cache_dir or "/tmp/lensjax-cache"):
            jax.config.update("jax_compilation_cache_dir", cache)
            monkeypatch.setenv(onednn.ENV_SWITCH, "off")
            assert not onednn.available()
            with pytest.raises(RuntimeError, match="LENSJAX_ONEDNN=1 to switch them on"):
                layers.conv_onednn(x, kernel, (1, 1))
            monkeypatch.setenv(onednn.ENV_SWITCH, "1")
            assert onednn.available()
    finally:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    monkeypatch.setenv(onednn.ENV_SWITCH, "maybe")
    with pytest.raises(ValueError, match="LENSJAX_ONEDNN='maybe' is not one of 1, 0 or auto"):
        onednn.switched_on()
    monkeypatch.delenv(onednn.ENV_SWITCH)
    with onednn.switch(False):
        assert not onednn.available()
    with onednn.switch(True):
        assert onednn.available()
    assert onednn.ENV_SWITCH not in os.environ


@requires_onednn
def test_vmap_folds_the_mapped_axis_into_the_batch_and_keeps_the_values():
    """As the diffusion and MAE tasks call their networks: vmapped over examples, with
    shared weights (one call on the folded batch), and with vmapped weights (lax)."""
    x, kernel, _ = _arrays(6, 9, 8, 4, (3, 3), 5)
    x = x.reshape(3, 2, 9, 8, 4)
    kernels = jnp.stack([kernel, 2 * kernel, -kernel])

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k)))

    ours = jax.vmap(jax.value_and_grad(loss(lambda x, k: layers.conv_onednn(x, k, (1, 1))), (0, 1)),
                    in_axes=(0, None))
    ref = jax.vmap(jax.value_and_grad(loss(_lax_conv), (0, 1)), in_axes=(0, None))
    for got, want in zip(jax.tree.leaves(jax.jit(ours)(x, kernel)), jax.tree.leaves(ref(x, kernel))):
        _assert_close_to_scale(got, want)
    compiled = jax.jit(ours).lower(x, kernel).compile().as_text()
    calls = re.findall(r"= f32\[([\d,]+)\]\S* custom-call\(.*" + re.escape(onednn.CUSTOM_CALL_TARGET),
                       compiled)
    assert sorted(calls) == ["6,9,8,4", "6,9,8,5"], calls   # forward, input gradient: 3 x 2 images
    per_kernel = jax.jit(jax.vmap(lambda x, k: layers.conv_onednn(x, k, (1, 1))))(x, kernels)
    _assert_close_to_scale(per_kernel, jax.vmap(_lax_conv)(x, kernels))
    dense = jax.jit(jax.vmap(lambda x: layers.dense_dot_general(x, kernel[0, 0],
                                                                (((3,), (0,)), ((), ())))))
    _assert_close_to_scale(dense(x), jnp.einsum("abhwc,cd->abhwd", x, kernel[0, 0]))


@requires_onednn
def test_networks_equal_their_xla_versions():
    """A ResNet-18 (BatchNorm) and a UNet (GroupNorm, attention) under "onednn" and "xla"."""
    for name, kwargs, size in (("resnet18", dict(num_classes=3, width=8), 32),
                               ("unet", dict(base_width=8, num_groups=4, channel_mults=(1, 2),
                                             attention_resolutions=(8,)), 16)):
        model = get_model(name, rngs=nnx.Rngs(0), image_size=size, **kwargs)
        # Random parameters everywhere (the fresh UNet is the zero function).
        params = nnx.state(model, nnx.Param)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        nnx.update(model, jax.tree.unflatten(treedef, [
            p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
        x = jax.random.normal(jax.random.key(1), (2, size, size, 1))
        args = (x,) if name == "resnet18" else (x, jnp.array([3, 500]))
        outputs = {}
        for impl in ("onednn", "xla"):
            layers.set_conv_impl(model, impl)
            graphdef, state = nnx.split(model)
            loss = lambda s: jnp.sum(jnp.sin(nnx.merge(graphdef, s)(*args)))   # noqa: E731
            outputs[impl] = compilation.jit(jax.value_and_grad(loss))(state)
        _assert_close_to_scale(outputs["onednn"][0], outputs["xla"][0], tol=1e-4)
        for got, want in zip(jax.tree.leaves(outputs["onednn"][1]), jax.tree.leaves(outputs["xla"][1])):
            _assert_close_to_scale(got, want, tol=1e-4)


# ----------------------------------------------------------------------------
# Matmuls and dense layers
# ----------------------------------------------------------------------------

@requires_onednn
@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (True, False), (False, True),
                                                      (True, True)])
def test_matmul_equals_numpy_with_operands_read_transposed(transpose_a, transpose_b):
    rng = np.random.default_rng(int(transpose_a) * 2 + int(transpose_b))
    a, b = rng.standard_normal((13, 7)).astype(np.float32), rng.standard_normal((7, 5)).astype(np.float32)
    got = jax.jit(lambda a, b: onednn.matmul(a, b, transpose_a, transpose_b))(
        a.T.copy() if transpose_a else a, b.T.copy() if transpose_b else b)
    _assert_close_to_scale(got, a @ b)
    with pytest.raises(TypeError, match="does not fit"):
        onednn.matmul(a, a)
    with pytest.raises(ValueError, match="2-D"):
        onednn.matmul(a[None], b)


_DENSE = (((2,), (0,)), ((), ()))


@requires_onednn
def test_dense_dot_general_values_gradients_and_fallbacks():
    x = jax.random.normal(jax.random.key(0), (4, 6, 12))
    kernel = jax.random.normal(jax.random.key(1), (12, 9)) / np.sqrt(12)

    def loss(dot):
        return lambda x, k: jnp.sum(jnp.sin(dot(x, k, _DENSE)))

    ours = jax.jit(jax.value_and_grad(loss(layers.dense_dot_general), (0, 1)))
    ref = jax.jit(jax.value_and_grad(loss(jax.lax.dot_general), (0, 1)))
    for got, want in zip(jax.tree.leaves(ours(x, kernel)), jax.tree.leaves(ref(x, kernel))):
        _assert_close_to_scale(got, want)
    assert ours.lower(x, kernel).as_text().count(onednn.MATMUL_TARGET) == 3   # fwd, dx, dk
    # bfloat16, another contraction and explicit precision go to lax.dot_general.
    for args in ((x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), _DENSE),
                 (x, x, (((2,), (2,)), ((0,), (0,))))):
        assert onednn.MATMUL_TARGET not in jax.jit(
            lambda a, b, dn=args[2]: layers.dense_dot_general(a, b, dn)).lower(*args[:2]).as_text()
    precise = jax.jit(lambda a, b: layers.dense_dot_general(a, b, _DENSE, precision="highest"))
    assert onednn.MATMUL_TARGET not in precise.lower(x, kernel).as_text()


@requires_onednn
def test_sharded_dense_sums_the_weight_gradient_over_devices():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.random.normal(jax.random.key(0), (16, 5, 12))
    kernel = jax.random.normal(jax.random.key(1), (12, 8)) / np.sqrt(12)
    step = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(layers.dense_dot_general(x, k, _DENSE))),
                            (0, 1)))
    sharded = step(jax.device_put(x, NamedSharding(mesh, P("data"))),
                   jax.device_put(kernel, NamedSharding(mesh, P(None, "data"))))   # FSDP-like
    for got, want in zip(sharded, step(x, kernel)):
        _assert_close_to_scale(got, want)
    compiled = step.lower(jax.device_put(x, NamedSharding(mesh, P("data"))), kernel).compile().as_text()
    local = re.findall(r"= f32\[([\d,]+)\]\S* custom-call\(.*" + re.escape(onednn.MATMUL_TARGET),
                       compiled)
    assert sorted(local) == ["10,12", "10,8", "12,8"], local     # 80 rows / 8 devices
    assert "all-reduce" in compiled


@requires_onednn
def test_mae_is_the_same_function_with_and_without_onednn(monkeypatch):
    model = get_model("mae", rngs=nnx.Rngs(0), image_size=16, patch_size=4, width=32, depth=1,
                      num_heads=2, decoder_width=16, decoder_depth=1, decoder_heads=2)
    images = jax.random.uniform(jax.random.key(3), (2, 16, 16, 1))
    graphdef, state = nnx.split(model)

    def loss(state):
        return nnx.merge(graphdef, state)(images, jax.random.key(4)).loss

    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(onednn.ENV_SWITCH, setting)
        step = compilation.jit(jax.value_and_grad(loss))
        assert (onednn.MATMUL_TARGET in step.lower(state).as_text()) == (setting == "1")
        results[setting] = step(state)
    for got, want in zip(jax.tree.leaves(results["1"]), jax.tree.leaves(results["0"])):
        _assert_close_to_scale(got, want, tol=1e-4)
