"""The order in which `pyivshmem bench` runs trials, and the spread flag, without processes.

The runner's one seam, ``Runner.open_session``, is replaced by fake sessions that answer each
task at once with figures chosen by the test, so these tests depend on no timing: they check
which trial ran when, how trials become a record, and when a record is flagged.
"""
from __future__ import annotations

import json

import pytest

from pyivshmem import bench
from pyivshmem.bench import report
from pyivshmem.bench.peers import Transport
from pyivshmem.bench.runner import Runner, Settings
from pyivshmem.bench.stats import Histogram, spread
from pyivshmem.bench.workers import WorkerFailed


class Fake(Transport):
    """A transport that never starts a process (the fake sessions answer for it)."""

    batch = False

    def __init__(self, key, is_pyivshmem=False, mpmc=False):
        self.key = key
        self.label = f"transport {key}"
        self.is_pyivshmem = is_pyivshmem
        self.mpmc = mpmc

    def roundtrip_variants(self):
        out = super().roundtrip_variants()
        if self.is_pyivshmem:
            for v in out:
                v["rank"] = 0
        return out

    def throughput_variants(self, size, batch):
        out = super().throughput_variants(size, batch)
        if self.is_pyivshmem:
            for v in out:
                v["rank"] = 0
        return out

    def wakeup_variants(self):
        out = super().wakeup_variants()
        if self.is_pyivshmem:
            for v in out:
                v["rank"] = 0
        return out

    def mpmc_variant(self):
        return {"variant": "send/recv", "busy": False, "rank": 0 if self.is_pyivshmem else None}


def _hist(value, n=10):
    h = Histogram()
    h.record(value, n)
    return h.to_dict()


class FakeSession:
    """Answers every task at once: latency ``value`` ns, or ``value`` messages per second."""

    def __init__(self, runner, t, roles):
        self.runner, self.t, self.roles = runner, t, list(roles)
        self.closed = False

    def run(self, tasks, timeout, order=None):
        assert not self.closed, f"a closed session of {self.t.key} was used"
        first = tasks[self.roles[0]]
        kind = {"rtt-client": "roundtrip", "tput-send": "throughput", "wake-send": "wakeup",
                "mpmc-produce": "mpmc"}[first["pattern"]]
        runner = self.runner
        runner.runs.append((self.t.key, kind, first.get("mode"), first.get("count")))
        n = runner.counts.get((self.t.key, kind), 0)
        runner.counts[(self.t.key, kind)] = n + 1
        fail = runner.fail_at.get((self.t.key, kind))
        if fail is not None and n == fail:
            raise WorkerFailed(f"{self.t.key} failed on purpose")
        value = runner.value(self.t.key, kind, n)
        if kind == "roundtrip":
            return {"a": {"histogram": _hist(value)}, "b": {"echoed": 10}}
        if kind == "wakeup":  # send and arrival times, which the runner pairs
            sent = [1_000_000 * i for i in range(10)]
            return {"a": {"sent_ns": sent}, "b": {"arrived_ns": [s + value for s in sent]}}
        count = first["count"]
        if kind == "throughput":
            return {"a": {}, "b": {"messages": count, "start_ns": 0,
                                   "end_ns": int(count / value * 1e9)}}
        out = {r: {"messages": tasks[r]["count"], "start_ns": 0, "end_ns": 0}
               for r in self.roles if r[0] == "p"}
        per_consumer = tasks["p0"]["count"] * len(out) // (len(self.roles) - len(out))
        out.update({r: {"messages": per_consumer, "start_ns": 0,
                        "end_ns": int(tasks["p0"]["count"] * len(out) / value * 1e9)}
                    for r in self.roles if r[0] == "c"})
        return out

    def start(self, tasks, timeout, order=None):
        """The first half of run(): the task is noted now (with its turn FIFOs), and answered
        by finish()."""
        self.runner.started.append((self.t.key, tasks["a"]["pattern"], tasks["a"].get("turn_in"),
                                    tasks["a"].get("turn_out"), tasks["a"].get("mode")))
        self.pending = (tasks, timeout, order)

    def finish(self):
        tasks, timeout, order = self.pending
        self.runner.finished.append(self.t.key)
        res = self.run(tasks, timeout, order)
        if self.t.key in self.runner.lose_turns:
            res["a"]["turns_lost"] = True
        return res

    def close(self):
        self.closed = True


