"""oneDNN convolutions and matmuls on CPU, through the oneDNN runtime inside jaxlib.

jaxlib's XLA:CPU is built with oneDNN and executes custom calls named
`__onednn$convolution` and `__onednn$matmul` with oneDNN's kernels (its rewriter
pass that would emit them is off in jaxlib builds). lensjax emits the calls
itself: a 2-D forward convolution whose operands can have any layout of their
batch, feature and spatial dimensions, with explicit padding and strides; and a
2-D matmul with either operand transposed (no copy for the transpose). On the 2-core
development CPU it is 10-35% faster than XLA's own convolution forward and for
the input gradient at every layer shape of lensjax's networks, and up to 12x at
the XLA:CPU cliff of 2x2 maps (`experiments/benchmarks/bench_kernels.py`).
oneDNN is not asked for the weight gradient: as a forward convolution its kernel
would be the whole image, which oneDNN runs with its reference code (seconds).

XLA runs these calls as asynchronous oneDNN thunks on its intra-op pool, which
oneDNN splits over every pool thread; during ResNet-18 train steps both cores are
busy (process CPU time over wall time 1.91-1.95; README, "Performance", "Where the
time goes").

The matmul is 5-25% faster than XLA:CPU's dots at the ViT-S shapes, and it reads
a transposed operand in place where XLA copies it first (the weight gradients
x^T dy of dense layers).

LENSJAX_ONEDNN selects them: "1" (or true / yes / on) always, "0" (or false / no /
off) never, and unset (or "auto") wherever JAX's persistent compilation cache is
not configured, which is the case for lensjax's entry points unless the user sets
JAX_COMPILATION_CACHE_DIR. `available()` is then true where this jaxlib runs both
calls and gives the values of `lax.conv_general_dilated` and `jnp.dot` (probed once
per process); otherwise lensjax keeps XLA's kernels. The persistent cache rules
them out because an executable with these custom calls (and with
`custom_partitioning`) cannot be written to it (the write fails with
std::bad_alloc; a test session that ran them with such a cache ended in a
segmentation fault, cause not isolated further). Whole train steps run 1.01-1.10x
faster with them (docs/performance-history.md). Where LENSJAX_ONEDNN=1 is set and a
persistent cache is configured, lensjax warns once.

Under a sharded `jax.jit` the calls are partitioned along the batch axis
(`jax.experimental.custom_partitioning`): the kernel or weight is gathered, and a
matmul that contracts the batch axis (a weight gradient) is summed over the
devices. Under `jax.vmap` (`jax.custom_batching.custom_vmap`) a vmapped axis of the
activations is folded into their batch axis; vmapped kernels or weights fall back
to lax.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.sharding import NamedSharding, PartitionSpec as P

# These are internal but long-standing JAX APIs for defining a primitive and its
# lowering; `available()` checks at run time that the whole path still works.
from jax._src import core as _core
from jax._src import dispatch as _dispatch
from jax._src.interpreters import mlir as _mlir

Array = jax.Array
ENV_SWITCH = "LENSJAX_ONEDNN"      # "1" / "0" / "auto" (unset): oneDNN convolutions and dots on CPU
SWITCH_ON = ("1", "true", "yes", "on")
SWITCH_OFF = ("0", "false", "no", "off")
SWITCH_AUTO = ("", "auto")
CUSTOM_CALL_TARGET = "__onednn$convolution"
MATMUL_TARGET = "__onednn$matmul"
# Roles of an NHWC activation / HWIO kernel for the custom call's configuration:
# (batch, feature, spatial0, spatial1) and (input feature, output feature, spatial0, spatial1).
NHWC = (0, 3, 1, 2)
HWIO = (2, 3, 0, 1)
HWOI = (3, 2, 0, 1)   # the same kernel read with input and output features swapped

_conv_p = Primitive("lensjax_onednn_conv")


def _output_shape(lhs_shape, rhs_shape, lhs_dims, rhs_dims, out_dims, padding, strides):
    """Shape of the convolution's result, laid out by `out_dims`."""
    spatial = [(lhs_shape[lhs_dims[2 + a]] + padding[a][0] + padding[a][1]
                - rhs_shape[rhs_dims[2 + a]]) // strides[a] + 1 for a in range(2)]
    shape = [0] * 4
    shape[out_dims[0]] = lhs_shape[lhs_dims[0]]
    shape[out_dims[1]] = rhs_shape[rhs_dims[1]]
    shape[out_dims[2]], shape[out_dims[3]] = spatial
    return tuple(shape)


def _abstract_eval(lhs, rhs, *, lhs_dims, rhs_dims, out_dims, padding, strides):
    if lhs.dtype != rhs.dtype:
        raise TypeError(f"oneDNN convolution operands differ in dtype: {lhs.dtype}, {rhs.dtype}")
    shape = _output_shape(lhs.shape, rhs.shape, lhs_dims, rhs_dims, out_dims, padding, strides)
    return _core.ShapedArray(shape, lhs.dtype)


def _backend_config(lhs_dims, rhs_dims, out_dims, padding, strides) -> str:
    """The call's `BackendConfig` as JSON (xla/service/cpu/onednn_config.proto):
    zero-based dimension indices, padding and strides as they are, dilation 1."""
    def data(dims):
        return {"dims": 4, "data": {"batchDim": dims[0], "featureDim": dims[1],
                                    "spatialDims": list(dims[2:])}}
    return json.dumps({"onednnConvConfig": {
        "dims": 4, "featureGroups": 1,
        "input": data(lhs_dims),
        "kernel": {"dims": 4, "filter": {"inputFeatureDim": rhs_dims[0],
                                         "outputFeatureDim": rhs_dims[1],
                                         "spatialDims": list(rhs_dims[2:])}},
        "output": data(out_dims),
        "window": {"padLeft": [p[0] for p in padding], "padRight": [p[1] for p in padding],
                   "strides": list(strides), "windowDilations": [1, 1]},
    }})


def _lower_cpu(ctx, lhs, rhs, *, lhs_dims, rhs_dims, out_dims, padding, strides):
    result_type = _mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
    config = _backend_config(lhs_dims, rhs_dims, out_dims, padding, strides)
    return _mlir.custom_call(CUSTOM_CALL_TARGET, result_types=[result_type], operands=[lhs, rhs],
                             backend_config=config, api_version=1).results


def _reference(lhs, rhs, *, lhs_dims, rhs_dims, out_dims, padding, strides):
    """The same convolution with lax (the lowering off CPU, and what the probe compares)."""
    spec = lax.ConvDimensionNumbers(lhs_spec=lhs_dims, rhs_spec=(rhs_dims[1], rhs_dims[0],
                                                                  *rhs_dims[2:]),
                                    out_spec=out_dims)
    return lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=spec)


