"""Shared memory written by a buggy or malicious peer, one field at a time, through a second mapping.

Each case corrupts one field of the region header, a directory entry, a ring's control block or
its slots, and expects the specific exception (CorruptionError naming the ring, RegionFormatError,
StaleRegionError, ...), never a crash, a hang or a wrong message; a bystander ring in the same
region keeps working throughout.  The byte offsets come from csrc/ivshm_layout.h (docs/layout.md).
"""
from __future__ import annotations

import mmap
import os
import struct

import pytest

from pyivshmem import (
    ConfigError,
    CorruptionError,
    IvshmemError,
    MessageTooLargeError,
    Region,
    RegionFormatError,
    StaleRegionError,
    StallError,
    WaitTimeout,
)

pytestmark = pytest.mark.timeout(60)

# csrc/ivshm_layout.h
HDR_MAGIC, HDR_VERSION, HDR_HDR_SIZE, HDR_REGION_SIZE, HDR_GENERATION = 0, 8, 12, 16, 24
HDR_MAX_RINGS, HDR_NRINGS, HDR_ALLOC_OFF, HDR_LOCK = 32, 36, 40, 48
DIR_BASE, DIR_ENTRY = 128, 64
D_NAME, D_STATE, D_KIND, D_OFFSET, D_SIZE, D_SLOT_SIZE, D_CAPACITY = 0, 32, 36, 40, 48, 56, 60
C_MAGIC, C_KIND, C_SLOT_SIZE, C_CAPACITY, C_STRIDE = 0, 8, 12, 16, 20
C_HEAD, C_TAIL = 128, 256
S_STAMP = 4             # SPSC slot: u32 len (top bit: more chunks follow) | u32 stamp
SLOT_MORE = 1 << 31
M_SEQ, M_LEN = 0, 4     # MPMC slot: u32 seq | u32 len


def ctrl_size(m, entries) -> int:
    """The control block's size, from a directory entry whose slots fill whole 128-byte lines
    (ring size = control block + stride * capacity, rounded up to 128)."""
    for e in entries:
        ctrl, size = struct.unpack_from("<Q", m, e + D_OFFSET)[0], struct.unpack_from("<Q", m, e + D_SIZE)[0]
        stride, cap = struct.unpack_from("<I", m, ctrl + C_STRIDE)[0], struct.unpack_from("<I", m, ctrl + C_CAPACITY)[0]
        if stride * cap % 128 == 0:
            return size - stride * cap
    raise AssertionError("no ring with whole-line slots to measure the control block")


