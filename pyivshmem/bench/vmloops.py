"""The measuring loops of the guest topologies, run on both sides of a QEMU guest boundary.

``pyivshmem bench --topology host-guest|guest-guest`` (guests.py) writes a *plan*: the rings of the
region and a list of phases (a round trip, the wake-up of a sleeping receiver, or a one-way
stream), each naming which participant
(``host``, ``guest``, ``a``, ``b``) plays which part. Every participant runs :func:`run_plan` on its
own view of the same region (a host :class:`~pyivshmem.Peer`, or a :class:`~pyivshmem.PciDevice`
in a guest) and gets a JSON-able dict of what it measured. The phases follow each other through the
rings themselves: a participant's part of a phase starts when the other's first message arrives.

Only the standard library and pyivshmem are imported, so this module runs inside a guest too (the
guest gets the package as it is installed on the host).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

from ..errors import CorruptionError
from .stats import Histogram

__all__ = ["run_plan", "message", "ring_shapes"]

Alive = Callable[[], None]  # raises when the other side is known to be gone


def message(i: int, size: int) -> bytes:
    """Message ``i`` of a phase: its sequence number, then filler up to ``size`` bytes."""
    head = i.to_bytes(8, "little")
    return head + bytes((i + k) & 0xFF for k in range(min(size - 8, 56))) + bytes(max(0, size - 64))


def _seq(m: bytes) -> int:
    return int.from_bytes(m[:8], "little")


def ring_shapes(size: int, kind: str) -> Dict[str, int]:
    """Slot size and capacity of a ring for ``kind`` ("rtt": ping-pong, "stream": one way)."""
    slot = max(64, size)
    if kind == "rtt":
        return {"slot": slot, "capacity": 4}
    cap = 256
    while cap > 8 and cap * slot > (1 << 20):
        cap //= 2
    return {"slot": slot, "capacity": cap}


def _merge(*stats: Dict[str, int]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for s in stats:
        for k, v in s.items():
            out[k] = out.get(k, 0) + int(v)
    return out


class _Clock:
    """Deadline checks that cost little inside a spin loop."""

    def __init__(self, timeout: float, alive: Alive, what: str) -> None:
        self.deadline = time.monotonic() + timeout
        self.alive, self.what, self.n = alive, what, 0

    def tick(self) -> None:
        self.n += 1
        if self.n & 0x3FF == 0:
            self.check()

    def check(self) -> None:
        self.alive()
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"{self.what}: no progress before the deadline")


def _spin_send(ch: Any, m: bytes, clock: _Clock) -> None:
    while not ch.try_send(m):
        clock.tick()


def _spin_recv(ch: Any, clock: _Clock) -> bytes:
    while True:
        r = ch.try_recv()
        if r is not None:
            return r
        clock.tick()


def _recv(ch: Any, timeout: float, alive: Alive, what: str) -> bytes:
    """Blocking receive in slices of at most a second, checking ``alive`` between them."""
    clock = _Clock(timeout, alive, what)
    while True:
        try:
            return ch.recv(timeout=1.0)
        except TimeoutError:
            clock.check()


def _send(ch: Any, m: bytes, timeout: float, alive: Alive, what: str) -> None:
    clock = _Clock(timeout, alive, what)
    while True:
        try:
            ch.send(m, timeout=1.0)
            return
        except TimeoutError:
            clock.check()


def _rtt(ph: Dict[str, Any], part: str, chans: Dict[str, Any], timeout: float,
         alive: Alive) -> Dict[str, Any]:
    ping, pong = chans[ph["ping"]], chans[ph["pong"]]
    busy, size = ph["busy"], ph["size"]
    total = ph["warmup"] + ph["samples"]
    what = ph["name"]
    if part == "client":
        hist = Histogram()
        clock = _Clock(timeout, alive, what)
        for i in range(total):
            m = message(i, size)
            t0 = time.perf_counter_ns()
            if busy:
                _spin_send(ping, m, clock)
                r = _spin_recv(pong, clock)
            else:
                _send(ping, m, timeout, alive, what)
                r = _recv(pong, timeout, alive, what)
            t1 = time.perf_counter_ns()
            if r != m:
                raise CorruptionError(f"{what}: echo {i} differs from what was sent", ph["pong"])
            if i >= ph["warmup"]:
                hist.record(t1 - t0)
            clock.deadline = time.monotonic() + timeout
        return {"histogram": hist.to_dict(), "counters": _merge(ping.stats, pong.stats)}
    # echo
    clock = _Clock(timeout, alive, what)
    for i in range(total):
        if busy:
            r = _spin_recv(ping, clock)
            _spin_send(pong, r, clock)
        else:
            r = _recv(ping, timeout, alive, what)
            _send(pong, r, timeout, alive, what)
        if _seq(r) != i:
            raise CorruptionError(f"{what}: ping {i} carries sequence number {_seq(r)}", ph["ping"])
        clock.deadline = time.monotonic() + timeout
    return {"echoed": total, "counters": _merge(ping.stats, pong.stats)}


def _stream(ph: Dict[str, Any], part: str, chans: Dict[str, Any], timeout: float,
            alive: Alive) -> Dict[str, Any]:
    ch = chans[ph["ring"]]
    count, size, what = ph["count"], ph["size"], ph["name"]
    if part == "sender":
        for i in range(count):
            _send(ch, message(i, size), timeout, alive, what)
        return {"sent": count, "counters": dict(ch.stats)}
    start = end = 0
    for i in range(count):
        r = _recv(ch, timeout, alive, what)
        end = time.perf_counter_ns()
        if i == 0:
            start = end
        if len(r) != size or _seq(r) != i:
            raise CorruptionError(f"{what}: message {i} arrived as #{_seq(r)} of {len(r)} bytes",
                                  ph["ring"])
    return {"messages": count, "start_ns": start, "end_ns": end, "counters": dict(ch.stats)}


def _asleep(region: Any, ring: str, clock: _Clock, patience: float = 1.0) -> bool:
    """Wait (up to ``patience`` seconds) until a consumer of ``ring`` is waiting for its doorbell;
    whether one was.  Reads the ring's control block through ``region.rings()``."""
    deadline = time.monotonic() + patience
    while True:
        for r in region.rings():
            if r.get("name") == ring and (r.get("consumers_waiting") or 0) > 0:
                return True
        if time.monotonic() > deadline:
            return False
        clock.check()
        time.sleep(0.0002)


