"""One test (or a few) per defect of issue 12 that concerns rings, regions and errors.

Each names the defect's number; each fails on the code before the fix.  (Defect 9, in the C API,
is covered by tests/c/test_mpmc.c: mpmc_short_buffers_keep_messages; the directory lock of
defect 10 also by tests/c/test_region.c: region_dead_lock_holder_taken_over.)
"""
from __future__ import annotations

import errno
import gc
import math
import mmap
import multiprocessing as mp
import os
import signal
import struct

import pytest

from pyivshmem import (
    ClosedError,
    ConfigError,
    CorruptionError,
    IvshmemError,
    MessageTooLargeError,
    Region,
    StallError,
    WaitTimeout,
    error_from_code,
)
from pyivshmem.errors import (
    AlreadyExistsError,
    RegionFullError,
    RingNotFoundError,
    ViewInUseError,
)

CTX = mp.get_context("spawn")
KINDS = ["spsc", "mpmc"]


def kill_and_reap(p, timeout=30.0):
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
    p.join(timeout)
    assert p.exitcode is not None, "child did not die"


# -- 3: a handle with an open reservation or peek refuses other sends / receives ------------------

@pytest.mark.parametrize("kind", KINDS)
def test_3_send_between_reserve_and_commit_is_refused(region, kind):
    ring = region.create_ring("r", kind, slot_size=16, capacity=8)
    view = ring.reserve(5)
    view[:] = b"hello"
    for send in (lambda: ring.try_send(b"other"), lambda: ring.send(b"other", timeout=0),
                 lambda: ring.send_many([b"other"])):
        with pytest.raises(ConfigError, match="open reservation"):
            send()
    ring.commit()
    assert ring.try_recv() == b"hello"
    assert ring.try_recv() is None  # nothing else was published, no zeros


@pytest.mark.parametrize("kind", KINDS)
def test_3_receive_between_peek_and_release_is_refused(region, kind):
    ring = region.create_ring("p", kind, slot_size=16, capacity=8)
    for m in (b"first", b"second", b"third"):
        assert ring.try_send(m)
    view = ring.peek()
    assert bytes(view) == b"first"
    for recv in (ring.try_recv, lambda: ring.recv(timeout=0), lambda: ring.recv_many(5),
                 lambda: ring.recv_into(bytearray(16))):
        with pytest.raises(ConfigError, match="peeked message"):
            recv()
    ring.release()
    assert ring.recv_many(5) == [b"second", b"third"]  # nothing was dropped


# -- 4 and 15: a slice of a view kept after commit/release raises instead of touching a later message

@pytest.mark.parametrize("kind", KINDS)
def test_4_slice_kept_after_commit_cannot_write_a_later_message(region, kind):
    ring = region.create_ring("s", kind, slot_size=16, capacity=2)
    view = ring.reserve(8)
    part = view[2:6]
    view[:] = b"AAAAAAAA"
    ring.commit()
    assert ring.try_recv() == b"AAAAAAAA"
    assert ring.try_send(b"BBBBBBBB")  # reuses slots
    assert ring.try_send(b"CCCCCCCC")
    for write in (lambda: part.__setitem__(slice(0, 4), b"XXXX"), lambda: view.__setitem__(0, 88)):
        with pytest.raises(ClosedError, match="no longer valid"):
            write()
    assert ring.recv_many(2) == [b"BBBBBBBB", b"CCCCCCCC"]


@pytest.mark.parametrize("kind", KINDS)
def test_15_slice_of_a_peek_cannot_read_a_later_message(region, kind):
    ring = region.create_ring("s", kind, slot_size=16, capacity=2)
    ring.try_send(b"one")
    view = ring.peek()
    part = view[0:3]
    assert bytes(part) == b"one" and part == b"one"
    ring.release()
    ring.try_send(b"two")
    ring.try_send(b"333")
    for read in (lambda: bytes(part), part.tobytes, lambda: part[0], lambda: len(part)):
        with pytest.raises(ClosedError):
            read()
    assert ring.recv_many(2) == [b"two", b"333"]


