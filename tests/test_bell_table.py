"""Channel's wakers ring through the provider's C bell table (csrc/ivshm_doorbell.h), not through
Python's notify_target: a Peer keeps its table in step with the server (a peer that leaves is
cleared before its fds are closed; one that joins with a used id gets its new fds), and a
PciDevice's table is its Doorbell register."""
import os
import select
import struct
import threading
import time

import pytest

from pyivshmem import Channel, Peer, PciDevice, Server

from _fdbell import FdBell
from test_documented_options import _bar0, _fake_device, needs_root

RECHECK = 60  # no test here may be rescued by a re-check: a lost doorbell shows as a timeout
TIMEOUT = 20


def _wait_sleeping(region, ring_name, sleeper, n=1):
    """Until ``n`` consumers are armed on the ring (observed in its control block)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        info = {r["name"]: r for r in region.rings()}[ring_name]
        if info["consumers_waiting"] >= n:
            return
        assert sleeper.result is None, f"the sleeper stopped: {sleeper.result!r}"
        assert time.monotonic() < deadline, f"no consumer went to sleep on {ring_name!r}: {info}"
        time.sleep(0.001)


class _Sleeper:
    """A thread blocked in Channel.recv; .result is the message or the exception."""

    def __init__(self, chan):
        self.chan = chan
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.result = self.chan.recv(timeout=TIMEOUT)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.result = e

    def join(self):
        self.thread.join(TIMEOUT + 10)
        assert not self.thread.is_alive()
        return self.result


def _no_python_resolver(peer):
    def boom(*a, **k):
        raise AssertionError("the channel asked notify_target: it should ring from the C table")
    peer.notify_target = boom


@pytest.mark.timeout(120)
def test_channel_over_peer_rings_from_the_table(tmp_path):
    sock = str(tmp_path / "s.sock")
    with Server(sock, size="1M", vectors=1) as server:
        server.start()
        with Peer.connect(sock, timeout=30) as a, Peer.connect(sock, timeout=30) as b:
            assert isinstance(a._bell_table, int) and a._bell_table > 0
            _no_python_resolver(a)
            ring = a.region.create_ring("r", slot_size=64, capacity=8)
            rx = Channel(b.region.ring("r"), b, spin=0, recheck=RECHECK)
            tx = Channel(ring, a, spin=0, recheck=RECHECK)
            for i in range(20):
                s = _Sleeper(rx)
                _wait_sleeping(a.region, "r", s)
                tx.send(b"m%d" % i)
                assert s.join() == b"m%d" % i
            # every message woke a sleeper by its doorbell; a never had to be told of b (its
            # waker took the server's news in before ringing)
            assert rx.stats["wakeups"] == 20 and tx.stats["doorbells"] == 20
            assert tx.stats["unrouted"] == 0
            assert b.id in a.peers
            for ch in (rx, tx):
                ch.close()


def _successor_is_rung(server, sock, a, tx, bid, pause=0.0):
    """Peer c connects with the id ``bid`` and sleeps on ring "r"; a's channel ``tx`` sends
    (after ``pause`` seconds) and must wake it by its doorbell, from the C table, not by a
    re-check; a then knows c."""
    server._next_id = bid
    with Peer.connect(sock, timeout=30) as c:
        assert c.id == bid
        _no_python_resolver(a)
        rx = Channel(c.region.ring("r"), c, spin=0, recheck=RECHECK)
        s = _Sleeper(rx)
        _wait_sleeping(a.region, "r", s)
        if pause:
            time.sleep(pause)
        tx.send(b"to c")
        assert s.join() == b"to c"
        assert rx.stats["wakeups"] == 1
        assert bid in a.peers
        rx.close()


@pytest.mark.timeout(120)
def test_a_departed_peer_is_never_rung_and_its_successor_with_the_same_id_is(tmp_path):
    """b sleeps and is rung; b leaves; a takes the departure in and its fd numbers are reused by
    unrelated eventfds; a sleeper that claims b's route (a stale entry) must get no ring to those;
    then c joins with b's id (its fds renumbered) and is rung."""
    sock = str(tmp_path / "s.sock")
    with Server(sock, size="1M", vectors=1) as server:
        server.start()
        with Peer.connect(sock, timeout=30) as a:
            ring = a.region.create_ring("r", kind="mpmc", slot_size=64, capacity=8)  # several consumers
            tx = Channel(ring, a, spin=0, recheck=RECHECK)
            b = Peer.connect(sock, timeout=30)
            bid = b.id
            rx = Channel(b.region.ring("r"), b, spin=0, recheck=RECHECK)
            s = _Sleeper(rx)
            _wait_sleeping(a.region, "r", s)
            tx.send(b"to b")
            assert s.join() == b"to b"
            old_fd = a.notify_target(bid, 0)[1]
            a.events()  # the join, taken in by the waker: a.fileno() is quiet again
            rx.close()
            b.close()
            # a learns of the departure (the server's LEFT makes a.fileno() readable)
            deadline = time.monotonic() + TIMEOUT
            while bid in a.peers:
                assert time.monotonic() < deadline, "no LEFT for b"
                select.select([a.fileno()], [], [], 1.0)
                a.events()
            # the freed fd numbers now name unrelated eventfds
            unrelated = []
            try:
                while old_fd not in unrelated:  # the lowest free numbers first
                    unrelated.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
                    assert len(unrelated) < 256, (old_fd, unrelated)
                # a sleeper with b's route arms (as a peer that still thinks it is b could)
                ghost_fds = {bid: [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)]}
                ghost = Channel(ring, FdBell(bid, ghost_fds), spin=0, recheck=RECHECK)
                gs = _Sleeper(ghost)
                _wait_sleeping(a.region, "r", gs)
                tx.send(b"for nobody")
                assert tx.stats["unrouted"] == 1  # claimed, but a knows no such peer
                for fd in unrelated:
                    with pytest.raises(BlockingIOError):
                        os.eventfd_read(fd)  # never rung
                ghost.close()
                gs.join()
                assert ring.try_recv() == b"for nobody"
                os.close(ghost_fds[bid][0])

                # c joins with b's id; a has not been told of c: its waker takes the join in
                _successor_is_rung(server, sock, a, tx, bid)
                for fd in unrelated:
                    with pytest.raises(BlockingIOError):
                        os.eventfd_read(fd)
            finally:
                for fd in unrelated:
                    os.close(fd)
            tx.close()


