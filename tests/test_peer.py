"""pyivshmem.Peer: the normal path against a fake server written here, the real Server, and
QEMU.  Malformed servers are in test_peer_hostile.py (which reuses FakeServer)."""
from __future__ import annotations

import array
import gc
import os
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
import traceback
from typing import Callable, List, Optional, Sequence

import pytest

from _fds import fd_count
from pyivshmem import ClosedError, ConfigError, PeerDisconnected, ProtocolError
from pyivshmem.doorbell import NOTIFY_EVENTFD, Doorbell, drain, ring
from pyivshmem.peer import DISCONNECTED, JOINED, LEFT, Peer, PeerEvent

MiB = 1 << 20



# ---------------------------------------------------------------------------- fake server
class Conn:
    """The server side of one connection, handed to a script: makes fds (closed when the
    connection ends) and sends exactly what the script says."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fds: List[int] = []

    # fds the script can send
    def memfd(self, size: int = MiB) -> int:
        fd = os.memfd_create("fake-ivshmem", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self.fds.append(fd)
        return fd

    def efd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.fds.append(fd)
        return fd

    def pipe(self) -> int:
        r, w = os.pipe()
        self.fds += [r, w]
        return r

    # what the script can do
    def send(self, value: int, *fds: int) -> None:
        data = struct.pack("<q", value)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def raw(self, data: bytes, *fds: int) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def flushed(self, timeout: float = 20.0) -> None:
        """Wait until the client has read everything sent so far (SIOCOUTQ reaches 0)."""
        import fcntl
        import termios
        import time

        end = time.monotonic() + timeout
        buf = array.array("i", [0])
        while True:
            fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, buf, True)
            if buf[0] == 0 or time.monotonic() > end:
                return
            time.sleep(0.001)

    def setup(self, my_id: int, *, vectors: int = 1, others: Sequence[int] = (),
              size: int = MiB) -> dict:
        """The well-behaved set-up sequence; returns {peer_id: [server-side eventfds]}."""
        self.send(0)
        self.send(my_id)
        self.send(-1, self.memfd(size))
        table = {}
        for other in others:
            table[other] = [self.efd() for _ in range(vectors)]
            for fd in table[other]:
                self.send(other, fd)
        table[my_id] = [self.efd() for _ in range(vectors)]
        for fd in table[my_id]:
            self.send(my_id, fd)
        return table

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        self.sock.close()


class FakeServer:
    """A listening UNIX socket served by a thread running ``script(conn)`` for each accepted
    connection (``connections`` of them).  When the script returns, the connection stays open
    until the client closes it or the server is stopped, unless the script closed it."""

    def __init__(self, path: str, script: Callable[[Conn], None], *, connections: int = 1,
                 linger: bool = False):
        self.linger = linger  # keep the server-side fds open until stop(), after the client left
        self.path = path
        self.script = script
        self.connections = connections
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self.stop_event = threading.Event()
        self.stopped = False
        self.errors: List[BaseException] = []
        self.conn: Optional[Conn] = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _accept(self) -> Optional[socket.socket]:
        """The next connection, or None once stop() was called (polled, so stop() never waits
        for a client that a test chose not to send)."""
        deadline = time.monotonic() + 30
        while not self.stop_event.is_set():
            try:
                return self.listener.accept()[0]
            except socket.timeout:
                if time.monotonic() > deadline:
                    raise TimeoutError("the fake server waited 30 s for a client that never came")
        return None

    def _run(self) -> None:
        try:
            for _ in range(self.connections):
                sock = self._accept()
                if sock is None:
                    return
                conn = self.conn = Conn(sock)
                try:
                    self.script(conn)
                    if conn.sock.fileno() >= 0:
                        # hold the connection until the client goes away or we are stopped
                        conn.sock.settimeout(0.05)
                        while not self.stop_event.is_set():
                            try:
                                if conn.sock.recv(1) == b"":
                                    break
                            except socket.timeout:
                                continue
                            except OSError:
                                break
                    if self.linger:
                        self.stop_event.wait(30)
                finally:
                    conn.close()
        except BaseException as e:  # reported by stop()
            self.errors.append(e)

    def stop(self) -> None:
        """Stop serving; fail (AssertionError with the script's traceback) when a script raised,
        so that a broken server side fails the test that used it instead of passing silently."""
        if self.stopped:
            return
        self.stopped = True
        self.stop_event.set()
        self.thread.join(30)
        self.listener.close()
        assert not self.thread.is_alive(), "the fake server's thread did not end within 30 s"
        if self.errors:
            tb = "".join(traceback.format_exception(self.errors[0]))
            raise AssertionError(f"the fake server's script raised:\n{tb}")


@pytest.fixture
def sock_dir():
    d = tempfile.mkdtemp(prefix="pvpeer")  # short: socket paths are limited to 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake(sock_dir):
    """fake(script, connections=1) -> FakeServer; all stopped at the end of the test."""
    servers: List[FakeServer] = []

    def start(script, connections: int = 1, linger: bool = False) -> FakeServer:
        srv = FakeServer(os.path.join(sock_dir, f"s{len(servers)}"), script,
                         connections=connections, linger=linger)
        servers.append(srv)
        return srv

    yield start
    failures = []
    for srv in servers:  # stop them all, then report the first failure
        try:
            srv.stop()
        except AssertionError as e:
            failures.append(e)
    if failures:
        raise failures[0]


# ---------------------------------------------------------------------------- normal path
@pytest.mark.timeout(60)
def test_connect_to_well_behaved_fake_server(fake):
    base = fd_count()
    step = threading.Event()
    step2 = threading.Event()
    tables = {}
    tables_ready = threading.Event()

    def script(c: Conn):
        tables.update(c.setup(3, vectors=2, others=[1]))
        tables_ready.set()  # the client may be connected before this thread gets here
        assert step.wait(20), "the test never released the fake server's script"
        for fd in tables[5]:
            c.send(5, fd)
        c.send(1)  # peer 1 left
        assert step2.wait(20), "the test never released the fake server's script"
        c.sock.shutdown(socket.SHUT_RDWR)
        c.sock.close()

    # peer 5's eventfds outlive the server connection (doorbells work without the server)
    tables[5] = [os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)]
    srv = fake(script)
    with Peer.connect(srv.path, timeout=10) as p:
        assert isinstance(p, Doorbell)
        assert p.id == 3
        assert p.vectors == 2
        assert p.peers == {1: 2}
        assert p.region.size == MiB
        assert p.connected
        assert tables_ready.wait(20), "the fake server never finished its setup"

        # ringing a peer writes 1 to that peer's eventfd for the vector
        p.notify(1, 1)
        p.notify(1, 1)
        assert drain(tables[1][1]) == 2 and drain(tables[1][0]) == 0
        kind, fd, val = p.notify_target(1, 0)
        assert kind == NOTIFY_EVENTFD and val == 0
        ring(fd)
        assert drain(tables[1][0]) == 1

        # my own vectors: the server's copy rings me; wait() reports and drains
        assert p.wait(0) == []
        ring(tables[3][1])
        assert p.wait(5) == [1]
        assert p.wait(0) == []
        p.notify(3, 0)  # ringing myself works too
        assert p.wait(5) == [0]
        assert drain(p.vector_fd(0)) == 0

        with pytest.raises(ConfigError, match="peer 7"):
            p.notify(7)
        with pytest.raises(ConfigError, match="vector 2"):
            p.notify(1, 2)
        assert p.notify_target(7, 0) is None
        assert p.notify_target(1, 5) is None
        with pytest.raises(ConfigError):
            p.vector_fd(2)

        assert p.events() == []
        step.set()
        seen: List[PeerEvent] = []
        while len(seen) < 2:
            assert p.wait(0.2) == []  # server messages wake wait() but are not vectors
            seen += p.events()
        assert [(e.kind, e.peer) for e in seen] == [(JOINED, 5), (LEFT, 1)]
        assert seen[1].vectors == 2
        assert p.peers == {5: 2}
        p.notify(5, 1)
        assert drain(tables[5][1]) == 1
        with pytest.raises(ConfigError):
            p.notify(1, 0)  # gone

        step2.set()
        import select

        assert select.select([p.fileno()], [], [], 20)[0]
        evs = p.events()
        assert evs == [PeerEvent(DISCONNECTED, None)]
        assert not p.connected
        with pytest.raises(PeerDisconnected):
            p.events()
        # doorbells keep working without the server
        p.notify(5, 0)
        assert drain(tables[5][0]) == 1
    assert p.closed
    srv.stop()
    for fd in tables[5]:
        os.close(fd)
    assert fd_count() == base


@pytest.mark.timeout(60)
def test_fileno_is_readable_on_vector_and_on_server_message(fake):
    go = threading.Event()
    table = {}
    table_ready = threading.Event()

    def script(c: Conn):
        table.update(c.setup(0))
        table_ready.set()  # the client may be connected before this thread gets here
        assert go.wait(20), "the test never released the fake server's script"
        c.send(9, c.efd())

    import select

    srv = fake(script)
    with Peer.connect(srv.path) as p:
        assert select.select([p.fileno()], [], [], 0)[0] == []
        assert table_ready.wait(20), "the fake server never finished its setup"
        ring(table[0][0])
        assert select.select([p.fileno()], [], [], 10)[0] == [p.fileno()]
        assert p.wait(0) == [0]
        assert select.select([p.fileno()], [], [], 0)[0] == []
        go.set()
        assert select.select([p.fileno()], [], [], 10)[0] == [p.fileno()]
        assert p.events() == [PeerEvent(JOINED, 9, 1)]
        assert select.select([p.fileno()], [], [], 0)[0] == []


@pytest.mark.timeout(60)
def test_messages_split_across_segments_are_assembled(fake):
    """A stream may deliver a message in pieces; the fd comes with its first byte."""
    def script(c: Conn):
        c.raw(struct.pack("<q", 0)[:3])
        c.raw(struct.pack("<q", 0)[3:])
        c.raw(struct.pack("<q", 2)[:1])
        c.raw(struct.pack("<q", 2)[1:] + struct.pack("<q", -1)[:5])
        c.raw(struct.pack("<q", -1)[5:])  # no fd yet: memory comes in the next message
        # that was "-1 without fd" -> rejected; so use a correct split instead:

    def good(c: Conn):
        c.raw(struct.pack("<q", 0)[:3])
        c.raw(struct.pack("<q", 0)[3:])
        c.raw(struct.pack("<q", 2)[:1])
        c.raw(struct.pack("<q", 2)[1:])
        m = c.memfd()
        c.raw(struct.pack("<q", -1)[:2], m)
        c.raw(struct.pack("<q", -1)[2:])
        e = c.efd()
        c.raw(struct.pack("<q", 2)[:7], e)
        c.raw(struct.pack("<q", 2)[7:])

    srv = fake(good)
    with Peer.connect(srv.path) as p:
        assert p.id == 2 and p.vectors == 1 and p.region.size == MiB
    srv2 = fake(script)
    with pytest.raises(ProtocolError, match="-1 without an fd"):
        Peer.connect(srv2.path)


def test_close_is_idempotent_and_use_after_close_raises(fake):
    srv = fake(lambda c: c.setup(1, others=[0]))
    p = Peer.connect(srv.path)
    p.close()
    p.close()
    for call in (lambda: p.id, lambda: p.peers, lambda: p.vectors, lambda: p.notify(0),
                 lambda: p.wait(0), lambda: p.fileno(), lambda: p.events(),
                 lambda: p.vector_fd(0), lambda: p.notify_target(0, 0)):
        with pytest.raises(ClosedError):
            call()
    assert "closed" in repr(p)


def test_forgotten_peer_warns_and_releases(fake):
    base = fd_count()
    srv = fake(lambda c: c.setup(1, vectors=3, others=[0]))
    p = Peer.connect(srv.path)
    assert fd_count() > base
    with pytest.warns(ResourceWarning, match="unclosed"):
        del p
        gc.collect()
    srv.stop()
    assert fd_count() == base


@pytest.mark.timeout(120)
def test_no_fd_leak_over_many_connect_close_cycles(fake):
    cycles = 200
    script = lambda c: c.setup(4, vectors=4, others=[0, 1, 2])  # noqa: E731
    warm = fake(script)
    with Peer.connect(warm.path) as p:  # warm-up (lazy imports, cffi allocations)
        assert p.peers == {0: 4, 1: 4, 2: 4}
    warm.stop()
    base = fd_count()
    srv = fake(script, connections=cycles)
    for _ in range(cycles):
        with Peer.connect(srv.path) as p:
            assert p.vectors == 4
    srv.stop()  # closes the server side's fds
    assert fd_count() == base


def test_connect_without_server_says_so(sock_dir):
    with pytest.raises(FileNotFoundError, match="is a server running"):
        Peer.connect(os.path.join(sock_dir, "nothing-here"))
    path = os.path.join(sock_dir, "stale")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # a socket file nobody listens on
    with pytest.raises(ConnectionRefusedError, match="is a server running"):
        Peer.connect(path)


# ---------------------------------------------------------------------------- vectors=
def test_connect_waits_for_the_vectors_asked_for(fake):
    def script(c):
        c.send(0)
        c.send(0)
        c.send(-1, c.memfd())
        for _ in range(3):
            c.flushed()  # arrive one by one: the client must keep waiting
            c.send(0, c.efd())

    srv = fake(script)
    with Peer.connect(srv.path, vectors=3) as p:
        assert p.vectors == 3


def test_connect_to_a_server_without_vectors(fake):
    def script(c):
        c.send(0)
        c.send(0)
        c.send(-1, c.memfd())

    srv = fake(script)
    with Peer.connect(srv.path, vectors=0) as p:
        assert p.vectors == 0 and p.peers == {}
        assert p.wait(0) == []
        with pytest.raises(ConfigError):
            p.notify(0)
    with pytest.raises(ConfigError):
        Peer.connect(srv.path, vectors=65)


def test_own_vectors_arriving_late_are_added(fake):
    go = threading.Event()
    table = {}

    def script(c):
        table.update(c.setup(1))
        assert go.wait(20), "the test never released the fake server's script"
        table[1].append(c.efd())
        c.send(1, table[1][-1])

    srv = fake(script)
    with Peer.connect(srv.path, vectors=1) as p:
        assert p.vectors == 1
        go.set()
        while p.vectors < 2:
            p.wait(0.05)
            assert p.events() == []
        ring(table[1][1])
        assert p.wait(5) == [1]


def test_a_joining_peer_shows_only_with_all_its_vectors(fake):
    """The server sends a new peer's vectors one message each; between them the peer is
    neither in `peers` nor announced, and a peer that leaves before it completed is not
    announced as leaving either."""
    steps = [threading.Event() for _ in range(2)]

    def script(c):
        c.setup(1, vectors=2)
        c.send(4, c.efd())
        assert steps[0].wait(20), "the test never released the script"
        c.send(4, c.efd())
        assert steps[1].wait(20), "the test never released the script"
        c.send(6, c.efd())
        c.send(6)  # peer 6 leaves with one of its two vectors sent
        c.send(7, c.efd())
        c.send(7, c.efd())

    srv = fake(script)
    with Peer.connect(srv.path, vectors=2) as p:
        deadline = time.monotonic() + 20
        while 4 not in p._peers:  # until peer 4's first vector has been taken in
            assert p.peers == {}
            assert time.monotonic() < deadline, "peer 4's first vector never arrived"
            time.sleep(0.005)
        assert p.peers == {} and p.events() == []  # one vector of two so far
        steps[0].set()
        assert _events_until(p, lambda evs: evs) == [PeerEvent(JOINED, 4, 2)]
        assert p.peers == {4: 2}
        steps[1].set()
        # 6 came and went half-joined: nothing about it; then 7 joined whole
        assert _events_until(p, lambda evs: evs) == [PeerEvent(JOINED, 7, 2)]
        assert p.peers == {4: 2, 7: 2}


def test_a_peer_announced_before_our_own_vectors_grew_stays_and_is_announced_leaving(fake):
    """Our own vectors may still arrive after set-up (connect(vectors=1) on a two-vector
    server).  A peer announced while we had one vector stays in `peers` when our second one
    arrives, is not announced a second time when its own second vector arrives, and its
    departure is announced: every JOINED has its LEFT, and each only once."""
    steps = [threading.Event() for _ in range(2)]

    def script(c):
        c.setup(1, vectors=1)
        assert steps[0].wait(20), "the test never released the script"
        c.send(4, c.efd())       # peer 4 joins with one vector: as many as we have
        c.send(1, c.efd())       # then our own second vector arrives
        c.send(5, c.efd())       # peer 5 joins while 4 still has one vector
        c.send(5, c.efd())
        assert steps[1].wait(20), "the test never released the script"
        c.send(4, c.efd())       # 4's second vector
        c.send(4)                # 4 leaves
        c.send(5)                # 5 leaves

    srv = fake(script)
    with Peer.connect(srv.path, vectors=1) as p:
        steps[0].set()
        seen = _events_until(p, lambda evs: PeerEvent(JOINED, 5, 2) in evs)
        assert seen == [PeerEvent(JOINED, 4, 1), PeerEvent(JOINED, 5, 2)]
        assert p.vectors == 2
        assert p.peers == {4: 1, 5: 2}  # 4, announced, does not vanish
        steps[1].set()
        seen = _events_until(p, lambda evs: PeerEvent(LEFT, 5, 2) in evs)
        assert seen == [PeerEvent(LEFT, 4, 2), PeerEvent(LEFT, 5, 2)]
        assert p.peers == {}


# ---------------------------------------------------------------------------- the client CLI
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

# the directory this process imported pyivshmem from (the source tree or site-packages), so the
# child runs the same build
import pyivshmem  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pyivshmem.__file__)))


def _client(path: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-m", "pyivshmem", "client", "-S", path, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, **kw,
    )


def _finish(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    pump = getattr(proc, "_pump", None)
    if pump is not None:
        pump.join(20)
    else:
        proc.stdout.read()
    proc.stderr.read()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        f.close()


def _expect(proc: subprocess.Popen, text: str, timeout: float = 20.0) -> List[str]:
    """Read the client's output lines until one contains ``text``; all lines read."""
    import queue

    q = getattr(proc, "_lines", None)
    if q is None:
        q = proc._lines = queue.Queue()

        def pump():
            for line in proc.stdout:
                q.put(line.rstrip("\n"))
            q.put(None)

        proc._pump = threading.Thread(target=pump, daemon=True)
        proc._pump.start()
    lines: List[str] = []
    end = time.monotonic() + timeout
    while True:
        try:
            line = q.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            raise AssertionError(f"client never printed {text!r}; got {lines!r}")
        lines.append(line)
        if text in line:
            return lines


@pytest.mark.timeout(60)
def test_client_piped_commands(fake):
    table = {}
    srv = fake(lambda c: table.update(c.setup(3, vectors=2, others=[1])), linger=True)
    script = "help\ndump\nint 1 0\nint 1 all\nint all\nint 9 0\nint 1 7\nint x 0\nbogus\n"
    proc = _client(srv.path, "-v")
    out, err = proc.communicate(script, timeout=30)
    assert proc.returncode == 0, err
    assert "my id is 3, 2 vector(s)" in out
    assert "peer 1 is connected (2 vector(s))" in out
    assert "int <peer> <vector>" in out  # help
    assert "peer 1: 2 vector(s)" in out  # dump
    assert out.count("notified peer 1 vector 0") == 3
    assert out.count("notified peer 1 vector 1") == 2
    assert "error: cannot notify peer 9: not connected" in out
    assert "error: cannot notify peer 1 on vector 7" in out
    assert "peer id must be a number" in out
    assert "invalid command 'bogus'" in out
    assert drain(table[1][0]) == 3 and drain(table[1][1]) == 2
    assert "cmd>" not in out  # no prompt when stdin is not a terminal


@pytest.mark.timeout(60)
def test_client_reports_interrupts_and_peers(fake):
    go = threading.Event()
    table = {}

    def script(c):
        table.update(c.setup(2, others=[0]))
        assert go.wait(20), "the test never released the fake server's script"
        ring(table[2][0])
        c.flushed()
        table[4] = [c.efd()]
        c.send(4, table[4][0])
        c.send(4)

    srv = fake(script)
    proc = _client(srv.path)
    try:
        _expect(proc, "my id is 2")
        go.set()
        lines = _expect(proc, "peer 4 left")
        assert "interrupt on vector 0" in lines
        assert "peer 4 joined (1 vector(s))" in lines
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert proc.wait(20) == 0
    finally:
        _finish(proc)


@pytest.mark.timeout(60)
def test_client_exits_when_server_goes_away(fake):
    go = threading.Event()

    def script(c):
        c.setup(0)
        assert go.wait(20), "the test never released the fake server's script"
        c.sock.shutdown(socket.SHUT_RDWR)

    srv = fake(script)
    proc = _client(srv.path)
    try:
        _expect(proc, "my id is 0")
        go.set()
        _expect(proc, "the server closed the connection")
        assert proc.wait(20) == 1
    finally:
        _finish(proc)


def test_client_usage_and_connect_errors(sock_dir):
    from pyivshmem.client import main

    assert main(["-x"]) == 2
    assert main(["extra"]) == 2
    proc = _client(os.path.join(sock_dir, "none"))
    out, err = proc.communicate("", timeout=30)
    assert proc.returncode == 1
    assert "cannot connect to the ivshmem server" in err and "is a server running" in err


# ---------------------------------------------------------------------------- the real Server
@pytest.fixture
def server(sock_dir):
    mod = pytest.importorskip("pyivshmem.server",
                              reason="pyivshmem.server (the real Server) is not on this branch")
    with mod.Server(os.path.join(sock_dir, "srv"), size="1M", vectors=2) as srv:
        yield srv


def _events_until(p: Peer, pred, timeout: float = 20.0) -> List[PeerEvent]:
    seen: List[PeerEvent] = []
    end = time.monotonic() + timeout
    while not pred(seen):
        assert time.monotonic() < end, f"no matching events; got {seen!r}"
        p.wait(0.05)
        seen += p.events()
    return seen


@pytest.mark.timeout(120)
def test_two_peers_on_the_real_server(server):
    with Peer.connect(server.socket_path):  # warm-up: lazy imports, cffi allocations
        pass
    assert server.wait_until(lambda peers: not peers, 20)
    base = fd_count()
    with Peer.connect(server.socket_path) as a:
        assert a.vectors == 2 and a.peers == {}
        with Peer.connect(server.socket_path) as b:
            assert b.vectors == 2 and b.peers == {a.id: 2} and b.id != a.id
            # `peers` takes in the server's announcement by itself (no wait() or events() call)
            # once it has arrived: a's fileno() turns readable for it
            # (its two vectors may arrive apart: until both have, b is not shown at all)
            end = time.monotonic() + 20
            while True:
                assert select.select([a.fileno()], [], [], 20)[0], "b's join never reached a"
                seen = a.peers
                assert seen in ({}, {b.id: 2}), f"a partial join shown: {seen}"
                if seen:
                    break
                assert time.monotonic() < end, "b's second vector never reached a"
                time.sleep(0.001)
            # ... and the event still waits for events()
            assert [(e.kind, e.peer) for e in a.events()] == [(JOINED, b.id)]

            # ring each other's vectors
            a.notify(b.id, 1)
            assert b.wait(10) == [1]
            b.notify(a.id, 0)
            b.notify(a.id, 1)
            got = set()
            while got != {0, 1}:
                got.update(a.wait(10))
            assert a.wait(0.1) == []  # timeout: nothing pending

            # a blocked wait() wakes when rung from another thread
            from _procwait import call_when_waiting

            t = call_when_waiting(a.notify, b.id, 0)  # once b's wait is seen blocked
            assert b.wait(20) == [0]
            t.join()

            # the same memory on both sides
            ring_a = a.region.create_ring("peer-test", kind="spsc", slot_size=64, capacity=8)
            ring_b = b.region.ring("peer-test")
            assert ring_a.try_send(b"over the server's memory")
            assert ring_b.try_recv() == b"over the server's memory"
            b_id = b.id
        seen = _events_until(a, lambda s: any(e.kind == LEFT for e in s))
        assert seen == [PeerEvent(LEFT, b_id, 2)]
        assert a.peers == {}
    # the server runs in this process: let it finish closing its side of both connections
    assert server.wait_until(lambda peers: not peers, 20)
    assert fd_count() == base


@pytest.mark.timeout(120)
def test_server_shutdown_is_reported(sock_dir):
    mod = pytest.importorskip("pyivshmem.server",
                              reason="pyivshmem.server (the real Server) is not on this branch")
    srv = mod.Server(os.path.join(sock_dir, "srv"), size="64K", vectors=1).start()
    try:
        a = Peer.connect(srv.socket_path)
        b = Peer.connect(srv.socket_path)
        _events_until(a, lambda s: (JOINED, b.id) in [(e.kind, e.peer) for e in s])
    finally:
        srv.close()
    with a, b:
        seen = _events_until(a, lambda s: any(e.kind == DISCONNECTED for e in s))
        assert [(e.kind, e.peer) for e in seen] == [(LEFT, b.id), (DISCONNECTED, None)]
        with pytest.raises(PeerDisconnected):
            a.events()


@pytest.mark.timeout(180)
def test_churn_on_the_real_server_keeps_fd_count(server):
    with Peer.connect(server.socket_path) as watcher:
        with Peer.connect(server.socket_path):  # warm-up
            pass
        _events_until(watcher, lambda s: any(e.kind == LEFT for e in s))
        assert server.wait_until(lambda peers: peers == (watcher.id,), 20)
        base = fd_count()
        for _ in range(100):
            with Peer.connect(server.socket_path) as p:
                assert p.vectors == 2 and watcher.id in p.peers
        # the watcher followed all of them
        _events_until(watcher, lambda s: sum(e.kind == LEFT for e in s) == 100)
        assert watcher.peers == {}
        assert server.wait_until(lambda peers: peers == (watcher.id,), 20)
        assert fd_count() == base


def test_client_cli_with_the_real_server(server):
    with Peer.connect(server.socket_path) as other:
        proc = _client(server.socket_path, "-v")
        try:
            _expect(proc, "my id is")
            proc.stdin.write(f"int {other.id} 1\nint all\n")
            proc.stdin.flush()
            _expect(proc, f"notified peer {other.id} vector 1")
            got = set()
            while got != {0, 1}:
                got.update(other.wait(10))
            joined = _events_until(other, lambda s: any(e.kind == JOINED for e in s))
            other.notify(joined[0].peer, 1)
            _expect(proc, "interrupt on vector 1")
            proc.stdin.close()
            assert proc.wait(20) == 0
        finally:
            _finish(proc)


# ---------------------------------------------------------------------------- QEMU interop
QEMU = shutil.which("qemu-system-x86_64")


@pytest.mark.qemu
@pytest.mark.timeout(240)
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")
def test_qemu_joins_is_rung_and_leaves(server):
    with Peer.connect(server.socket_path) as p:
        qemu = subprocess.Popen(
            [QEMU, "-accel", "tcg", "-M", "q35", "-nographic", "-nodefaults", "-S", "-m", "64",
             "-chardev", f"socket,path={server.socket_path},id=iv",
             "-device", "ivshmem-doorbell,vectors=2,chardev=iv"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            end = time.monotonic() + 120
            joined: List[PeerEvent] = []
            while not joined or p.peers.get(joined[0].peer) != 2:
                if time.monotonic() > end or qemu.poll() is not None:
                    qemu.kill()
                    pytest.fail(f"QEMU never joined: {qemu.communicate()[1]!r}")
                p.wait(0.1)
                joined += [e for e in p.events() if e.kind == JOINED]
            qemu_id = joined[0].peer
            assert p.peers == {qemu_id: 2}
            p.notify(qemu_id, 0)
            p.notify(qemu_id, 1)
            assert p.notify_target(qemu_id, 1)[0] == NOTIFY_EVENTFD
            assert qemu.poll() is None  # still running after being rung
        finally:
            qemu.kill()  # by pid, always
            qemu.wait(timeout=30)
            qemu.stderr.close()
        seen = _events_until(p, lambda s: any(e.kind == LEFT for e in s), timeout=60)
        assert (LEFT, qemu_id) in [(e.kind, e.peer) for e in seen]
        assert p.peers == {}
