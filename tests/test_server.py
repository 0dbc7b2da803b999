"""The ivshmem server: protocol order and values (seen by raw sockets), embedding, CLI, QEMU.

The tests speak the protocol with plain socket.recvmsg so they check the server alone.
"""
from __future__ import annotations

import array
import errno
import gc
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import pytest

from pyivshmem.errors import ClosedError, ConfigError
from pyivshmem.server import (
    DEFAULT_PIDFILE,
    DEFAULT_SHM_NAME,
    DEFAULT_SIZE,
    DEFAULT_SOCKET,
    _REGION_MAGIC,
    Server,
    parse_qemu_size,
    round_up_pow2,
)

RECV_TIMEOUT = 20.0


# ------------------------------------------------------------------------------------------
# a raw protocol client
# ------------------------------------------------------------------------------------------
class RawClient:
    """Reads the server protocol one 8-byte message at a time, like QEMU does."""

    def __init__(self, path: str, timeout: float = RECV_TIMEOUT):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.fds: List[int] = []

    def recv(self) -> Tuple[int, Optional[int]]:
        """One message: (value, fd or None). Fails on EOF, a surplus fd or a short message."""
        data = b""
        fds: List[int] = []
        while len(data) < 8:
            msg, anc, flags, _ = self.sock.recvmsg(
                8 - len(data), socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC
            )
            assert not flags & socket.MSG_CTRUNC, "control data truncated"
            for level, kind, payload in anc:
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                a = array.array("i")
                a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
                fds.extend(a)
            if not msg:
                for fd in fds:
                    os.close(fd)
                raise EOFError("server closed the connection")
            data += msg
        self.fds.extend(fds)
        assert len(fds) <= 1, f"more than one fd in one message: {fds}"
        return int.from_bytes(data, "little", signed=True), (fds[0] if fds else None)

    def recv_nofd(self) -> int:
        value, fd = self.recv()
        assert fd is None, f"unexpected fd with value {value}"
        return value

    def recv_fd(self) -> Tuple[int, int]:
        value, fd = self.recv()
        assert fd is not None, f"expected an fd with value {value}"
        return value, fd

    def handshake(self) -> Tuple[int, int]:
        """Steps 1-3: version, id, memory fd. Returns (id, memory fd)."""
        assert self.recv_nofd() == 0, "protocol version must be 0"
        my_id = self.recv_nofd()
        assert 0 <= my_id <= 0xFFFF
        value, shm = self.recv_fd()
        assert value == -1
        return my_id, shm

    def expect_eof(self) -> None:
        """Everything left, then the end (a reset if the client left data unread)."""
        with pytest.raises((EOFError, ConnectionResetError)):
            while True:
                self.recv()

    def drop_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def close(self) -> None:
        self.drop_fds()
        self.sock.close()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def join(client: RawClient, vectors: int) -> Tuple[int, List[int]]:
    """Read one join announcement: `vectors` messages with the same id, each with an fd."""
    first, fd = client.recv_fd()
    fds = [fd]
    for _ in range(vectors - 1):
        value, fd = client.recv_fd()
        assert value == first
        fds.append(fd)
    return first, fds


def is_eventfd(fd: int) -> bool:
    return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"


def same_eventfd(a: int, b: int) -> bool:
    """True if fds a and b are the same eventfd: a write on one is read on the other."""
    os.write(a, (7).to_bytes(8, "little"))
    try:
        return int.from_bytes(os.read(b, 8), "little") == 7
    except BlockingIOError:
        os.read(a, 8)
        return False


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "ivshmem.sock")


@pytest.fixture(autouse=True)
def _nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield


# ------------------------------------------------------------------------------------------
# the C send side
# ------------------------------------------------------------------------------------------
def test_c_send_msg_full_socket_and_errors():
    from pyivshmem._ffi_server import ffi, lib

    a, b = socket.socketpair()
    done = ffi.new("unsigned *")
    try:
        a.setblocking(False)
        sent = 0
        while True:
            done[0] = 0
            rc = lib.ivshm_server_send_msg(a.fileno(), sent, -1, done)
            if rc == -errno.EAGAIN:
                assert done[0] == 0
                break
            assert rc == 0 and done[0] == 8
            sent += 1
        assert sent > 0
        got = b.recv(8 * sent, socket.MSG_WAITALL)
        assert [int.from_bytes(got[i:i + 8], "little", signed=True) for i in range(0, len(got), 8)] \
            == list(range(sent))
        # a resumed message: only the rest is sent, without the fd
        done[0] = 5
        assert lib.ivshm_server_send_msg(a.fileno(), -2, -1, done) == 0
        assert b.recv(3) == (-2).to_bytes(8, "little", signed=True)[5:]
        done[0] = 8
        assert lib.ivshm_server_send_msg(a.fileno(), 1, -1, done) == -errno.EINVAL
        done[0] = 0
        assert lib.ivshm_server_send_msg(-1, 1, -1, done) == -errno.EINVAL
        b.close()
        assert lib.ivshm_server_send_msg(a.fileno(), 1, -1, done) == -errno.EPIPE
    finally:
        a.close()
        b.close()
    efd = ffi.new("int *")
    assert lib.ivshm_server_eventfd(efd) == 0
    try:
        assert is_eventfd(efd[0])
        flags = os.get_blocking(efd[0])
        assert flags is False
    finally:
        os.close(efd[0])