class Peer:
    """The hostile side: a second, raw mapping of the region file."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            self.m = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.ctrl_size = ctrl_size(self.m, [self.entry("bystander")])

    def close(self) -> None:
        self.m.close()

    def get(self, off: int, fmt: str) -> int:
        return struct.unpack_from("<" + fmt, self.m, off)[0]

    def put(self, off: int, fmt: str, value: int) -> None:
        struct.pack_into("<" + fmt, self.m, off, value)

    def entry(self, name: str) -> int:
        """Offset of the directory entry of `name`."""
        for i in range(62):
            off = DIR_BASE + i * DIR_ENTRY
            raw = bytes(self.m[off:off + 32]).split(b"\0")[0]
            if raw == name.encode():
                return off
        raise LookupError(name)

    def ring(self, name: str) -> tuple[int, int, int, int]:
        """(control block offset, stride, capacity, slot size) of ring `name`."""
        e = self.entry(name)
        ctrl = self.get(e + D_OFFSET, "Q")
        return ctrl, self.get(ctrl + C_STRIDE, "I"), self.get(ctrl + C_CAPACITY, "I"), self.get(ctrl + C_SLOT_SIZE, "I")

    def slot(self, name: str, index: int) -> int:
        ctrl, stride, cap, _ = self.ring(name)
        return ctrl + self.ctrl_size + (index % cap) * stride


@pytest.fixture
def setup(shm_path):
    """A region with an SPSC victim, an MPMC victim and a bystander, plus the hostile mapping."""
    region = Region.create(shm_path, "256K")
    rings = {
        "spsc": region.create_ring("spsc", "spsc", slot_size=32, capacity=8),
        "mpmc": region.create_ring("mpmc", "mpmc", slot_size=32, capacity=8),
        "bystander": region.create_ring("bystander", "spsc", slot_size=8, capacity=16),
    }
    peer = Peer(shm_path)
    yield region, rings, peer
    for r in rings.values():
        r.close()
    peer.close()
    region.close()


def bystander_works(region: Region, rings: dict) -> None:
    """The ring next door still carries messages, through the old handle and a new one."""
    b = rings["bystander"]
    assert b.try_send(b"still fine" * 3)
    assert b.try_recv() == b"still fine" * 3
    fresh = region.ring("bystander")
    assert fresh.try_send(b"x")
    assert b.try_recv() == b"x"
    fresh.close()


def expect_corrupt(call, ring_name: str, *words: str) -> CorruptionError:
    with pytest.raises(CorruptionError) as ei:
        call()
    err = ei.value
    assert err.ring == ring_name, f"CorruptionError.ring is {err.ring!r}, not {ring_name!r}: {err}"
    assert ring_name in str(err)
    for w in words:
        assert w in str(err), f"{w!r} not in {str(err)!r}"
    return err


# -- SPSC, consumer side: the producer's index and the slots ---------------------------------------

@pytest.mark.parametrize("head", ["far_ahead", "huge", "behind_tail", "plausible"])
def test_spsc_head_lies_reach_no_consumer(setup, head):
    """The consumer follows the slots' stamps, never the producer's index: a lie about head makes
    it receive nothing that was not published; a new handle refuses indices a ring apart."""
    region, rings, peer = setup
    q = rings["spsc"]
    for i in range(3):
        assert q.try_send(b"m%d" % i)
    assert [q.try_recv() for _ in range(3)] == [b"m0", b"m1", b"m2"]
    ctrl = peer.ring("spsc")[0]
    good = peer.get(ctrl + C_HEAD, "Q")
    peer.put(ctrl + C_HEAD, "Q", {"far_ahead": 3 + 8 + 1, "huge": 2**64 - 1, "behind_tail": 1,
                                  "plausible": 3 + 5}[head])
    assert q.try_recv() is None
    assert q.recv_many(10) == []
    assert q.recv_into(bytearray(64)) is None
    assert q.peek() is None
    with pytest.raises(WaitTimeout):
        q.recv(timeout=0.01)
    assert 0 <= len(q) <= 8
    if head == "far_ahead":
        expect_corrupt(lambda: region.ring("spsc"), "spsc")
    else:
        # Within a ring of tail either way: what a producer that died between stamping a batch
        # and storing head leaves.  A new handle opens, and finds nothing either.
        fresh = region.ring("spsc")
        assert fresh.try_recv() is None
        fresh.close()
    bystander_works(region, rings)
    peer.put(ctrl + C_HEAD, "Q", good)
    assert q.try_send(b"after") and q.try_recv() == b"after"


def test_spsc_head_repaired_by_the_producer(setup):
    """A lie about head is overwritten by the honest producer's next publish."""
    region, rings, peer = setup
    q = rings["spsc"]
    ctrl = peer.ring("spsc")[0]
    assert q.try_send(b"zero") and q.try_recv() == b"zero"
    peer.put(ctrl + C_HEAD, "Q", 100)
    assert q.try_recv() is None
    assert q.try_send(b"one")   # between its looks at the indices it only stores its own value
    assert peer.get(ctrl + C_HEAD, "Q") == 2
    assert q.try_recv() == b"one"


def test_spsc_head_lie_seen_by_a_starting_producer(setup):
    """A producer's first call reads head (it may have to adopt a batch a dead predecessor
    stamped): a lie there is reported, not built upon."""
    region, rings, peer = setup
    ctrl = peer.ring("spsc")[0]
    peer.put(ctrl + C_HEAD, "Q", 100)
    expect_corrupt(lambda: rings["spsc"].try_send(b"x"), "spsc", "one producer")
    peer.put(ctrl + C_HEAD, "Q", 0)
    assert rings["spsc"].try_send(b"x") and rings["spsc"].try_recv() == b"x"


def test_spsc_second_producer_detected(setup):
    """Someone else moving head is seen when the producer next reads the shared indices."""
    region, rings, peer = setup
    q = rings["spsc"]
    for _ in range(8):
        assert q.try_send(b"fill")
    assert q.try_recv() == b"fill"
    ctrl = peer.ring("spsc")[0]
    peer.put(ctrl + C_HEAD, "Q", 5)
    expect_corrupt(lambda: q.try_send(b"x"), "spsc", "one producer")
    peer.put(ctrl + C_HEAD, "Q", 8)
    assert q.try_send(b"x")


