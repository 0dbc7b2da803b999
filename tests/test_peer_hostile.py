"""Peer against hostile or broken servers: every malformed sequence gives a clear ProtocolError
(or PeerDisconnected for a server that just goes away), and no fd is leaked.

Each test measures this process's open fds (/proc/self/fd) before starting its fake server and
checks the count is back after the server is stopped."""
from __future__ import annotations

import os
import resource
import socket
import struct
import threading

import pytest
from test_peer import MiB, fake, fd_count, sock_dir  # noqa: F401 (fixtures)

from pyivshmem import PeerDisconnected, ProtocolError
from pyivshmem.doorbell import drain, ring
from pyivshmem.peer import Peer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def no_leak(fake):  # noqa: F811 (the fixture imported above)
    """Yields fake(); asserts at the end that every fd (ours and the fake server's) is closed."""
    base = fd_count()
    started = []

    def start(script, connections=1):
        srv = fake(script, connections)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()
    assert fd_count() == base, "file descriptors leaked"


def rejects(no_leak, script, match, *, timeout=10.0, exc=ProtocolError):
    srv = no_leak(script)
    with pytest.raises(exc, match=match) as info:
        Peer.connect(srv.path, timeout=timeout)
    return str(info.value)


# ------------------------------------------------------------------ the version message
def test_wrong_protocol_version(no_leak):
    msg = rejects(no_leak, lambda c: c.send(1), "expected protocol version 0")
    assert "version 1" in msg


def test_version_with_an_fd(no_leak):
    rejects(no_leak, lambda c: c.send(0, c.efd()), r"version 0 without an fd.*0 with an fd")


def test_garbage_bytes_as_version(no_leak):
    rejects(no_leak, lambda c: c.raw(b"\xde\xad\xbe\xef\x00\x11\x22\x33"),
            "expected protocol version 0")


def test_negative_version(no_leak):
    rejects(no_leak, lambda c: c.send(-1, c.memfd()), r"expected protocol version 0.*-1 with")


# ------------------------------------------------------------------ the id message
@pytest.mark.parametrize("bad", [65536, -1, -2, 2**62, -(2**63)])
def test_out_of_range_own_id(no_leak, bad):
    def script(c):
        c.send(0)
        c.send(bad)

    msg = rejects(no_leak, script, r"expected our peer id, 0\.\.65535")
    assert str(bad) in msg and "received before: version 0" in msg


def test_own_id_with_an_fd(no_leak):
    def script(c):
        c.send(0)
        c.send(4, c.efd())

    rejects(no_leak, script, "4 with an fd")


# ------------------------------------------------------------------ the memory message
def test_memory_without_fd(no_leak):
    def script(c):
        c.send(0)
        c.send(1)
        c.send(-1)

    rejects(no_leak, script, r"the shared memory: value -1 with a memory fd, received -1 without")


def test_memory_message_with_wrong_value(no_leak):
    def script(c):
        c.send(0)
        c.send(1)
        c.send(1, c.memfd())  # looks like a vector message, in the memory step

    rejects(no_leak, script, r"expected the shared memory.*received 1 with an fd")


@pytest.mark.parametrize("size", [3 * MiB, MiB + 4096, 4096 * 3])
def test_memory_not_power_of_two(no_leak, size):
    def script(c):
        c.send(0)
        c.send(1)
        c.send(-1, c.memfd(size))

    msg = rejects(no_leak, script, "not|power of two")
    assert f"{size} bytes" in msg and "power of two" in msg


def test_memory_of_size_zero(no_leak):
    def script(c):
        c.send(0)
        c.send(1)
        c.send(-1, c.memfd(0))

    rejects(no_leak, script, "0 bytes.*power of two")


@pytest.mark.parametrize("kind", ["efd", "pipe", "socket"])
def test_memory_fd_of_wrong_type(no_leak, kind):
    def script(c):
        c.send(0)
        c.send(1)
        if kind == "socket":
            fd = c.sock.fileno()  # send the connection itself
        else:
            fd = getattr(c, kind)()
        c.send(-1, fd)

    msg = rejects(no_leak, script, "as the shared memory; expected a regular file")
    assert {"efd": "an eventfd", "pipe": "pipe:", "socket": "socket:"}[kind] in msg


# ------------------------------------------------------------------ order
def test_memory_first(no_leak):
    rejects(no_leak, lambda c: c.send(-1, c.memfd()), "expected protocol version 0")


def test_id_after_memory(no_leak):
    def script(c):
        c.send(0)
        c.send(-1, c.memfd())

    rejects(no_leak, script, "expected our peer id")


def test_second_memory_message(no_leak):
    def script(c):
        c.send(0)
        c.send(2)
        c.send(-1, c.memfd())
        c.send(-1, c.memfd())

    rejects(no_leak, script, "a second shared memory message")


