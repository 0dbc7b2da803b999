"""Property-based fuzzing of the Python API over hostile region contents (Hypothesis).

Starting from a real region (an SPSC and an MPMC ring holding messages, plus a small SPSC ring),
Hypothesis overwrites header fields, directory entries, control blocks and slots (or the whole
region) and then opens the region, lists it, opens every ring and calls every receive and send
path.  The only acceptable outcomes are valid results (bytes no longer than the ring can carry,
counts in range) and the documented exceptions; a crash, a hang or any other exception fails.
A third test interleaves such writes with operations on rings that are already open, as a peer
writing concurrently would.  PYIVSHMEM_FUZZ_EXAMPLES sets the examples per test (default 300).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyivshmem import (
    ConfigError,
    CorruptionError,
    IvshmemError,
    MessageTooLargeError,
    Region,
    RegionFormatError,
    StallError,
    WaitTimeout,
)

pytestmark = pytest.mark.timeout(600)

SIZE = 16384
EXAMPLES = int(os.environ.get("PYIVSHMEM_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SHAPES = {"s": ("spsc", 24, 8), "m": ("mpmc", 16, 4), "t": ("spsc", 8, 2)}
COUNTS = {"examples": 0, "patches": 0, "calls": 0, "errors": 0, "results": 0}


@pytest.fixture(scope="module", autouse=True)
def _figures():
    """Figures for docs/hardening.md, written when PYIVSHMEM_HARDENING_STATS names a file."""
    yield
    path = os.environ.get("PYIVSHMEM_HARDENING_STATS")
    if path and COUNTS["examples"]:
        with open(path, "a") as f:
            f.write(json.dumps({"test": "fuzz_python", **COUNTS}) + "\n")


def _unique_path() -> str:
    return f"/dev/shm/pyivshmem-fuzz-{os.getpid()}-{uuid.uuid4().hex[:10]}"


def _build_template() -> bytes:
    path = _unique_path()
    try:
        with Region.create(path, SIZE) as r:
            for name, (kind, slot, cap) in SHAPES.items():
                q = r.create_ring(name, kind, slot_size=slot, capacity=cap)
                for i in range(cap // 2 + 1):
                    q.try_send(bytes([65 + i]) * (i * 9 % (slot * (cap // 2 if kind == "spsc" else 1) + 1)))
                q.try_recv()
                q.close()
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


TEMPLATE = _build_template()


def _interesting_offsets() -> list[int]:
    offs = [0, 8, 12, 16, 24, 32, 36, 40, 48, 56]
    for i in range(3):
        e = 128 + 64 * i
        offs += [e, e + 31, e + 32, e + 36, e + 40, e + 48, e + 56, e + 60]
        ctrl, size = struct.unpack_from("<QQ", TEMPLATE, e + 40)
        stride = struct.unpack_from("<I", TEMPLATE, ctrl + 20)[0]
        cap = struct.unpack_from("<I", TEMPLATE, ctrl + 16)[0]
        offs += [ctrl, ctrl + 8, ctrl + 12, ctrl + 16, ctrl + 20, ctrl + 128, ctrl + 256]
        # the slots end the ring, which is rounded up to 128 bytes; the control block is whole lines
        slots = ctrl + size - stride * cap
        slots -= slots % 128
        for k in range(cap):
            s = slots + k * stride
            offs += [s, s + 4, s + 8, s + 12, s + 16]
    return sorted(set(offs))


OFFSETS = _interesting_offsets()

# a patch: (offset, bytes) or (offset, width, delta) applied to the little-endian value there
offsets = st.one_of(st.sampled_from(OFFSETS), st.integers(0, SIZE - 1))
raw_patch = st.tuples(offsets, st.one_of(
    st.binary(min_size=1, max_size=8),
    st.integers(0, 2**64 - 1).map(lambda v: struct.pack("<Q", v)),
    st.integers(0, 2**32 - 1).map(lambda v: struct.pack("<I", v)),
    st.sampled_from([b"\0" * 8, b"\xff" * 8, struct.pack("<Q", 2**63), struct.pack("<I", 1)]),
))
delta_patch = st.tuples(offsets, st.sampled_from([4, 8]), st.integers(-20, 20))
patch = st.one_of(raw_patch, delta_patch)


def apply(buf, p) -> None:
    COUNTS["patches"] += 1
    if len(p) == 2:
        off, data = p
        data = data[:SIZE - off]
        buf[off:off + len(data)] = data
    else:
        off, width, delta = p
        off = min(off, SIZE - width)
        fmt = "<Q" if width == 8 else "<I"
        v = struct.unpack_from(fmt, buf, off)[0]
        struct.pack_into(fmt, buf, off, (v + delta) % (1 << (8 * width)))


# -- checking every call -----------------------------------------------------------------------------

def call(fn, *allowed):
    """Run one API call: returns its result, or None after an allowed exception."""
    COUNTS["calls"] += 1
    try:
        out = fn()
    except allowed as e:
        assert isinstance(e, (IvshmemError, KeyError)), e
        if isinstance(e, CorruptionError) and e.ring is None:
            raise AssertionError(f"CorruptionError without the ring's name: {e}")
        COUNTS["errors"] += 1
        return None
    COUNTS["results"] += 1
    return out


def exercise_ring(ring) -> None:
    kind, slot, cap = ring.kind, ring.slot_size, ring.capacity
    maxlen = slot * cap if kind == "spsc" else slot
    bad = (CorruptionError,)
    m = call(ring.try_recv, *bad)
    assert m is None or (isinstance(m, bytes) and len(m) <= maxlen)
    ms = call(lambda: ring.recv_many(cap + 2), *bad) or []
    assert len(ms) <= cap + 2 and all(isinstance(x, bytes) and len(x) <= maxlen for x in ms)
    buf = bytearray(slot)
    n = call(lambda: ring.recv_into(buf), CorruptionError, MessageTooLargeError)
    assert n is None or 0 <= n <= slot
    v = call(ring.peek, CorruptionError, MessageTooLargeError)
    if v is not None:
        assert len(v) <= slot
        bytes(v)
        call(ring.release, *bad)
    n = call(lambda: len(ring))
    assert 0 <= n <= cap + 1
    if kind == "mpmc":
        s = call(ring.stalled)
        assert s is None or s >= 0
    for size in (0, 1, slot, slot + 1, maxlen):
        ok = call(lambda: ring.try_send(b"y" * size), CorruptionError, MessageTooLargeError)
        assert ok in (None, True, False)
    sent = call(lambda: ring.send_many([b"z" * (slot // 2)] * 3), *bad)
    assert sent is None or 0 <= sent <= 3
    w = call(lambda: ring.reserve(slot), *bad)
    if w is not None:
        w[:] = b"w" * slot
        call(ring.commit)
    for _ in range(cap + 2):
        m = call(ring.try_recv, *bad)
        assert m is None or len(m) <= maxlen
        if m is None:
            break
    call(lambda: ring.recv(timeout=0), WaitTimeout, StallError, CorruptionError)


def exercise_region(path: str) -> None:
    try:
        region = Region.open(path)
    except (RegionFormatError, WaitTimeout) as e:
        assert str(path) in str(e)
        COUNTS["errors"] += 1
        return
    with region:
        listing = region.rings()
        info = region.info()
        assert info["size"] == SIZE
        names = {"s", "m", "t", "absent"} | {d["name"] for d in listing if "name" in d}
        for d in listing:
            if "name" in d:
                assert 4096 <= d["offset"] and d["offset"] + d["size"] <= SIZE
                assert d["count"] is None or 0 <= d["count"] <= d["capacity"]
        for name in sorted(names):
            ring = call(lambda: region.ring(name), KeyError, CorruptionError, ConfigError)
            if ring is not None:
                with ring:
                    exercise_ring(ring)
        if not info["directory_locked"]:  # else creating waits 2 s for the lock, by design
            r = call(lambda: region.create_ring("new", "mpmc", slot_size=8, capacity=2),
                     CorruptionError, ConfigError, WaitTimeout)
            if r is not None:
                with r:
                    exercise_ring(r)


def run_image(image: bytes) -> None:
    COUNTS["examples"] += 1
    path = _unique_path()
    with open(path, "wb") as f:
        f.write(image)
    try:
        exercise_region(path)
    finally:
        os.unlink(path)


# -- the properties ----------------------------------------------------------------------------------

@FUZZ
@given(st.lists(patch, min_size=1, max_size=10))
def test_patched_region_gives_valid_results_or_errors(patches):
    buf = bytearray(TEMPLATE)
    for p in patches:
        apply(buf, p)
    run_image(bytes(buf))


@FUZZ
@given(st.sampled_from(["raw", "header", "directory"]), st.binary(max_size=SIZE))
def test_random_region_bytes(keep, data):
    """Random bytes behind nothing, a valid header, or a valid header and directory."""
    prefix = {"raw": b"", "header": TEMPLATE[:128], "directory": TEMPLATE[:4096]}[keep]
    body = (prefix + data)[:SIZE]
    run_image(body + bytes(SIZE - len(body)))


step = st.one_of(
    st.tuples(st.just("poke"), patch),
    st.tuples(st.just("op"), st.sampled_from(["s", "m", "t"]), st.integers(0, 9), st.integers(0, 200)),
)


@FUZZ
@given(st.lists(step, min_size=1, max_size=40))
def test_writes_between_calls_on_open_rings(steps):
    """A peer writing while rings are open: each call still gives a valid result or an error."""
    COUNTS["examples"] += 1
    path = _unique_path()
    with open(path, "wb") as f:
        f.write(TEMPLATE)
    try:
        with Region.open(path) as region:
            raw = mmap.mmap(region.fileno(), SIZE)
            rings = {n: region.ring(n) for n in SHAPES}
            try:
                for s in steps:
                    if s[0] == "poke":
                        off = s[1][0]
                        if off < 4096:  # the directory is covered above; here, rings only
                            continue
                        apply(raw, s[1])
                        continue
                    _, name, op, arg = s
                    ring = rings[name]
                    if ring is None:
                        ring = rings[name] = call(lambda: region.ring(name), CorruptionError)
                        if ring is None:
                            continue
                    kind, slot, cap = SHAPES[name]
                    maxlen = slot * cap if kind == "spsc" else slot
                    if op == 0:
                        call(lambda: ring.try_send(b"p" * (arg % (maxlen + 2))), CorruptionError,
                             MessageTooLargeError)
                    elif op == 1:
                        m = call(ring.try_recv, CorruptionError)
                        assert m is None or len(m) <= maxlen
                    elif op == 2:
                        ms = call(lambda: ring.recv_many(arg % 8 + 1), CorruptionError) or []
                        assert all(len(m) <= maxlen for m in ms)
                    elif op == 3:
                        n = call(lambda: ring.send_many([b"q" * (arg % (slot + 1))] * (arg % 5)),
                                 CorruptionError)
                        assert n is None or 0 <= n <= 4
                    elif op == 4:
                        b = bytearray(arg % (maxlen + 1))
                        n = call(lambda: ring.recv_into(b), CorruptionError, MessageTooLargeError)
                        assert n is None or 0 <= n <= len(b)
                    elif op == 5:
                        v = call(ring.peek, CorruptionError, MessageTooLargeError)
                        if v is not None:
                            assert len(v) <= slot
                            bytes(v)
                            call(ring.release, CorruptionError)
                    elif op == 6:
                        v = call(lambda: ring.reserve(arg % (slot + 1)), CorruptionError)
                        if v is not None:
                            v[:] = b"v" * len(v)
                            call(lambda: ring.commit(arg % (len(v) + 1)))
                    elif op == 7:
                        assert 0 <= len(ring) <= cap + 1
                    elif op == 8:
                        call(lambda: ring.recv(timeout=0), WaitTimeout, StallError, CorruptionError)
                    else:
                        ring.close()
                        rings[name] = None  # re-open on next use, as after a crash
            finally:
                for r in rings.values():
                    if r is not None:
                        r.close()
                raw.close()
    finally:
        os.unlink(path)