def test_spsc_second_consumer_detected(setup):
    region, rings, peer = setup
    q = rings["spsc"]
    assert q.try_send(b"a") and q.try_recv() == b"a"
    ctrl = peer.ring("spsc")[0]
    peer.put(ctrl + C_TAIL, "Q", 0)
    expect_corrupt(q.try_recv, "spsc", "one consumer")
    peer.put(ctrl + C_TAIL, "Q", 1)
    assert q.try_recv() is None


@pytest.mark.parametrize("stamp", ["previous_index", "last_lap", "zero"])
def test_spsc_stamp_not_of_this_index_is_unpublished(setup, stamp):
    """A slot whose stamp is not (index + 1) holds no message, whatever its length says."""
    region, rings, peer = setup
    q = rings["spsc"]
    assert q.try_send(b"hello")
    s0 = peer.slot("spsc", 0)
    assert peer.get(s0 + S_STAMP, "I") == 1
    peer.put(s0 + S_STAMP, "I", {"previous_index": 0 + 0, "last_lap": (1 - 8) % 2**32, "zero": 0}[stamp])
    assert q.try_recv() is None
    peer.put(s0 + S_STAMP, "I", 1)
    assert q.try_recv() == b"hello"


@pytest.mark.parametrize("length", [33, 1000, 2**31 - 1, 2**32 - 1])
def test_spsc_slot_length_over_slot_size(setup, length):
    region, rings, peer = setup
    q = rings["spsc"]
    assert q.try_send(b"hello")
    peer.put(peer.slot("spsc", 0), "I", length)
    err = expect_corrupt(q.try_recv, "spsc", "length")
    assert str(length & 0x7FFFFFFF) in str(err)
    expect_corrupt(lambda: q.recv_many(), "spsc")
    expect_corrupt(q.peek, "spsc")
    bystander_works(region, rings)
    peer.put(peer.slot("spsc", 0), "I", 5)
    assert q.try_recv() == b"hello"


@pytest.mark.parametrize("case", ["stray_length_bit", "more_on_short_chunk", "chain_past_published",
                                  "middle_chunk_short", "middle_chunk_unstamped", "last_chunk_more",
                                  "last_chunk_long"])
def test_spsc_bad_chunk_chains(setup, case):
    region, rings, peer = setup
    q = rings["spsc"]
    big = bytes(range(80))  # 3 slots of 32: 32 + 32 + 16
    if case in ("stray_length_bit", "more_on_short_chunk", "chain_past_published"):
        assert q.try_send(b"short")
        s0 = peer.slot("spsc", 0)
        if case == "stray_length_bit":
            peer.put(s0, "I", 5 | 1 << 30)
            words = ("length",)
        elif case == "more_on_short_chunk":
            peer.put(s0, "I", 5 | SLOT_MORE)
            words = ("not full",)
        else:
            peer.put(s0, "I", 32 | SLOT_MORE)
            words = ("past the published",)
    else:
        assert q.try_send(big)
        s1, s2 = peer.slot("spsc", 1), peer.slot("spsc", 2)
        assert peer.get(s1, "I") == 32 | SLOT_MORE and peer.get(s2, "I") == 16
        assert peer.get(s1 + S_STAMP, "I") == 2 and peer.get(s2 + S_STAMP, "I") == 3
        if case == "middle_chunk_short":
            peer.put(s1, "I", 31 | SLOT_MORE)
            words = ("not full",)
        elif case == "middle_chunk_unstamped":
            peer.put(s1 + S_STAMP, "I", 0)
            words = ("past the published",)
        elif case == "last_chunk_more":  # says "more" but is short
            peer.put(s2, "I", 16 | SLOT_MORE)
            words = ("not full",)
        else:
            peer.put(s2, "I", 33)
            words = ("length",)
    expect_corrupt(q.try_recv, "spsc", *words)
    expect_corrupt(lambda: q.recv_into(bytearray(200)), "spsc")
    bystander_works(region, rings)


