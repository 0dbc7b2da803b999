"""What a benchmark run measures, in which order, and how each measurement becomes a record.

One :class:`Runner` walks the transports (pyivshmem first, then the peers), and for each one runs
the selected scenarios in a group of spawned worker processes (see workers.py).  Each measured
figure becomes one record (a plain dict, the JSON schema of report.py); a scenario that cannot run
becomes a record with ``status`` "skipped" or "failed" and a note saying why, and the run goes on.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .peers import Transport
from .stats import Histogram, summarize_rates
from .workers import WorkerFailed, WorkerGroup, usable_cpus

__all__ = ["Settings", "Runner", "SCENARIOS"]

SCENARIOS = ("roundtrip", "throughput", "mpmc", "wakeup", "doorbells")


@dataclass
class Settings:
    """Everything that shapes a run; recorded in the JSON document as it was used."""

    quick: bool = False
    scenarios: Tuple[str, ...] = SCENARIOS
    sizes: Tuple[int, ...] = (64, 4096, 1 << 20)
    rtt_size: int = 64
    rtt_samples: int = 200_000       # most round trips timed per variant
    rtt_seconds: float = 1.0         # ... or until this much time has passed
    duration: float = 1.0            # target seconds of one throughput trial
    repeat: int = 3                  # trials per throughput figure (the median is reported)
    count: Optional[int] = None      # fixed messages per trial instead of calibrating
    batch: int = 32                  # messages per batch call
    mpmc_producers: int = 2
    mpmc_consumers: int = 2
    mpmc_size: int = 64
    wake_samples: int = 500
    wake_gap: float = 0.002          # seconds the receiver is left asleep before each message
    placement: str = "cross"         # "cross": CPUs differ; "same": both on one CPU
    cpus: Tuple[int, ...] = ()       # empty: the first two CPUs this process may use
    topology: str = "host"

    @classmethod
    def preset(cls, quick: bool) -> "Settings":
        if quick:
            return cls(quick=True, rtt_samples=50_000, rtt_seconds=0.25, duration=0.15, repeat=1,
                       wake_samples=60, wake_gap=0.002)
        return cls()

    def as_dict(self) -> Dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out


Progress = Callable[[str], None]


def _fmt_ns(ns: Optional[float]) -> str:
    if ns is None:
        return "-"
    if ns < 10_000:
        return f"{ns / 1000:.2f} us"
    if ns < 1_000_000:
        return f"{ns / 1000:.0f} us"
    return f"{ns / 1e6:.1f} ms"


def _fmt_rate(r: Optional[float]) -> str:
    if r is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if r >= scale:
            return f"{r / scale:.2f}{unit}"
    return f"{r:.0f}"


class _Session:
    """A transport's shared state plus the workers using it, re-created after a failure."""

    def __init__(self, runner: "Runner", transport: Transport, roles: Sequence[str],
                 cpus: Sequence[Optional[int]], sizes: Sequence[int]) -> None:
        self.runner, self.transport = runner, transport
        self.roles, self.cpus, self.sizes = list(roles), list(cpus), list(sizes)
        self.state: Optional[Dict[str, Any]] = None
        self.group: Optional[WorkerGroup] = None

    def run(self, tasks: Dict[str, Dict[str, Any]], timeout: float,
            order: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
        if self.group is None:
            self.state = self.transport.setup(
                self.runner.ctx, f"{self.runner.run_id}-{self.runner.next_serial()}",
                self.sizes, self.runner.workdir,
            )
            try:
                self.group = WorkerGroup(self.transport, self.state, self.roles, self.cpus,
                                         self.runner.ctx)
            except BaseException:
                self._teardown()
                raise
        try:
            return self.group.run(tasks, timeout, order)
        except BaseException:
            self.close()
            raise

    def _teardown(self) -> None:
        if self.state is not None:
            try:
                self.transport.teardown(self.state)
            finally:
                self.state = None

    def close(self) -> None:
        if self.group is not None:
            try:
                self.group.close()
            finally:
                self.group = None
        self._teardown()


class Runner:
    """Runs the selected scenarios for every transport and collects the records."""

    def __init__(self, settings: Settings, transports: Sequence[Transport],
                 progress: Optional[Progress] = None) -> None:
        self.s = settings
        self.transports = list(transports)
        self.progress = progress or (lambda text: None)
        self.ctx = multiprocessing.get_context("spawn")
        self.run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.records: List[Dict[str, Any]] = []
        self.notes: List[str] = []
        self._serial = 0
        self.workdir = ""
        cpus = list(settings.cpus) or usable_cpus()
        if settings.placement == "same" or len(cpus) < 2:
            self.pair_cpus: List[Optional[int]] = [cpus[0], cpus[0]] if cpus else [None, None]
            self.placement = "same" if settings.placement == "same" else "single-cpu"
        else:
            self.pair_cpus = [cpus[0], cpus[1]]
            self.placement = "cross"
        if self.placement == "single-cpu":
            self.notes.append(
                "only one CPU is usable: both processes share it, busy-poll figures are skipped"
            )
        self.cpus = cpus
        self._started = 0.0
        self._step = 0
        self._steps = 0

    def next_serial(self) -> int:
        self._serial += 1
        return self._serial

    # -- records -----------------------------------------------------------------------------
    def _record(self, transport: Transport, scenario: str, group: str, **fields: Any) -> Dict[str, Any]:
        rec: Dict[str, Any] = {
            "scenario": scenario,
            "group": group,
            "transport": transport.key,
            "label": transport.label,
            "is_pyivshmem": transport.is_pyivshmem,
            "variant": "",
            "mode": None,
            "method": None,
            "size": None,
            "batch": 1,
            "placement": self.placement,
            "cpus": [c for c in self.pair_cpus if c is not None],
            "producers": 1,
            "consumers": 1,
            "rank": None,
            "status": "ok",
            "note": None,
            "latency_ns": None,
            "throughput": None,
            "doorbells_per_msg": None,
            "counters": None,
            "reference": False,
            "ratio": None,
            "elapsed_s": None,
        }
        rec.update(fields)
        self.records.append(rec)
        return rec

    def _say(self, rec: Dict[str, Any]) -> None:
        self._step += 1
        what = f"{rec['scenario']} {rec['transport']} {rec.get('mode') or rec.get('method') or ''}"
        if rec.get("size") is not None:
            what += f" {rec['size']} B"
        if rec["status"] != "ok":
            result = f"{rec['status']}: {rec['note']}"
        elif rec["latency_ns"]:
            lat = rec["latency_ns"]
            result = f"p50 {_fmt_ns(lat['p50'])}  p99 {_fmt_ns(lat['p99'])}"
        elif rec["throughput"]:
            result = f"{_fmt_rate(rec['throughput']['msgs_per_s'])} msg/s"
        elif rec["doorbells_per_msg"] is not None:
            result = f"{rec['doorbells_per_msg']:.4f} doorbells per message"
        else:
            result = "done"
        total = time.monotonic() - self._started
        self.progress(f"[{total:5.1f}s] {' '.join(what.split())}: {result}")

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> List[Dict[str, Any]]:
        self._started = time.monotonic()
        self.workdir = tempfile.mkdtemp(prefix=f"pyivshmem-bench-{self.run_id}-")
        try:
            for t in self.transports:
                why = t.unavailable()
                if why:
                    self.notes.append(f"{t.label}: skipped, {why}")
                    self.progress(f"skip {t.key}: {why}")
                    continue
                self._run_transport(t)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.records

    def _sizes_for(self, t: Transport) -> Tuple[List[int], List[Tuple[int, str]]]:
        wanted = set()
        if "roundtrip" in self.s.scenarios or "wakeup" in self.s.scenarios:
            wanted.add(self.s.rtt_size)
        if "throughput" in self.s.scenarios:
            wanted.update(self.s.sizes)
        if "mpmc" in self.s.scenarios and t.mpmc:
            wanted.add(self.s.mpmc_size)
        ok, bad = [], []
        for size in sorted(wanted):
            why = t.size_problem(size)
            if why:
                bad.append((size, why))
            else:
                ok.append(size)
        return ok, bad

    def _run_transport(self, t: Transport) -> None:
        sizes, bad = self._sizes_for(t)
        bad_sizes = dict(bad)
        pair = _Session(self, t, ["a", "b"], self.pair_cpus, sizes)
        try:
            if "roundtrip" in self.s.scenarios:
                self._roundtrip(t, pair, bad_sizes)
            if "throughput" in self.s.scenarios:
                for size in self.s.sizes:
                    self._throughput(t, pair, size, bad_sizes)
            if "wakeup" in self.s.scenarios:
                self._wakeup(t, pair, bad_sizes)
        finally:
            pair.close()
        if "mpmc" in self.s.scenarios:
            self._mpmc(t, sizes, bad_sizes)
        if "doorbells" in self.s.scenarios and t.is_pyivshmem:
            self._doorbells(t)

    def _skip(self, t: Transport, scenario: str, group: str, note: str, **fields: Any) -> None:
        rec = self._record(t, scenario, group, status="skipped", note=note, **fields)
        self._say(rec)

    def _busy_problem(self) -> Optional[str]:
        if self.placement != "cross":
            return "busy-polling needs the two processes on different CPUs"
        return None

    # round trip ------------------------------------------------------------------------------
    def _roundtrip(self, t: Transport, pair: _Session, bad: Dict[int, str]) -> None:
        size = self.s.rtt_size
        for v in t.roundtrip_variants():
            group = f"roundtrip/{v['group_mode']}/{size}/{self.placement}"
            fields = dict(mode=v["mode"], variant=v["variant"], size=size, rank=v.get("rank"))
            why = v.get("skip") or bad.get(size) or (self._busy_problem() if v["busy"] else None)
            if why:
                self._skip(t, "roundtrip", group, why, **fields)
                continue
            samples = self.s.rtt_samples
            task = {"size": size, "mode": v["mode"], "busy": v["busy"], "samples": samples,
                    "seconds": self.s.rtt_seconds, "warmup": min(1000, max(10, samples // 10))}
            timeout = 60 + 20 * self.s.rtt_seconds
            t0 = time.monotonic()
            try:
                res = pair.run({"a": dict(task, pattern=v.get("client", "rtt-client")),
                                "b": dict(task, pattern=v.get("echo", "rtt-echo"))}, timeout,
                               order=["b", "a"])
            except WorkerFailed as exc:
                rec = self._record(t, "roundtrip", group, status="failed", note=str(exc), **fields)
            else:
                hist = Histogram.from_dict(res["a"]["histogram"])
                rec = self._record(t, "roundtrip", group, latency_ns=_latency(hist),
                                   counters=_counters(res), elapsed_s=time.monotonic() - t0,
                                   **fields)
            self._say(rec)

    # one-way throughput ----------------------------------------------------------------------
    def _calibrated(self, run_once: Callable[[int], Tuple[int, float]],
                    size: int) -> Tuple[int, List[float], int, float]:
        """Trials of ``run_once(count) -> (messages, seconds)``: (count, rates, total msgs, secs)."""
        if self.s.count:
            count = self.s.count
        else:
            probe = max(50, min(2000, (32 << 20) // max(size, 1)))
            msgs, secs = run_once(probe)
            rate = msgs / secs if secs > 0 else 1e6
            count = int(min(50_000_000, max(100, rate * self.s.duration)))
        rates, total, elapsed = [], 0, 0.0
        for _ in range(max(1, self.s.repeat)):
            msgs, secs = run_once(count)
            if msgs <= 0 or secs <= 0:
                raise WorkerFailed(f"too few messages ({count}) to time a trial")
            rates.append(msgs / secs)
            total += msgs
            elapsed += secs
        return count, rates, total, elapsed

    def _throughput(self, t: Transport, pair: _Session, size: int, bad: Dict[int, str]) -> None:
        for v in t.throughput_variants(size, self.s.batch):
            kind = "batch" if v["batch"] > 1 else "single"
            group = f"throughput/{kind}/{size}/{self.placement}"
            fields = dict(method=v["method"], variant=v["variant"], size=size, batch=v["batch"],
                          rank=v.get("rank"),
                          mode=v.get("mode") or ("busy-poll" if v["busy"] else "blocking"))
            why = v.get("skip") or bad.get(size) or (self._busy_problem() if v["busy"] else None)
            if why:
                self._skip(t, "throughput", group, why, **fields)
                continue
            base = {"size": size, "mode": fields["mode"], "busy": v["busy"], "batch": v["batch"]}
            send_p, recv_p = v.get("send", "tput-send"), v.get("recv", "tput-recv")

            def once(count: int, base: Dict[str, Any] = base, send_p: str = send_p,
                     recv_p: str = recv_p, size: int = size) -> Tuple[int, float]:
                timeout = 60 + 10 * self.s.duration + count * size / 50e6
                res = pair.run({"a": dict(base, count=count, pattern=send_p),
                                "b": dict(base, count=count, pattern=recv_p)}, timeout,
                               order=["b", "a"])
                r = res["b"]
                return r["messages"], (r["end_ns"] - r["start_ns"]) / 1e9

            t0 = time.monotonic()
            try:
                count, rates, total, secs = self._calibrated(once, size)
            except WorkerFailed as exc:
                rec = self._record(t, "throughput", group, status="failed", note=str(exc), **fields)
            else:
                rec = self._record(t, "throughput", group, elapsed_s=time.monotonic() - t0,
                                   throughput=_throughput(rates, size, count, total, secs),
                                   **fields)
            self._say(rec)

    # wake-up ---------------------------------------------------------------------------------
    def _wakeup(self, t: Transport, pair: _Session, bad: Dict[int, str]) -> None:
        size = self.s.rtt_size
        for v in t.wakeup_variants():
            group = f"wakeup/{size}/{self.placement}"
            fields = dict(mode=v["mode"], variant=v["variant"], size=size, rank=v.get("rank"))
            why = v.get("skip") or bad.get(size)
            if why:
                self._skip(t, "wakeup", group, why, **fields)
                continue
            task = {"size": size, "mode": v["mode"], "busy": False,
                    "count": self.s.wake_samples, "gap": self.s.wake_gap}
            timeout = 60 + 3 * self.s.wake_samples * (self.s.wake_gap + 0.001)
            t0 = time.monotonic()
            try:
                res = pair.run({"a": dict(task, pattern=v.get("send", "wake-send")),
                                "b": dict(task, pattern=v.get("recv", "wake-recv"))}, timeout,
                               order=["b", "a"])
            except WorkerFailed as exc:
                rec = self._record(t, "wakeup", group, status="failed", note=str(exc), **fields)
            else:
                hist = Histogram.from_dict(res["b"]["histogram"])
                rec = self._record(t, "wakeup", group, latency_ns=_latency(hist),
                                   counters=_counters(res), elapsed_s=time.monotonic() - t0,
                                   **fields)
            self._say(rec)

    # MPMC ------------------------------------------------------------------------------------
    def _mpmc(self, t: Transport, sizes: Sequence[int], bad: Dict[int, str]) -> None:
        np_, nc = self.s.mpmc_producers, self.s.mpmc_consumers
        size = self.s.mpmc_size
        group = f"mpmc/{np_}x{nc}/{size}"
        v = t.mpmc_variant()
        fields = dict(method="send/recv", variant=v["variant"], size=size, producers=np_,
                      consumers=nc, rank=v.get("rank"), mode="blocking")
        if not t.mpmc:
            self._skip(t, "mpmc", group, "not a multi-producer/multi-consumer queue", **fields)
            return
        why = v.get("skip") or bad.get(size)
        if why:
            self._skip(t, "mpmc", group, why, **fields)
            return
        roles = [f"p{i}" for i in range(np_)] + [f"c{i}" for i in range(nc)]
        two = self.pair_cpus
        cpus = [two[0]] * np_ + [two[1]] * nc
        session = _Session(self, t, roles, cpus, sizes)
        consumers = [r for r in roles if r[0] == "c"]
        base = {"size": size, "mode": "blocking", "busy": v["busy"], "producers": np_,
                "consumers": nc}

        def once(count: int) -> Tuple[int, float]:
            per = max(1, count // np_)
            tasks = {r: dict(base, count=per, pattern="mpmc-produce" if r[0] == "p" else
                             "mpmc-consume") for r in roles}
            res = session.run(tasks, 60 + 20 * self.s.duration, order=consumers +
                              [r for r in roles if r[0] == "p"])
            got = sum(res[r]["messages"] for r in consumers)
            if got != per * np_:
                raise WorkerFailed(f"consumers took {got} messages, producers sent {per * np_}")
            start = min(res[r]["start_ns"] for r in roles if r[0] == "p")
            end = max(res[r]["end_ns"] for r in consumers)
            return got, (end - start) / 1e9

        t0 = time.monotonic()
        try:
            count, rates, total, secs = self._calibrated(once, size)
        except WorkerFailed as exc:
            rec = self._record(t, "mpmc", group, status="failed", note=str(exc), **fields)
        else:
            rec = self._record(t, "mpmc", group, elapsed_s=time.monotonic() - t0,
                               throughput=_throughput(rates, size, count, total, secs), **fields)
        finally:
            session.close()
        rec["cpus"] = sorted({c for c in cpus if c is not None})
        self._say(rec)

    # doorbells -------------------------------------------------------------------------------
    def _doorbells(self, t: Transport) -> None:
        """Channel counters over a stream (should ring almost never) and over ping-pongs."""
        from .scenarios import channel_problem

        size = self.s.rtt_size
        why = channel_problem() or self._busy_problem()
        runs = [
            ("streaming", "adaptive", "Channel send/recv, one-way stream"),
            ("ping-pong", "adaptive", "Channel: spin 100 us, then doorbell"),
            ("ping-pong", "blocking", "Channel: no spin, doorbell"),
        ]
        pair: Optional[_Session] = None
        try:
            for kind, mode, variant in runs:
                group = f"doorbells/{kind}/{mode}/{size}"
                fields = dict(mode=mode, method=kind, variant=variant, size=size, rank=0)
                if why:
                    self._skip(t, "doorbells", group, why, **fields)
                    continue
                if pair is None:
                    pair = _Session(self, t, ["a", "b"], self.pair_cpus, [size])
                task = {"size": size, "mode": mode, "busy": False, "batch": 1}
                if kind == "streaming":
                    count = self.s.count or int(min(5e6, max(2e4, 2e6 * self.s.duration)))
                    tasks = {"a": dict(task, count=count, pattern="tput-send"),
                             "b": dict(task, count=count, pattern="tput-recv")}
                else:
                    n = min(self.s.rtt_samples, 20_000)
                    task.update(samples=n, seconds=self.s.rtt_seconds, warmup=min(100, n))
                    tasks = {"a": dict(task, pattern="rtt-client"), "b": dict(task, pattern="rtt-echo")}
                t0 = time.monotonic()
                try:
                    res = pair.run(tasks, 60 + 20 * max(self.s.duration, self.s.rtt_seconds),
                                   order=["b", "a"])
                except WorkerFailed as exc:
                    rec = self._record(t, "doorbells", group, status="failed", note=str(exc), **fields)
                else:
                    counters = _counters(res) or {}
                    sent = counters.get("a_sent", 0) + counters.get("b_sent", 0)
                    bells = counters.get("a_doorbells", 0) + counters.get("b_doorbells", 0)
                    if sent <= 0:
                        rec = self._record(t, "doorbells", group, status="failed",
                                           note="the Channel counted no messages", **fields)
                    else:
                        rec = self._record(t, "doorbells", group, doorbells_per_msg=bells / sent,
                                           counters=counters, elapsed_s=time.monotonic() - t0,
                                           **fields)
                self._say(rec)
        finally:
            if pair is not None:
                pair.close()


def _counters(res: Dict[str, Dict[str, Any]]) -> Optional[Dict[str, int]]:
    """The endpoints' counters of a pair run, prefixed by role ("a_doorbells", ...), or None."""
    out: Dict[str, int] = {}
    for role in ("a", "b"):
        for k, v in (res.get(role, {}).get("counters") or {}).items():
            out[f"{role}_{k}"] = v
    return out or None


def _latency(hist: Histogram) -> Dict[str, Any]:
    out = hist.summary()
    out["histogram"] = hist.to_dict()
    return out


def _throughput(rates: List[float], size: int, count: int, total: int, secs: float) -> Dict[str, Any]:
    summary = summarize_rates(rates)
    return {
        "msgs_per_s": summary["median"],
        "bytes_per_s": summary["median"] * size,
        "min_msgs_per_s": summary["min"],
        "max_msgs_per_s": summary["max"],
        "trials": summary["trials"],
        "messages_per_trial": count,
        "messages": total,
        "seconds": secs,
    }
