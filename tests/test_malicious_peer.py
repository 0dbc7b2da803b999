"""A malicious peer rewrites two rings' control blocks and slots while an honest process uses them.

The attacker (a spawned process with its own raw mapping) writes random and near-miss values over
head, tail, slot headers, sequence words and payloads of an SPSC and an MPMC ring, in bursts,
for a few seconds.  Meanwhile the honest process (also spawned, so that a crash or a hang shows
up as its exit status or a timeout here, not as a dead test runner) sends and receives on both
with every API.  It may only ever see valid results (bytes no longer than the ring allows, counts
in range) or the documented exceptions: CorruptionError naming that ring (after which it re-opens
the ring, as an application would), WaitTimeout/StallError from calls with a timeout,
MessageTooLargeError for a buffer that is too small.  A canary ring in the same region must carry
every one of its messages intact throughout.  Run under ASan by tests/c/run-python-asan.sh.
"""
from __future__ import annotations

import collections
import json
import mmap
import multiprocessing as mp
import os
import random
import struct
import time

import pytest

from pyivshmem import (
    CorruptionError,
    MessageTooLargeError,
    Region,
    StallError,
    WaitTimeout,
)

pytestmark = pytest.mark.timeout(180)

CTX = mp.get_context("spawn")
SECONDS = float(os.environ.get("PYIVSHMEM_MALICIOUS_SECONDS", "3"))
VICTIMS = {"spsc": ("spsc", 24, 16), "mpmc": ("mpmc", 24, 16)}  # kind, slot size, capacity


def record(key: str, value) -> None:
    """Figures for docs/hardening.md, when PYIVSHMEM_HARDENING_STATS names a file."""
    path = os.environ.get("PYIVSHMEM_HARDENING_STATS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": key, **value}) + "\n")


# -- the attacker -----------------------------------------------------------------------------------

