"""The server command line under conditions a careless or hostile user creates: start-up that
fails after the socket and memory exist, signals that arrive while the server is starting, and
option values that are wrong in ways the usual checks miss.

Every test looks at what is left on disk (the socket path, /dev/shm, the pidfile) and at the
exit status, since those are what a user sees.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from _procwait import running as _pid_alive
from test_server import _env


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyivshmem", "server", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, env=_env(), **kw,
    )


def _wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "ivshmem.sock")


# ------------------------------------------------------------------------------------------
# daemon mode: a start that fails after the socket and the memory exist
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_daemon_that_cannot_write_its_pidfile_leaves_no_socket_or_memory(
        sock_path, shm_name, tmp_path):
    pidfile = tmp_path / "a-directory"
    pidfile.mkdir()
    r = _cli("-p", str(pidfile), "-S", sock_path, "-M", shm_name, "-l", "64K")
    assert r.returncode == 1, r
    assert "pid file" in r.stderr and str(pidfile) in r.stderr
    assert "path with -p" in r.stderr and "foreground with -F" in r.stderr   # what to do
    # the failed start cleans up what it made, like any other failed start
    assert not os.path.lexists(sock_path)
    assert not os.path.exists(f"/dev/shm/{shm_name}")


@pytest.mark.timeout(120)
def test_daemon_pidfile_failure_keeps_memory_it_did_not_create(sock_path, shm_name, tmp_path):
    with open(f"/dev/shm/{shm_name}", "wb") as f:
        f.truncate(64 << 10)
    r = _cli("-p", str(tmp_path / "missing" / "x.pid"), "-S", sock_path, "-M", shm_name,
             "-l", "64K")
    assert r.returncode == 1, r
    assert not os.path.lexists(sock_path)
    assert os.path.exists(f"/dev/shm/{shm_name}")     # existed before: not this server's


# ------------------------------------------------------------------------------------------
# SIGTERM while the server starts
# ------------------------------------------------------------------------------------------
# The signal is sent by the server process itself at a chosen point of its start-up (a patched
# function), so the test does not depend on when a signal sent from outside happens to land.
_SIGNAL_DURING = textwrap.dedent("""
    import os, signal, sys
    import pyivshmem.server.cli as cli
    import pyivshmem.server.memory as memory
    where, sig, sidefile = sys.argv[1], getattr(signal, sys.argv[2]), sys.argv[3]

    def hit():
        with open(sidefile, "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), sig)

    if where == "memory":        # while listening: the socket exists, the memory is being made
        real_open = memory.Memory.open
        def patched_open(self):
            hit()
            return real_open(self)
        memory.Memory.open = patched_open
    else:                        # in the daemon, after it reported its start, before serving
        real_syslog = cli._use_syslog
        def patched_syslog(old):
            hit()
            return real_syslog(old)
        cli._use_syslog = patched_syslog
    sys.exit(cli.main(sys.argv[4:]))
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_during_start_up_still_shuts_down_cleanly(sock_path, shm_name, tmp_path, sig):
    side = tmp_path / "pid"
    r = subprocess.run(
        [sys.executable, "-c", _SIGNAL_DURING, "memory", sig, str(side),
         "-F", "-S", sock_path, "-M", shm_name, "-l", "64K"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, env=_env(),
    )
    assert side.exists(), r.stderr                    # the signal was sent
    assert r.returncode == 0, r                       # a clean shutdown, not death by signal
    assert not os.path.lexists(sock_path)
    assert not os.path.exists(f"/dev/shm/{shm_name}")


@pytest.mark.timeout(120)
def test_sigterm_to_the_daemon_right_after_it_started_still_cleans_up(
        sock_path, shm_name, tmp_path):
    side = tmp_path / "daemon-pid"
    pidfile = tmp_path / "server.pid"
    r = subprocess.run(
        [sys.executable, "-c", _SIGNAL_DURING, "daemon", "SIGTERM", str(side),
         "-p", str(pidfile), "-S", sock_path, "-M", shm_name, "-l", "64K"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, env=_env(),
    )
    assert r.returncode == 0, r
    _wait_for(lambda: side.exists() and side.read_text(), what="the daemon's side file")
    pid = int(side.read_text())
    try:
        _wait_for(lambda: not _pid_alive(pid), what="the daemon to exit")
        assert not os.path.lexists(sock_path)
        assert not os.path.exists(f"/dev/shm/{shm_name}")
        assert not pidfile.exists()
    finally:
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------
# option values whose message misled, or that slipped past the checks
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["-1", "-64"])
def test_negative_vector_count_is_not_called_too_many(value):
    r = _cli("-F", "-n", value)
    assert r.returncode == 2, r
    assert "too many" not in r.stderr
    assert f"invalid number of vectors {value}" in r.stderr and "0..64" in r.stderr


@pytest.mark.parametrize("value", ["999", "8", "rw"])
def test_mode_that_is_not_octal_says_so(value):
    r = _cli("-F", "--mode", value)
    assert r.returncode == 2, r
    assert f"invalid mode {value!r}" in r.stderr       # what the user typed, not a rewrite
    assert "octal" in r.stderr


def test_socket_path_that_is_a_directory_is_not_to_be_removed(tmp_path, shm_name):
    r = _cli("-F", "-S", str(tmp_path), "-M", shm_name, "-l", "4K")
    assert r.returncode == 1, r
    assert "is a directory" in r.stderr
    assert "remove it" not in r.stderr        # never advise removing a directory
    assert "socket file" in r.stderr
    assert tmp_path.is_dir()
    assert not os.path.exists(f"/dev/shm/{shm_name}")


@pytest.mark.parametrize("name", ["/", "//", "///"])
def test_shm_name_of_slashes_only_is_refused_as_invalid(sock_path, name):
    r = _cli("-F", "-S", sock_path, "-M", name, "-l", "4K")
    assert r.returncode == 1, r
    assert f"invalid shared memory name {name!r}" in r.stderr
    assert not os.path.lexists(sock_path)


# ------------------------------------------------------------------------------------------
# SIGHUP: a closed terminal
# ------------------------------------------------------------------------------------------
def _serving(sock_path: str, proc: subprocess.Popen) -> None:
    """Returns once the server's loop has answered a client (so its handlers are in place)."""
    from test_server import RawClient

    _wait_for(lambda: os.path.exists(sock_path) or proc.poll() is not None, what="the socket")
    assert proc.poll() is None, proc.communicate()
    with RawClient(sock_path) as c:
        c.handshake()


@pytest.mark.timeout(120)
def test_sighup_stops_the_foreground_server_cleanly(sock_path, shm_name):
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyivshmem", "server", "-F", "-S", sock_path, "-M", shm_name,
         "-l", "4K"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=_env(),
        # as from a terminal: a test run started under nohup (or by a runner that ignores SIGHUP)
        # would hand its ignored SIGHUP down, and the server rightly leaves an ignored SIGHUP be
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    try:
        _serving(sock_path, proc)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        assert not os.path.lexists(sock_path)
        assert not os.path.exists(f"/dev/shm/{shm_name}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()


@pytest.mark.timeout(120)
def test_sighup_ignored_by_nohup_stays_ignored(sock_path, shm_name):
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyivshmem", "server", "-F", "-S", sock_path, "-M", shm_name,
         "-l", "4K"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=_env(),
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),   # as nohup does
    )
    try:
        _serving(sock_path, proc)
        proc.send_signal(signal.SIGHUP)    # an ignored signal is discarded when it is sent
        _serving(sock_path, proc)          # still serving
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        assert not os.path.lexists(sock_path)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()


_EMBEDDED_SIGNAL_DURING_LISTEN = textwrap.dedent("""
    import os, signal, sys
    import pyivshmem.server.memory as memory
    from pyivshmem.server import Server
    real_open = memory.Memory.open
    def patched_open(self):
        os.kill(os.getpid(), signal.SIGTERM)    # the socket exists already
        return real_open(self)
    memory.Memory.open = patched_open
    Server(sys.argv[1], shm_name=sys.argv[2], size=4096).serve_forever(handle_signals=True)
    print("returned")
""")


@pytest.mark.timeout(120)
def test_embedded_serve_forever_with_signals_handles_a_signal_during_listen(sock_path, shm_name):
    r = subprocess.run(
        [sys.executable, "-c", _EMBEDDED_SIGNAL_DURING_LISTEN, sock_path, shm_name],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, env=_env(),
    )
    assert r.returncode == 0 and "returned" in r.stdout, r
    assert not os.path.lexists(sock_path)
    assert not os.path.exists(f"/dev/shm/{shm_name}")
