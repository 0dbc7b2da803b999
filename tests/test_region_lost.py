"""A peer that truncates the shared memory kills nobody (issue 13).

The server's memory is handed to every peer; any of them can ftruncate it.  A memfd (the
server's default) is sealed against shrinking, so the truncation fails and the others keep
working.  Named (-M, /dev/shm) and file (-m) memory cannot be sealed: the other peers' SIGBUS guard
maps zero pages over the lost mapping and every call on it raises RegionLostError, a blocked
Channel.recv included; each peer process exits normally, none dies of a signal.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pyivshmem import Channel, Peer, Region, RegionLostError
from pyivshmem.server import Server

sys.path.insert(0, os.path.dirname(__file__))
from _procwait import thread_native_id, wait_until_in_wait  # noqa: E402

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lost_child.py")


def _env():
    import pyivshmem

    env = dict(os.environ)
    where = os.path.dirname(os.path.dirname(os.path.abspath(pyivshmem.__file__)))
    env["PYTHONPATH"] = where + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _child(sock, *args):
    return subprocess.Popen([sys.executable, CHILD, sock, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def _readline(proc):
    """One line of the child's stdout, read from the fd a byte at a time: a buffered readline()
    would keep the lines after it in the text wrapper, where communicate() (which reads the fd)
    never finds them, and a child that is quick to finish would seem to have printed nothing."""
    out = bytearray()
    fd = proc.stdout.fileno()
    while True:
        b = os.read(fd, 1)
        if not b:
            break
        out += b
        if b == b"\n":
            break
    return out.decode()


def _line(proc, key, timeout=60.0):
    """The next JSON line of the child that has ``key`` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = _readline(proc)
        if not line:
            break
        msg = json.loads(line)
        if key in msg:
            return msg
    proc.kill()
    out, err = proc.communicate(timeout=30)
    pytest.fail(f"child gave no {key!r} line (rc {proc.returncode}):\n{out}\n{err[-3000:]}")


def _finish(proc, timeout=60):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"child did not finish within {timeout} s:\n{out}\n{err[-3000:]}")
    # negative: killed by that signal (SIGBUS is what the guard prevents)
    assert proc.returncode == 0, (f"child exited with {proc.returncode} "
                                  f"({'signal ' + signal.Signals(-proc.returncode).name if proc.returncode < 0 else 'status'})"
                                  f":\n{out}\n{err[-3000:]}")
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    return lines[-1]


def _start_server(tmp_path, memory, shm_name):
    sock = str(tmp_path / "ivshmem.sock")
    if memory == "memfd":  # the CLI always names its memory; the embedded server makes a memfd
        server = Server(sock, memfd=True, size="1M", vectors=2).start()
        return sock, server, None
    where = ["-M", shm_name] if memory == "named" else ["-m", str(tmp_path)]
    # faulthandler: a server that does not stop on SIGTERM is sent SIGABRT, and its stack shows
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "pyivshmem", "server",
                             "-F", "-S", sock,
                             *where, "-l", "1M", "-n", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.communicate(timeout=30)[1][-2000:]}")
        time.sleep(0.02)
    return sock, None, proc


@pytest.fixture
def shm_name():
    import uuid

    name = f"pyivshmem-lost-{uuid.uuid4().hex[:12]}"
    yield name
    try:
        os.unlink(f"/dev/shm/{name}")
    except FileNotFoundError:
        pass


@pytest.mark.timeout(240)
@pytest.mark.parametrize("memory", ["named", "file", "memfd"])
def test_peer_truncating_the_servers_memory_kills_nobody(tmp_path, shm_name, memory):
    sock, server, server_proc = _start_server(tmp_path, memory, shm_name)
    me = procs = None
    try:
        me = Peer.connect(sock, timeout=30)
        count = 2000 if memory == "memfd" else 10 ** 9  # lost memory ends the loop with an error
        idle = _child(sock, "idle")
        pong = _child(sock, "pong")
        ping = _child(sock, "ping", str(count))
        procs = [idle, pong, ping]
        for p in procs:
            _line(p, "ready")
        _line(ping, "running")  # round trips are under way
        wait_until_in_wait(idle.pid, what="the idle peer's Channel.recv")
        fd = me.region.fileno()
        if memory == "memfd":
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 4096)  # sealed against shrinking by the server
            assert os.fstat(fd).st_size == 1 << 20
            tx = Channel(me.region.ring("idle"), me, vector=0)
            tx.send(b"still here", timeout=30)
            tx.close()
            assert _finish(idle) == {"got": b"still here".hex()}
            assert _finish(ping) == {"done": count}
            assert _finish(pong) == {"done": count}
            assert me.region.rings()  # this side too
        else:
            os.ftruncate(fd, 4096)
            for p, name in ((idle, "idle"), (ping, "ping"), (pong, "pong")):
                last = _finish(p)
                assert last.get("error") == "RegionLostError", (name, last)
                assert "truncated by another process" in last["message"], last
                assert "re-open" in last["message"], last
                assert last["second"] == "RegionLostError", (name, last)
            # the truncating peer's own mapping is lost too, and it lives
            with pytest.raises(RegionLostError):
                me.region.rings()
            with pytest.raises(RegionLostError):
                me.region.ring("ab")
        if server_proc is not None:
            assert server_proc.poll() is None, "the server died"
    finally:
        for p in procs or []:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=30)
        if me is not None:
            me.close()
        if server is not None:
            server.close()
        if server_proc is not None:
            _stop_server(server_proc)