# ------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [("4M", 4 << 20), ("4m", 4 << 20), ("1024", 1024), ("1k", 1024), ("3G", 3 << 30),
     ("1.5M", 3 << 19), ("2T", 2 << 40), ("10B", 10), (65536, 65536)],
)
def test_parse_qemu_size(text, expected):
    assert parse_qemu_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1", "0", "4Q", "1.5", "M", True])
def test_parse_qemu_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_qemu_size(text)


def test_round_up_pow2():
    assert [round_up_pow2(n) for n in (1, 2, 3, 4, 5, 1000, 1024, 3 << 20)] == \
        [1, 2, 4, 4, 8, 1024, 1024, 4 << 20]


# ------------------------------------------------------------------------------------------
# protocol order and values
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("vectors", [1, 4])
def test_message_order_three_clients(sock_path, vectors):
    with Server(sock_path, size="1M", vectors=vectors) as server:
        assert server.socket_path == sock_path
        assert server.size == 1 << 20
        c0 = RawClient(sock_path)
        id0, shm0 = c0.handshake()
        assert id0 == 0
        assert os.fstat(shm0).st_size == 1 << 20
        self0, fds0 = join(c0, vectors)   # step 6: its own vectors
        assert self0 == id0 and all(is_eventfd(fd) for fd in fds0)

        c1 = RawClient(sock_path)
        id1, shm1 = c1.handshake()
        assert id1 == 1
        assert os.fstat(shm1).st_ino == os.fstat(shm0).st_ino   # the same memory
        other, fds_0_seen_by_1 = join(c1, vectors)      # step 5: existing peer 0
        assert other == id0
        own, fds1 = join(c1, vectors)                   # step 6: itself
        assert own == id1
        announced, fds_1_seen_by_0 = join(c0, vectors)  # step 4: 0 learns of 1
        assert announced == id1
        for a, b in zip(fds0, fds_0_seen_by_1):
            assert same_eventfd(a, b)
        for a, b in zip(fds1, fds_1_seen_by_0):
            assert same_eventfd(a, b)
        # distinct vectors are distinct eventfds
        if vectors > 1:
            assert not same_eventfd(fds1[0], fds_1_seen_by_0[1])

        c2 = RawClient(sock_path)
        id2, _ = c2.handshake()
        assert id2 == 2
        assert [join(c2, vectors)[0] for _ in range(3)] == [id0, id1, id2]   # connection order
        assert join(c0, vectors)[0] == id2
        assert join(c1, vectors)[0] == id2
        assert server.wait_until(lambda p: p == (0, 1, 2), 10)
        assert server.peers == (0, 1, 2)

        # leave: id without fd to every other peer
        c1.close()
        assert c0.recv_nofd() == id1
        assert c2.recv_nofd() == id1
        assert server.wait_until(lambda p: p == (0, 2), 10)

        # ids keep increasing, never reusing 1 yet
        c3 = RawClient(sock_path)
        id3, _ = c3.handshake()
        assert id3 == 3
        assert [join(c3, vectors)[0] for _ in range(3)] == [id0, id2, id3]
        for c in (c0, c2):
            assert join(c, vectors)[0] == id3
        for c in (c0, c2, c3):
            c.close()
        assert server.wait_until(lambda p: p == (), 10)


@pytest.mark.timeout(60)
def test_zero_vectors(sock_path):
    with Server(sock_path, size=4096, vectors=0) as server:
        with RawClient(sock_path) as c0, RawClient(sock_path) as c1:
            assert c0.handshake()[0] == 0
            assert c1.handshake()[0] == 1
            assert server.wait_until(lambda p: len(p) == 2, 10)
            c1.close()
            assert c0.recv_nofd() == 1


