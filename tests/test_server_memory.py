"""The memory a server hands out: a caller's ``shm_fd`` is the server's own copy from the moment
the Server exists, so closing the caller's fd (as "duplicated; the caller keeps its own" invites)
can never make the server size, and zero the start of, whatever file reuses that fd number."""
from __future__ import annotations

import os

import pytest

from pyivshmem.errors import IvshmemError
from pyivshmem.server import Server


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(60)
def test_closing_the_callers_shm_fd_before_start_is_safe(tmp_path):
    mem = os.memfd_create("caller-memory")
    os.ftruncate(mem, 4096)
    os.pwrite(mem, b"shared", 0)
    server = Server(str(tmp_path / "s.sock"), shm_fd=mem, size=4096)
    os.close(mem)                                  # the server has its own copy
    victim = os.open(tmp_path / "victim", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(victim, b"precious data")
        with server:
            assert os.pread(server.shm_fd, 6, 0) == b"shared"       # the caller's memory
            assert os.fstat(server.shm_fd).st_size == 4096
        with open(tmp_path / "victim", "rb") as f:
            assert f.read() == b"precious data"    # untouched (not truncated to 4096 bytes)
    finally:
        os.close(victim)


def test_a_bad_shm_fd_is_refused_when_the_server_is_made(tmp_path):
    with pytest.raises(IvshmemError, match="shm_fd"):
        Server(str(tmp_path / "s.sock"), shm_fd=10_000_000, size=4096)


def test_a_server_never_started_releases_its_copy_of_shm_fd(tmp_path):
    mem = os.memfd_create("caller-memory")
    try:
        before = _fd_count()
        server = Server(str(tmp_path / "s.sock"), shm_fd=mem, size=4096)
        server.close()
        assert _fd_count() == before
        server = Server(str(tmp_path / "s.sock"), shm_fd=mem, size=4096)
        with server:
            pass
        assert _fd_count() == before
    finally:
        os.close(mem)


# ------------------------------------------------------------------------------------------
# two servers on one named memory (every server's default -M is "ivshmem")
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["shm_name", "shm_path"])
def test_a_second_server_on_the_same_memory_is_refused_and_the_first_keeps_its_region(
        tmp_path, shm_name, kind):
    from pyivshmem import Peer
    from pyivshmem.errors import ConfigError

    where = {"shm_name": shm_name} if kind == "shm_name" else {"shm_path": str(tmp_path / "m")}
    first = Server(str(tmp_path / "a.sock"), size="64K", **where).start()
    try:
        with Peer.connect(first.socket_path, timeout=30) as peer:
            peer.region.create_ring("jobs", "spsc", slot_size=64, capacity=16)
            second = Server(str(tmp_path / "b.sock"), size="128K", **where)
            with pytest.raises(ConfigError, match="in use by another ivshmem server"):
                second.listen()
            assert not os.path.lexists(tmp_path / "b.sock")
            peer.region.check()                        # header intact: not invalidated
            assert peer.region.size == 64 << 10          # not resized
            peer.region.ring("jobs")                     # the first session's ring is there
            assert first.peers == (peer.id,)
    finally:
        first.close()
    # once the first server is gone, the memory is free for another
    with Server(str(tmp_path / "c.sock"), size="64K", **where) as third:
        assert third.size == 64 << 10


@pytest.mark.timeout(60)
def test_a_forked_child_does_not_keep_a_closed_servers_memory_locked(tmp_path, shm_name):
    """A worker forked while a server ran must not make a later server on the same memory
    look like a second live server once the first one has closed."""
    first = Server(str(tmp_path / "a.sock"), shm_name=shm_name, size="64K", keep_shm=True)
    first.start()
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the worker: waits until told to leave
        try:
            os.close(w)
            os.write(ready_w, b"x")                # running: the fork hooks are done
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        first.close()
        with Server(str(tmp_path / "b.sock"), shm_name=shm_name, size="64K") as second:
            assert second.size == 64 << 10
    finally:
        os.close(w)                                # the worker leaves
        os.close(ready_r)
        os.waitpid(pid, 0)


@pytest.mark.timeout(120)
def test_the_daemon_keeps_its_memory_locked_after_the_fork(tmp_path, shm_name):
    import signal
    import subprocess
    import sys

    from test_server_cli_errors import _env, _pid_alive, _wait_for

    pidfile = tmp_path / "server.pid"
    r = subprocess.run(
        [sys.executable, "-m", "pyivshmem", "server", "-p", str(pidfile),
         "-S", str(tmp_path / "a.sock"), "-M", shm_name, "-l", "64K"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, env=_env(),
    )
    assert r.returncode == 0, r
    pid = int(pidfile.read_text())
    try:
        second = subprocess.Popen(
            [sys.executable, "-m", "pyivshmem", "server", "-F", "-S", str(tmp_path / "b.sock"),
             "-M", shm_name, "-l", "64K"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=_env(),
        )
        try:
            # refused (it exits) or, wrongly, serving (its socket appears)
            _wait_for(lambda: second.poll() is not None or (tmp_path / "b.sock").exists(),
                      what="the second server to exit or serve")
            assert second.poll() is not None, "a second server started on the daemon's memory"
            assert second.returncode == 1
            assert "in use by another ivshmem server" in second.stderr.read()
        finally:
            if second.poll() is None:
                second.kill()
            second.wait(timeout=30)
            second.stderr.close()
    finally:
        os.kill(pid, signal.SIGTERM)
        _wait_for(lambda: not _pid_alive(pid), what="the daemon to exit")