@pytest.mark.timeout(120)
def test_a_reused_id_not_yet_taken_in_is_rung_after_the_old_fd(tmp_path):
    """b leaves and c joins with b's id while the waker's Peer has taken in neither message: its
    table still names b's fd (open: the departure was not processed).  The wake rings that fd,
    then looks at the server socket, takes the news in, and rings c's new fd: c's sleeper wakes
    by its doorbell, not by a re-check."""
    sock = str(tmp_path / "s.sock")
    with Server(sock, size="1M", vectors=1) as server:
        server.start()
        with Peer.connect(sock, timeout=30) as a:
            ring = a.region.create_ring("r", kind="mpmc", slot_size=64, capacity=8)
            tx = Channel(ring, a, spin=0, recheck=RECHECK)
            b = Peer.connect(sock, timeout=30)
            bid = b.id
            deadline = time.monotonic() + TIMEOUT
            while bid not in a.peers:  # a knows b: its table has b's fd
                assert time.monotonic() < deadline, "no JOINED for b"
                select.select([a.fileno()], [], [], 1.0)
            a.events()
            b.close()
            # the departure reaches a's socket: leave it unread
            assert select.select([a.fileno()], [], [], TIMEOUT)[0], "no LEFT for b"
            _successor_is_rung(server, sock, a, tx, bid, pause=0.002)  # past the watch interval
            tx.close()


@pytest.mark.timeout(60)
def test_a_closed_peer_rings_nobody(tmp_path):
    """Peer.close() clears the table before closing fds: a Channel that outlives its Peer (over a
    ring mapped by someone else) rings no fd, though the fd numbers are reused meanwhile, and
    counts the sleeper it claimed as unrouted."""
    sock = str(tmp_path / "s.sock")
    with Server(sock, size="1M", vectors=1) as server:
        server.start()
        with Peer.connect(sock, timeout=30) as b:
            a = Peer.connect(sock, timeout=30)
            a.events()
            assert b.id in a.peers  # a's table has b's vector
            ring = b.region.create_ring("r", slot_size=64, capacity=8)
            tx = Channel(b.region.ring("r"), a, spin=0, recheck=RECHECK)
            rx = Channel(ring, b, spin=0, recheck=RECHECK)
            s = _Sleeper(rx)
            _wait_sleeping(b.region, "r", s)
            a.close()  # closes a's fds, its copy of b's eventfd among them
            unrelated = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(8)]
            try:
                tx.send(b"x")
                assert tx.stats["unrouted"] == 1 and tx.stats["doorbells"] == 0
                for fd in unrelated:
                    with pytest.raises(BlockingIOError):
                        os.eventfd_read(fd)
            finally:
                for fd in unrelated:
                    os.close(fd)
            assert a._bell_table > 0  # the table lives on with a (the channel holds it)
            rx.close()
            s.join()
            tx.close()


