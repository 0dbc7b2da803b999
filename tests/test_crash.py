"""Processes that die at the worst moment: what the other side receives afterwards.

- An SPSC producer SIGKILLed in the middle of a batch: the consumer receives exactly the messages
  published before (the shared head), each intact, and never the half-written one; a restarted
  producer continues from there.
- A consumer killed and restarted resumes after the last message it consumed; a message it had
  only peeked at is delivered again.
- An MPMC producer that dies between reserve() and commit(): receivers get StallError naming the
  slot and ring.stalled() reports it, instead of waiting forever.
Children are started with the "spawn" context; every wait has a timeout.
"""
from __future__ import annotations

import json
import mmap
import multiprocessing as mp
import os
import random
import signal
import struct
import time

import pytest

from pyivshmem import Region, StallError, WaitTimeout

pytestmark = pytest.mark.timeout(120)

CTX = mp.get_context("spawn")


# -- helpers --------------------------------------------------------------------------------------

def record(key: str, value: dict) -> None:
    """Figures for docs/hardening.md, when PYIVSHMEM_HARDENING_STATS names a file."""
    path = os.environ.get("PYIVSHMEM_HARDENING_STATS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": key, **value}) + "\n")


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Wait until `pid` is in the stopped state (after SIGSTOP)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.0002)
    raise AssertionError(f"process {pid} did not stop within {timeout} s")


def kill_and_reap(p, timeout: float = 30.0) -> None:
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
    p.join(timeout)
    assert p.exitcode is not None, "child did not die"


def ring_info(region: Region, name: str) -> dict:
    return next(d for d in region.rings() if d.get("name") == name)


def stride(kind: str, slot_size: int) -> int:
    hdr = 8  # both slot headers are 8 bytes (docs/layout.md)
    return (hdr + slot_size + 7) & ~7


def fill_byte(seq: int, rnd: int) -> int:
    return 0x80 | ((seq * 31 + rnd * 7) % 127)


def payload(seq: int, rnd: int, n: int) -> bytes:
    """Message `seq` of producer round `rnd`: a 12-byte header and n bytes that depend on both,
    so a torn message (old and new bytes mixed) or one from a dead producer is recognisable."""
    return struct.pack("<QI", seq, rnd) + bytes([fill_byte(seq, rnd)]) * n


def check_payload(m: bytes) -> tuple[int, int]:
    seq, rnd = struct.unpack_from("<QI", m)
    body = m[12:]
    assert body == bytes([fill_byte(seq, rnd)]) * len(body), f"message {seq} (round {rnd}) is torn"
    return seq, rnd


# -- producer killed mid-batch --------------------------------------------------------------------

SLOT, CAP = 4096, 1024


def _batch_producer(path: str, start: int, rnd: int) -> None:
    sizes = random.Random(rnd)
    with Region.open(path) as r:
        ring = r.ring("batch")
        seq = start
        while True:
            batch = [payload(seq + i, rnd, sizes.randrange(0, 120_000)) for i in range(16)]
            done = 0
            while done < len(batch):  # one publish per batch unless the ring fills up
                done += ring.send_many(batch[done:], timeout=None)
            seq += len(batch)


