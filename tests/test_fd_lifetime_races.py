"""Races and misuse around the fd keeper (docs/wakeup.md, "fd lifetimes"): fork, signal handlers
and a close() that lands between two steps of a call in another thread."""
import os
import signal
import subprocess
import sys
import time

import pytest

from _procwait import is_open

from pyivshmem import ClosedError, InheritedError, Peer
from pyivshmem.doorbell import WaitSet

pytestmark = pytest.mark.timeout(120)


def _in_child(fn) -> int:
    """Run ``fn()`` in a forked child; its return value (0..255) as the child's exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            code = fn()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    return os.WEXITSTATUS(status)


def test_a_waitset_inherited_across_fork_refuses_waits_in_the_child():
    # The child shares the parent's epoll set and its close eventfd: a wait there slept on in an
    # epoll fd that the child's close() then closed under it (it never woke: ringing the close
    # eventfd would end the parent's waits too), and drained the parent's eventfds.
    ws = WaitSet()
    r, w = os.pipe()
    try:
        ws.add(r, 1, drain=False)

        def child():
            for call in (lambda: ws.wait(2), lambda: ws.add(w, 2), lambda: ws.remove(r)):
                try:
                    call()
                except InheritedError:
                    continue
                return 1  # used the parent's epoll set
            ws.close()  # this process's copies only
            return 0

        assert _in_child(child) == 0, "a child used the epoll set it inherited"
        assert ws.wait(0) == [], "the child's close() ended the parent's waits"
        os.write(w, b"x")
        assert ws.wait(5) == [(1, 0)]
    finally:
        ws.close()
        os.close(r)
        os.close(w)


def test_notify_to_myself_racing_close_raises_closed_error(server):
    # close() in another thread can run between notify()'s hold and its look-up (a thread switch
    # at the call of _fds_of): my own vector list was empty by then and notify raised ConfigError
    # ("I have 0 vectors") instead of ClosedError.  The profile hook runs close() at that point.
    peer = Peer.connect(server)
    me = peer.id

    def hook(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "_fds_of":
            sys.setprofile(None)
            peer.close()

    try:
        sys.setprofile(hook)
        with pytest.raises(ClosedError):
            peer.notify(me, 0)
    finally:
        sys.setprofile(None)
        peer.close()


class _Boom(Exception):
    pass


_KILLER = """
import os, signal, sys, time
pid, until = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < until:
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        break
"""


def test_an_exception_from_a_signal_handler_never_leaves_a_waitset_holding_its_fd():
    # A handler raising (KeyboardInterrupt on Ctrl-C) between the keeper's enter() and the try
    # that leaves it: the count never came back to 0, so close() never closed the epoll fd.
    # (Now held by a with statement over C __enter__/__exit__: no gap between the two.)
    def handler(signum, frame):
        if "pyivshmem" in frame.f_code.co_filename:
            raise _Boom()  # only inside pyivshmem's calls, never in this test's own lines

    old = signal.signal(signal.SIGUSR1, handler)
    kept = []
    try:
        for _ in range(8):
            ws = WaitSet()
            kept.append(ws)  # (its keeper's dealloc would close the fd, maybe a reused number)
            ep = ws.fileno()
            killer = subprocess.Popen([sys.executable, "-c", _KILLER, str(os.getpid()), "1.0"])
            try:
                while killer.poll() is None:
                    try:
                        ws.wait(0)
                    except _Boom:
                        pass
            finally:
                killer.wait()
            ws.close()
            assert not is_open(ep), "an interrupted call left the WaitSet's fds held for good"
    finally:
        signal.signal(signal.SIGUSR1, old)


_SERVE = """
import sys, time
from pyivshmem import Server
with Server(sys.argv[1], size="1M", vectors=2):
    time.sleep(float(sys.argv[2]))
"""

_CHURN = """
import sys, time
from pyivshmem import Peer
until = time.monotonic() + float(sys.argv[2])
while time.monotonic() < until:
    Peer.connect(sys.argv[1]).close()
