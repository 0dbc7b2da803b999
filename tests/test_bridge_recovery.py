"""The bridge's crash windows, one by one: a bridge "killed" at a chosen instruction (its objects
abandoned without any cleanup, as SIGKILL leaves them) and a new one started on the same ring and
state files must neither lose nor repeat a message."""
import os
import random
import threading

import pytest

pytest.importorskip("zmq")

from pyivshmem import Channel  # noqa: E402
from pyivshmem.bridge import (  # noqa: E402
    _I_HINT, _I_IDX, _P_EMPTY, _P_INTO, _P_MPMC, _InStream, _OutStream)


class FakeBridge:
    """What a stream needs of its Bridge, without the network."""

    def __init__(self, region, state_dir, spill_size=64 * 1024):
        self.region, self.doorbell, self.vector = region, None, 0
        self.state_dir, self.spill_size = str(state_dir), spill_size
        self.max_inflight, self.batch, self.idle_wait, self.spin = 100000, 16, 0.05, None
        self._stop = threading.Event()
        self.pokes = 0

    def _poke(self):
        self.pokes += 1

    def _channel(self, ring):
        return Channel(ring)

    def _fail(self, what, e):
        raise AssertionError(f"{what}: {e!r}")


@pytest.fixture
def up(region):
    region.create_ring("up", slot_size=64, capacity=16)
    return region.ring("up")  # the local producer's handle


def test_message_spilled_but_not_released_is_not_taken_twice(region, up, tmp_path):
    fb = FakeBridge(region, tmp_path)
    for i in range(3):
        up.send(b"m%d" % i)
    s = _OutStream(fb, "up", "down")
    v = s.ring.peek()
    s._append(len(v), v)  # in the spill file ...
    v.release()           # ... and killed before the ring slot was released
    s2 = _OutStream(fb, "up", "down")
    assert [(r.seq, r.data) for r in s2.window] == [(1, b"m0")]
    assert s2.m["dropped_on_restart"] == 1
    assert s2.ring.try_recv() == b"m1"  # the next one the new bridge takes


def test_message_taken_into_the_spill_file_before_its_record_survives(region, up, tmp_path):
    fb = FakeBridge(region, tmp_path)
    up.send(b"first")
    long = bytes(range(200))  # four 64-byte slots: taken through the Channel, not peeked
    up.send(long)
    s = _OutStream(fb, "up", "down")
    n = s._probe(0)
    assert n == 5
    s._take_into(n)
    n = s._probe(0)
    assert n == 200
    # _take_into up to the consuming call, then killed before the record is written
    off = s.spill.place(n)
    s.spill.pending_rec.write(_P_INTO, s.next_seq, s.pos, off, n)
    view = s.spill.data_view(off, n)
    assert s.ch.recv_into(view, timeout=0) == n
    view.release()
    s2 = _OutStream(fb, "up", "down")
    assert [(r.seq, r.data) for r in s2.window] == [(1, b"first"), (2, long)]
    assert s2.next_seq == 3 and len(s2.ring) == 0


def test_intent_without_the_consuming_call_takes_nothing(region, up, tmp_path):
    fb = FakeBridge(region, tmp_path)
    up.send(b"still here")
    s = _OutStream(fb, "up", "down")
    off = s.spill.place(10)
    s.spill.pending_rec.write(_P_INTO, s.next_seq, s.pos, off, 10)  # killed right after
    s2 = _OutStream(fb, "up", "down")
    assert list(s2.window) == []
    assert s2.ring.try_recv() == b"still here"


def test_empty_message_taken_by_the_waiting_probe_survives(region, up, tmp_path):
    fb = FakeBridge(region, tmp_path)
    up.send(b"")
    up.send(b"after")
    s = _OutStream(fb, "up", "down")
    s.spill.pending_rec.write(_P_EMPTY, s.next_seq, s.pos, 0, 0)
    assert s.ch.recv_into(bytearray(0), timeout=0) == 0  # the probe took it; killed now
    s2 = _OutStream(fb, "up", "down")
    assert [(r.seq, r.data) for r in s2.window] == [(1, b"")]
    assert s2.ring.try_recv() == b"after"


def test_spill_file_wraps_and_reloads_exactly_the_unacknowledged(region, up, tmp_path):
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    fb = FakeBridge(region, tmp_path)
    s = _OutStream(fb, "up", "down")
    sent = {}
    for round_ in range(40):
        for _ in range(rnd.randrange(1, 12)):
            data = bytes([round_]) * rnd.randrange(0, 64)
            if not s._room(64) or not up.try_send(data):
                break
            v = s.ring.peek()
            s._append(len(v), v)
            v.release()
            s.ring.release()
            sent[s.next_seq - 1] = data
        if s.window and rnd.random() < 0.7:
            s.on_ack(rnd.choice(list(s.window)).seq)
    s2 = _OutStream(fb, "up", "down")
    want = [(r.seq, r.data) for r in s.window]
    assert [(r.seq, r.data) for r in s2.window] == want, f"seed {seed}"
    assert all(sent[q] == d for q, d in want), f"seed {seed}"
    assert s2.next_seq == s.next_seq and s2.acked == s.acked, f"seed {seed}"