class FakeRunner(Runner):
    def __init__(self, settings, transports, value, fail_at=None):
        super().__init__(settings, transports)
        self.value = value          # (transport key, scenario, call number) -> figure
        self.fail_at = fail_at or {}
        self.runs = []              # (transport key, scenario, mode, count) in the order run
        self.counts = {}
        self.sessions = []
        self.started = []           # (key, sender pattern, turn_in, turn_out, mode) by start()
        self.finished = []          # keys, in the order finish() answered
        self.lose_turns = set()     # keys whose sender reports that its turns stopped coming

    def open_session(self, t, roles, cpus, sizes):
        s = FakeSession(self, t, roles)
        self.sessions.append(s)
        return s


def _settings(**kw):
    s = Settings(repeat=3, cpus=(0, 1), sizes=(64,), scenarios=("roundtrip", "throughput", "wakeup"),
                 count=1000, wake_samples=9, rtt_samples=30)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def _const(value):
    return lambda key, kind, n: value


def test_trials_of_a_figure_are_interleaved_across_transports():
    ts = [Fake("A", is_pyivshmem=True), Fake("B"), Fake("C")]
    runner = FakeRunner(_settings(), ts, _const(1000))
    records = runner.run()
    # every figure: A B C, A B C, A B C
    groups = list(dict.fromkeys(g for g, *_ in runner.trial_log))
    assert groups == ["roundtrip/busy-poll/64/cross", "roundtrip/blocking/64/cross",
                      "throughput/single/64/cross", "wakeup/64/cross"]
    for g in groups:
        order = [(key, i) for grp, key, _variant, i in runner.trial_log if grp == g]
        assert order == [(k, i) for i in range(3) for k in "ABC"], g
    # ... and the sessions really ran in that order (not only the log)
    blocking = [key for key, kind, mode, _ in runner.runs if kind == "roundtrip" and mode == "blocking"]
    assert blocking == list("ABC" * 3)
    # each record's trials carry their positions in the run: A's come before B's in each round
    by = {(r["scenario"], r["mode"], r["transport"]): r for r in records}
    seq = {k: by[("roundtrip", "blocking", k)]["spread"]["seq"] for k in "ABC"}
    first = seq["A"][0]
    assert seq == {k: [first + j + 3 * i for i in range(3)] for j, k in enumerate("ABC")}
    # trials are numbered from 1 across the whole run
    all_seq = sorted(n for r in records if r["spread"] for n in r["spread"]["seq"])
    assert all_seq == list(range(1, len(runner.trial_log) + 1))
    # one pair of workers per transport for the whole run, closed at the end
    assert sorted(s.t.key for s in runner.sessions) == ["A", "B", "C"]
    assert all(s.closed for s in runner.sessions)


def test_records_are_made_from_all_trials():
    ts = [Fake("A", is_pyivshmem=True), Fake("B")]
    trials = {"A": [1000, 1100, 900], "B": [2e6, 3e6, 1e6]}

    def value(key, kind, n):  # n counts each transport's calls of one scenario
        if kind == "throughput":
            return trials["B"][n % 3]
        return trials["A"][n % 3]

    runner = FakeRunner(_settings(scenarios=("roundtrip", "throughput")), ts, value)
    records = runner.run()
    rt = [r for r in records if r["scenario"] == "roundtrip" and r["mode"] == "busy-poll"]
    a = next(r for r in rt if r["transport"] == "A")
    assert a["spread"]["metric"] == "p50"
    assert a["latency_ns"]["count"] == 30  # every trial's samples (10 each)
    assert a["spread"]["values"] == [float(v) for v in trials["A"][:3]]
    tp = {r["transport"]: r for r in records if r["scenario"] == "throughput"}
    assert tp["B"]["throughput"]["trials"] == pytest.approx([2e6, 3e6, 1e6], rel=1e-5)
    assert tp["B"]["throughput"]["msgs_per_s"] == pytest.approx(2e6, rel=1e-5)  # the median
    assert tp["B"]["throughput"]["messages"] == 3000  # --count 1000 per trial
    assert tp["B"]["spread"]["metric"] == "msgs_per_s"
    assert tp["B"]["spread"]["spread"] == pytest.approx(1.0, rel=1e-5)  # (3e6 - 1e6) / 2e6


