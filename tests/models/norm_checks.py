"""Shared checks of lensjax's normalisation layers against Flax's (tests only)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx


def same_random_affine(modules, features: int) -> None:
    """Give every module the same random scale (around 1) and bias (features,)."""
    scale = 1.0 + 0.3 * jax.random.normal(jax.random.key(1), (features,))
    bias = 0.1 * jax.random.normal(jax.random.key(2), (features,))
    for module in modules:
        module.scale[...] = scale
        module.bias[...] = bias


def inputs_and_cotangent(shape) -> tuple[jax.Array, jax.Array]:
    """x with a non-zero mean and a random cotangent dy, both of `shape`."""
    return (1.5 + 2.0 * jax.random.normal(jax.random.key(3), shape),
            jax.random.normal(jax.random.key(4), shape))


def output_and_param_grads(module, x, dy):
    """(module(x), (gradients of its nnx.Param state, gradient of x)) for cotangent dy."""
    graphdef, params = nnx.split(module, nnx.Param)
    y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
    return y, vjp(dy)


def assert_same_outputs_and_grads(ours, ref) -> None:
    """Compare (y, (param grads, x grad)) pairs: outputs, x and scale/bias gradients."""
    (y, (p, dx)), (y_ref, (p_ref, dx_ref)) = ours, ref
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-4, atol=1e-5)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(np.asarray(p[name][...]), np.asarray(p_ref[name][...]),
                                   rtol=1e-4, atol=1e-4, err_msg=name)