@pytest.mark.timeout(60)
def test_peer_id_wraps_and_skips_ids_in_use(sock_path):
    with Server(sock_path, size=4096) as server:
        keep = RawClient(sock_path)
        assert keep.handshake()[0] == 0
        server._next_id = 0xFFFF  # white-box: jump to the end of the 16-bit range
        last = RawClient(sock_path)
        assert last.handshake()[0] == 0xFFFF
        wrapped = RawClient(sock_path)
        assert wrapped.handshake()[0] == 1      # 0 is in use: skipped
        for c in (keep, last, wrapped):
            c.close()


@pytest.mark.timeout(60)
def test_sizes_above_1g(tmp_path, sock_path):
    with Server(sock_path, size="2G", memfd=True) as server:
        assert server.size == 2 << 30
        with RawClient(sock_path) as c:
            _, shm = c.handshake()
            assert os.fstat(shm).st_size == 2 << 30
    path = tmp_path / "mem"
    with Server(sock_path, size="3G", shm_path=path) as server:   # rounded up to 4G, sparse
        assert server.size == 4 << 30
        with RawClient(sock_path) as c:
            _, shm = c.handshake()
            assert os.fstat(shm).st_size == 4 << 30
    assert path.stat().st_size == 4 << 30      # never unlinked
    assert path.stat().st_blocks == 0


@pytest.mark.timeout(60)
def test_memory_kinds(tmp_path, sock_path, shm_name):
    # POSIX shm name: created 0600; kept after close with keep_shm, reused at the same size
    with Server(sock_path, shm_name=shm_name, size="64K", keep_shm=True) as server:
        with RawClient(sock_path) as c:
            _, shm = c.handshake()
            assert os.fstat(shm).st_ino == os.stat(f"/dev/shm/{shm_name}").st_ino
    st = os.stat(f"/dev/shm/{shm_name}")
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 65536
    with open(f"/dev/shm/{shm_name}", "r+b") as f:
        f.write(b"kept")
    with Server(sock_path, shm_name=shm_name, size="64K", keep_shm=True):
        pass
    with open(f"/dev/shm/{shm_name}", "rb") as f:
        assert f.read(4) == b"kept"
    # by default the name is unlinked when the server closes, like QEMU's server does, even
    # for an object that existed before
    with Server(sock_path, shm_name=shm_name, size="64K"):
        assert os.path.exists(f"/dev/shm/{shm_name}")
    assert not os.path.exists(f"/dev/shm/{shm_name}")
    # a directory: an unlinked temporary file
    d = tmp_path / "dir"
    d.mkdir()
    with Server(sock_path, shm_dir=d, size="64K") as server:
        assert os.listdir(d) == []
        with RawClient(sock_path) as c:
            _, shm = c.handshake()
            assert os.fstat(shm).st_nlink == 0 and os.fstat(shm).st_size == 65536
    # the caller's fd (dup'ed) and the server's fd for embedding
    fd = os.memfd_create("mine")
    try:
        with Server(sock_path, shm_fd=fd, size="128K") as server:
            assert os.fstat(server.shm_fd).st_ino == os.fstat(fd).st_ino
            assert server.shm_fd != fd
        assert os.fstat(fd).st_size == 128 << 10       # still open
    finally:
        os.close(fd)
    with pytest.raises(ConfigError):
        Server(sock_path, shm_name="a", memfd=True)
    with pytest.raises(ConfigError):
        Server(sock_path, shm_name="../etc/passwd")


# ------------------------------------------------------------------------------------------
# slow clients
# ------------------------------------------------------------------------------------------
def read_coalesced_view(client: RawClient, vectors: int, my_id: int, server: Server,
                        timeout: float = 30.0) -> Tuple[List[int], List[int]]:
    """Read what a client that did not read for a while is told, checking it is a consistent
    view: every peer it is told of joins with `vectors` fds in a row and leaves once, after
    joining. Reads until every peer it heard of has left again and the server has nothing more
    for it.
    Returns (ids in join order, ids in leave order)."""
    joined: List[int] = []
    left: List[int] = []
    known: Dict[int, int] = {}
    last = None
    deadline = time.monotonic() + timeout
    while True:
        if not known and server.backlog(my_id) == 0:
            client.sock.setblocking(False)
            try:
                client.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return joined, left
            finally:
                client.sock.settimeout(RECV_TIMEOUT)
        assert time.monotonic() < deadline, f"still waiting: known {known}"
        value, fd = client.recv()
        if fd is not None:
            assert is_eventfd(fd)
            if value == last and value in known:
                known[value] += 1
                assert known[value] <= vectors, f"peer {value}: more than {vectors} fds"
            else:
                assert value not in known, f"peer {value} joined twice"
                known[value] = 1
                joined.append(value)
        else:
            assert value in known, f"departure of {value}, which it was never told of"
            assert known[value] == vectors, f"peer {value} left after {known[value]} vectors"
            del known[value]
            left.append(value)
        last = value
        client.drop_fds()