def _stop_server(proc):
    """SIGTERM, and the server exits within 30 s; if not, its threads' stacks (faulthandler, on
    SIGABRT) go into the failure."""
    proc.terminate()
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            err = proc.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate(timeout=30)[1]
        pytest.fail(f"the server did not exit within 30 s of SIGTERM; its stacks:\n{err[-6000:]}")


def test_region_file_truncated_raises_lost_for_every_call(shm_path):
    """Region.open on a /dev/shm file: the mapping of a truncated file raises RegionLostError for
    the call that met the loss and every later one; a ring's zero pages never come out as a
    message; close() still works."""
    with Region.create(shm_path, "1M") as r:
        q = r.create_ring("q", slot_size=64, capacity=8)
        q.send(b"before")
        view_ring = r.create_ring("v", slot_size=64, capacity=8)
        view_ring.send(b"peeked")
        view = view_ring.peek()
        assert bytes(view) == b"peeked"
        os.truncate(shm_path, 4096)
        with pytest.raises(RegionLostError, match="truncated by another process"):
            q.recv(timeout=1)  # the fault happens inside this call
        for call in (lambda: q.try_recv(), lambda: q.send(b"x"), lambda: len(q),
                     lambda: q.recv_many(), lambda: q.send_many([b"a"]), lambda: r.rings(),
                     lambda: r.info(), lambda: r.ring("q"), lambda: r.check(),
                     lambda: r.create_ring("new"), lambda: bytes(view), lambda: view[0]):
            with pytest.raises(RegionLostError):
                call()
    assert r.closed


def test_region_lost_wakes_a_blocked_channel_in_this_process(shm_path):
    """A Channel.recv blocked in this process wakes when another thread of it meets the loss."""
    import threading

    with Region.create(shm_path, "1M") as r:
        rx = Channel(r.create_ring("idle", slot_size=64, capacity=8), spin=0)
        other = r.create_ring("other", slot_size=64, capacity=8)
        got = []

        def wait():
            try:
                rx.recv(timeout=60)
                got.append("message")
            except Exception as e:  # noqa: BLE001
                got.append(type(e))  # not e: its traceback would keep rx (an eventfd) in a cycle

        t = threading.Thread(target=wait)
        t.start()
        wait_until_in_wait(os.getpid(), thread_native_id(t), what="the blocked recv")
        os.truncate(shm_path, 4096)
        with pytest.raises(RegionLostError):
            other.try_recv()  # this thread meets the loss; the guard wakes the sleeper
        t.join(30)
        assert not t.is_alive()
        assert got == [RegionLostError]
        rx.close()


def test_region_from_fd_seals_a_memfd_against_shrinking():
    fd = os.memfd_create("sealable", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 1 << 20)
        with Region.from_fd(fd) as r:
            r.create_ring("q").send(b"x")
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 4096)
            import fcntl

            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
            os.ftruncate(fd, 2 << 20)  # growing stays allowed
            assert r.ring("q").recv(timeout=1) == b"x"
    finally:
        os.close(fd)


def test_region_from_fd_takes_memory_it_cannot_seal(shm_path):
    """A memfd without MFD_ALLOW_SEALING (EPERM) and a /dev/shm file (EINVAL) are attached
    unsealed: the SIGBUS guard covers them."""
    fd = os.memfd_create("unsealable")  # sealing not allowed
    try:
        os.ftruncate(fd, 1 << 20)
        with Region.from_fd(fd) as r:
            r.create_ring("q").send(b"x")
            os.ftruncate(fd, 4096)  # not sealed: the truncation succeeds ...
            with pytest.raises(RegionLostError):  # ... and this side lives
                r.ring("q").recv(timeout=1)
    finally:
        os.close(fd)
    fd = os.open(shm_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 1 << 20)
        with Region.from_fd(fd) as r:
            assert r.size == 1 << 20
    finally:
        os.close(fd)


