"""How many doorbells a Channel rings: none to a side that is awake, exactly one per sleep.

The randomized stress in test_channel.py can only bound doorbells loosely (a consumer that finds a
message right after arming never sleeps, yet may be rung once); here each side's state is set up
and observed (the sleeper is seen blocked in poll through /proc) so the counts are exact, and an
implementation that rang on every message, or never, fails."""
import os
import threading

import pytest
from _fdbell import FdBell, close_fds, make_fds
from _procwait import wait_until_in_wait

from pyivshmem import Channel


@pytest.fixture
def fds():
    f = make_fds([0, 1])
    yield f
    close_fds(f)


def _pair(region, fds, capacity=4):
    ring = region.create_ring("d", slot_size=16, capacity=capacity)
    rx = Channel(ring, FdBell(0, fds), spin=0, recheck=60)
    tx = Channel(region.ring("d"), FdBell(1, fds), spin=0, recheck=60)
    return rx, tx


def test_no_doorbell_while_the_other_side_is_awake(region, fds):
    rx, tx = _pair(region, fds)
    for i in range(1000):
        tx.send(b"%d" % i, timeout=10)
        assert rx.recv(timeout=10) == b"%d" % i  # a message is there: recv never arms
    assert tx.try_send(b"a") and tx.try_send(b"b") and tx.try_send(b"c") and tx.try_send(b"d")
    assert not tx.try_send(b"full")  # a try_ send never sleeps, so it never asks to be rung
    assert rx.recv_many(10) == [b"a", b"b", b"c", b"d"]
    assert tx.stats["doorbells"] == 0 and rx.stats["doorbells"] == 0
    assert rx.stats["sleeps"] == 0 and tx.stats["sleeps"] == 0


@pytest.mark.timeout(60)
def test_a_sleeping_consumer_costs_exactly_one_doorbell(region, fds):
    rx, tx = _pair(region, fds)
    got = []
    receiver = threading.Thread(target=lambda: got.append(rx.recv(timeout=20)), daemon=True)
    receiver.start()
    wait_until_in_wait(os.getpid(), receiver.native_id, what="the consumer's sleep")
    # three messages while it sleeps or wakes: the first send's doorbell clears its flag, so the
    # other two ring nothing
    for m in (b"1", b"2", b"3"):
        assert tx.try_send(m)
    receiver.join(30)
    assert not receiver.is_alive() and got == [b"1"], "the sleeping consumer was never woken"
    assert tx.stats["doorbells"] == 1
    assert rx.stats["sleeps"] >= 1 and rx.stats["wakeups"] == 1
    assert rx.recv_many(10) == [b"2", b"3"]
    assert tx.stats["doorbells"] == 1  # the consumer never armed again


@pytest.mark.timeout(60)
def test_a_producer_asleep_on_a_full_ring_costs_exactly_one_doorbell(region, fds):
    rx, tx = _pair(region, fds)
    assert tx.send_many([b"a", b"b", b"c", b"d"]) == 4
    sender = threading.Thread(target=tx.send, args=(b"e",), kwargs={"timeout": 20}, daemon=True)
    sender.start()
    wait_until_in_wait(os.getpid(), sender.native_id, what="the producer's sleep on a full ring")
    assert [rx.try_recv() for _ in range(3)] == [b"a", b"b", b"c"]  # three slots freed
    sender.join(30)
    assert not sender.is_alive()
    assert rx.stats["doorbells"] == 1 and tx.stats["wakeups"] == 1
    assert rx.recv_many(10) == [b"d", b"e"]
    assert tx.stats["doorbells"] == 0  # the consumer never slept
