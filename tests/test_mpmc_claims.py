"""MPMC claims through the ring API: which slot a handle's peek or reservation holds, the claims
a killed process left (claims()), the message of a dead consumer's claim (read_claimed) and a
dead producer's reservation finished with the message it was to carry (recover(slot, message)):
what a restarted party needs to take over exactly once, without reading shared memory itself."""
import os
import signal

import pytest

from pyivshmem import ConfigError, MessageTooLargeError, Region



def _hold_and_die(path, action, payload=b""):
    """Fork a child that opens the ring, peeks ("peek") or reserves ("reserve", writing
    ``payload`` into the slot), reports the slot's index, and is then SIGKILLed holding it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            os.close(r)
            region = Region.open(path)
            ring = region.ring("q")
            if action == "peek":
                v = ring.peek()
                slot = ring.peeked_slot
            else:
                v = ring.reserve(len(payload) + 4)
                v[:len(payload)] = payload
                slot = ring.reserved_slot
            os.write(w, slot.to_bytes(8, "little"))
            signal.pause()
        finally:
            os._exit(1)
    os.close(w)
    try:
        data = os.read(r, 8)
    finally:
        os.close(r)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert len(data) == 8, "the child died before it held a slot"
    return int.from_bytes(data, "little")


@pytest.fixture
def ring(region):
    region.create_ring("q", "mpmc", slot_size=32, capacity=8)
    r = region.ring("q")
    yield r
    r.close()


def test_peeked_and_reserved_slot_name_the_index_claims_reports(ring):
    assert ring.peeked_slot is None and ring.reserved_slot is None
    for i in range(10):  # wrap once: the index grows past the capacity, the slot position does not
        ring.send(b"m%d" % i)
        assert ring.recv() == b"m%d" % i
    v = ring.reserve(4)
    assert ring.reserved_slot == 10 == ring.head - 1
    assert ring.claims("producer") == [10]
    v[:] = b"abcd"
    ring.commit()
    assert ring.reserved_slot is None and ring.claims("producer") == []
    v = ring.peek()
    assert bytes(v) == b"abcd"
    assert ring.peeked_slot == 10 == ring.tail - 1
    assert ring.claims("consumer") == [10]
    assert ring.claims("consumer", since=11) == []
    v.release()
    ring.release()
    assert ring.peeked_slot is None and ring.claims("consumer") == []
    with pytest.raises(ConfigError, match="'consumer' or 'producer'"):
        ring.claims("consumers")


def test_a_dead_consumers_message_is_read_before_its_claim_is_recovered(ring, shm_path):
    ring.send(b"first")
    ring.send(b"second")
    slot = _hold_and_die(shm_path, "peek")
    assert slot == 0
    assert ring.recv() == b"second"  # others receive past the claim
    assert ring.claims("consumer") == [0]
    assert ring.read_claimed(0) == b"first"
    assert ring.claims("consumer") == [0], "reading leaves the claim"
    with pytest.raises(ConfigError, match="consumer's claim"):
        ring.recover(0, message=b"other")
    assert ring.recover(0) == "consumer"
    assert ring.claims("consumer") == []
    with pytest.raises(ConfigError, match="no consumer holds"):
        ring.read_claimed(0)
    with pytest.raises(ConfigError, match="no consumer holds"):
        ring.read_claimed(1)  # released normally


def test_a_dead_producers_reservation_is_finished_with_the_given_message(ring, shm_path):
    slot = _hold_and_die(shm_path, "reserve", b"torn")
    ring.send(b"after")
    assert ring.claims("producer") == [slot] == [0]
    assert ring.try_recv() is None, "consumers wait at the reservation"
    with pytest.raises(MessageTooLargeError, match="at most 32"):
        ring.recover(slot, message=b"x" * 33)
    assert ring.recover(slot, message=b"the whole message") == "producer"
    assert ring.recv() == b"the whole message"
    assert ring.recv() == b"after"
    assert ring.try_recv() is None, "delivered once"
    with pytest.raises(ConfigError, match="nobody holds"):
        ring.recover(slot, message=b"again")
    with pytest.raises(ConfigError, match="not within a lap"):
        ring.recover(1000, message=b"far")


def test_recover_refuses_the_slot_this_handle_holds(shm_path):
    # recovering one's own open peek or reservation would let others reuse the slot under it:
    # a message lost on release(), or a message overwritten on commit()
    with Region.create(shm_path, "1M") as r:
        a = r.create_ring("m", "mpmc", slot_size=64, capacity=4)
        view = a.reserve(10)
        view[:3] = b"own"
        del view
        with pytest.raises(ConfigError, match="holds that slot itself"):
            a.recover(a.reserved_slot, b"hijack")
        with pytest.raises(ConfigError, match="holds that slot itself"):
            a.recover(a.reserved_slot)
        a.commit(3)
        v = a.peek()
        assert bytes(v) == b"own"
        del v
        with pytest.raises(ConfigError, match="holds that slot itself"):
            a.recover(a.peeked_slot)
        a.release()
        a.send(b"next")
        assert r.ring("m").recv(timeout=0) == b"next"
