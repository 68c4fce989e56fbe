"""ResNet-18/34/50 and the Conv wrapper of lensjax.models.resnet, and the model registry.

The "patches" convolution (im2col + matmul) must be the same function as XLA's
convolution / nnx.Conv with the same kernel: checked to 1e-5 relative to the
output scale for strides 1 and 2, kernel sizes 1/3/5/7, odd and even inputs and
several channel counts; whole networks with shared parameters must agree under
both implementations. One real optax step on a fixed batch must lower the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lensjax.models import MODELS, get_model, register
from lensjax.models import layers, onednn, resnet
from tests.models import norm_checks

TINY = dict(width=8)


def _images(batch: int, size: int, channels: int = 1, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, size, size, channels))


def _assert_close_to_scale(actual, expected, tol: float = 1e-5) -> None:
    """max |actual - expected| <= tol * max(1, max |expected|)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    err = float(np.max(np.abs(actual - expected)))
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:g} * {scale:.3g}"


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------

def test_registry_lists_resnets():
    assert {"resnet18", "resnet34", "resnet50"} <= set(MODELS)


def test_unknown_model_error_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet99'.*resnet18.*resnet34.*resnet50"):
        get_model("resnet99", num_classes=3, rngs=nnx.Rngs(0))


def test_register_refuses_a_second_builder_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register("resnet18")(lambda **kwargs: None)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stem="tiny"), "stem must be one of"),
    (dict(conv_impl="cudnn"), "conv_impl must be one of"),
    (dict(width=0), "must be >= 1"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_model("resnet18", num_classes=3, rngs=nnx.Rngs(0), **kwargs)


def test_wrong_channel_count_raises():
    model = get_model("resnet18", num_classes=3, rngs=nnx.Rngs(0), **TINY)
    with pytest.raises(ValueError, match=r"\(B, H, W, 1\)"):
        model(jnp.zeros((2, 16, 16)))


# ----------------------------------------------------------------------------
# Shapes, stems, dtypes
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("size", [32, 150])
def test_output_shapes(name, size):
    model = get_model(name, num_classes=3, rngs=nnx.Rngs(0), image_size=size, **TINY)
    assert model.stem == ("imagenet" if size == 150 else "small")
    expansion = 4 if name == "resnet50" else 1
    assert model.num_features == 8 * 8 * expansion
    logits = jax.jit(lambda g, s, x: nnx.merge(g, s)(x))(*nnx.split(model), _images(2, size))
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


def test_stem_choice_and_in_channels():
    assert resnet.resolve_stem("auto", 64) == "small"
    assert resnet.resolve_stem("auto", 150) == "imagenet"
    assert resnet.resolve_stem("small", 150) == "small"
    model = get_model("resnet18", num_classes=5, rngs=nnx.Rngs(0), in_channels=3, stem="imagenet",
                      **TINY)
    assert model.stem_conv.kernel.shape == (7, 7, 3, 8)
    assert model(_images(2, 40, channels=3)).shape == (2, 5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = get_model("resnet18", num_classes=3, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **TINY)
    params = nnx.state(model, nnx.Param)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    logits = model(_images(2, 16))
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))


