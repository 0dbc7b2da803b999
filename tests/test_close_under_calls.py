"""close() from one thread while another thread's call uses the fds with the GIL released.

A blocked Peer.wait() or WaitSet.wait() must end with ClosedError instead of sleeping on forever
(closing an epoll fd does not wake a thread asleep in it), and no fd may be closed under a call
that still uses it: its number could be reused by another file, which the call would then read
or write (docs/wakeup.md, "fd lifetimes")."""
import os
import threading

import pytest
from _procwait import is_open, wait_until_in_wait

from pyivshmem import Channel, ClosedError, Peer, Region
from pyivshmem.doorbell import WaitSet

pytestmark = pytest.mark.timeout(120)


def _in_thread(fn):
    out = []

    def run():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: B902 - reported by the caller
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _closing_ends(call, close, what):
    """``call()`` blocked in another thread; ``close()`` ends it with ClosedError."""
    t, out = _in_thread(call)
    wait_until_in_wait(os.getpid(), t.native_id, what=what)
    close()
    t.join(30)
    assert not t.is_alive(), f"{what} slept on after the close"
    assert len(out) == 1 and isinstance(out[0], ClosedError), out
    return out[0]


@pytest.mark.parametrize("timeout", [None, 60])
def test_closing_a_peer_ends_a_wait_blocked_in_another_thread(server, timeout):
    # It slept on: forever without a timeout, and with one it returned [] at its end, as if
    # nothing had happened.
    peer = Peer.connect(server)
    try:
        err = _closing_ends(lambda: peer.wait(timeout), peer.close, "Peer.wait")
        assert "closed while waiting" in str(err)
    finally:
        peer.close()


def test_closing_a_waitset_ends_a_wait_blocked_in_another_thread_then_closes_its_fds():
    ws = WaitSet()
    r, w = os.pipe()
    try:
        ws.add(r, 3, drain=False)
        ep = ws.fileno()
        _closing_ends(lambda: ws.wait(None), ws.close, "WaitSet.wait")
        assert not is_open(ep)  # closed once the wait had left
        with pytest.raises(ClosedError):
            ws.wait(0)
    finally:
        ws.close()
        os.close(r)
        os.close(w)


def test_a_peers_fds_stay_open_until_the_last_call_using_them_leaves(server):
    # A call inside C (a Channel asleep on a vector, a wait() draining one, a notify() ringing
    # one) holds the Peer's fd keeper; close() meanwhile closes the fds when it leaves.
    peer = Peer.connect(server)
    other = Peer.connect(server)
    try:
        mine, theirs = peer.vector_fd(0), peer.notify_target(other.id, 0)[1]
        assert peer._fdk.enter()  # what a call does before it looks an fd up
        peer.close()
        assert is_open(mine) and is_open(theirs), "closed under a call still using them"
        assert not peer._fdk.enter(), "a call began after close() and was let in"
        peer._fdk.leave()
        assert not is_open(mine) and not is_open(theirs)
    finally:
        peer.close()
        other.close()


def test_a_departed_peers_fds_are_closed_after_a_notify_ringing_them(server):
    # The server's "peer left" closes that peer's fds; a notify() in another thread had looked
    # one up and was about to write to it.
    peer = Peer.connect(server)
    other = Peer.connect(server)
    try:
        assert [e.peer for e in peer.events()] == [other.id]
        theirs = peer.notify_target(other.id, 1)[1]
        assert peer._fdk.enter()  # the notify's hold
        gone = other.id
        other.close()
        for _ in range(200):  # the server's message about it arrives on the socket
            if any(e.peer == gone for e in peer.events()):
                break
            peer.wait(0.05)
        else:
            pytest.fail("the departure never arrived")
        assert is_open(theirs), "the departed peer's fd was closed under the notify"
        peer._fdk.leave()
        assert not is_open(theirs)
        peer.notify(peer.id, 0)  # the Peer itself carries on
        assert peer.wait(5) == [0]
    finally:
        peer.close()
        other.close()


@pytest.mark.parametrize("round_", range(20))
def test_notify_racing_close_never_writes_to_a_file_that_reused_the_number(server, round_):
    # Between notify()'s look-up and its write, close() in another thread closed the fd; the
    # write went to whatever took the number next (here an eventfd the test opens at once).
    peer = Peer.connect(server)
    other = Peer.connect(server)
    decoys = []
    try:
        target = other.id
        start = threading.Event()

        def ring_until_closed():
            start.set()
            n = 0
            while True:
                try:
                    peer.notify(target, n % 2)
                except ClosedError:
                    return n
                n += 1

        t, out = _in_thread(ring_until_closed)
        start.wait(10)
        peer.close()
        for _ in range(16):  # the lowest free numbers: those close() just freed, if it did
            decoys.append(os.eventfd(0, os.EFD_NONBLOCK))
        t.join(30)
        assert not t.is_alive() and len(out) == 1 and isinstance(out[0], int), out
        for fd in decoys:
            with pytest.raises(BlockingIOError):
                os.eventfd_read(fd)  # nothing was written to it
    finally:
        peer.close()
        other.close()
        for fd in decoys:
            os.close(fd)


@pytest.mark.parametrize("round_", range(10))
def test_a_channel_woken_by_its_peers_close_reads_nothing_from_a_reused_number(server, shm_path,
                                                                               round_):
    # Woken by the close, the sleeper settled its doorbell fd (an 8-byte read) after close()
    # had closed it: a file opened meanwhile under that number lost what it held.
    peer = Peer.connect(server)
    decoys = []
    try:
        with Region.create(shm_path, "1M") as region:
            ch = Channel(region.create_ring("q", slot_size=16, capacity=2), peer, vector=0,
                         spin=0, recheck=3600)
            fd = peer.vector_fd(0)
            t, out = _in_thread(lambda: ch.recv(timeout=60))
            wait_until_in_wait(os.getpid(), t.native_id, what="the channel's recv")
            peer.notify(peer.id, 0)  # rung: the sleeper wakes and will settle the fd...
            peer.close()  # ...which close() must not close under it
            while is_open(fd) is False and len(decoys) < 64:  # take the number if it is free
                decoys.append(os.eventfd(5, os.EFD_NONBLOCK))
            t.join(30)
            assert not t.is_alive() and len(out) == 1, out
            assert isinstance(out[0], ClosedError), out
            for d in decoys:
                assert os.eventfd_read(d) == 5  # nothing was taken from it
    finally:
        peer.close()
        for d in decoys:
            os.close(d)
