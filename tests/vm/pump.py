"""A two-way message pump over a pair of SPSC rings plus doorbells, used on both sides of the VM
streaming tests (the host imports it; the guest gets a copy as /test/pump.py).

Each side sends its messages and receives the other's at the same time, rings the peer whenever it
made progress (new messages, or room freed), and sleeps on its own doorbell when it could do nothing.
Doorbells are hints: every sleep is bounded, so a lost ring costs latency, not a hang.
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable, Dict, List, Sequence


def message(i: int, tag: bytes, size: int = 64) -> bytes:
    """Message number i: 4-byte sequence number, tag, then deterministic filler."""
    head = i.to_bytes(4, "little") + tag
    body = hashlib.blake2b(head, digest_size=32).digest()
    return (head + body * 8)[:8 + (i * 37) % (size - 8)]


def make_messages(n: int, tag: bytes, size: int = 64) -> List[bytes]:
    """n distinct messages (see message())."""
    return [message(i, tag, size) for i in range(n)]


def pump(send_ring, recv_ring, outgoing: Sequence[bytes], n_in: int, ring_peer: Callable[[], None],
         sleep: Callable[[float], object], *, timeout: float, sleep_bound: float = 0.2) -> Dict:
    """Send ``outgoing``, receive ``n_in`` messages; returns stats and the received messages."""
    sent = 0
    got: List[bytes] = []
    rings = sleeps = 0
    deadline = time.monotonic() + timeout
    while sent < len(outgoing) or len(got) < n_in:
        progress = False
        if sent < len(outgoing):
            k = send_ring.send_many(outgoing[sent:sent + 64])
            if k:
                sent += k
                progress = True
        if len(got) < n_in:
            batch = recv_ring.recv_many(256)
            if batch:
                got.extend(batch)
                progress = True
        if progress:
            ring_peer()
            rings += 1
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"pump stuck: sent {sent}/{len(outgoing)}, received {len(got)}/{n_in}")
        sleep(sleep_bound)
        sleeps += 1
    return {"sent": sent, "received": got, "rings": rings, "sleeps": sleeps}


def lockstep(send_ring, recv_ring, outgoing: Sequence[bytes], window: int, *, lead: bool,
             ring_peer: Callable[[], None], wait: Callable[[float], int], bound: float = 5.0,
             timeout: float = 240) -> Dict:
    """Batches of ``window`` messages in turn: the leader sends a batch and rings, the follower sleeps
    until rung, takes the whole batch, sends its own batch and rings back; and so on.

    Every sleep here must end by a doorbell: the peer sends a batch only after this side answered
    the previous one, so each batch is announced by exactly one ring that cannot merge with the next.
    ``wait(t)`` returns how many rings arrived (0 on timeout). The batch must be complete when the
    ring is seen (stores before the doorbell are visible after it): if it is not, that is counted.
    Returns the received messages, the wake-ups by doorbell, bounded-sleep timeouts and incomplete
    batches.
    """
    got: List[bytes] = []
    woken = timeouts = incomplete = 0
    deadline = time.monotonic() + timeout
    batches = [outgoing[i:i + window] for i in range(0, len(outgoing), window)]

    def send(batch):
        k = 0
        while k < len(batch):
            k += send_ring.send_many(batch[k:])
            if k < len(batch):  # the ring is sized for a window; never full in lockstep
                raise AssertionError(f"ring full in lockstep after {k} of {len(batch)}")
        ring_peer()

    def take(n):
        nonlocal woken, timeouts, incomplete
        while True:
            if wait(bound):
                woken += 1
                break
            timeouts += 1
            if time.monotonic() > deadline:
                raise TimeoutError(f"lockstep stuck after {len(got)} messages")
        batch = recv_ring.recv_many(n)
        if len(batch) < n:
            incomplete += 1
            while len(batch) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"lockstep batch incomplete: {len(batch)}/{n}")
                batch.extend(recv_ring.recv_many(n - len(batch)))
        got.extend(batch)

    for b in batches:
        if lead:
            send(b)
            take(len(b))
        else:
            take(len(b))
            send(b)
    return {"received": got, "woken": woken, "timeouts": timeouts, "incomplete": incomplete,
            "batches": len(batches)}


def check_sequence(msgs: Sequence[bytes], expected: Sequence[bytes]) -> None:
    """Exactly once, in order, contents intact: raise AssertionError naming the first difference."""
    if len(msgs) != len(expected):
        raise AssertionError(f"received {len(msgs)} messages, expected {len(expected)}")
    for i, (a, b) in enumerate(zip(msgs, expected)):
        if a != b:
            seq = int.from_bytes(a[:4], "little") if len(a) >= 4 else None
            raise AssertionError(f"message {i} differs (carries sequence number {seq}, length {len(a)})")
