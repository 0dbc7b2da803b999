import os
import uuid

import pytest


def pytest_configure(config):
    # Run from a neutral directory: a subprocess started as `python -m pyivshmem` must import the
    # installed package, not the source tree (which has no compiled modules) from the repo root.
    import tempfile

    config._pyivshmem_cwd = (os.getcwd(), tempfile.mkdtemp(prefix="pyivshmem-tests-"))
    os.chdir(config._pyivshmem_cwd[1])


def pytest_unconfigure(config):
    import shutil

    old, tmp = getattr(config, "_pyivshmem_cwd", (None, None))
    if tmp:
        os.chdir(old)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def shm_path():
    """A unique /dev/shm path, removed after the test."""
    path = f"/dev/shm/pyivshmem-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    yield path
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@pytest.fixture
def region(shm_path):
    from pyivshmem import Region

    r = Region.create(shm_path, "4M")
    yield r
    r.close()


# Figures a test wants in the run's output (fuzz executions, C test counts): shown at the end of
# every run, pass or fail, so that CI's log reports what was exercised, not only that it passed.
_FIGURES = []


@pytest.fixture
def report_figure():
    """Call with one line of text; it is printed in the run's closing summary."""
    return _FIGURES.append


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