def _attacker(path: str, seconds: float, seed: int, conn) -> None:
    rnd = random.Random(seed)
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, os.fstat(fd).st_size)
    os.close(fd)
    spans = []
    for i in range(62):  # the directory itself is left alone: this peer attacks rings
        e = 128 + 64 * i
        name = bytes(m[e:e + 32]).split(b"\0")[0].decode()
        if name in VICTIMS:
            ctrl, size = struct.unpack_from("<QQ", m, e + 40)
            stride, cap, slot = (struct.unpack_from("<I", m, ctrl + o)[0] for o in (20, 16, 12))
            assert stride * cap % 128 == 0  # so the slots end the ring: they start at size - stride * cap
            spans.append((ctrl, stride, cap, slot, ctrl + size - stride * cap))
    assert len(spans) == 2
    pokes = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(rnd.randrange(1, 30)):  # a burst, then a pause for the honest side
            ctrl, stride, cap, slot, slots = rnd.choice(spans)
            head, tail = struct.unpack_from("<Q", m, ctrl + 128)[0], struct.unpack_from("<Q", m, ctrl + 256)[0]
            what = rnd.randrange(10)
            if what == 0:    # plausible lies about the indices
                struct.pack_into("<Q", m, ctrl + 128, (tail + rnd.randrange(cap + 2)) % 2**64)
            elif what == 1:
                struct.pack_into("<Q", m, ctrl + 256, (head - rnd.randrange(cap + 2)) % 2**64)
            elif what == 2:  # wild ones
                struct.pack_into("<Q", m, ctrl + rnd.choice((128, 256)), rnd.getrandbits(64))
            else:            # a slot: header words or payload
                base = slots + rnd.randrange(cap) * stride
                off = base + 8 * rnd.randrange(stride // 8)
                cur = struct.unpack_from("<Q", m, off)[0]
                how = rnd.randrange(5)
                if how == 0:
                    v = rnd.getrandbits(64)
                elif how == 1:
                    v = (cur + rnd.randrange(-2, 3)) % 2**64       # a sequence word, nearly right
                elif how == 2:
                    v = rnd.randrange(3) << 32 | rnd.randrange(slot + 3)  # a length-like word beside a small one
                elif how == 3:
                    v = cur ^ (1 << rnd.randrange(64))
                else:
                    v = (cur + cap) % 2**64
                struct.pack_into("<Q", m, off, v)
            pokes += 1
        time.sleep(rnd.random() * 0.0005)
    m.close()
    conn.send(pokes)


# -- the honest side --------------------------------------------------------------------------------

def _honest(path: str, seconds: float, seed: int, conn) -> None:
    rnd = random.Random(seed)
    stats = collections.Counter()
    with Region.open(path) as region:
        rings = dict.fromkeys(VICTIMS)  # opened on first use: the attacker may already be at work
        canary = region.ring("canary")
        canary_seq = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            name = rnd.choice(list(VICTIMS))
            ring = rings[name]
            if ring is None:
                try:
                    ring = rings[name] = region.ring(name)
                    stats["reopened"] += 1
                except CorruptionError as e:
                    assert e.ring == name, e
                    stats["reopen_refused"] += 1
                    continue
            try:
                stats[one_op(ring, rnd)] += 1
            except CorruptionError as e:
                assert e.ring == name and name in str(e), e
                stats["corruption_" + name] += 1
                ring.close()
                rings[name] = None  # what an application does: drop the handle, re-open the ring
            # the bystander: always exact
            msg = b"canary %d " % canary_seq + bytes(canary_seq % 40)
            assert canary.try_send(msg)
            assert canary.try_recv() == msg, "canary ring damaged"
            canary_seq += 1
        stats["canary"] = canary_seq
        for r in rings.values():
            if r is not None:
                r.close()
        canary.close()
    conn.send(dict(stats))


def one_op(ring, rnd: random.Random) -> str:
    """One random call on a ring under attack; checks that its result is valid; returns a label."""
    kind, slot, cap = VICTIMS[ring.name]
    maxlen = slot * cap if kind == "spsc" else slot
    op = rnd.randrange(12)
    if op == 0:
        ring.try_send(os.urandom(rnd.randrange(maxlen + 1)))
        return "try_send"
    if op == 1:
        n = ring.send_many([bytes(rnd.randrange(slot + 1)) for _ in range(rnd.randrange(1, 10))])
        assert 0 <= n <= 9
        return "send_many"
    if op == 2:
        m = ring.try_recv()
        assert m is None or (isinstance(m, bytes) and len(m) <= maxlen)
        return "received" if m is not None else "empty"
    if op == 3:
        ms = ring.recv_many(rnd.randrange(1, 20))
        assert isinstance(ms, list) and len(ms) < 20 and all(len(m) <= maxlen for m in ms)
        return "received_many"
    if op == 4:
        buf = bytearray(rnd.randrange(maxlen + 2))
        try:
            n = ring.recv_into(buf)
        except MessageTooLargeError:
            return "buffer_too_small"
        assert n is None or 0 <= n <= len(buf)
        return "recv_into"
    if op == 5:
        try:
            view = ring.peek()
        except MessageTooLargeError:  # an SPSC message spanning several slots
            return "peek_multi_slot"
        if view is None:
            return "empty"
        assert len(view) <= slot
        bytes(view)
        ring.release()
        return "peeked"
    if op == 6:
        view = ring.reserve(rnd.randrange(slot + 1))
        if view is None:
            return "full"
        view[:] = b"r" * len(view)
        ring.commit()
        return "reserved"
    if op == 7:
        try:
            m = ring.recv(timeout=0.0005)
        except StallError:
            assert kind == "mpmc"
            return "stall_reported"
        except WaitTimeout:
            return "recv_timeout"
        assert len(m) <= maxlen
        return "received"
    if op == 8:
        try:
            ring.send(b"s" * rnd.randrange(slot + 1), timeout=0.0005)
        except WaitTimeout:
            return "send_timeout"
        return "sent"
    if op == 9:
        # an MPMC handle also counts the message recv_into() held back for a larger buffer
        assert 0 <= len(ring) <= cap + (kind == "mpmc")
        return "len"
    if op == 10:
        if kind == "mpmc":
            s = ring.stalled()
            assert s is None or s >= 0
        return "stalled"
    listing = ring.region.rings()
    assert {d.get("name") for d in listing} >= {"spsc", "mpmc", "canary"}
    return "listed"


# -- the test --------------------------------------------------------------------------------------

def test_honest_side_survives_a_scribbling_peer(shm_path, random_seed):
    seed = random_seed  # printed with any failure; PYIVSHMEM_SEED=<seed> replays it
    with Region.create(shm_path, "1M") as region:
        for name, (kind, slot, cap) in VICTIMS.items():
            region.create_ring(name, kind, slot_size=slot, capacity=cap).close()
        region.create_ring("canary", "spsc", slot_size=64, capacity=8).close()
        hp, hc = CTX.Pipe()
        ap, ac = CTX.Pipe()
        honest = CTX.Process(target=_honest, args=(shm_path, SECONDS, seed, hc))
        attacker = CTX.Process(target=_attacker, args=(shm_path, SECONDS, seed + 1, ac))
        honest.start()
        attacker.start()
        try:
            honest.join(SECONDS + 90)
            attacker.join(SECONDS + 90)
            assert honest.exitcode is not None, f"the honest side hung (seed {seed})"
            assert honest.exitcode == 0, f"the honest side failed or crashed (exit {honest.exitcode}, seed {seed})"
            assert attacker.exitcode == 0
            stats = hp.recv()
            pokes = ap.recv()
        finally:
            for p in (honest, attacker):
                if p.is_alive():
                    p.kill()
                    p.join(10)
        corruptions = sum(v for k, v in stats.items() if k.startswith("corruption_")) + stats.get("reopen_refused", 0)
        assert pokes > 100
        assert corruptions > 0, f"no corruption was ever detected: {stats}"
        assert stats["canary"] > 0
        assert stats.get("received", 0) + stats.get("received_many", 0) > 0, stats
        record("malicious_peer", {"seed": seed, "seconds": SECONDS, "pokes": pokes,
                                  "corruptions_detected": corruptions, **stats})
