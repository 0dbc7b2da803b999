"""The doorbell C code (csrc/ivshm_doorbell.c) through cffi, and the Python helpers over it."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from _fds import fd_count
from _procwait import call_when_waiting, wait_until_in_wait

from pyivshmem import ClosedError, ConfigError
from pyivshmem._ffi_doorbell import ffi, lib
from pyivshmem.doorbell import Doorbell, WaitSet, drain, eventfd, ring, wait_readable

import pyivshmem  # noqa: E402

# where this process imported pyivshmem from (source tree or site-packages): the child uses it too
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(pyivshmem.__file__)))



def test_eventfd_ring_and_drain_coalesce():
    fd = eventfd()
    try:
        assert drain(fd) == 0
        ring(fd)
        ring(fd)
        ring(fd)
        assert drain(fd) == 3  # rings coalesce into one count
        assert drain(fd) == 0
    finally:
        os.close(fd)


def test_eventfd_is_cloexec_and_nonblocking_by_default():
    import fcntl

    fd = eventfd()
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not os.get_blocking(fd)
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    finally:
        os.close(fd)


def test_drain_never_blocks_on_a_blocking_eventfd():
    fd = eventfd(nonblock=False)
    try:
        assert os.get_blocking(fd)
        assert drain(fd) == 0  # would hang forever if it read() without polling
        ring(fd)
        assert drain(fd) == 1
    finally:
        os.close(fd)


def test_ring_saturated_counter_counts_as_rung():
    fd = eventfd()
    try:
        os.write(fd, (2**64 - 2).to_bytes(8, "little"))  # the counter's maximum
        ring(fd)  # EAGAIN inside: the doorbell is already rung, not an error
        assert drain(fd) == 2**64 - 2
    finally:
        os.close(fd)


def test_c_functions_return_negative_errno():
    assert lib.ivshm_eventfd_ring(-1) == -errno.EBADF
    count = ffi.new("uint64_t *")
    r, w = os.pipe()
    try:
        # a pipe is not an eventfd: a short read is reported, not taken as a count
        os.write(w, b"abc")
        assert lib.ivshm_eventfd_drain(r, count) == -errno.EINVAL
    finally:
        os.close(r)
        os.close(w)
    assert lib.ivshm_waitset_add(-1, 0, 0, 0) == -errno.EBADF
    ep = lib.ivshm_waitset_create()
    assert ep >= 0
    try:
        assert lib.ivshm_waitset_add(ep, 0, lib.IVSHM_WS_TAG_MAX + 1, 0) == -errno.EINVAL
        assert lib.ivshm_waitset_add(ep, 0, 1, 0x80) == -errno.EINVAL
        out = ffi.new("struct ivshm_fired[]", 1)
        assert lib.ivshm_waitset_wait(ep, 0, 0, out, 0, ffi.NULL) == -errno.EINVAL
    finally:
        os.close(ep)


def test_waitset_reports_tags_and_counts():
    fds = [eventfd() for _ in range(5)]
    try:
        with WaitSet() as ws:
            for i, fd in enumerate(fds):
                ws.add(fd, 100 + i)
            assert ws.wait(0) == []
            ring(fds[1])
            ring(fds[3])
            ring(fds[3])
            got = sorted(ws.wait(1.0))
            assert got == [(101, 1), (103, 2)]
            assert ws.wait(0) == []  # drained
            ws.remove(fds[1])
            ring(fds[1])
            assert ws.wait(0) == []
            assert drain(fds[1]) == 1
    finally:
        for fd in fds:
            os.close(fd)


def test_waitset_non_drained_fd_is_reported_not_read():
    r, w = os.pipe()
    try:
        with WaitSet() as ws:
            ws.add(r, 7, drain=False)
            os.write(w, b"x")
            assert ws.wait(1.0) == [(7, 0)]
            assert ws.wait(0) == [(7, 0)]  # still readable: the data was left alone
            assert os.read(r, 1) == b"x"
            assert ws.wait(0) == []
    finally:
        os.close(r)
        os.close(w)


def test_waitset_more_ready_than_max_events():
    fds = [eventfd() for _ in range(10)]
    try:
        with WaitSet(max_events=3) as ws:
            for i, fd in enumerate(fds):
                ws.add(fd, i)
                ring(fd)
            seen = set()
            for _ in range(4):
                batch = ws.wait(0)
                assert len(batch) <= 3
                seen.update(tag for tag, _ in batch)
            assert seen == set(range(10))
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.timeout(30)
def test_waitset_wakes_from_another_thread():
    fd = eventfd()
    try:
        with WaitSet() as ws:
            ws.add(fd, 0)
            t = call_when_waiting(ring, fd)  # rings once this thread is blocked in epoll_wait
            # the GIL is released while blocked, or the other thread could never ring
            assert ws.wait(20.0) == [(0, 1)]
            t.join()
    finally:
        os.close(fd)


@pytest.mark.timeout(30)
def test_waitset_timeout_returns_empty_after_the_full_time():
    fd = eventfd()
    try:
        with WaitSet() as ws:
            ws.add(fd, 0)
            t0 = time.monotonic()
            assert ws.wait(0.2) == []
            assert time.monotonic() - t0 >= 0.2  # never returns early
    finally:
        os.close(fd)


@pytest.mark.timeout(30)
def test_spurious_wakeup_from_another_reader_is_not_reported():
    """An eventfd drained by someone else between epoll and read is not a wake-up: the
    wait goes on (until its timeout)."""
    fd = eventfd()
    try:
        with WaitSet() as ws:
            ws.add(fd, 0)
            ring(fd)
            out = ffi.new("struct ivshm_fired[]", 4)
            # simulate the other reader: drain before the C wait reads
            assert drain(fd) == 1
            assert lib.ivshm_waitset_wait(ws.fileno(), 50, 0, out, 4, ffi.NULL) == 0
    finally:
        os.close(fd)


def test_waitset_validation_and_close():
    ws = WaitSet()
    with pytest.raises(ConfigError):
        ws.add(0, -1)
    with pytest.raises(ConfigError, match="the wait set's own"):
        ws.add(0, 0x7FFFFFFF)
    with pytest.raises(ConfigError):
        ws.wait(-1)
    ws.close()
    ws.close()  # idempotent
    assert ws.closed
    with pytest.raises(ClosedError):
        ws.wait(0)
    with pytest.raises(ClosedError):
        ws.fileno()
    with pytest.raises(ConfigError):
        WaitSet(max_events=0)


def test_forgotten_waitset_warns_and_closes():
    import gc

    gc.collect()  # earlier tests' garbage (cycles holding fds) must not be counted as ours
    before = fd_count()
    ws = WaitSet()
    assert fd_count() == before + 2  # the epoll fd and the eventfd that close() rings
    with pytest.warns(ResourceWarning):
        del ws
        gc.collect()
    assert fd_count() == before


def test_wait_readable():
    r, w = os.pipe()
    try:
        assert wait_readable(r, 0) is False
        os.write(w, b"x")
        assert wait_readable(r, 1.0) is True
    finally:
        os.close(r)
        os.close(w)


class _Counter:
    def __init__(self):
        self.n = 0

    def __call__(self, *args):
        self.n += 1


def _pester(stop: threading.Event, tid: int, sig: int, every: float = 0.01) -> threading.Thread:
    def run():
        while not stop.wait(every):
            signal.pthread_kill(tid, sig)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.timeout(30)
def test_c_wait_returns_eintr_with_remaining_time():
    """Without IVSHM_WAIT_RESTART a signal ends the C wait with -EINTR and reports the time
    left, so Python can run its handlers."""
    handler = _Counter()
    old = signal.signal(signal.SIGUSR1, handler)
    fd = eventfd()
    stop = threading.Event()
    try:
        with WaitSet() as ws:
            ws.add(fd, 0)
            out = ffi.new("struct ivshm_fired[]", 1)
            left = ffi.new("int *")
            t = _pester(stop, threading.main_thread().ident, signal.SIGUSR1)
            rc = lib.ivshm_waitset_wait(ws.fileno(), 20000, 0, out, 1, left)
            stop.set()
            t.join()
            assert rc == -errno.EINTR
            assert 0 < left[0] <= 20000
            poll_left = ffi.new("int *")
            stop.clear()
            t = _pester(stop, threading.main_thread().ident, signal.SIGUSR1)
            rc = lib.ivshm_wait_readable(fd, 20000, 0, poll_left)
            stop.set()
            t.join()
            assert rc == -errno.EINTR
            assert 0 < poll_left[0] <= 20000
    finally:
        stop.set()
        signal.signal(signal.SIGUSR1, old)
        os.close(fd)
    assert handler.n > 0


@pytest.mark.timeout(30)
def test_c_wait_restart_resumes_with_remaining_timeout():
    """With IVSHM_WAIT_RESTART the C loop itself resumes after signals and still times out
    only once the whole timeout has passed (what a plain C caller wants)."""
    handler = _Counter()
    old = signal.signal(signal.SIGUSR1, handler)
    fd = eventfd()
    stop = threading.Event()
    try:
        with WaitSet() as ws:
            ws.add(fd, 0)
            out = ffi.new("struct ivshm_fired[]", 1)
            left = ffi.new("int *")
            t = _pester(stop, threading.main_thread().ident, signal.SIGUSR1)
            t0 = time.monotonic()
            rc = lib.ivshm_waitset_wait(ws.fileno(), 300, lib.IVSHM_WAIT_RESTART, out, 1, left)
            elapsed = time.monotonic() - t0
            stop.set()
            t.join()
            assert rc == 0
            assert left[0] == 0
            assert elapsed >= 0.3
            # and it still wakes when rung, signals or not
            stop.clear()
            t = _pester(stop, threading.main_thread().ident, signal.SIGUSR1)
            timer = call_when_waiting(ring, fd)
            rc = lib.ivshm_waitset_wait(ws.fileno(), 20000, lib.IVSHM_WAIT_RESTART, out, 1, left)
            stop.set()
            t.join()
            timer.join()
            assert rc == 1 and out[0].count == 1 and out[0].tag == 0
    finally:
        stop.set()
        signal.signal(signal.SIGUSR1, old)
        os.close(fd)
    assert handler.n > 0


@pytest.mark.timeout(30)
def test_python_wait_survives_signals_and_keeps_its_timeout():
    """A Python handler that does not raise: WaitSet.wait() resumes with the time left."""
    handler = _Counter()
    old = signal.signal(signal.SIGUSR1, handler)
    fd = eventfd()
    stop = threading.Event()
    try:
        with WaitSet() as ws:
            ws.add(fd, 5)
            t = _pester(stop, threading.main_thread().ident, signal.SIGUSR1)
            t0 = time.monotonic()
            assert ws.wait(0.3) == []
            assert time.monotonic() - t0 >= 0.3
            timer = call_when_waiting(ring, fd)
            assert ws.wait(20.0) == [(5, 1)]
            stop.set()
            t.join()
            timer.join()
    finally:
        stop.set()
        signal.signal(signal.SIGUSR1, old)
        os.close(fd)
    assert handler.n > 0


_CTRL_C_CHILD = textwrap.dedent(
    """
    import signal
    import sys
    sys.path.insert(0, {root!r})
    from pyivshmem.doorbell import WaitSet, eventfd
    # Python's own Ctrl-C handler even when started with SIGINT ignored (a background job of a
    # shell without job control): that is the process this test is about
    signal.signal(signal.SIGINT, signal.default_int_handler)
    fd = eventfd()
    ws = WaitSet()
    ws.add(fd, 0)
    try:
        print("waiting", flush=True)
        ws.wait({timeout})
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(42)
    print("returned", flush=True)
    sys.exit(0)
    """
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout", [None, 600.0])
def test_ctrl_c_interrupts_a_blocked_wait(timeout):
    child = subprocess.Popen(
        [sys.executable, "-c", _CTRL_C_CHILD.format(root=ROOT, timeout=timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "waiting"
        wait_until_in_wait(child.pid, what="epoll_wait")  # the signal interrupts the blocked wait
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()  # reaps it and closes both pipes, also when the test failed
    assert child.returncode == 42, (out, err)
    assert "interrupted" in out


def _use_as_doorbell(me: Doorbell, other: Doorbell) -> None:
    """Drive two doorbells through the Doorbell protocol's members only, as a Channel does."""
    import select

    from pyivshmem.doorbell import NOTIFY_EVENTFD

    assert isinstance(me.id, int) and isinstance(other.id, int) and me.id != other.id
    assert other.wait(0) == []
    me.notify(other.id, 1)  # notify(peer, vector) rings exactly that vector
    assert select.select([other.fileno()], [], [], 10)[0], "fileno() not readable after notify"
    assert other.wait(5) == [1] and other.wait(0) == []
    kind, fd, value = me.notify_target(other.id, 0)  # ringing from C: an eventfd to write
    assert kind == NOTIFY_EVENTFD and value == 0
    ring(fd)
    vfd = other.vector_fd(0)  # readable when vector 0 fired
    assert wait_readable(vfd, 10) and drain(vfd) == 1
    assert me.notify_target(other.id, 7) is None  # an unknown vector: None, not an error
    me.notify(other.id)  # vector defaults to 0
    assert other.wait(5) == [0]


@pytest.mark.timeout(60)
def test_peer_satisfies_doorbell_protocol(tmp_path):
    """Two Peers of a real Server, used only through the Doorbell protocol's members; and every
    method of the protocol is on Peer and PciDevice with the protocol's parameters (PciDevice's
    ``id`` is an attribute: the VM tests use it)."""
    import inspect

    from pyivshmem import PciDevice, Server
    from pyivshmem.peer import Peer

    for cls in (Peer, PciDevice):
        for name in ("notify", "vector_fd", "notify_target", "wait", "fileno"):
            want = list(inspect.signature(getattr(Doorbell, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls, name)
    sock = str(tmp_path / "s.sock")
    with Server(sock, size="64K", vectors=2) as server:
        server.start()
        with Peer.connect(sock, timeout=10) as a, Peer.connect(sock, timeout=10) as b:
            assert a.notify_target(b.id, 0) is not None  # a learnt of b (drains the server)
            _use_as_doorbell(a, b)
            _use_as_doorbell(b, a)
