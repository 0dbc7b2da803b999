"""Bridging rings between hosts over ZeroMQ, exactly once and in order per ring.

A :class:`Bridge` runs on each host.  It forwards the messages of local rings (``out``) to the
bridge at the other end, which delivers them into rings there (``in``); one connection carries
both directions.  docs/bridge.md describes the design, the envelope and the fault model.

Per forwarded ring (an *out stream*):

- a pump thread takes messages from the local ring (SPSC, or MPMC with other consumers) and
  appends each to a *spill file* (an mmap'd log in the state directory) **before** the ring slot
  is released, together with the ring position (MPMC: the slot's index) after it, so a killed
  and restarted sending bridge neither loses nor repeats one;
- the network thread sends the spilled, unacknowledged messages in batches (one ZeroMQ frame: the
  envelope and the batch's spill records as they lie in the file), resends them after a
  reconnect or a gap, and frees them when the receiver acknowledges them.  The spill file's size is the window: when it is full
  the pump stops taking from the ring, the ring fills and the local producer blocks.

Per delivered ring (an *in stream*):

- the network thread drops duplicates (sequence numbers) and queues new messages;
- a delivery thread writes them into the local ring with ``Channel.send_many`` (sleeping on the
  doorbell when the ring is full: backpressure) and records the last delivered sequence number and
  the ring's producer position after it in a small state file; only then is it acknowledged.  A
  restarted receiving bridge compares that position with the ring's own producer index to know
  exactly which messages of an interrupted batch reached the ring.  Into an MPMC ring (other
  producers too) it reserves and commits slot by slot, an intent naming each slot first.

ZeroMQ (pyzmq) is an optional dependency: ``pip install 'pyivshmem[bridge]'``.
"""
from __future__ import annotations

import collections
import logging
import mmap
import os
import re
import secrets
import struct
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import (
    ClosedError,
    ConfigError,
    IvshmemError,
    MessageTooLargeError,
    PeerDisconnected,
    WaitTimeout,
)

try:  # the transport is an optional extra
    import zmq
except ImportError:  # pragma: no cover - exercised by a test that blocks the import
    zmq = None

__all__ = ["Bridge", "BridgeError", "BridgeUnavailable", "RemoteUnreachable", "INSTALL_HINT",
           "require_transport"]

log = logging.getLogger("pyivshmem.bridge")

INSTALL_HINT = "pip install 'pyivshmem[bridge]'"


class BridgeError(IvshmemError, RuntimeError):
    """A bridge cannot run as configured (state files, rings, endpoints)."""


class BridgeUnavailable(BridgeError, ImportError):
    """The bridge's transport (ZeroMQ, the pyzmq package) is not installed."""


class RemoteUnreachable(PeerDisconnected):
    """The remote bridge did not answer within the time allowed."""