def test_spread_flag_follows_the_limit():
    ts = [Fake("A", is_pyivshmem=True), Fake("B")]
    # B's blocking round trips disagree by 50% of their median; A's not at all
    b_trials = [1000, 1500, 1000]

    def value(key, kind, n):  # B's calls: 3 busy-poll trials, then 3 blocking ones
        if key == "B" and kind == "roundtrip":
            return b_trials[n - 3] if n >= 3 else 2000
        return 1000

    for limit, flagged in ((0.2, True), (0.6, False)):
        runner = FakeRunner(_settings(scenarios=("roundtrip",), max_spread=limit), ts, value)
        recs = runner.run()
        b = next(r for r in recs if r["transport"] == "B" and r["mode"] == "blocking")
        a = next(r for r in recs if r["transport"] == "A" and r["mode"] == "blocking")
        assert b["spread"]["values"] == [1000.0, 1500.0, 1000.0]
        assert b["spread"]["spread"] == pytest.approx(0.5)
        assert b["spread"]["limit"] == limit
        assert b["spread"]["flagged"] is flagged
        assert a["spread"]["spread"] == 0 and a["spread"]["flagged"] is False
        doc = report.build_document(recs, runner.s.as_dict(), runner.notes, ["pyivshmem", "bench"],
                                    [0, 1], 1.0)
        report.validate(json.loads(json.dumps(doc)))
        head = next(h for h in doc["headlines"] if h["figure"].startswith("round trip, blocking"))
        assert head["best_peer"] == "transport B" and head["spread_flagged"] is flagged
        text = report.format_report(doc)
        md = report.format_markdown(doc)
        assert f"! = above {limit * 100:.0f}% (--max-spread)" in text
        assert "3 trials, interleaved across transports" in text
        if flagged:
            assert "50%!" in text and "(trials disagree: uncertain)" in text
            assert any(n.startswith("1 of 4 figures (in 1 of 2 groups) have trials that "
                                    "disagree by more than 20%") for n in doc["notes"])
            assert "| 50%! |" in md and "(!)" in md
        else:
            assert "50%!" not in text and " 50% " in text and "uncertain" not in text
            assert not any("disagree" in n for n in doc["notes"])


def test_a_transport_failing_mid_figure_is_dropped_and_the_others_go_on():
    ts = [Fake("A", is_pyivshmem=True), Fake("B"), Fake("C")]
    # C's second round trip call (the busy-poll figure's trial 2) fails
    runner = FakeRunner(_settings(scenarios=("roundtrip",)), ts, _const(1000),
                        fail_at={("C", "roundtrip"): 1})
    recs = runner.run()
    g = "roundtrip/busy-poll/64/cross"
    order = [(key, i) for grp, key, _v, i in runner.trial_log if grp == g]
    assert order == [("A", 0), ("B", 0), ("C", 0), ("A", 1), ("B", 1), ("C", 1), ("A", 2), ("B", 2)]
    c = next(r for r in recs if r["transport"] == "C" and r["mode"] == "busy-poll")
    assert c["status"] == "failed" and "failed on purpose" in c["note"] and "trial 2 of 3" in c["note"]
    assert c["spread"] is None
    # the next figure runs C again
    c2 = next(r for r in recs if r["transport"] == "C" and r["mode"] == "blocking")
    assert c2["status"] == "ok" and len(c2["spread"]["values"]) == 3


