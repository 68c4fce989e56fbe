"""XLA compiler options for lensjax's jitted networks, per backend.

XLA:CPU (jax 0.10) hands convolutions, dots and reductions to YNNPACK by default.
YNNPACK runs a convolution on a single thread: on the 2-core development CPU a
3x3 convolution of 8 x 64 x 64 x 64 takes 23 ms forward and 72 ms forward + both
gradients that way, against 14 / 44 ms with XLA's own (Eigen, multi-threaded)
convolution, and 11 / 38 ms in PyTorch (`experiments/benchmarks/bench_kernels.py`
times both: `--xla-convolutions ynn` gives the YNNPACK numbers). lensjax therefore
compiles its networks on CPU with the YNNPACK fusion types restricted to
`CPU_YNN_FUSION_TYPES`: dots and reductions stay with YNNPACK (the dots are as
fast as PyTorch's), convolutions go to XLA. Whole train steps, same process,
alternating (lensjax/compilation.py vs YNNPACK convolutions): ResNet-18 at 64 px
(batch 8) 1.17x faster, at 150 px (batch 16) 1.14x, the diffusion UNet at 150 px
1.08x at batch 4. One exception: XLA's weight gradient contracts over the batch,
and with 2 images per device on 152 x 152 maps it takes 18 ms where YNNPACK takes
10 (32 -> 32 channels), so the UNet step at batch 2 is 1.08x faster with YNNPACK.
Train steps with at most `YNN_CONVOLUTIONS_MAX_BATCH` images per device keep
YNNPACK convolutions.

The option is passed per jitted function (`jit(...)` below, or
`compiler_options()` to `jax.jit`), so nothing global changes. A user who sets
`--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS keeps their choice.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax

YNN_FUSION_TYPE_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# XLA:CPU's default YNNPACK fusion types without LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
CPU_YNN_FUSION_TYPES = ("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_REDUCE")
# Train steps with at most this many images per device keep YNNPACK convolutions.
YNN_CONVOLUTIONS_MAX_BATCH = 2
# False restores XLA's default (YNNPACK convolutions) everywhere, e.g. to compare the two.
XLA_CPU_CONVOLUTIONS = True


def compiler_options(backend: str | None = None,
                     batch_per_device: int | None = None) -> dict[str, Any]:
    """The `compiler_options` lensjax passes to `jax.jit` on `backend` (default: the
    default backend): on CPU, YNNPACK without convolutions; elsewhere none.

    batch_per_device: images per device of a train step (None: not a train step);
    at most YNN_CONVOLUTIONS_MAX_BATCH keeps XLA's default.
    """
    backend = jax.default_backend() if backend is None else backend
    small_batch = batch_per_device is not None and batch_per_device <= YNN_CONVOLUTIONS_MAX_BATCH
    if (backend != "cpu" or not XLA_CPU_CONVOLUTIONS or small_batch
            or YNN_FUSION_TYPE_OPTION in os.environ.get("XLA_FLAGS", "")):
        return {}
    return {YNN_FUSION_TYPE_OPTION: ",".join(CPU_YNN_FUSION_TYPES)}


def jit(fn: Callable, *, batch_per_device: int | None = None, **jit_kwargs) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` with lensjax's `compiler_options()` for the default
    backend (batch_per_device: see `compiler_options`)."""
    options = compiler_options(batch_per_device=batch_per_device)
    if options:
        jit_kwargs["compiler_options"] = {**options, **jit_kwargs.get("compiler_options", {})}
    return jax.jit(fn, **jit_kwargs)