_conv_p.def_abstract_eval(_abstract_eval)
_conv_p.def_impl(functools.partial(_dispatch.apply_primitive, _conv_p))
_mlir.register_lowering(_conv_p, _lower_cpu, platform="cpu")
_mlir.register_lowering(_conv_p, _mlir.lower_fun(_reference, multiple_results=False))


def _bind(lhs, rhs, lhs_dims, rhs_dims, out_dims, padding, strides):
    return _conv_p.bind(lhs, rhs, lhs_dims=tuple(lhs_dims), rhs_dims=tuple(rhs_dims),
                        out_dims=tuple(out_dims),
                        padding=tuple((int(lo), int(hi)) for lo, hi in padding),
                        strides=tuple(int(s) for s in strides))


# ----------------------------------------------------------------------------
# Partitioning: split along the batch axis, gather everything else
# ----------------------------------------------------------------------------

def _batch_spec(sharding) -> tuple:
    spec = getattr(sharding, "spec", None)
    return (spec[0] if spec else None,)


@functools.lru_cache(maxsize=None)
def _partitioned(kernel_dims: tuple, padding: tuple, strides: tuple):
    """An NHWC convolution with kernel roles `kernel_dims`, partitioned along its batch axis."""

    @custom_partitioning
    def conv(x, kernel):
        return _bind(x, kernel, NHWC, kernel_dims, NHWC, padding, strides)

    def infer(mesh, arg_shapes, result_shape):
        return NamedSharding(mesh, P(*_batch_spec(arg_shapes[0].sharding)))

    def partition(mesh, arg_shapes, result_shape):
        batch = NamedSharding(mesh, P(*_batch_spec(arg_shapes[0].sharding)))
        return mesh, _local, batch, (batch, NamedSharding(mesh, P()))

    def _local(x, kernel):
        return _bind(x, kernel, NHWC, kernel_dims, NHWC, padding, strides)

    conv.def_partition(partition, infer_sharding_from_operands=infer,
                       sharding_rule="b h w c, i j k l -> b y z o",
                       need_replication_factors=("h", "w", "c", "i", "j", "k", "l", "y", "z", "o"))
    reference = functools.partial(_reference, lhs_dims=NHWC, rhs_dims=kernel_dims, out_dims=NHWC,
                                  padding=padding, strides=strides)
    return _batchable(conv, reference, fold=lambda batched: not batched[1])