def test_region_from_fd_refuses_a_size_larger_than_the_file():
    fd = os.memfd_create("small", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 1 << 16)
        from pyivshmem import ConfigError

        with pytest.raises(ConfigError, match=r"holds 65536 bytes.*pass a smaller size"):
            Region.from_fd(fd, size="1M")
        # refused before anything was sealed
        import fcntl

        assert not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    finally:
        os.close(fd)


_OUTSIDE = textwrap.dedent("""
    import mmap, os, sys
    from pyivshmem import Region
    r = Region.create(sys.argv[1], "1M")       # installs the guard
    fd = os.memfd_create("unguarded")
    os.ftruncate(fd, 1 << 16)
    m = mmap.mmap(fd, 1 << 16)                 # not a Region: not guarded
    os.ftruncate(fd, 4096)
    print("faulting", flush=True)
    m[8192]                                    # a real bug: SIGBUS outside any guarded mapping
    print("survived", flush=True)
""")


@pytest.mark.parametrize("faulthandler", [False, True])
def test_sigbus_outside_guarded_memory_still_kills(shm_path, faulthandler):
    """The guard handles only its own mappings: any other SIGBUS kills the process as before
    (with Python's faulthandler enabled first, its traceback is written, then the process dies)."""
    args = [sys.executable] + (["-X", "faulthandler"] if faulthandler else []) + \
        ["-c", _OUTSIDE, shm_path]
    env = _env()
    # under tests/c/run-python-asan.sh: the deliberate fault is no sanitizer finding; without
    # ASan's own SIGBUS handler the process meets the default action, as in a plain build
    env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":handle_sigbus=0"
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert "faulting" in proc.stdout and "survived" not in proc.stdout, proc
    assert proc.returncode == -signal.SIGBUS, proc
    if faulthandler:
        assert "Bus error" in proc.stderr, proc.stderr


@pytest.mark.parametrize("kind", ["spsc", "mpmc", "pubsub"])
def test_every_ring_kind_raises_lost_and_never_hangs(shm_path, kind):
    """On the guard's zero pages each kind's calls raise RegionLostError at once (the rings'
    validation keeps zeros from crashing or hanging them); blocking calls with no timeout too."""
    with Region.create(shm_path, "1M") as r:
        q = r.create_ring("q", kind, slot_size=64, capacity=8)
        sub = q.subscribe() if kind == "pubsub" else None
        rx = sub if sub is not None else q
        q.send(b"one")
        assert rx.recv(timeout=1) == b"one"
        os.truncate(shm_path, 4096)
        calls = [lambda: q.send(b"x"),                 # no timeout: must not block
                 lambda: q.try_send(b"x"), lambda: len(q), lambda: q.send_many([b"a", b"b"]),
                 lambda: q.reserve(8),
                 lambda: rx.recv(),                    # no timeout: must not block
                 lambda: rx.try_recv(), lambda: len(rx), lambda: rx.recv_many(),
                 lambda: rx.recv_into(bytearray(64)), lambda: rx.peek()]
        for call in calls:
            with pytest.raises(RegionLostError):
                call()
        # closing still works (and never raises) on lost memory
        if sub is not None:
            sub.close()
        q.close()
    assert r.closed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["send", "send_many", "recv", "recv_many"])
def test_mpmc_call_blocked_without_timeout_raises_lost(shm_path, call):
    # a call waiting with timeout=None re-checks the ring in its wait loop; that loop looked at
    # `closed` only, so a truncation left it waiting for ever
    import threading

    region = Region.create(shm_path, "1M")
    ring = region.create_ring("m", "mpmc", slot_size=64, capacity=4)
    if call.startswith("send"):
        for _ in range(4):
            ring.send(b"fill")
    waiter = region.ring("m")
    fn = {"send": lambda: waiter.send(b"x", timeout=None),
          "send_many": lambda: waiter.send_many([b"x"], timeout=None),
          "recv": lambda: waiter.recv(timeout=None),
          "recv_many": lambda: waiter.recv_many(4, timeout=None)}[call]
    got = []

    def run():
        try:
            fn()
            got.append("returned")
        except BaseException as e:  # noqa: BLE001 - the test reports what came out
            got.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    time.sleep(0.2)  # let it reach its wait loop (a call that has not waited yet raises anyway)
    os.truncate(shm_path, 0)
    t.join(20)
    assert not t.is_alive(), f"{call}(timeout=None) still blocked after the memory was truncated"
    assert isinstance(got[0], RegionLostError), got
    region.close()
