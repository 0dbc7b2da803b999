"""Rings in one process: semantics against a model, batches, zero copy, large messages."""
import collections
import os
import threading

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from _procwait import wait_until_in_wait

from pyivshmem import ConfigError, MessageTooLargeError, Region, WaitTimeout

KINDS = ["spsc", "mpmc"]


@pytest.mark.parametrize("kind", KINDS)
def test_try_paths_return_values(region, kind):
    ring = region.create_ring("t", kind, slot_size=8, capacity=4)
    assert ring.try_recv() is None
    assert all(ring.try_send(bytes([i])) for i in range(4))
    assert ring.try_send(b"x") is False and len(ring) == 4
    assert [ring.try_recv() for _ in range(4)] == [b"\0", b"\1", b"\2", b"\3"]
    assert ring.try_recv() is None and len(ring) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_empty_and_exact_slot_messages(region, kind):
    ring = region.create_ring("e", kind, slot_size=16, capacity=8)
    for msg in (b"", b"a" * 16, bytearray(b"ba"), memoryview(b"mv")):
        assert ring.try_send(msg)
        assert ring.try_recv() == bytes(msg)


@pytest.mark.parametrize("kind", KINDS)
def test_timeouts(region, kind):
    ring = region.create_ring("w", kind, slot_size=8, capacity=2)
    with pytest.raises(WaitTimeout, match="nothing arrived"):
        ring.recv(timeout=0.02)
    ring.send(b"1", timeout=0)
    ring.send(b"2", timeout=0)
    with pytest.raises(TimeoutError, match="still full"):
        ring.send(b"3", timeout=0.02)
    with pytest.raises(ConfigError):
        ring.recv(timeout=-1)


def test_mpmc_message_limit(region):
    ring = region.create_ring("m", "mpmc", slot_size=8, capacity=4)
    with pytest.raises(MessageTooLargeError, match="SPSC ring, which splits"):
        ring.try_send(b"123456789")