# ----------------------------------------------------------------------------
# Batching: fold a vmapped axis into the batch axis
# ----------------------------------------------------------------------------

def _batchable(call, reference, fold):
    """`call(a, b)` (the operation on its leading batch or row axis of `a`) with a vmap
    rule: where `fold(in_batched)`, the vmapped axis of `a` is merged into its leading
    axis and `call` runs once; otherwise `reference` (the same maths in lax) is vmapped.
    custom_partitioning, which `call` is, has no batching rule of its own."""

    @jax.custom_batching.custom_vmap
    def batched_call(a, b):
        return call(a, b)

    @batched_call.def_vmap
    def rule(axis_size, in_batched, a, b):
        if fold(in_batched):
            if not in_batched[0]:
                a = jnp.broadcast_to(a, (axis_size, *a.shape))
            out = batched_call(a.reshape(axis_size * a.shape[1], *a.shape[2:]), b)
            return out.reshape(axis_size, a.shape[1], *out.shape[1:]), True
        in_axes = tuple(0 if batched else None for batched in in_batched)
        return jax.vmap(reference, in_axes=in_axes)(a, b), True

    return batched_call


# ----------------------------------------------------------------------------
# Matmul
# ----------------------------------------------------------------------------

_matmul_p = Primitive("lensjax_onednn_matmul")


def _matmul_abstract_eval(a, b, *, transpose_a, transpose_b):
    (m, k), (k2, n) = a.shape[::-1] if transpose_a else a.shape, b.shape[::-1] if transpose_b else b.shape
    if k != k2 or a.dtype != b.dtype:
        raise TypeError(f"oneDNN matmul of {a.shape} {a.dtype} (transposed: {transpose_a}) and "
                        f"{b.shape} {b.dtype} (transposed: {transpose_b}) does not fit")
    return _core.ShapedArray((m, n), a.dtype)


def _matmul_lower_cpu(ctx, a, b, *, transpose_a, transpose_b):
    result_type = _mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
    config = json.dumps({"onednnMatmulConfig": {"transposeA": bool(transpose_a),
                                                "transposeB": bool(transpose_b)}})
    return _mlir.custom_call(MATMUL_TARGET, result_types=[result_type], operands=[a, b],
                             backend_config=config, api_version=1).results


def _matmul_reference(a, b, *, transpose_a, transpose_b):
    return jnp.matmul(a.T if transpose_a else a, b.T if transpose_b else b)


_matmul_p.def_abstract_eval(_matmul_abstract_eval)
_matmul_p.def_impl(functools.partial(_dispatch.apply_primitive, _matmul_p))
_mlir.register_lowering(_matmul_p, _matmul_lower_cpu, platform="cpu")
_mlir.register_lowering(_matmul_p, _mlir.lower_fun(_matmul_reference, multiple_results=False))


