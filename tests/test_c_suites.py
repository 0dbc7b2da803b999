"""The C-level suites, run from the Python test command so that one `pytest` runs everything:
the C tests of the core (plain, ASan/UBSan, TSan, MSan builds), part of this Python suite under
ASan/UBSan, and a fixed fuzzing budget.  They need the source tree and compilers; without them
they skip with the reason (CI installs gcc and clang)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_C = os.path.join(ROOT, "tests", "c")
FUZZ_SECONDS = int(os.environ.get("PYIVSHMEM_FUZZ_SECONDS", "60"))


def _need(*tools):
    if not os.path.isfile(os.path.join(ROOT, "csrc", "ivshm_layout.h")):
        pytest.skip("needs the source tree (csrc/, tests/c/)")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install {' '.join(missing)})")


def _run(cmd, timeout):
    proc = subprocess.run(cmd, cwd=TESTS_C, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    print(proc.stdout[-20000:])
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}"
    return proc.stdout


@pytest.mark.timeout(900)
def test_c_core_plain_and_sanitized(report_figure):
    _need("make", "gcc")
    out = _run(["sh", "run.sh"], 850)
    counts = [line.strip() for line in out.splitlines() if " passed, " in line]
    last = counts[-1]
    assert last.endswith(" 0 failed") and not last.startswith("0 passed"), last
    report_figure("C core tests (tests/c/run.sh): " + "; ".join(counts))


@pytest.mark.timeout(900)
def test_python_suite_under_asan():
    _need("make", "gcc")
    _run(["sh", "run-python-asan.sh"], 850)


@pytest.mark.timeout(FUZZ_SECONDS * 4 + 300)
def test_fuzz_budget_finds_nothing(report_figure):
    _need("make", "clang")
    out = _run(["make", "-s", "fuzz", f"FUZZ_SECONDS={FUZZ_SECONDS}"], FUZZ_SECONDS * 4 + 240)
    per_harness = [line for line in out.splitlines() if " executions in " in line]
    total = [line for line in out.splitlines() if line.startswith("fuzz: ")]
    assert len(per_harness) == 2 and total, f"the fuzzers reported no executions:\n{out[-3000:]}"
    executions = int(total[-1].split()[1])
    assert executions > 0, total[-1]
    for line in per_harness:
        report_figure(f"libFuzzer {line}")