@pytest.fixture
def down(region):
    region.create_ring("down", slot_size=64, capacity=64)
    return Channel(region.ring("down"))  # the local consumer


def deliver_until(s, fb, n_delivered):
    t = threading.Thread(target=s.deliver)
    t.start()
    try:
        for _ in range(400):
            if s.delivered >= n_delivered:
                break
            threading.Event().wait(0.01)
    finally:
        fb._stop.set()
        s.close()
        t.join(10)
    fb._stop.clear()


def test_delivered_but_unrecorded_batch_is_not_delivered_again(region, down, tmp_path):
    fb = FakeBridge(region, tmp_path)
    s = _InStream(fb, "down")
    batch = [b"a", b"b" * 100, b"c"]  # the second spans two slots
    assert s.on_data(7, 1, 0, batch) is None
    deliver_until(s, fb, 3)
    assert s.delivered == 3
    # the next batch reaches the ring, and the bridge dies before recording it
    s.ring.send_many([b"d", b"e" * 130])
    s2 = _InStream(fb, "down")
    assert s2.delivered == 3 and s2.skip == 1 + 3
    # the sender resends from 4 (with one more message): only the new one is delivered
    assert s2.on_data(7, 4, 3, [b"d", b"e" * 130, b"f"]) is None
    deliver_until(s2, fb, 6)
    got = down.recv_many(16, timeout=1)
    assert got == [b"a", b"b" * 100, b"c", b"d", b"e" * 130, b"f"]
    assert s2.delivered == 6


def test_duplicates_and_gaps_are_answered_not_delivered(region, down, tmp_path):
    fb = FakeBridge(region, tmp_path)
    s = _InStream(fb, "down")
    assert s.on_data(9, 1, 0, [b"1", b"2"]) is None         # the ring has room: delivered now
    assert s.delivered == 2
    assert s.on_data(9, 1, 0, [b"1", b"2"]) == ("A", 2)      # all seen: acknowledge, drop
    assert s.on_data(9, 5, 0, [b"5"]) == ("N", 2)           # a gap: resend after 2, the last held
    assert s.on_data(9, 5, 0, [b"5"]) is None               # ... once, not per message
    assert s.on_data(9, 2, 0, [b"2", b"3", b"4"]) is None   # overlap: only 3 and 4 are new
    deliver_until(s, fb, 4)
    assert down.recv_many(16, timeout=1) == [b"1", b"2", b"3", b"4"]
    assert s.m["duplicates"] == 3 and s.m["gaps"] == 2


def test_frames_from_the_network_are_checked_before_use():
    from pyivshmem.bridge import _pack, _unpack

    parts = [b"D", b"ring", b"", b"x" * 300]
    assert _unpack(_pack(parts)) == parts
    good = _pack(parts)
    for bad in (b"", b"\x01\x00", good[:-1], good + b"!", b"\x00\x00\x00\x00",
                b"\xff\xff\xff\xff" + b"\x00" * 64, good[:4] + b"\xff\xff\xff\x7f" + good[8:]):
        with pytest.raises(ValueError):
            _unpack(bad)


def test_runs_of_records_from_the_network_are_checked_before_use():
    import struct

    from pyivshmem.bridge import _records

    def rec(seq, msg, pad=True):
        body = struct.pack("<QQII", seq, 0, len(msg), 0) + msg
        return body + b"\0" * (-len(body) % 8 if pad else 0)

    good = rec(7, b"abc") + rec(8, b"") + rec(9, b"x" * 8)
    assert _records(good, 7) == [b"abc", b"", b"x" * 8]
    for bad, first in ((good, 6),                                   # not the seq announced
                       (rec(7, b"a") + rec(9, b"b"), 7),            # a gap inside the run
                       (good[:-1], 7),                              # cut short
                       (good + b"\0" * 8, 7),                       # trailing bytes
                       (rec(7, b"abc")[:20], 7),                    # a header cut short
                       (struct.pack("<QQII", 7, 0, 1 << 30, 0), 7),  # a length past the end
                       (b"", 7)):                                   # no record at all
        with pytest.raises(ValueError):
            _records(bad, first)


