"""lensjax.hugepages: when the entry points restart with glibc's huge-page tunable, and
that the restarted process really gets transparent huge pages."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lensjax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = (2, 36)


def test_restart_environment_adds_the_tunable():
    env = hugepages.restart_environment({"PATH": "/bin"}, GLIBC, "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = hugepages.restart_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "always")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ,libc,mode", [
    ({"LENSJAX_HUGEPAGES": "0"}, GLIBC, "madvise"),             # opted out
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise"),  # the user's own choice
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, GLIBC, "madvise"),  # already restarted
    ({}, (2, 34), "madvise"),                                   # glibc without the tunable
    ({}, None, "madvise"),                                      # not glibc (musl, macOS)
    ({}, GLIBC, "never"),                                       # THP switched off
    ({}, GLIBC, None),                                          # no THP support
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
        import ctypes
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p

        def anon_huge_kib():
            with open("/proc/self/smaps_rollup") as f:
                for line in f:
                    if line.startswith("AnonHugePages:"):
                        return int(line.split()[1])
            return 0

        before = anon_huge_kib()
        # One malloc'ed (so mmap'ed) block of 64 MiB, touched; plain C malloc, as XLA's
        # buffers (numpy would madvise huge pages for large arrays by itself).
        block = libc.malloc(64 * 2**20)
        ctypes.memset(block, 1, 64 * 2**20)
        print(json.dumps(dict(tunables=os.environ.get("GLIBC_TUNABLES", ""), args=sys.argv[1:],
                              huge_kib=anon_huge_kib() - before)))
""")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.path.exists("/proc/self/smaps_rollup")
                         and hugepages.glibc_version() and hugepages.glibc_version() >= (2, 35)
                         and hugepages.transparent_hugepage_mode() == "madvise"),
                    reason="needs Linux, glibc >= 2.35 and transparent huge pages in madvise mode")
@pytest.mark.parametrize("opt_out", [False, True])
def test_restarted_process_keeps_its_arguments_and_gets_huge_pages(tmp_path, opt_out):
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
        assert tunables == "" and huge_kib < 2048
    else:
        # Most of the 64 MiB block sits in 2 MiB pages (the kernel's madvise mode
        # gives huge pages only to regions that ask, so without the restart it is ~0).
        assert tunables == "glibc.malloc.hugetlb=1" and huge_kib >= 32 * 1024
