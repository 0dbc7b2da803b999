"""`pyivshmem bench --topology host-guest|guest-guest`: pyivshmem across QEMU guests.

The guests are the VM harness's (pyivshmem.vm.harness): a Debian kernel and busybox, the host's own Python
and the installed pyivshmem package, booted under KVM when a probe boot under KVM succeeds (else
under software emulation, TCG; ``--accel`` forces one) with an ``ivshmem-doorbell`` device
connected to a pyivshmem :class:`~pyivshmem.Server` embedded in this process. Inside, the
benchmark opens the device with :class:`~pyivshmem.PciDevice` (VFIO, MSI-X doorbells) and runs
its part of a plan (vmloops.py); results come back over the serial console.

* host-guest: one guest; a host :class:`~pyivshmem.Peer` ping-pongs with it (busy-poll and
  blocking, timed on the host), wakes it while it sleeps (timed on the host) and streams to it
  and from it (timed by the receiver).
* guest-guest: two guests on one server; guest a ping-pongs with guest b and wakes it (timed by
  a's clock) and streams to it (timed by b's clock).

Doorbells per message come from both sides' Channel counters of each phase.  Under TCG every
guest instruction is emulated, so those are functional figures (the path works, how it behaves)
and never speed claims; under KVM they are speed figures.  Records and the table say which.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import IvshmemError
from .report import EMULATED, GUEST_PLACEMENTS, guest_label
from .runner import _latency, _throughput
from .stats import Histogram
from .vmloops import ring_shapes, run_plan

__all__ = ["GuestsUnavailable", "run_guests", "EMULATED_NOTE", "GUEST_PLACEMENTS"]

EMULATED_NOTE = EMULATED
INSTALL_HINT = "apt-get install qemu-system-x86 busybox-static cpio kmod"
MAX_GUEST_SIZE = 64 * 1024

# per figure: (full run, --quick)
RTT_SAMPLES = (2000, 300)
WAKE_SAMPLES = (300, 60)
STREAM_COUNT = (20000, 2000)

GUEST_SCRIPT = r"""
import json
import vmguest
from pyivshmem import PciDevice
from pyivshmem.bench.vmloops import run_plan

with open("/test/plan.json") as f:
    plan = json.load(f)
with PciDevice.open(vfio=True) as dev:
    vmguest.stage("ready", id=dev.id)
    out = run_plan(plan, plan["me"], dev.region, dev)