@pytest.mark.timeout(240)
def test_slow_client_gets_a_coalesced_view_and_costs_no_fds(sock_path):
    """A client that does not read while 200 peers come and go: the server keeps no fd of a
    departed peer for it, and when it reads it is told a consistent story (peers whose joins
    were already in its socket join and leave; the others it is never told of)."""
    vectors = 4
    n_others = 200
    with Server(sock_path, size=4096, vectors=vectors) as server:
        slow = RawClient(sock_path)
        assert server.wait_until(lambda p: len(p) == 1, 10)
        others = []
        try:
            for i in range(n_others):
                c = RawClient(sock_path)
                others.append(c)
                # a well-behaved peer reads its start-up messages
                assert c.handshake()[0] == i + 1
                for expected in [0] + list(range(1, i + 2)):
                    assert join(c, vectors)[0] == expected
                c.drop_fds()
            assert server.wait_until(lambda p: len(p) == n_others + 1, 30)
            before = open_fd_count()
            for c in others:
                c.close()
            assert server.wait_until(lambda p: p == (0,), 30)
            # no fd of a departed peer is held for the slow client: 5 fds per departed peer
            # (4 eventfds and its socket, 1 here) are gone, nothing else stays
            deadline = time.monotonic() + 30
            while open_fd_count() != before - (vectors + 2) * n_others:
                assert time.monotonic() < deadline, (open_fd_count(), before)
                time.sleep(0.01)
            assert server.stats["dropped_overflow"] == 0
            assert server.stats["coalesced"] > 0
            # now the slow client reads
            assert slow.handshake()[0] == 0
            assert join(slow, vectors)[0] == 0
            joined, left = read_coalesced_view(slow, vectors, 0, server)
            assert joined == sorted(joined) and set(joined) <= set(range(1, n_others + 1))
            assert sorted(left) == joined
            assert len(joined) < n_others         # the rest came and went unannounced
            # a new peer is announced as usual
            with RawClient(sock_path) as late:
                late_id = late.handshake()[0]
            assert join(slow, vectors)[0] == late_id
            assert slow.recv_nofd() == late_id
        finally:
            slow.close()
            for c in others:
                c.close()


@pytest.mark.timeout(240)
def test_client_beyond_queue_bound_is_dropped(sock_path):
    """Coalescing bounds what a client that does not read costs by the live peers' joins; when
    that still exceeds max_queue the client is disconnected, its departure announced, and the
    readers carry on."""
    vectors = 4
    with Server(sock_path, size=4096, vectors=vectors, max_queue=50) as server:
        watcher = RawClient(sock_path)
        watcher.handshake()
        join(watcher, vectors)
        slow = RawClient(sock_path)
        assert join(watcher, vectors)[0] == 1
        readers = [watcher]
        seen_leaves: List[int] = []

        def read_until_join(c: RawClient, new_id: int) -> None:
            while True:
                value, fd = c.recv()
                if fd is None:
                    seen_leaves.append(value) if c is watcher else None
                    continue
                for _ in range(vectors - 1):
                    assert c.recv_fd()[0] == value
                c.drop_fds()
                if value == new_id:
                    return

        try:
            for _ in range(400):
                c = RawClient(sock_path)
                my_id = c.handshake()[0]
                read_until_join(c, my_id)
                for r in readers:
                    read_until_join(r, my_id)
                readers.append(c)
                if 1 in seen_leaves:
                    break        # the slow one was dropped and its departure announced
            else:
                pytest.fail("the slow client was never dropped")
            assert 1 not in server.peers
            assert server.stats["dropped_overflow"] == 1
            assert seen_leaves == [1]
            # it gets what its socket buffer held, in order, then EOF: nothing out of order
            assert slow.handshake()[0] == 1
            assert join(slow, vectors)[0] == 0
            assert join(slow, vectors)[0] == 1
            last = 1
            with pytest.raises(EOFError):
                while True:
                    value, fd = slow.recv()
                    assert value >= last and fd is not None
                    last = value
                    slow.drop_fds()
            # the readers are still served
            with RawClient(sock_path) as c:
                new_id = c.handshake()[0]
                for r in readers:
                    assert join(r, vectors)[0] == new_id
        finally:
            slow.close()
            for r in readers:
                r.close()


