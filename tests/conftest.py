import os
import random
import resource
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
def shm_name():
    """A unique name for the server's -M (shm_open) memory; /dev/shm/NAME removed after the test."""
    name = f"pyivshmem-test-{uuid.uuid4().hex[:12]}"
    yield name
    try:
        os.unlink(f"/dev/shm/{name}")
    except FileNotFoundError:
        pass


@pytest.fixture
def image():
    """The QEMU guest image of the VM tests (tests/vm/harness.py): built or found once, and the
    test skips, saying why, where QEMU or what the image needs is missing."""
    from vm import harness

    return harness.require_image()


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


# Randomized tests take their seed from this fixture: a fresh one each run, or $PYIVSHMEM_SEED to
# replay a failure; the seed is printed with the failure report, whatever assertion failed.
SEED_ENV = "PYIVSHMEM_SEED"


@pytest.fixture
def random_seed(request):
    """The seed for this test's random choices: int($PYIVSHMEM_SEED) when set, else random."""
    env = os.environ.get(SEED_ENV)
    seed = int(env, 0) if env else random.randrange(2**32)
    request.node._pyivshmem_seed = seed
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "_pyivshmem_seed", None)
    if seed is not None and report.failed:
        report.sections.append(
            ("random seed", f"this run used seed {seed}; replay it with "
                            f"{SEED_ENV}={seed} python -m pytest '{item.nodeid}'"))


@pytest.fixture
def fd_limit():
    """fd_limit(n): RLIMIT_NOFILE of this process at least n (soft and hard) for the test,
    restored after.  Raising the hard limit needs root (CI runs as root); without it a hard
    limit below n skips the test, saying so."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)

    def need(n):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < n:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
            except (ValueError, OSError) as e:
                pytest.skip(f"needs RLIMIT_NOFILE >= {n}; the hard limit is {hard} and raising "
                            f"it failed ({e}): run as root with CAP_SYS_RESOURCE, or raise it "
                            f"first (ulimit -Hn {n})")
        elif soft != resource.RLIM_INFINITY and soft < n:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))

    yield need
    resource.setrlimit(resource.RLIMIT_NOFILE, old)


@pytest.fixture
def server(tmp_path):
    """An ivshmem server (1 MiB, 2 vectors) serving in a thread; its socket path."""
    from pyivshmem import Server

    sock = os.path.join(tmp_path, "srv")
    with Server(sock, size="1M", vectors=2):
        yield sock