def _wake(ph: Dict[str, Any], part: str, chans: Dict[str, Any], timeout: float,
          alive: Alive, region: Any) -> Dict[str, Any]:
    """The wake-up of a sleeping receiver, timed on the waker's clock only.

    The echo side sleeps in ``Channel.recv`` (spin 0) on the ping ring.  The client waits
    ``gap`` seconds and until the echo shows as waiting in the ping ring's control block, then
    sends (ringing its doorbell) and busy-polls the pong ring for the answer: a sample is one
    wake-up of a sleeping receiver plus one busy-polled hop back (no clock is shared across a VM
    boundary, so a one-way time cannot be taken)."""
    ping, pong = chans[ph["ping"]], chans[ph["pong"]]
    size, what, n, gap = ph["size"], ph["name"], ph["samples"], ph["gap"]
    if part == "client":
        hist = Histogram()
        clock = _Clock(timeout, alive, what)
        asleep = 0
        watch = ping.doorbell is not None  # without doorbells a receiver polls, never waits
        for i in range(n):
            time.sleep(gap)
            if watch and _asleep(region, ph["ping"], clock):
                asleep += 1
            m = message(i, size)
            t0 = time.perf_counter_ns()
            _send(ping, m, timeout, alive, what)
            r = _spin_recv(pong, clock)
            t1 = time.perf_counter_ns()
            if r != m:
                raise CorruptionError(f"{what}: answer {i} differs from what was sent", ph["pong"])
            hist.record(t1 - t0)
            clock.deadline = time.monotonic() + timeout
        return {"histogram": hist.to_dict(), "counters": _merge(ping.stats, pong.stats),
                "asleep": asleep}
    for i in range(n):
        r = _recv(ping, timeout, alive, what)
        _send(pong, r, timeout, alive, what)
        if _seq(r) != i:
            raise CorruptionError(f"{what}: ping {i} carries sequence number {_seq(r)}", ph["ping"])
    return {"echoed": n, "counters": _merge(ping.stats, pong.stats)}


def run_plan(plan: Dict[str, Any], me: str, region: Any, doorbell: Any,
             alive: Optional[Alive] = None) -> Dict[str, Any]:
    """Play participant ``me``'s part of every phase of ``plan``; {phase name: what it measured}."""
    from .. import Channel

    alive = alive or (lambda: None)
    timeout = float(plan.get("op_timeout", 120.0))
    out: Dict[str, Any] = {}
    for ph in plan["phases"]:
        if ph["kind"] in ("rtt", "wake"):
            roles = {ph["client"]: "client", ph["echo"]: "echo"}
            rings = (ph["ping"], ph["pong"])
        else:
            roles = {ph["sender"]: "sender", ph["receiver"]: "receiver"}
            rings = (ph["ring"],)
        part = roles.get(me)
        if part is None:
            continue
        spin = 0.0 if ph.get("mode") == "blocking" else None
        chans: Dict[str, Any] = {}
        try:
            for name in rings:
                vector = plan["rings"][name]["vector"]
                chans[name] = Channel(region.ring(name), doorbell, vector=vector, spin=spin)
            t0 = time.monotonic()
            if ph["kind"] == "rtt":
                res = _rtt(ph, part, chans, timeout, alive)
            elif ph["kind"] == "wake":
                res = _wake(ph, part, chans, timeout, alive, region)
            else:
                res = _stream(ph, part, chans, timeout, alive)
            res["elapsed_s"] = time.monotonic() - t0
        finally:
            for ch in chans.values():
                ch.close()
        out[ph["name"]] = res
    return out
