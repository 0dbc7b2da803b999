"""`pyivshmem client` facing a server that breaks the protocol after set-up: it reports what the
server did and leaves with status 1, like a disconnect, instead of dying with a traceback."""
from __future__ import annotations

import array
import io
import os
import socket
import threading

import pytest

from pyivshmem import client


class _Out(io.StringIO):
    """Standard output of the client, with an event set once it has said it is connected."""

    def __init__(self) -> None:
        super().__init__()
        self.connected = threading.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        if "connected to" in self.getvalue():
            self.connected.set()
        return n


def _send(conn: socket.socket, value: int, fd=None) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
    conn.sendmsg([value.to_bytes(8, "little", signed=True)], anc)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("violation", ["unknown departure", "second memory", "own departure"])
def test_client_reports_a_protocol_violation_after_set_up(tmp_path, capsys, violation):
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    out = _Out()
    mem = os.memfd_create("fake")
    os.ftruncate(mem, 1 << 16)
    bell = os.eventfd(0)
    stdin_r, stdin_w = os.pipe()       # stdin stays open and silent
    failures = []

    def fake_server() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                _send(conn, 0)
                _send(conn, 5)
                _send(conn, -1, mem)
                _send(conn, 5, bell)
                assert out.connected.wait(30), "the client never said it was connected"
                if violation == "unknown departure":
                    _send(conn, 77)
                elif violation == "second memory":
                    _send(conn, -1, mem)
                else:
                    _send(conn, 5)
                conn.recv(1)   # until the client leaves
        except Exception as exc:  # pragma: no cover - shown by the assertion below
            failures.append(exc)

    t = threading.Thread(target=fake_server, daemon=True)
    t.start()
    try:
        status = client.main(["-S", path], stdin_fd=stdin_r, out=out)
    finally:
        os.close(stdin_w)
        os.close(stdin_r)
        t.join(30)
        for fd in (mem, bell):
            os.close(fd)
        listener.close()
    assert not failures, failures
    assert status == 1
    err = capsys.readouterr().err
    assert "pyivshmem client:" in err and "ivshmem server at" in err, err
    assert "Traceback" not in err


@pytest.mark.timeout(60)
def test_default_connect_to_a_server_without_vectors_says_to_pass_vectors_0(tmp_path):
    from pyivshmem import Peer
    from pyivshmem.errors import ProtocolError
    from pyivshmem.server import Server

    with Server(str(tmp_path / "s.sock"), size="64K", vectors=0) as server:
        with pytest.raises(ProtocolError, match="connect with vectors=0"):
            Peer.connect(server.socket_path, timeout=0.5)
        with Peer.connect(server.socket_path, timeout=30, vectors=0) as peer:   # the remedy
            assert peer.vectors == 0


@pytest.mark.timeout(60)
def test_an_infinite_timeout_means_wait_forever_for_connect_and_wait(tmp_path):
    """timeout=float('inf') is 'forever' for the rings; Peer.connect() and Peer.wait() died of
    OverflowError with it (an infinite deadline has no millisecond count)."""
    from pyivshmem import Peer
    from pyivshmem.server import Server

    inf = float("inf")
    with Server(str(tmp_path / "s.sock"), size="64K") as server:
        with Peer.connect(server.socket_path, timeout=inf) as a, \
                Peer.connect(server.socket_path, timeout=30) as b:
            b.notify(a.id, 0)                  # rung before the wait: it returns at once
            assert a.wait(timeout=inf) == [0]


def test_client_accepts_an_infinite_set_up_timeout(tmp_path, capsys):
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        status = client.main(["-S", str(tmp_path / "nobody.sock"), "-t", "inf"],
                             stdin_fd=null, out=io.StringIO())
    finally:
        os.close(null)
    assert status == 1                         # nothing listens there: said, not a traceback
    assert "cannot connect" in capsys.readouterr().err