vmguest.result(**out)
"""

Progress = Callable[[str], None]


class GuestsUnavailable(IvshmemError, RuntimeError):
    """QEMU or the guest image cannot be had here; the message says what to install."""


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


class _Plan:
    """The rings and phases of one topology, and the records they become."""

    def __init__(self, topology: str, s: Any, guest: Dict[str, Any], busy_ok: bool) -> None:
        self.topology = topology
        self.label = guest_label(guest.get("accel"))
        self.doorbells = "doorbells" in s.scenarios
        self.rings: Dict[str, Dict[str, int]] = {}
        self.phases: List[Dict[str, Any]] = []
        self.skipped: List[Tuple[str, Dict[str, Any], str]] = []
        if topology == "host-guest":
            near, far, arrow = "host", "guest", ("host -> guest", "guest -> host")
        else:
            near, far, arrow = "a", "b", ("guest a -> guest b", None)
        self.participants = (near, far)
        size = guest["rtt_size"]
        if "roundtrip" in s.scenarios:
            for mode in ("busy-poll", "blocking"):
                ph = {"name": f"rtt-{mode}", "kind": "rtt", "mode": mode, "busy": mode == "busy-poll",
                      "size": size, "samples": guest["rtt_samples"],
                      "warmup": min(100, max(10, guest["rtt_samples"] // 10)),
                      "client": near, "echo": far,
                      "ping": self._ring(f"rtt-{mode}-ping", size, "rtt"),
                      "pong": self._ring(f"rtt-{mode}-pong", size, "rtt")}
                if mode == "busy-poll" and not busy_ok:
                    self.skipped.append(("roundtrip", ph, "busy-polling needs two CPUs"))
                else:
                    self.phases.append(ph)
        if "wakeup" in s.scenarios:
            ph = {"name": "wake", "kind": "wake", "mode": "blocking", "size": size,
                  "samples": guest["wake_samples"], "gap": guest["wake_gap"],
                  "client": near, "echo": far,
                  "ping": self._ring("wake-ping", size, "rtt"),
                  "pong": self._ring("wake-pong", size, "rtt")}
            if not busy_ok:
                self.skipped.append(("wakeup", ph, "the waker busy-polls for the answer: "
                                                   "needs two CPUs"))
            else:
                self.phases.append(ph)
        if "throughput" in s.scenarios:
            for size in guest["sizes"]:
                for direction, (src, dst) in zip(arrow, ((near, far), (far, near))):
                    if direction is None:
                        continue
                    tag = "h2g" if src == "host" else ("g2h" if dst == "host" else "a2b")
                    ph = {"name": f"stream-{size}-{tag}", "kind": "stream", "mode": "adaptive",
                          "size": size, "count": guest["counts"][str(size)], "direction": direction,
                          "sender": src, "receiver": dst,
                          "ring": self._ring(f"stream-{size}-{tag}", size, "stream")}
                    self.phases.append(ph)
        for size in guest["too_big"]:
            self.skipped.append(("throughput", {"name": f"stream-{size}", "kind": "stream",
                                                "mode": "adaptive", "size": size,
                                                "direction": arrow[0]},
                                 f"guest figures stop at {MAX_GUEST_SIZE // 1024} KiB messages"))

    def _ring(self, name: str, size: int, kind: str) -> str:
        shape = ring_shapes(size, kind)
        self.rings[name] = dict(shape, vector=len(self.rings))
        return name

    @property
    def vectors(self) -> int:
        return max(1, len(self.rings))

    @property
    def region_size(self) -> int:
        need = sum(r["slot"] * r["capacity"] + 4096 for r in self.rings.values()) + (256 << 10)
        return max(1 << 20, _pow2(need * 2))

    def as_dict(self, me: str) -> Dict[str, Any]:
        return {"me": me, "op_timeout": 120.0, "rings": self.rings, "phases": self.phases}

    def budget(self) -> float:
        """Generous seconds for every phase together (the guests' own kill bound)."""
        n = sum(ph.get("samples", 0) + ph.get("warmup", 0) + ph.get("count", 0) for ph in self.phases)
        gaps = sum(ph.get("samples", 0) * ph.get("gap", 0.0) for ph in self.phases)
        return 300.0 + 0.05 * n + 2 * gaps


def _variant(topology: str, ph: Dict[str, Any]) -> str:
    ends = ("host Peer <-> guest PciDevice (VFIO)" if topology == "host-guest"
            else "guest PciDevice <-> guest PciDevice (VFIO)")
    if ph["kind"] == "rtt":
        if ph["mode"] == "busy-poll":
            return f"Channel try_send/try_recv: {ends}"
        return f"Channel send/recv, spin=0, MSI-X doorbell: {ends}"
    if ph["kind"] == "wake":
        sleeper = "the guest" if topology == "host-guest" else "guest b"
        return (f"Channel send to {sleeper} asleep in recv (spin=0, MSI-X doorbell), "
                "its answer busy-polled")
    return f"Channel send/recv, {ph['direction']}"


_SCENARIO = {"rtt": "roundtrip", "wake": "wakeup", "stream": "throughput"}


def _record(topology: str, ph: Dict[str, Any], scenario: Optional[str] = None,
            **fields: Any) -> Dict[str, Any]:
    scenario = scenario or _SCENARIO[ph["kind"]]
    method: Optional[str] = "send/recv"
    if scenario == "roundtrip":
        group = f"guest/{topology}/roundtrip/{ph['mode']}/{ph['size']}"
        method = None
    elif scenario == "wakeup":
        group = f"guest/{topology}/wakeup/{ph['size']}"
        method = None
    elif scenario == "doorbells":
        method = {"rtt": "ping-pong", "wake": "wake-up", "stream": "streaming"}[ph["kind"]]
        group = f"guest/{topology}/doorbells/{ph['name']}"
    else:
        tag = ph["name"].rsplit("-", 1)[-1]
        group = f"guest/{topology}/throughput/{ph['size']}/{tag}"
    rec: Dict[str, Any] = {
        "scenario": scenario, "group": group, "transport": "pyivshmem", "label": "pyivshmem",
        "is_pyivshmem": True, "variant": _variant(topology, ph), "mode": ph["mode"],
        "method": method, "size": ph["size"],
        "batch": 1, "placement": topology, "cpus": [], "producers": 1, "consumers": 1, "rank": 0,
        "status": "ok", "note": None, "latency_ns": None, "throughput": None,
        "doorbells_per_msg": None, "counters": None, "reference": False, "ratio": None,
        "elapsed_s": None,
    }
    rec.update(fields)
    return rec


def _prefixed(a: Optional[Dict[str, int]], b: Optional[Dict[str, int]]) -> Optional[Dict[str, int]]:
    out = {f"a_{k}": v for k, v in (a or {}).items()}
    out.update({f"b_{k}": v for k, v in (b or {}).items()})
    return out or None


def _bells(plan: _Plan, ph: Dict[str, Any], counters: Optional[Dict[str, int]],
           elapsed: Optional[float]) -> List[Dict[str, Any]]:
    """The doorbells-per-message record of a phase, from both sides' Channel counters."""
    if not plan.doorbells:
        return []
    c = counters or {}
    sent = c.get("a_sent", 0) + c.get("b_sent", 0)
    if sent <= 0:
        return [_record(plan.topology, ph, "doorbells", status="failed",
                        note="the Channels counted no messages")]
    bells = c.get("a_doorbells", 0) + c.get("b_doorbells", 0)
    return [_record(plan.topology, ph, "doorbells", doorbells_per_msg=bells / sent, counters=c,
                    elapsed_s=elapsed,
                    note=f"{plan.label}; both sides' Channel counters over the whole phase")]


def _records_from(plan: _Plan, results: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Records of every phase from each participant's run_plan() output."""
    topo = plan.topology
    label = plan.label
    recs = []
    bells = []
    for ph in plan.phases:
        name = ph["name"]
        if ph["kind"] in ("rtt", "wake"):
            cli, echo = results[ph["client"]].get(name), results[ph["echo"]].get(name)
            if not cli or not echo:
                recs.append(_record(topo, ph, status="failed", note="a side reported nothing"))
                continue
            hist = Histogram.from_dict(cli["histogram"])
            timed = "the host" if ph["client"] == "host" else "guest a's clock"
            counters = _prefixed(cli["counters"], echo["counters"])
            note = f"{label}; timed by {timed}"
            if ph["kind"] == "wake":
                note += (f"; a wake-up plus a busy-polled answer; the receiver was seen waiting "
                         f"before {cli.get('asleep', 0)} of {ph['samples']} sends")
            recs.append(_record(topo, ph, latency_ns=_latency(hist), counters=counters,
                                elapsed_s=cli["elapsed_s"], note=note))
            bells += _bells(plan, ph, counters, cli["elapsed_s"])
        else:
            snd, rcv = results[ph["sender"]].get(name), results[ph["receiver"]].get(name)
            if not snd or not rcv:
                recs.append(_record(topo, ph, status="failed", note="a side reported nothing"))
                continue
            secs = (rcv["end_ns"] - rcv["start_ns"]) / 1e9
            if rcv["messages"] != ph["count"] or secs <= 0:
                recs.append(_record(topo, ph, status="failed",
                                    note=f"received {rcv['messages']} of {ph['count']} messages"))
                continue
            timed = "the host" if ph["receiver"] == "host" else (
                "the guest's clock" if topo == "host-guest" else "guest b's clock")
            counters = _prefixed(snd["counters"], rcv["counters"])
            recs.append(_record(
                topo, ph, throughput=_throughput([rcv["messages"] / secs], ph["size"], ph["count"],
                                                 rcv["messages"], secs),
                counters=counters, elapsed_s=rcv["elapsed_s"],
                note=f"{label}; timed by {timed}, from the first message received "
                     "to the last"))
            bells += _bells(plan, ph, counters, rcv["elapsed_s"])
    for scenario, ph, why in plan.skipped:
        recs.append(_record(topo, ph, scenario, status="skipped", note=why))
    return recs + bells


def _failed(plan: _Plan, why: str) -> List[Dict[str, Any]]:
    recs = [_record(plan.topology, ph, status="failed", note=why) for ph in plan.phases]
    recs += [_record(plan.topology, ph, sc, status="skipped", note=w) for sc, ph, w in plan.skipped]
    return recs


class _Watch:
    """alive() for run_plan on the host: raises once a guest has failed or ended."""

    def __init__(self, vms: Sequence[Any]) -> None:
        self.vms = list(vms)
        self.seen = [0] * len(self.vms)

    def __call__(self) -> None:
        for i, vm in enumerate(self.vms):
            if vm.proc is not None and vm.proc.poll() is not None:
                raise vm.fail(f"QEMU ended (exit code {vm.proc.returncode})")
            n = len(vm.lines)
            if n != self.seen[i]:
                self.seen[i] = n
                for m in vm.messages():
                    if m.tag in ("error", "exit"):
                        raise vm.fail(f"the guest stopped early: {m.tag} {m.text[:2000]}")


def _wait_joined(peer: Any, count: int, timeout: float, watch: _Watch) -> List[int]:
    joined: List[int] = []
    deadline = time.monotonic() + timeout
    while len(joined) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(joined)} of {count} guests joined the server")
        watch()
        peer.wait(0.2)
        joined += [ev.peer for ev in peer.events() if ev.kind == "joined"]
    return joined


def _run_topology(plan: _Plan, image: Any, workdir: str, progress: Progress,
                  accel: str = "tcg") -> List[Dict[str, Any]]:
    from .. import Peer, Server
    from ..vm.harness import BOOT_TIMEOUT, Vm, VmError, ivshmem_doorbell

    sock = os.path.join(workdir, "ivshmem.sock")
    guests = ["guest"] if plan.topology == "host-guest" else ["a", "b"]
    vectors = plan.vectors
    with Server(sock, size=plan.region_size, vectors=vectors) as _server, \
            Peer.connect(sock, vectors=vectors, timeout=30) as peer:
        # the host formats the region and lays out every ring before a guest looks at it
        for name, r in plan.rings.items():
            peer.region.create_ring(name, "spsc", slot_size=r["slot"], capacity=r["capacity"])
        vms = [Vm(GUEST_SCRIPT, ivshmem_doorbell(sock, vectors=vectors), workdir=workdir,
                  name=f"bench-{g}", image=image, guest_timeout=plan.budget(), accel=accel,
                  files={"plan.json": json.dumps(plan.as_dict(g))}) for g in guests]
        watch = _Watch(vms)
        try:
            t0 = time.monotonic()
            for vm in vms:
                vm.start()
            progress(f"booting {len(vms)} guest(s) under {accel.upper()} ({plan.topology})")
            _wait_joined(peer, len(vms), BOOT_TIMEOUT, watch)
            for vm in vms:
                vm.wait_for("stage", timeout=BOOT_TIMEOUT)
            progress(f"guest(s) ready after {time.monotonic() - t0:.1f}s; measuring")
            results: Dict[str, Dict[str, Any]] = {}
            if plan.topology == "host-guest":
                results["host"] = run_plan(plan.as_dict("host"), "host", peer.region, peer, watch)
            for g, vm in zip(guests, vms):
                results[g] = vm.result(timeout=plan.budget())
        except BaseException as exc:
            if not isinstance(exc, VmError):  # a VmError carries the serial log already
                for vm in vms:
                    sys.stderr.write(vm.log_text())
            raise
        finally:
            for vm in vms:
                vm.close()
    return _records_from(plan, results)


def guest_settings(s: Any, explicit: Dict[str, Any]) -> Dict[str, Any]:
    """What the guest topologies measure: counts scaled down for emulation unless given."""
    quick = 1 if s.quick else 0
    sizes = list(explicit.get("sizes") or (64, 4096))
    base = explicit.get("count") or STREAM_COUNT[quick]
    counts = {str(n): (base if explicit.get("count") or n <= 256 else max(100, base // 4))
              for n in sizes}
    return {
        "rtt_size": s.rtt_size,
        "rtt_samples": explicit.get("rtt_samples") or RTT_SAMPLES[quick],
        "wake_samples": explicit.get("wake_samples") or WAKE_SAMPLES[quick],
        "wake_gap": max(s.wake_gap, 0.002),
        "sizes": [n for n in sizes if n <= MAX_GUEST_SIZE],
        "too_big": [n for n in sizes if n > MAX_GUEST_SIZE],
        "counts": {k: v for k, v in counts.items() if int(k) <= MAX_GUEST_SIZE},
        "accel": "tcg",            # set by the caller from choose_accel()
        "accel_reason": None,
    }


def check_available() -> Any:
    """The guest image (built or found in the cache); GuestsUnavailable saying what to install."""
    from ..vm.harness import VmUnavailable, ensure_image, qemu_binary

    if not qemu_binary():
        raise GuestsUnavailable(f"qemu-system-x86_64 is not installed ({INSTALL_HINT})")
    try:
        return ensure_image()
    except VmUnavailable as exc:
        raise GuestsUnavailable(f"cannot assemble the guest image: {exc} ({INSTALL_HINT})") from None
    except Exception as exc:  # noqa: BLE001 - e.g. ldd missing: say so, do not crash
        raise GuestsUnavailable(f"cannot assemble the guest image: {exc!r} ({INSTALL_HINT})") from None


def run_guests(s: Any, guest: Dict[str, Any], image: Any, cpus: Sequence[int],
               progress: Optional[Progress] = None) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Boot the guests of ``s.topology``, measure, and return (records, notes)."""
    progress = progress or (lambda text: None)
    accel = guest.get("accel") or "tcg"
    notes = [f"{s.topology}: QEMU guests under {accel.upper()}: {guest_label(accel)}"]
    if guest.get("accel_reason"):
        notes.append(f"{s.topology}: {accel.upper()} because {guest['accel_reason']}")
    other = [x for x in s.scenarios if x not in ("roundtrip", "throughput", "wakeup", "doorbells")]
    if other:
        notes.append(f"{s.topology}: {', '.join(other)} not measured with guests "
                     "(round trip, wake-up, throughput and doorbells only)")
    notes.append(f"{s.topology}: peers are measured in the host topology only")
    plan = _Plan(s.topology, s, guest, busy_ok=len(cpus) >= 2)
    if not plan.phases:
        return _failed(plan, "nothing to measure"), notes
    workdir = tempfile.mkdtemp(prefix="pyivshmem-bench-vm-")
    try:
        recs = _run_topology(plan, image, workdir, progress, accel)
    except Exception as exc:  # noqa: BLE001 - the run reports it as failed figures
        text = str(exc)
        print(f"pyivshmem bench: --topology {s.topology} failed: {text}", file=sys.stderr)
        first = text.strip().splitlines()[0] if text.strip() else repr(exc)
        recs = _failed(plan, f"{type(exc).__name__}: {first}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return recs, notes
