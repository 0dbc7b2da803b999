"""`pyivshmem bench` used as a hostile user would: bad option values, output paths that cannot be
written, a transport whose setup fails, and the run stopped by SIGTERM."""
import glob
import os
import signal
import subprocess
import sys

import pytest

from pyivshmem import bench
from pyivshmem.bench.workers import usable_cpus
from _procwait import wait_for as _wait_for

# a run that does almost nothing, for options checked before anything runs
TINY = ["--scenarios", "roundtrip", "--peers", "none", "--rtt-samples", "20", "--repeat", "1",
        "--quiet"]


def _bench(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "pyivshmem", "bench", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


@pytest.mark.parametrize("opt", ["--sizes", "--rtt-size"])
@pytest.mark.parametrize("value, needle", [("1X", "'1X'"), ("0", "at least"), ("1.5", "fraction")])
def test_bad_size_says_why(capsys, opt, value, needle):
    assert bench.main(TINY + [opt, value]) == 2
    err = capsys.readouterr().err
    assert opt in err and needle in err


def test_cpu_that_cannot_be_used_is_refused(capsys):
    bad = max(usable_cpus()) + 1000
    assert bench.main(TINY + ["--cpus", f"{min(usable_cpus())},{bad}"]) == 2
    err = capsys.readouterr().err
    assert "--cpus" in err and str(bad) in err


@pytest.mark.parametrize("opt", ["--json", "--markdown"])
def test_output_file_that_is_a_directory_is_refused_before_the_run(capsys, tmp_path, opt):
    assert bench.main(TINY + [opt, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert opt in err and "directory" in err
    assert not os.listdir(tmp_path)


def test_plot_dir_that_is_a_file_is_refused_before_the_run(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    f = tmp_path / "plots"
    f.write_text("x")
    assert bench.main(TINY + ["--plot", str(f)]) == 2
    err = capsys.readouterr().err
    assert "--plot" in err and "not a directory" in err


def test_setup_failure_of_a_transport_is_reported_and_the_run_goes_on(tmp_path):
    """A transport whose setup raises (here pyivshmem's own server: TMPDIR too long for a UNIX
    socket address) fails its figures with a note; the other transports are still measured."""
    longdir = tmp_path / ("d" * 100)
    longdir.mkdir()
    env = dict(os.environ, TMPDIR=str(longdir))
    out = _bench("--scenarios", "roundtrip", "--peers", "os-pipe", "--rtt-samples", "20",
                 "--repeat", "1", "--quiet", "--json", str(tmp_path / "r.json"), env=env)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 1, out.stderr  # pyivshmem's own figures failed
    import json

    doc = json.loads((tmp_path / "r.json").read_text())
    recs = doc["records"]
    ivs = [r for r in recs if r["transport"] == "pyivshmem"]
    pipe = [r for r in recs if r["transport"] == "os-pipe"]
    assert ivs and all(r["status"] == "failed" and "socket path" in r["note"] for r in ivs)
    assert pipe and all(r["status"] == "ok" for r in pipe)


@pytest.fixture
def short_tmp():
    """A TMPDIR short enough for the run's UNIX socket addresses (107 bytes)."""
    import shutil
    import tempfile
    from pathlib import Path

    d = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_sigterm_mid_run_leaves_no_temp_dir(short_tmp):
    tmp = short_tmp
    env = dict(os.environ, TMPDIR=str(tmp))
    p = subprocess.Popen([sys.executable, "-m", "pyivshmem", "bench", "--scenarios", "throughput",
                          "--sizes", "64", "--peers", "none", "--duration", "60", "--repeat", "1"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, text=True)
    try:
        # the run's server socket exists: the run is under way
        _wait_for(lambda: glob.glob(str(tmp / "pyivshmem-bench-*" / "ivshmem.sock"))
                  or p.poll() is not None, "the bench's server socket")
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert not os.listdir(tmp), os.listdir(tmp)


def test_a_peer_package_that_fails_on_import_is_reported_and_the_run_goes_on(tmp_path):
    """posix_ipc is imported in this process to check a message size: a broken build of it
    (an import that raises) ended the run with a traceback."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "posix_ipc.py").write_text('raise RuntimeError("this build is broken")\n')
    env = dict(os.environ, PYTHONPATH=str(broken))
    out = _bench("--scenarios", "roundtrip", "--peers", "posix-mq,os-pipe", "--rtt-samples", "20",
                 "--repeat", "1", "--quiet", "--json", str(tmp_path / "r.json"), env=env)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    import json

    recs = json.loads((tmp_path / "r.json").read_text())["records"]
    mq = [r for r in recs if r["transport"] == "posix-mq"]
    pipe = [r for r in recs if r["transport"] == "os-pipe"]
    assert mq and all(r["status"] != "ok" and "this build is broken" in r["note"] for r in mq)
    assert pipe and all(r["status"] == "ok" for r in pipe)


@pytest.mark.parametrize("opt", ["--duration", "--rtt-seconds", "--wake-gap", "--max-spread"])
def test_infinite_seconds_are_a_usage_error(capsys, opt):
    """--duration inf ran a throughput trial that never ends."""
    assert bench.main(TINY + [opt, "inf"]) == 2
    err = capsys.readouterr().err
    assert opt in err and "finite" in err


def test_one_cpu_named_twice_is_refused(capsys):
    """--cpus 0,0 ran both processes on CPU 0 with busy-poll figures labelled "cross"."""
    cpu = min(usable_cpus())
    assert bench.main(TINY + ["--cpus", f"{cpu},{cpu}"]) == 2
    err = capsys.readouterr().err
    assert "--cpus" in err and "different" in err


def test_a_peer_named_twice_is_measured_once(tmp_path):
    import json

    out = tmp_path / "r.json"
    assert bench.main(["--scenarios", "roundtrip", "--peers", "os-pipe,os-pipe", "--rtt-samples",
                       "20", "--repeat", "1", "--quiet", "--json", str(out)]) == 0
    recs = [r for r in json.loads(out.read_text())["records"] if r["transport"] == "os-pipe"]
    groups = [r["group"] for r in recs]
    assert recs and len(groups) == len(set(groups)), groups
