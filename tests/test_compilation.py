"""lensjax.compilation: XLA:CPU convolutions instead of YNNPACK's, same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lensjax import compilation


def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_options_only_on_cpu(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    option = compilation.YNN_FUSION_TYPE_OPTION
    cpu = compilation.compiler_options("cpu")
    assert "CONVOLUTION" not in cpu[option] and "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT" in cpu[option]
    assert compilation.compiler_options("gpu") == {}
    assert compilation.compiler_options("tpu") == {}


def test_a_users_xla_flags_choice_is_kept(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type="
                                    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")
    assert compilation.compiler_options("cpu") == {}


def test_switch_restores_the_default(monkeypatch):
    monkeypatch.setattr(compilation, "XLA_CPU_CONVOLUTIONS", False)
    assert compilation.compiler_options("cpu") == {}


def ynn_convolutions(hlo: str) -> int:
    """How many YNNPACK fusions of a compiled module's text contain a convolution."""
    count = 0
    for line in hlo.splitlines():
        if "__ynn_fusion" in line and " fusion(" in line:
            called = line.split("calls=")[1].split(",")[0].lstrip("%")
            body = hlo.split(f"%{called} ")[1].split("\n}\n")[0]
            count += "convolution(" in body
    return count


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")
def test_convolutions_leave_ynnpack_and_keep_their_values_and_gradients():
    # 32 channels: XLA hands convolutions this wide to YNNPACK by default.
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
    w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) * 0.1

    def loss(x, w):
        return jnp.sum(jnp.square(conv(x, w)))

    fast = compilation.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    default = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    fast_hlo = fast.lower(x, w).compile().as_text()
    default_hlo = default.lower(x, w).compile().as_text()
    # Forward, input gradient and weight gradient: three YNNPACK convolutions by
    # default (if a new jax changes this, the module's rationale needs a new look).
    assert ynn_convolutions(default_hlo) == 3
    assert ynn_convolutions(fast_hlo) == 0 and fast_hlo.count("convolution(") >= 3
    (value, grads), (ref_value, ref_grads) = fast(x, w), default(x, w)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_one_shot_options_only_on_cpu_and_a_users_level_is_kept(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    option = compilation.OPTIMIZATION_LEVEL_OPTION
    assert compilation.one_shot_compiler_options("cpu") == {
        option: compilation.ONE_SHOT_OPTIMIZATION_LEVEL}
    assert compilation.one_shot_compiler_options("gpu") == {}
    monkeypatch.setenv("XLA_FLAGS", f"--{option}=2")
    assert compilation.one_shot_compiler_options("cpu") == {}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")
@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", dict(num_classes=3, width=4, image_size=32)),
    ("mae", dict(variant="S", width=32, depth=1, num_heads=2, patch_size=8, image_size=32,
                 decoder_width=32, decoder_depth=1, decoder_heads=2)),
])
def test_initialisers_give_the_same_bits_at_the_one_shot_level(monkeypatch, name, kwargs):
    # jit_once is only a compile-time saving if the initial parameters are unchanged:
    # truncated normals (erf_inv) and threefry, compiled at both levels.
    from flax import nnx
    from lensjax.models import get_model
    monkeypatch.delenv("XLA_FLAGS", raising=False)

    def init():
        return nnx.split(get_model(name, rngs=nnx.Rngs(3), **kwargs), nnx.Param, ...)[1:]

    once = jax.tree.leaves(compilation.jit_once(init)())
    default = jax.tree.leaves(jax.jit(init)())
    assert len(once) == len(default) > 10
    for got, want in zip(once, default):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_init_state_compiles_its_program_with_jit_once(monkeypatch):
    from lensjax import configlib, tasks, train
    calls = []
    real = compilation.jit_once
    monkeypatch.setattr(compilation, "jit_once", lambda fn, **kw: calls.append(fn) or real(fn, **kw))
    config = configlib.base_config()
    config.task = "classification"
    config.data.preset = "common_test"
    config.model = dict(name="resnet18", kwargs=dict(width=4, image_size=32))
    _, state, _ = train.init_state(config, tasks.get_task("classification"))
    assert len(calls) == 1 and int(state["step"]) == 0