def test_spsc_producer_killed_mid_batch(shm_path):
    rounds = 3
    with Region.create(shm_path, "8M") as region:
        ring = region.create_ring("batch", "spsc", slot_size=SLOT, capacity=CAP)
        raw = mmap.mmap(region.fileno(), region.size)  # to look at what was written, not published
        info0 = ring_info(region, "batch")
        ctrl = info0["offset"]
        slots_at = ctrl + info0["size"] - CAP * stride("spsc", SLOT)  # slots fill whole lines
        expected = 0
        mid_batch_kills = stops = 0
        try:
            for rnd in range(1, rounds + 1):
                p = CTX.Process(target=_batch_producer, args=(shm_path, expected, rnd))
                p.start()
                try:
                    got_this_round = 0
                    attempts = 400
                    for attempt in range(attempts):
                        # stop it while it writes: wait until it publishes again (it was blocked
                        # on a full ring or just resumed), then a little more, at random
                        moved_from = ring_info(region, "batch")["head"]
                        until = time.monotonic() + 0.5
                        while (ring_info(region, "batch")["head"] == moved_from
                               and time.monotonic() < until):
                            pass
                        pause_until = time.perf_counter() + random.uniform(0, 0.0003)
                        while time.perf_counter() < pause_until:
                            pass
                        os.kill(p.pid, signal.SIGSTOP)
                        wait_stopped(p.pid)
                        stops += 1
                        # the producer is frozen: take everything it has published
                        while True:
                            m = ring.try_recv()
                            if m is None:
                                break
                            seq, r = check_payload(m)
                            assert seq == expected, f"expected message {expected}, got {seq}"
                            assert r == rnd, f"message {seq} from round {r} during round {rnd}"
                            expected += 1
                            got_this_round += 1
                        head = ring_info(region, "batch")["head"]
                        slot = slots_at + (head % CAP) * stride("spsc", SLOT)
                        written = bytes(raw[slot + 8:slot + 20])
                        caught = got_this_round >= 40 and written == struct.pack("<QI", expected, rnd)
                        if caught or attempt == attempts - 1:
                            # caught: message `expected` is (partly) written but not published.
                            # Out of attempts: kill it frozen all the same, so that what is left
                            # is still exactly what was published before the freeze.
                            os.kill(p.pid, signal.SIGKILL)
                            mid_batch_kills += caught
                            break
                        os.kill(p.pid, signal.SIGCONT)
                finally:
                    kill_and_reap(p)
                # what is left is exactly what was published before the kill: nothing
                info = ring_info(region, "batch")
                assert ring.try_recv() is None, "a message published after the producer was frozen"
                assert info["head"] == info["tail"]
            assert expected > 0
            assert mid_batch_kills >= 1, "never caught the producer between writing and publishing"
        finally:
            raw.close()
        # and a last producer continues cleanly after the last kill
        p = CTX.Process(target=_batch_producer, args=(shm_path, expected, rounds + 1))
        p.start()
        try:
            m = ring.recv(timeout=30)
            assert check_payload(m) == (expected, rounds + 1)
        finally:
            kill_and_reap(p)
        record("producer_killed_mid_batch", {"kills": rounds, "mid_batch_kills": mid_batch_kills,
                                             "freezes": stops, "messages_checked": expected + 1})


# -- consumer killed and restarted ----------------------------------------------------------------

N = 600


def _consumer(path: str, name: str, take: int, mode: str, conn) -> None:
    with Region.open(path) as r:
        ring = r.ring(name)
        got = []
        while len(got) < take:
            if mode == "recv_many":
                got += [int.from_bytes(m[:8], "little") for m in ring.recv_many(min(7, take - len(got)), timeout=10)]
            else:
                got.append(int.from_bytes(ring.recv(timeout=10)[:8], "little"))
        peeked = None
        if mode == "peek":
            view = ring.peek()
            peeked = int.from_bytes(view[:8], "little")
        conn.send((got, peeked))
        time.sleep(60)  # killed here


def _consumer_forever(path: str, name: str, conn) -> None:
    rnd = random.Random(os.getpid())
    with Region.open(path) as r:
        ring = r.ring(name)
        while True:
            if rnd.random() < 0.5:
                msgs = ring.recv_many(rnd.randrange(1, 9), timeout=10)
            else:
                msgs = [ring.recv(timeout=10)]
            for m in msgs:
                conn.send(int.from_bytes(m[:8], "little"))
            time.sleep(rnd.random() * 0.001)


def _fill(ring, n):
    for i in range(n):
        ring.send(i.to_bytes(8, "little") + b"payload", timeout=10)