def test_garbage_from_the_network_is_dropped_and_the_bridge_keeps_working(region, tmp_path):
    import socket

    import zmq

    from pyivshmem import Bridge

    region.create_ring("down", slot_size=64, capacity=16)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    try:
        with Bridge(region, listen=f"tcp://127.0.0.1:{port}", in_rings=["down"],
                    state_dir=str(tmp_path)) as b:
            d.connect(f"tcp://127.0.0.1:{port}")
            rnd = random.Random(5)
            for _ in range(50):
                d.send(bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 40))))
            d.send(b"\x01\x00\x00\x00\x01\x00\x00\x00Q")           # a valid frame, unknown kind
            d.send(b"\x02\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00HX")  # a hello: answered
            assert d.poll(10_000), "no welcome after the garbage"
            from pyivshmem.bridge import _unpack

            assert _unpack(d.recv())[0] == b"W"
            assert b.metrics()["link"]["bad_frames"] >= 50
            b.check()
    finally:
        d.close(0)
        ctx.term()


def test_unacknowledged_messages_survive_a_reformatted_region(shm_path, tmp_path):
    from pyivshmem import Region

    r = Region.create(shm_path, "1M")
    r.create_ring("up", slot_size=64, capacity=16)
    up = r.ring("up")
    for m in (b"a", b"b", b"c"):
        up.send(m)
    fb = FakeBridge(r, tmp_path)
    s = _OutStream(fb, "up", "down")
    for _ in range(3):
        assert s._probe(0)
        s._take_into(1)
    s.on_ack(1)
    s.close()
    up.close()
    s.ring.close()
    r.close()
    os.unlink(shm_path)
    r = Region.create(shm_path, "1M")  # a new generation, an empty ring
    try:
        r.create_ring("up", slot_size=64, capacity=16)
        r.ring("up").send(b"d")
        fb = FakeBridge(r, tmp_path)
        s2 = _OutStream(fb, "up", "down")
        assert [(x.seq, x.data) for x in s2.window] == [(2, b"b"), (3, b"c")]
        assert s2._probe(0) == 1
        s2._take_into(1)
        s2.ring.close()
        s2.spill.close()
        s3 = _OutStream(FakeBridge(r, tmp_path), "up", "down")  # and again: positions agree
        assert [(x.seq, x.data) for x in s3.window] == [(2, b"b"), (3, b"c"), (4, b"d")]
        assert s3.m["dropped_on_restart"] == 0 and s3.m["lost"] == 0
    finally:
        r.close()


def test_a_new_sender_stream_is_taken_up_after_its_acknowledged_seq(region, down, tmp_path):
    fb = FakeBridge(region, tmp_path)
    s = _InStream(fb, "down")
    assert s.on_data(7, 1, 0, [b"a", b"b"]) is None
    # the sender's spill file was re-created: a new stream id, numbers that start again
    assert s.on_data(8, 5, 4, [b"c"]) is None
    assert (s.sid, s.delivered) == (8, 5)
    s2 = _InStream(fb, "down")  # and a restart keeps it: no skip, the same stream
    assert (s2.sid, s2.delivered, s2.skip) == (8, 5, 0)
    assert s2.on_data(8, 5, 4, [b"c"]) == ("A", 5)
    assert down.recv_many(8, timeout=1) == [b"a", b"b", b"c"]


# -- MPMC rings: the bridge is one consumer (or producer) among several ----------------------------

_DEAD = []  # exports of views held by "killed" handles: a live export keeps their claim


def _kill_holding(view):
    """The handle holding ``view`` dies with its claim: nothing gives the slot back."""
    _DEAD.append(memoryview(view))


@pytest.fixture
def mup(region):
    region.create_ring("mup", "mpmc", slot_size=64, capacity=8)
    return region.ring("mup")  # a producer's (and another consumer's) handle


def test_mpmc_message_peeked_before_its_record_is_spilled_and_its_slot_freed(region, mup, tmp_path):
    fb = FakeBridge(region, tmp_path)
    for i in range(3):
        mup.send(b"m%d" % i)
    s = _OutStream(fb, "mup", "down")
    assert s._take_mpmc(1) == 1  # m0, spilled and released
    s.spill.pending_rec.write(_P_MPMC, s.next_seq, s.ring.tail, 0, 0)
    v = s.ring.peek()            # m1 claimed; killed before it reached the spill file
    assert bytes(v) == b"m1"
    _kill_holding(v)
    s2 = _OutStream(fb, "mup", "down")
    assert [(r.seq, r.data) for r in s2.window] == [(1, b"m0"), (2, b"m1")]
    assert mup.try_recv() == b"m2"  # the other consumer goes on ...
    for i in range(8):               # ... and producers use every slot again
        assert mup.try_send(b"n%d" % i), f"slot {i} still held"