# ------------------------------------------------------------------------------------------
# many peers
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_300_peers_each_announced_to_all(sock_path, fd_limit):
    n = 300
    fd_limit(4 * n + 200)  # raised as root (CI), instead of skipping on a low hard limit
    with Server(sock_path, size=4096, vectors=1) as server:
        clients: List[RawClient] = []
        known: List[set] = []
        try:
            for i in range(n):
                c = RawClient(sock_path)
                clients.append(c)
                assert c.handshake()[0] == i
                seen = set()
                for _ in range(i + 1):
                    seen.add(join(c, 1)[0])
                c.drop_fds()
                assert seen == set(range(i + 1))
                known.append(seen)
                if i % 20 == 19 or i == n - 1:
                    # drain the announcements pending for the earlier clients
                    for j in range(i):
                        while len(known[j]) < i + 1:
                            known[j].add(join(clients[j], 1)[0])
                        clients[j].drop_fds()
            assert server.wait_until(lambda p: len(p) == n, 30)
            for j in range(n):
                assert known[j] == set(range(n))
            # a last departure reaches all 299 others
            clients[0].close()
            for c in clients[1:]:
                assert c.recv_nofd() == 0
        finally:
            for c in clients:
                c.close()


# ------------------------------------------------------------------------------------------
# embedding
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_lifecycle(sock_path):
    server = Server(sock_path, size="4K")
    assert not server.running and not server.closed
    server.start()
    assert server.running
    assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    c = RawClient(sock_path)
    c.handshake()
    server.stop()
    server.stop()            # idempotent
    server.close()
    assert server.closed and not server.running
    assert not os.path.exists(sock_path)
    c.expect_eof()
    c.close()
    with pytest.raises(ClosedError):
        server.start()
    with pytest.raises(ClosedError):
        server.shm_fd


@pytest.mark.timeout(60)
def test_shutdown_announces_every_departure_to_everyone(sock_path):
    server = Server(sock_path, size="4K").start()
    clients = [RawClient(sock_path) for _ in range(3)]
    for i, c in enumerate(clients):
        assert c.handshake()[0] == i
    assert server.wait_until(lambda p: len(p) == 3, 10)
    for c in clients:
        for _ in range(3):
            join(c, 1)
    server.close()
    for i, c in enumerate(clients):
        assert sorted(c.recv_nofd() for _ in range(2)) == [j for j in range(3) if j != i]
        c.expect_eof()
        c.close()


@pytest.mark.timeout(60)
def test_forgotten_server_warns(sock_path):
    server = Server(sock_path, size="4K")
    server.listen()
    with pytest.warns(ResourceWarning):
        del server
        gc.collect()
    assert not os.path.exists(sock_path)


@pytest.mark.timeout(60)
def test_permissions_and_symlinks(tmp_path):
    path = str(tmp_path / "s.sock")
    mem = tmp_path / "mem"
    with Server(path, shm_path=mem, size="4K", mode=0o660):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        assert stat.S_IMODE(mem.stat().st_mode) == 0o660
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        Server(path, shm_path=link, size="4K").listen()
    with pytest.raises(ConfigError, match="symbolic link"):
        Server(str(link), size="4K").listen()
    assert target.read_bytes() == b"precious" and link.is_symlink()


