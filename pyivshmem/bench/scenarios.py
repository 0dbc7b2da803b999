"""pyivshmem itself as a benchmark transport, and the variants of each scenario it is measured in.

The benchmark creates its own region file in /dev/shm (removed at the end) holding, for every
message size, one SPSC ring per direction (``ab-<size>``, ``ba-<size>``) and one MPMC ring
(``mpmc-<size>``).  Each worker process opens the region and the rings it needs.

Variants (``docs/bench.md`` explains each figure):

* round trip: ``busy-poll`` (try_send/try_recv in a spin), ``adaptive`` (the blocking send/recv:
  spin briefly, then sleep), ``blocking`` (sleep at once, woken by a doorbell: needs Channel);
* one-way throughput: send/recv (the blocking calls), try_send/try_recv, send_many/recv_many in
  batches, and zero-copy reserve/commit + peek/release;
* MPMC: an MpmcRing shared by every producer and consumer, blocking send/recv;
* wake-up: the blocking recv of a process that has gone to sleep;
* doorbells per message: counted by a Channel (needs Channel).

Each variant names its comparison ``group`` and a ``rank``: in every group the available
pyivshmem variant with the lowest rank is the reference the peers' ratios are computed against.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from .peers import Endpoint, Transport

__all__ = ["PyivshmemTransport", "channel_problem", "ring_shape"]


def channel_problem() -> Optional[str]:
    """Why doorbell scenarios cannot run with this build of pyivshmem, or None."""
    try:
        import pyivshmem
    except ImportError as exc:  # pragma: no cover - the bench lives inside the package
        return f"pyivshmem cannot be imported ({exc})"
    missing = [n for n in ("Channel", "Server", "Peer") if not hasattr(pyivshmem, n)]
    if missing:
        return (
            f"needs pyivshmem.{'/'.join(missing)} (doorbells), which this build does not have yet"
        )
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
        from pyivshmem import Region

        state = super().setup(ctx, run_id, sizes, workdir)
        path = f"/dev/shm/pyivshmem-bench-{run_id}"
        with Region.create(path, _region_bytes(sizes)) as region:
            for size in sizes:
                shape = ring_shape(size)
                for chan in ("ab", "ba"):
                    region.create_ring(f"{chan}-{size}", "spsc", **shape)
                region.create_ring(f"mpmc-{size}", "mpmc", **shape)
        state["path"] = path
        return state

    def teardown(self, state):
        path = state.get("path")
        if path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _region(self, state: Dict[str, Any]) -> Any:
        region = state.get("_region")
        if region is None:
            from pyivshmem import Region

            region = state["_region"] = Region.open(state["path"])
        return region

    def _ring(self, state: Dict[str, Any], name: str) -> Any:
        # One ring object per ring and process: each keeps the side's private index, so two
        # objects driving the same side of one ring would disagree with each other.
        rings = state.setdefault("_rings", {})
        ring = rings.get(name)
        if ring is None:
            ring = rings[name] = self._region(state).ring(name)
        return ring

    def open(self, state, role, size, mode):
        if role in ("a", "b"):
            out, inc = ("ab", "ba") if role == "a" else ("ba", "ab")
            r_out, r_in = self._ring(state, f"{out}-{size}"), self._ring(state, f"{inc}-{size}")
        else:
            r_out = r_in = self._ring(state, f"mpmc-{size}")
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
        region = state.pop("_region", None)
        if region is not None:
            region.close()

    # -- what to measure ---------------------------------------------------------------------
    def roundtrip_variants(self) -> List[Dict[str, Any]]:
        note = channel_problem()
        return [
            {"mode": "busy-poll", "variant": "try_send/try_recv", "busy": True,
             "group_mode": "busy-poll", "rank": 0},
            {"mode": "adaptive", "variant": "send/recv (spin, then sleep)",
             "busy": False, "group_mode": "blocking", "rank": 1},
            {"mode": "blocking", "variant": "Channel, sleep until doorbell",
             "busy": False, "group_mode": "blocking", "rank": 0, "skip": note},
        ]

    def throughput_variants(self, size: int, batch: int) -> List[Dict[str, Any]]:
        return [
            {"method": "send/recv", "variant": "send/recv", "busy": False, "batch": 1, "rank": 0},
            {"method": "try_send/try_recv", "variant": "try_send/try_recv", "busy": True,
             "batch": 1, "rank": 1},
            {"method": "zero-copy", "variant": "reserve/commit + peek/release", "busy": True,
             "batch": 1, "rank": 2, "send": "zc-send", "recv": "zc-recv"},
            {"method": "batch", "variant": f"send_many/recv_many x{batch}", "busy": True,
             "batch": batch, "rank": 0},
        ]

    def mpmc_variant(self) -> Dict[str, Any]:
        return {"variant": "MpmcRing send/recv", "busy": False, "rank": 0}

    def wakeup_variants(self) -> List[Dict[str, Any]]:
        note = channel_problem()
        return [
            {"mode": "blocking", "variant": "Channel.recv (doorbell)", "rank": 0,
             "skip": note},
            {"mode": "adaptive", "variant": "recv (spin, then sleep)",
             "rank": 1},
        ]