def test_own_id_without_fd_in_setup(no_leak):
    def script(c):
        c.send(0)
        c.send(2)
        c.send(-1, c.memfd())
        c.send(2)

    rejects(no_leak, script, "our own id without an fd")


def test_leave_of_unknown_peer_in_setup(no_leak):
    def script(c):
        c.send(0)
        c.send(2)
        c.send(-1, c.memfd())
        c.send(7)

    rejects(no_leak, script, "a disconnect of peer 7, which is not connected")


@pytest.mark.parametrize("bad", [65536, -2, 2**40])
def test_out_of_range_peer_id_in_setup(no_leak, bad):
    def script(c):
        c.send(0)
        c.send(2)
        c.send(-1, c.memfd())
        c.send(bad, c.efd())

    rejects(no_leak, script, r"expected a peer id in 0\.\.65535")


# ------------------------------------------------------------------ vector fds
@pytest.mark.parametrize("kind", ["memfd", "pipe", "socket"])
@pytest.mark.parametrize("whose", ["own", "other"])
def test_vector_fd_of_wrong_type(no_leak, kind, whose):
    def script(c):
        c.send(0)
        c.send(2)
        c.send(-1, c.memfd())
        fd = c.sock.fileno() if kind == "socket" else getattr(c, kind)()
        c.send(2 if whose == "own" else 1, fd)

    peer = 2 if whose == "own" else 1
    msg = rejects(no_leak, script, f"expected an eventfd for a vector of peer {peer}, got")
    assert {"memfd": "memfd:", "pipe": "pipe:", "socket": "socket:"}[kind] in msg


@pytest.mark.parametrize("whose", ["own", "other"])
def test_more_than_64_vectors(no_leak, whose):
    def script(c):
        c.send(0)
        c.send(2)
        c.send(-1, c.memfd())
        for _ in range(65):
            c.send(2 if whose == "own" else 1, c.efd())

    rejects(no_leak, script, "more than 64 vectors")


# ------------------------------------------------------------------ fd floods
@pytest.mark.parametrize("n", [2, 10, 253])
def test_many_fds_in_one_message(no_leak, n):
    def script(c):
        c.send(0, *[c.efd() for _ in range(n)])

    msg = rejects(no_leak, script, f"carried {n} fds")
    assert "all were closed" in msg


def test_fd_flood_on_memory_message(no_leak):
    def script(c):
        c.send(0)
        c.send(1)
        c.send(-1, c.memfd(), *[c.efd() for _ in range(100)])

    rejects(no_leak, script, "carried 101 fds")


def test_fd_on_the_second_half_of_a_split_message(no_leak):
    def script(c):
        c.send(0)
        c.raw(struct.pack("<q", 1)[:4])
        c.flushed()  # the client has the first half: the fd now comes with the continuation
        c.raw(struct.pack("<q", 1)[4:], c.efd())

    rejects(no_leak, script, "an fd arrived in the middle of the 8-byte message")


def test_truncated_control_data_closes_what_arrived(no_leak):
    """Out of fds (RLIMIT_NOFILE): the kernel installs what it can and flags MSG_CTRUNC; the
    ones installed are closed and the message rejected."""
    go = threading.Event()
    ready = threading.Event()

    def script(c):
        fds = [c.efd() for _ in range(20)]
        ready.set()  # the server thread (this process) needs no new fd from here on
        assert go.wait(20), "the test never released the fake server's script"
        c.send(0, *fds)

    srv = no_leak(script)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(srv.path)
        p = Peer()
        p._sock = s
        p._path = srv.path
        assert ready.wait(20)
        # a limit that leaves exactly 3 free fd numbers (fds take the lowest free numbers)
        open_fds = {int(x) for x in os.listdir("/proc/self/fd")}
        limit, free = 0, 0
        while free < 3:
            free += limit not in open_fds
            limit += 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            go.set()
            with pytest.raises(ProtocolError, match="control data was truncated") as info:
                p._recv(None, "the protocol version", [])
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert "fds arrived and were closed" in str(info.value)
        p._sock = None
        p.close()
    finally:
        s.close()


@pytest.mark.timeout(120)
def test_many_peers_flood_is_accepted_and_fully_released(no_leak):
    """500 peers announced one message each is legal; all their fds go when they leave."""
    go = threading.Event()
    n = 500

    def script(c):
        c.send(0)
        c.send(n)
        c.send(-1, c.memfd())
        for pid in range(n):
            c.send(pid, c.efd())
        c.send(n, c.efd())
        assert go.wait(20), "the test never released the fake server's script"
        for pid in range(n):
            c.send(pid)

    srv = no_leak(script)
    with Peer.connect(srv.path) as p:
        assert len(p.peers) == n
        with_peers = fd_count()
        go.set()
        left = []
        while len(left) < n:
            p.wait(0.1)
            left += [e.peer for e in p.events()]
        assert sorted(left) == list(range(n))
        assert p.peers == {}
        assert fd_count() == with_peers - n