@pytest.mark.parametrize("kind", KINDS)
def test_4_raw_export_blocks_commit_until_released(region, kind):
    ring = region.create_ring("x", kind, slot_size=16, capacity=4)
    view = ring.reserve(4)
    raw = memoryview(view)
    raw[:] = b"data"
    with pytest.raises(ViewInUseError, match="export"):
        ring.commit()
    assert isinstance(ViewInUseError("x"), BufferError)
    raw.release()
    ring.commit()
    assert ring.try_recv() == b"data"


# -- 5: an MPMC reservation dropped without commit does not stall the ring ------------------------

def test_5_mpmc_reserve_then_close_keeps_the_ring_moving(region):
    ring = region.create_ring("m", "mpmc", slot_size=16, capacity=4)
    other = region.ring("m")
    view = ring.reserve(8)
    view[:4] = b"half"
    assert other.try_send(b"after")  # a producer behind the reservation
    ring.close()
    assert other.recv(timeout=5) == b""  # committed empty: consumers move past it
    assert other.recv(timeout=5) == b"after"
    with pytest.raises(ClosedError):
        bytes(view)


def test_5_mpmc_reserve_then_close_as_last_claim_hands_the_slot_back(region):
    ring = region.create_ring("m", "mpmc", slot_size=16, capacity=4)
    other = region.ring("m")
    ring.reserve(8)
    ring.close()
    assert len(other) == 0 and other.stalled() is None
    assert other.try_send(b"x") and other.try_recv() == b"x"


def test_5_mpmc_reservation_dropped_by_an_exception_does_not_stall(region):
    other = region.create_ring("m", "mpmc", slot_size=16, capacity=4)

    def producer():
        ring = region.ring("m")
        view = ring.reserve(8)
        view[:2] = b"ha"
        raise RuntimeError("failed before commit")

    with pytest.raises(RuntimeError):
        producer()
    gc.collect()  # the handle is gone: its reservation was given back
    assert other.try_send(b"next")
    assert other.recv(timeout=5) == b"next"


def test_5_cancel_gives_the_reservation_back(region):
    ring = region.create_ring("m", "mpmc", slot_size=16, capacity=4)
    view = ring.reserve(8)
    ring.cancel()
    with pytest.raises(ClosedError):
        view[0] = 1
    assert ring.try_send(b"y") and ring.try_recv() == b"y"


# -- 6: MPMC recv_into keeps no private stash ------------------------------------------------------

def test_6_mpmc_recv_into_small_buffer_leaves_the_message_for_everyone(region):
    ring = region.create_ring("m", "mpmc", slot_size=32, capacity=4)
    other = region.ring("m")
    ring.try_send(b"0123456789")
    with pytest.raises(MessageTooLargeError, match="stays in the ring"):
        ring.recv_into(bytearray(4))
    assert len(ring) == 1
    ring.close()  # nothing is lost with the handle
    assert other.try_recv() == b"0123456789"


# -- 7: send_many(generator) does not lose the unsent tail ------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_7_send_many_refuses_iterators_without_consuming_them(region, kind):
    ring = region.create_ring("g", kind, slot_size=8, capacity=2)
    gen = (b"m%d" % i for i in range(5))
    with pytest.raises(ConfigError, match="sequence"):
        ring.send_many(gen)
    assert next(gen) == b"m0"  # untouched
    msgs = [b"m%d" % i for i in range(5)]
    n = ring.send_many(msgs)
    assert n == 2 and ring.recv_many(5) == msgs[:n]  # the rest is msgs[n:]


# -- 10 and 16: a dead MPMC consumer is reported, and recovered ------------------------------------

def _peek_and_hold(path, conn):
    with Region.open(path) as r:
        ring = r.ring("q")
        view = ring.peek()
        conn.send(bytes(view))
        conn.recv()  # killed while waiting here


def _recv_claim_and_hold(path, conn):
    # the state a consumer killed inside recv() leaves: a claimed, unreleased slot
    from pyivshmem import _ring  # noqa: F401  (the module is what a consumer runs)

    with Region.open(path) as r:
        ring = r.ring("q")
        view = ring.peek()  # peek claims exactly as recv does before it copies
        conn.send(bytes(view))
        conn.recv()