# ----------------------------------------------------------------------------
# Conv: "patches" is the same function as XLA's convolution
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7])
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("size, cin, cout", [(9, 1, 8), (16, 3, 16), (5, 64, 32), (2, 128, 64)])
def test_patches_conv_matches_xla_conv(kernel_size, strides, size, cin, cout):
    key_x, key_w = jax.random.split(jax.random.key(kernel_size * 100 + strides * 10 + cin))
    x = jax.random.normal(key_x, (3, size, size, cin))
    kernel = jax.random.normal(key_w, (kernel_size, kernel_size, cin, cout)) / np.sqrt(
        kernel_size * kernel_size * cin)
    expected = layers.conv_xla(x, kernel, (strides, strides))
    out_size = -(-size // strides)
    assert expected.shape == (3, out_size, out_size, cout)
    _assert_close_to_scale(layers.conv_patches(x, kernel, (strides, strides)), expected)


def _lax_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("batch, height, width, kernel_size, strips", [
    (2, 19, 17, 3, 2), (1, 10, 10, 3, 4), (3, 7, 9, 5, 3), (2, 8, 8, 4, 2), (1, 6, 5, 3, 6),
    (2, 152, 152, 3, 2), (8, 12, 10, 3, 1), (4, 9, 9, 4, 1)])
def test_weight_gradient_equals_xlas(batch, height, width, kernel_size, strips):
    # Strips that do not divide the height, an even kernel (asymmetric SAME padding),
    # one strip per row, the UNet's first level, and whole images (strips=1).
    key_x, key_w, key_dy = jax.random.split(jax.random.key(height * 10 + kernel_size), 3)
    x = jax.random.normal(key_x, (batch, height, width, 4))
    kernel = jax.random.normal(key_w, (kernel_size, kernel_size, 4, 6))
    dy = jax.random.normal(key_dy, (batch, height, width, 6))
    expected = jax.vjp(lambda k: _lax_conv(x, k), kernel)[1](dy)[0]
    got = jax.jit(layers.weight_grad, static_argnums=3)(x, dy, kernel, strips)
    _assert_close_to_scale(got, expected)


def test_strip_count():
    assert layers.STRIP_WEIGHT_GRAD_MIN_BATCH == 4
    assert layers.strip_count(1, 64) == 4 and layers.strip_count(2, 152) == 2
    assert layers.strip_count(3, 64) == 2 and layers.strip_count(4, 64) == 1
    assert layers.strip_count(1, 2) == 2  # never more strips than rows


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the strip path is CPU-only")
@pytest.mark.parametrize("batch", [1, 2, 8])
def test_conv_xla_values_and_gradients_equal_laxs_at_every_batch(batch):
    # Every batch takes lensjax's weight gradient (a custom VJP), small ones on strips.
    x = _images(batch, 12, channels=5)
    kernel = jax.random.normal(jax.random.key(7), (3, 3, 5, 7)) / np.sqrt(45.0)

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k)))

    ours = jax.jit(jax.value_and_grad(loss(lambda x, k: layers.conv_xla(x, k, (1, 1))), (0, 1)))
    lax_ = jax.jit(jax.value_and_grad(loss(_lax_conv), (0, 1)))
    (value, (dx, dk)), (ref_value, (ref_dx, ref_dk)) = ours(x, kernel), lax_(x, kernel)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_array_equal(dx, ref_dx)
    _assert_close_to_scale(dk, ref_dk)
    assert "custom_vjp" in str(jax.make_jaxpr(lambda x: layers.conv_xla(x, kernel, (1, 1)))(x))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fusion barrier is CPU-only")
def test_weight_gradient_transposes_a_materialised_input():
    # The channels-first copy of x sits in a conditional's branch, so XLA:CPU cannot fuse
    # the ReLU that produces x into it; the gradient keeps lax's values.
    x = _images(8, 12, channels=5)
    kernel = jax.random.normal(jax.random.key(7), (3, 3, 5, 7)) / np.sqrt(45.0)

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(jax.nn.relu(2.0 * x + 1.0), k)))

    ours = jax.jit(jax.grad(loss(lambda x, k: layers.conv_xla(x, k, (1, 1))), 1))
    hlo = ours.lower(x, kernel).compile().as_text()
    assert "conditional(" in hlo
    expected = jax.grad(loss(_lax_conv), 1)(x, kernel)
    _assert_close_to_scale(ours(x, kernel), expected)
    # With a NaN in the kernel (the other branch) the gradient is lax's too.
    bad = kernel.at[0, 0, 0, 0].set(jnp.nan)
    np.testing.assert_array_equal(np.isnan(ours(x, bad)), np.isnan(jax.grad(loss(_lax_conv), 1)(x, bad)))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fusion barrier is CPU-only")