"""


def _fds():
    return set(os.listdir("/proc/self/fd"))


def _drains_racing_close(tmp_path, seconds, until_found):
    """Peers join and leave (another process) while two threads take the server's messages in
    (``peers``) and the main thread closes the Peer under them, round after round.  Returns the
    rounds that left an fd open for good and the errors the readers met other than ClosedError
    (it stops at the first of ``until_found``: "leak" or "error").
    The server runs in another process, so every fd of this one is the Peer's."""
    import random
    import threading

    sock = os.path.join(tmp_path, "srv")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    server = subprocess.Popen([sys.executable, "-c", _SERVE, sock, str(seconds + 60)])
    churn = None
    try:
        for _ in range(500):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        Peer.connect(sock).close()  # the server answers
        churn = subprocess.Popen([sys.executable, "-c", _CHURN, sock, str(seconds + 30)])
        leaked, errors = [], []
        until = time.monotonic() + seconds
        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # many thread switches: close() lands inside the reads
        try:
            while time.monotonic() < until and not {"leak": leaked, "error": errors}[until_found]:
                before = _fds()
                peer = Peer.connect(sock)
                stop = threading.Event()

                def reader():
                    while not stop.is_set():
                        try:
                            peer.peers
                        except ClosedError:
                            return
                        except BaseException as e:  # noqa: B902 - reported below
                            errors.append(e)
                            return

                readers = [threading.Thread(target=reader) for _ in range(2)]
                for t in readers:
                    t.start()
                time.sleep(rng.random() * 0.01)
                peer.close()
                stop.set()
                for t in readers:
                    t.join(30)
                after = _fds() - before
                if after:
                    leaked.append({f: os.readlink(f"/proc/self/fd/{f}") for f in after
                                   if os.path.exists(f"/proc/self/fd/{f}")})
        finally:
            sys.setswitchinterval(old)
        return leaked, errors, seed
    finally:
        for p in (churn, server):
            if p is not None:
                p.terminate()
                p.wait(30)


def test_a_close_racing_reads_of_the_server_socket_leaks_no_fd(tmp_path):
    # close() did not wait for a reader in another thread: the reader stored the fd of a peer
    # that just joined into the closed Peer's tables (or reset the message the reader was
    # filling in C), so that eventfd stayed open for good.
    leaked, errors, seed = _drains_racing_close(tmp_path, 4.0, "leak")
    assert not leaked, f"fds left open after close() (seed {seed}): {leaked}"


def test_concurrent_reads_of_the_server_socket_raise_only_pyivshmem_errors(tmp_path):
    # Two threads' implicit drains polled the same select.poll object at once: RuntimeError
    # ("concurrent poll() invocation") from peers / notify() / wait().
    leaked, errors, seed = _drains_racing_close(tmp_path, 4.0, "error")
    assert not errors, f"seed {seed}: {errors!r}"