@pytest.mark.parametrize("child", [_peek_and_hold, _recv_claim_and_hold])
def test_10_16_dead_consumer_reported_as_stall_then_recovered(shm_path, child):
    with Region.create(shm_path, "1M") as region:
        ring = region.create_ring("q", "mpmc", slot_size=32, capacity=4)
        for m in (b"a", b"b", b"c"):
            assert ring.try_send(m)
        parent, conn = CTX.Pipe()
        p = CTX.Process(target=child, args=(shm_path, conn))
        p.start()
        try:
            assert parent.poll(60)
            assert parent.recv() == b"a"
        finally:
            kill_and_reap(p)
        assert ring.recv(timeout=5) == b"b" and ring.recv(timeout=5) == b"c"
        assert ring.try_send(b"d")
        assert ring.stalled() is None or ring.stalled() == 0
        with pytest.raises(StallError, match="slot 0") as exc:
            ring.send(b"e", timeout=0.2)
        assert exc.value.slot == 0 and exc.value.side == "consumer"
        assert "recover(0)" in str(exc.value)
        assert ring.stalled() == 0
        with pytest.raises(StallError) as exc:
            ring.send_many([b"e", b"f"], timeout=0.2)
        assert exc.value.sent == 0
        assert ring.recover(0) == "consumer"
        assert ring.stalled() is None
        ring.send(b"e", timeout=5)
        assert ring.recv_many(5, timeout=5) == [b"d", b"e"]
        with pytest.raises(ConfigError, match="nobody holds"):
            ring.recover(1)


def _hold_directory_lock(path, conn):
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, 0)
    m[48:56] = struct.pack("<Q", 0xC0FFEE)  # the lock word: held, as in the middle of create_ring
    conn.send("locked")
    conn.recv()  # killed here


def test_10_creator_killed_holding_the_directory_lock_is_taken_over(shm_path):
    with Region.create(shm_path, "1M") as region:
        region.create_ring("before", slot_size=16, capacity=4)
        parent, conn = CTX.Pipe()
        p = CTX.Process(target=_hold_directory_lock, args=(shm_path, conn))
        p.start()
        try:
            assert parent.poll(60) and parent.recv() == "locked"
        finally:
            kill_and_reap(p)
        assert region.info()["directory_locked"]
        ring = region.create_ring("after", slot_size=16, capacity=4)  # waits out the lease
        assert ring.name == "after" and not region.info()["directory_locked"]


# -- 11: every error is an IvshmemError and the builtin a user would catch -------------------------

def test_11_errors_are_ivshmem_errors_and_builtins(region):
    region.create_ring("q", slot_size=16, capacity=4)
    with pytest.raises(RingNotFoundError) as exc:
        region.ring("missing")
    assert isinstance(exc.value, IvshmemError) and isinstance(exc.value, KeyError)
    assert isinstance(exc.value, LookupError) and str(exc.value).startswith("no ring named 'missing'")
    with pytest.raises(AlreadyExistsError) as exc:
        region.create_ring("q", slot_size=16, capacity=4, exist_ok=False)
    assert isinstance(exc.value, IvshmemError) and isinstance(exc.value, FileExistsError)
    with pytest.raises(RegionFullError) as exc:
        region.create_ring("big", slot_size=1 << 20, capacity=8)
    assert isinstance(exc.value, IvshmemError) and isinstance(exc.value, ConfigError)
    for code in (errno.ENOENT, errno.EEXIST, errno.ENOSPC, errno.EIO, errno.EACCES):
        assert isinstance(error_from_code(-code, "context"), IvshmemError), code


def test_11_region_close_with_views_held_does_not_raise(shm_path):
    region = Region.create(shm_path, "64K")
    ring = region.create_ring("v", slot_size=16, capacity=4)
    ring.try_send(b"abc")
    view = ring.peek()
    region.close()  # was BufferError
    with pytest.raises(ClosedError):
        bytes(view)