def test_materialize_computes_a_residual_chain_once_for_all_its_consumers():
    # Two residual blocks' sums read by the nine taps of a strided im2col: XLA:CPU
    # rebuilds the chain from a, b and c in every tap unless it is materialised.
    # Values and gradients are those of the identity.
    a, b, c = (_images(8, 16, channels=32, seed=seed) for seed in range(3))
    kernel = jax.random.normal(jax.random.key(7), (3, 3, 32, 16)) / np.sqrt(288.0)
    fence = jnp.ones((4,))

    def loss(wrap):
        def fn(a, b, c, kernel, fence):
            h = wrap(jax.nn.relu(jax.nn.relu(2.0 * a + b) + c), fence)
            return jnp.sum(jnp.sin(layers.conv_patches(h, kernel, (2, 2))))
        return jax.jit(jax.value_and_grad(fn, (0, 1, 2, 3)))

    # The fence is an argument, as a model's parameters are: a constant one would let
    # XLA fold the conditional away.
    ours, plain = loss(layers.materialize), loss(lambda h, fence: h)
    args = (a, b, c, kernel, fence)

    def bytes_accessed(fn):
        cost = fn.lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"]

    assert "conditional(" in ours.lower(*args).compile().as_text()
    assert bytes_accessed(ours) < 0.9 * bytes_accessed(plain)
    (value, grads), (ref_value, ref_grads) = ours(*args), plain(*args)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for grad, ref in zip(grads, ref_grads):
        _assert_close_to_scale(grad, ref, 1e-6)
    assert jax.grad(lambda f: jnp.sum(layers.materialize(a, f)))(fence).tolist() == [0.0] * 4


@pytest.mark.parametrize("size, window, strides, padding", [
    (75, (3, 3), (2, 2), ((1, 1), (1, 1))),   # the ResNet-18 stem at 150 px
    (32, (3, 3), (2, 2), ((1, 1), (1, 1))),   # even map
    (9, (2, 2), (2, 2), ((0, 0), (0, 0))),    # non-overlapping, odd map (last row unused)
    (8, (3, 2), (1, 2), ((1, 1), (0, 1))),    # uneven window, strides and padding
])
@pytest.mark.parametrize("fenced", [False, True])
def test_max_pool_values_and_gradients_equal_reduce_window(size, window, strides, padding, fenced):
    """lensjax's max pool (custom gradient on CPU) against lax.reduce_window and its
    XLA gradient, on ReLU'd quantised inputs, so that many windows hold tied maxima
    (the gradient must go to the first of them, as XLA's and PyTorch's do); with a
    fence (argmax map and incoming gradient materialised on CPU) the same, and the
    fence gets a zero gradient."""
    x = jnp.round(4 * jax.nn.relu(jax.random.normal(jax.random.key(0), (2, size, size + 1, 3)))) / 4
    fence = jnp.ones((3,)) if fenced else None

    def pool(x, fence):
        return layers.max_pool(x, window, strides, padding, fence=fence)

    y = jax.jit(pool)(x, fence)
    expected = layers.max_pool_xla(x, window, strides, padding)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    dy = jax.random.normal(jax.random.key(1), y.shape)
    backward = jax.jit(lambda x, fence, dy: jax.vjp(pool, x, fence)[1](dy))
    grad, dfence = backward(x, fence, dy)
    if fenced:
        assert dfence.tolist() == [0.0] * 3
        if jax.default_backend() == "cpu":
            assert "conditional(" in backward.lower(x, fence, dy).compile().as_text()
    expected_grad = jax.vjp(lambda x: layers.max_pool_xla(x, window, strides, padding),
                            x)[1](dy)[0]
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), rtol=1e-6, atol=1e-6)
    assert float(jnp.mean(x == 0)) > 0.4  # the ties are really there


def test_conv_module_equals_nnx_conv_for_both_impls():
    reference = nnx.Conv(6, 10, (3, 3), strides=2, padding="SAME", use_bias=True, rngs=nnx.Rngs(1))
    reference.bias[...] = jax.random.normal(jax.random.key(3), (10,))
    x = _images(2, 11, channels=6)
    for impl in ("xla", "patches", "auto"):
        conv = layers.Conv(6, 10, 3, 2, use_bias=True, conv_impl=impl, rngs=nnx.Rngs(0))
        conv.kernel[...] = reference.kernel[...]
        conv.bias[...] = reference.bias[...]
        _assert_close_to_scale(conv(x), reference(x))


