"""XLA compiler options for lensjax's jitted networks, per backend.

XLA:CPU (jax 0.10) hands convolutions, dots and reductions to YNNPACK by default.
YNNPACK runs a convolution on a single thread: on the 2-core development CPU a
3x3 convolution of 8 x 64 x 64 x 64 takes 23 ms forward and 72 ms forward + both
gradients that way, against 14 / 44 ms with XLA's own (Eigen, multi-threaded)
convolution, and 11 / 38 ms in PyTorch (`experiments/benchmarks/bench_kernels.py`
times all three; its "YNN ms" column is XLA's default). lensjax therefore
compiles its networks on CPU with the YNNPACK fusion types restricted to
`CPU_YNN_FUSION_TYPES`: dots and reductions stay with YNNPACK (the dots are as
fast as PyTorch's), convolutions go to XLA. Whole train steps, same process,
alternating: ResNet-18 at 64 px (batch 8) 1.17x faster, at 150 px (batch 16)
1.14x, the diffusion UNet at 150 px 1.08x at batch 4. For batches below 4,
XLA's weight gradient is slow (it contracts over the batch), and
`lensjax.models.layers.conv_xla` computes it on image strips instead. With the strips
the UNet step at batch 2 takes 1023 ms against 1142 ms with YNNPACK's convolutions.

Where oneDNN runs convolutions (`lensjax.models.onednn`: their forward pass and
input gradient), XLA's convolution is left with the weight gradients, where it is
still faster than YNNPACK's single thread (8 x 64 x 64 x 64: 16.7 vs 25.6 ms;
`bench_kernels.py`'s "weight grad" rows).

Programs that run once per process (the initial train state: every parameter's
initialiser, threefry and the truncated normal's erf_inv) are compiled on CPU with
XLA's backend optimisation level 1 instead of its default 3 (`jit_once`). They give
the same bits (tested), their run time is milliseconds either way, and the compile
is shorter: ResNet-18 (width 8) 5.5-7.1 -> 1.1-1.7 s, the `unet_150` UNet
10.9 -> 6.1 s, the ViT-S MAE 4.7 -> 3.8 s (one-off timing, 2-core CPU). Train and
eval steps keep level 3: at level 1 the UNet step ran 887 -> 977 ms.

The options are passed per jitted function (`jit(...)` and `jit_once(...)` below,
or `compiler_options()` to `jax.jit`), so nothing global changes. A user who sets
`--xla_cpu_experimental_ynn_fusion_type` or `--xla_backend_optimization_level` in
XLA_FLAGS keeps their choice.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax

YNN_FUSION_TYPE_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# XLA:CPU's default YNNPACK fusion types without LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
CPU_YNN_FUSION_TYPES = ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_REDUCE")
# False restores XLA's default (YNNPACK convolutions) everywhere, e.g. to compare the two.
XLA_CPU_CONVOLUTIONS = True
OPTIMIZATION_LEVEL_OPTION = "xla_backend_optimization_level"
# XLA's backend optimisation level for programs that run once (`jit_once`).
ONE_SHOT_OPTIMIZATION_LEVEL = 1


def compiler_options(backend: str | None = None) -> dict[str, Any]:
    """The `compiler_options` lensjax passes to `jax.jit` on `backend` (default: the
    default backend): on CPU, YNNPACK without convolutions; elsewhere none."""
    backend = jax.default_backend() if backend is None else backend
    if (backend != "cpu" or not XLA_CPU_CONVOLUTIONS
            or YNN_FUSION_TYPE_OPTION in os.environ.get("XLA_FLAGS", "")):
        return {}
    return {YNN_FUSION_TYPE_OPTION: ",".join(CPU_YNN_FUSION_TYPES)}


def _jit_with(options: dict[str, Any], fn: Callable, jit_kwargs: dict) -> Callable:
    """jax.jit with `options` under the caller's own `compiler_options` (theirs win)."""
    if options:
        jit_kwargs["compiler_options"] = {**options, **jit_kwargs.get("compiler_options", {})}
    return jax.jit(fn, **jit_kwargs)


def jit(fn: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` with lensjax's `compiler_options()` for the default backend."""
    return _jit_with(compiler_options(), fn, jit_kwargs)


def one_shot_compiler_options(backend: str | None = None) -> dict[str, Any]:
    """The `compiler_options` of `jit_once` on `backend` (default: the default backend):
    on CPU, XLA's backend optimisation level `ONE_SHOT_OPTIMIZATION_LEVEL`; elsewhere none."""
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu" or OPTIMIZATION_LEVEL_OPTION in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {OPTIMIZATION_LEVEL_OPTION: ONE_SHOT_OPTIMIZATION_LEVEL}


def jit_once(fn: Callable, **jit_kwargs) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` for a program that runs once, such as the initial
    train state: compiled for a short compile rather than a fast run (on CPU)."""
    return _jit_with(one_shot_compiler_options(), fn, jit_kwargs)
