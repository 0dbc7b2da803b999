"""Stateful model test of the ring API: copying and zero-copy calls mixed, on both ring kinds,
against a model queue.  Nothing may be lost, duplicated, reordered or corrupted; views of a
committed or released message, and every slice of them, must refuse access; a handle with an open
reservation or peek must refuse other sends or receives; len() must match the model.

The ring has a producer handle and a consumer handle (MPMC: also a second producer and a second
consumer), so that a reservation or a peek held on one handle meets traffic on the others.
Messages are unique (a counter in front), so a duplicate or a reordering shows as a mismatch.
"""
from __future__ import annotations

import collections
import os
import uuid

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pyivshmem import ClosedError, ConfigError, MessageTooLargeError, Region

SLOT = 12
CAP = 8
RESERVED = object()  # MPMC: a claimed, uncommitted slot in the queue


class RingMachine(RuleBasedStateMachine):
    kind = "spsc"

    def __init__(self):
        super().__init__()
        self.path = f"/dev/shm/pyivshmem-model-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.region = Region.create(self.path, "256K")
        self.tx = self.region.create_ring("m", self.kind, slot_size=SLOT, capacity=CAP)
        self.rx = self.region.ring("m")
        self.tx2 = self.region.ring("m") if self.kind == "mpmc" else None
        self.rx2 = self.region.ring("m") if self.kind == "mpmc" else None
        self.queue = collections.deque()  # messages published (MPMC: and RESERVED placeholders)
        self.counter = 0
        self.wview = None  # the open reservation on tx: (view, slice, size)
        self.rview = None  # the peek held on rx: (view, slice, message)
        self.dead = []  # views and slices of committed/released messages
        self.head = 0  # MPMC: indices claimed by producers so far
        self.peek_idx = None  # MPMC: index of the peeked message, not handed back yet

    def teardown(self):
        self.region.close()
        os.unlink(self.path)

    # -- the model ---------------------------------------------------------------------------
    def message(self, n):
        """A unique message of n bytes (n >= 2 carries the counter)."""
        self.counter += 1
        tag = self.counter.to_bytes(4, "little")
        return (tag * ((n + 3) // 4))[:n]

    def slots(self, msg):
        return 1 if self.kind == "mpmc" else max(1, -(-len(msg) // SLOT))

    def used(self):
        if self.kind == "mpmc":
            # producers may run a lap ahead of the oldest slot not handed back: a held peek
            # keeps every slot after it occupied for them, released or not
            oldest = self.head - len(self.queue) if self.peek_idx is None else self.peek_idx
            return self.head - oldest
        return sum(self.slots(m) for m in self.queue)

    def fits(self, msg):
        return self.used() + self.slots(msg) <= CAP

    def push(self, msg):
        self.queue.append(msg)
        self.head += 1

    def max_len(self):
        return SLOT if self.kind == "mpmc" else SLOT * CAP

    def deliverable(self):
        """Messages a consumer can take now, in order (MPMC stops at a reserved slot)."""
        out = []
        for m in self.queue:
            if m is RESERVED:
                break
            out.append(m)
        if self.kind == "spsc" and self.rview is not None:
            out = out[1:]  # rx holds the head; only rx consumes on SPSC anyway
        return out

    def take(self, n):
        """Remove the first n deliverable messages from the model."""
        got = []
        for _ in range(n):
            got.append(self.queue.popleft())
        return got

    # -- sending -----------------------------------------------------------------------------
    def producers(self):
        return [self.tx] if self.kind == "spsc" else [self.tx, self.tx2]

    @rule(n=st.integers(0, SLOT * CAP + 2), which=st.integers(0, 1))
    def try_send(self, n, which):
        ring = self.producers()[which % len(self.producers())]
        msg = self.message(n)
        if ring is self.tx and self.wview is not None:
            with pytest.raises(ConfigError, match="reservation"):
                ring.try_send(msg)
            return
        if n > self.max_len():
            with pytest.raises(MessageTooLargeError):
                ring.try_send(msg)
            return
        ok = ring.try_send(msg)
        assert ok == self.fits(msg)
        if ok:
            self.push(msg)

    @rule(sizes=st.lists(st.integers(0, SLOT), max_size=6), which=st.integers(0, 1))
    def send_many(self, sizes, which):
        ring = self.producers()[which % len(self.producers())]
        msgs = [self.message(n) for n in sizes]
        if ring is self.tx and self.wview is not None:
            with pytest.raises(ConfigError, match="reservation"):
                ring.send_many(msgs)
            return
        n = ring.send_many(msgs)
        expected = 0
        for m in msgs:
            if not self.fits(m):
                break
            self.push(m)
            expected += 1
        assert n == expected

    @precondition(lambda self: self.wview is None)
    @rule(size=st.integers(0, SLOT))
    def reserve(self, size):
        view = self.tx.reserve(size)
        if view is None:
            assert not self.fits(b"")
            return
        assert len(view) == size and not view.readonly
        part = view[size // 2:]
        self.wview = (view, part, size)
        if self.kind == "mpmc":
            self.push(RESERVED)  # claimed now: later messages queue behind it

    @precondition(lambda self: self.wview is not None)
    @rule(n=st.integers(0, SLOT), use_slice=st.booleans())
    def commit(self, n, use_slice):
        view, part, size = self.wview
        n = min(n, size)
        msg = self.message(n)
        if use_slice and n > size // 2:
            view[: size // 2] = msg[: size // 2]
            part[: n - size // 2] = msg[size // 2:]
        else:
            view[:n] = msg
        self.tx.commit(n)
        self.wview = None
        self.dead += [view, part]
        if self.kind == "mpmc":
            i = self.queue.index(RESERVED)
            self.queue[i] = msg
        else:
            self.push(msg)

    @precondition(lambda self: self.wview is not None)
    @rule()
    def cancel(self):
        view, part, size = self.wview
        self.tx.cancel()
        self.wview = None
        self.dead += [view, part]
        if self.kind == "mpmc":
            i = self.queue.index(RESERVED)
            if i == len(self.queue) - 1:
                del self.queue[i]  # still the last claim: handed back
                self.head -= 1
            else:
                self.queue[i] = b""  # others claimed after it: committed empty

    # -- receiving ---------------------------------------------------------------------------
    def consumers(self):
        return [self.rx] if self.kind == "spsc" else [self.rx, self.rx2]

    def refused_by_peek(self, ring):
        return ring is self.rx and self.rview is not None

    @rule(which=st.integers(0, 1))
    def try_recv(self, which):
        ring = self.consumers()[which % len(self.consumers())]
        if self.refused_by_peek(ring):
            with pytest.raises(ConfigError, match="peeked"):
                ring.try_recv()
            return
        got = ring.try_recv()
        ready = self.deliverable()
        if not ready:
            assert got is None
        else:
            assert got == self.take(1)[0]

    @rule(n=st.integers(0, 10), which=st.integers(0, 1))
    def recv_many(self, n, which):
        ring = self.consumers()[which % len(self.consumers())]
        if self.refused_by_peek(ring):
            with pytest.raises(ConfigError, match="peeked"):
                ring.recv_many(n)
            return
        got = ring.recv_many(n)
        k = min(n, len(self.deliverable()))
        assert got == self.take(k)

    @rule(size=st.integers(0, SLOT * CAP), which=st.integers(0, 1))
    def recv_into(self, size, which):
        ring = self.consumers()[which % len(self.consumers())]
        buf = bytearray(size)
        if self.refused_by_peek(ring):
            with pytest.raises(ConfigError, match="peeked"):
                ring.recv_into(buf)
            return
        ready = self.deliverable()
        if not ready:
            assert ring.recv_into(buf) is None
            return
        if len(ready[0]) > size:
            with pytest.raises(MessageTooLargeError):
                ring.recv_into(buf)
            return  # it stays in the ring, for both kinds
        n = ring.recv_into(buf)
        assert bytes(buf[:n]) == self.take(1)[0]

    @precondition(lambda self: self.rview is None)
    @rule()
    def peek(self):
        ready = self.deliverable()
        try:
            view = self.rx.peek()
        except MessageTooLargeError:
            assert self.kind == "spsc" and len(ready[0]) > SLOT
            return
        if not ready:
            assert view is None
            return
        assert view is not None and view.readonly and view == ready[0]
        msg = ready[0]
        if self.kind == "mpmc":
            self.peek_idx = self.head - len(self.queue)
            self.queue.popleft()  # claimed: other consumers move past it
        self.rview = (view, view[1:], msg)

    @precondition(lambda self: self.rview is not None)
    @rule()
    def release(self):
        view, part, msg = self.rview
        assert bytes(view) == msg and bytes(part) == msg[1:]  # unchanged while held
        self.rx.release()
        self.rview = None
        self.peek_idx = None
        self.dead += [view, part]
        if self.kind == "spsc":
            assert self.queue.popleft() == msg

    # -- views of finished messages ----------------------------------------------------------
    @precondition(lambda self: self.dead)
    @rule(i=st.integers(0, 1000), write=st.booleans())
    def dead_view_refuses(self, i, write):
        v = self.dead[i % len(self.dead)]
        with pytest.raises(ClosedError):
            if write and not v.readonly:
                v[0:0] = b""
            else:
                bytes(v)

    @invariant()
    def length_matches(self):
        if self.kind == "mpmc":
            assert len(self.tx) == len(self.queue)
        else:
            published = sum(self.slots(m) for m in self.queue)
            assert len(self.tx) == published


class MpmcMachine(RingMachine):
    kind = "mpmc"


SETTINGS = settings(max_examples=120, stateful_step_count=40, deadline=None)
TestSpscModel = RingMachine.TestCase
TestSpscModel.settings = SETTINGS
TestMpmcModel = MpmcMachine.TestCase
TestMpmcModel.settings = SETTINGS
