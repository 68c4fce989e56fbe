"""What the benchmarks print about the CPU they ran on.

lensjax's ratios against its references depend on the CPU model, not only on the
core count: the same `bench_train.py` gives ResNet-18 at PyTorch's speed on a 2-core
AMD EPYC with AVX-512 (family 25, model 17) and 1.16-1.30x faster on one with AVX2 only
(family 25, model 1) (README, "Performance"). So every benchmark names the model.
"""

from __future__ import annotations

import platform

# Widest vector extension first: the one that sets the kernels both frameworks pick.
VECTOR_FLAGS = ("amx_tile", "avx512f", "avx2", "avx", "sse4_2", "asimd", "neon")
CPUINFO = "/proc/cpuinfo"


def _blocks(cpuinfo: str) -> list[dict[str, str]]:
    """The blank-line separated blocks of /proc/cpuinfo text, as `key: value` fields."""
    blocks: list[dict[str, str]] = [{}]
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not line.strip():
            if blocks[-1]:
                blocks.append({})
        elif sep:
            blocks[-1].setdefault(key.strip(), value.strip())
    return [block for block in blocks if block]


def _first_processor(cpuinfo: str) -> dict[str, str]:
    """The fields of the first processor's block, with those of blocks that describe
    no processor (the board's "Hardware" and "Model" on ARM) where it lacks them."""
    blocks = _blocks(cpuinfo)
    processors = [block for block in blocks if "processor" in block]
    fields = dict(processors[0]) if processors else {}
    for block in blocks:
        if "processor" not in block:
            for key, value in block.items():
                fields.setdefault(key, value)
    return fields


def cpu_description(cpuinfo: str | None = None) -> str:
    """One line naming the CPU: "AMD EPYC (family 25, model 1, avx2)".

    cpuinfo: /proc/cpuinfo's text (read here by default). Where it is missing or
    names no model, `platform.processor()` or `platform.machine()`. The vector
    extension is the widest of VECTOR_FLAGS the CPU reports ("avx512f" for AVX-512).
    """
    if cpuinfo is None:
        try:
            with open(CPUINFO, encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields = _first_processor(cpuinfo)
    name = fields.get("model name") or fields.get("Model") or fields.get("Hardware")
    if not name:
        return platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    details = [f"family {fields['cpu family']}" if "cpu family" in fields else "",
               f"model {fields['model']}" if fields.get("model", "").isdigit() else "",
               next((flag for flag in VECTOR_FLAGS if flag in flags), "")]
    details = [d for d in details if d]
    return f"{name} ({', '.join(details)})" if details else name