def test_11_exist_ok_defaults_agree(shm_path):
    with Region.create(shm_path, "64K") as r1:
        r1.create_ring("q", slot_size=16, capacity=4)
        r1.create_ring("q", slot_size=16, capacity=4)  # default exist_ok=True: opened
        with Region.create(shm_path, "64K") as r2:  # default exist_ok=True: opened
            assert r2.generation == r1.generation
        with pytest.raises(AlreadyExistsError):
            Region.create(shm_path, "64K", exist_ok=False)


# -- 14: NaN, negative and non-number timeouts are refused, naming the argument --------------------

BAD_TIMEOUTS = [math.nan, -1, -0.5, "1", b"1", True, [1]]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", BAD_TIMEOUTS, ids=repr)
def test_14_bad_timeouts_refused(region, kind, bad):
    ring = region.create_ring("t", kind, slot_size=16, capacity=2)
    ring.try_send(b"x")
    ring.try_send(b"y")  # full and not empty: every call would otherwise succeed or wait
    calls = [lambda: ring.recv(bad), lambda: ring.send(b"z", bad),
             lambda: ring.recv_many(1, timeout=bad), lambda: ring.send_many([b"z"], timeout=bad)]
    for call in calls:
        with pytest.raises(ConfigError, match="timeout"):
            call()
    assert ring.recv_many(5) == [b"x", b"y"]  # nothing was consumed by a refused call


@pytest.mark.parametrize("kind", KINDS)
def test_14_timeouts_mean_the_same_everywhere(region, kind):
    ring = region.create_ring("t", kind, slot_size=16, capacity=2)
    with pytest.raises(WaitTimeout):
        ring.recv(0)
    assert ring.recv_many(4, timeout=0.01) == []
    assert ring.recv_many(4, timeout=0) == []
    ring.send(b"a", timeout=math.inf)  # +inf waits forever, like None (room: returns at once)
    assert ring.recv(None) == b"a"


# -- 15: MPMC recv_into with an unusable buffer keeps the message -----------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [b"readonly-bytes-buffer", None, "str",
                                 memoryview(bytearray(64))[::2]], ids=["bytes", "None", "str", "strided"])
def test_15_recv_into_unusable_buffer_keeps_the_message(region, kind, bad):
    ring = region.create_ring("u", kind, slot_size=16, capacity=4)
    ring.try_send(b"keep me")
    with pytest.raises(ConfigError, match="writable"):
        ring.recv_into(bad)
    assert ring.try_recv() == b"keep me"


# -- 17: argument validation, corrupt directories, from_fd sizes ------------------------------------

@pytest.mark.parametrize("capacity", ["4", None, 4.0, True, 3, 0, -4, 2**63])
def test_17_bad_capacity_refused(region, capacity):
    with pytest.raises(ConfigError, match="capacity"):
        region.create_ring("c", capacity=capacity)


@pytest.mark.parametrize("slot_size", [None, 4.5, 0, -1, 2**63, 2**64, "lots"])
def test_17_bad_slot_size_refused(region, slot_size):
    with pytest.raises(ConfigError, match="slot_size"):
        region.create_ring("c", slot_size=slot_size)


@pytest.mark.parametrize("name", ["bad\udc80name", "", "x" * 40, 5, None, "nul\0"])
def test_17_bad_ring_names_refused(region, name):
    with pytest.raises(ConfigError, match="name"):
        region.create_ring(name)
    with pytest.raises(ConfigError, match="name"):
        region.ring(name)


@pytest.mark.parametrize("size", [2**63, 2**64, 2**70, 3.0, None, "16Q"])
def test_17_bad_region_sizes_refused(shm_path, size):
    with pytest.raises(ConfigError, match="size"):
        Region.create(shm_path, size)
    assert not os.path.exists(shm_path)


def test_17_partial_mpmc_send_many_says_how_many_were_sent(region):
    ring = region.create_ring("m", "mpmc", slot_size=8, capacity=8)
    with pytest.raises(MessageTooLargeError, match="2 before it were sent") as exc:
        ring.send_many([b"ok", b"ok", b"x" * 9, b"never"])
    assert exc.value.sent == 2
    assert ring.recv_many(8) == [b"ok", b"ok"]


