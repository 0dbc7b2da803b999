"""pyivshmem itself as a benchmark transport, and the variants of each scenario it is measured in.

The benchmark's region (the memory of its own server, below) holds, for every message size, one
SPSC ring per direction (``ab-<size>``, ``ba-<size>``) and one MPMC ring (``mpmc-<size>``).  Each
worker process opens the rings it needs.

Memory and doorbells come the way they come to any host process: the benchmark starts its own
:class:`pyivshmem.Server` (QEMU's protocol, a memfd, two vectors per peer) on a socket in its
work folder, and every worker process joins it as a :class:`pyivshmem.Peer`: the region is the
server's memory, and the blocking figures use :class:`pyivshmem.Channel` on that Peer's eventfds.
Each process sleeps on vector 0 for its incoming ring and on vector 1 for its outgoing ring.

Variants (``docs/bench.md`` explains each figure):

* round trip: ``busy-poll`` (try_recv in a spin), ``adaptive`` (Channel.recv: spin briefly, then
  sleep until the doorbell), ``blocking`` (Channel with no spin: sleep at once);
* one-way throughput: Channel send/recv (the blocking calls), the ring's own send/recv (spin,
  then sleep with back-off: no doorbell), its try_send/try_recv, send_many/recv_many in batches,
  and zero-copy reserve/commit + peek/release;
* MPMC: an MpmcRing shared by every producer and consumer, its blocking send/recv (spin, then
  sleep with back-off: a Channel has one consumer route, so several sleeping consumers are not its
  use);
* wake-up: Channel.recv of a process that has gone to sleep;
* doorbells per message: Channel.stats counted over a stream and over ping-pongs.

Each variant names its comparison ``group`` and a ``rank``: in every group the available
pyivshmem variant with the lowest rank is the reference the peers' ratios are computed against.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from .peers import Endpoint, Transport

__all__ = ["PyivshmemTransport", "channel_problem", "ring_shape"]

# The running server of each benchmark run, by run id (servers hold threads and sockets, so they
# stay in the parent and out of the state handed to workers).
_SERVERS: Dict[str, Any] = {}


def channel_problem() -> Optional[str]:
    """Why doorbell scenarios cannot run with this build of pyivshmem, or None."""
    try:
        import pyivshmem
    except ImportError as exc:  # pragma: no cover - the bench lives inside the package
        return f"pyivshmem cannot be imported ({exc})"
    if not hasattr(pyivshmem, "Channel"):
        return "needs pyivshmem.Channel (doorbells), which this build does not have"
    return None


def ring_shape(size: int) -> Dict[str, int]:
    """Slot size and capacity of the rings carrying ``size``-byte messages (about 8 MiB of slots,
    4096 slots at most, 8 at least, every message in one slot so zero-copy works)."""
    slot = max(size, 64)
    cap = 4096
    while cap > 8 and cap * slot > (8 << 20):
        cap //= 2
    return {"slot_size": slot, "capacity": cap}


def _region_bytes(sizes: Sequence[int]) -> int:
    need = 4096
    for size in sizes:
        shape = ring_shape(size)
        per_ring = 512 + shape["capacity"] * (shape["slot_size"] + 64)
        need += 3 * per_ring
    total = 1 << 16
    while total < need:
        total <<= 1
    return total


class PyivshmemTransport(Transport):
    key = "pyivshmem"
    label = "pyivshmem"
    is_pyivshmem = True
    mpmc = True
    batch = True

    def unavailable(self) -> Optional[str]:
        try:
            from pyivshmem import Region  # noqa: F401
        except ImportError as exc:
            return (
                f"the pyivshmem extension is not built ({exc}); run "
                "`python setup.py build_ext --inplace` or install the package"
            )
        return None

    def setup(self, ctx, run_id, sizes, workdir):
        from pyivshmem import Peer, Server

        state = super().setup(ctx, run_id, sizes, workdir)
        sock = os.path.join(workdir, "ivshmem.sock")
        server = Server(sock, memfd=True, size=_region_bytes(sizes), vectors=2)
        server.start()
        _SERVERS[run_id] = server
        state["socket"] = sock
        try:
            with Peer.connect(sock, timeout=10) as peer:  # formats the memory, makes the rings
                for size in sizes:
                    shape = ring_shape(size)
                    for chan in ("ab", "ba"):
                        peer.region.create_ring(f"{chan}-{size}", "spsc", **shape)
                    peer.region.create_ring(f"mpmc-{size}", "mpmc", **shape)
        except BaseException:
            self.teardown(state)
            raise
        return state

    def teardown(self, state):
        server = _SERVERS.pop(state.get("run_id", ""), None)
        if server is not None:
            server.close()

    def _peer(self, state: Dict[str, Any]) -> Any:
        peer = state.get("_peer")
        if peer is None:
            from pyivshmem import Peer

            peer = state["_peer"] = Peer.connect(state["socket"], timeout=10)
        return peer

    def _ring(self, state: Dict[str, Any], name: str) -> Any:
        # One ring object per ring and process: each keeps the side's private index, so two
        # objects driving the same side of one ring would disagree with each other.
        rings = state.setdefault("_rings", {})
        ring = rings.get(name)
        if ring is None:
            ring = rings[name] = self._peer(state).region.ring(name)
        return ring

    def open(self, state, role, size, mode):
        if role in ("a", "b"):
            out, inc = ("ab", "ba") if role == "a" else ("ba", "ab")
            r_out, r_in = self._ring(state, f"{out}-{size}"), self._ring(state, f"{inc}-{size}")
        else:
            r_out = r_in = self._ring(state, f"mpmc-{size}")
        if mode in ("adaptive", "blocking") and role in ("a", "b"):
            from pyivshmem import Channel

            bell = self._peer(state)
            spin = 0.0 if mode == "blocking" else None
            rx = Channel(r_in, bell, vector=0, spin=spin)
            tx = Channel(r_out, bell, vector=1, spin=spin)

            def stats() -> Dict[str, int]:
                a, b = rx.stats, tx.stats
                return {k: a[k] + b[k] for k in a}

            ep = Endpoint(send=tx.send, recv=rx.recv, try_send=tx.try_send,
                          try_recv=rx.try_recv, stats=stats,
                          # batches that sleep on the doorbell like send/recv (all sent; what
                          # is there once the first message came)
                          send_many=lambda ms: tx.send_many(ms, timeout=None),
                          recv_many=lambda n: rx.recv_many(n, timeout=None))
            ep.send_many_partial = True
            ep.on_close(rx.close)
            ep.on_close(tx.close)
            return ep
        ep = Endpoint(
            send=r_out.send,
            recv=r_in.recv,
            try_send=r_out.try_send,
            try_recv=r_in.try_recv,
            send_many=r_out.send_many,
            recv_many=r_in.recv_many,
            reserve=r_out.reserve,
            commit=r_out.commit,
            peek=r_in.peek,
            release=r_in.release,
        )
        ep.send_many_partial = True
        return ep

    def worker_exit(self, state):
        for ring in state.pop("_rings", {}).values():
            ring.close()
        peer = state.pop("_peer", None)
        if peer is not None:
            peer.close()

    # -- what to measure ---------------------------------------------------------------------
    def roundtrip_variants(self) -> List[Dict[str, Any]]:
        note = channel_problem()
        return [
            {"mode": "busy-poll", "variant": "try_recv spin", "busy": True,
             "group_mode": "busy-poll", "rank": 0},
            {"mode": "adaptive", "variant": "Channel: spin 100 us, then doorbell", "busy": False,
             "group_mode": "blocking", "rank": 1, "skip": note},
            {"mode": "blocking", "variant": "Channel: no spin, doorbell", "busy": False,
             "group_mode": "blocking", "rank": 0, "skip": note},
        ]

    def throughput_variants(self, size: int, batch: int) -> List[Dict[str, Any]]:
        note = channel_problem()
        return [
            {"method": "send/recv", "variant": "Channel send/recv", "busy": False, "batch": 1,
             "rank": 0, "mode": "adaptive", "skip": note},
            {"method": "ring send/recv", "variant": "ring send/recv (no doorbell)", "busy": False,
             "batch": 1, "rank": 1, "mode": "ring"},
            {"method": "try_send/try_recv", "variant": "ring try_send/try_recv", "busy": True,
             "batch": 1, "rank": 2},
            {"method": "zero-copy", "variant": "reserve/commit + peek/release", "busy": True,
             "batch": 1, "rank": 3, "send": "zc-send", "recv": "zc-recv"},
            {"method": "batch", "variant": f"Channel send_many/recv_many x{batch}",
             "busy": False, "batch": batch, "rank": 0, "mode": "adaptive", "skip": note},
            {"method": "batch", "variant": f"ring send_many/recv_many x{batch}", "busy": True,
             "batch": batch, "rank": 1},
        ]

    def mpmc_variant(self) -> Dict[str, Any]:
        return {"variant": "MpmcRing send/recv", "busy": False, "rank": 0}

    def wakeup_variants(self) -> List[Dict[str, Any]]:
        note = channel_problem()
        return [
            {"mode": "blocking", "variant": "Channel: no spin, doorbell", "rank": 0, "skip": note},
            {"mode": "adaptive", "variant": "Channel: spin 100 us, then doorbell", "rank": 1,
             "skip": note},
        ]
