"""XLA:CPU's per-step buffers: keep them mapped and in transparent huge pages, by
restarting the process once with glibc malloc tunables.

XLA:CPU allocates the temporary buffers of a program afresh on every execution: one
block for the whole program (731 MB for the UNet step of `bench_train.py`, batch 2 at
150 px) plus scratch blocks of tens of MB. glibc serves blocks this large with fresh
mmap'ed pages and unmaps them on free, so every step page-faults through all of them
again and the kernel zeroes every page. Two sets of tunables fix this:

- `glibc.malloc.hugetlb=1`: malloc asks for transparent huge pages (madvise), so the
  faults drop from 97,000 per ViT-S MAE step (batch 32, 64 px; 83,000 per ResNet-18
  step at 150 px, 194,000 per UNet step) to below 1,200. The steps became 1.10x (MAE,
  597 -> 540 ms), 1.10x (ResNet-18 150 px, 628 -> 570 ms) and 1.14x (UNet,
  1244 -> 1092 ms) faster (two alternating runs each of 4 steps after 2 warm-up
  steps, measured with `resource.getrusage`).
- `glibc.malloc.mmap_max=0` and a `glibc.malloc.trim_threshold` above any block:
  large blocks come from the main heap and stay there when freed, so the next step
  reuses them without a fault. Only the process's main thread allocates from the
  main heap (glibc gives other threads arenas of at most 64 MB, which mmap larger
  blocks regardless), so executions must allocate on the Python thread: with these
  tunables in effect, `restart_with_hugepages` also switches jax's
  `jax_cpu_enable_async_dispatch` off (jax then runs a CPU program on the calling
  thread; XLA's own worker threads are unchanged, and on a CPU both would compete
  for the same cores anyway). `glibc.malloc.top_pad` grows the heap in 64 MiB
  steps, so that huge pages cover it. Even with huge pages, zeroing pages
  (`clear_page_erms`) took 14% of a UNet step's CPU samples (`perf`), and a quarter
  to a third of the steps spent another 300-800 ms in the kernel (zeroing fresh
  pages; no compaction stalls). Afterwards: under 62 faults per step, no stalls,
  UNet step median 1030-1200 -> 875-882 ms (one-off runs of 8-10 single steps,
  2-core AMD EPYC). The process keeps its peak heap mapped (reused, not leaked).

PyTorch, run in the same process by the benchmarks, runs with the same tunables.
The simulator's batches are unaffected.

glibc reads tunables only when a process starts, so lensjax's command-line entry
points (`python -m lensjax.main`, `lensjax.evaluate`, `lensjax.sample`, and the
benchmarks) call `restart_with_hugepages()` first: it re-executes the same command
line once with GLIBC_TUNABLES extended, and does nothing when all the tunables are
already named there (a user's own value is kept), LENSJAX_HUGEPAGES=0, or the C
library is not glibc. `glibc.malloc.hugetlb` is added only for glibc >= 2.35 (the
first with it) with transparent huge pages "always" or "madvise". Library users get
the same effect by starting Python with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776:glibc.malloc.top_pad=67108864`
and calling `jax.config.update("jax_cpu_enable_async_dispatch", False)` before
jax's first computation.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

HUGE_PAGES = ("glibc.malloc.hugetlb", "1")
# 1 TiB: above any block a program frees, so glibc never hands the heap's top back.
KEEP_HEAP = (("glibc.malloc.mmap_max", "0"), ("glibc.malloc.trim_threshold", str(2 ** 40)),
             ("glibc.malloc.top_pad", str(64 * 2 ** 20)))
OPT_OUT_VARIABLE = "LENSJAX_HUGEPAGES"  # "0": never restart
MIN_GLIBC = (2, 26)            # mmap_max and trim_threshold tunables
MIN_GLIBC_HUGETLB = (2, 35)    # glibc.malloc.hugetlb
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_hugepage_mode(path: str = THP_SETTING) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None
    where it cannot be read (not Linux, no THP support)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
    """(major, minor) of the running glibc, or None for another C library."""
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None


def wanted_tunables(libc: tuple[int, ...] | None, thp_mode: str | None) -> list[tuple[str, str]]:
    """The (name, value) glibc tunables that help on this system (see the module docstring)."""
    if libc is None or libc < MIN_GLIBC:
        return []
    wanted = list(KEEP_HEAP)
    if libc >= MIN_GLIBC_HUGETLB and thp_mode in ("always", "madvise"):
        wanted.insert(0, HUGE_PAGES)
    return wanted


def restart_environment(environ: Mapping[str, str], libc: tuple[int, ...] | None,
                        thp_mode: str | None) -> dict[str, str] | None:
    """The environment to restart with (GLIBC_TUNABLES extended by the tunables it does not
    name yet), or None when no restart is wanted or would help (see the module docstring)."""
    if environ.get(OPT_OUT_VARIABLE, "1") == "0":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    named = {item.split("=", 1)[0] for item in tunables.split(":") if item}
    missing = [f"{name}={value}" for name, value in wanted_tunables(libc, thp_mode)
               if name not in named]
    if not missing:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(([tunables] if tunables else []) + missing)
    return env


def keeps_heap(environ: Mapping[str, str]) -> bool:
    """Whether this process runs with glibc's large blocks kept on the main heap
    (`glibc.malloc.mmap_max=0` in GLIBC_TUNABLES, not opted out)."""
    tunables = environ.get("GLIBC_TUNABLES", "").split(":")
    return environ.get(OPT_OUT_VARIABLE, "1") != "0" and "=".join(KEEP_HEAP[0]) in tunables


def restart_with_hugepages() -> None:
    """Re-execute this process's command line with the tunables when they help; else return.

    Call it first thing in a `__main__` block (never from library code: it replaces
    the running process).
    """
    if not sys.platform.startswith("linux") or not sys.executable or len(sys.orig_argv) < 2:
        return  # nothing to re-execute (an embedded interpreter, a bare REPL)
    env = restart_environment(os.environ, glibc_version(), transparent_hugepage_mode())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    if keeps_heap(os.environ):
        import jax  # only now: the restart above replaces the process

        # Run CPU programs on this (the main) thread, whose buffers the main heap serves.
        jax.config.update("jax_cpu_enable_async_dispatch", False)
