"""MPMC consumers killed (SIGKILL) at random points of recv, recv_many and peek.

Hundreds of consumer processes (forked, so each starts in a millisecond) receive from one MPMC ring
while this process produces; each is killed at a random moment.  A consumer killed between claiming
messages and releasing them leaves claimed slots behind; the ring must never wedge silently: a
producer that reaches such a slot gets a StallError naming it (and ``stalled()`` names it too), and
``recover(slot)``, the documented operator's recovery, gets it moving.  No message is delivered
twice, and every message is accounted for: received, or lost with a recovered claim or with a
consumer killed between its copy and its report.
"""
from __future__ import annotations

import hashlib as _hashlib
import os
import random
import signal
import struct
import time

import pytest

from pyivshmem import Region, StallError, WaitTimeout

KILLS = 300
CAP = 16
BURST = 4


def _consumer(path: str, wfd: int, seed: int) -> None:
    """Receive forever with a random mix of calls; report each id (8 bytes) on the pipe."""
    rnd = random.Random(seed)
    region = Region.open(path)
    ring = region.ring("q")
    while True:
        op = rnd.randrange(3)
        if op == 0:
            try:
                msgs = [ring.recv(timeout=0.05)]
            except WaitTimeout:
                msgs = []
        elif op == 1:
            msgs = ring.recv_many(rnd.randint(1, BURST), timeout=0.05)
        else:
            view = ring.peek()
            msgs = []
            if view is not None:
                for _ in range(20):  # work on the message in place, as a peeking consumer does
                    _hashlib.sha256(view).digest()
                msgs = [view.tobytes()]
                ring.release()
        for m in msgs:
            os.write(wfd, m[:8])


def _read_ids(rfd: int) -> list:
    data = b""
    while True:
        chunk = os.read(rfd, 65536)
        if not chunk:
            break
        data += chunk
    assert len(data) % 8 == 0
    return [struct.unpack_from("<Q", data, i)[0] for i in range(0, len(data), 8)]


@pytest.mark.timeout(180)
def test_mpmc_consumers_killed_at_random_never_wedge_silently(shm_path):
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    rnd = random.Random(seed)
    region = Region.create(shm_path, "1M")
    ring = region.create_ring("q", "mpmc", slot_size=32, capacity=CAP)
    sent = 0
    received = []
    recovered = 0
    stall_reports = 0

    def take(msgs):
        received.extend(struct.unpack("<Q", m[:8])[0] for m in msgs)

    def recover_all():
        """Every consumer is dead here: recover each slot the ring reports, oldest first."""
        nonlocal recovered
        while (pos := ring.stalled()) is not None:
            assert ring.recover(pos) == "consumer", f"seed {seed}: slot {pos}"
            recovered += 1
            take(ring.recv_many(CAP))  # what queued behind it

    def send_one(consumer_alive):
        """Send the next id; False if a stall stopped it while a consumer is alive (the caller
        kills that consumer first: only the claims of dead consumers may be recovered)."""
        nonlocal sent, stall_reports
        msg = struct.pack("<Q", sent) + b"payload"
        while True:
            try:
                ring.send(msg, timeout=0.1)
                sent += 1
                return True
            except StallError as e:
                # never silent: the report names the slot, and stalled() agrees
                assert e.side == "consumer" and "recover(" in str(e), f"seed {seed}: {e}"
                assert ring.stalled() == e.slot, f"seed {seed}: stalled() {ring.stalled()} vs {e.slot}"
                stall_reports += 1
                if consumer_alive:
                    return False
                recover_all()
            except WaitTimeout as e:
                # full, and no slot held by a consumer blocks it: unclaimed messages
                if not consumer_alive:
                    assert len(ring) == CAP, f"seed {seed}: silent wedge: {e} (len {len(ring)})"
                    take(ring.recv_many(CAP))

    try:
        for k in range(KILLS):
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the consumer
                code = 0
                try:
                    os.close(rfd)
                    _consumer(shm_path, wfd, seed + k)
                except BaseException:
                    code = 1
                finally:
                    os._exit(code)
            os.close(wfd)
            stalled = False
            try:
                # keep the consumer busy, then kill it at once: at a random point of its calls
                for _ in range(rnd.randint(CAP, 4 * CAP)):
                    if not send_one(True):
                        stalled = True
                        break
                if rnd.random() < 0.2:
                    time.sleep(rnd.uniform(0, 0.001))
            finally:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status), f"seed {seed}: consumer {k} exited by itself ({status})"
            received.extend(_read_ids(rfd))
            os.close(rfd)
            if stalled:
                recover_all()
        # afterwards the ring works: fill it twice over, each message drained (stalls recovered)
        for _ in range(2 * CAP):
            send_one(False)
            take(ring.recv_many(CAP))
        take(ring.recv_many(CAP))
        recover_all()  # claims dead consumers still hold that no producer reached yet
        take(ring.recv_many(CAP))
        assert len(received) == len(set(received)), f"seed {seed}: a message was delivered twice"
        assert set(received) <= set(range(sent))
        lost = sent - len(received)
        # lost: claims recovered, plus messages a consumer copied but was killed before reporting
        assert recovered <= lost <= recovered + KILLS * BURST, (seed, sent, lost, recovered)
        assert stall_reports > 0, f"seed {seed}: no kill ever left a claim behind"
        print(f"{KILLS} kills, {sent} sent, {len(received)} received, {recovered} slots recovered, "
              f"{stall_reports} stall reports")
    finally:
        region.close()
