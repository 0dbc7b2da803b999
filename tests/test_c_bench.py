"""The C ring benchmark (bench/c) builds and moves every element in sequence through each ring it
measures: pyivshmem's SPSC and MPMC rings, and DPDK's rte_ring when libdpdk-dev is installed.
Only correctness is checked here (ring_bench exits non-zero on an element out of sequence); its
figures belong to the benchmark, never to a test."""
import os
import re
import shutil
import subprocess

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
