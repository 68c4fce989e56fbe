"""lensjax.train.make_optimizer: frozen parameters stay put (also under weight decay),
layer-wise LR decay scales each ViT layer's Adam step by decay ** (L - layer), weight
decay spares biases and norms, the schedule warms up then decays, and the gradient
clip (lensjax's scalar-factor form) equals optax's."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from lensjax import train
from lensjax.models import get_model


def _train_config(**overrides):
    config = ml_collections.ConfigDict(dict(
        steps=100, warmup_steps=0, learning_rate=1e-2, final_lr_fraction=1.0,
        weight_decay=0.0, grad_clip_norm=0.0, frozen="", layer_decay=0.0))
    config.update(overrides)
    return config


def _vit():
    model = get_model("vit", num_classes=3, rngs=nnx.Rngs(0), image_size=16, patch_size=8,
                      width=16, depth=3, num_heads=2)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    return model, params


def _first_update(tx, params):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return {train._path_name(k): np.abs(np.asarray(v)).max()
            for k, v in jax.tree_util.tree_flatten_with_path(updates)[0]}


def test_frozen_parameters_get_no_update_even_with_weight_decay():
    model, params = _vit()
    tx = train.make_optimizer(_train_config(frozen="^encoder/", weight_decay=0.1), params, model)
    update = _first_update(tx, params)
    assert all(v == 0 for k, v in update.items() if k.startswith("encoder/"))
    assert update["head/kernel"] > 0 and update["head/bias"] > 0


def test_frozen_pattern_matching_nothing_is_an_error():
    model, params = _vit()
    with pytest.raises(ValueError, match="matches no parameter"):
        train.make_optimizer(_train_config(frozen="^backbone/"), params, model)


def test_layer_decay_scales_each_layer():
    model, params = _vit()
    decay = 0.5
    tx = train.make_optimizer(_train_config(layer_decay=decay), params, model)
    update = _first_update(tx, params)
    lr = 1e-2  # Adam's first step with a constant gradient is lr * scale per element
    np.testing.assert_allclose(update["head/kernel"], lr, rtol=1e-4)
    np.testing.assert_allclose(update["encoder/norm/scale"], lr, rtol=1e-4)
    np.testing.assert_allclose(update["encoder/blocks/2/attn/qkv/kernel"], lr * decay, rtol=1e-4)
    np.testing.assert_allclose(update["encoder/blocks/0/attn/qkv/kernel"], lr * decay ** 3, rtol=1e-4)
    np.testing.assert_allclose(update["encoder/patch_embed/kernel"], lr * decay ** 4, rtol=1e-4)


def test_layer_decay_needs_layer_ids():
    model = get_model("resnet18", num_classes=3, rngs=nnx.Rngs(0), width=4)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    with pytest.raises(ValueError, match="layer ids"):
        train.make_optimizer(_train_config(layer_decay=0.7), params, model)


def test_weight_decay_applies_to_matrices_only():
    model, params = _vit()
    tx = train.make_optimizer(_train_config(weight_decay=0.5), params, model)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    flat = {train._path_name(k): (np.asarray(v), np.asarray(p)) for (k, v), p in
            zip(jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(params))}
    kernel_update, kernel = flat["encoder/blocks/0/mlp/fc1/kernel"]
    np.testing.assert_allclose(kernel_update, -1e-2 * 0.5 * kernel, rtol=1e-5, atol=1e-9)
    scale_update, _ = flat["encoder/norm/scale"]
    assert np.all(scale_update == 0)


def test_schedule_warms_up_then_decays_to_the_final_fraction():
    schedule = train.learning_rate_schedule(_train_config(
        steps=100, warmup_steps=10, learning_rate=1.0, final_lr_fraction=0.1))
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 0.1, rtol=1e-5)
    values = [float(schedule(s)) for s in range(10, 101, 10)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("scale", [1e-3, 10.0])
def test_clip_by_global_norm_equals_optaxs(scale):
    """Below the limit the updates are optax's bit for bit (t * 1.0 == t); above it they
    differ from optax's t / ||g|| * max_norm by rounding only, and the global norm of
    the clipped updates is max_norm. The state is optax's (checkpoints interchangeable)."""
    _, params = _vit()
    grads = jax.tree.map(lambda p: scale * jax.random.normal(jax.random.key(p.size), p.shape),
                         params)
    ours, reference = train.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    state = ours.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(reference.init(params))
    clipped, _ = jax.jit(ours.update)(grads, state)
    expected, _ = jax.jit(reference.update)(grads, reference.init(params))
    clips = float(optax.tree.norm(grads)) >= 1.0
    assert clips == (scale > 1.0)
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(expected)):
        if clips:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if clips:
        assert abs(float(optax.tree.norm(clipped)) - 1.0) < 1e-5


def test_make_optimizer_clips_the_gradient_before_adamw():
    _, params = _vit()
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    # A limit so small that the clipped gradients fall below Adam's eps, where Adam is no
    # longer scale-invariant: clipping or not shows in the parameters.
    clipped = train.make_optimizer(_train_config(grad_clip_norm=1e-9, weight_decay=0.1), params)
    unclipped = train.make_optimizer(_train_config(weight_decay=0.1), params)
    by_hand = optax.chain(train.clip_by_global_norm(1e-9), unclipped)
    results = []
    for tx in (clipped, by_hand, unclipped):
        state, p = tx.init(params), params
        for _ in range(2):
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        results.append(jax.tree.leaves(p))
    for a, b in zip(results[0], results[1]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(c))))
               for a, c in zip(results[0], results[2])) > 1e-4
