"""Documented Server options and entry points: shutdown_timeout, serve_forever() embedded (with
and without signal handling), and the installed `pyivshmem-server` command itself."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import List

import pytest

from pyivshmem import Peer, Server
from pyivshmem.errors import ConfigError
from pyivshmem.peer import DISCONNECTED

from _procwait import signal_pending
from test_server import RawClient, _env, _wait_for, join

VECTORS = 64     # one join fills a good part of a socket buffer


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "ivshmem.sock")


def _crowd(path: str, server: Server, n: int) -> List[RawClient]:
    """n clients that read everything sent to them while they arrive."""
    clients: List[RawClient] = []
    for _ in range(n):
        c = RawClient(path)
        my_id = c.handshake()[0]
        c.my_id = my_id  # type: ignore[attr-defined]
        while join(c, VECTORS)[0] != my_id:
            c.drop_fds()
        c.drop_fds()
        for other in clients:
            assert join(other, VECTORS)[0] == my_id
            other.drop_fds()
        clients.append(c)
    return clients


def _read_to_eof(c: RawClient) -> List[tuple]:
    out = []
    try:
        while True:
            value, fd = c.recv()
            out.append((value, fd is not None))
            c.drop_fds()
    except (EOFError, ConnectionResetError):
        pass
    return out


@pytest.mark.timeout(120)
def test_close_waits_for_a_slow_reader_within_shutdown_timeout(sock_path):
    server = Server(sock_path, size="64K", vectors=VECTORS, shutdown_timeout=60).start()
    slow = RawClient(sock_path)
    crowd: List[RawClient] = []
    try:
        assert server.wait_until(lambda p: len(p) == 1, 10)
        crowd = _crowd(sock_path, server, 6)
        assert server.backlog(0) > 0          # its socket is full: the rest waits in the server
        closer = threading.Thread(target=server.close)
        closer.start()
        # the slow client reads only now: it still gets everything, then the final departures
        got = _read_to_eof(slow)
        closer.join(60)
        assert not closer.is_alive()
        assert got[:3] == [(0, False), (0, False), (-1, True)]   # version, id, memory
        told = {v for v, has_fd in got[3:] if has_fd} - {0}
        left = [v for v, has_fd in got[3:] if not has_fd]
        assert told and sorted(left) == sorted(told)
        everyone = {0} | {c.my_id for c in crowd}
        for c in crowd:
            departures = [v for v, has_fd in _read_to_eof(c) if not has_fd]
            assert sorted(departures) == sorted(everyone - {c.my_id})
    finally:
        server.close()
        slow.close()
        for c in crowd:
            c.close()


@pytest.mark.timeout(120)
def test_close_gives_up_on_a_client_that_does_not_read(sock_path):
    server = Server(sock_path, size="64K", vectors=VECTORS, shutdown_timeout=0.2).start()
    deaf = RawClient(sock_path)
    crowd: List[RawClient] = []
    try:
        assert server.wait_until(lambda p: len(p) == 1, 10)
        crowd = _crowd(sock_path, server, 6)
        assert server.backlog(0) > 0
        server.close()                          # returns although deaf never reads
        assert server.closed and not os.path.exists(sock_path)
        # what deaf reads afterwards is consistent: the joins its socket held, then EOF
        got = _read_to_eof(deaf)
        assert got[:3] == [(0, False), (0, False), (-1, True)]
        assert got[3:] and all(has_fd for _, has_fd in got[3:])
    finally:
        deaf.close()
        for c in crowd:
            c.close()


# ------------------------------------------------------------------------------------------
# serve_forever embedded
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_serve_forever_in_a_thread_until_stop(sock_path):
    server = Server(sock_path, size="64K", vectors=1)
    t = threading.Thread(target=server.serve_forever)
    t.start()
    try:
        _wait_for(lambda: server.running and os.path.exists(sock_path), what="server running")
        with pytest.raises(ConfigError):
            server.serve_forever()              # already running
        with Peer.connect(sock_path, vectors=1) as p:
            assert server.peers == (p.id,)
            server.stop()                       # from another thread: the loop ends
            t.join(30)
            assert not t.is_alive()
            deadline = time.monotonic() + 10
            while not any(e.kind == DISCONNECTED for e in p.events()):
                assert time.monotonic() < deadline
                p.wait(0.05)
        assert server.closed and not os.path.exists(sock_path)
    finally:
        server.close()
        t.join(30)


_SIGNALS = """
import os, signal, sys, threading
from pyivshmem import Peer, Server
before = signal.getsignal(signal.SIGTERM)
server = Server(sys.argv[1], size="64K", vectors=1)
def poke():
    while not server.running:           # serve_forever() sets it once listening
        threading.Event().wait(0.01)
    with Peer.connect(sys.argv[1], vectors=1):
        os.kill(os.getpid(), signal.SIGTERM)
        server.wait_until(lambda p: not p, 30)   # the shutdown dropped this peer
