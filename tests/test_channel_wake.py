"""Channel.wake: messages put or taken outside a channel's own calls (reserve/commit, peek/release)
ring nobody; wake() rings the sleeper of the other side.  The sleepers re-check the ring only
every 600 s, far beyond the test's timeouts: each wait ends only if the doorbell rings."""
import os
import threading

import pytest

from pyivshmem import Channel, ConfigError

from _fdbell import FdBell, close_fds, make_fds
from _procwait import wait_until_in_wait


@pytest.fixture
def bells():
    fds = make_fds([0, 1])
    yield FdBell(0, fds), FdBell(1, fds)
    close_fds(fds)


def _in_thread(fn):
    """Run ``fn`` in a thread; returns (thread, its native id, outcome dict)."""
    out = {}
    started = threading.Event()

    def body():
        out["tid"] = threading.get_native_id()
        started.set()
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            out["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    assert started.wait(10)
    return t, out


def _waiting(region, name, key):
    return next(e for e in region.rings() if e.get("name") == name)[key]


@pytest.mark.parametrize("kind", ["spsc", "mpmc"])
def test_wake_receivers_rings_a_consumer_after_reserve_commit(region, bells, kind):
    region.create_ring("r", kind, slot_size=64, capacity=8)
    prod_ring, cons_ring = region.ring("r"), region.ring("r")
    producer = Channel(prod_ring, bells[0], spin=0, recheck=600)
    consumer = Channel(cons_ring, bells[1], spin=0, recheck=600)
    t, out = _in_thread(lambda: consumer.recv(timeout=20))
    wait_until_in_wait(os.getpid(), out["tid"], what="the consumer's sleep",
                       also=lambda: _waiting(region, "r", "consumers_waiting") >= 1)
    v = prod_ring.reserve(5)
    v[:] = b"hello"
    v.release()
    prod_ring.commit()
    assert producer.wake("receivers") == 1
    t.join(30)
    assert not t.is_alive()
    assert out.get("error") is None, out.get("error")
    assert out["result"] == b"hello"
    assert consumer.stats["wakeups"] >= 1, "woken by the doorbell, not by its timeout"
    producer.close()
    consumer.close()


@pytest.mark.parametrize("kind", ["spsc", "mpmc"])
def test_wake_senders_rings_a_producer_after_peek_release(region, bells, kind):
    region.create_ring("r", kind, slot_size=64, capacity=2)
    prod_ring, cons_ring = region.ring("r"), region.ring("r")
    producer = Channel(prod_ring, bells[0], spin=0, recheck=600)
    consumer = Channel(cons_ring, bells[1], spin=0, recheck=600)
    sent = 0
    while prod_ring.try_send(b"fill %d" % sent):  # fill the ring
        sent += 1
    t, out = _in_thread(lambda: producer.send(b"more", timeout=20))
    wait_until_in_wait(os.getpid(), out["tid"], what="the producer's sleep",
                       also=lambda: _waiting(region, "r", "producers_waiting") >= 1)
    v = cons_ring.peek()
    assert bytes(v) == b"fill 0"
    v.release()
    cons_ring.release()
    assert consumer.wake("senders") == 1
    t.join(30)
    assert not t.is_alive()
    assert out.get("error") is None, out.get("error")
    assert producer.stats["wakeups"] >= 1, "woken by the doorbell, not by its timeout"
    got = [cons_ring.recv() for _ in range(sent)]
    assert got == [b"fill %d" % i for i in range(1, sent)] + [b"more"]
    producer.close()
    consumer.close()


def test_wake_with_nobody_asleep_rings_nobody_and_checks_its_side(region, bells):
    region.create_ring("r", "mpmc", slot_size=64, capacity=8)
    ch = Channel(region.ring("r"), bells[0], spin=0)
    assert ch.wake("receivers") == 0
    assert ch.wake("senders") == 0
    with pytest.raises(ConfigError, match="'senders' or 'receivers'"):
        ch.wake("consumers")
    ch.close()