# (an MPMC peek claims its slot: a consumer dying with one is test_mpmc_consumer_killed_holding_a_peek)
@pytest.mark.parametrize("kind,mode", [("spsc", "recv"), ("spsc", "recv_many"), ("spsc", "peek"),
                                       ("mpmc", "recv"), ("mpmc", "recv_many")])
def test_consumer_killed_then_restarted_resumes(shm_path, kind, mode):
    take = 250
    with Region.create(shm_path, "1M") as region:
        ring = region.create_ring("q", kind, slot_size=32, capacity=1024)
        _fill(ring, N)
        parent, child = CTX.Pipe()
        p = CTX.Process(target=_consumer, args=(shm_path, "q", take, mode, child))
        p.start()
        try:
            assert parent.poll(60), "first consumer reported nothing"
            got, peeked = parent.recv()
        finally:
            kill_and_reap(p)
        assert got == list(range(take))
        # the restarted consumer: a new handle, which starts from the shared tail (the parent's
        # old handle was the producer; its consumer half knows nothing of the dead consumer)
        with region.ring("q") as again:
            rest = again.recv_many(N)
            assert [int.from_bytes(m[:8], "little") for m in rest] == list(range(take, N))
            if mode == "peek":
                assert peeked == take, "the peeked message is delivered again after the crash"
            assert again.try_recv() is None


def test_spsc_consumer_killed_at_a_random_moment(shm_path, random_seed):
    """Killed anywhere: the next consumer starts exactly at the shared tail, which is after
    everything the dead one reported and before everything it did not consume."""
    rnd = random.Random(random_seed)  # where to kill; printed on failure (conftest)
    n = 3000
    with Region.create(shm_path, "1M") as region:
        ring = region.create_ring("q", "spsc", slot_size=32, capacity=4096)
        _fill(ring, n)
        start = 0
        for trial in range(4):
            parent, child = CTX.Pipe()
            p = CTX.Process(target=_consumer_forever, args=(shm_path, "q", child))
            p.start()
            reported = []
            target = rnd.randrange(10, 150)
            try:
                deadline = time.monotonic() + 60
                while len(reported) < target and time.monotonic() < deadline:
                    if parent.poll(0.5):
                        reported.append(parent.recv())
            finally:
                kill_and_reap(p)
            while parent.poll(0):
                reported.append(parent.recv())
            tail = ring_info(region, "q")["tail"]
            assert len(reported) >= target
            assert reported == list(range(start, start + len(reported))), "lost or repeated"
            assert start + len(reported) <= tail < n
            start = tail  # where the next consumer must begin
        with region.ring("q") as again:  # a new consumer handle starts at the shared tail
            rest = again.recv_many(n)
        assert [int.from_bytes(m[:8], "little") for m in rest] == list(range(start, n))
        record("consumer_killed_at_random", {"kills": 4, "messages_checked": n})


def _peek_and_hold(path: str, conn) -> None:
    with Region.open(path) as r:
        ring = r.ring("q")
        view = ring.peek()
        conn.send(bytes(view))
        time.sleep(60)


def test_mpmc_consumer_killed_holding_a_peek(shm_path):
    """The peeked slot stays claimed: later messages are still received (consumers claim past
    it), but producers stop at that slot once the ring wraps around to it."""
    with Region.create(shm_path, "1M") as region:
        ring = region.create_ring("q", "mpmc", slot_size=32, capacity=4)
        for m in (b"a", b"b", b"c"):
            assert ring.try_send(m)
        parent, child = CTX.Pipe()
        p = CTX.Process(target=_peek_and_hold, args=(shm_path, child))
        p.start()
        try:
            assert parent.poll(60)
            assert parent.recv() == b"a"
        finally:
            kill_and_reap(p)
        assert ring.recv(timeout=5) == b"b"
        assert ring.recv(timeout=5) == b"c"
        assert ring.try_send(b"d")
        assert ring.try_send(b"e") is False  # the next lap reaches the slot of "a": never handed back
        assert ring.try_recv() == b"d"
        assert ring.try_recv() is None