def test_mpmc_message_spilled_but_not_released_is_not_taken_twice(region, mup, tmp_path):
    fb = FakeBridge(region, tmp_path)
    mup.send(b"only")
    mup.send(b"next")
    s = _OutStream(fb, "mup", "down")
    s.spill.pending_rec.write(_P_MPMC, s.next_seq, s.ring.tail, 0, 0)
    v = s.ring.peek()
    idx = s.ring.peeked_slot
    s.spill.write(s.next_seq, idx + 1, bytes(v), len(v))  # in the spill file, not released
    _kill_holding(v)
    s2 = _OutStream(fb, "mup", "down")
    assert [(r.seq, r.data) for r in s2.window] == [(1, b"only")]
    assert s2._take_mpmc(8) == 1 and s2.window[-1].data == b"next"
    for i in range(8):
        assert mup.try_send(b"n%d" % i), f"slot {i} still held"


def test_mpmc_slot_of_another_dead_consumer_is_left_alone(region, mup, tmp_path):
    fb = FakeBridge(region, tmp_path)
    mup.send(b"theirs")
    mup.send(b"ours")
    other = region.ring("mup")
    _kill_holding(other.peek())  # another consumer died holding "theirs"
    s = _OutStream(fb, "mup", "down")
    assert s._take_mpmc(8) == 1
    s2 = _OutStream(fb, "mup", "down")
    assert [(r.seq, r.data) for r in s2.window] == [(1, b"ours")]
    assert s2.ring.claims("consumer") == [0]  # still held: only an operator may recover it


@pytest.fixture
def mdown(region):
    region.create_ring("mdown", "mpmc", slot_size=64, capacity=8)
    return Channel(region.ring("mdown"))  # a consumer (and another producer)


@pytest.mark.parametrize("intent", ["slot", "batch"])
def test_mpmc_slot_reserved_before_a_kill_gets_the_resent_message(region, mdown, tmp_path, intent):
    fb = FakeBridge(region, tmp_path)
    s = _InStream(fb, "mdown")
    assert s.on_data(7, 1, 0, [b"one"]) is None and s.delivered == 1
    s.pending.write(_I_HINT, 2, s.ring.head)
    v = s.ring.reserve(3)  # for seq 2; killed before (batch) or after (slot) its intent
    if intent == "slot":
        s.pending.write(_I_IDX, 2, s.ring.reserved_slot)
        v[:1] = b"t"  # and in the middle of the copy
    _kill_holding(v)
    assert mdown.try_send(b"other")  # another producer's message, after the reserved slot
    s2 = _InStream(fb, "mdown")
    assert s2.delivered == 1 and s2.resume is not None
    assert s2.on_data(7, 2, 1, [b"two", b"three"]) is None  # the sender resends
    assert s2.delivered == 3
    assert mdown.recv_many(8, timeout=1) == [b"one", b"two", b"other", b"three"]


def test_mpmc_message_committed_before_its_record_is_not_delivered_again(region, mdown, tmp_path):
    fb = FakeBridge(region, tmp_path)
    s = _InStream(fb, "mdown")
    assert s.on_data(7, 1, 0, [b"one"]) is None
    s.pending.write(_I_HINT, 2, s.ring.head)
    v = s.ring.reserve(3)
    s.pending.write(_I_IDX, 2, s.ring.reserved_slot)
    v[:] = b"two"
    v.release()
    s.ring.commit()  # in the ring; killed before the state file was written
    s2 = _InStream(fb, "mdown")
    assert s2.delivered == 2 and s2.resume is None
    assert s2.on_data(7, 2, 1, [b"two", b"three"]) is None  # the resend of 2 is dropped
    assert mdown.recv_many(8, timeout=1) == [b"one", b"two", b"three"]


def test_mpmc_reserved_slot_recovered_by_an_operator_meanwhile_is_not_overwritten(
        region, mdown, tmp_path):
    """The predecessor's reservation is finished by someone else (recover(slot): an empty
    message) before the resend comes: the resent message takes a slot of its own, once."""
    fb = FakeBridge(region, tmp_path)
    s = _InStream(fb, "mdown")
    assert s.on_data(7, 1, 0, [b"one"]) is None
    s.pending.write(_I_HINT, 2, s.ring.head)
    v = s.ring.reserve(3)
    slot = s.ring.reserved_slot
    s.pending.write(_I_IDX, 2, slot)
    _kill_holding(v)
    assert mdown.try_send(b"other")
    s2 = _InStream(fb, "mdown")
    assert s2.resume == slot
    assert mdown.ring.recover(slot) == "producer"  # an operator's recovery, as an empty message
    assert s2.on_data(7, 2, 1, [b"two", b"three"]) is None
    assert s2.delivered == 3
    assert mdown.recv_many(8, timeout=1) == [b"one", b"", b"other", b"two", b"three"]
