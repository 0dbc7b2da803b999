"""`pyivshmem bench bridge` used as a hostile user would: sizes that cannot work, an output path
that is a directory, and the run stopped by SIGTERM."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
from _procwait import (
    descendants as _descendants,
    cmdline as _cmdline,
    running as _running,
    wait_for as _wait_for,
)

pytest.importorskip("zmq")


@pytest.fixture
def short_tmp():
    """A TMPDIR short enough for the run's UNIX socket addresses (107 bytes)."""
    d = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _bench(tmp, *args):
    return subprocess.run([sys.executable, "-m", "pyivshmem", "bench", "bridge", *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, TMPDIR=tmp))


@pytest.mark.parametrize("value, needle", [("0", "at least one byte"), ("1X", "'1X'"),
                                           ("1M", "at most"), ("4", "at least 8")])
def test_size_that_cannot_work_is_a_usage_error_and_leaves_nothing(short_tmp, value, needle):
    out = _bench(short_tmp, "--sizes", value, "--rounds", "1", "--count", "100", "--pings", "5")
    assert out.returncode == 2, out.stderr
    assert "--sizes" in out.stderr and needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not os.listdir(short_tmp)


def test_size_with_a_suffix_is_accepted(short_tmp, tmp_path):
    res = tmp_path / "r.json"
    out = _bench(short_tmp, "--sizes", "1K", "--rounds", "1", "--count", "2000", "--pings", "5",
                 "--no-doorbells", "--json", str(res))
    assert out.returncode == 0, out.stderr
    assert "throughput 1024 B" in out.stdout
    assert not os.listdir(short_tmp)


@pytest.mark.parametrize("count", ["256", "512"])
def test_count_of_one_batch_is_a_usage_error(short_tmp, count):
    """Each rate is timed from its first batch's arrival: a run that is one batch has no rate
    (it ended in a division by zero after the run)."""
    out = _bench(short_tmp, "--count", count, "--rounds", "1", "--pings", "5", "--no-doorbells")
    assert out.returncode == 2 and "--count" in out.stderr, out.stderr


def test_json_path_that_is_a_directory_is_refused_before_the_run(short_tmp, tmp_path):
    out = _bench(short_tmp, "--json", str(tmp_path), "--rounds", "1", "--count", "100",
                 "--pings", "5")
    assert out.returncode == 2 and "--json" in out.stderr, out.stderr
    assert not os.listdir(tmp_path) and not os.listdir(short_tmp)


def test_sigterm_mid_run_stops_every_child_and_removes_the_temp_dir(short_tmp):
    p = subprocess.Popen([sys.executable, "-m", "pyivshmem", "bench", "bridge", "--rounds", "1000",
                          "--count", "2000", "--pings", "20"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=dict(os.environ, TMPDIR=short_tmp))
    kids = []
    try:
        def bridges_up():
            kids[:] = _descendants(p.pid)
            bridges = [k for k in kids if "pyivshmem bridge" in _cmdline(k)]
            return len(bridges) == 2 or p.poll() is not None

        _wait_for(bridges_up, "the two bridge processes")
        assert p.poll() is None, p.communicate()
        # a trial's own children (producer, sink, echo) too, once one runs beside the bridges
        _wait_for(lambda: len(_descendants(p.pid)) > 2 or p.poll() is not None, "a trial")
        kids[:] = _descendants(p.pid)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        try:
            _wait_for(lambda: not any(_running(k) for k in kids), "the children to end", 30)
        finally:
            for k in kids:
                if _running(k):
                    os.kill(k, signal.SIGKILL)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert not os.listdir(short_tmp), os.listdir(short_tmp)
    assert not glob.glob(f"/dev/shm/pyivshmem-bb-{p.pid}-*")


def test_sigkill_mid_run_leaves_no_child_running(short_tmp):
    """Nothing can clean up after SIGKILL, but no bridge, producer or echo may run on: each
    child asks the kernel for SIGTERM when the benchmark dies (PR_SET_PDEATHSIG, set by the
    child itself before it execs)."""
    p = subprocess.Popen([sys.executable, "-m", "pyivshmem", "bench", "bridge", "--rounds", "1000",
                          "--count", "2000", "--pings", "20"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True,
                         env=dict(os.environ, TMPDIR=short_tmp))
    kids = []
    try:
        _wait_for(lambda: len([k for k in _descendants(p.pid)
                               if "pyivshmem bridge" in _cmdline(k)]) == 2 or p.poll() is not None,
                  "the two bridge processes")
        _wait_for(lambda: len(_descendants(p.pid)) > 2 or p.poll() is not None, "a trial")
        assert p.poll() is None
        kids[:] = _descendants(p.pid)
        os.kill(p.pid, signal.SIGKILL)  # the benchmark only, not its process group
        p.wait(30)
        _wait_for(lambda: not any(_running(k) for k in kids), "the children to end", 30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for k in kids:
            if _running(k):
                os.kill(k, signal.SIGKILL)
        for f in glob.glob(f"/dev/shm/pyivshmem-bb-{p.pid}-*"):
            os.unlink(f)