def test_spsc_large_messages_are_split(region):
    ring = region.create_ring("big", slot_size=100, capacity=16)
    assert ring.max_message == 1600
    for n in (101, 199, 200, 201, 1599, 1600):
        data = os.urandom(n)
        assert ring.try_send(data)
        assert len(ring) == -(-n // 100)
        assert ring.recv(timeout=1) == data
    with pytest.raises(MessageTooLargeError, match="at most 1600 bytes"):
        ring.try_send(b"x" * 1601)
    # a message needing more slots than are free waits, and does not tear
    ring.try_send(b"a" * 900)
    assert ring.try_send(b"b" * 800) is False
    assert ring.try_recv() == b"a" * 900
    assert ring.try_send(b"b" * 800) and ring.try_recv() == b"b" * 800


def test_spsc_large_wraps_around(region):
    ring = region.create_ring("wrap", slot_size=10, capacity=8)
    for i in range(50):
        data = bytes([i]) * (5 + (i * 7) % 70)
        assert ring.try_send(data)
        assert ring.try_recv() == data


@pytest.mark.parametrize("kind", KINDS)
def test_send_many_recv_many(region, kind):
    ring = region.create_ring("b", kind, slot_size=16, capacity=64)
    msgs = [b"m%03d" % i for i in range(100)]
    assert ring.send_many(msgs) == 64
    assert ring.send_many(msgs[64:]) == 0
    got = ring.recv_many(10)
    assert got == msgs[:10]
    with pytest.raises(ConfigError, match="sequence"):
        ring.send_many(iter(msgs[64:74]))  # its unsent rest could not be retried
    assert ring.send_many(msgs[64:74]) == 10
    got += ring.recv_many(1000)
    assert got == msgs[:74]
    assert ring.recv_many(5) == [] and ring.recv_many(0) == []
    assert ring.send_many([]) == 0


def test_send_many_mixed_buffers_and_errors(region):
    ring = region.create_ring("mix", slot_size=8, capacity=16)
    assert ring.send_many([b"a", bytearray(b"b"), memoryview(b"c"), b"d"]) == 4
    assert ring.recv_many() == [b"a", b"b", b"c", b"d"]
    with pytest.raises(MessageTooLargeError, match="the 1 before it were sent"):
        ring.send_many([b"ok", b"x" * 1000])
    assert ring.recv_many() == [b"ok"]
    with pytest.raises(TypeError):
        ring.send_many([b"ok", 5])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_send_many_with_timeout_waits_for_room(region, kind):
    ring = region.create_ring("tw", kind, slot_size=8, capacity=4)
    # nobody frees room: it sends what fits, waits out its timeout, and says how many it sent
    assert ring.send_many([b"1"] * 10, timeout=0.05) == 4
    assert ring.recv_many(10) == [b"1"] * 4
    # a receiver frees room only once the sender is seen asleep on the full ring: the rest goes
    msgs = [b"%d" % i for i in range(10)]
    got = []
    me = threading.get_native_id()
    consumer = region.ring("tw")

    def receive_once_sender_blocked():
        wait_until_in_wait(os.getpid(), me, sleep=True, what="the sender's wait for room",
                           also=lambda: len(consumer) == 4)
        got.extend(consumer.recv(timeout=30) for _ in range(len(msgs)))

    t = threading.Thread(target=receive_once_sender_blocked, daemon=True)
    t.start()
    assert ring.send_many(msgs, timeout=30) == 10
    t.join(30)
    assert not t.is_alive() and got == msgs


@pytest.mark.parametrize("kind", KINDS)
def test_recv_into(region, kind):
    ring = region.create_ring("ri", kind, slot_size=32, capacity=4)
    buf = bytearray(8)
    assert ring.recv_into(buf) is None
    ring.try_send(b"hello")
    assert ring.recv_into(buf) == 5 and buf[:5] == b"hello"
    ring.try_send(b"0123456789")
    with pytest.raises(MessageTooLargeError, match="buffer holds 8"):
        ring.recv_into(buf)
    big = bytearray(32)
    assert ring.recv_into(big) == 10 and big[:10] == b"0123456789"
    with pytest.raises((TypeError, ValueError, BufferError)):
        ring.try_send(b"x")
        ring.recv_into(b"readonly")


@pytest.mark.parametrize("kind", KINDS)
def test_zero_copy(region, kind):
    ring = region.create_ring("z", kind, slot_size=16, capacity=2)
    view = ring.reserve(10)
    view[:5] = b"abcde"
    with pytest.raises(ConfigError, match="already open"):
        ring.reserve(3)
    ring.commit(5)
    with pytest.raises(ValueError):
        view[0] = 1  # released at commit
    with pytest.raises(ConfigError, match="without reserve"):
        ring.commit()
    with pytest.raises(MessageTooLargeError):
        ring.reserve(17)
    ring.try_send(b"second")
    assert ring.reserve(1) is None  # full
    p = ring.peek()
    assert bytes(p) == b"abcde" and p.readonly
    with pytest.raises(ConfigError, match="still held"):
        ring.peek()
    ring.release()
    with pytest.raises(ConfigError, match="without peek"):
        ring.release()
    assert ring.try_recv() == b"second"
    assert ring.peek() is None


def test_spsc_peek_of_split_message(region):
    ring = region.create_ring("ps", slot_size=4, capacity=8)
    ring.try_send(b"0123456789")
    with pytest.raises(MessageTooLargeError, match="spans 3 slots"):
        ring.peek()
    assert ring.recv() == b"0123456789"


def test_two_handles_share_state(shm_path):
    with Region.create(shm_path, "1M") as r1, Region.open(shm_path) as r2:
        tx = r1.create_ring("q", slot_size=8, capacity=8)
        rx = r2.ring("q")
        tx.send_many([b"a", b"b"])
        assert rx.recv_many() == [b"a", b"b"]
        # a re-opened consumer continues after what was consumed
        tx.try_send(b"c")
        assert r2.ring("q").try_recv() == b"c"


class RingModel(RuleBasedStateMachine):
    """Any sequence of operations behaves like a bounded deque."""

    kind = "spsc"

    def __init__(self):
        super().__init__()
        import uuid

        self.path = f"/dev/shm/pyivshmem-hyp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.region = Region.create(self.path, "256K")
        self.slot = 12
        self.cap = 8
        self.ring = self.region.create_ring("m", self.kind, slot_size=self.slot, capacity=self.cap)
        self.model = collections.deque()
        self.stashed = False  # MPMC: a message too large for recv_into waits outside the ring

    def teardown(self):
        self.ring.close()
        self.region.close()
        os.unlink(self.path)

    def slots_used(self):
        if self.kind == "mpmc":
            return len(self.model) - self.stashed
        return sum(max(1, -(-len(m) // self.slot)) for m in self.model)

    def fits(self, msg):
        need = 1 if self.kind == "mpmc" else max(1, -(-len(msg) // self.slot))
        return self.slots_used() + need <= self.cap

    def max_len(self):
        return self.slot if self.kind == "mpmc" else self.slot * self.cap

    @rule(data=st.binary(max_size=40))
    def try_send(self, data):
        if len(data) > self.max_len():
            with pytest.raises(MessageTooLargeError):
                self.ring.try_send(data)
            return
        ok = self.ring.try_send(data)
        assert ok == self.fits(data)
        if ok:
            self.model.append(data)

    @rule(msgs=st.lists(st.binary(max_size=12), max_size=12))
    def send_many(self, msgs):
        n = self.ring.send_many(msgs)
        expected = 0
        for m in msgs:
            if not self.fits(m):
                break
            self.model.append(m)
            expected += 1
        assert n == expected

    @rule()
    def try_recv(self):
        got = self.ring.try_recv()
        assert got == (self.model.popleft() if self.model else None)
        self.stashed = False

    @rule(n=st.integers(0, 10))
    def recv_many(self, n):
        got = self.ring.recv_many(n)
        want = [self.model.popleft() for _ in range(min(n, len(self.model)))]
        assert got == want
        if want:
            self.stashed = False

    @rule(size=st.integers(0, 12), data=st.binary(max_size=12))
    def zero_copy_send(self, size, data):
        view = self.ring.reserve(size)
        if view is None:
            assert not self.fits(b"")
            return
        payload = data[:size]
        view[: len(payload)] = payload
        self.ring.commit(len(payload))
        self.model.append(payload)

    @precondition(lambda self: True)
    @rule()
    def peek_release(self):
        try:
            view = self.ring.peek()
        except MessageTooLargeError:
            assert len(self.model[0]) > self.slot
            return
        if view is None:
            assert not self.model
            return
        assert bytes(view) == self.model[0]
        self.ring.release()
        self.model.popleft()
        self.stashed = False

    @rule(size=st.integers(0, 40))
    def recv_into(self, size):
        buf = bytearray(size)
        if not self.model:
            assert self.ring.recv_into(buf) is None
            return
        if len(self.model[0]) > size:
            with pytest.raises(MessageTooLargeError):
                self.ring.recv_into(buf)
            return  # the message stays in the ring, for both kinds
        n = self.ring.recv_into(buf)
        assert bytes(buf[:n]) == self.model.popleft()
        self.stashed = False

    @invariant()
    def length_matches(self):
        if self.kind == "mpmc":
            assert len(self.ring) == len(self.model)
        else:
            assert len(self.ring) == self.slots_used()


class MpmcModel(RingModel):
    kind = "mpmc"


TestSpscModel = RingModel.TestCase
TestSpscModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestMpmcModel = MpmcModel.TestCase
TestMpmcModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
