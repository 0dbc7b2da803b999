"""What a benchmark run measures, in which order, and how each measurement becomes a record.

One :class:`Runner` walks the figures (a figure is a group of records compared with each other:
one scenario, mode, size and placement) and runs every transport's trials of a figure interleaved:
trial 1 of pyivshmem's variants and of each peer, then trial 2 of each, and so on.  Wake-up
figures go further: within a trial the transports' senders take turns (a token passed through
FIFOs), so their wake-ups alternate one by one, as bench/c/chan_wake alternates its samples; a
transport's own variants share its workers, so they take part in successive rounds.  Each transport
keeps a group of spawned worker processes (see workers.py) for the whole run.  Each measured figure
becomes one record (a plain dict, the JSON schema of report.py) with the spread of its trials; a
scenario that cannot run becomes a record with ``status`` "skipped" or "failed" and a note saying
why, and the run goes on.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .peers import Transport
from .report import fmt_ns, fmt_rate
from .stats import Histogram, spread, summarize_rates
from .workers import TURNS_STARTED, WorkerFailed, WorkerGroup, usable_cpus, wake_latencies

__all__ = ["Settings", "Runner", "SCENARIOS"]

SCENARIOS = ("roundtrip", "throughput", "mpmc", "wakeup", "doorbells")


@dataclass
class Settings:
    """Everything that shapes a run; recorded in the JSON document as it was used."""

    quick: bool = False
    scenarios: Tuple[str, ...] = SCENARIOS
    sizes: Tuple[int, ...] = (64, 4096, 1 << 20)
    rtt_size: int = 64
    rtt_samples: int = 200_000       # most round trips timed per figure, all trials together
    rtt_seconds: float = 1.0         # ... or until this much time has passed (all trials)
    duration: float = 0.5            # target seconds of one throughput trial
    repeat: int = 5                  # trials per figure, interleaved across transports
    max_spread: float = 0.20         # flag a figure whose trials disagree more: (max-min)/median
    count: Optional[int] = None      # fixed messages per trial instead of calibrating
    batch: int = 32                  # messages per batch call
    mpmc_producers: int = 2
    mpmc_consumers: int = 2
    mpmc_size: int = 64
    wake_samples: int = 500          # wake-ups timed per figure, all trials together
    wake_gap: float = 0.002          # seconds the receiver is left asleep before each message
    placement: str = "cross"         # "cross": CPUs differ; "same": both on one CPU
    cpus: Tuple[int, ...] = ()       # empty: the first two CPUs this process may use
    topology: str = "host"

    @classmethod
    def preset(cls, quick: bool) -> "Settings":
        if quick:
            return cls(quick=True, rtt_samples=50_000, rtt_seconds=0.25, duration=0.06, repeat=3,
                       wake_samples=60, wake_gap=0.002)
        return cls()

    def as_dict(self) -> Dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out


Progress = Callable[[str], None]


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
        self.start(tasks, timeout, order)
        return self.finish()

    def start(self, tasks: Dict[str, Dict[str, Any]], timeout: float,
              order: Optional[Sequence[str]] = None) -> None:
        """run() in two halves (WorkerGroup.start/finish): several sessions at once."""
        if self.group is None:
            try:
                self.state = self.transport.setup(
                    self.runner.ctx, f"{self.runner.run_id}-{self.runner.next_serial()}",
                    self.sizes, self.runner.workdir,
                )
            except Exception as exc:  # this transport's figures fail, the run goes on
                raise WorkerFailed(f"{self.transport.key}: setup failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
            try:
                self.group = WorkerGroup(self.transport, self.state, self.roles, self.cpus,
                                         self.runner.ctx)
            except BaseException:
                self._teardown()
                raise
        try:
            self.group.start(tasks, timeout, order)
        except BaseException:
            self.close()
            raise

    def finish(self) -> Dict[str, Dict[str, Any]]:
        assert self.group is not None, "finish() without start()"
        try:
            return self.group.finish()
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


class _Entry:
    """One transport's variant in one figure: its trials, interleaved with the others', and the
    record they make.

    ``trial(i)`` runs trial ``i`` and returns its result (a dict with at least ``value``, the
    trial's figure: p50 in ns or messages/s); ``prepare()`` runs once before the first trial
    (throughput calibration); ``finish(results)`` turns the results into the record's fields.
    """

    def __init__(self, t: Transport, scenario: str, group: str, fields: Dict[str, Any],
                 skip: Optional[str] = None) -> None:
        self.t, self.scenario, self.group, self.fields = t, scenario, group, fields
        self.note: Optional[str] = skip
        self.status = "skipped" if skip else "ok"
        self.prepare: Optional[Callable[[], None]] = None
        self.trial: Callable[[int], Dict[str, Any]] = lambda i: {}
        # start(i, turn, n) and collect() instead of trial(i): the trial runs alongside n - 1
        # others, its sender taking turns through the FIFOs in ``turn`` (wake-up figures)
        self.start: Optional[Callable[[int, Dict[str, str], int], None]] = None
        self.collect: Optional[Callable[[], Dict[str, Any]]] = None
        self.finish: Callable[[List[Dict[str, Any]]], Dict[str, Any]] = lambda results: {}
        self.metric = ""
        self.results: List[Dict[str, Any]] = []
        self.seq: List[int] = []
        self.elapsed = 0.0

    @property
    def live(self) -> bool:
        return self.status == "ok"

    def fail(self, exc: Exception, when: str) -> None:
        self.status = "failed"
        self.note = f"{exc} ({when})" if when else str(exc)


class Runner:
    """Runs the selected scenarios, figure by figure, every transport's trials interleaved.

    A figure is a group of records compared with each other (one scenario, mode, size and
    placement): trial 1 of every transport's variant in the group, then trial 2 of each, and so
    on (A B C A B C ...), so a change of the machine's speed during the run hits every transport
    alike instead of showing up as a ratio.  Each record says how much its own trials disagree
    (``spread``) and is flagged when they disagree more than ``settings.max_spread``.

    Every transport keeps its worker processes for the whole run (idle ones wait on their
    control pipe); :meth:`open_session` is where they are made, and the one seam tests replace
    to run the scheduling without processes.
    """

    def __init__(self, settings: Settings, transports: Sequence[Transport],
                 progress: Optional[Progress] = None) -> None:
        self.s = settings
        self.transports = list(transports)
        self.progress = progress or (lambda text: None)
        self.ctx = multiprocessing.get_context("spawn")
        self.run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.records: List[Dict[str, Any]] = []
        self.notes: List[str] = []
        # (group, transport key, variant, trial index) of every trial, in the order they ran
        self.trial_log: List[Tuple[str, str, str, int]] = []
        self._serial = 0        # names of transport set-ups
        self._trials_run = 0    # trials, across all figures: a record's spread["seq"]
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
        self._pairs: Dict[str, Any] = {}
        self._live: List[Transport] = []

    def next_serial(self) -> int:
        self._serial += 1
        return self._serial

    @property
    def trials(self) -> int:
        return max(1, int(self.s.repeat))

    # -- sessions (the seam tests replace) ---------------------------------------------------
    def open_session(self, t: Transport, roles: Sequence[str], cpus: Sequence[Optional[int]],
                     sizes: Sequence[int]) -> Any:
        """An object with ``run(tasks, timeout, order) -> results by role`` and ``close()``."""
        return _Session(self, t, roles, cpus, sizes)

    def _pair(self, t: Transport) -> Any:
        pair = self._pairs.get(t.key)
        if pair is None:
            pair = self.open_session(t, ["a", "b"], self.pair_cpus, self._sizes_for(t)[0])
            self._pairs[t.key] = pair
        return pair

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
            "spread": None,
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
            result = f"p50 {fmt_ns(lat['p50'])}  p99 {fmt_ns(lat['p99'])}"
        elif rec["throughput"]:
            result = f"{fmt_rate(rec['throughput']['msgs_per_s'])} msg/s"
        elif rec["doorbells_per_msg"] is not None:
            result = f"{rec['doorbells_per_msg']:.4f} doorbells per message"
        else:
            result = "done"
        sp = rec.get("spread")
        if sp and sp.get("spread") is not None:
            result += f"  spread {sp['spread'] * 100:.0f}%{' (!)' if sp['flagged'] else ''}"
        total = time.monotonic() - self._started
        self.progress(f"[{total:5.1f}s] {' '.join(what.split())}: {result}")

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> List[Dict[str, Any]]:
        self._started = time.monotonic()
        self.workdir = tempfile.mkdtemp(prefix=f"pyivshmem-bench-{self.run_id}-")
        self._live = []
        for t in self.transports:
            why = t.unavailable()
            if why:
                self.notes.append(f"{t.label}: skipped, {why}")
                self.progress(f"skip {t.key}: {why}")
            else:
                self._live.append(t)
        try:
            sc = self.s.scenarios
            if "roundtrip" in sc:
                self._figures(self._roundtrip_entries())
            if "throughput" in sc:
                for size in self.s.sizes:
                    self._figures(self._throughput_entries(size),
                                  together=f"throughput/{size}/{self.placement}")
            if "wakeup" in sc:
                self._figures(self._wakeup_entries())
            self._close_pairs()
            if "mpmc" in sc:
                self._mpmc()
            if "doorbells" in sc:
                for t in self._live:
                    if t.is_pyivshmem:
                        self._doorbells(t)
        finally:
            self._close_pairs()
            shutil.rmtree(self.workdir, ignore_errors=True)
        measured = [r for r in self.records if (r.get("spread") or {}).get("spread") is not None]
        flagged = [r for r in measured if r["spread"]["flagged"]]
        if flagged:
            groups = list(dict.fromkeys(r["group"] for r in flagged))
            self.notes.append(
                f"{len(flagged)} of {len(measured)} figures (in {len(groups)} of "
                f"{len({r['group'] for r in measured})} groups) have trials that disagree by more "
                f"than {self.s.max_spread * 100:.0f}% ((max - min) / median; --max-spread), marked "
                "! in the tables: the machine's speed changed during the run, so those figures and "
                "their ratios are uncertain (rerun on a quieter machine, or with more --repeat)")
        return self.records

    def _close_pairs(self) -> None:
        pairs, self._pairs = self._pairs, {}
        for pair in pairs.values():
            pair.close()

    def _sizes_for(self, t: Transport) -> Tuple[List[int], List[Tuple[int, str]]]:
        wanted = set()
        if "roundtrip" in self.s.scenarios or "wakeup" in self.s.scenarios:
            wanted.add(self.s.rtt_size)
        if "throughput" in self.s.scenarios:
            wanted.update(self.s.sizes)
        if "mpmc" in self.s.scenarios and t.mpmc:
            wanted.add(self.s.mpmc_size)
        if "doorbells" in self.s.scenarios and t.is_pyivshmem:
            wanted.add(self.s.rtt_size)
        ok, bad = [], []
        for size in sorted(wanted):
            try:
                why = t.size_problem(size)
            except Exception as exc:  # a peer's package failing here fails that peer, not the run
                why = f"{t.key} failed: {type(exc).__name__}: {exc}"
            if why:
                bad.append((size, why))
            else:
                ok.append(size)
        return ok, bad

    def _busy_problem(self) -> Optional[str]:
        if self.placement != "cross":
            return "busy-polling needs the two processes on different CPUs"
        return None

    def _split(self, total: int, i: int) -> int:
        """Trial ``i``'s share of ``total`` samples (the shares add up to ``total``)."""
        n = self.trials
        return total // n + (1 if i < total % n else 0)

    # -- figures -----------------------------------------------------------------------------
    def _figures(self, entries: List[_Entry], together: Optional[str] = None) -> None:
        """Group entries into figures (by group, in order of appearance) and run each; with
        ``together`` (a name for the progress lines), interleave the trials of all of them,
        each record keeping its own group (throughput: one call per message against batches of
        the same size, which README compares)."""
        if together is not None:
            self._figure(together, entries)
            return
        groups: Dict[str, List[_Entry]] = {}
        for e in entries:
            groups.setdefault(e.group, []).append(e)
        for group, members in groups.items():
            self._figure(group, members)

    def _figure(self, group: str, entries: List[_Entry]) -> None:
        """Every live entry's trials, interleaved: trial 0 of each, then trial 1 of each, ..."""
        live = [e for e in entries if e.live]
        if live:
            self.progress(f"{group}: {len(live)} transport variant(s) x {self.trials} trial(s), "
                          "interleaved")
        for e in live:
            if e.prepare is not None:
                t0 = time.monotonic()
                try:
                    e.prepare()
                except WorkerFailed as exc:
                    e.fail(exc, "calibration")
                e.elapsed += time.monotonic() - t0
        for i in range(self.trials):
            if live and all(e.start is not None for e in live):
                for members in _rounds([e for e in live if e.live]):
                    self._in_turns(members, i)
                continue
            for e in live:
                if not e.live:
                    continue
                self._finish_trial(e, i, self._log_trial(e, i), time.monotonic(),
                                   lambda e=e: e.trial(i))
        for e in entries:
            if e.status != "ok":
                rec = self._record(e.t, e.scenario, e.group, status=e.status, note=e.note,
                                   **e.fields)
            else:
                fields = e.finish(e.results)
                rec = self._record(e.t, e.scenario, e.group, elapsed_s=e.elapsed, **fields,
                                   **e.fields)
                rec["spread"] = self._spread(e)
            self._say(rec)

    def _log_trial(self, e: _Entry, i: int) -> int:
        """Note that trial ``i`` of ``e`` runs now; its number in the whole run."""
        self._trials_run += 1
        self.trial_log.append((e.group, e.t.key, e.fields.get("variant", ""), i))
        return self._trials_run

    def _finish_trial(self, e: _Entry, i: int, seq: int, t0: float,
                      result: Callable[[], Dict[str, Any]]) -> None:
        """Trial ``i`` of ``e`` (number ``seq`` in the run, begun at ``t0``) ends with
        ``result()``: kept with its number, or the entry fails."""
        try:
            res = result()
        except WorkerFailed as exc:
            e.fail(exc, self._when(i))
        else:
            e.results.append(res)
            e.seq.append(seq)
        e.elapsed += time.monotonic() - t0

    def _when(self, i: int) -> str:
        return f"trial {i + 1} of {self.trials}" if self.trials > 1 else ""

    def _in_turns(self, members: List[_Entry], i: int) -> None:
        """Trial ``i`` of every member at once, their senders taking turns: a ring of FIFOs,
        member k waiting on FIFO k and handing on to FIFO k + 1.  This process holds every FIFO
        open meanwhile (so a token is never lost to a FIFO nobody has open yet) and puts the
        first token in."""
        tmp = tempfile.mkdtemp(prefix="pyivshmem-turns-")
        fds: List[int] = []
        started: List[Tuple[_Entry, int, float]] = []
        relay: Optional[_Relay] = None
        n = len(members)
        try:
            paths = [os.path.join(tmp, f"turn{k}") for k in range(n)] if n > 1 else []
            for path in paths:
                os.mkfifo(path, 0o600)
                fds.append(os.open(path, os.O_RDWR | os.O_CLOEXEC))
            for k, e in enumerate(members):
                turn = {"turn_in": paths[k], "turn_out": paths[(k + 1) % n]} if paths else {}
                seq = self._log_trial(e, i)
                t0 = time.monotonic()
                try:
                    assert e.start is not None
                    e.start(i, turn, n)
                except WorkerFailed as exc:
                    e.fail(exc, self._when(i))
                    e.elapsed += time.monotonic() - t0
                else:
                    started.append((e, seq, t0))
            failed = [k for k, e in enumerate(members) if not any(e is s[0] for s in started)]
            if fds and started and failed:
                # nobody reads a failed member's FIFO: pass its turns on for it, or every turn
                # handed to it would be lost and the others would wait TURN_TIMEOUT, then go alone
                relay = _Relay([(fds[k], fds[(k + 1) % n]) for k in failed])
            if fds:
                # every sender has started: their wait for a turn counts from now on
                open(os.path.join(tmp, TURNS_STARTED), "w").close()
            if fds and started:
                os.write(fds[members.index(started[0][0])], b".")  # the first turn
            for e, seq, t0 in started:
                assert e.collect is not None
                self._finish_trial(e, i, seq, t0, e.collect)
        finally:
            if relay is not None:
                relay.stop()
            for fd in fds:
                os.close(fd)
            shutil.rmtree(tmp, ignore_errors=True)

    def _spread(self, e: _Entry) -> Dict[str, Any]:
        values = [float(r["value"]) for r in e.results]
        sp = spread(values)
        return {"metric": e.metric, "values": values, "seq": list(e.seq), "spread": sp,
                "limit": self.s.max_spread,
                "flagged": sp is not None and sp > self.s.max_spread}

    # round trip ------------------------------------------------------------------------------
    def _roundtrip_entries(self) -> List[_Entry]:
        size = self.s.rtt_size
        out = []
        for t in self._live:
            bad = dict(self._sizes_for(t)[1])
            for v in t.roundtrip_variants():
                group = f"roundtrip/{v['group_mode']}/{size}/{self.placement}"
                fields = dict(mode=v["mode"], variant=v["variant"], size=size, rank=v.get("rank"))
                why = v.get("skip") or bad.get(size) or (self._busy_problem() if v["busy"] else None)
                e = _Entry(t, "roundtrip", group, fields, why)
                e.metric = "p50"
                e.trial = self._rtt_trial(t, v, size)
                e.finish = _latency_finish
                out.append(e)
        return out

    def _rtt_trial(self, t: Transport, v: Dict[str, Any], size: int) -> Callable[[int], Dict[str, Any]]:
        def trial(i: int) -> Dict[str, Any]:
            samples = max(1, self._split(self.s.rtt_samples, i))
            seconds = self.s.rtt_seconds / self.trials
            # a full warm-up before the first trial; later ones only re-warm what the other
            # transports' trials in between may have evicted
            warm = min(1000 if i == 0 else 200, max(10, samples // 10))
            task = {"size": size, "mode": v["mode"], "busy": v["busy"], "samples": samples,
                    "seconds": seconds, "warmup": warm}
            res = self._pair(t).run(
                {"a": dict(task, pattern=v.get("client", "rtt-client")),
                 "b": dict(task, pattern=v.get("echo", "rtt-echo"))},
                60 + 20 * seconds, order=["b", "a"])
            return _latency_trial(res, "a")
        return trial

    # one-way throughput ----------------------------------------------------------------------
    def _count_for(self, rate: float, batch: int = 1) -> int:
        """Messages for a trial of about ``duration`` seconds at ``rate``: at least 20, and at
        least three batches (a batched receiver's first batch is not timed)."""
        return int(min(50_000_000, max(20, 3 * batch, rate * self.s.duration)))

    def _throughput_entries(self, size: int) -> List[_Entry]:
        out = []
        for t in self._live:
            bad = dict(self._sizes_for(t)[1])
            for v in t.throughput_variants(size, self.s.batch):
                kind = "batch" if v["batch"] > 1 else "single"
                group = f"throughput/{kind}/{size}/{self.placement}"
                fields = dict(method=v["method"], variant=v["variant"], size=size, batch=v["batch"],
                              rank=v.get("rank"),
                              mode=v.get("mode") or ("busy-poll" if v["busy"] else "blocking"))
                why = v.get("skip") or bad.get(size) or (self._busy_problem() if v["busy"] else None)
                e = _Entry(t, "throughput", group, fields, why)
                self._tput_entry(e, t, v, size, fields["mode"])
                out.append(e)
        return out

    def _tput_entry(self, e: _Entry, t: Transport, v: Dict[str, Any], size: int, mode: str) -> None:
        base = {"size": size, "mode": mode, "busy": v["busy"], "batch": v["batch"]}
        send_p, recv_p = v.get("send", "tput-send"), v.get("recv", "tput-recv")

        def once(count: int) -> Tuple[int, float]:
            timeout = 60 + 10 * self.s.duration + count * size / 50e6
            res = self._pair(t).run({"a": dict(base, count=count, pattern=send_p),
                                     "b": dict(base, count=count, pattern=recv_p)}, timeout,
                                    order=["b", "a"])
            r = res["b"]
            return r["messages"], (r["end_ns"] - r["start_ns"]) / 1e9

        self._calibrated_entry(e, once, size, v["batch"])

    def _calibrated_entry(self, e: _Entry, once: Callable[[int], Tuple[int, float]],
                          size: int, batch: int = 1) -> None:
        """Throughput trials: a calibration run first (unless --count), then timed trials."""
        state: Dict[str, int] = {"count": self.s.count or 0}

        def prepare() -> None:
            probe = max(50, min(2000, (32 << 20) // max(size, 1)))
            msgs, secs = once(probe)
            state["count"] = self._count_for(msgs / secs if secs > 0 and msgs > 0 else 1e6, batch)

        def trial(i: int) -> Dict[str, Any]:
            msgs, secs = once(state["count"])
            if msgs <= 0 or secs <= 0:
                raise WorkerFailed(f"too few messages ({state['count']}) to time a trial")
            return {"value": msgs / secs, "messages": msgs, "seconds": secs}

        def finish(results: List[Dict[str, Any]]) -> Dict[str, Any]:
            rates = [r["value"] for r in results]
            total = sum(r["messages"] for r in results)
            secs = sum(r["seconds"] for r in results)
            return {"throughput": _throughput(rates, size, state["count"], total, secs)}

        e.metric = "msgs_per_s"
        e.prepare = None if self.s.count else prepare
        e.trial = trial
        e.finish = finish

    # wake-up ---------------------------------------------------------------------------------
    def _wakeup_entries(self) -> List[_Entry]:
        size = self.s.rtt_size
        out = []
        for t in self._live:
            bad = dict(self._sizes_for(t)[1])
            for v in t.wakeup_variants():
                group = f"wakeup/{size}/{self.placement}"
                fields = dict(mode=v["mode"], variant=v["variant"], size=size, rank=v.get("rank"))
                e = _Entry(t, "wakeup", group, fields, v.get("skip") or bad.get(size))
                e.metric = "p50"
                self._wake_trial(e, t, v, size)
                out.append(e)
        return out

    def _wake_trial(self, e: _Entry, t: Transport, v: Dict[str, Any], size: int) -> None:
        """Trial i of a wake-up figure: the sender (a) sleeps ``wake_gap`` before each timed
        message, the receiver (b) is asleep in a blocking receive and records the latency."""
        def tasks(i: int, turn: Dict[str, str], n: int) -> Tuple[Dict[str, Any], float]:
            count = max(1, self._split(self.s.wake_samples, i))
            task = {"size": size, "mode": v["mode"], "busy": False, "count": count,
                    "gap": self.s.wake_gap}
            return ({"a": dict(task, pattern=v.get("send", "wake-send"), **turn),
                     "b": dict(task, pattern=v.get("recv", "wake-recv"))},
                    60 + 3 * n * count * (self.s.wake_gap + 0.001))

        alongside = [1]

        def start(i: int, turn: Dict[str, str], n: int) -> None:
            work, timeout = tasks(i, turn, n)
            alongside[0] = n
            self._pair(t).start(work, timeout, order=["b", "a"])

        def collect() -> Dict[str, Any]:
            res = self._pair(t).finish()
            if "arrived_ns" in res["b"]:  # send and arrival times, paired here (workers.wake_send)
                try:
                    hist = wake_latencies(res["a"].get("sent_ns") or [], res["b"]["arrived_ns"])
                except ValueError as exc:
                    raise WorkerFailed(str(exc)) from None
                out = _latency_of(hist, res)
            else:  # a histogram made by the receiver (the C reference)
                out = _latency_trial(res, "b")
            out["in_turns"] = alongside[0] > 1 and not res["a"].get("turns_lost")
            return out

        e.start, e.collect = start, collect
        e.finish = _wake_finish

    # MPMC ------------------------------------------------------------------------------------
    def _mpmc(self) -> None:
        np_, nc = self.s.mpmc_producers, self.s.mpmc_consumers
        size = self.s.mpmc_size
        group = f"mpmc/{np_}x{nc}/{size}"
        roles = [f"p{i}" for i in range(np_)] + [f"c{i}" for i in range(nc)]
        consumers = [r for r in roles if r[0] == "c"]
        two = self.pair_cpus
        cpus = [two[0]] * np_ + [two[1]] * nc
        entries: List[_Entry] = []
        sessions: Dict[str, Any] = {}
        for t in self._live:
            v = t.mpmc_variant()
            fields = dict(method="send/recv", variant=v["variant"], size=size, producers=np_,
                          consumers=nc, rank=v.get("rank"), mode="blocking",
                          cpus=sorted({c for c in cpus if c is not None}))
            if not t.mpmc:
                entries.append(_Entry(t, "mpmc", group, fields,
                                      "not a multi-producer/multi-consumer queue"))
                continue
            e = _Entry(t, "mpmc", group, fields, v.get("skip") or dict(self._sizes_for(t)[1]).get(size))
            base = {"size": size, "mode": "blocking", "busy": v["busy"], "producers": np_,
                    "consumers": nc}

            def once(count: int, t: Transport = t, base: Dict[str, Any] = base) -> Tuple[int, float]:
                session = sessions.get(t.key)
                if session is None:
                    session = sessions[t.key] = self.open_session(t, roles, cpus,
                                                                  self._sizes_for(t)[0])
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

            self._calibrated_entry(e, once, size)
            entries.append(e)
        try:
            self._figure(group, entries)
        finally:
            for session in sessions.values():
                session.close()

    # doorbells -------------------------------------------------------------------------------
    def _doorbells(self, t: Transport) -> None:
        """Channel counters over a stream (should ring almost never) and over ping-pongs.

        pyivshmem only (no peer has doorbells to count): one run each, nothing to interleave."""
        from .scenarios import channel_problem

        size = self.s.rtt_size
        why = channel_problem() or self._busy_problem()
        runs = [
            ("streaming", "adaptive", "Channel send/recv, one-way stream"),
            ("ping-pong", "adaptive", "Channel: spin 100 us, then doorbell"),
            ("ping-pong", "blocking", "Channel: no spin, doorbell"),
        ]
        pair: Any = None
        try:
            for kind, mode, variant in runs:
                group = f"doorbells/{kind}/{mode}/{size}"
                fields = dict(mode=mode, method=kind, variant=variant, size=size, rank=0)
                if why:
                    self._say(self._record(t, "doorbells", group, status="skipped", note=why,
                                           **fields))
                    continue
                if pair is None:
                    pair = self.open_session(t, ["a", "b"], self.pair_cpus, [size])
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


class _Relay:
    """Pass turns on for the members of a ring of FIFOs whose sender never started: a thread
    that copies every token arriving on one of ``pairs``' first fds to its second."""

    def __init__(self, pairs: List[Tuple[int, int]]) -> None:
        self.pairs = dict(pairs)
        for fd in self.pairs:
            os.set_blocking(fd, False)  # never stuck in a read that another reader won
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-turn-relay", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import select

        while not self.done.is_set():
            for fd in select.select(list(self.pairs), [], [], 0.05)[0]:
                try:
                    token = os.read(fd, 64)
                    os.write(self.pairs[fd], token)
                except BlockingIOError:
                    pass

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def _rounds(entries: List[_Entry]) -> List[List[_Entry]]:
    """Entries to run at once, round after round: at most one variant per transport in a round
    (a transport's variants share its workers), each in the first round without its transport."""
    rounds: List[List[_Entry]] = []
    for e in entries:
        for r in rounds:
            if all(o.t.key != e.t.key for o in r):
                r.append(e)
                break
        else:
            rounds.append([e])
    return rounds


def _latency_trial(res: Dict[str, Dict[str, Any]], role: str) -> Dict[str, Any]:
    return _latency_of(Histogram.from_dict(res[role]["histogram"]), res)


def _latency_of(hist: Histogram, res: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """A latency trial's result from its samples and its pair run (for the counters)."""
    if not hist.count:
        raise WorkerFailed("a trial timed no samples")
    return {"value": hist.value_at_percentile(50), "histogram": hist, "counters": _counters(res)}


def _latency_finish(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One latency figure from its trials: every sample of every trial, counters added up."""
    hist = Histogram()
    counters: Dict[str, int] = {}
    for r in results:
        hist.merge(r["histogram"])
        for k, v in (r["counters"] or {}).items():
            counters[k] = counters.get(k, 0) + v
    return {"latency_ns": _latency(hist), "counters": counters or None}


def _wake_finish(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A wake-up figure: a latency figure that also says whether its samples alternated one by
    one with the other transports' in every trial (False: some trial ran alone, or lost its
    turns because another transport's sender failed)."""
    out = _latency_finish(results)
    out["samples_alternated"] = all(r.get("in_turns") for r in results)
    return out


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
