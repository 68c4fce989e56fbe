"""The diffusion UNet of lensjax.models.unet.

Every model here shares one tiny architecture (widths 8-16-16, one residual
block per level, attention at the lowest level), so parameter initialisation
compiles once per test session; inputs of 150, 64 and 16 pixels run through it.
Freshly built, the UNet is the zero function (zero-initialised output layers),
so tests that look at outputs first randomise every parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from lensjax import diffusion
from lensjax.models import MODELS, get_model
from lensjax.models import unet
from tests.models import norm_checks

TINY = dict(base_width=8, channel_mults=(1, 2, 2), num_res_blocks=1, num_groups=4, num_heads=2)
# Padded level sizes: 150 -> (152, 76, 38); 64 -> (64, 32, 16); 16 -> (16, 8, 4).
LOWEST_LEVEL_SIZE = {150: 38, 64: 16, 16: 4}


def _build(image_size: int = 150, seed: int = 0, **kwargs) -> unet.UNet:
    options = dict(TINY, attention_resolutions=(LOWEST_LEVEL_SIZE[image_size],))
    options.update(kwargs)
    return get_model("unet", rngs=nnx.Rngs(seed), image_size=image_size, **options)


@jax.jit
def _add_noise(params, key, scale):
    # One draw for all parameters: compiling one random-number kernel per leaf is slow.
    flat, unravel = ravel_pytree(params)
    return unravel(flat + scale * jax.random.normal(key, flat.shape, flat.dtype))


def _randomise(model: nnx.Module, seed: int, scale: float = 0.2) -> nnx.Module:
    """Add N(0, scale^2) to every parameter, so zero-initialised layers pass signals."""
    nnx.update(model, _add_noise(nnx.state(model, nnx.Param), jax.random.key(seed), scale))
    return model


_forward = jax.jit(lambda graphdef, state, x, t: nnx.merge(graphdef, state)(x, t),
                   static_argnums=0)


def _apply(model: nnx.Module, x: jax.Array, t: jax.Array) -> jax.Array:
    """Jitted model(x, t); equal graph definitions (same options and mode) share compilations."""
    return _forward(*nnx.split(model), x, t)


@pytest.fixture(scope="module")
def random_model() -> unet.UNet:
    model = _randomise(_build(150), seed=1)
    model.eval()
    return model


def _images(batch: int, size: int, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, 1), minval=-1.0, maxval=1.0)


# ----------------------------------------------------------------------------
# Construction and validation
# ----------------------------------------------------------------------------

def test_registered():
    assert "unet" in MODELS


def test_level_sizes_and_attention_levels():
    assert unet.level_sizes(150, 4) == (152, 76, 38, 19)
    assert unet.level_sizes(64, 3) == (64, 32, 16)
    assert unet.level_sizes(150, 1) == (150,)
    assert unet.attention_levels((19, 38), 150, 4) == (2, 3)
    assert unet.attention_levels((), 150, 4) == ()


@pytest.mark.parametrize("kwargs, match", [
    (dict(attention_resolutions=(16,)), r"attention_resolutions \(16,\).*\(152, 76, 38\)"),
    (dict(num_groups=3), "num_groups=3 must divide"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(channel_mults=()), "channel_mults must be"),
    (dict(conv_impl="cudnn"), "conv_impl must be one of"),
    (dict(num_heads=3), "num_heads=3 must divide"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _build(150, **kwargs)


def test_attention_modules_sit_at_the_requested_resolution():
    model = _build(150)
    blocks = [module for _, module in nnx.iter_modules(model)
              if isinstance(module, unet.AttentionBlock)]
    # Level 2 of 3: one encoder block, two decoder blocks, plus the middle block.
    assert len(blocks) == 4
    assert model.attention_levels == (2,)
    assert [block is not None for block in model.down_attention] == [False, False, True]
    assert [block is not None for block in model.up_attention] == [True, True] + [False] * 4
    assert all(block.qkv.in_features == 16 for block in blocks)

    none = _build(150, attention_resolutions=(), mid_attention=False)
    assert not any(isinstance(module, unet.AttentionBlock) for _, module in nnx.iter_modules(none))


def test_wrong_channel_count_raises(random_model):
    with pytest.raises(ValueError, match=r"\(B, H, W, 1\)"):
        random_model(jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,)))


# ----------------------------------------------------------------------------
# Padding, shapes, time embedding
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("size, multiple, pads", [(150, 8, (1, 1, 1, 1)), (149, 4, (1, 2, 1, 2)),
                                                  (64, 8, (0, 0, 0, 0))])
def test_pad_to_multiple_reflects_and_crop_undoes_it(size, multiple, pads):
    x = _images(2, size)
    padded, got_pads = unet.pad_to_multiple(x, multiple)
    assert got_pads == pads
    assert padded.shape[1] % multiple == 0 and padded.shape[2] % multiple == 0
    reference = np.pad(np.asarray(x), ((0, 0), pads[:2], pads[2:], (0, 0)), mode="reflect")
    np.testing.assert_array_equal(padded, reference)
    np.testing.assert_array_equal(unet.crop_padding(padded, got_pads), x)


@pytest.mark.parametrize("size", [150, 64])
def test_output_shape_equals_input_shape(random_model, size):
    x = _images(2, size, seed=size)
    out = _apply(random_model, x, jnp.array([3, 700]))
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
    assert float(jnp.std(out)) > 1e-3


def test_fresh_model_is_the_zero_function():
    model = _build(150)
    model.eval()
    np.testing.assert_array_equal(_apply(model, _images(2, 64), jnp.array([1, 2])), 0.0)


def test_timestep_embedding_matches_formula():
    t = np.array([0.0, 1.0, 17.0, 999.0])
    dim = 8
    frequencies = 10000.0 ** (-np.arange(4) / 4)
    expected = np.concatenate([np.sin(t[:, None] * frequencies), np.cos(t[:, None] * frequencies)],
                              axis=-1)
    np.testing.assert_allclose(unet.timestep_embedding(jnp.asarray(t), dim), expected, atol=1e-4)


def test_time_embedding_changes_the_output(random_model):
    x = jnp.repeat(_images(1, 64, seed=5), 2, axis=0)
    same_t = np.asarray(_apply(random_model, x, jnp.array([10, 10])))
    other_t = np.asarray(_apply(random_model, x, jnp.array([10, 500])))
    # Same x and t give the same output up to float32 rounding: a batch's images can take
    # different vector paths of a CPU's kernels (2.6e-6 apart on an AVX2-only EPYC).
    rounding = 1e-5 * np.max(np.abs(same_t))
    np.testing.assert_allclose(same_t[0], same_t[1], rtol=0, atol=rounding)   # same x, same t
    np.testing.assert_allclose(other_t[0], same_t[0], rtol=0, atol=rounding)
    assert np.max(np.abs(other_t[1] - other_t[0])) > 1e-2 * np.max(np.abs(other_t[0]))
    # A scalar t is broadcast over the batch.
    np.testing.assert_array_equal(random_model.time_embedding(jnp.array(7), 3),
                                  random_model.time_embedding(jnp.full((3,), 7), 3))


def test_bfloat16_compute_keeps_float32_params_and_output(random_model):
    model = _build(150, dtype=jnp.bfloat16)
    nnx.update(model, nnx.state(random_model, nnx.Param))
    model.eval()
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
        jnp.dtype(jnp.float32)}
    x, t = _images(2, 64, seed=6), jnp.array([5, 400])
    out = _apply(model, x, t)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    reference = np.asarray(_apply(random_model, x, t))
    error = np.max(np.abs(np.asarray(out) - reference))
    assert error < 0.05 * np.max(np.abs(reference)), error


# ----------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------

def test_dropout_uses_call_rngs_or_the_stored_stream_and_eval_turns_it_off(random_model):
    model = _build(150, dropout=0.5)
    nnx.update(model, nnx.state(random_model, nnx.Param))
    x, t = _images(2, 64, seed=7), jnp.array([5, 400])

    @nnx.jit
    def with_key_and_with_stored_stream(model, x, t, key):
        return model(x, t, rngs=nnx.Rngs(dropout=key)), model(x, t)

    model.train()
    first, stored_first = with_key_and_with_stored_stream(model, x, t, jax.random.key(0))
    again, stored_again = with_key_and_with_stored_stream(model, x, t, jax.random.key(0))
    other, _ = with_key_and_with_stored_stream(model, x, t, jax.random.key(1))
    np.testing.assert_array_equal(first, again)                       # masks follow the key
    assert np.max(np.abs(np.asarray(first - other))) > 1e-3
    # Without rngs the stream stored in the model is used and advances on every call.
    assert np.max(np.abs(np.asarray(stored_first - stored_again))) > 1e-3

    model.eval()
    dropouts = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Dropout)]
    assert len(dropouts) == 3 + 2 + 6           # encoder, middle and decoder residual blocks
    assert all(m.deterministic for m in dropouts)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

def _ring_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Gaussian rings (Einstein-ring-like) in [0, 1]: (count, size, size, 1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    rings = []
    for _ in range(count):
        cx, cy, radius = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.3, 0.6)
        rings.append(np.exp(-((np.hypot(xx - cx, yy - cy) - radius) / 0.12) ** 2))
    return np.stack(rings)[..., None].astype(np.float32)


def test_adam_on_the_eps_loss_fits_a_few_images():
    """150 Adam steps on 8 rings of 16x16 px cut the eps-prediction loss at least tenfold."""
    schedule = diffusion.make_schedule("cosine", 1000)
    x0 = diffusion.to_model_space(jnp.asarray(_ring_images(8, 16)))
    model = _build(16)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # Timesteps from the noisier 3/4 of the schedule: near t = 0 the optimal eps
    # loss of any small network stays high (eps must be read off a ~1% noise).
    min_t = 250

    def loss_fn(params, x, rng):
        net = nnx.merge(graphdef, params, rest)
        t = jax.random.randint(jax.random.fold_in(rng, 1), (x.shape[0],), min_t, 1000)
        return diffusion.diffusion_loss(schedule, net, x, rng, t=t,
                                        parameterization="eps", weighting="none").mean()

    tx = optax.adam(3e-3)

    @jax.jit
    def train_step(params, opt_state, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, x0, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # The same 128 (image, t, noise) draws before and after training.
    evaluate = jax.jit(lambda params: loss_fn(params, jnp.tile(x0, (16, 1, 1, 1)),
                                              jax.random.key(1234)))
    initial = float(evaluate(params))
    opt_state = tx.init(params)
    for step in range(150):
        params, opt_state, _ = train_step(params, opt_state, jax.random.key(step))
    final = float(evaluate(params))
    assert 0.8 < initial < 1.2                     # zero output: the loss is the noise power
    assert final < initial / 10, (initial, final)


@pytest.mark.parametrize("shape, groups", [((2, 12, 12, 32), 32), ((2, 10, 10, 64), 32),
                                           ((3, 7, 5, 16), 4), ((1, 6, 6, 8), 1)])
def test_group_norm_equals_nnx_group_norm_with_gradients(shape, groups):
    """lensjax's GroupNorm (written-out gradient) against nnx.GroupNorm: same
    parameters, outputs and gradients for x, scale and bias, on inputs with a
    non-zero mean and a random scale and bias."""
    from lensjax.models.layers import GroupNorm

    channels = shape[-1]
    ours = GroupNorm(channels, num_groups=groups, rngs=nnx.Rngs(0))
    ref = nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-5, rngs=nnx.Rngs(0))
    assert jax.tree.structure(nnx.state(ours, nnx.Param)) == jax.tree.structure(
        nnx.state(ref, nnx.Param))
    norm_checks.same_random_affine((ours, ref), channels)
    x, dy = norm_checks.inputs_and_cotangent(shape)
    norm_checks.assert_same_outputs_and_grads(norm_checks.output_and_param_grads(ours, x, dy),
                                              norm_checks.output_and_param_grads(ref, x, dy))


@pytest.mark.parametrize("groups, channels", [(32, 96), (4, 16), (8, 8), (1, 8)])
def test_group_to_channel_expansion_is_an_exact_repeat(groups, channels):
    """The group -> channel expansion (a product with the membership matrix on CPU)
    gives each channel exactly its group's value, across float32's range."""
    from lensjax.models import layers

    rng = np.random.default_rng(0)
    values = (rng.standard_normal((3, groups)) * 10.0 ** rng.integers(-30, 30, (3, groups)))
    values = jnp.asarray(values, jnp.float32)
    got = jax.jit(layers._expand_groups, static_argnums=1)(values, channels)
    np.testing.assert_array_equal(np.asarray(got),
                                  np.repeat(np.asarray(values), channels // groups, axis=1))


def test_group_norm_bfloat16_and_bad_groups():
    from lensjax.models.layers import GroupNorm

    norm = GroupNorm(8, num_groups=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    y = norm(x)
    assert y.dtype == jnp.bfloat16 and norm.scale[...].dtype == jnp.float32
    ref = nnx.GroupNorm(8, num_groups=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), atol=3e-2)
    with pytest.raises(ValueError, match="must divide"):
        GroupNorm(10, num_groups=4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("shape, groups, modulated", [((2, 12, 12, 32), 32, True),
                                                      ((2, 10, 10, 64), 32, True),
                                                      ((3, 7, 5, 16), 4, True),
                                                      ((1, 6, 6, 8), 1, False)])
def test_group_norm_silu_equals_flax_composition_with_gradients(shape, groups, modulated):
    """GroupNorm.silu (one written-out gradient) against jax.nn.silu(nnx.GroupNorm(x)
    * (1 + s) + t): outputs and the gradients of x, scale, bias, s and t."""
    from lensjax.models.layers import GroupNorm

    batch, channels = shape[0], shape[-1]
    ours = GroupNorm(channels, num_groups=groups, rngs=nnx.Rngs(0))
    ref = nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-5, rngs=nnx.Rngs(0))
    norm_checks.same_random_affine((ours, ref), channels)
    x, dy = norm_checks.inputs_and_cotangent(shape)
    film = (0.5 * jax.random.normal(jax.random.key(5), (2, batch, channels)) if modulated
            else jnp.zeros((2, batch, channels)))

    def run(module, apply):
        graphdef, params = nnx.split(module, nnx.Param)
        y, vjp = jax.vjp(lambda p, x, film: apply(nnx.merge(graphdef, p), x, film),
                         params, x, film)
        return y, vjp(dy)

    def composition(norm, x, film):
        return jax.nn.silu(norm(x) * (1.0 + film[0][:, None, None]) + film[1][:, None, None])

    if modulated:
        y, (p, dx, dfilm) = run(ours, lambda norm, x, film: norm.silu(x, film[0], film[1]))
    else:
        y, (p, dx, dfilm) = run(ours, lambda norm, x, film: norm.silu(x))
    y_ref, (p_ref, dx_ref, dfilm_ref) = run(ref, composition)
    norm_checks.assert_same_outputs_and_grads((y, (p, dx)), (y_ref, (p_ref, dx_ref)))
    if modulated:
        np.testing.assert_allclose(np.asarray(dfilm), np.asarray(dfilm_ref), rtol=1e-4, atol=1e-4)
    else:
        assert not np.any(np.asarray(dfilm))


def test_group_norm_silu_bfloat16():
    """In bfloat16 the result has the input's dtype and the composition's values."""
    from lensjax.models.layers import GroupNorm

    norm = GroupNorm(8, num_groups=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    scale, shift = jax.random.normal(jax.random.key(1), (2, 2, 8)).astype(jnp.bfloat16)
    y = norm.silu(x, scale, shift)
    assert y.dtype == jnp.bfloat16
    ref = jax.nn.silu(norm(x).astype(jnp.float32) * (1.0 + scale.astype(jnp.float32)[:, None, None])
                      + shift.astype(jnp.float32)[:, None, None])
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=5e-2)


@pytest.mark.parametrize("conv_impl", ["auto", "xla", "patches"])
@pytest.mark.parametrize("shape, features", [((2, 5, 7, 3), 4), ((1, 6, 6, 8), 8)])
def test_upsample_conv_equals_conv_of_repeated_image(conv_impl, shape, features):
    """upsample_conv (2 x 2 phase kernels on the input grid) against the 3 x 3
    convolution of the nearest-neighbour x2 image: values and the gradients of x,
    kernel and bias, on odd and even sizes."""
    from lensjax.models.unet import Conv, upsample_conv

    conv = Conv(shape[-1], features, 3, use_bias=True, conv_impl=conv_impl, rngs=nnx.Rngs(0))
    conv.bias[...] = jax.random.normal(jax.random.key(3), (features,))
    graphdef, params = nnx.split(conv, nnx.Param)
    x = jax.random.normal(jax.random.key(1), shape)
    dy = jax.random.normal(jax.random.key(2), (shape[0], 2 * shape[1], 2 * shape[2], features))

    def reference(conv, x):
        return conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))

    results = []
    for fn in (upsample_conv, lambda x, conv: reference(conv, x)):
        y, vjp = jax.vjp(lambda p, x: fn(x, nnx.merge(graphdef, p)), params, x)
        results.append((y, *vjp(dy)))
    (y, dp, dx), (y_ref, dp_ref, dx_ref) = results
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-4, atol=1e-4)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(np.asarray(dp[name][...]), np.asarray(dp_ref[name][...]),
                                   rtol=1e-4, atol=1e-4, err_msg=name)


def test_upsample_conv_rejects_other_kernels():
    from lensjax.models.unet import Conv, upsample_conv

    x = jnp.zeros((1, 4, 4, 2))
    for conv in (Conv(2, 2, 1, rngs=nnx.Rngs(0)), Conv(2, 2, 3, 2, rngs=nnx.Rngs(0))):
        with pytest.raises(ValueError, match="3 x 3 stride-1"):
            upsample_conv(x, conv)