def test_17_spsc_send_many_too_large_has_sent(region):
    ring = region.create_ring("s", "spsc", slot_size=8, capacity=4)
    with pytest.raises(MessageTooLargeError) as exc:
        ring.send_many([b"ok", b"x" * 1000])
    assert exc.value.sent == 1


def test_17_two_directory_entries_with_one_name_are_corruption(shm_path):
    with Region.create(shm_path, "1M") as region:
        region.create_ring("aa", slot_size=16, capacity=4)
        region.create_ring("bb", slot_size=16, capacity=4)
        with open(shm_path, "r+b") as f:  # entry 1 (at 128 + 64) takes the name of entry 0
            f.seek(128 + 64)
            f.write(b"aa\0")
        with pytest.raises(CorruptionError, match="two directory entries"):
            region.ring("aa")
        with pytest.raises(CorruptionError, match="two directory entries"):
            region.create_ring("aa", slot_size=16, capacity=4)


def test_17_from_fd_size_larger_than_the_file_refused(shm_path):
    Region.create(shm_path, "64K").close()
    fd = os.open(shm_path, os.O_RDWR)
    try:
        with pytest.raises(ConfigError, match="does not fit"):
            Region.from_fd(fd, size="1M")
        with pytest.raises(ConfigError, match="fd"):
            Region.from_fd("3")
        with pytest.raises(ConfigError, match="offset"):
            Region.from_fd(fd, offset=5)
        with Region.from_fd(fd, size="64K") as r:
            assert r.size == 65536
    finally:
        os.close(fd)


# -- objects inherited across fork never disturb the parent (ring handles; Peer is tested elsewhere)

@pytest.mark.parametrize("how", ["ring.close", "region.close", "drop"])
def test_17_child_closing_inherited_handles_leaves_the_parents_claims_alone(region, how):
    ring = region.create_ring("f", "mpmc", slot_size=16, capacity=4)
    consumer = region.ring("f")
    ring.try_send(b"first")
    view = ring.reserve(6)
    view[:] = b"parent"
    peeked = consumer.peek()
    assert bytes(peeked) == b"first"
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if how == "ring.close":
                ring.close()
                consumer.close()
            elif how == "region.close":
                region.close()
            else:
                del ring, consumer, view, peeked  # the handles die: their __dealloc__ runs
                gc.collect()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    ring.commit()  # the reservation is still the parent's
    consumer.release()
    assert consumer.try_recv() == b"parent"
    assert consumer.try_recv() is None and consumer.stalled() is None
    assert len(ring) == 0  # the indices agree with what was sent and received
    for i in range(10):  # and the ring goes on working, laps around
        assert ring.try_send(b"m%d" % i)
        assert consumer.try_recv() == b"m%d" % i


# -- a dead MPMC producer: reported by recv and recv_many, recovered by recover() ------------------

def _reserve_and_hold(path, conn):
    with Region.open(path) as r:
        ring = r.ring("jobs")
        view = ring.reserve(8)
        view[:4] = b"half"
        conn.send("reserved")
        conn.recv()  # killed here, before commit()


def test_10_dead_producer_reported_then_recovered(shm_path):
    with Region.create(shm_path, "1M") as region:
        ring = region.create_ring("jobs", "mpmc", slot_size=32, capacity=8)
        assert ring.try_send(b"before")
        parent, conn = CTX.Pipe()
        p = CTX.Process(target=_reserve_and_hold, args=(shm_path, conn))
        p.start()
        try:
            assert parent.poll(60) and parent.recv() == "reserved"
        finally:
            kill_and_reap(p)
        assert ring.try_send(b"after")
        assert ring.recv(timeout=5) == b"before"
        with pytest.raises(StallError, match="slot 1") as exc:
            ring.recv(timeout=0.2)
        assert exc.value.slot == 1 and exc.value.side == "producer" and "recover(1)" in str(exc.value)
        with pytest.raises(StallError):
            ring.recv_many(4, timeout=0.2)
        assert ring.recv_many(4) == []  # timeout=0 never waits: a return value, not an error
        assert ring.stalled() == 1
        assert ring.recover(1) == "producer"
        assert ring.recv_many(4, timeout=5) == [b"", b"after"]  # committed empty, then the rest
        assert ring.stalled() is None