threading.Thread(target=poke, daemon=True).start()
server.serve_forever(handle_signals=True)    # returns on SIGTERM, after a clean shutdown
print("restored" if signal.getsignal(signal.SIGTERM) is before else "changed",
      "closed" if server.closed else "open", os.path.exists(sys.argv[1]))
"""


@pytest.mark.timeout(60)
def test_serve_forever_with_signals_stops_on_sigterm_and_restores_handlers(sock_path):
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_SIGNALS), sock_path],
                       capture_output=True, text=True, timeout=50, env=_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["restored", "closed", "False"]


# ------------------------------------------------------------------------------------------
# the installed command
# ------------------------------------------------------------------------------------------
def _installed(name: str) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(exe):
        exe = shutil.which(name) or ""
    if not exe:
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return exe


@pytest.mark.timeout(120)
def test_the_pyivshmem_server_command(sock_path):
    exe = _installed("pyivshmem-server")
    r = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=30, env=_env())
    assert r.returncode == 0 and "--keep-shm" in r.stdout
    r = subprocess.run([exe, "--no-such-flag"], capture_output=True, text=True, timeout=30,
                       env=_env())
    assert r.returncode == 2 and "usage:" in r.stderr
    name = f"pyivshmem-test-{uuid.uuid4().hex[:12]}"
    proc = subprocess.Popen([exe, "-F", "-S", sock_path, "-M", name, "-l", "64K", "-n", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env())
    try:
        _wait_for(lambda: os.path.exists(sock_path) or proc.poll() is not None, what="socket")
        assert proc.poll() is None, proc.stderr.read()
        with Peer.connect(sock_path, vectors=2) as a, Peer.connect(sock_path, vectors=2) as b:
            # b's join reaches a through the server, a moment after b connected
            _wait_for(lambda: a.events() is not None and b.id in a.peers, what="a to hear of b")
            a.notify(b.id, 1)
            assert b.wait(10) == [1]
            assert os.path.exists(f"/dev/shm/{name}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not os.path.exists(sock_path)
        assert not os.path.exists(f"/dev/shm/{name}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stderr.close()
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")


_WRITE_SYSCALL = {"x86_64": "1", "aarch64": "64"}


@pytest.mark.timeout(120)
def test_sigterm_while_the_log_write_blocks_stops_the_server(sock_path):
    """SIGTERM reaches `pyivshmem server -F -v` while it is blocked writing its log to a full
    stderr pipe. Python runs the handler inside that write; a handler that logged re-entered the
    stream (RuntimeError) and never asked the loop to stop, so the server ran on after the pipe
    was drained. It must stop, with status 0, once its log can be written again."""
    import fcntl
    import platform

    number = _WRITE_SYSCALL.get(platform.machine())
    if number is None:
        pytest.skip(f"the write system call's number on {platform.machine()} is not listed")
    name = f"pyivshmem-test-{uuid.uuid4().hex[:12]}"
    r, w = os.pipe()
    fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)  # fills after a few lines
    proc = subprocess.Popen([sys.executable, "-m", "pyivshmem", "server", "-F", "-v",
                             "-S", sock_path, "-M", name, "-l", "64K", "-n", "1"],
                            stdout=subprocess.DEVNULL, stderr=w, env=_env())
    os.close(w)
    drained = bytearray()
    try:
        _wait_for(lambda: os.path.exists(sock_path) or proc.poll() is not None, what="socket")
        assert proc.poll() is None, os.read(r, 65536)

        def blocked_in_write():
            try:
                with open(f"/proc/{proc.pid}/syscall") as f:
                    return f.read().split()[0] == number
            except (FileNotFoundError, ProcessLookupError, IndexError):
                return False

        deadline = time.monotonic() + 60
        while not blocked_in_write():  # each connection is logged until the pipe is full
            assert proc.poll() is None and time.monotonic() < deadline, "the log never blocked"
            try:
                RawClient(sock_path, timeout=5).sock.close()
            except OSError:
                pass  # the backlog is full while the server is blocked: it blocks, as wanted
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: not signal_pending(proc.pid, signal.SIGTERM), what="SIGTERM's delivery")

        def drain():
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    return
                drained.extend(chunk)

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("the server ran on after SIGTERM:\n"
                        + drained[-3000:].decode(errors="replace"))
        t.join(30)
        assert code == 0, drained[-3000:].decode(errors="replace")
        assert b"received SIGTERM, shutting down" in drained
        assert b"Logging error" not in drained
        assert not os.path.exists(sock_path)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        os.close(r)
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")


@pytest.mark.timeout(60)
def test_python_m_pyivshmem_server(sock_path):
    r = subprocess.run([sys.executable, "-m", "pyivshmem.server", "-h"], capture_output=True,
                       text=True, timeout=30, env=_env())
    assert r.returncode == 0 and r.stdout.startswith("usage: pyivshmem-server")