# ------------------------------------------------------------------ EOF and timeouts
@pytest.mark.parametrize("sent", [0, 1, 2, 3])
def test_eof_mid_setup(no_leak, sent):
    def script(c):
        steps = [lambda: c.send(0), lambda: c.send(1), lambda: c.send(-1, c.memfd())]
        for step in steps[:sent]:
            step()
        c.sock.shutdown(socket.SHUT_RDWR)
        c.sock.close()

    msg = rejects(no_leak, script, "set-up incomplete: .* closed the connection")
    if sent:
        assert "received so far: version 0" in msg


def test_eof_in_the_middle_of_a_message(no_leak):
    def script(c):
        c.send(0)
        c.raw(b"\x01\x00\x00")
        c.sock.shutdown(socket.SHUT_RDWR)
        c.sock.close()

    rejects(no_leak, script, r"in the middle of a message \(3 of 8 bytes\)")


def test_timeout_during_setup(no_leak):
    def script(c):
        c.send(0)
        c.send(1)
        # then nothing: the memory never comes

    msg = rejects(no_leak, script, "set-up timed out after 0.3 s", timeout=0.3)
    assert "the shared memory" in msg and "received so far: version 0, id 1" in msg


def test_timeout_in_the_middle_of_a_message(no_leak):
    def script(c):
        c.send(0)
        c.raw(b"\x01\x00")

    rejects(no_leak, script, r"only 2 of its 8 bytes arrived", timeout=0.3)


def test_timeout_waiting_for_own_vectors(no_leak):
    def script(c):
        c.send(0)
        c.send(1)
        c.send(-1, c.memfd())
        c.send(0, c.efd())  # another peer, but never our own vectors

    rejects(no_leak, script, r"set-up timed out.*vectors of .*ours", timeout=0.3)


# ------------------------------------------------------------------ after set-up
def _connected_then(no_leak, after):
    """A good set-up (me: 2, peer 1 with 1 vector), then ``after(conn)`` once released."""
    go = threading.Event()
    table = {}
    srv = None

    def script(c):
        table.update(c.setup(2, others=[1]))
        assert go.wait(20), "the test never released the fake server's script"
        after(c)
        srv.stop_event.wait(20)  # keep the server's fds open until the test ends

    srv = no_leak(script)
    return srv, go, table


@pytest.mark.parametrize(
    "after, match",
    [
        (lambda c: c.send(-1, c.memfd()), "a second shared memory message"),
        (lambda c: c.send(70000), r"expected a peer id in 0\.\.65535"),
        (lambda c: c.send(-7), r"expected a peer id"),
        (lambda c: c.send(3), "a disconnect of peer 3, which is not connected"),
        (lambda c: c.send(2), "our own id without an fd"),
        (lambda c: c.send(4, c.pipe()), "expected an eventfd"),
        (lambda c: c.send(4, c.efd(), c.efd()), "carried 2 fds"),
        (lambda c: [c.send(1, c.efd()) for _ in range(64)], "more than 64 vectors for peer 1"),
    ],
)
def test_violation_after_setup(no_leak, after, match):
    srv, go, table = _connected_then(no_leak, after)
    with Peer.connect(srv.path) as p:
        go.set()
        with pytest.raises(ProtocolError, match=match):
            while True:
                p.wait(0.1)
                p.events()
        # the server connection is dropped; the doorbells of known peers keep working
        assert not p.connected
        with pytest.raises(PeerDisconnected, match="protocol error"):
            p.events()
        p.notify(1)
        assert drain(table[1][0]) == 1
        ring(table[2][0])
        assert p.wait(5) == [0]


def test_violation_seen_by_wait_raises_there(no_leak):
    srv, go, _ = _connected_then(no_leak, lambda c: c.send(-1, c.memfd()))
    with Peer.connect(srv.path) as p:
        go.set()
        with pytest.raises(ProtocolError, match="a second shared memory message"):
            p.wait(20)


def test_server_eof_after_setup_is_an_event(no_leak):
    def after(c):
        c.sock.shutdown(socket.SHUT_RDWR)

    srv, go, _ = _connected_then(no_leak, after)
    with Peer.connect(srv.path) as p:
        go.set()
        assert p.wait(0.5) == []  # the EOF wakes wait() but is not a vector
        events = []
        while not events:
            events = p.events()
        assert [e.kind for e in events] == ["disconnected"]
        with pytest.raises(PeerDisconnected, match="closed the connection"):
            p.events()
        assert p.wait(0) == []  # the dead socket no longer wakes anything
