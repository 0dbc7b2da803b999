"""Channel.wake: messages put or taken outside a channel's own calls (reserve/commit, peek/release)
ring nobody; wake() rings the sleeper of the other side.  The sleepers re-check the ring only
every 600 s, far beyond the test's timeouts: each wait ends only if the doorbell rings."""
import os
import threading

import pytest

from pyivshmem import Channel, ConfigError

from _fdbell import FdBell, close_fds, make_fds
from _procwait import wait_until_in_wait
from test_chan_wakeup import _blocked


@pytest.fixture
def bells():
    fds = make_fds([0, 1])
    yield FdBell(0, fds), FdBell(1, fds)
    close_fds(fds)


@pytest.fixture(params=["spsc", "mpmc"])
def pair(request, region, bells):
    """A ring "r" of 2 slots; (producer's ring, consumer's ring, their Channels), each side
    re-checking only every 600 s."""
    region.create_ring("r", request.param, slot_size=64, capacity=2)
    prod_ring, cons_ring = region.ring("r"), region.ring("r")
    producer = Channel(prod_ring, bells[0], spin=0, recheck=600)
    consumer = Channel(cons_ring, bells[1], spin=0, recheck=600)
    yield prod_ring, cons_ring, producer, consumer
    producer.close()
    consumer.close()


def _asleep_in_thread(fn, region, waiting):
    """Run ``fn`` (a blocking Channel call) in a thread and return (thread, outcome dict) once
    that thread sleeps in its wait and the ring counts a sleeper in ``waiting``."""
    known = threading.Event()  # set once the thread's id is known
    tid = []

    def call():
        tid.append(threading.get_native_id())
        known.set()
        return fn()

    t, out = _blocked(call, threading.Event())
    assert known.wait(10)
    count = lambda: next(e for e in region.rings() if e.get("name") == "r")[waiting]  # noqa: E731
    wait_until_in_wait(os.getpid(), tid[0], what=f"the sleep ({waiting})",
                       also=lambda: count() >= 1)
    return t, out


def _finished(t, out):
    t.join(30)
    assert not t.is_alive()
    assert out.get("error") is None, out.get("error")
    return out["value"]


def test_wake_receivers_rings_a_consumer_after_reserve_commit(region, pair):
    prod_ring, _, producer, consumer = pair
    t, out = _asleep_in_thread(lambda: consumer.recv(timeout=20), region, "consumers_waiting")
    v = prod_ring.reserve(5)
    v[:] = b"hello"
    v.release()
    prod_ring.commit()
    assert producer.wake("receivers") == 1
    assert _finished(t, out) == b"hello"
    assert consumer.stats["wakeups"] >= 1, "woken by the doorbell, not by its timeout"


def test_wake_senders_rings_a_producer_after_peek_release(region, pair):
    prod_ring, cons_ring, producer, consumer = pair
    sent = 0
    while prod_ring.try_send(b"fill %d" % sent):  # fill the ring
        sent += 1
    t, out = _asleep_in_thread(lambda: producer.send(b"more", timeout=20), region,
                               "producers_waiting")
    v = cons_ring.peek()
    assert bytes(v) == b"fill 0"
    v.release()
    cons_ring.release()
    assert consumer.wake("senders") == 1
    _finished(t, out)
    assert producer.stats["wakeups"] >= 1, "woken by the doorbell, not by its timeout"
    got = [cons_ring.recv() for _ in range(sent)]
    assert got == [b"fill %d" % i for i in range(1, sent)] + [b"more"]


def test_wake_with_nobody_asleep_rings_nobody_and_checks_its_side(region, bells):
    region.create_ring("r", "mpmc", slot_size=64, capacity=8)
    ch = Channel(region.ring("r"), bells[0], spin=0)
    assert ch.wake("receivers") == 0
    assert ch.wake("senders") == 0
    with pytest.raises(ConfigError, match="'senders' or 'receivers'"):
        ch.wake("consumers")
    ch.close()


def test_wake_receivers_of_a_publisher_rings_every_subscriber(region):
    fds = make_fds([0, 1, 2])
    try:
        region.create_ring("r", "pubsub", slot_size=64, capacity=8)
        pub = region.ring("r")
        subs = [pub.subscribe(), region.ring("r").subscribe()]
        publisher = Channel(pub, FdBell(0, fds), spin=0, recheck=600)
        readers = [Channel(s, FdBell(i + 1, fds), spin=0, recheck=600) for i, s in enumerate(subs)]
        waits = [_asleep_in_thread(lambda ch=ch: ch.recv(timeout=20), region, "consumers_waiting")
                 for ch in readers]
        v = pub.reserve(4)
        v[:] = b"news"
        v.release()
        pub.commit()
        assert publisher.wake("receivers") == 2
        assert [_finished(t, out) for t, out in waits] == [b"news", b"news"]
        assert all(ch.stats["wakeups"] >= 1 for ch in readers), "woken by doorbells"
        for ch in readers + [publisher]:
            ch.close()
        for s in subs:
            s.close()
    finally:
        close_fds(fds)