def test_spsc_tail_lies_to_the_producer(setup):
    region, rings, peer = setup
    q = rings["spsc"]
    for _ in range(8):
        assert q.try_send(b"fill")
    assert not q.try_send(b"full")
    ctrl = peer.ring("spsc")[0]
    peer.put(ctrl + C_TAIL, "Q", 9)  # beyond head (8)
    expect_corrupt(lambda: q.try_send(b"x"), "spsc", "consumer index")
    expect_corrupt(lambda: q.send_many([b"x", b"y"]), "spsc")
    expect_corrupt(lambda: q.reserve(4), "spsc")
    expect_corrupt(lambda: q.send(b"x", timeout=0.01), "spsc")
    peer.put(ctrl + C_TAIL, "Q", 2**63)
    expect_corrupt(lambda: q.try_send(b"x"), "spsc")
    bystander_works(region, rings)


# -- MPMC ------------------------------------------------------------------------------------------

def test_mpmc_slot_length(setup):
    region, rings, peer = setup
    q = rings["mpmc"]
    assert q.try_send(b"one") and q.try_send(b"two") and q.try_send(b"three")
    peer.put(peer.slot("mpmc", 0) + M_LEN, "I", 33)          # len over the slot size
    peer.put(peer.slot("mpmc", 1) + M_LEN, "I", 3 | 1 << 31)  # a high bit beside the length
    expect_corrupt(q.try_recv, "mpmc", "length")
    expect_corrupt(q.try_recv, "mpmc", "length")
    # the bad slots were handed back: the ring goes on
    assert q.try_recv() == b"three"
    assert q.try_send(b"four") and q.try_recv() == b"four"
    bystander_works(region, rings)


def test_mpmc_sequence_ahead_is_corruption(setup):
    region, rings, peer = setup
    q = rings["mpmc"]
    assert q.try_send(b"a")
    s0 = peer.slot("mpmc", 0)
    peer.put(s0 + M_SEQ, "I", 1000)  # consumers' view: "taken by someone else", forever
    expect_corrupt(q.try_recv, "mpmc", "sequence")
    expect_corrupt(lambda: q.recv(timeout=0.01), "mpmc")
    expect_corrupt(lambda: q.recv_many(4), "mpmc")
    peer.put(s0 + M_SEQ, "I", 1)
    assert q.try_recv() == b"a"
    peer.put(peer.slot("mpmc", 1) + M_SEQ, "I", 77)  # producers' view
    expect_corrupt(lambda: q.try_send(b"b"), "mpmc", "sequence")
    expect_corrupt(lambda: q.reserve(4), "mpmc")
    bystander_works(region, rings)


def test_mpmc_sequence_behind_looks_empty_or_full(setup):
    """A sequence word from an older lap is indistinguishable from a slow peer: empty/full, and a
    blocking call ends with a timeout, never a hang and never a message."""
    region, rings, peer = setup
    q = rings["mpmc"]
    assert q.try_send(b"a") and q.try_recv() == b"a"
    assert q.try_send(b"b")
    s1 = peer.slot("mpmc", 1)
    peer.put(s1 + M_SEQ, "I", 0)
    assert q.try_recv() is None
    with pytest.raises(WaitTimeout) as ei:
        q.recv(timeout=0.05)
    assert not isinstance(ei.value, StallError)
    peer.put(s1 + M_SEQ, "I", 2)
    assert q.try_recv() == b"b"
    peer.put(peer.slot("mpmc", 2) + M_SEQ, "I", 1)  # slot 2 still "holds" the previous lap: full
    assert q.try_send(b"c") is False
    with pytest.raises(WaitTimeout):
        q.send(b"c", timeout=0.05)
    bystander_works(region, rings)


@pytest.mark.parametrize("head,tail", [(2**64 - 1, 0), (0, 2**64 - 1), (5, 100), (2**63, 2**63 + 3),
                                       (1 << 40, 0)])
def test_mpmc_indices_anywhere(setup, head, tail):
    """Garbage indices only ever address slots inside the ring; results stay bounded."""
    region, rings, peer = setup
    q = rings["mpmc"]
    ctrl = peer.ring("mpmc")[0]
    peer.put(ctrl + C_HEAD, "Q", head)
    peer.put(ctrl + C_TAIL, "Q", tail)
    for _ in range(20):
        for op in (lambda: q.try_send(b"zz"), q.try_recv, lambda: q.recv_many(8), lambda: len(q), q.stalled):
            try:
                r = op()
            except CorruptionError as e:
                assert e.ring == "mpmc"
                continue
            if isinstance(r, bytes):
                assert len(r) <= 32
            elif isinstance(r, list):
                assert all(len(m) <= 32 for m in r)
            elif isinstance(r, int) and not isinstance(r, bool):
                assert r >= 0
    assert 0 <= len(q) <= 8
    bystander_works(region, rings)


