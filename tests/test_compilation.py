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
