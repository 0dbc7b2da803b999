"""The C ring benchmark (bench/c) builds and moves every element in sequence through each ring it
measures: pyivshmem's SPSC and MPMC rings, and DPDK's rte_ring when libdpdk-dev is installed.
Only correctness is checked here (ring_bench exits non-zero on an element out of sequence); its
figures belong to the benchmark, never to a test."""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_C = os.path.join(ROOT, "bench", "c")


def _have_dpdk() -> bool:
    return shutil.which("pkg-config") is not None and subprocess.run(
        ["pkg-config", "--exists", "libdpdk"]).returncode == 0


@pytest.mark.timeout(300)
def test_ring_bench_runs_every_ring_in_sequence(tmp_path):
    if not os.path.isfile(os.path.join(BENCH_C, "ring_bench.c")):
        pytest.skip("needs the source tree (bench/c)")
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.skip("needs make and a C compiler (apt-get install make gcc)")
    exe = tmp_path / "ring_bench"
    build = subprocess.run(["make", "-s", "-B", "-C", BENCH_C, "ring_bench"], capture_output=True,
                           text=True, timeout=240)
    assert build.returncode == 0, build.stdout + build.stderr
    shutil.move(os.path.join(BENCH_C, "ring_bench"), exe)  # keep the source tree clean
    run = subprocess.run([str(exe), "-n", "300000", "-r", "1", "-c", "256"], capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    rings = {m.group(1) for m in re.finditer(r"^RESULT ring=(\S+) burst=\d+", run.stdout, re.M)}
    expected = {"ivshm-spsc", "ivshm-mpmc"}
    if _have_dpdk():
        expected |= {"rte-spsc", "rte-mpmc"}
    elif os.environ.get("CI"):
        pytest.fail("CI installs libdpdk-dev, but pkg-config does not find libdpdk")
    assert rings == expected, run.stdout
    assert len(re.findall(r"^RESULT ", run.stdout, re.M)) == 3 * len(expected)


def _in_git_checkout() -> bool:
    return shutil.which("git") is not None and subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--verify", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.timeout(300)
def test_compare_builds_both_revisions_and_reports_every_burst():
    if not _in_git_checkout():
        pytest.skip("needs a git checkout of the source tree (compare.py reads revisions with git)")
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.skip("needs make and a C compiler (apt-get install make gcc)")
    def tree_state():
        return subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--ignored", "--", "csrc", "bench"],
                              capture_output=True, text=True).stdout
    before = tree_state()
    res = subprocess.run([sys.executable, os.path.join(BENCH_C, "compare.py"), "HEAD", "--rounds", "1",
                          "--placements", "1", "-n", "200000"], capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = re.findall(r"^(HEAD|working tree)\s+(fast|slow|all)\s+mpmc\s+(\d+)\s+1\s+(.*)$", res.stdout, re.M)
    assert sorted((r[0], int(r[2])) for r in rows) == sorted(
        (rev, b) for rev in ("HEAD", "working tree") for b in (1, 8, 32)), res.stdout
    if _have_dpdk():
        assert all(r[3].count("x") >= 3 for r in rows), res.stdout  # ratios to rte_ring
    assert tree_state() == before  # built and ran in a temporary directory only


def test_compare_names_a_revision_it_cannot_read():
    if not _in_git_checkout():
        pytest.skip("needs a git checkout of the source tree")
    res = subprocess.run([sys.executable, os.path.join(BENCH_C, "compare.py"), "no-such-revision-x"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "no-such-revision-x" in res.stderr