@needs_root
@pytest.mark.timeout(60)
def test_channel_over_pci_device_stores_into_the_doorbell_register(tmp_path):
    root = tmp_path / "sys"
    (root / "bus" / "pci" / "devices").mkdir(parents=True)
    d = _fake_device(root, doorbell=True, ivposition=2)
    with PciDevice.open(vfio=False, sysfs=str(root)) as dev:
        dev.notify_target = None  # not callable: the channel must not need it
        ring = dev.region.create_ring("r", slot_size=64, capacity=8)
        # a sleeper of peer 5, vector 3 (an FdBell: no real guest behind it)
        fds = {5: [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]}
        rx = Channel(dev.region.ring("r"), FdBell(5, fds), vector=3, spin=0, recheck=RECHECK)
        s = _Sleeper(rx)
        _wait_sleeping(dev.region, "r", s)
        tx = Channel(ring, dev, spin=0, recheck=RECHECK)
        tx.send(b"x")
        assert tx.stats["doorbells"] == 1 and tx.stats["unrouted"] == 0
        # one 32-bit store of (peer << 16) | vector into the Doorbell register
        assert struct.unpack_from("<I", _bar0(d), 0x0C)[0] == (5 << 16) | 3
        rx.close()
        s.join()
        tx.close()
    for fd in fds[5]:
        os.close(fd)


@pytest.mark.timeout(120)
def test_a_peer_that_only_sends_through_channels_never_makes_the_server_queue(tmp_path):
    """The channel's waker looks at the sender's server socket (at most once per ms, and on a
    miss) and takes the news in: while peers come and go, the server's backlog for a Peer that
    only rings through a Channel stays small."""
    import socket

    sock = str(tmp_path / "s.sock")
    with Server(sock, size="1M", vectors=1) as server:
        server.start()
        with Peer.connect(sock, timeout=30) as sender, Peer.connect(sock, timeout=30) as receiver:
            ring = sender.region.create_ring("r", slot_size=64, capacity=8)
            tx = Channel(ring, sender, spin=0, recheck=RECHECK)
            rx = Channel(receiver.region.ring("r"), receiver, spin=0, recheck=RECHECK)
            deadline = time.monotonic() + TIMEOUT
            while receiver.id not in sender.peers:  # the sender knows the receiver from here on
                assert time.monotonic() < deadline
                select.select([sender.fileno()], [], [], 1.0)
                sender.events()
            most = 0
            for i in range(200):
                with socket.socket(socket.AF_UNIX) as s:  # a peer comes and goes
                    s.connect(sock)
                assert server.wait_until(
                    lambda p: p == (sender.id, receiver.id) and server.stats["accepted"] == i + 3,
                    10)
                s_ = _Sleeper(rx)
                _wait_sleeping(sender.region, "r", s_)
                time.sleep(0.0011)  # past the watch interval: this ring looks at the socket
                tx.send(b"%d" % i)
                assert s_.join() == b"%d" % i
                receiver.events()
                most = max(most, server.backlog(sender.id))
            # a sender that never read would have had 3 messages queued per cycle
            assert most <= 8, most
            assert tx.stats["doorbells"] == 200 and rx.stats["wakeups"] == 200
            assert sender.events()  # what the waker took in waits for events()
            rx.close()
            tx.close()


class _TableBell:
    """A provider with a C bell table whose entries the test sets, and a watch fd the test makes
    readable: ``on_refresh`` runs inside ``_bell_refresh`` (a Channel's waker took the news in)."""

    def __init__(self, my_id, fds):
        from pyivshmem._ffi_doorbell import ffi, lib
        self._lib = lib
        self.id = my_id
        self.fds = fds
        out = ffi.new("struct ivshm_bell_table **")
        assert lib.ivshm_bell_table_create(lib.IVSHM_BELL_EVENTFD, 15, 1, out) == 0
        self._table = ffi.gc(out[0], lib.ivshm_bell_table_destroy)
        self._bell_table = int(ffi.cast("uintptr_t", self._table))
        self.watch = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.on_refresh = None
        self.refreshes = 0

    def set_fd(self, peer, fd):
        assert self._lib.ivshm_bell_table_set_fd(self._table, peer, 0, fd) == 0

    def stale(self):
        """From now on every waker's look finds news (interval 0: no skipped looks)."""
        os.eventfd_write(self.watch, 1)
        self._lib.ivshm_bell_table_set_watch(self._table, self.watch, 0)

    def vector_fd(self, vector):
        return self.fds[self.id][vector]

    def notify_target(self, peer, vector):
        raise AssertionError("the channel asked notify_target: it should ring from the C table")

    def _bell_refresh(self):
        self.refreshes += 1
        if self.on_refresh is not None:
            self.on_refresh()

    def close(self):
        self._lib.ivshm_bell_table_clear(self._table)
        os.close(self.watch)