@functools.lru_cache(maxsize=None)
def _partitioned_matmul(transpose_a: bool, transpose_b: bool):
    """A matmul split along the rows of `a` (its batch axis, the contracted one when
    `transpose_a`: then the partial products are summed over the devices)."""
    def local(a, b):
        return _matmul_p.bind(a, b, transpose_a=transpose_a, transpose_b=transpose_b)

    @custom_partitioning
    def matmul(a, b):
        return local(a, b)

    def row_axis(arg_shapes):
        return _batch_spec(arg_shapes[0].sharding)[0]

    def infer(mesh, arg_shapes, result_shape):
        return NamedSharding(mesh, P() if transpose_a else P(row_axis(arg_shapes)))

    def partition(mesh, arg_shapes, result_shape):
        axis = row_axis(arg_shapes)
        rows = NamedSharding(mesh, P(axis))
        if not transpose_a:
            return mesh, local, rows, (rows, NamedSharding(mesh, P()))
        summed = local if axis is None else (lambda a, b: jax.lax.psum(local(a, b), axis))
        return mesh, summed, NamedSharding(mesh, P()), (rows, rows)

    if transpose_a:    # a (m, k), b (m, n) -> (k, n), m contracted
        matmul.def_partition(partition, infer_sharding_from_operands=infer,
                             sharding_rule="m k, m n -> k n", reduction_factors=("m",),
                             need_replication_factors=("k", "n"))
    else:              # a (m, k), b (k, n) or (n, k) -> (m, n)
        matmul.def_partition(partition, infer_sharding_from_operands=infer,
                             sharding_rule="m k, n l -> m o",
                             need_replication_factors=("k", "n", "l", "o"))
    reference = functools.partial(_matmul_reference, transpose_a=transpose_a,
                                  transpose_b=transpose_b)
    # Rows fold only where they are a's leading axis and b is shared.
    return _batchable(matmul, reference, fold=lambda batched: not transpose_a and not batched[1])


def matmul(a: Array, b: Array, transpose_a: bool = False, transpose_b: bool = False) -> Array:
    """2-D matmul by oneDNN: op(a) @ op(b), op = transpose where asked (read in place).

    a (m, k) or, transposed, (k, m); b (k, n) or, transposed, (n, k) -> (m, n).
    """
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"matmul takes 2-D operands, got {a.shape} and {b.shape}")
    return _partitioned_matmul(bool(transpose_a), bool(transpose_b))(a, b)


# ----------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------

def conv(x: Array, kernel: Array, strides: Sequence[int], padding: Sequence[tuple[int, int]],
         kernel_layout: str = "HWIO") -> Array:
    """Convolution (cross-correlation, as lax's) of NHWC x with explicit padding, by oneDNN.

    x (B, H, W, cin); kernel (kh, kw, cin, cout) for kernel_layout "HWIO", or
    (kh, kw, cout, cin) for "HWOI"; padding ((top, bottom), (left, right));
    -> (B, Ho, Wo, cout) with Ho = (H + top + bottom - kh) // sh + 1.
    """
    kernel_dims = {"HWIO": HWIO, "HWOI": HWOI}[kernel_layout]
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    strides = tuple(int(s) for s in strides)
    return _partitioned(kernel_dims, padding, strides)(x, kernel)


def input_grad(dy: Array, kernel: Array, padding: Sequence[tuple[int, int]]) -> Array:
    """Gradient of a stride-1 `conv(x, kernel, (1, 1), padding)` w.r.t. x, by oneDNN.

    dy (B, Ho, Wo, cout), kernel (kh, kw, cin, cout) -> (B, H, W, cin): the
    convolution of dy with the spatially flipped kernel read with input and output
    features swapped, padded by kh - 1 - top, kh - 1 - bottom (and likewise along W).
    """
    kh, kw = int(kernel.shape[0]), int(kernel.shape[1])
    (top, bottom), (left, right) = padding
    flipped = jnp.flip(kernel, (0, 1))
    return conv(dy, flipped, (1, 1), ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)),
                kernel_layout="HWOI")