def test_throughput_calibration_runs_before_the_trials():
    ts = [Fake("A", is_pyivshmem=True), Fake("B")]
    runner = FakeRunner(_settings(scenarios=("throughput",), count=None, duration=0.5), ts,
                        _const(4000.0))
    recs = runner.run()
    counts = [(key, count) for key, kind, _m, count in runner.runs]
    # one calibration run each, then A B A B A B with the calibrated count (rate x duration)
    assert [k for k, _ in counts] == ["A", "B"] + ["A", "B"] * 3
    assert all(c == 2000 for _, c in counts[2:])
    assert all(r["throughput"]["messages_per_trial"] == 2000 for r in recs)


def test_slow_transports_still_get_enough_messages_per_trial():
    slow = Fake("S")
    slow.batch = True  # send_many/recv_many: a batched receiver's first batch is not timed
    runner = FakeRunner(_settings(scenarios=("throughput",), count=None, duration=0.5, batch=32),
                        [slow], _const(10.0))
    recs = runner.run()
    per = {r["batch"]: r["throughput"]["messages_per_trial"] for r in recs}
    assert per == {1: 20, 32: 96}


def test_mpmc_figure_is_interleaved_and_its_sessions_closed():
    ts = [Fake("A", is_pyivshmem=True, mpmc=True), Fake("B", mpmc=True), Fake("C")]
    runner = FakeRunner(_settings(scenarios=("mpmc",), mpmc_producers=2, mpmc_consumers=2), ts,
                        _const(1e6))
    recs = runner.run()
    assert [k for k, kind, _m, _c in runner.runs if kind == "mpmc"] == list("AB" * 3)
    by = {r["transport"]: r for r in recs}
    assert by["C"]["status"] == "skipped"
    assert by["A"]["status"] == by["B"]["status"] == "ok"
    assert by["B"]["ratio"] is None  # ratios are set when the document is built
    assert all(s.closed for s in runner.sessions)
    assert {tuple(s.roles) for s in runner.sessions} == {("p0", "p1", "c0", "c1")}


def test_one_trial_has_no_spread_and_is_never_flagged():
    runner = FakeRunner(_settings(scenarios=("roundtrip",), repeat=1, max_spread=0.0001),
                        [Fake("A", is_pyivshmem=True)], _const(1000))
    recs = runner.run()
    assert all(r["spread"]["spread"] is None and not r["spread"]["flagged"] for r in recs)
    assert spread([5.0]) is None and spread([]) is None
    assert spread([1.0, 3.0, 2.0]) == pytest.approx(1.0)
    assert spread([0.0, 0.0]) is None


def test_validate_checks_spread_and_accepts_documents_without_it():
    runner = FakeRunner(_settings(scenarios=("roundtrip",)), [Fake("A", is_pyivshmem=True),
                                                               Fake("B")], _const(1000))
    recs = runner.run()
    doc = json.loads(json.dumps(report.build_document(recs, runner.s.as_dict(), [], ["x"], [0, 1],
                                                      1.0)))
    report.validate(doc)
    bad = json.loads(json.dumps(doc))
    bad["records"][0]["spread"]["seq"].pop()
    with pytest.raises(ValueError, match="sequence numbers"):
        report.validate(bad)
    bad = json.loads(json.dumps(doc))
    bad["records"][0]["spread"]["flagged"] = "no"
    with pytest.raises(ValueError, match=r"spread\.flagged"):
        report.validate(bad)
    old = json.loads(json.dumps(doc))  # a version-1 document from before the field existed
    for r in old["records"]:
        del r["spread"]
    for h in old["headlines"]:
        del h["spread_flagged"]
    report.validate(old)
    assert "transport B" in report.format_report(old) and report.format_markdown(old)


@pytest.mark.parametrize("arg, value", [("5", 0.05), ("12.5%", 0.125), ("100", 1.0)])
def test_cli_max_spread_is_a_percentage(arg, value, monkeypatch, capsys):
    seen = {}

    class Stop(Exception):
        pass

    def fake_run(self):
        seen["max_spread"] = self.s.max_spread
        raise Stop

    monkeypatch.setattr(Runner, "run", fake_run)
    with pytest.raises(Stop):
        bench.main(["--quick", "--peers", "none", "--quiet", "--max-spread", arg])
    assert seen["max_spread"] == pytest.approx(value)