@pytest.mark.timeout(120)
def test_a_second_thread_waking_during_the_refresh_does_not_hide_the_first_ring(shm_path):
    """Threads of one process may share a channel.  Thread 1's wake rings a stale entry, then
    takes the provider's news in, which runs Python: the GIL may pass to thread 2, whose wake
    through the same channel rings (and records) another doorbell.  Thread 1 must still ring
    again the entry the refresh changed: its sleeper would otherwise wait for a re-check."""
    from pyivshmem import Region
    from _fdbell import FdBell, close_fds, make_fds

    fds = make_fds([1, 2])
    dummy = make_fds([1, 2])  # what the waker's table names before the refresh: nobody sleeps there
    with Region.create(shm_path, "1M") as region:
        ring = region.create_ring("r", kind="mpmc", slot_size=64, capacity=8)
        bell = _TableBell(0, make_fds([0]))
        tx = Channel(ring, bell, spin=0, recheck=RECHECK)
        rx = [Channel(region.ring("r"), FdBell(p, {p: fds[p]}), spin=0, recheck=RECHECK)
              for p in (1, 2)]
        for p in (1, 2):
            bell.set_fd(p, dummy[p][0])
        sleepers = []
        for ch in rx:
            sleepers.append(_Sleeper(ch))
            _wait_sleeping(region, "r", sleepers[-1], n=len(sleepers))
        second = threading.Event()
        second_done = threading.Event()
        errors = []

        def thread2():
            assert second.wait(TIMEOUT)
            try:
                tx.send(b"two")  # rings the other sleeper, on its right fd now
            except BaseException as e:  # noqa: BLE001 - handed to the test
                errors.append(e)
            second_done.set()

        def on_refresh():
            bell.on_refresh = None  # once
            for p in (1, 2):
                bell.set_fd(p, fds[p][0])  # the entries change: the right fds
            second.set()
            assert second_done.wait(TIMEOUT)  # the GIL passes to thread 2 meanwhile

        t2 = threading.Thread(target=thread2, daemon=True)
        t2.start()
        bell.on_refresh = on_refresh
        bell.stale()
        tx.send(b"one")  # rings a dummy fd, then the look finds news
        t2.join(TIMEOUT)
        assert not errors, errors
        got = sorted(s.join() for s in sleepers)
        assert got == [b"one", b"two"]
        assert sum(ch.stats["wakeups"] for ch in rx) == 2
        for ch in rx + [tx]:
            ch.close()
        bell.close()
    close_fds(fds)
    close_fds(dummy)
    close_fds(bell.fds)


@pytest.mark.timeout(120)
def test_a_refresh_forced_by_a_miss_during_the_wake_still_re_rings_the_entries_rung_before(
        shm_path):
    """A publisher rings every subscriber in one wake.  The first is rung on a stale entry (its
    id was reused: the table still names the departed peer's fd); the second is not in the table
    yet, so its lookup takes the news in (a forced look), which also changes the first entry.
    The look after the wake must ring the first subscriber again on its new fd, although the
    forced look has just consumed the news (and set the next unforced look 10 s away)."""
    from pyivshmem import Region
    from _fdbell import FdBell, close_fds, make_fds

    # peer 7's sleeper takes entry 0 of the sleeper table and peer 2's entry 10 (route % 30):
    # a waker claims 7 first
    fds = make_fds([7, 2])
    dummy = make_fds([7])
    with Region.create(shm_path, "1M") as region:
        region.create_ring("r", "pubsub", slot_size=64, capacity=8)
        pub = region.ring("r")
        subs = [pub.subscribe(), region.ring("r").subscribe()]
        bell = _TableBell(0, make_fds([0]))
        bell.set_fd(7, dummy[7][0])  # stale: peer 7's id now belongs to a new subscriber
        publisher = Channel(pub, bell, spin=0, recheck=RECHECK)
        readers = [Channel(s, FdBell(p, {p: fds[p]}), spin=0, recheck=RECHECK)
                   for p, s in zip((7, 2), subs)]

        def on_refresh():
            os.eventfd_read(bell.watch)  # the news taken in: the watch is quiet again
            for p in (7, 2):
                bell.set_fd(p, fds[p][0])

        bell.on_refresh = on_refresh
        os.eventfd_write(bell.watch, 1)
        bell._lib.ivshm_bell_table_set_watch(bell._table, bell.watch, int(10e9))
        sleepers = []
        for ch in readers:
            sleepers.append(_Sleeper(ch))
            _wait_sleeping(region, "r", sleepers[-1], n=len(sleepers))
        publisher.send(b"news")
        assert [s.join() for s in sleepers] == [b"news", b"news"]
        assert bell.refreshes == 1
        assert bell.refreshes == 1
        assert [ch.stats["wakeups"] for ch in readers] == [1, 1]
        for ch in readers + [publisher]:
            ch.close()
        for s in subs:
            s.close()
        bell.close()
    close_fds(fds)
    close_fds(dummy)
    close_fds(bell.fds)