# -- MPMC producer dying with a claimed slot --------------------------------------------------------

def _reserve_and_die(path: str, conn) -> None:
    with Region.open(path) as r:
        ring = r.ring("jobs")
        view = ring.reserve(16)
        view[:4] = b"half"
        conn.send("reserved")
        time.sleep(60)  # killed before commit()


def test_mpmc_stalled_producer_detected(shm_path):
    with Region.create(shm_path, "1M") as region:
        ring = region.create_ring("jobs", "mpmc", slot_size=32, capacity=8)
        assert ring.try_send(b"before")
        parent, child = CTX.Pipe()
        p = CTX.Process(target=_reserve_and_die, args=(shm_path, child))
        p.start()
        try:
            assert parent.poll(60) and parent.recv() == "reserved"
            assert ring.try_send(b"after")
        finally:
            kill_and_reap(p)
        assert ring.stalled() is None  # "before" is still ahead of the claim
        assert ring.recv(timeout=5) == b"before"
        assert ring.stalled() == 1
        with pytest.raises(StallError) as ei:
            ring.recv(timeout=0.2)
        assert "slot 1" in str(ei.value) and "jobs" in str(ei.value)
        assert isinstance(ei.value, WaitTimeout) and isinstance(ei.value, TimeoutError)
        assert ring.try_recv() is None, "a message behind the dead claim was delivered"
        assert len(ring) == 2
        with pytest.raises(StallError):
            ring.recv_many(4, timeout=0.05) or ring.recv(timeout=0.05)
        # another process sees the same
        with Region.open(shm_path) as r2:
            other = r2.ring("jobs")
            assert other.stalled() == 1
            with pytest.raises(StallError):
                other.recv(timeout=0.05)


def _mpmc_sender(path: str, start: int) -> None:
    with Region.open(path) as r:
        ring = r.ring("m")
        i = start
        while True:
            ring.send(payload(i, 0, i % 20), timeout=None)
            i += 1


def test_mpmc_producer_killed_while_sending(shm_path, random_seed):
    """Killed at a random moment: the consumer gets an unbroken, intact prefix, then either an
    empty ring (the kill fell between two messages) or a stall at exactly the next slot."""
    rnd = random.Random(random_seed)  # where to kill; printed on failure (conftest)
    outcomes = {"clean": 0, "stall": 0}
    with Region.create(shm_path, "1M") as region:
        ring = region.create_ring("m", "mpmc", slot_size=32, capacity=64)
        expected = 0  # one producer at a time and one consumer: index == sequence number
        for trial in range(5):
            p = CTX.Process(target=_mpmc_sender, args=(shm_path, expected))
            p.start()
            try:
                deadline = time.monotonic() + 60
                target = expected + rnd.randrange(200, 2000)
                while expected < target and time.monotonic() < deadline:
                    for m in ring.recv_many(64, timeout=1):
                        assert check_payload(m)[0] == expected
                        expected += 1
            finally:
                kill_and_reap(p)
            while True:
                try:
                    m = ring.recv(timeout=0.1)
                except StallError as e:
                    assert ring.stalled() == expected, "the stall is at the next message's slot"
                    assert f"slot {expected}" in str(e)
                    outcomes["stall"] += 1
                    break
                except WaitTimeout:
                    assert ring.stalled() is None and len(ring) == 0
                    outcomes["clean"] += 1
                    break
                assert check_payload(m)[0] == expected
                expected += 1
            if outcomes["stall"]:
                break  # the ring stays stalled at that slot: the documented outcome
        assert expected > 0 and sum(outcomes.values()) == trial + 1
        record("mpmc_producer_killed", {"kills": trial + 1, **outcomes, "messages_checked": expected})