def test_choose_conv_impl_rule():
    # Without oneDNN (the default, or another jaxlib); tests/models/test_onednn.py has the rest.
    def rule(*args, **kwargs):
        return layers.choose_conv_impl(*args, onednn_available=False, **kwargs)

    assert rule((3, 3), 512, backend="gpu") == "xla"
    assert rule((3, 3), 512, (2, 2), (1, 1), backend="tpu") == "xla"
    assert rule((3, 3), 512, backend="cpu") == "patches"
    assert rule((3, 3), 64, output_size=(38, 38), backend="cpu") == "xla"
    assert rule((3, 3), 16, backend="cpu") == "xla"
    assert rule((3, 3), 16, (2, 2), backend="cpu") == "patches"
    assert rule((3, 3), 128, output_size=(2, 2), backend="cpu") == "patches"
    assert rule((3, 3), 128, output_size=(4, 4), backend="cpu") == "xla"
    assert rule((1, 1), 16, backend="cpu") == "patches"
    assert rule((7, 7), 1, (2, 2), backend="cpu") == "patches"
    assert layers.conv_output_size((75, 150), (2, 2)) == (38, 75)


def test_auto_resolves_per_layer_from_the_input_map(monkeypatch):
    monkeypatch.setenv(onednn.ENV_SWITCH, "0")   # the map-size part of the rule is oneDNN-free
    conv = layers.Conv(64, 64, 3, conv_impl="auto", rngs=nnx.Rngs(0))
    expected = "xla" if jax.default_backend() != "cpu" else "patches"
    assert conv.resolved_impl((2, 2)) == expected
    assert conv.resolved_impl((16, 16)) == "xla"


@pytest.mark.parametrize("name, size", [("resnet18", 32), ("resnet50", 150)])
def test_network_is_the_same_function_under_both_conv_impls(name, size):
    model = get_model(name, num_classes=4, rngs=nnx.Rngs(0), image_size=size, **TINY)
    x = _images(4, size, seed=1)
    forward = jax.jit(lambda g, s, x: nnx.merge(g, s)(x))
    outputs = {}
    for train in (True, False):
        model.train() if train else model.eval()
        for impl in ("xla", "patches"):
            layers.set_conv_impl(model, impl)
            outputs[impl, train] = forward(*nnx.split(model), x)
        _assert_close_to_scale(outputs["patches", train], outputs["xla", train], tol=1e-4)


# ----------------------------------------------------------------------------
# BatchNorm modes and training
# ----------------------------------------------------------------------------

def test_train_and_eval_modes_change_batchnorm_behaviour():
    model = get_model("resnet18", num_classes=3, rngs=nnx.Rngs(0), **TINY)
    x = _images(4, 16, seed=2)
    x_other = x.at[1:].set(_images(3, 16, seed=3))       # same first image, other batch-mates
    stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))

    model.eval()
    assert model.stem_bn.use_running_average
    eval_a, eval_b = model(x), model(x_other)
    np.testing.assert_allclose(eval_a[0], eval_b[0], rtol=1e-6, atol=1e-6)   # per-sample
    for before, after in zip(jax.tree.leaves(stats_before),
                             jax.tree.leaves(nnx.state(model, nnx.BatchStat))):
        np.testing.assert_array_equal(before, after)                       # no updates

    model.train()
    assert not model.stem_bn.use_running_average
    train_a, train_b = model(x), model(x_other)
    assert np.max(np.abs(np.asarray(train_a[0] - train_b[0]))) > 1e-4     # batch statistics
    assert np.max(np.abs(np.asarray(train_a - eval_a))) > 1e-4
    changed = [not np.array_equal(before, np.asarray(after))
               for before, after in zip(jax.tree.leaves(stats_before),
                                        jax.tree.leaves(nnx.state(model, nnx.BatchStat)))]
    assert all(changed)                                                    # running stats moved