@pytest.mark.timeout(60)
def test_stale_socket_replaced_live_refused(sock_path, tmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()        # a socket file nobody listens on
    with Server(sock_path, size="4K") as server:
        with RawClient(sock_path) as c:
            assert c.handshake()[0] == 0
        # a second server on the same path is refused, the first keeps serving
        with pytest.raises(ConfigError, match="in use"):
            Server(sock_path, size="4K").listen()
        assert os.path.exists(sock_path)
        with RawClient(sock_path) as c:
            c.handshake()
        assert server.running
    # something that is not a socket is never removed
    plain = tmp_path / "plain"
    plain.write_text("data")
    with pytest.raises(ConfigError, match="not a socket"):
        Server(str(plain), size="4K").listen()
    assert plain.read_text() == "data"


@pytest.mark.timeout(60)
def test_socket_path_appears_only_once_the_server_listens(sock_path, monkeypatch):
    # bind() creates the socket file before listen() makes it accept connections: a client that
    # waits for the path and connects in between got "Connection refused" from a starting server
    seen = []
    real_listen = socket.socket.listen

    def listen(self, *a):
        seen.append(os.path.exists(sock_path))
        return real_listen(self, *a)

    monkeypatch.setattr(socket.socket, "listen", listen)
    with Server(sock_path, size="4K") as server:
        monkeypatch.undo()
        assert seen == [False], "the socket path existed before the server listened"
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        assert [n for n in os.listdir(os.path.dirname(sock_path)) if n.startswith(".")] == []
        with RawClient(sock_path) as c:
            assert c.handshake()[0] == 0
        assert server.running
    assert not os.path.exists(sock_path)


@pytest.mark.timeout(60)
def test_stale_socket_replaced_meanwhile_by_a_live_one_is_not_removed(sock_path, monkeypatch):
    # two servers starting on one stale path: the one that probed the stale file must not unlink
    # the live socket the other has put there since (it would run on, unreachable)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()
    live = socket.socket(socket.AF_UNIX)
    real_connect = socket.socket.connect

    def connect(self, address):
        try:
            return real_connect(self, address)
        except ConnectionRefusedError:
            if address == sock_path and live.fileno() >= 0 and not live.getsockname():
                os.unlink(sock_path)  # the other server: clears the stale file, binds, listens
                live.bind(sock_path)
                live.listen(1)
            raise

    monkeypatch.setattr(socket.socket, "connect", connect)
    try:
        with pytest.raises(ConfigError, match="appeared while the server was starting"):
            Server(sock_path, size="4K").listen()
        monkeypatch.undo()
        assert os.path.exists(sock_path)
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(sock_path)  # the live one is still there and reachable
        probe.close()
    finally:
        live.close()


def test_bad_arguments(sock_path):
    with pytest.raises(ConfigError):
        Server(sock_path, vectors=65)
    with pytest.raises(ConfigError):
        Server(sock_path, vectors=-1)
    with pytest.raises(ConfigError):
        Server(sock_path, size="lots")
    with pytest.raises(ConfigError):
        Server("/tmp/" + "x" * 120)
    with pytest.raises(ConfigError):
        Server(sock_path, max_queue=0)


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def _env() -> Dict[str, str]:
    """Subprocesses import the same pyivshmem as this process (in-place build or installed)."""
    import pyivshmem

    env = dict(os.environ)
    where = os.path.dirname(os.path.dirname(os.path.abspath(pyivshmem.__file__)))
    env["PYTHONPATH"] = where + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyivshmem", "server", *args],
        capture_output=True, text=True, timeout=60, env=_env(), **kw,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["-x"], "option -x not recognized"),
        (["-n", "65"], "too many requested vectors"),
        (["-n", "two"], "cannot parse"),
        (["-l", "lots"], "invalid size"),
        (["-v"], "verbose"),
        (["-S"], "requires argument"),
        (["stray"], "unexpected argument"),
    ],
)
def test_cli_bad_flags(args, message):
    r = _cli(*args)
    assert r.returncode == 2, r
    assert message in r.stderr
    assert "usage:" in r.stderr


def test_cli_help():
    r = _cli("-h")
    assert r.returncode == 0
    for flag in ("-F", "-p pidfile", "-S socket", "-M shm-name", "-m dir", "-l size", "-n vectors"):
        assert flag in r.stdout
    assert DEFAULT_SOCKET in r.stdout and DEFAULT_PIDFILE in r.stdout
    assert DEFAULT_SHM_NAME == "ivshmem" and DEFAULT_SIZE == 4 << 20