# -- directory entries, control blocks, region header ---------------------------------------------

@pytest.mark.parametrize("field,fmt,value,words", [
    (D_OFFSET, "Q", 256 * 1024, "outside"),
    (D_OFFSET, "Q", 256 * 1024 - 128, "outside"),
    (D_OFFSET, "Q", 2**64 - 128, "outside"),
    (D_OFFSET, "Q", 0, "outside"),
    (D_OFFSET, "Q", 4096 + 8, "outside"),
    (D_SIZE, "Q", 2**40, "size"),
    (D_CAPACITY, "I", 6, "capacity"),
    (D_CAPACITY, "I", 0, "capacity"),
    (D_SLOT_SIZE, "I", 0, "slot size"),
    (D_SLOT_SIZE, "I", 2**31, "slot size"),
    (D_KIND, "I", 9, "kind"),
    (D_STATE, "I", 7, "state"),
])
def test_directory_entry_corrupt(setup, field, fmt, value, words):
    region, rings, peer = setup
    e = peer.entry("spsc")
    peer.put(e + field, fmt, value)
    expect_corrupt(lambda: region.ring("spsc"), "spsc", words)
    listing = {d.get("name"): d for d in region.rings()}
    assert any("error" in d for d in region.rings()), listing
    assert "bystander" in listing and "mpmc" in listing
    # handles attached before the corruption keep their validated private copy
    assert rings["spsc"].try_send(b"old handle") and rings["spsc"].try_recv() == b"old handle"
    bystander_works(region, rings)
    # creating a ring of that name reports the corruption instead of making a second one
    with pytest.raises(CorruptionError):
        region.create_ring("spsc", "spsc", slot_size=32, capacity=8)


def test_directory_name_without_terminator(setup):
    region, rings, peer = setup
    e = peer.entry("spsc")
    peer.m[e:e + 32] = b"z" * 32
    with pytest.raises(KeyError):
        region.ring("spsc")
    assert any("error" in d and "name" in d["error"] for d in region.rings())
    bystander_works(region, rings)


@pytest.mark.parametrize("field,fmt,delta,words", [
    (C_MAGIC, "Q", 1, "magic"),
    (C_KIND, "I", 1, "directory"),
    (C_SLOT_SIZE, "I", 8, "directory"),
    (C_CAPACITY, "I", 8, "directory"),
    (C_STRIDE, "I", 8, "directory"),
])
@pytest.mark.parametrize("name", ["spsc", "mpmc"])
def test_control_block_line0_corrupt(setup, name, field, fmt, delta, words):
    region, rings, peer = setup
    ctrl = peer.ring(name)[0]
    peer.put(ctrl + field, fmt, peer.get(ctrl + field, fmt) + delta)
    expect_corrupt(lambda: region.ring(name), name, words)
    bystander_works(region, rings)


@pytest.mark.parametrize("head,tail", [(9, 0), (0, 1), (2**64 - 1, 3)])
def test_attach_refuses_inconsistent_indices(setup, head, tail):
    region, rings, peer = setup
    ctrl = peer.ring("spsc")[0]
    peer.put(ctrl + C_HEAD, "Q", head)
    peer.put(ctrl + C_TAIL, "Q", tail)
    expect_corrupt(lambda: region.ring("spsc"), "spsc", "indices")
    bystander_works(region, rings)


@pytest.mark.parametrize("field,fmt,value,exc,words", [
    (HDR_MAGIC, "Q", 0x1234, RegionFormatError, "not a pyivshmem region"),
    (HDR_MAGIC, "Q", 0, RegionFormatError, "not a pyivshmem region"),
    (HDR_VERSION, "I", 4, RegionFormatError, "version"),
    (HDR_VERSION, "I", 2, RegionFormatError, "version"),
    (HDR_VERSION, "I", 1, RegionFormatError, "version"),
    (HDR_HDR_SIZE, "I", 8192, RegionFormatError, "inconsistent"),
    (HDR_REGION_SIZE, "Q", 512 * 1024, RegionFormatError, "inconsistent"),
    (HDR_MAX_RINGS, "I", 1000, RegionFormatError, "inconsistent"),
])
def test_region_header_corrupt(setup, shm_path, field, fmt, value, exc, words):
    region, rings, peer = setup
    peer.put(field, fmt, value)
    with pytest.raises(exc) as ei:
        Region.open(shm_path)
    assert words in str(ei.value) and shm_path in str(ei.value)
    # rings already attached carry on: their handles hold validated private copies
    bystander_works_old_handle = rings["bystander"]
    assert bystander_works_old_handle.try_send(b"ok") and bystander_works_old_handle.try_recv() == b"ok"