@pytest.mark.parametrize("arg", ["0", "-3", "lots"])
def test_cli_rejects_bad_max_spread(arg, capsys):
    assert bench.main(["--max-spread", arg]) == 2
    assert "--max-spread" in capsys.readouterr().err


class TwoVariants(Fake):
    """A transport with pyivshmem's two wake-up variants (they share its workers)."""

    def wakeup_variants(self):
        return [{"mode": "blocking", "variant": "no spin", "rank": 0},
                {"mode": "adaptive", "variant": "spin", "rank": 1}]


def test_wakeup_senders_take_turns_in_rounds_of_one_variant_per_transport():
    ts = [TwoVariants("A", is_pyivshmem=True), Fake("B"), Fake("C")]
    runner = FakeRunner(_settings(scenarios=("wakeup",)), ts, _const(1000))
    recs = runner.run()
    # per trial: round 1 = A's first variant with B and C, started together, then collected;
    # round 2 = A's second variant alone (no partner left: no turns)
    assert [(k, m) for k, _p, _i, _o, m in runner.started] == \
        [("A", "blocking"), ("B", "blocking"), ("C", "blocking"), ("A", "adaptive")] * 3
    assert runner.finished == ["A", "B", "C", "A"] * 3
    for t in range(3):
        rnd = runner.started[4 * t:4 * t + 3]
        ins = [i for _k, _p, i, _o, _m in rnd]
        outs = [o for _k, _p, _i, o, _m in rnd]
        assert all(ins) and len(set(ins)) == 3
        assert outs == ins[1:] + ins[:1]  # a ring: each hands its turn to the next
        assert runner.started[4 * t + 3][2] is None  # alone: no FIFOs
    wake = {(r["transport"], r["mode"]): r for r in recs if r["scenario"] == "wakeup"}
    assert wake[("A", "blocking")]["samples_alternated"] is True
    assert wake[("B", "blocking")]["samples_alternated"] is True
    assert wake[("A", "adaptive")]["samples_alternated"] is False
    assert [r["latency_ns"]["count"] for r in wake.values()] == [30] * 4
    doc = report.build_document(recs, runner.s.as_dict(), runner.notes, ["pyivshmem", "bench"],
                                [0, 1], 1.0)
    report.validate(json.loads(json.dumps(doc)))
    assert "wake-ups alternating one by one" in report.format_report(doc)


def test_a_wakeup_sender_that_lost_its_turns_is_not_called_alternated():
    ts = [Fake("A", is_pyivshmem=True), Fake("B")]
    runner = FakeRunner(_settings(scenarios=("wakeup",)), ts, _const(1000))
    runner.lose_turns = {"B"}
    recs = runner.run()
    alt = {r["transport"]: r["samples_alternated"] for r in recs if r["scenario"] == "wakeup"}
    assert alt == {"A": True, "B": False}


def test_a_wakeup_transport_failing_to_start_is_dropped_and_the_others_go_on():
    ts = [Fake("A", is_pyivshmem=True), Fake("B"), Fake("C")]
    runner = FakeRunner(_settings(scenarios=("wakeup",)), ts, _const(1000),
                        fail_at={("B", "wakeup"): 1})
    recs = runner.run()
    by = {r["transport"]: r for r in recs if r["scenario"] == "wakeup"}
    assert by["B"]["status"] == "failed" and "trial 2 of 3" in by["B"]["note"]
    assert by["A"]["status"] == by["C"]["status"] == "ok"
    assert len(by["A"]["spread"]["values"]) == 3
    # trial 3 is A and C alone together: a ring of two
    last = runner.started[-2:]
    assert [k for k, *_ in last] == ["A", "C"] and last[0][3] == last[1][2]


