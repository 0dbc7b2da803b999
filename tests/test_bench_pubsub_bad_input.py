"""`pyivshmem bench pubsub` used as a hostile user would: values that cannot work, and the run
stopped in the middle (SIGTERM, or SIGINT sent to the benchmark's process alone)."""
import glob
import os
import signal
import subprocess
import sys

import pytest

from pyivshmem.bench import pubsub
from _procwait import (
    children as _children,
    cmdline as _cmdline,
    running as _running,
    wait_for as _wait_for,
)


@pytest.mark.parametrize("argv, needle", [
    (["--subscribers", "0"], "--subscribers"),
    (["--subscribers", "65"], "--subscribers"),
    (["--subscribers", "two"], "--subscribers"),
    (["--sizes", "0"], "--sizes"),
    (["--sizes", "1X"], "--sizes"),
    (["--peers", "carrier-pigeon"], "carrier-pigeon"),
    (["--modes", "telepathy"], "telepathy"),
    (["--repeat", "0"], "--repeat"),
    (["--seconds", "0"], "--seconds"),
    (["--seconds", "nan"], "--seconds"),
    (["--latency-gap-us", "-5"], "--latency-gap-us"),
])
def test_values_that_cannot_work_are_usage_errors(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        pubsub.main(argv + ["--peers", "pyivshmem"] if "--peers" not in argv else argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_json_path_that_is_a_directory_is_refused_before_the_run(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        pubsub.main(["--peers", "pyivshmem", "--json", str(tmp_path)])
    assert e.value.code == 2
    assert "--json" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_benchmark_stops_subscribers_and_removes_its_region(sig):
    p = subprocess.Popen(
        [sys.executable, "-m", "pyivshmem", "bench", "pubsub", "--peers", "pyivshmem",
         "--subscribers", "2", "--sizes", "64", "--modes", "copy", "--seconds", "60",
         "--repeat", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # a signal for the benchmark alone, as kill(1) sends it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    region = f"/dev/shm/pyivshmem-bench-pubsub-{p.pid}-*"
    subs = []
    try:
        def started():
            subs[:] = [c for c in _children(p.pid) if "spawn_main" in _cmdline(c)
                       and "resource_tracker" not in _cmdline(c)]
            return (len(subs) == 2 and glob.glob(region)) or p.poll() is not None

        _wait_for(started, "the region and two subscriber processes")
        assert p.poll() is None, p.communicate()
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        try:
            _wait_for(lambda: not any(_running(s) for s in subs), "the subscribers to end",
                      timeout=30)
        finally:
            for s in subs:
                if _running(s):
                    os.kill(s, signal.SIGKILL)
            for f in glob.glob(region):
                os.unlink(f)
    assert p.returncode == 128 + sig, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert not glob.glob(region)


def _publishing(path):
    """The benchmark's publisher has published (the start barriers are behind it)."""
    from pyivshmem import Region

    try:
        with Region.open(path) as r:
            return any(x.get("name") == "bench" and x.get("head", 0) > 0 for x in r.rings())
    except Exception:  # not formatted yet, or the ring not created yet
        return False


def test_a_subscriber_killed_mid_run_is_reported_not_waited_for_forever():
    """The publisher is the killed subscriber's parent: unreaped, the subscriber stayed a zombie
    that the ring takes for alive, so the publisher waited for it for good."""
    p = subprocess.Popen(
        [sys.executable, "-m", "pyivshmem", "bench", "pubsub", "--peers", "pyivshmem",
         "--subscribers", "2", "--sizes", "64", "--modes", "copy", "--seconds", "60",
         "--repeat", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    region = f"/dev/shm/pyivshmem-bench-pubsub-{p.pid}-*"
    subs = []
    try:
        def started():
            subs[:] = [c for c in _children(p.pid) if "spawn_main" in _cmdline(c)
                       and "resource_tracker" not in _cmdline(c)]
            return (len(subs) == 2 and glob.glob(region)) or p.poll() is not None

        _wait_for(started, "the region and two subscriber processes")
        assert p.poll() is None, p.communicate()
        _wait_for(lambda: _publishing(glob.glob(region)[0]) or p.poll() is not None,
                  "the publisher to publish")
        os.kill(subs[0], signal.SIGKILL)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for s in subs:
            if _running(s):
                os.kill(s, signal.SIGKILL)
        for f in glob.glob(region):
            os.unlink(f)
    assert p.returncode == 1, err
    assert "subscriber process" in err and "exit code -9" in err, err
    assert "Traceback" not in err, err
