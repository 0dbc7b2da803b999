"""Publish-subscribe rings in one process: the API, zero copy, limits, both slow policies, hostile
cursors.  Cross-process streams and signals are in test_pubsub_stream.py."""
import mmap
import os
import struct

import pytest

from pyivshmem import (
    ClosedError, ConfigError, CorruptionError, MessageTooLargeError, PubSubRing, Region,
    Subscriber, SubscriberDroppedError, WaitTimeout,
)

CTRL, CFG, ENTRY = 640, 128, 128


def entry_offset(region, name, index):
    ring = next(r for r in region.rings() if r["name"] == name)
    return ring["offset"] + CTRL + CFG + index * ENTRY


def poke_u64(path, offset, value):
    """Write a 64-bit word into the region file behind the library's back (a hostile peer)."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[offset:offset + 8] = struct.pack("<Q", value)


def test_every_subscriber_gets_every_message(region):
    ring = region.create_ring("ps", kind="pubsub", slot_size=64, capacity=16)
    assert isinstance(ring, PubSubRing) and ring.kind == "pubsub" and ring.slow == "block"
    subs = [ring.subscribe() for _ in range(3)]
    assert all(isinstance(s, Subscriber) for s in subs)
    assert len({s.index for s in subs}) == 3
    for i in range(10):
        assert ring.try_send(b"m%d" % i)
    assert [s.recv_many(100) for s in subs] == [[b"m%d" % i for i in range(10)]] * 3
    assert all(s.try_recv() is None for s in subs)
    for s in subs:
        s.close()


def test_block_publisher_waits_for_the_slowest(region):
    ring = region.create_ring("ps", kind="pubsub", slot_size=16, capacity=4)
    fast, slow = ring.subscribe(), ring.subscribe()
    assert ring.send_many([b"%d" % i for i in range(10)]) == 4
    assert fast.recv_many() == [b"0", b"1", b"2", b"3"]
    assert not ring.try_send(b"4")
    with pytest.raises(WaitTimeout, match=f"subscriber {slow.index}.*4 messages behind"):
        ring.send(b"4", timeout=0.05)
    assert len(slow) == 4
    assert slow.recv() == b"0"
    ring.send(b"4", timeout=1)
    slow.close()  # leaving frees the publisher at once
    assert ring.send_many([b"5", b"6", b"7"], timeout=1) == 3
    assert fast.recv_many() == [b"4", b"5", b"6", b"7"]
    assert ring.stats["cuts"] == 0
    fast.close()


def test_drop_cuts_off_a_slow_subscriber_and_tells_it(region):
    ring = region.create_ring("ps", kind="pubsub", slot_size=16, capacity=8, slow="drop",
                              slow_timeout=0.05)
    fast, slow = ring.subscribe(), ring.subscribe()
    for i in range(40):
        ring.send(b"%d" % i, timeout=5)  # waits out slow_timeout once, then goes on
        assert fast.recv() == b"%d" % i
    assert ring.stats["cuts"] == 1 and ring.stats["last_reason"] == "slow"
    listed = {s["index"]: s for s in ring.subscribers()}
    assert listed[slow.index]["state"] == "dropped" and listed[slow.index]["reason"] == "slow"
    with pytest.raises(SubscriberDroppedError, match="8 messages behind") as e:
        slow.recv_many()
    assert e.value.reason == "slow" and e.value.behind == 8 and e.value.index == slow.index
    assert slow.status()["state"] == "dropped"
    slow.close()
    assert slow.index not in {s["index"] for s in ring.subscribers()}
    fast.close()


@pytest.mark.parametrize("slow", ["block", "drop"])
@pytest.mark.parametrize("forged", [10**6, 2**63, 2**64 - 1])
def test_hostile_cursor_cuts_only_its_owner(region, shm_path, slow, forged):
    ring = region.create_ring("ps", kind="pubsub", slot_size=16, capacity=8, slow=slow)
    good, bad = ring.subscribe(), ring.subscribe()
    for i in range(8):
        ring.send(b"%d" % i, timeout=1)
    assert good.recv_many() == [b"%d" % i for i in range(8)]
    poke_u64(shm_path, entry_offset(region, "ps", bad.index) + 8, forged)
    if slow == "block":
        with pytest.raises(CorruptionError, match=f"outside the publisher's window.*subscriber {bad.index}") as e:
            ring.send(b"8", timeout=1)
        assert e.value.subscriber == bad.index and e.value.ring == "ps"
    ring.send(b"8", timeout=1)
    assert good.recv() == b"8"  # the others' view is untouched
    with pytest.raises(SubscriberDroppedError) as e:
        bad.recv()
    assert e.value.reason == "bad-cursor"
    for i in range(9, 30):
        ring.send(b"%d" % i, timeout=1)
        assert good.recv() == b"%d" % i
    good.close()
    bad.close()


def test_forged_slot_contents_raise_corruption(region, shm_path):
    ring = region.create_ring("ps", kind="pubsub", slot_size=16, capacity=4)
    sub = ring.subscribe()
    ring.send(b"abc")
    slots = next(r for r in region.rings() if r["name"] == "ps")["offset"] + CTRL + CFG + 64 * ENTRY
    poke_u64(shm_path, slots, 1 + 4 * 7)  # a stamp from a later lap nobody announced
    with pytest.raises(CorruptionError, match="overwrote a message"):
        sub.recv()
    poke_u64(shm_path, slots, 1)
    poke_u64(shm_path, slots + 8, 1000)  # a length over the slot size
    with pytest.raises(CorruptionError, match="slot length exceeds"):
        sub.recv()
    poke_u64(shm_path, slots + 8, 3)
    assert sub.recv() == b"abc"
    sub.close()


def test_zero_copy_reserve_commit_peek_release(region):
    ring = region.create_ring("ps", kind="pubsub", slot_size=32, capacity=4)
    a, b = ring.subscribe(), ring.subscribe()
    view = ring.reserve(5)
    view[:] = b"hello"
    ring.commit()
    with pytest.raises(ValueError):
        view[0]  # invalid after commit
    for s in (a, b):
        v = s.peek()
        assert bytes(v) == b"hello"
        s.release()
        with pytest.raises(ValueError):
            bytes(v)
        assert s.peek() is None
    buf = bytearray(3)
    ring.send(b"too long")
    with pytest.raises(MessageTooLargeError, match="stays queued"):
        a.recv_into(buf)
    big = bytearray(16)
    assert a.recv_into(big) == 8 and big[:8] == b"too long"
    with pytest.raises(MessageTooLargeError):
        ring.send(b"x" * 33)
    a.close()
    b.close()


def test_wrong_side_and_closed_handles(region):
    ring = region.create_ring("ps", kind="pubsub", slot_size=16, capacity=4)
    sub = ring.subscribe()
    with pytest.raises(ConfigError, match="subscribe"):
        ring.try_recv()
    with pytest.raises(ConfigError, match="publish through"):
        sub.try_send(b"x")
    sub.close()
    sub.close()
    with pytest.raises(ClosedError):
        sub.recv()
    assert ring.subscribers() == []


def test_64_subscribers_then_a_clear_error(region):
    ring = region.create_ring("ps", kind="pubsub", slot_size=8, capacity=4)
    subs = [ring.subscribe() for _ in range(64)]
    with pytest.raises(ConfigError, match="all 64 subscriber entries are taken"):
        ring.subscribe()
    subs[5].close()
    again = ring.subscribe()
    assert again.index == 5
    ring.send(b"x")
    assert all(s.recv() == b"x" for s in subs if s is not subs[5]) and again.recv() == b"x"
    for s in subs + [again]:
        s.close()


def test_late_join_sees_only_later_messages(region):
    ring = region.create_ring("ps", kind="pubsub", slot_size=8, capacity=8)
    early = ring.subscribe()
    ring.send_many([b"a", b"b"])
    late = ring.subscribe()
    assert late.joined_at == 2 and len(late) == 0
    ring.send(b"c")
    assert late.recv_many() == [b"c"]
    assert early.recv_many() == [b"a", b"b", b"c"]
    early.close()
    late.close()


def test_create_and_open_keep_the_policy(region, shm_path):
    ring = region.create_ring("ps", kind="pubsub", slot_size=8, capacity=8, slow="drop",
                              slow_timeout=2.5)
    again = region.create_ring("ps", kind="pubsub", slot_size=8, capacity=8, slow="drop",
                               slow_timeout=2.5)
    assert again.slow == "drop" and again.slow_timeout == 2.5
    with pytest.raises(ConfigError, match="another slow policy"):
        region.create_ring("ps", kind="pubsub", slot_size=8, capacity=8, slow="block")
    with pytest.raises(ConfigError, match="slow must be"):
        region.create_ring("x", kind="pubsub", slow="sometimes")
    with pytest.raises(ConfigError, match="apply to kind='pubsub'"):
        region.create_ring("y", kind="spsc", slow="drop")
    with Region.open(shm_path) as other:
        opened = other.ring("ps")
        assert isinstance(opened, PubSubRing) and opened.slow == "drop"
        listed = {r["name"]: r for r in other.rings()}
        assert listed["ps"]["kind"] == "pubsub"
        opened.close()
    ring.close()


def test_forgotten_subscriber_warns_and_leaves(region):
    ring = region.create_ring("ps", kind="pubsub", slot_size=8, capacity=4)
    sub = ring.subscribe()
    with pytest.warns(ResourceWarning, match="unclosed"):
        del sub
        import gc
        gc.collect()
    assert ring.subscribers() == []


def test_info_shows_pubsub_rings(shm_path):
    from pyivshmem.info import describe, format_table

    with Region.create(shm_path, "1M") as region:
        ring = region.create_ring("fanout", kind="pubsub", slot_size=8, capacity=8)
        sub = ring.subscribe()
        ring.send_many([b"1", b"2", b"3"])
        sub.recv()
        text = format_table(describe(shm_path))
        assert "fanout" in text and "pubsub" in text
        sub.close()


# -- a model: each subscriber is a deque; under slow="block" a send succeeds iff no deque is full --
from collections import deque  # noqa: E402
import uuid  # noqa: E402

from hypothesis import settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402

CAP = 4


class PubSubAgainstDeques(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.path = f"/dev/shm/pyivshmem-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.region = Region.create(self.path, "1M")
        self.ring = self.region.create_ring("m", kind="pubsub", slot_size=8, capacity=CAP)
        self.subs = []  # (Subscriber, deque)
        self.sent = 0

    def teardown(self):
        for s, _ in self.subs:
            s.close()
        self.ring.close()
        self.region.close()
        os.unlink(self.path)

    @rule(n=st.integers(1, 6))
    def send(self, n):
        msgs = [b"%d" % (self.sent + k) for k in range(n)]
        room = min([CAP - len(q) for _, q in self.subs], default=CAP)
        assert self.ring.send_many(msgs) == min(n, room)
        for _, q in self.subs:
            q.extend(msgs[:min(n, room)])
        self.sent += min(n, room)

    @rule()
    def subscribe(self):
        if len(self.subs) < 5:
            self.subs.append((self.ring.subscribe(), deque()))

    @rule(i=st.integers(0, 4))
    def recv(self, i):
        if self.subs:
            s, q = self.subs[i % len(self.subs)]
            assert s.try_recv() == (q.popleft() if q else None)

    @rule(i=st.integers(0, 4), k=st.integers(0, 6))
    def recv_many(self, i, k):
        if self.subs:
            s, q = self.subs[i % len(self.subs)]
            assert s.recv_many(k) == [q.popleft() for _ in range(min(k, len(q)))]

    @rule(i=st.integers(0, 4))
    def peek_release(self, i):
        if self.subs:
            s, q = self.subs[i % len(self.subs)]
            v = s.peek()
            if q:
                assert bytes(v) == q.popleft()
                s.release()
            else:
                assert v is None

    @rule(i=st.integers(0, 4))
    def leave(self, i):
        if self.subs:
            s, _ = self.subs.pop(i % len(self.subs))
            s.close()

    @invariant()
    def pending_matches(self):
        for s, q in self.subs:
            assert len(s) == len(q)


TestPubSubAgainstDeques = PubSubAgainstDeques.TestCase
TestPubSubAgainstDeques.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# -- doorbells: the publisher's Channel rings every sleeping subscriber; a subscriber's rings the
#    publisher asleep on a full ring.  Re-checks are a minute apart: only a doorbell is faster. ---
import asyncio  # noqa: E402
import threading  # noqa: E402

from _fdbell import FdBell, close_fds, make_fds  # noqa: E402
from pyivshmem import Channel  # noqa: E402


def wait_for(cond, what, timeout=30):
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_subscriber_frees_room_and_wakes_the_sleeping_publisher(region):
    fds = make_fds([0, 1])
    try:
        # slow_timeout an hour: the publisher's channel looks again by itself only every
        # slow_timeout / 4 (and every 60 s here), so only a doorbell wakes it in time
        ring = region.create_ring("ps", kind="pubsub", slot_size=8, capacity=2, slow_timeout=3600)
        sub = ring.subscribe()
        pub_ch = Channel(ring, FdBell(0, fds), spin=0, recheck=60)
        sub_ch = Channel(sub, FdBell(1, fds), spin=0, recheck=60)
        pub_ch.send(b"0")
        pub_ch.send(b"1")
        t = threading.Thread(target=pub_ch.send, args=(b"2",), kwargs={"timeout": 50})
        t.start()
        wait_for(lambda: next(r for r in region.rings() if r["name"] == "ps")["producers_waiting"] == 1,
                 "the publisher never slept")
        assert sub_ch.recv(timeout=5) == b"0"
        t.join(30)
        assert not t.is_alive(), "the publisher was not woken by the subscriber's doorbell"
        assert pub_ch.stats["wakeups"] >= 1 and sub_ch.stats["doorbells"] >= 1
        assert sub_ch.recv_many(10, timeout=5) == [b"1", b"2"]
        pub_ch.close()
        sub_ch.close()
        sub.close()
    finally:
        close_fds(fds)


def test_every_sleeping_subscriber_is_rung_and_asyncio_works(region):
    fds = make_fds([0, 1, 2, 3])
    try:
        ring = region.create_ring("ps", kind="pubsub", slot_size=8, capacity=8, slow_timeout=3600)
        subs = [ring.subscribe() for _ in range(3)]
        chans = [Channel(s, FdBell(i + 1, fds), spin=0, recheck=60) for i, s in enumerate(subs)]
        pub_ch = Channel(ring, FdBell(0, fds), spin=0, recheck=60)
        got = [None] * 2
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, chans[i].recv(timeout=50)))
                   for i in range(2)]
        for th in threads:
            th.start()

        async def third():
            return await chans[2].recv_async(timeout=50)

        async def main():
            task = asyncio.ensure_future(third())
            await asyncio.sleep(0)
            wait_for(lambda: next(r for r in region.rings() if r["name"] == "ps")["consumers_waiting"] >= 2,
                     "the threads never slept")
            while next(r for r in region.rings() if r["name"] == "ps")["consumers_waiting"] < 3:
                await asyncio.sleep(0.001)
            pub_ch.send(b"hi")  # one publish, three sleepers: all are rung
            return await task

        assert asyncio.run(main()) == b"hi"
        for th in threads:
            th.join(30)
        assert got == [b"hi", b"hi"]
        assert pub_ch.stats["doorbells"] == 3
        for c in chans + [pub_ch]:
            c.close()
        for s in subs:
            s.close()
    finally:
        close_fds(fds)


def test_sleeping_publisher_looks_again_within_its_slow_timeout(region):
    """Nobody rings a publisher asleep on a subscriber that stopped reading: its channel looks
    again by itself every slow_timeout / 4, so the cut-off under slow="drop" comes on time even
    with re-checks a minute apart."""
    fds = make_fds([0])
    try:
        ring = region.create_ring("ps", kind="pubsub", slot_size=8, capacity=2, slow="drop",
                                  slow_timeout=0.2)
        stuck = ring.subscribe()
        pub_ch = Channel(ring, FdBell(0, fds), spin=0, recheck=60)
        pub_ch.send(b"0")
        pub_ch.send(b"1")
        pub_ch.send(b"2", timeout=30)  # would take the 60 s re-check without the slow_timeout bound
        assert ring.stats["cuts"] == 1 and ring.stats["last_reason"] == "slow"
        assert pub_ch.stats["sleeps"] >= 1
        with pytest.raises(SubscriberDroppedError):
            stuck.recv()
        pub_ch.close()
        stuck.close()
    finally:
        close_fds(fds)