def test_a_close_in_a_signal_handler_inside_a_read_of_the_server_socket_leaks_no_fd(server):
    # A signal handler runs in the thread it interrupts, between two steps of its code: here
    # inside the Peer's own read of the server socket, which had just taken in a joining peer's
    # fd.  close() tore the tables down under the read, which then stored the fd into the
    # closed Peer's (new, empty) tables: open for good.  The profile hook runs close() at
    # that point, as a handler would.
    peer = Peer.connect(server)
    other = None
    got = []

    def hook(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "_handle":
            m = frame.f_locals.get("m")
            if m is not None and m.fd >= 0 and not got:
                got.append(m.fd)
                sys.setprofile(None)
                peer.close()

    try:
        other = Peer.connect(server)
        sys.setprofile(hook)
        try:
            for _ in range(200):
                if got:
                    break
                peer.wait(0.05)  # takes the server's messages in
        except ClosedError:
            pass
        finally:
            sys.setprofile(None)
        assert got, "no fd arrived"
        assert peer.closed
        assert not is_open(got[0]), "the fd taken in under the close stayed open"
    finally:
        sys.setprofile(None)
        peer.close()
        if other is not None:
            other.close()


def test_closing_an_inherited_peer_in_a_child_ends_its_own_channel_wait(server, shm_path):
    # A child's thread asleep on a Channel over the Peer it inherited: the child's close() closed
    # the vector fd under the sleep (it never woke until its recheck, then failed with EBADF, or
    # slept on a reused number) instead of ending it with ClosedError.
    import threading

    from pyivshmem import Channel, Region

    sys.path.insert(0, os.path.dirname(__file__))
    from _procwait import wait_until_in_wait

    peer = Peer.connect(server)
    try:
        with Region.create(shm_path, "1M") as region:
            ch = Channel(region.create_ring("q", slot_size=16, capacity=2), peer, vector=0,
                         spin=0, recheck=3600)

            def child():
                out = []

                def recv():
                    try:
                        out.append(ch.recv(timeout=None))
                    except BaseException as e:  # noqa: B902 - judged below
                        out.append(e)

                t = threading.Thread(target=recv, daemon=True)
                t.start()
                wait_until_in_wait(os.getpid(), t.native_id, what="the child's recv")
                peer.close()  # this process's copies
                t.join(10)
                if t.is_alive():
                    return 1  # slept on
                return 0 if isinstance(out[0], ClosedError) else 2

            assert _in_child(child) == 0
    finally:
        peer.close()


def test_a_peer_interrupted_in_its_constructor_is_collected_without_an_error():
    # Ctrl-C inside Peer() (here: raised as its channel set is made) left an object whose
    # __del__ called close(), which failed on the attributes never set (AttributeError,
    # reported as "Exception ignored in: Peer.__del__").
    import gc

    seen = []
    old_hook = sys.unraisablehook

    def hook(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "__init__" and \
                frame.f_code.co_filename.endswith("_weakrefset.py"):
            sys.setprofile(None)
            raise KeyboardInterrupt

    sys.unraisablehook = seen.append
    try:
        sys.setprofile(hook)
        try:
            with pytest.raises(KeyboardInterrupt):
                Peer()
        finally:
            sys.setprofile(None)
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert not [u for u in seen if "Peer" in repr(u.object)], [u.exc_value for u in seen]


def test_a_close_in_a_signal_handler_late_in_events_still_closes_every_fd(server):
    # The handler ran close() inside events() after its read of the socket had finished, but
    # with the read lock still held: the close was left to a read that had already looked
    # for it, and the Peer's fds stayed open for good.  The hook runs close() there.
    peer = Peer.connect(server)
    mine = peer.vector_fd(0)

    def hook(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "drain" and \
                frame.f_back is not None and frame.f_back.f_code.co_name.startswith("_events"):
            sys.setprofile(None)
            peer.close()

    try:
        sys.setprofile(hook)
        try:
            peer.events()
        except ClosedError:
            pass
        finally:
            sys.setprofile(None)
        assert peer.closed, "the hook never ran"
        assert not is_open(mine), "the Peer's fds stayed open after its close()"
    finally:
        sys.setprofile(None)
        peer.close()


@pytest.mark.parametrize("call", ["wait", "fileno"])
def test_a_close_in_a_signal_handler_right_after_the_open_check_raises_closed_error(server, call):
    # close() ran (a signal handler) just after the call's look at _closed: the next line's
    # assert on the wait set raised AssertionError, which is no pyivshmem error.
    peer = Peer.connect(server)

    def hook(frame, event, arg):
        if event == "return" and frame.f_code.co_name == "_live" and \
                frame.f_back is not None and frame.f_back.f_code.co_name == call:
            sys.setprofile(None)
            peer.close()

    try:
        sys.setprofile(hook)
        try:
            with pytest.raises(ClosedError):
                getattr(peer, call)(0) if call == "wait" else peer.fileno()
        finally:
            sys.setprofile(None)
    finally:
        peer.close()


def test_notify_waits_for_another_threads_read_that_took_a_departure_in(server):
    # notify() takes the server's news in first, so a peer that has left is known to have left.
    # Another thread's read had already taken the departure off the socket (nothing left to
    # poll) and was about to apply it: notify() must wait for that read, not see an idle socket
    # and ring the departed peer.  The profile hooks hold the reader at that point and note when
    # the notifier goes for the read lock.
    import threading

    from pyivshmem import ConfigError

    peer = Peer.connect(server)
    other = Peer.connect(server)
    try:
        gone = other.id
        for _ in range(200):
            if gone in peer.peers:
                break
            peer.wait(0.05)
        assert gone in peer.peers, "the other peer never showed up"
        peer.events()
        other.close()
        import select
        assert select.select([peer._sock], [], [], 30)[0], "the departure never arrived"
        in_read, go, at_lock = threading.Event(), threading.Event(), threading.Event()
        results = {}

        def reader_hook(frame, event, arg):
            if event == "call" and frame.f_code.co_name == "_handle":
                sys.setprofile(None)
                in_read.set()
                go.wait(30)

        def reader():
            sys.setprofile(reader_hook)
            try:
                results["events"] = peer.events()
            except BaseException as e:  # pragma: no cover - reported below
                results["events"] = e
            finally:
                sys.setprofile(None)

        def notifier_hook(frame, event, arg):
            if event == "call" and frame.f_code.co_name == "_drain_keeping":
                sys.setprofile(None)
                at_lock.set()

        def notifier():
            sys.setprofile(notifier_hook)
            try:
                peer.notify(gone, 0)
                results["notify"] = "rang"
            except BaseException as e:
                results["notify"] = e
            finally:
                sys.setprofile(None)

        r = threading.Thread(target=reader, daemon=True)
        r.start()
        assert in_read.wait(30), "the reader never took the message in"
        n = threading.Thread(target=notifier, daemon=True)
        n.start()
        while n.is_alive() and not at_lock.is_set():
            n.join(0.001)
        go.set()
        r.join(30)
        n.join(30)
        assert not r.is_alive() and not n.is_alive()
        assert isinstance(results["notify"], ConfigError), \
            f"notify() of the departed peer during the read of its departure: {results!r}"
    finally:
        sys.setprofile(None)
        peer.close()
        other.close()