def test_optax_step_decreases_loss_on_a_fixed_batch():
    model = get_model("resnet18", num_classes=3, rngs=nnx.Rngs(0), **TINY)
    images = _images(16, 16, seed=4)
    labels = jnp.arange(16) % 3
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    def loss_fn(params, batch_stats):
        # copy=True: fresh Variables inside this trace, so BatchNorm can update them.
        net = nnx.merge(graphdef, params, batch_stats, copy=True)
        logits = net(images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, nnx.state(net, nnx.BatchStat)

    @jax.jit
    def train_step(params, batch_stats, opt_state):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    losses = []
    for _ in range(4):
        params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state)
        losses.append(float(loss))
    final_loss, _ = jax.jit(loss_fn)(params, batch_stats)
    assert np.all(np.isfinite(losses))
    assert float(final_loss) < losses[0] - 0.05, (losses, float(final_loss))
    # The head is among the trained parameters (a known failure of public code).
    head_before = nnx.state(model, nnx.Param)["head"]["kernel"][...]
    assert not np.allclose(np.asarray(params["head"]["kernel"][...]), np.asarray(head_before))


@pytest.mark.parametrize("shape", [(4, 6, 6, 8), (8, 5, 7, 16), (3, 12)])
def test_batch_norm_equals_nnx_batch_norm_with_gradients_and_statistics(shape):
    """lensjax's BatchNorm (written-out gradient) against nnx.BatchNorm in training
    mode: same outputs, running statistics and gradients for x, scale and bias, on
    inputs with a non-zero mean, a random scale and bias, and a loss that also
    reaches the batch statistics through the returned mean and variance."""
    channels = shape[-1]
    make = dict(momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
    ours, ref = layers.BatchNorm(channels, **make), nnx.BatchNorm(channels, **make)
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(ref))
    norm_checks.same_random_affine((ours, ref), channels)
    x, dy = norm_checks.inputs_and_cotangent(shape)

    def run(module):
        graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)

        def fn(p, s, x):
            merged = nnx.merge(graphdef, p, s)
            return merged(x), nnx.state(merged, nnx.BatchStat)

        (y, new_stats), vjp = jax.vjp(fn, params, stats, x)
        p_grad, _, x_grad = vjp((dy, jax.tree.map(jnp.zeros_like, new_stats)))
        return y, new_stats, (p_grad, x_grad)

    (y, stats, grads), (y_ref, stats_ref, grads_ref) = run(ours), run(ref)
    norm_checks.assert_same_outputs_and_grads((y, grads), (y_ref, grads_ref))
    for name in ("mean", "var"):
        np.testing.assert_allclose(np.asarray(stats[name][...]), np.asarray(stats_ref[name][...]),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    # Gradients through the returned statistics: a loss on the mean and variance.
    def stat_loss(fn):
        return lambda x: jnp.sum(jnp.sin(fn(x)[1]) + jnp.cos(2.0 * fn(x)[2]))

    ours_fn = lambda x: layers.batch_norm_train(x, jnp.ones(channels), jnp.zeros(channels), 1e-5)
    ref_fn = lambda x: (None, *layers._channel_stats(x))
    np.testing.assert_allclose(np.asarray(jax.grad(stat_loss(ours_fn))(x)),
                               np.asarray(jax.grad(stat_loss(ref_fn))(x)), rtol=1e-4, atol=1e-6)


def _jaxpr_of_call(module, x) -> str:
    graphdef, state = nnx.split(module)
    return str(jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, x))


def test_batch_norm_falls_back_to_nnx_outside_float32_training():
    ours = layers.BatchNorm(8, momentum=0.9, rngs=nnx.Rngs(0))
    ref = nnx.BatchNorm(8, momentum=0.9, rngs=nnx.Rngs(0))
    x = 1.0 + jax.random.normal(jax.random.key(0), (4, 3, 3, 8))
    for module in (ours, ref):
        module(x)                                       # one training step of statistics
        module.eval()
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-6)
    assert "custom_vjp" not in _jaxpr_of_call(ours, x)
    half = layers.BatchNorm(8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert half(x).dtype == jnp.bfloat16
    assert "custom_vjp" not in _jaxpr_of_call(half, x)
    ours.train()
    assert "custom_vjp" in _jaxpr_of_call(ours, x)