def test_one_call_and_batched_throughput_of_a_size_interleave_with_each_other():
    """README compares batches with one call per message: their trials alternate too, and each
    record keeps its own group."""
    a, b = Fake("A", is_pyivshmem=True), Fake("B")
    a.batch = b.batch = True
    runner = FakeRunner(_settings(scenarios=("throughput",)), [a, b], _const(1000.0))
    recs = runner.run()
    order = [(grp.split("/")[1], key, i) for grp, key, _v, i in runner.trial_log]
    assert order == [(kind, key, i) for i in range(3) for key in "AB"
                     for kind in ("single", "batch")]
    groups = {(r["transport"], r["batch"]): r["group"] for r in recs}
    assert groups == {("A", 1): "throughput/single/64/cross", ("A", 32): "throughput/batch/64/cross",
                      ("B", 1): "throughput/single/64/cross", ("B", 32): "throughput/batch/64/cross"}


class TokenSession(FakeSession):
    """A wake-up sender that really passes its turn: finish() hands one token on to its
    ``turn_out`` and waits (5 s at most) for one on its ``turn_in``, noting whether it came."""

    def start(self, tasks, timeout, order=None):
        if self.t.key in self.runner.fail_start:
            raise WorkerFailed(f"{self.t.key} failed to start on purpose")
        super().start(tasks, timeout, order)

    def finish(self):
        import os
        import select

        task = self.pending[0]["a"]
        if task.get("turn_out"):
            fd_out = os.open(task["turn_out"], os.O_RDWR)
            fd_in = os.open(task["turn_in"], os.O_RDWR)
            try:
                os.write(fd_out, b".")
                got = bool(select.select([fd_in], [], [], 5.0)[0])
                if got:
                    os.read(fd_in, 1)
                self.runner.turn_came[self.t.key] = got
            finally:
                os.close(fd_out)
                os.close(fd_in)
        return super().finish()


def test_a_turn_handed_to_a_transport_that_failed_to_start_reaches_the_next():
    """B's sender failed to start: nobody reads its FIFO.  A turn handed to B must still reach
    C (the runner passes it on for B), or C and A would wait TURN_TIMEOUT and then lose their
    turns for the rest of the trial."""
    ts = [Fake("A", is_pyivshmem=True), Fake("B"), Fake("C")]
    runner = FakeRunner(_settings(scenarios=("wakeup",), repeat=1), ts, _const(1000))
    runner.fail_start = {"B"}
    runner.turn_came = {}
    runner.open_session = lambda t, roles, cpus, sizes: TokenSession(runner, t, roles)
    recs = runner.run()
    by = {r["transport"]: r for r in recs if r["scenario"] == "wakeup"}
    assert by["B"]["status"] == "failed"
    # A's turn went to B's FIFO and on to C; C's back to A (with the runner's first turn)
    assert runner.turn_came == {"A": True, "C": True}


class MarkerSession(FakeSession):
    """Notes whether the runner had marked its ring of turns as started, at start and finish."""

    def _marked(self, tasks):
        import os

        from pyivshmem.bench.workers import TURNS_STARTED

        turn_in = tasks["a"].get("turn_in")
        return turn_in and os.path.exists(os.path.join(os.path.dirname(turn_in), TURNS_STARTED))

    def start(self, tasks, timeout, order=None):
        self.runner.marks.append(("start", self.t.key, self._marked(tasks)))
        super().start(tasks, timeout, order)

    def finish(self):
        self.runner.marks.append(("finish", self.t.key, self._marked(self.pending[0])))
        return super().finish()


def test_a_ring_of_turns_is_marked_started_after_every_sender_started():
    """Senders count the wait for a turn only once the runner says that all have started."""
    ts = [Fake("A", is_pyivshmem=True), Fake("B")]
    runner = FakeRunner(_settings(scenarios=("wakeup",), repeat=1), ts, _const(1000))
    runner.marks = []
    runner.open_session = lambda t, roles, cpus, sizes: MarkerSession(runner, t, roles)
    runner.run()
    assert runner.marks == [("start", "A", False), ("start", "B", False),
                            ("finish", "A", True), ("finish", "B", True)]