def persistent_cache_configured() -> bool:
    """Whether JAX would write compiled programs to a persistent compilation cache."""
    return bool(jax.config.jax_compilation_cache_dir) and bool(
        jax.config.jax_enable_compilation_cache)


def switched_on() -> bool:
    """LENSJAX_ONEDNN's choice: "1" / true / yes / on, "0" / false / no / off, or, unset
    or "auto", on where no persistent compilation cache is configured."""
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if value in SWITCH_ON:
        return True
    if value in SWITCH_OFF:
        return False
    if value in SWITCH_AUTO:
        return not persistent_cache_configured()
    raise ValueError(f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r} is not one of 1, 0 or auto "
                     "(or true / false, yes / no, on / off)")


def describe_setting() -> str:
    """The switch as runs report it, e.g. "LENSJAX_ONEDNN='' (oneDNN kernels on,
    persistent compilation cache off)"."""
    return (f"{ENV_SWITCH}={os.environ.get(ENV_SWITCH, '')!r} (oneDNN kernels "
            f"{'on' if available() else 'off'}, persistent compilation cache "
            f"{'on' if persistent_cache_configured() else 'off'})")


@contextlib.contextmanager
def switch(on: bool):
    """Within the block, LENSJAX_ONEDNN is "1" (on) or "0"; the previous value after it.
    Functions traced inside the block take the setting (it is read at trace time)."""
    previous = os.environ.get(ENV_SWITCH)
    os.environ[ENV_SWITCH] = "1" if on else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[ENV_SWITCH]
        else:
            os.environ[ENV_SWITCH] = previous


@functools.lru_cache(maxsize=None)
def _probe() -> bool:
    """Run one small convolution and one transposed matmul through the calls and compare
    them with lax / numpy, once per process."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    kernel = rng.standard_normal((3, 2, 3, 5)).astype(np.float32)
    padding, strides = ((1, 1), (0, 1)), (1, 2)
    try:
        with jax.ensure_compile_time_eval():
            got = np.asarray(jax.jit(lambda a, b: _bind(a, b, NHWC, HWIO, NHWC, padding, strides))(
                x, kernel))
            want = np.asarray(_reference(x, kernel, lhs_dims=NHWC, rhs_dims=HWIO, out_dims=NHWC,
                                         padding=padding, strides=strides))
            a, b = x.reshape(-1, 3), kernel.reshape(-1, 5)[:3]
            got_mm = np.asarray(jax.jit(lambda a, b: _matmul_p.bind(
                a, b, transpose_a=True, transpose_b=False))(a.T.copy(), b))
            want_mm = a @ b
    except Exception as error:  # a jaxlib without oneDNN, or another call format
        logging.info("lensjax: oneDNN kernels unavailable (%s); using XLA's", error)
        return False
    ok = (got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-4, atol=1e-4))
          and got_mm.shape == want_mm.shape and bool(np.allclose(got_mm, want_mm, rtol=1e-4,
                                                                 atol=1e-4)))
    if not ok:
        logging.warning("lensjax: oneDNN probe disagrees with lax; using XLA's kernels")
    return ok


@functools.lru_cache(maxsize=None)
def _warn_about_the_persistent_cache() -> None:
    if persistent_cache_configured():
        logging.warning(
            "lensjax: %s=1 with JAX's persistent compilation cache (%s): programs with oneDNN "
            "calls cannot be written to it (JAX warns 'Error writing persistent compilation cache "
            "entry'); unset one of the two", ENV_SWITCH, jax.config.jax_compilation_cache_dir)


def available(backend: str | None = None) -> bool:
    """Whether lensjax uses oneDNN convolutions and matmuls on `backend` (default: the
    default backend): on CPU, where `switched_on()` and the probe passes."""
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu" or not switched_on():
        return False
    _warn_about_the_persistent_cache()   # reached with a cache only where "1" forced it
    return _probe()
