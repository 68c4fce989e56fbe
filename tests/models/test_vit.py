"""ViT encoder and classifier of lensjax.models.vit.

References: patches against explicit slicing, the linear patch embedding against
a stride-p convolution, position embeddings against the MAE sin-cos formula
evaluated element by element, self-attention against a numpy implementation,
parameter counts against the analytic count (which also shows the position
embeddings are not parameters), and permutation equivariance of the transformer
over tokens. Real optimisation steps run in test_mae.py and test_superres.py,
with the `adam_losses` helper defined here (as is `run`, a jitted method call).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax
from jax.flatten_util import ravel_pytree

from lensjax.models import MODELS, get_model
from lensjax.models import vit
from tests.models import norm_checks

TINY = dict(width=32, depth=2, num_heads=2)
# Most tests share one encoder geometry (16 px, patch 4: a 4 x 4 grid) so that
# compiled computations are reused across tests.
SMALL = dict(image_size=16, patch_size=4, **TINY)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _run(graphdef, state, method, static_kwargs, *args):
    return getattr(nnx.merge(graphdef, state), method)(*args, **dict(static_kwargs))


def run(model: nnx.Module, method: str, *args, **static_kwargs):
    """model.method(*args, **static_kwargs) under jax.jit, compiled once per model structure.

    (Much cheaper here than op-by-op execution; modules of equal structure share
    the compiled function.)
    """
    graphdef, state = nnx.split(model)
    return _run(graphdef, state, method, tuple(sorted(static_kwargs.items())), *args)


def adam_losses(model: nnx.Module, loss_of_model, steps: int, learning_rate: float = 3e-3) -> list[float]:
    """Losses of `steps` optax.adam steps on `loss_of_model(model) -> ()` (the last after steps-1 updates).

    Adam runs on the parameters raveled into one vector: the same updates, far
    fewer operations to compile than one update per parameter array.
    """
    graphdef, params = nnx.split(model)
    flat, unravel = ravel_pytree(params)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(flat)

    @jax.jit
    def step(flat, opt_state):
        loss, grads = jax.value_and_grad(lambda v: loss_of_model(nnx.merge(graphdef, unravel(v))))(flat)
        updates, opt_state = optimizer.update(grads, opt_state, flat)
        return optax.apply_updates(flat, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        flat, opt_state, loss = step(flat, opt_state)
        losses.append(float(loss))
    return losses


@pytest.fixture(scope="module")
def encoder() -> vit.ViTEncoder:
    return vit.ViTEncoder(rngs=nnx.Rngs(0), **SMALL)


def _images(batch: int, height: int, width: int | None = None, channels: int = 1,
            seed: int = 0) -> jax.Array:
    width = height if width is None else width
    return jax.random.normal(jax.random.key(seed), (batch, height, width, channels))


def transformer_param_count(width: int, depth: int, mlp_dim: int) -> int:
    """Parameters of `depth` pre-norm blocks: 2 LayerNorms, fused qkv, proj, 2-layer MLP."""
    per_block = (2 * 2 * width + width * 3 * width + 3 * width + width * width + width
                 + width * mlp_dim + mlp_dim + mlp_dim * width + width)
    return depth * per_block


def encoder_param_count(width: int, depth: int, mlp_dim: int, patch: int, channels: int) -> int:
    """Patch embedding + [CLS] + blocks + final LayerNorm (no position embedding)."""
    return (patch * patch * channels * width + width + width
            + transformer_param_count(width, depth, mlp_dim) + 2 * width)


def param_count(model: nnx.Module) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ----------------------------------------------------------------------------
# Sizes and validation
# ----------------------------------------------------------------------------

def test_registry_lists_vit_models():
    assert {"vit", "mae", "vit_superres"} <= set(MODELS)


@pytest.mark.parametrize("variant, expected", [
    ("Ti", (192, 12, 3, 768, 8)), ("S", (384, 12, 6, 1536, 8)), ("B", (768, 12, 12, 3072, 8)),
    ("L", (1024, 24, 16, 4096, 8)), ("B/16", (768, 12, 12, 3072, 16)),
])
def test_variant_sizes(variant, expected):
    assert tuple(vit.resolve_size(variant)) == expected


def test_overrides_replace_the_variant():
    size = vit.resolve_size("B", patch_size=4, width=64, depth=3, num_heads=4)
    assert size == vit.ViTSize(64, 3, 4, 256, 4)
    assert vit.resolve_size("S", mlp_dim=100).mlp_dim == 100


@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="XL"), "unknown ViT variant"),
    (dict(variant="S/x"), "must be an integer"),
    (dict(variant="S/8", patch_size=4), "contradicts"),
    (dict(width=30, num_heads=4), "not divisible by num_heads"),
    (dict(width=6, num_heads=3), "divisible by 4"),
    (dict(depth=0), "must be >= 1"),
])
def test_bad_sizes_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vit.resolve_size(**{"variant": "S", **kwargs})


def test_image_size_not_divisible_by_patch_raises():
    with pytest.raises(ValueError, match="not divisible by patch_size 8"):
        vit.ViTEncoder(image_size=65, patch_size=8, rngs=nnx.Rngs(0), **TINY)
    with pytest.raises(ValueError, match="not divisible by patch_size 5"):
        vit.grid_shape((75, 64), 5)
    assert vit.grid_shape(75, 5) == (15, 15)
    assert vit.grid_shape((48, 64), 8) == (6, 8)


def test_wrong_image_shape_raises(encoder):
    with pytest.raises(ValueError, match=r"\(B, 16, 16, 1\)"):
        encoder(jnp.zeros((2, 32, 32, 1)))


# ----------------------------------------------------------------------------
# Patches and position embeddings
# ----------------------------------------------------------------------------

def test_patchify_matches_slicing_and_unpatchify_inverts():
    images = np.asarray(_images(2, 12, 8, channels=3))
    p = 4
    patches = np.asarray(vit.patchify(jnp.asarray(images), p))
    assert patches.shape == (2, 3 * 2, p * p * 3)
    for b in range(2):
        for i in range(3):
            for j in range(2):
                expected = images[b, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(-1)
                np.testing.assert_array_equal(patches[b, i * 2 + j], expected)
    restored = vit.unpatchify(jnp.asarray(patches), p, grid=(3, 2))
    np.testing.assert_array_equal(np.asarray(restored), images)
    square = _images(1, 8)
    np.testing.assert_array_equal(np.asarray(vit.unpatchify(vit.patchify(square, 2), 2)),
                                  np.asarray(square))
    with pytest.raises(ValueError, match="square grid"):
        vit.unpatchify(jnp.asarray(patches), p)


def test_patch_embedding_equals_strided_convolution():
    encoder = vit.ViTEncoder(in_channels=2, rngs=nnx.Rngs(0), **{**SMALL, "depth": 1})
    images = _images(2, 16, channels=2)
    tokens = encoder.patch_embed(vit.patchify(images, 4))
    kernel = encoder.patch_embed.kernel[...].reshape(4, 4, 2, 32)
    conv = lax.conv_general_dilated(images, kernel, (4, 4), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)
    conv = conv + encoder.patch_embed.bias[...]
    np.testing.assert_allclose(np.asarray(tokens), np.asarray(conv.reshape(2, 16, 32)),
                               rtol=1e-5, atol=1e-5)


def test_position_embedding_matches_the_sincos_formula():
    dim, rows, cols = 8, 3, 4
    table = vit.sincos_position_embedding(dim, rows, cols)
    assert table.shape == (rows * cols, dim) and table.dtype == np.float32
    quarter = dim // 4
    for i in range(rows):
        for j in range(cols):
            for k in range(quarter):
                omega = 10000.0 ** (-k / quarter)
                row = table[i * cols + j]
                # first half: column j; second half: row i; each [sin..., cos...]
                assert row[k] == pytest.approx(math.sin(j * omega), abs=1e-6)
                assert row[quarter + k] == pytest.approx(math.cos(j * omega), abs=1e-6)
                assert row[2 * quarter + k] == pytest.approx(math.sin(i * omega), abs=1e-6)
                assert row[3 * quarter + k] == pytest.approx(math.cos(i * omega), abs=1e-6)
    with pytest.raises(ValueError):
        table[0, 0] = 1.0   # cached, so it must be read-only


def test_position_embedding_is_added_and_is_not_a_parameter(encoder):
    images = _images(2, 16)
    added = (run(encoder, "embed_patches", images)
             - run(encoder.patch_embed, "__call__", vit.patchify(images, 4)))
    np.testing.assert_allclose(np.asarray(added[0]), vit.sincos_position_embedding(32, 4, 4),
                               atol=1e-5)
    # Every variable is a parameter, and the parameters are exactly the analytic
    # count without any (N, width) table.
    assert jax.tree.leaves(nnx.state(encoder, nnx.Not(nnx.Param))) == []
    assert param_count(encoder) == encoder_param_count(32, 2, 128, 4, 1)
    paths = ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(encoder, nnx.Param))]
    assert not any("pos" in path for path in paths)


# ----------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------

def test_self_attention_matches_numpy():
    attn = vit.SelfAttention(16, 4, dtype=jnp.float32, rngs=nnx.Rngs(1))
    attn.qkv.bias[...] = jax.random.normal(jax.random.key(2), (48,))   # zero at init
    x = np.asarray(_images(2, 5, 16)[..., 0], dtype=np.float64)    # (B=2, T=5, D=16)
    qkv = x @ np.asarray(attn.qkv.kernel[...], np.float64) + np.asarray(attn.qkv.bias[...], np.float64)
    q, k, v = (qkv[..., i * 16:(i + 1) * 16].reshape(2, 5, 4, 4) for i in range(3))
    logits = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(4)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    heads = np.einsum("bhts,bshd->bthd", weights, v).reshape(2, 5, 16)
    expected = heads @ np.asarray(attn.proj.kernel[...], np.float64) + np.asarray(attn.proj.bias[...])
    np.testing.assert_allclose(np.asarray(run(attn, "__call__", jnp.asarray(x, jnp.float32))), expected,
                               rtol=1e-4, atol=1e-5)


def test_encode_tokens_is_permutation_equivariant_and_batch_independent(encoder):
    tokens = run(encoder, "embed_patches", _images(2, 16))
    perm = np.random.default_rng(0).permutation(16)
    out = np.asarray(run(encoder, "encode_tokens", tokens))
    out_perm = np.asarray(run(encoder, "encode_tokens", tokens[:, perm]))
    np.testing.assert_allclose(out_perm[:, 1:], out[:, 1 + perm], atol=1e-5)
    np.testing.assert_allclose(out_perm[:, 0], out[:, 0], atol=1e-5)
    # A subset of tokens (as MAE feeds) works, and sample 0 ignores sample 1.
    subset = np.asarray(run(encoder, "encode_tokens", tokens[:, :5]))
    assert subset.shape == (2, 6, 32)
    alone = np.asarray(run(encoder, "encode_tokens", jnp.concatenate([tokens[:1, :5]] * 2)))
    np.testing.assert_allclose(alone[0], subset[0], atol=1e-5)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_classifier_shapes_and_parameter_count(pool):
    model = get_model("vit", num_classes=3, rngs=nnx.Rngs(0), image_size=64, patch_size=8,
                      pool=pool, **TINY)
    forward = jax.jit(lambda g, s, x: (lambda m: (m.encoder(x), m.features(x), m(x)))(nnx.merge(g, s)))
    tokens, features, logits = forward(*nnx.split(model), _images(2, 64))
    assert tokens.shape == (2, 1 + 64, 32)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    assert param_count(model) == encoder_param_count(32, 2, 128, 8, 1) + 32 * 3 + 3
    expected = tokens[:, 0] if pool == "cls" else jnp.mean(tokens[:, 1:], axis=1)
    np.testing.assert_allclose(np.asarray(features), np.asarray(expected), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(logits), 0.0)   # zero-initialised head


def test_non_square_images():
    encoder = vit.ViTEncoder(image_size=(48, 64), patch_size=8, rngs=nnx.Rngs(0), **TINY)
    assert encoder.grid == (6, 8)
    assert run(encoder, "__call__", _images(2, 48, 64)).shape == (2, 1 + 48, 32)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = get_model("vit", num_classes=3, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                      **{**SMALL, "depth": 1})
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
        jnp.dtype(jnp.float32)}
    model.head.kernel[...] = jax.random.normal(jax.random.key(1), model.head.kernel.shape)
    features, logits = run(model, "features", _images(2, 16)), run(model, "__call__", _images(2, 16))
    assert features.dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))


def test_bad_classifier_options_raise():
    with pytest.raises(ValueError, match="pool must be one of"):
        get_model("vit", num_classes=3, rngs=nnx.Rngs(0), pool="max", **TINY)
    with pytest.raises(ValueError, match="num_classes"):
        get_model("vit", num_classes=0, rngs=nnx.Rngs(0), **TINY)


def test_layer_ids_for_layer_wise_lr_decay():
    from flax import nnx as _nnx
    from lensjax.models import get_model
    model = get_model("vit", num_classes=3, rngs=_nnx.Rngs(0), image_size=16, patch_size=8,
                      width=16, depth=3, num_heads=2)
    assert model.num_layers == 4
    assert model.layer_id("encoder/patch_embed/kernel") == 0
    assert model.layer_id("encoder/cls_token") == 0
    assert model.layer_id("encoder/blocks/0/attn/qkv/kernel") == 1
    assert model.layer_id("encoder/blocks/2/mlp/fc1/bias") == 3
    assert model.layer_id("encoder/norm/scale") == 4
    assert model.layer_id("head/kernel") == 4


@pytest.mark.parametrize("shape", [(2, 17, 6, 64), (1, 361, 4, 32)])
def test_attention_equals_jax_dot_product_attention(shape):
    """lensjax's CPU attention against jax.nn.dot_product_attention: values and the
    gradients of q, k and v in float32; dtype and values in bfloat16."""
    from lensjax.models.layers import dot_product_attention

    q, k, v = (jax.random.normal(jax.random.key(i), shape) for i in range(3))
    dout = jax.random.normal(jax.random.key(3), shape)
    ours = jax.vjp(dot_product_attention, q, k, v)
    ref = jax.vjp(jax.nn.dot_product_attention, q, k, v)
    np.testing.assert_allclose(np.asarray(ours[0]), np.asarray(ref[0]), rtol=1e-5, atol=1e-5)
    for got, expected in zip(ours[1](dout), ref[1](dout)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-5)
    qb, kb, vb = (a.astype(jnp.bfloat16) for a in (q, k, v))
    out = dot_product_attention(qb, kb, vb)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(jax.nn.dot_product_attention(qb, kb, vb), np.float32),
                               atol=2e-2)


@pytest.mark.parametrize("shape", [(4, 17, 24), (3, 10), (2, 3, 5, 8)])
def test_layer_norm_equals_nnx_layer_norm_with_gradients(shape):
    """lensjax's LayerNorm (written-out gradient) against nnx.LayerNorm: same
    parameters, outputs and gradients for x, scale and bias, on inputs with a
    non-zero mean and a random scale and bias."""
    from lensjax.models.layers import LayerNorm

    features = shape[-1]
    ours = LayerNorm(features, epsilon=1e-6, rngs=nnx.Rngs(0))
    ref = nnx.LayerNorm(features, epsilon=1e-6, rngs=nnx.Rngs(0))
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(ref))
    norm_checks.same_random_affine((ours, ref), features)
    x, dy = norm_checks.inputs_and_cotangent(shape)
    norm_checks.assert_same_outputs_and_grads(norm_checks.output_and_param_grads(ours, x, dy),
                                              norm_checks.output_and_param_grads(ref, x, dy))
    assert "custom_vjp" in str(jax.make_jaxpr(lambda x: ours(x))(x))


def test_layer_norm_falls_back_to_nnx_outside_float32_last_axis():
    from lensjax.models.layers import LayerNorm

    x = jax.random.normal(jax.random.key(0), (2, 4, 6))
    half = LayerNorm(6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ref = nnx.LayerNorm(6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert half(x).dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(half(x), np.float32), np.asarray(ref(x), np.float32))
    assert "custom_vjp" not in str(jax.make_jaxpr(lambda x: half(x))(x))
    both = LayerNorm(6, reduction_axes=(-2, -1), feature_axes=-1, rngs=nnx.Rngs(0))
    both_ref = nnx.LayerNorm(6, reduction_axes=(-2, -1), feature_axes=-1, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(both(x)), np.asarray(both_ref(x)))