def test_region_magic_gone_and_generation_changed(setup):
    region, rings, peer = setup
    region.check()
    gen = peer.get(HDR_GENERATION, "Q")
    peer.put(HDR_GENERATION, "Q", gen ^ 0xFF)
    with pytest.raises(StaleRegionError):
        region.check()
    peer.put(HDR_GENERATION, "Q", gen)
    peer.put(HDR_MAGIC, "Q", 0x5555)
    with pytest.raises(RegionFormatError):
        region.check()


@pytest.mark.parametrize("alloc", [0, 100, 256 * 1024, 2**64 - 1, 256 * 1024 - 64])
def test_allocation_pointer_corrupt(setup, alloc):
    """A new ring is never placed outside the region or over the header."""
    region, rings, peer = setup
    peer.put(HDR_ALLOC_OFF, "Q", alloc)
    with pytest.raises(ConfigError, match="not enough free space"):
        region.create_ring("new", "spsc", slot_size=64, capacity=16)
    bystander_works(region, rings)


@pytest.mark.parametrize("field, fmt, value, key, words", [
    (HDR_NRINGS, "I", 2**32 - 1, "rings", "ring count 4294967295"),
    (HDR_NRINGS, "I", 63, "rings", "ring count 63"),
    (HDR_ALLOC_OFF, "Q", 2**64 - 1, "allocated", "allocation offset"),
    (HDR_ALLOC_OFF, "Q", 100, "allocated", "allocation offset"),
    (HDR_VERSION, "I", 7, None, "layout version 7"),
])
def test_info_flags_a_header_overwritten_after_open(setup, shm_path, field, fmt, value, key,
                                                     words):
    """The header is the peers' to write: info() and `pyivshmem info` say which count is out of
    range instead of printing it as the truth."""
    import json
    import subprocess
    import sys

    region, rings, peer = setup
    sound = region.info()
    assert sound["errors"] == [] and sound["rings"] == 3 and sound["free"] > 0
    peer.put(field, fmt, value)
    info = region.info()
    assert any(words in e for e in info["errors"]), info
    if key is not None:
        assert info[key] is None
        if key == "allocated":
            assert info["free"] is None
    cli = [sys.executable, "-m", "pyivshmem", "info", shm_path]
    if field == HDR_VERSION:  # a region of another layout is refused at open, as it should be
        out = subprocess.run(cli, capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and "version" in out.stderr, out
    else:
        out = subprocess.run(cli, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "header: CORRUPT" in out.stdout and words in out.stdout, out.stdout
        assert str(value) not in out.stdout.splitlines()[1]  # the counts line shows "?"
        out = subprocess.run(cli + ["--json"], capture_output=True, text=True, timeout=30)
        d = json.loads(out.stdout)["header"]
        assert d[key] is None and any(words in e for e in d["errors"])
    bystander_works(region, rings)


def test_directory_lock_held_by_nobody(setup):
    """A lock word a dead (or hostile) creator left behind: opening by name needs no lock, and a
    creator takes the lock over once it stayed unchanged for the lease (IVSHM_DIR_LEASE_MS)."""
    region, rings, peer = setup
    peer.put(HDR_LOCK, "Q", 0xDEAD)
    assert region.ring("bystander").name == "bystander"
    assert region.info()["directory_locked"]
    assert region.create_ring("new", "spsc", slot_size=64, capacity=16).name == "new"
    assert not region.info()["directory_locked"]
    bystander_works(region, rings)


def test_every_error_is_an_ivshmem_error():
    for cls in (CorruptionError, RegionFormatError, StaleRegionError, StallError, WaitTimeout,
                MessageTooLargeError, ConfigError):
        assert issubclass(cls, IvshmemError)
