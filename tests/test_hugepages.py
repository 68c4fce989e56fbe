"""lensjax.hugepages: when the entry points restart with glibc's malloc tunables, and that
the restarted process really gets transparent huge pages and reuses freed blocks."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lensjax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = (2, 36)


KEEP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776:glibc.malloc.top_pad=67108864"
ALL = "glibc.malloc.hugetlb=1:" + KEEP


def test_restart_environment_adds_the_tunables():
    env = hugepages.restart_environment({"PATH": "/bin"}, GLIBC, "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": ALL}
    assert hugepages.keeps_heap(env) and not hugepages.keeps_heap({"PATH": "/bin"})
    assert not hugepages.keeps_heap(dict(env, LENSJAX_HUGEPAGES="0"))
    env = hugepages.restart_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "always")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + ALL


def test_restart_environment_keeps_the_users_choices():
    # A value the user set is kept; only the tunables not named yet are added.
    env = hugepages.restart_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
                                        GLIBC, "madvise")
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:" + KEEP}
    # Without huge pages (old glibc, THP off) the heap is still kept.
    for libc, mode in (((2, 34), "madvise"), (GLIBC, "never"), (GLIBC, None)):
        env = hugepages.restart_environment({}, libc, mode)
        assert env["GLIBC_TUNABLES"] == KEEP, (libc, mode)


@pytest.mark.parametrize("environ,libc,mode", [
    ({"LENSJAX_HUGEPAGES": "0"}, GLIBC, "madvise"),             # opted out
    ({"GLIBC_TUNABLES": ALL}, GLIBC, "madvise"),                # already restarted
    ({"GLIBC_TUNABLES": KEEP}, GLIBC, "never"),                 # already restarted, THP off
    ({}, (2, 25), "madvise"),                                   # glibc without the tunables
    ({}, None, "madvise"),                                      # not glibc (musl, macOS)
])
def test_no_restart_when_it_would_not_help_or_is_not_wanted(environ, libc, mode):
    assert hugepages.restart_environment(environ, libc, mode) is None


def test_transparent_hugepage_mode_reads_the_bracketed_choice(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert hugepages.transparent_hugepage_mode(str(setting)) == "madvise"
    assert hugepages.transparent_hugepage_mode(str(tmp_path / "missing")) is None


CHILD = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {repo!r})
    from lensjax import hugepages
    if __name__ == "__main__":
        hugepages.restart_with_hugepages()
        import ctypes, resource
        import jax
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p

        def anon_huge_kib():
            with open("/proc/self/smaps_rollup") as f:
                for line in f:
                    if line.startswith("AnonHugePages:"):
                        return int(line.split()[1])
            return 0

        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        before = anon_huge_kib()
        # A block of 64 MiB, touched, as XLA's per-step buffers: plain C malloc (numpy
        # would madvise huge pages for large arrays by itself).
        size = 64 * 2**20
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        huge_kib = anon_huge_kib() - before
        libc.free(ctypes.c_void_p(block))
        # The next step's block: a fault per page again unless the heap kept it.
        start = faults()
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        print(json.dumps(dict(tunables=os.environ.get("GLIBC_TUNABLES", ""), args=sys.argv[1:],
                              huge_kib=huge_kib, refaults=faults() - start,
                              asynchronous=jax.config.values["jax_cpu_enable_async_dispatch"])))
""")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.path.exists("/proc/self/smaps_rollup")
                         and hugepages.glibc_version() and hugepages.glibc_version() >= (2, 35)
                         and hugepages.transparent_hugepage_mode() == "madvise"),
                    reason="needs Linux, glibc >= 2.35 and transparent huge pages in madvise mode")
@pytest.mark.parametrize("opt_out", [False, True])
def test_restarted_process_keeps_its_arguments_gets_huge_pages_and_reuses_blocks(tmp_path, opt_out):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=REPO))
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if opt_out:
        env["LENSJAX_HUGEPAGES"] = "0"
    out = json.loads(subprocess.run([sys.executable, str(script), "--flag", "value"], env=env,
                                    capture_output=True, text=True, check=True,
                                    timeout=120).stdout)
    tunables, huge_kib = out["tunables"], out["huge_kib"]
    assert out["args"] == ["--flag", "value"]
    if opt_out:
        assert tunables == "" and huge_kib < 2048 and out["asynchronous"]
        assert out["refaults"] >= 1000  # 16,384 pages of 4 KiB, touched afresh
    else:
        # Most of the 64 MiB block sits in 2 MiB pages (the kernel's madvise mode
        # gives huge pages only to regions that ask, so without the restart it is ~0),
        # the freed block is reused without faults, and jax runs CPU programs on the
        # main thread, whose blocks the main heap serves.
        assert tunables == ALL and huge_kib >= 32 * 1024 and not out["asynchronous"]
        assert out["refaults"] < 20  # 544 with huge pages alone, 16,385 without either