def require_transport() -> None:
    """Raise :class:`BridgeUnavailable` with the install command when pyzmq is missing."""
    if zmq is None:
        raise BridgeUnavailable(
            "the bridge needs ZeroMQ (the pyzmq package), which is not installed: "
            f"{INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------
# crash-safe small records in an mmap
# ---------------------------------------------------------------------------------------------

_CHECK_KEY = 0x6A09E667F3BCC908
_MASK64 = (1 << 64) - 1


def _check_of(values: Sequence[int]) -> int:
    c = _CHECK_KEY
    for v in values:
        c = ((c ^ v) * 0x100000001B3) & _MASK64
    return c


class _DualRecord:
    """``n`` u64 fields kept in two alternating copies with a generation and a check word, so a
    process killed in the middle of an update leaves the previous value readable."""

    def __init__(self, mm: mmap.mmap, offset: int, n: int):
        self._mm, self._off, self._n = mm, offset, n
        self._fmt = struct.Struct(f"<{n + 2}Q")
        self._gen = 0
        self.size = 2 * self._fmt.size

    def read(self) -> Optional[Tuple[int, ...]]:
        best = None
        for i in range(2):
            vals = self._fmt.unpack_from(self._mm, self._off + i * self._fmt.size)
            gen, fields, check = vals[0], vals[1:-1], vals[-1]
            if gen and check == _check_of(vals[:-1]) and (best is None or gen > best[0]):
                best = (gen, fields)
        if best is None:
            return None
        self._gen = best[0]
        return best[1]

    def write(self, *fields: int) -> None:
        self._gen += 1
        vals = (self._gen,) + tuple(f & _MASK64 for f in fields)
        slot = self._gen & 1
        self._fmt.pack_into(self._mm, self._off + slot * self._fmt.size, *vals, _check_of(vals))


def _open_map(path: str, size: int, magic: bytes) -> Tuple[mmap.mmap, bool]:
    """Map ``path`` (created with ``size`` bytes if missing or empty).  True when fresh."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        fresh = st.st_size == 0
        if fresh:
            os.ftruncate(fd, size)
        elif st.st_size != size:
            raise BridgeError(f"{path}: {st.st_size} bytes, expected {size}; it was made with "
                              "other settings (spill size): remove it only if its messages are "
                              "acknowledged or expendable")
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    if fresh:
        mm[0:8] = magic
    elif mm[0:8] != magic:
        mm.close()
        raise BridgeError(f"{path} is not a pyivshmem bridge state file (bad magic)")
    return mm, fresh


def _ring_entry(region: Any, name: str) -> Dict[str, Any]:
    for e in region.rings():
        if e.get("name") == name:
            return e
    raise BridgeError(f"ring {name!r} is not in the region; create it first "
                      "(region.create_ring(name, 'spsc', ...))")


def _bridged_ring(region: Any, name: str) -> Any:
    """The ring ``name`` of ``region``: SPSC (the bridge is its only consumer or producer) or
    MPMC (one consumer or producer among several); ConfigError for a publish-subscribe ring."""
    try:
        ring = region.ring(name)
    except KeyError:
        raise BridgeError(f"ring {name!r} is not in the region; create it first") from None
    if ring.kind not in ("spsc", "mpmc"):
        ring.close()
        raise ConfigError(
            f"ring {name!r} is {ring.kind}: the bridge forwards and delivers SPSC and MPMC rings. "
            "A publish-subscribe subscription ends with the process that holds it, so a restarted "
            "bridge could not take up where it left off: subscribe a process of your own that "
            "sends into an SPSC or MPMC ring, and bridge that ring")
    return ring



# ---------------------------------------------------------------------------------------------
# MPMC rings: the claims a killed predecessor left
# ---------------------------------------------------------------------------------------------

def _dead_claims(ring: Any, holder: str, lo: int, grace: float = 0.3) -> List[int]:
    """Slots of the MPMC ``ring`` from index ``lo`` on claimed by a ``holder`` ("consumer": not
    released; "producer": not committed) and still so after ``grace`` seconds: a live party holds
    one only for a copy."""
    first = ring.claims(holder, lo)
    if not first:
        return []
    time.sleep(grace)
    again = set(ring.claims(holder, lo))
    return [i for i in first if i in again]


def _slots_for(n: int, slot_size: int) -> int:
    return 1 if n <= slot_size else -(-n // slot_size)


# ---------------------------------------------------------------------------------------------
# the sending side's spill file
# ---------------------------------------------------------------------------------------------

_SPILL_MAGIC = b"PYIVBSP1"
_SPILL_HDR = 4096
_REC = struct.Struct("<QQII")  # seq, ring position after the message, length, check
_WRAP = 0xFFFFFFFF
# pending intents (taken from the ring by a call that consumes; recorded before it)
_P_NONE, _P_EMPTY, _P_INTO, _P_MPMC = 0, 1, 2, 3
# the receiving side's MPMC intents: none, a batch (seq, producer index before it), a slot
_I_NONE, _I_HINT, _I_IDX = 0, 1, 2


def _rec_check(seq: int, pos: int, n: int) -> int:
    """A record's check word: a torn header (some fields of this record, some of an older one
    at the same offset) fails it."""
    return ((seq * 0x9E3779B1) ^ (pos * 0x85EBCA77) ^ (n * 0xC2B2AE3D) ^ 0x5BD1E995) & 0xFFFFFFFF


class _Record:
    __slots__ = ("seq", "pos", "data", "off", "size", "t")

    def __init__(self, seq: int, pos: int, data: bytes, off: int, size: int, t: float):
        self.seq, self.pos, self.data, self.off, self.size, self.t = seq, pos, data, off, size, t


def _align8(n: int) -> int:
    return (n + 7) & ~7


class _Spill:
    """A circular log of the messages taken from a ring and not yet acknowledged.

    Header: magic, then two crash-safe records: ``acked`` (last acknowledged sequence number, the
    ring position after it, the offset of the first record after it) and ``pending`` (an intent
    written before a consuming call whose outcome only the ring's consumer index will tell).
    Records: ``seq, pos_after, len, check`` then the message, 8-aligned; a record is valid when its
    check matches and its seq follows the previous one, so a torn write ends the log.
    """

    def __init__(self, path: str, size: int):
        if size < 64 * 1024 or size & 7:
            raise ConfigError(f"spill size must be a multiple of 8 and at least 64 KiB, not {size}")
        self.path = path
        self.mm, fresh = _open_map(path, _SPILL_HDR + size, _SPILL_MAGIC)
        self.data_size = size
        self.acked_rec = _DualRecord(self.mm, 64, 3)
        self.pending_rec = _DualRecord(self.mm, 256, 5)
        self.fresh = fresh or self.acked_rec.read() is None
        if self.fresh:
            self.mm[16:24] = secrets.token_bytes(8)
        #: identifies this spill file's stream of sequence numbers to the receiver
        self.sid = int.from_bytes(self.mm[16:24], "little") or 1
        self.pending_rec.read()
        self.head = 0  # offset of the oldest unacknowledged record
        self.tail = 0  # offset of the next record
        self.used = 0  # bytes of live records (and wrap gaps) from head to tail

    def close(self) -> None:
        try:
            self.mm.close()
        except (BufferError, ValueError):
            pass

    # -- recovery -------------------------------------------------------------------------------
    def load(self) -> Tuple[int, Optional[int], List[_Record]]:
        """(acked_seq, ring position after it or None, records after it)."""
        a = self.acked_rec.read()
        if a is None:
            return 0, None, []
        acked_seq, acked_pos, off = a
        if off >= self.data_size or off & 7:
            raise BridgeError(f"{self.path}: corrupt header (offset {off})")
        recs: List[_Record] = []
        expect = acked_seq + 1
        start = off
        used = 0
        now = time.monotonic()
        while used < self.data_size:
            if self.data_size - off < _REC.size:
                used += self.data_size - off
                off = 0
                continue
            seq, pos, n, check = _REC.unpack_from(self.mm, _SPILL_HDR + off)
            if seq != expect or check != _rec_check(seq, pos, n):
                break
            if n == _WRAP:
                used += self.data_size - off
                off = 0
                continue
            size = _align8(_REC.size + n)
            if off + size > self.data_size or used + size > self.data_size:
                break
            d = _SPILL_HDR + off + _REC.size
            recs.append(_Record(seq, pos, bytes(self.mm[d:d + n]), off, size, now))
            expect += 1
            used += size
            off += size
            if off == self.data_size:
                off = 0
        self.head, self.tail, self.used = start, off, used
        if not recs:
            self.head = self.tail
        return acked_seq, acked_pos, recs

    # -- writing --------------------------------------------------------------------------------
    def free(self) -> int:
        return self.data_size - self.used

    def place(self, n: int) -> Optional[int]:
        """The offset where a record of ``n`` message bytes goes (writing a wrap marker if
        needed), or None when the log has no room for it now."""
        size = _align8(_REC.size + n)
        if size > self.data_size // 2:
            raise MessageTooLargeError(
                f"a message of {n} bytes does not fit the bridge's spill file ({self.data_size} "
                "bytes, at most half of it per message): raise --spill-size")
        gap = self.data_size - self.tail
        if size <= gap:
            return self.tail if self.used + size <= self.data_size else None
        if self.used + gap + size > self.data_size:
            return None
        return -1  # wraps: the caller writes the marker with the record's seq

    def write(self, seq: int, pos: int, data: Any, n: int) -> int:
        """Append a record (the caller checked place()).  Returns its offset."""
        off = self.place(n)
        if off is None:
            raise AssertionError("spill full")
        if off == -1:
            gap = self.data_size - self.tail
            if gap >= _REC.size:
                _REC.pack_into(self.mm, _SPILL_HDR + self.tail, seq, 0, _WRAP,
                               _rec_check(seq, 0, _WRAP))
            self.used += gap
            self.tail = off = 0
        d = _SPILL_HDR + off + _REC.size
        if n:
            self.mm[d:d + n] = data
        self.commit_at(off, seq, pos, n)
        return off

    def commit_at(self, off: int, seq: int, pos: int, n: int) -> None:
        """Write the record header (last: it makes the record valid) and advance the tail."""
        _REC.pack_into(self.mm, _SPILL_HDR + off, seq, pos, n, _rec_check(seq, pos, n))
        size = _align8(_REC.size + n)
        self.tail = off + size
        if self.tail == self.data_size:
            self.tail = 0
        self.used += size

    def data_view(self, off: int, n: int) -> memoryview:
        d = _SPILL_HDR + off + _REC.size
        return memoryview(self.mm)[d:d + n]



# ---------------------------------------------------------------------------------------------
# streams
# ---------------------------------------------------------------------------------------------

_LEN_RE = re.compile(r" is (\d+) bytes; the buffer holds")
_EMPTY = bytearray(0)


class _OutStream:
    """A local ring forwarded to a remote ring: the pump thread and the unacknowledged window."""

    def __init__(self, bridge: "Bridge", local: str, remote: str):
        self.bridge, self.local, self.remote = bridge, local, remote
        self.key = remote.encode()
        self.ring = _bridged_ring(bridge.region, local)
        self.mpmc = self.ring.kind == "mpmc"
        self.slot_size = self.ring.slot_size
        self.capacity = self.ring.capacity
        self.ch = bridge._channel(self.ring)
        path = os.path.join(bridge.state_dir, f"out-{local}.spill")
        self.spill = _Spill(path, bridge.spill_size)
        self.sid = self.spill.sid
        if _align8(_REC.size + self.slot_size) > self.spill.data_size // 2:
            self.spill.close()
            raise ConfigError(f"ring {local!r} has {self.slot_size}-byte slots: the spill size "
                              f"({self.spill.data_size} bytes) must hold at least two; raise it")
        self.lock = threading.Condition()
        self.window: "collections.deque[_Record]" = collections.deque()  # unacknowledged
        self.outq: "collections.deque[_Record]" = collections.deque()    # to send (next first)
        self.acked = 0
        self.acked_pos = 0
        self.next_seq = 1
        self.pos = 0
        self.last_progress = time.monotonic()
        self.m = {"messages": 0, "bytes": 0, "sent": 0, "resends": 0, "acked": 0, "lost": 0,
                  "dropped_on_restart": 0}
        self.thread: Optional[threading.Thread] = None
        self._recover()

    # -- restart ------------------------------------------------------------------------------
    def _recover_mpmc(self) -> None:
        """Restart over an MPMC ring.  Records hold the index of the slot each message came
        from (plus one).  The bridge holds at most one claimed slot at a time: a peek whose
        message is spilled but not released (its record names it), or, between the batch's
        intent and the record, a peek not yet spilled (the intent names the consumer index before
        the batch; the slot is the one claimed by a dead consumer from there on).  The first is
        released, the second spilled and released."""
        acked, acked_pos, recs = self.spill.load()
        if acked_pos is None:
            self.spill.acked_rec.write(0, 0, 0)
        gen = int(self.bridge.region.generation) & _MASK64
        same_region = acked_pos is None or int.from_bytes(self.spill.mm[24:32], "little") == gen
        if not same_region:
            log.warning("ring %r: the region was re-formatted since %s was written; its %d "
                        "unacknowledged message(s) will still be sent", self.local,
                        self.spill.path, len(recs))
        self.spill.mm[24:32] = gen.to_bytes(8, "little")
        self.acked, self.acked_pos = acked, 0
        last_seq = recs[-1].seq if recs else acked
        p = self.spill.pending_rec.read()
        pending = (p is not None and p[0] == _P_MPMC and p[1] <= last_seq + 1 and same_region)
        last_idx = recs[-1].pos - 1 if recs and recs[-1].pos else None
        lo = [x for x in (last_idx, p[2] if pending else None) if x is not None]
        dead = _dead_claims(self.ring, "consumer", min(lo)) if lo and same_region else []
        if last_idx is not None and last_idx in dead:
            self.ring.recover(last_idx)  # its message is in the spill file (the last record)
            dead.remove(last_idx)
            log.info("ring %r: released slot %d, whose message (seq %d) the previous bridge had "
                     "spilled", self.local, last_idx, last_seq)
        if pending:
            mine = [i for i in dead if i >= p[2] and (last_idx is None or i > last_idx)]
            if len(mine) == 1:
                i = mine[0]
                data = self.ring.read_claimed(i)
                n = len(data)
                if self.spill.place(n) is None:
                    raise BridgeError(f"ring {self.local!r}: no room in {self.spill.path} for "
                                      "the message the previous bridge was taking")
                off = self.spill.write(last_seq + 1, i + 1, data, n)
                recs.append(_Record(last_seq + 1, i + 1, data, off, _align8(_REC.size + n),
                                    time.monotonic()))
                self.ring.recover(i)
                dead.remove(i)
                last_seq += 1
                log.info("ring %r: the message the previous bridge was taking (seq %d, slot %d) "
                         "is in the spill file", self.local, last_seq, i)
            elif mine:
                log.error("ring %r: slots %s were claimed by consumers that died; one may have "
                          "been this bridge's predecessor's, which cannot tell which: left alone "
                          "(ring.recover(slot) once their holders are known to be dead)",
                          self.local, mine)
        for i in dead:
            log.warning("ring %r: slot %d is held by a consumer that is not this bridge (dead or "
                        "stalled?); producers will stop there", self.local, i)
        self.spill.pending_rec.write(_P_NONE, 0, 0, 0, 0)
        self.window.extend(recs)
        self.outq.extend(recs)
        self.next_seq, self.pos = last_seq + 1, 0
        if recs:
            log.info("ring %r: %d unacknowledged message(s) (seq %d..%d) reloaded from %s",
                     self.local, len(recs), recs[0].seq, recs[-1].seq, self.spill.path)

    def _recover(self) -> None:
        if self.mpmc:
            return self._recover_mpmc()
        acked, acked_pos, recs = self.spill.load()
        tail = int(_ring_entry(self.bridge.region, self.local)["tail"])
        gen = int(self.bridge.region.generation) & _MASK64
        if acked_pos is None:  # a fresh spill file: start at the ring's consumer index
            acked_pos = tail
            self.spill.acked_rec.write(0, tail, 0)
        elif int.from_bytes(self.spill.mm[24:32], "little") != gen:
            # The region was re-formatted: ring positions in the spill file mean nothing now.
            # Its unacknowledged messages are still owed to the remote: keep them, at the
            # ring's present position.
            log.warning("ring %r: the region was re-formatted since %s was written; its %d "
                        "unacknowledged message(s) will still be sent", self.local,
                        self.spill.path, len(recs))
            for r in recs:
                n = len(r.data)
                _REC.pack_into(self.spill.mm, _SPILL_HDR + r.off, r.seq, tail, n,
                               _rec_check(r.seq, tail, n))
                r.pos = tail
            acked_pos = tail
            self.spill.acked_rec.write(acked, tail, self.spill.head)
            self.spill.pending_rec.write(_P_NONE, 0, 0, 0, 0)
        self.spill.mm[24:32] = gen.to_bytes(8, "little")
        self.acked, self.acked_pos = acked, acked_pos
        last_seq, last_pos = acked, acked_pos
        if recs:
            last_seq, last_pos = recs[-1].seq, recs[-1].pos
        p = self.spill.pending_rec.read()
        if p is not None and p[0] != _P_NONE and p[1] == last_seq + 1 and p[2] == last_pos:
            kind, seq, pos, off, n = p
            if tail > pos:  # the consuming call took its message before the bridge died
                if kind == _P_EMPTY:
                    n, off = 0, self.spill.place(0)
                    if off == -1 or off is None:
                        off = self.spill.write(seq, pos + 1, b"", 0)
                    else:
                        self.spill.commit_at(off, seq, pos + 1, 0)
                else:
                    self.spill.commit_at(off, seq, pos + _slots_for(n, self.slot_size), n)
                d = bytes(self.spill.data_view(off, n))
                size = _align8(_REC.size + n)
                recs.append(_Record(seq, pos + _slots_for(n, self.slot_size), d, off, size,
                                    time.monotonic()))
                last_seq, last_pos = seq, recs[-1].pos
                log.info("ring %r: the message the previous bridge was taking (seq %d) is in "
                         "the spill file", self.local, seq)
        self.spill.pending_rec.write(_P_NONE, 0, 0, 0, 0)
        self.window.extend(recs)
        self.outq.extend(recs)
        self.next_seq, self.pos = last_seq + 1, tail
        # Spilled messages whose ring slots were not released yet: take them again, drop them.
        while self.pos < last_pos:
            msg = self.ring.try_recv()
            if msg is None:
                raise BridgeError(f"ring {self.local!r}: the spill file says messages up to ring "
                                  f"position {last_pos} were taken, but the ring holds none at "
                                  f"{self.pos}: was the region re-created? Remove "
                                  f"{self.spill.path} to start afresh")
            self.pos += _slots_for(len(msg), self.slot_size)
            self.m["dropped_on_restart"] += 1
        if self.pos > last_pos:
            lost = self.pos - last_pos
            self.m["lost"] += lost
            log.error("ring %r: %d slot(s) between positions %d and %d were consumed but are not "
                      "in the spill file (another consumer, or a re-created spill file)",
                      self.local, lost, last_pos, self.pos)
        if recs:
            log.info("ring %r: %d unacknowledged message(s) (seq %d..%d) reloaded from %s",
                     self.local, len(recs), recs[0].seq, recs[-1].seq, self.spill.path)

    # -- pump ---------------------------------------------------------------------------------
    def _room(self, n: int) -> bool:
        return (len(self.window) < self.bridge.max_inflight
                and self.spill.place(n) is not None)

    def _append(self, n: int, data: Any) -> None:
        seq = self.next_seq
        pos = self.pos + _slots_for(n, self.slot_size)
        b = bytes(data)
        with self.lock:
            off = self.spill.write(seq, pos, b, n)
            rec = _Record(seq, pos, b, off, _align8(_REC.size + n), time.monotonic())
            self.window.append(rec)
            self.outq.append(rec)
            self.next_seq = seq + 1
            self.pos = pos
        self.m["messages"] += 1
        self.m["bytes"] += n

    def _take_peeked(self, limit: int, half: int) -> int:
        """The fast path: while more than ``half`` the ring is queued, look at each message in
        place, copy it into the spill file with its record, and only then release its slot (no
        wake-up of the producer: the Channel path does that once the ring is half empty).
        Returns how many.  The common case (a record that fits before the end of the spill
        file) is written inline: this loop is the bridge's cost per message."""
        ring, spill, mm = self.ring, self.spill, self.spill.mm
        pack, rs = _REC.pack_into, _REC.size
        data_size = spill.data_size
        took = 0
        with self.lock:
            window, outq = self.window, self.outq  # under the lock: rewind() rebuilds outq
            seq, pos = self.next_seq, self.pos
            # slots above the half mark now (the producer may add more: the next call sees them)
            avail = min(limit, self.bridge.max_inflight - len(window), len(ring) - half)
            now = time.monotonic()
            nbytes = 0
            tail, used = spill.tail, spill.used
            recs = []
            add = recs.append
            most = (rs + self.slot_size + 7) & ~7  # the largest record a one-slot message makes
            try:
                while took < avail:
                    if tail + most > data_size or used + most > data_size:
                        spill.tail, spill.used = tail, used
                        if spill.place(self.slot_size) is None:
                            break  # the window is full (checked before peek: no un-peek)
                    try:
                        v = ring.peek()
                    except MessageTooLargeError:  # spans slots: the Channel path takes it
                        break
                    if v is None:
                        break
                    n = len(v)
                    size = (rs + n + 7) & ~7
                    if tail + size > data_size or used + size > data_size:
                        # the end of the spill file (a wrap marker), or full: the general path
                        spill.tail, spill.used = tail, used
                        try:
                            off = spill.write(seq, pos + 1, v, n)  # room: checked above
                        finally:
                            v.release()
                        tail, used = spill.tail, spill.used
                    else:
                        off = tail
                        d = _SPILL_HDR + off + rs
                        try:
                            mm[d:d + n] = v
                        finally:
                            v.release()
                        pack(mm, _SPILL_HDR + off, seq, pos + 1, n,
                             ((seq * 0x9E3779B1) ^ ((pos + 1) * 0x85EBCA77)
                              ^ (n * 0xC2B2AE3D) ^ 0x5BD1E995) & 0xFFFFFFFF)
                        tail += size
                        if tail == data_size:
                            tail = 0
                        used += size
                    pos += 1
                    ring.release()  # the record is in the spill file: the slot may go
                    add(_Record(seq, pos, None, off, size, now))  # sent from the spill file
                    seq += 1
                    took += 1
                    nbytes += n
            finally:
                spill.tail, spill.used = tail, used
                window.extend(recs)
                outq.extend(recs)
                self.next_seq, self.pos = seq, pos
                self.m["messages"] += took
                self.m["bytes"] += nbytes
        return took

    def _take_into(self, n: int) -> None:
        """Take the next message (of ``n`` bytes) through the Channel, straight into the spill
        file, with an intent recorded first: this wakes a producer asleep on a full ring."""
        with self.lock:
            off = self.spill.place(n)
            if off == -1:  # write the wrap marker now: the record goes to offset 0
                gap = self.spill.data_size - self.spill.tail
                seq = self.next_seq
                if gap >= _REC.size:
                    _REC.pack_into(self.spill.mm, _SPILL_HDR + self.spill.tail, seq, 0, _WRAP,
                                   _rec_check(seq, 0, _WRAP))
                self.spill.used += gap
                self.spill.tail = off = 0
        assert off is not None
        self.spill.pending_rec.write(_P_INTO, self.next_seq, self.pos, off, n)
        view = self.spill.data_view(off, n)
        try:
            got = self.ch.recv_into(view, timeout=0)
        finally:
            view.release()
        if got != n:
            raise BridgeError(f"ring {self.local!r}: the next message changed length under the "
                              f"bridge ({n} then {got} bytes): is there a second consumer?")
        seq = self.next_seq
        pos = self.pos + _slots_for(n, self.slot_size)
        with self.lock:
            self.spill.commit_at(off, seq, pos, n)
            rec = _Record(seq, pos, bytes(self.spill.data_view(off, n)), off,
                          _align8(_REC.size + n), time.monotonic())
            self.window.append(rec)
            self.outq.append(rec)
            self.next_seq, self.pos = seq + 1, pos
        self.spill.pending_rec.write(_P_NONE, 0, 0, 0, 0)
        self.m["messages"] += 1
        self.m["bytes"] += n

    def _probe(self, timeout: float) -> Optional[int]:
        """Wait (on the doorbell) up to ``timeout`` for a message without taking it: its length,
        or None.  A zero-length message is taken by the probe itself (an intent covers that)."""
        self.spill.pending_rec.write(_P_EMPTY, self.next_seq, self.pos, 0, 0)
        try:
            self.ch.recv_into(_EMPTY, timeout=timeout)
        except MessageTooLargeError as e:
            self.spill.pending_rec.write(_P_NONE, 0, 0, 0, 0)
            mt = _LEN_RE.search(str(e))
            if mt is None:
                raise BridgeError(f"ring {self.local!r}: cannot read the next message's length "
                                  f"from {e!r}") from e
            return int(mt.group(1))
        except WaitTimeout:
            self.spill.pending_rec.write(_P_NONE, 0, 0, 0, 0)
            return None
        # an empty message was taken: record it (the intent covers a death before this)
        with self.lock:
            if self.spill.place(0) is None:
                raise AssertionError("no room for an empty record")
        self._append(0, b"")
        self.spill.pending_rec.write(_P_NONE, 0, 0, 0, 0)
        return 0

    def _take_mpmc(self, limit: int) -> int:
        """Take up to ``limit`` messages from an MPMC ring, one consumer among several: an intent
        (the next seq, the consumer index now), then per message peek, append it to the spill
        file with its slot's index, release.  Returns how many."""
        ring, spill = self.ring, self.spill
        slot = self.slot_size
        took = nbytes = 0
        with self.lock:
            window, outq = self.window, self.outq
            seq = self.next_seq
            room = self.bridge.max_inflight - len(window)
            if room <= 0 or spill.place(slot) is None or len(ring) == 0:
                return 0
            spill.pending_rec.write(_P_MPMC, seq, ring.tail, 0, 0)
            now = time.monotonic()
            try:
                while took < limit and took < room and spill.place(slot) is not None:
                    v = ring.peek()
                    if v is None:
                        break
                    try:
                        idx = ring.peeked_slot
                        n = len(v)
                        data = bytes(v)
                    finally:
                        v.release()
                    off = spill.write(seq, idx + 1, data, n)
                    ring.release()  # the record is in the spill file: the slot may go
                    rec = _Record(seq, idx + 1, data, off, (_REC.size + n + 7) & ~7, now)
                    window.append(rec)
                    outq.append(rec)
                    seq += 1
                    took += 1
                    nbytes += n
            finally:
                spill.pending_rec.write(_P_NONE, 0, 0, 0, 0)
                self.next_seq = seq
                self.m["messages"] += took
                self.m["bytes"] += nbytes
        if took and self.bridge.doorbell is not None:
            self.ch.wake("senders")  # a producer asleep on a full ring (peek/release ring nobody)
        return took

    def _pump_mpmc(self) -> None:
        """An MPMC ring's pump: peek, spill, release (above).  It waits for messages by looking
        at the ring with back-off (50 us doubling to 1 ms), not on the doorbell: a Channel's
        waiting receive takes an empty message itself, and on an MPMC ring the restarted bridge
        could not tell whether it had."""
        b = self.bridge
        pause = 50e-6
        while not b._stop.is_set():
            took = self._take_mpmc(b.batch)
            if took:
                pause = 50e-6
                b._poke()
                continue
            with self.lock:
                if not self._room(self.slot_size):
                    self.lock.wait(0.5)  # window full: wait for acknowledgements
                    continue
            b._stop.wait(pause)
            pause = min(pause * 2, 1e-3)

    def pump(self) -> None:
        b = self.bridge
        if self.mpmc:
            try:
                self._pump_mpmc()
            except BaseException as e:  # noqa: BLE001 - reported through the bridge
                if not (isinstance(e, ClosedError) and b._stop.is_set()):
                    b._fail(f"pump of ring {self.local!r}", e)
            return
        half = max(1, self.capacity // 2)
        known: Optional[int] = None  # the next message's length, when a wait just learnt it
        try:
            while not b._stop.is_set():
                took = 0
                need = self.slot_size  # room the next message needs in the window
                # Messages are taken by peek/release (cheap) except one per batch, taken through
                # the Channel once the ring is at most half full: that one rings a producer
                # asleep on a full ring (peek/release do not), early enough that it refills
                # the ring while the bridge drains the rest.
                woke = False
                while took < b.batch and not b._stop.is_set():
                    keep = 0 if woke else half
                    if len(self.ring) > keep:
                        # zero-copy look, spill, then release each slot
                        k = self._take_peeked(b.batch - took, keep)
                        if k:
                            took += k
                            known = None  # that message may have been among them
                            continue
                    with self.lock:
                        room = self._room(self.slot_size)
                    if not room:
                        break
                    if known is not None:
                        n, known = known, None
                    elif len(self.ring) == 0:
                        break
                    else:
                        n = self._probe(0)
                    if n is None:
                        break
                    if n == 0:
                        took += 1
                        woke = True
                        continue
                    with self.lock:
                        if not self._room(n):
                            need, known = n, n
                            break
                    self._take_into(n)
                    took += 1
                    woke = True
                if took:
                    b._poke()
                    continue
                with self.lock:
                    if not self._room(need):
                        # window full: wait for acknowledgements (backpressure on the ring)
                        self.lock.wait(0.5)
                        continue
                n = self._probe(b.idle_wait)  # sleep on the doorbell until a message comes
                if n == 0:
                    b._poke()
                elif n is not None:
                    known = n
        except BaseException as e:  # noqa: BLE001 - reported through the bridge
            if not (isinstance(e, ClosedError) and b._stop.is_set()):
                b._fail(f"pump of ring {self.local!r}", e)

    # -- network side (called by the network thread) --------------------------------------------
    def on_ack(self, seq: int) -> None:
        with self.lock:
            if seq <= self.acked:
                return
            if seq >= self.next_seq:
                log.warning("ring %r: remote acknowledged seq %d, beyond the last taken (%d); "
                            "ignored", self.local, seq, self.next_seq - 1)
                return
            freed = 0
            pos = self.acked_pos
            while self.window and self.window[0].seq <= seq:
                r = self.window.popleft()
                freed += r.size
                pos = r.pos
            while self.outq and self.outq[0].seq <= seq:
                self.outq.popleft()
            # wrap gaps are freed with the record after them: recompute from offsets
            first = self.window[0].off if self.window else None
            if first is None:
                self.spill.used = 0
                self.spill.head = self.spill.tail
            else:
                h = first
                t = self.spill.tail
                self.spill.used = (t - h) if t > h else self.spill.data_size - h + t
                if t == h:
                    self.spill.used = self.spill.data_size
                self.spill.head = h
            self.spill.acked_rec.write(seq, pos, self.spill.head)
            self.m["acked"] += seq - self.acked
            self.acked, self.acked_pos = seq, pos
            self.last_progress = time.monotonic()
            self.lock.notify_all()

    def rewind(self, delivered: int, received: int, why: str) -> None:
        """The receiver has delivered up to ``delivered`` and holds up to ``received``: forget
        the first, send everything after the second again."""
        self.on_ack(delivered)
        with self.lock:
            if delivered < self.acked:
                log.warning("ring %r: the remote's state is behind what it acknowledged "
                            "(%d < %d): its state file was lost; resending from %d",
                            self.local, delivered, self.acked, self.acked + 1)
            seq = max(received, delivered)
            again = [r for r in self.window if r.seq > seq]
            already = len(again) - len(self.outq)
            if already > 0:
                self.m["resends"] += already
                log.info("ring %r: resending %d message(s) from seq %d (%s)", self.local,
                         already, again[0].seq, why)
            # in place: the pump may hold a reference to it
            self.outq.clear()
            self.outq.extend(again)
            self.last_progress = time.monotonic()

    def lag(self) -> Dict[str, Any]:
        with self.lock:
            oldest = self.window[0].t if self.window else None
            return {"unacked": len(self.window), "queued_in_ring": len(self.ring),
                    "oldest_unacked_s": 0.0 if oldest is None else time.monotonic() - oldest,
                    "channel": self.ch.stats}

    def close(self) -> None:
        self.ch.close()

    def release(self) -> None:
        self.ring.close()
        self.spill.close()


class _InStream:
    """A local ring the remote side delivers into: dedup, the delivery thread, the state file."""

    def __init__(self, bridge: "Bridge", name: str):
        self.bridge, self.name = bridge, name
        self.key = name.encode()
        region = bridge.region
        self.ring = _bridged_ring(region, name)
        self.mpmc = self.ring.kind == "mpmc"
        self.resume: Optional[int] = None  # MPMC: a slot the predecessor reserved, for delivered+1
        if not self.mpmc:
            # a producer that died between publishing a batch and announcing it in the ring's
            # head is adopted by the next producer's first look: take that look now, so head is
            # exact (with a handle of its own: the bridge's stays clean)
            probe = _bridged_ring(region, name)
            try:
                if probe.reserve(0) is not None:
                    probe.cancel()
            except IvshmemError:
                pass
            probe.close()
        head = int(_ring_entry(region, name)["head"])
        self.slot_size = self.ring.slot_size
        self.ch = bridge._channel(self.ring)
        path = os.path.join(bridge.state_dir, f"in-{name}.state")
        self.mm, _ = _open_map(path, 4096, b"PYIVBIN1")
        # delivered seq, ring head after it (MPMC: the index of its slot + 1), region
        # generation, sender's stream id
        self.state = _DualRecord(self.mm, 64, 4)
        # MPMC: (kind, seq, index): the batch's intent (the producer index before it) or the slot
        # reserved for seq
        self.pending = _DualRecord(self.mm, 256, 3)
        st = self.state.read()
        gen = int(region.generation)
        if st is not None and st[2] != gen & _MASK64:
            log.warning("ring %r: the region was re-formatted since %s was written; starting "
                        "afresh (duplicates of the last window are possible)", name, path)
            st = None
            self.pending.write(_I_NONE, 0, 0)
        if st is None:
            self.delivered, self.pos, self.skip, self.sid = 0, 0 if self.mpmc else head, 0, 0
            self.state.write(0, self.pos, gen, 0)
        elif self.mpmc:
            self.delivered, self.pos, self.sid, self.skip = st[0], st[1], st[3], 0
            self._recover_mpmc(gen)
        else:
            self.delivered, self.pos, self.sid = st[0], st[1], st[3]
            if head < self.pos:
                raise BridgeError(f"ring {name!r}: its producer index ({head}) is behind the "
                                  f"state file ({self.pos}): another producer, or a stale {path}")
            self.skip = head - self.pos  # slots of messages delivered after the last record
            if self.skip:
                log.info("ring %r: %d slot(s) were delivered after the last recorded seq %d; "
                         "their resends will be dropped", name, self.skip, self.delivered)
        self.gen = gen
        self.received = self.delivered  # highest seq queued for delivery
        self.queue: "collections.deque[Tuple[int, List[bytes]]]" = collections.deque()
        self.queued = 0
        self.busy = False  # a thread is writing a batch into the ring
        self.cv = threading.Condition()
        self.acked_sent = -1
        self.last_nack = (-1, 0.0)
        self.m = {"messages": 0, "bytes": 0, "duplicates": 0, "gaps": 0}
        self.thread: Optional[threading.Thread] = None

    def _recover_mpmc(self, gen: int) -> None:
        """Restart over an MPMC ring, one producer among several.  Per message the bridge
        reserves a slot, writes an intent naming seq and slot, copies, commits; each batch
        starts with an intent naming the producer index before it.  So after a kill: every seq
        before the intent's was delivered; the intent's slot, committed, holds its seq; left
        reserved (or, when the kill came before the intent, the one slot a dead producer holds
        after it), it is finished with the resent message instead of a new reservation."""
        p = self.pending.read()
        if p is None or p[0] == _I_NONE or p[1] < self.delivered + 1:
            return
        kind, seq, idx = p
        self.delivered = seq - 1
        lo = idx
        if kind == _I_IDX:
            if self.ring.claims("producer", idx)[:1] == [idx]:  # still reserved
                self.resume = idx
            else:
                self.delivered, self.pos = seq, idx + 1  # committed before the kill
                lo = idx + 1
        if self.resume is None:
            dead = _dead_claims(self.ring, "producer", lo)
            if len(dead) == 1:
                self.resume = dead[0]
            elif dead:
                log.error("ring %r: slots %s were reserved by producers that died; one may have "
                          "been this bridge's predecessor's, which cannot tell which: left alone "
                          "(ring.recover(slot) once their holders are known to be dead)",
                          self.name, dead)
        if self.resume is not None:
            log.info("ring %r: slot %d, reserved by the previous bridge for seq %d, waits for "
                     "that message's resend", self.name, self.resume, self.delivered + 1)
        self.state.write(self.delivered, self.pos, gen, self.sid)
        self.pending.write(_I_NONE, 0, 0)

    def _put_mpmc(self, first: int, msgs: List[bytes], wait: float) -> int:
        """Deliver ``msgs`` (seq ``first`` on) into an MPMC ring, waiting up to ``wait`` seconds
        for room (looking with back-off: a reservation does not sleep on the doorbell).  Records
        what it delivered; returns how many."""
        ring, pending = self.ring, self.pending
        b = self.bridge
        done = nbytes = 0
        deadline = None
        pause = 50e-6
        pending.write(_I_HINT, first, ring.head)
        try:
            while done < len(msgs) and not b._stop.is_set():
                seq, m = first + done, msgs[done]
                if self.resume is not None and seq == self.delivered + 1:
                    idx, self.resume = self.resume, None
                    if len(m) > self.slot_size:
                        raise MessageTooLargeError(
                            f"a message of {len(m)} bytes for ring {self.name!r}, whose slots "
                            f"hold {self.slot_size}: give the ring larger slots")
                    pending.write(_I_IDX, seq, idx)
                    try:
                        ring.recover(idx, message=m)  # finish the predecessor's reservation
                    except ConfigError as e:
                        # finished by someone else meanwhile (an operator's recover): the
                        # message goes into a slot of its own, under a batch intent again
                        log.warning("ring %r: slot %d, reserved by the previous bridge for seq "
                                    "%d, is no longer reserved (%s); delivering it anew",
                                    self.name, idx, seq, e)
                        pending.write(_I_HINT, seq, ring.head)
                        continue
                else:
                    v = ring.reserve(len(m))
                    if v is None:
                        if deadline is None:
                            deadline = time.monotonic() + wait
                        if time.monotonic() >= deadline:
                            break
                        b._stop.wait(pause)
                        pause = min(pause * 2, 1e-3)
                        continue
                    try:
                        idx = ring.reserved_slot
                        pending.write(_I_IDX, seq, idx)
                        if m:
                            v[:] = m
                    finally:
                        v.release()
                    ring.commit()
                pause = 50e-6
                deadline = None
                self.delivered, self.pos = seq, idx + 1
                done += 1
                nbytes += len(m)
        finally:
            if done:
                with self.cv:
                    self.state.write(self.delivered, self.pos, self.gen, self.sid)
                self.m["messages"] += done
                self.m["bytes"] += nbytes
                if b.doorbell is not None:  # a consumer asleep on the empty ring
                    self.ch.wake("receivers")  # (reserve/commit ring nobody)
                b._poke()
        return done

    def on_data(self, sid: int, first: int, base: int,
                msgs: List[bytes]) -> Optional[Tuple[str, int]]:
        """A batch arrived: queue what is new.  Returns a reply to send ("A"ck or "N"ack, seq).
        ``base`` is the sender's last acknowledged seq: a stream this side has not seen (a new
        sender, or a sender whose spill file was re-created) is taken up after it."""
        with self.cv:
            if sid != self.sid:
                if self.busy:
                    return None  # a batch of the old stream is being written: it resends
                if self.sid:
                    log.warning("ring %r: a new sender stream (its spill file was re-created); "
                                "taking it up after its seq %d", self.name, base)
                self.queue.clear()
                self.queued = 0
                self.sid, self.skip = sid, 0
                # positions from here on count from the ring's producer index as it is now
                self.pos = int(_ring_entry(self.bridge.region, self.name)["head"])
                if self.resume is not None:
                    log.warning("ring %r: slot %d, reserved for the old stream's next message, "
                                "is given up (consumers see an empty message there)", self.name,
                                self.resume)
                    self.ring.recover(self.resume)
                    self.resume = None
                self.received = self.delivered = base
                self.state.write(base, self.pos, self.gen, sid)
            expect = self.received + 1
            last = first + len(msgs) - 1
            if first > expect:
                self.m["gaps"] += 1
                now = time.monotonic()
                if self.last_nack[0] != expect or now - self.last_nack[1] > 0.5:
                    self.last_nack = (expect, now)
                    return ("N", self.received)
                return None
            if last < expect:
                self.m["duplicates"] += len(msgs)
                return ("A", self.delivered)
            if first < expect:
                self.m["duplicates"] += expect - first
                msgs = msgs[expect - first:]
                first = expect
            if self.queued >= self.bridge.max_inflight * 2:
                return None  # should not happen: the sender's window bounds this; it resends
            self.received = last
            direct = not self.queue and not self.busy and self.skip == 0
            if not direct:
                self.queue.append((first, msgs))
                self.queued += len(msgs)
                self.cv.notify()
                return None
            self.busy = True
        # Nothing queued before these: deliver what fits now, from this thread (one thread
        # hand-off less per message when the ring has room); the delivery thread, which may
        # sleep on a full ring, takes the rest.
        n = 0
        try:
            if self.mpmc:
                n = self._put_mpmc(first, msgs, 0.0)
                return None
            n = self.ch.try_send(msgs[0]) if len(msgs) == 1 else self.ch.send_many(msgs, timeout=0)
            n = int(n)
            if n:
                slots, nbytes = self._slots_bytes(msgs if n == len(msgs) else msgs[:n])
                self._record(first + n - 1, slots)
                self.m["messages"] += n
                self.m["bytes"] += nbytes
        finally:
            with self.cv:
                self.busy = False
                if n < len(msgs):
                    self.queue.append((first + n, msgs[n:]))
                    self.queued += len(msgs) - n
                self.cv.notify()
        return None

    def deliver(self) -> None:
        b = self.bridge
        try:
            while not b._stop.is_set():
                with self.cv:
                    while not self.queue and not b._stop.is_set():
                        self.cv.wait(0.5)
                    if b._stop.is_set():
                        return
                    first, msgs = self.queue.popleft()
                    self.busy = True
                i = 0
                # resends of messages that reached the ring after the last record: drop them
                while self.skip > 0 and i < len(msgs):
                    self.skip -= _slots_for(len(msgs[i]), self.slot_size)
                    i += 1
                if i:
                    if self.skip < 0:
                        log.error("ring %r: resent messages do not match the slots delivered "
                                  "before the restart (%d)", self.name, self.skip)
                        self.skip = 0
                    self._record(first + i - 1, sum(_slots_for(len(x), self.slot_size)
                                                    for x in msgs[:i]))
                while self.mpmc and i < len(msgs) and not b._stop.is_set():
                    i += self._put_mpmc(first + i, msgs[i:] if i else msgs, b.idle_wait)
                while i < len(msgs) and not b._stop.is_set():
                    chunk = msgs[i:i + b.batch] if i or len(msgs) > b.batch else msgs
                    try:
                        n = self.ch.send_many(chunk, timeout=b.idle_wait)
                    except WaitTimeout:
                        n = 0
                    if n:
                        slots, nbytes = self._slots_bytes(chunk if n == len(chunk)
                                                          else chunk[:n])
                        self._record(first + i + n - 1, slots)
                        self.m["messages"] += n
                        self.m["bytes"] += nbytes
                        i += n
                with self.cv:
                    self.queued -= len(msgs)
                    self.busy = False
        except BaseException as e:  # noqa: BLE001 - reported through the bridge
            if not (isinstance(e, ClosedError) and b._stop.is_set()):
                b._fail(f"delivery into ring {self.name!r}", e)

    def _slots_for_all(self, msgs: List[bytes]) -> int:
        return sum(_slots_for(len(x), self.slot_size) for x in msgs)

    def _slots_bytes(self, msgs: List[bytes]) -> Tuple[int, int]:
        """The ring slots and the bytes ``msgs`` take (one slot each, unless one is longer)."""
        lens = list(map(len, msgs))
        if max(lens) <= self.slot_size:
            return len(lens), sum(lens)
        return self._slots_for_all(msgs), sum(lens)

    def _record(self, seq: int, slots: int) -> None:
        with self.cv:  # on_data writes the state too, when a new sender stream begins
            self.pos += slots
            self.state.write(seq, self.pos, self.gen, self.sid)
            self.delivered = seq
        self.bridge._poke()

    def lag(self) -> Dict[str, Any]:
        return {"queued": self.queued, "delivered_seq": self.delivered, "channel": self.ch.stats}

    def close(self) -> None:
        self.ch.close()
        with self.cv:
            self.cv.notify_all()

    def release(self) -> None:
        self.ring.close()
        try:
            self.mm.close()
        except (BufferError, ValueError):
            pass


# ---------------------------------------------------------------------------------------------
# the bridge
# ---------------------------------------------------------------------------------------------

def _u64(b: bytes) -> int:
    if len(b) != 8:
        raise ValueError("not a u64")
    return int.from_bytes(b, "little")


def _b64(v: int) -> bytes:
    return v.to_bytes(8, "little")


_MAX_PARTS = 1 << 16
_MAX_RUN = 256 * 1024  # bytes of records per data message (or one record, when larger)


def _records(buf: bytes, first: int) -> List[bytes]:
    """The messages of a run of spill records from the network (``seq, pos, len, check``, the
    message, padding to 8 bytes; seqs ``first``, ``first + 1``, ...), every field checked."""
    out = []
    off, end = 0, len(buf)
    unpack, rs = _REC.unpack_from, _REC.size
    seq = first
    while off < end:
        if end - off < rs:
            raise ValueError("a record header cut short")
        q, _pos, n, _check = unpack(buf, off)
        if q != seq:
            raise ValueError(f"record seq {q} where {seq} was due")
        d = off + rs
        if n > end - d:
            raise ValueError(f"a record of {n} bytes in {end - d}")
        out.append(buf[d:d + n])
        off = d + ((n + 7) & ~7)
        seq += 1
        if len(out) > _MAX_PARTS:
            raise ValueError("too many records")
    if off != end or not out:
        raise ValueError("records do not fill the run")
    return out


def _pack(parts: List[bytes]) -> bytes:
    """One ZeroMQ frame holding a list of parts: u32 count, u32 length of each, the parts.
    (Not ZeroMQ multipart messages: libzmq 4.3 aborts, `!_more (fq.cpp)`, when a connection
    drops while a multipart message is half read, which a killed peer makes happen.)"""
    n = len(parts)
    return b"".join([struct.pack(f"<I{n}I", n, *map(len, parts))] + parts)


def _unpack(buf: bytes) -> List[bytes]:
    """The parts of a frame from the network, every length checked against the frame."""
    if len(buf) < 4:
        raise ValueError("frame shorter than its part count")
    (n,) = struct.unpack_from("<I", buf)
    if n == 0 or n > _MAX_PARTS or 4 + 4 * n > len(buf):
        raise ValueError(f"frame claims {n} parts in {len(buf)} bytes")
    lens = struct.unpack_from(f"<{n}I", buf, 4)
    off = 4 + 4 * n
    if off + sum(lens) != len(buf):
        raise ValueError("part lengths do not add up to the frame's size")
    mv = memoryview(buf)
    out = []
    for k in lens:
        out.append(bytes(mv[off:off + k]))
        off += k
    return out


class Bridge:
    """Forward local rings to a remote bridge and deliver the remote's messages into local rings.

    ``region`` is a :class:`pyivshmem.Region` (a host file, or a server's memory through a
    :class:`pyivshmem.Peer`, whose doorbells then wake the bridge: pass it as ``doorbell``).
    Exactly one of ``listen`` / ``connect`` is a ZeroMQ TCP endpoint (``tcp://0.0.0.0:7000`` /
    ``tcp://host:7000``).  ``out`` maps local ring names to remote ring names; ``in_rings`` names
    the local rings the remote may deliver into.  ``state_dir`` holds the spill and state files
    that make delivery exactly once across restarts; keep it across restarts of this bridge.

    ``doorbell``/``vector``: the doorbell provider the bridge's Channels sleep on, each ring on a
    vector of its own from ``vector`` up while the provider has them.  ``spill_size`` (bytes) and
    ``max_inflight`` (messages) bound each out ring's window of unacknowledged messages;
    ``batch`` is the most messages per network message; ``idle_wait`` how long one idle wait
    lasts before it looks again; ``resend_after`` how long without an acknowledgement before the
    bridge asks the remote where it stands; ``connect_timeout`` when an unanswered remote is
    logged as unreachable; ``spin`` the Channels' spin budget (None: their default).

    ``start()`` runs the threads; ``close()`` stops them; ``wait_connected(timeout)`` waits for
    the remote (RemoteUnreachable); ``check()`` raises what stopped a thread; ``metrics()``
    returns the counters.  A context manager: ``with Bridge(...) as b`` starts and closes it.
    """

    def __init__(self, region: Any, *, listen: Optional[str] = None, connect: Optional[str] = None,
                 out: Optional[Dict[str, str]] = None, in_rings: Iterable[str] = (),
                 state_dir: str, name: Optional[str] = None, doorbell: Any = None,
                 vector: int = 0, spill_size: int = 8 << 20, batch: int = 256,
                 max_inflight: int = 65536, idle_wait: float = 0.25,
                 resend_after: float = 1.0, connect_timeout: float = 5.0,
                 spin: Optional[float] = None):
        require_transport()
        if (listen is None) == (connect is None):
            raise ConfigError("a bridge either listens (listen='tcp://0.0.0.0:PORT') or connects "
                              "(connect='tcp://HOST:PORT'), exactly one of the two")
        endpoint = listen or connect
        if not isinstance(endpoint, str) or not re.match(r"^(tcp|ipc)://.+", endpoint):
            raise ConfigError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT")
        out = dict(out or {})
        in_rings = list(in_rings)
        if not out and not in_rings:
            raise ConfigError("nothing to bridge: give at least one out ring or one in ring")
        if len(set(out.values())) != len(out):
            raise ConfigError("two local rings forward to one remote ring: one producer per ring")
        twice = sorted({r for r in in_rings if in_rings.count(r) > 1})
        if twice:
            raise ConfigError(f"in ring {twice[0]!r} named twice: the bridge is a ring's one "
                              "producer; name each in ring once")
        both = sorted(set(out) & set(in_rings))
        if both:
            raise ConfigError(
                f"ring {both[0]!r} is both an out ring and an in ring: the bridge would consume "
                "it beside its local consumer and send its own deliveries back; bridge two rings, "
                "one each way (docs/bridge.md)")
        if not 1 <= batch <= 4096:
            raise ConfigError(f"batch must be 1..4096, not {batch}")
        for v, what in ((idle_wait, "idle_wait"), (resend_after, "resend_after"),
                        (connect_timeout, "connect_timeout")):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ConfigError(f"{what} must be a number of seconds > 0, not {v!r}")
        self.region = region
        self.doorbell, self.vector, self.spin = doorbell, vector, spin
        self._vectors_used = 0
        self.listen, self.connect = listen, connect
        self.endpoint = endpoint
        self.name = name or f"bridge-{os.getpid()}"
        self.state_dir = os.fspath(state_dir)
        self.spill_size, self.batch, self.max_inflight = int(spill_size), batch, max_inflight
        self.idle_wait, self.resend_after = float(idle_wait), float(resend_after)
        self.connect_timeout = float(connect_timeout)
        os.makedirs(self.state_dir, exist_ok=True)
        self._stop = threading.Event()
        self._welcomed = threading.Event()
        self._error: Optional[BaseException] = None
        self._closed = False
        self._threads: List[threading.Thread] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # True while the network thread is (about to be) asleep in its poll: only then does
        # _poke() write the pipe (a system call and a wake-up less per batch when it is awake)
        self._net_idle = True
        self.outs: Dict[bytes, _OutStream] = {}
        self.ins: Dict[bytes, _InStream] = {}
        self._ctx = None
        self._sock = None
        try:
            for local, remote in out.items():
                s = _OutStream(self, local, remote)
                self.outs[s.key] = s
            for r in in_rings:
                s2 = _InStream(self, r)
                self.ins[s2.key] = s2
            self._ctx = zmq.Context()
            self._sock = self._make_socket()
        except BaseException:
            self._release()
            raise
        self.m = {"frames_in": 0, "frames_out": 0, "hellos": 0, "reconnects": 0,
                  "connections": 0, "disconnects": 0, "bad_frames": 0}
        self._peer: Optional[bytes] = None  # ROUTER side: the connected bridge's identity
        self._remote_name = b""
        self._last_hello = 0.0
        self._hello_since: Optional[float] = None
        self._unreachable_logged = False
        self._unknown_logged: set = set()
        self._last_rx = time.monotonic()

    def _channel(self, ring: Any) -> Any:
        """A Channel over ``ring`` on a vector of its own (vector, vector + 1, ...) where the
        doorbell has one: sleepers of one process that share a vector share an eventfd, and a
        wake-up taken by the wrong one costs the other a re-check interval."""
        from ._ring import Channel

        v = self.vector + self._vectors_used
        self._vectors_used += 1
        if self.doorbell is not None and v != self.vector:
            try:
                ok = self.doorbell.vector_fd(v) is not None
            except (IvshmemError, LookupError, ValueError):
                ok = False
            if not ok:
                log.warning("the doorbell has no vector %d: ring %r shares vector %d with "
                            "another ring of this bridge (wake-ups may wait for a re-check); "
                            "give the server more vectors", v, ring.name, self.vector)
                v = self.vector
        return Channel(ring, self.doorbell, vector=v, spin=self.spin)

    def _make_socket(self) -> Any:
        if self.listen:
            s = self._ctx.socket(zmq.ROUTER)
            s.setsockopt(zmq.ROUTER_MANDATORY, 1)
            s.setsockopt(zmq.ROUTER_HANDOVER, 1)
        else:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.IMMEDIATE, 1)
            s.setsockopt(zmq.ROUTING_ID, f"{self.name}-{secrets.token_hex(4)}".encode())
            s.setsockopt(zmq.RECONNECT_IVL, 100)
            s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 64)
        s.setsockopt(zmq.RCVHWM, 64)
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        try:
            if self.listen:
                s.bind(self.listen)
            else:
                s.connect(self.connect)
        except zmq.ZMQError as e:
            s.close(0)
            raise BridgeError(f"cannot {'listen on' if self.listen else 'connect to'} "
                              f"{self.endpoint}: {e}") from None
        return s

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "Bridge":
        if self._threads:
            return self
        for s in self.outs.values():
            t = threading.Thread(target=s.pump, name=f"bridge-out-{s.local}", daemon=True)
            s.thread = t
            self._threads.append(t)
        for s2 in self.ins.values():
            t = threading.Thread(target=s2.deliver, name=f"bridge-in-{s2.name}", daemon=True)
            s2.thread = t
            self._threads.append(t)
        t = threading.Thread(target=self._net, name="bridge-net", daemon=True)
        self._threads.append(t)
        for t in self._threads:
            t.start()
        log.info("bridge %s %s %s: out %s, in %s", self.name,
                 "listening on" if self.listen else "connecting to", self.endpoint,
                 {s.local: s.remote for s in self.outs.values()} or "-",
                 [s.name for s in self.ins.values()] or "-")
        return self

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until the remote bridge has answered; RemoteUnreachable if it did not."""
        if not self._welcomed.wait(timeout):
            self.check()
            raise RemoteUnreachable(
                f"no answer from the remote bridge at {self.endpoint} within {timeout} s: is "
                "`pyivshmem bridge` running there, with the other of --listen/--connect, and is "
                "the port reachable (firewall)?")

    @property
    def connected(self) -> bool:
        return self._welcomed.is_set()

    def check(self) -> None:
        """Raise the error that stopped a bridge thread, if any."""
        if self._error is not None:
            raise BridgeError(f"bridge {self.name} stopped: {self._error}") from self._error

    def _fail(self, what: str, e: BaseException) -> None:
        log.error("%s failed: %r", what, e)
        if self._error is None:
            self._error = e
        self._stop.set()
        self._poke()

    def run_forever(self, stats_interval: float = 0.0) -> None:
        """Run until close() (from a signal handler) or a fatal error; logs metrics every
        ``stats_interval`` seconds (0: never).  ConfigError for a negative or NaN interval."""
        _check_stats_interval(stats_interval)
        self.start()
        last = time.monotonic()
        while not self._stop.wait(0.2):
            if stats_interval and time.monotonic() - last >= stats_interval:
                last = time.monotonic()
                log.info("metrics %s", self.metrics())
        self.check()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._poke()
        for s in self.outs.values():
            s.close()
        for s2 in self.ins.values():
            s2.close()
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:
                t.join(10)
        self._release()

    def _release(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        for s in self.outs.values():
            s.close()
            s.release()
        for s2 in self.ins.values():
            s2.close()
            s2.release()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> "Bridge":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def metrics(self) -> Dict[str, Any]:
        """Counters: per out ring messages/bytes taken, sent, resends, acked, lag; per in ring
        messages/bytes delivered, duplicates dropped, gaps; the connection's frames."""
        return {
            "connected": self.connected,
            "link": dict(self.m),
            "out": {s.local: dict(s.m, **s.lag()) for s in self.outs.values()},
            "in": {s.name: dict(s.m, **s.lag()) for s in self.ins.values()},
        }

    # -- network thread -------------------------------------------------------------------------
    def _poke(self) -> None:
        """Tell the network thread there is something to send.  It sets _net_idle, then looks
        for work, then polls; a caller adds its work, then reads _net_idle: either the look sees
        the work or the caller sees the flag (the GIL orders the two)."""
        if not self._net_idle:
            return
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _work_waiting(self) -> bool:
        """Something the network thread would send now (data or an acknowledgement)."""
        if self._stop.is_set():
            return True
        for s in self.ins.values():
            if s.delivered != s.acked_sent:
                return not (self.listen and self._peer is None)
        if not self._welcomed.is_set():
            return False
        for o in self.outs.values():
            if o.outq:
                return True
        return False

    def _send(self, frames: List[bytes]) -> bool:
        """Send one multipart message to the remote; False when it cannot be sent now."""
        try:
            if self.listen:
                if self._peer is None:
                    return False
                self._sock.send_multipart([self._peer, _pack(frames)], zmq.NOBLOCK, copy=True)
            else:
                self._sock.send(_pack(frames), zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:  # the ROUTER's peer went away
                log.info("remote bridge disconnected; waiting for it to connect again")
                self._peer = None
                self._welcomed.clear()
                return False
            raise
        self.m["frames_out"] += 1
        return True

    def _hello(self) -> None:
        self._last_hello = time.monotonic()
        if self._hello_since is None:
            self._hello_since = self._last_hello
        if self._send([b"H", self.name.encode()]):
            self.m["hellos"] += 1

    def _welcome(self) -> bool:
        frames = [b"W", self.name.encode()]
        for s in self.ins.values():
            frames += [s.key, _b64(s.sid), _b64(s.delivered), _b64(s.received)]
        return self._send(frames)

    def _handle(self, raw: List[bytes]) -> None:
        if self.listen:
            if len(raw) != 2:
                self.m["bad_frames"] += 1
                return
            ident, body = raw
        else:
            if len(raw) != 1:
                self.m["bad_frames"] += 1
                return
            body = raw[0]
        try:
            frames = _unpack(body)
        except ValueError as e:
            self.m["bad_frames"] += 1
            log.warning("dropped a malformed message from the remote: %s", e)
            return
        if self.listen:
            if ident != self._peer:
                if self._peer is not None:
                    log.info("remote bridge reconnected (new connection)")
                    self.m["reconnects"] += 1
                self._peer = ident
                self._welcomed.clear()
                self._hello_since = None
        if not frames:
            self.m["bad_frames"] += 1
            return
        kind = frames[0]
        try:
            if kind == b"D":
                if len(frames) < 5:
                    raise ValueError("short data message")
                s = self.ins.get(frames[1])
                if s is None:
                    self._unknown(frames[1])
                    return
                if len(frames) != 6:
                    raise ValueError("a data message carries one run of records")
                first = _u64(frames[3])
                reply = s.on_data(_u64(frames[2]), first, _u64(frames[4]),
                                  _records(frames[5], first))
                if reply is not None:
                    if reply[0] == "A":
                        self._send([b"A", s.key, _b64(s.sid), _b64(reply[1])])
                    else:
                        self._send([b"N", s.key, _b64(s.sid), _b64(s.delivered), _b64(reply[1])])
            elif kind in (b"A", b"N"):
                if len(frames) != (4 if kind == b"A" else 5):
                    raise ValueError("bad ack")
                o = self.outs.get(frames[1])
                if o is None:
                    return
                if _u64(frames[2]) != o.sid:
                    if kind == b"N":
                        o.rewind(o.acked, o.acked, "the remote has not seen this stream yet")
                elif kind == b"A":
                    o.on_ack(_u64(frames[3]))
                else:
                    o.rewind(_u64(frames[3]), _u64(frames[4]), "the remote saw a gap")
            elif kind == b"H":
                if len(frames) != 2:
                    raise ValueError("bad hello")
                self._remote_name = frames[1]
                self._welcome()
                if self.listen and not self._welcomed.is_set():
                    self._hello()  # learn the remote's delivery state for our out rings
            elif kind == b"W":
                if len(frames) < 2 or len(frames) % 4 != 2:
                    raise ValueError("bad welcome")
                state = {frames[i]: (_u64(frames[i + 1]), _u64(frames[i + 2]), _u64(frames[i + 3]))
                         for i in range(2, len(frames), 4)}
                for key, o in self.outs.items():
                    if key not in state:
                        log.error("the remote bridge has no in ring %r (ring %r forwards there): "
                                  "start it with --in %s", o.remote, o.local, o.remote)
                        continue
                    sid, delivered, received = state[key]
                    if sid == o.sid:
                        o.rewind(delivered, received, "after (re)connecting")
                    else:
                        o.rewind(o.acked, o.acked, "the remote has not seen this stream yet")
                if not self._welcomed.is_set():
                    log.info("connected to remote bridge %s at %s",
                             frames[1].decode("utf-8", "replace"), self.endpoint)
                    if self._unreachable_logged:
                        log.warning("remote bridge at %s reachable again", self.endpoint)
                self._welcomed.set()
                self._hello_since = None
                self._unreachable_logged = False
            else:
                raise ValueError(f"unknown kind {kind[:8]!r}")
        except ValueError as e:
            self.m["bad_frames"] += 1
            log.warning("dropped a malformed message from the remote: %s", e)

    def _unknown(self, key: bytes) -> None:
        if key not in self._unknown_logged:
            self._unknown_logged.add(key)
            log.error("the remote forwards ring %r, which this bridge does not deliver: start "
                      "it with --in %s", key, key.decode("utf-8", "replace"))

    def _flush(self) -> bool:
        """Send acks and data; True when the socket refused something (wait for POLLOUT)."""
        if self.listen and self._peer is None:
            return False  # nobody to send to until the remote connects
        for s in self.ins.values():
            d = s.delivered
            if d != s.acked_sent:
                if not self._send([b"A", s.key, _b64(s.sid), _b64(d)]):
                    return True
                s.acked_sent = d
        if not self._welcomed.is_set():
            return False
        blocked = False
        for o in self.outs.values():
            while True:
                with o.lock:
                    q = o.outq
                    if not q:
                        break
                    head = q[0]
                    first = head.seq
                    frames = [b"D", o.key, _b64(o.sid), _b64(first), _b64(o.acked)]
                    # the records of a run of consecutive messages lie back to back in the spill
                    # file (until it wraps): they travel as they are, one slice per batch
                    k = min(len(q), self.batch)
                    last = q[k - 1]
                    end = last.off + last.size
                    if not (last.seq == first + k - 1 and last.off >= head.off
                            and end - head.off <= _MAX_RUN):
                        k, end = 1, head.off + head.size
                        while k < len(q) and k < self.batch:
                            r = q[k]
                            if r.seq != first + k:  # the receiver numbers by position
                                raise BridgeError(f"ring {o.local!r}: the send queue skips from "
                                                  f"seq {first + k - 1} to {r.seq}")
                            if r.off != end or end + r.size - head.off > _MAX_RUN:
                                break
                            end += r.size
                            k += 1
                    run = o.spill.mm[_SPILL_HDR + head.off:_SPILL_HDR + end]
                frames.append(run)
                if not self._send(frames):
                    blocked = True
                    break
                with o.lock:
                    # acks or a rewind may have changed the queue meanwhile: drop what was sent
                    n = k
                    while n and o.outq and o.outq[0].seq < first + k:
                        o.outq.popleft()
                        n -= 1
                o.m["sent"] += k
        return blocked

    def _timers(self) -> None:
        now = time.monotonic()
        if not self._welcomed.is_set():
            if ((self.connect or self._peer is not None)
                    and now - self._last_hello >= min(0.5, self.resend_after)):
                self._hello()
            if (self._hello_since is not None and not self._unreachable_logged
                    and now - self._hello_since >= self.connect_timeout):
                self._unreachable_logged = True
                log.error("no answer from the remote bridge at %s for %.0f s: is it running, "
                          "and is the port reachable? (still trying)", self.endpoint,
                          now - self._hello_since)
            return
        if self.connect and now - self._last_rx >= self.resend_after \
                and now - self._last_hello >= self.resend_after:
            self._hello()  # keepalive: a restarted listener learns who we are from it
            self._hello_since = None
        for o in self.outs.values():
            if o.window and now - o.last_progress >= self.resend_after:
                # no acknowledgement for a while: ask where the remote stands (a lost connection
                # or a restarted remote); its welcome rewinds us
                o.last_progress = now
                log.info("ring %r: no acknowledgement for %.1f s (%d unacknowledged); asking "
                         "the remote", o.local, self.resend_after, len(o.window))
                self._hello()
                self._hello_since = None

    def _on_event(self, event: int) -> None:
        """A connection event of the socket (its monitor)."""
        if event == zmq.EVENT_CONNECTED:
            self.m["connections"] += 1
            self._hello()  # where does the remote stand? its welcome starts (re)sending
        elif event == zmq.EVENT_ACCEPTED:
            self.m["connections"] += 1
            log.info("a remote bridge connected to %s", self.endpoint)
        elif event == zmq.EVENT_DISCONNECTED:
            self.m["disconnects"] += 1
            if self.connect:
                if self._welcomed.is_set():
                    log.warning("lost the connection to the remote bridge at %s; reconnecting "
                                "(unacknowledged messages are kept and resent)", self.endpoint)
                self._welcomed.clear()
                if self._hello_since is None:
                    self._hello_since = time.monotonic()
            else:
                log.info("a remote bridge disconnected from %s", self.endpoint)

    def _net(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        from zmq.utils.monitor import recv_monitor_message

        mon = self._sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        poller.register(mon, zmq.POLLIN)
        want_out = False
        try:
            if self.connect:
                self._hello()
            while not self._stop.is_set():
                if want_out:
                    poller.modify(self._sock, zmq.POLLIN | zmq.POLLOUT)
                else:
                    poller.modify(self._sock, zmq.POLLIN)
                self._net_idle = True
                # want_out: the socket refused; POLLOUT wakes us, no need to look for work
                busy = not want_out and self._work_waiting()
                events = dict(poller.poll(0 if busy else 100))
                self._net_idle = False
                if self._wake_r in events:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                if mon in events:
                    while True:
                        try:
                            ev = recv_monitor_message(mon, zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_event(int(ev["event"]))
                for _ in range(64):
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self.m["frames_in"] += 1
                    self._last_rx = time.monotonic()
                    self._handle(frames)
                self._timers()
                want_out = self._flush()
        except BaseException as e:  # noqa: BLE001
            if not self._stop.is_set():
                self._fail("network thread", e)
        finally:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            mon.close(0)  # before the context terminates (close() joins this thread first)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def _check_stats_interval(v: object, what: str = "stats_interval") -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise ConfigError(f"{what} must be a number of seconds >= 0 (0: never log metrics), "
                          f"not {v!r}")


def _parse_out(spec: str) -> Tuple[str, str]:
    local, _, remote = spec.partition("=")
    if not local or (_ and not remote):
        raise ConfigError(f"--out {spec!r}: expected LOCAL or LOCAL=REMOTE (ring names)")
    return local, remote or local


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import signal
    import sys

    p = argparse.ArgumentParser(
        prog="pyivshmem bridge",
        description="Forward rings to a bridge on another host, and deliver its rings here, "
                    "exactly once and in order (ZeroMQ over TCP). See docs/bridge.md.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--region", help="a region file (/dev/shm/NAME, a hugetlbfs file)")
    src.add_argument("--server", metavar="SOCKET",
                     help="join this ivshmem server as a peer: its memory, and doorbells to sleep on")
    p.add_argument("--vector", type=int, default=0,
                   help="with --server: the first vector to sleep on; each bridged ring gets its "
                        "own (VECTOR, VECTOR+1, ...) while the server has that many")
    end = p.add_mutually_exclusive_group(required=True)
    end.add_argument("--listen", metavar="ENDPOINT", help="e.g. tcp://0.0.0.0:7000")
    end.add_argument("--connect", metavar="ENDPOINT", help="e.g. tcp://hostb:7000")
    p.add_argument("--out", action="append", default=[], metavar="LOCAL[=REMOTE]",
                   help="forward local ring LOCAL to the remote's ring REMOTE (default: same name)")
    p.add_argument("--in", dest="in_rings", action="append", default=[], metavar="RING",
                   help="accept messages for local ring RING")
    p.add_argument("--state-dir", required=True,
                   help="spill and state files (keep across restarts for exactly-once delivery)")
    p.add_argument("--name", help="this bridge's name in logs")
    p.add_argument("--spill-size", default="8M", help="per out ring: the unacknowledged window")
    p.add_argument("--batch", type=int, default=256, help="messages per network message")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="report the remote unreachable after this many seconds")
    p.add_argument("--stats-interval", type=float, default=10.0,
                   help="log metrics every N seconds (0: never)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    args = p.parse_args(argv)
    if zmq is None:
        print(f"pyivshmem bridge: ZeroMQ (the pyzmq package) is not installed: {INSTALL_HINT}",
              file=sys.stderr)
        return 2
    # The process is the bridge's: hand the GIL between its threads (pump, network, delivery)
    # every 0.5 ms instead of 5 ms, so a thread woken by a doorbell or a socket runs sooner.
    sys.setswitchinterval(0.0005)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ._ring import Region, parse_size

    peer = None
    region = None
    try:
        _check_stats_interval(args.stats_interval, "--stats-interval")  # before joining or opening anything
        if args.server:
            from .peer import Peer

            peer = Peer.connect(args.server)
            region = peer.region
        else:
            region = Region.open(args.region)
        out: Dict[str, str] = {}
        for spec in args.out:
            local, remote = _parse_out(spec)
            if local in out:  # a dict would keep the last silently
                raise ConfigError(f"--out: local ring {local!r} named twice; forward each ring "
                                  "once")
            out[local] = remote
        bridge = Bridge(region, listen=args.listen, connect=args.connect, out=out,
                        in_rings=args.in_rings, state_dir=args.state_dir, name=args.name,
                        doorbell=peer, vector=args.vector, spill_size=parse_size(args.spill_size),
                        batch=args.batch, connect_timeout=args.connect_timeout)
    except (IvshmemError, OSError) as e:
        print(f"pyivshmem bridge: {e}", file=sys.stderr)
        if peer is not None:
            peer.close()
        elif region is not None:
            region.close()
        return 2

    def stop(signum: int, frame: Any) -> None:
        bridge._stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    rc = 0
    try:
        bridge.run_forever(args.stats_interval)
    except BridgeError as e:
        print(f"pyivshmem bridge: {e}", file=sys.stderr)
        rc = 1
    finally:
        log.info("final metrics %s", bridge.metrics())
        bridge.close()
        if peer is not None:
            peer.close()
        elif region is not None:
            region.close()
    return rc