def _start_foreground(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pyivshmem", "server", "-F", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    if proc.stderr:
        proc.stderr.close()


@pytest.mark.timeout(120)
def test_cli_sigterm_announces_and_unlinks(sock_path, shm_name):
    proc = _start_foreground("-v", "-S", sock_path, "-M", shm_name, "-l", "3M", "-n", "2")
    try:
        _wait_for(lambda: os.path.exists(sock_path) or proc.poll() is not None, what="socket")
        assert proc.poll() is None, proc.stderr.read()
        clients = []
        for i in range(3):
            c = RawClient(sock_path)
            clients.append(c)
            my_id, shm = c.handshake()
            assert my_id == i
            assert os.fstat(shm).st_size == 4 << 20     # -l 3M rounded up, as QEMU does
            for _ in range(i + 1):
                join(c, 2)
        for i, c in enumerate(clients):
            for _ in range(2 - i):
                join(c, 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "peer 0 connected" in err        # -v logs at debug level
        for i, c in enumerate(clients):
            assert sorted(c.recv_nofd() for _ in range(2)) == [j for j in range(3) if j != i]
            c.expect_eof()
        assert not os.path.exists(sock_path)
        assert not os.path.exists(f"/dev/shm/{shm_name}")   # -M memory unlinked, as QEMU does
        for c in clients:
            c.close()
    finally:
        _stop(proc)


@pytest.mark.timeout(120)
def test_cli_sigint_clean_exit(sock_path, shm_name):
    proc = _start_foreground("-S", sock_path, "-M", shm_name, "-l", "4K")
    try:
        _wait_for(lambda: os.path.exists(sock_path) or proc.poll() is not None, what="socket")
        with RawClient(sock_path) as c:
            c.handshake()
            assert os.path.exists(f"/dev/shm/{shm_name}")
            proc.send_signal(signal.SIGINT)
            c.recv_fd()            # its own vector
            c.expect_eof()
        assert proc.wait(timeout=30) == 0
        assert not os.path.exists(sock_path)
        assert not os.path.exists(f"/dev/shm/{shm_name}")   # -M memory unlinked, as QEMU does
    finally:
        _stop(proc)


@pytest.mark.timeout(120)
def test_cli_keep_shm_keeps_the_memory_and_a_restart_still_invalidates_it(sock_path, shm_name):
    from pyivshmem import Peer, StaleRegionError

    proc = _start_foreground("-S", sock_path, "-M", shm_name, "-l", "64K", "--keep-shm")
    try:
        _wait_for(lambda: os.path.exists(sock_path) or proc.poll() is not None, what="socket")
        with Peer.connect(sock_path) as old:
            old.region.create_ring("jobs", "spsc", slot_size=64, capacity=16)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            assert os.path.exists(f"/dev/shm/{shm_name}")      # kept
            old.region.check()
            _stop(proc)
            # a restarted server on the kept memory invalidates the old session's region
            proc = _start_foreground("-S", sock_path, "-M", shm_name, "-l", "64K")
            _wait_for(lambda: os.path.exists(sock_path) or proc.poll() is not None,
                      what="socket")
            assert proc.poll() is None, proc.stderr.read()
            with pytest.raises(StaleRegionError):
                with Peer.connect(sock_path) as new:
                    assert new.region.rings() == []
                    old.region.check()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.exists(f"/dev/shm/{shm_name}")     # this one did not keep it
    finally:
        _stop(proc)


@pytest.mark.timeout(120)
def test_cli_refuses_live_socket(sock_path, shm_name):
    with Server(sock_path, size="4K"):
        r = _cli("-F", "-S", sock_path, "-M", shm_name, "-l", "4K")
        assert r.returncode == 1
        assert "in use" in r.stderr
        assert os.path.exists(sock_path)
        # the memory was not touched (the socket is checked first)
        assert not os.path.exists(f"/dev/shm/{shm_name}")
        with open(f"/dev/shm/{shm_name}", "wb") as f:
            f.write(b"someone else's")
        r = _cli("-F", "-S", sock_path, "-M", shm_name, "-l", "4K")
        assert r.returncode == 1
        with open(f"/dev/shm/{shm_name}", "rb") as f:
            assert f.read() == b"someone else's"      # neither unlinked nor resized


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_cli_daemon_mode(sock_path, shm_name, tmp_path):
    pidfile = tmp_path / "server.pid"
    r = subprocess.run(
        [sys.executable, "-m", "pyivshmem", "server", "-p", str(pidfile), "-S", sock_path,
         "-M", shm_name, "-l", "64K"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        timeout=60, env=_env(),
    )
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())       # written before the foreground process returned
    try:
        assert pid != os.getpid() and _pid_alive(pid)
        assert os.path.exists(sock_path)
        with RawClient(sock_path) as c:
            assert c.handshake()[0] == 0
        assert os.path.exists(f"/dev/shm/{shm_name}")
        os.kill(pid, signal.SIGTERM)
        _wait_for(lambda: not _pid_alive(pid), what="daemon exit")
        assert not os.path.exists(sock_path)
        assert not pidfile.exists()
        assert not os.path.exists(f"/dev/shm/{shm_name}")   # unlinked by the daemon too
    finally:
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_cli_daemon_reports_pidfile_error(sock_path, shm_name, tmp_path):
    pidfile = tmp_path / "missing-dir" / "server.pid"
    r = subprocess.run(
        [sys.executable, "-m", "pyivshmem", "server", "-p", str(pidfile), "-S", sock_path,
         "-M", shm_name, "-l", "64K"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, env=_env(),
    )
    assert r.returncode == 1
    assert "pid file" in r.stderr


@pytest.mark.timeout(120)
def test_cli_shm_dir(sock_path, tmp_path):
    proc = _start_foreground("-S", sock_path, "-m", str(tmp_path), "-l", "100000")
    try:
        _wait_for(lambda: os.path.exists(sock_path) or proc.poll() is not None, what="socket")
        with RawClient(sock_path) as c:
            _, shm = c.handshake()
            assert os.fstat(shm).st_size == 131072
            assert os.fstat(shm).st_nlink == 0
        assert [p.name for p in tmp_path.iterdir()] == ["ivshmem.sock"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        _stop(proc)


# ------------------------------------------------------------------------------------------
# QEMU interop
# ------------------------------------------------------------------------------------------
QEMU = shutil.which("qemu-system-x86_64")


@pytest.mark.qemu
@pytest.mark.timeout(180)
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_qemu_connects(sock_path):
    with Server(sock_path, size="1M", vectors=2) as server:
        watcher = RawClient(sock_path)
        try:
            watcher.handshake()
            join(watcher, 2)
            qemu = subprocess.Popen(
                [QEMU, "-accel", "tcg", "-M", "q35", "-nographic", "-nodefaults", "-S",
                 "-m", "64", "-chardev", f"socket,path={sock_path},id=iv",
                 "-device", "ivshmem-doorbell,vectors=2,chardev=iv"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            try:
                # QEMU connects as a peer: the server sees it, the watcher gets its 2 eventfds
                if not server.wait_until(lambda p: len(p) == 2, 60):
                    qemu.kill()
                    pytest.fail(f"QEMU never connected: {qemu.communicate()[1]!r}")
                qemu_id, fds = join(watcher, 2)
                assert qemu_id == 1
                assert all(is_eventfd(fd) for fd in fds)
                # ringing QEMU's vector does not disturb anything
                os.write(fds[0], (1).to_bytes(8, "little"))
                assert qemu.poll() is None, qemu.stderr.read()
            finally:
                qemu.kill()      # by pid, always
                qemu.wait(timeout=30)
                qemu.stderr.close()
            assert watcher.recv_nofd() == qemu_id     # departure announced
            assert server.wait_until(lambda p: p == (0,), 10)
        finally:
            watcher.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keep", [False, True])
def test_restarted_server_gives_a_fresh_region(sock_path, shm_name, keep):
    """A named shm object outlives its server.  A server started on it again invalidates the old
    session's region: its peers format a new one (new generation, no old rings or messages), and
    a peer of the old session still mapping the memory is told by region.check() instead of
    silently sharing rings with the new session.  keep_region=True leaves the region alone."""
    from pyivshmem import Peer, StaleRegionError
    from pyivshmem.peer import DISCONNECTED

    # the memory must outlive the first server for a restart to find it (keep_shm, --keep-shm)
    first = Server(sock_path, shm_name=shm_name, size="1M", vectors=1, keep_shm=True).start()
    old = Peer.connect(sock_path)
    try:
        # the server's copy of the layout's magic is the one C writes (csrc/ivshm_layout.h)
        assert os.pread(old.region.fileno(), 8, 0) == _REGION_MAGIC.to_bytes(8, "little")
        ring = old.region.create_ring("jobs", "spsc", slot_size=64, capacity=16)
        assert ring.try_send(b"from the first session")
        old_generation = old.region.generation
        first.close()
        deadline = time.monotonic() + 10
        while not any(e.kind == DISCONNECTED for e in old.events()):
            assert time.monotonic() < deadline, "the old peer never saw its server go"
            time.sleep(0.01)

        second = Server(sock_path, shm_name=shm_name, size="1M", vectors=1,
                        keep_region=keep).start()
        try:
            with Peer.connect(sock_path) as new:
                if keep:
                    assert new.region.generation == old_generation
                    assert new.region.ring("jobs").try_recv() == b"from the first session"
                    old.region.check()  # nothing changed for the old side either
                    return
                assert new.region.generation != old_generation
                assert [r["name"] for r in new.region.rings()] == []
                with pytest.raises(KeyError):
                    new.region.ring("jobs")
                with pytest.raises(StaleRegionError):
                    old.region.check()
                # the new session's ring of the same name starts empty
                assert new.region.create_ring("jobs", "spsc", slot_size=64,
                                              capacity=16).try_recv() is None
        finally:
            second.close()
    finally:
        old.close()


@pytest.mark.timeout(30)
def test_restart_invalidation_before_anyone_formats(sock_path, shm_name):
    """Between the restart and the first new peer the old side sees the header gone."""
    from pyivshmem import Region, RegionFormatError

    path = f"/dev/shm/{shm_name}"
    with Region.create(path, "1M") as left_over:
        left_over.create_ring("x", "spsc", slot_size=64, capacity=16)
        srv = Server(sock_path, shm_name=shm_name, size="1M", vectors=1).start()
        try:
            with pytest.raises(RegionFormatError):
                left_over.check()
        finally:
            srv.close()
