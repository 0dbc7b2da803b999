"""Tests of the benchmark harness itself: statistics, schema, report, plots, orchestration.

None of these depends on how fast anything runs: statistics are checked on known inputs, the
end-to-end run only on the structure of what it produces.
"""
import copy
import json
import os
import random
import threading
import time

import pytest

from pyivshmem import bench
from pyivshmem.bench import report
from pyivshmem.bench.peers import Endpoint, Transport, _PipeFramer, payload
from pyivshmem.bench.runner import Runner, Settings
from pyivshmem.bench.stats import Histogram, percentile_key, ratio, summarize_rates
from pyivshmem.bench.workers import WorkerFailed, WorkerGroup


# ------------------------------------------------------------------------------------------------
# statistics
def test_histogram_exact_in_linear_range():
    h = Histogram()
    for v in range(1, 101):
        h.record(v)
    s = h.summary()
    assert s == {"count": 100, "min": 1, "p50": 50, "p99": 99, "p99_9": 100, "max": 100,
                 "mean": 50.5}


def test_nearest_rank_definition():
    h = Histogram()
    h.record_many(range(1, 1001))
    assert h.value_at_percentile(50) == 500
    assert h.value_at_percentile(99) == 990
    assert h.value_at_percentile(99.9) == 999
    assert h.value_at_percentile(100) == 1000
    assert h.value_at_percentile(0.1) == 1
    # rank is ceil(p * n / 100): 10 samples, p50 -> 5th, p51 -> 6th
    h10 = Histogram()
    h10.record_many([10, 20, 30, 40, 50, 60, 70, 80, 90, 100])
    assert h10.value_at_percentile(50) == 50
    assert h10.value_at_percentile(51) == 60
    assert h10.value_at_percentile(99.9) == 100


def test_histogram_known_large_values():
    h = Histogram(sub_bits=10)
    # 997 fast samples, 2 slow ones, 1 very slow one.  25_007 is the middle of its 32-wide
    # bucket [24_992, 25_024), so the percentile that lands on it is exact.
    h.record(700, 997)
    h.record(25_007, 2)
    h.record(3_000_000)
    assert h.count == 1000
    assert h.value_at_percentile(50) == 700
    assert h.value_at_percentile(99) == 700
    assert h.value_at_percentile(99.8) == 25_007
    assert h.value_at_percentile(99.9) == 25_007
    assert h.value_at_percentile(100) == 3_000_000
    assert h.max == 3_000_000 and h.min == 700  # always exact
    assert h.total == 700 * 997 + 2 * 25_007 + 3_000_000
    # a value off its bucket's middle is reported as the middle, within half a bucket of it
    low, high = Histogram(sub_bits=10).bucket_bounds(Histogram(sub_bits=10).index_of(25_000))
    assert (low, high) == (24_992, 25_024)
    for v in range(low, high):
        h2 = Histogram(sub_bits=10)
        h2.record_many([100, v, v, 26_000])  # p50 lands on v; min and max clamp only the ends
        got = h2.value_at_percentile(50)
        assert got == 25_007, (v, got)
        assert abs(got - v) <= (high - low) // 2, (v, got)


def test_single_repeated_large_value_is_exact():
    h = Histogram()
    h.record(123_457, 50)
    # the bucket is wide, but clamping to the exact min/max makes every percentile exact
    for p in (50, 99, 99.9, 100):
        assert h.value_at_percentile(p) == 123_457


def test_bucket_bounds_are_contiguous_and_invert_index():
    for sub_bits in (2, 4, 10):
        h = Histogram(sub_bits)
        prev_high = 0
        for i in range(6000):
            low, high = h.bucket_bounds(i)
            assert low == prev_high
            assert h.index_of(low) == i and h.index_of(high - 1) == i
            # relative width bounded by 2 / 2**sub_bits above the linear range
            if low >= (1 << sub_bits):
                assert (high - low) / low <= 1 / (1 << (sub_bits - 1))
            prev_high = high


def test_percentiles_within_half_a_bucket_of_exact():
    rng = random.Random(1234)
    values = [int(rng.lognormvariate(8, 1.5)) for _ in range(20_000)]
    h = Histogram()
    h.record_many(values)
    values.sort()
    n = len(values)
    for p in (50, 90, 99, 99.9):
        rank = max(1, -(-(round(p * 1_000_000) * n) // 100_000_000))
        exact = values[rank - 1]
        got = h.value_at_percentile(p)
        assert abs(got - exact) <= max(1, exact / 1024), (p, exact, got)
    assert h.max == values[-1] and h.min == values[0]
    assert h.total == sum(values)


def test_record_many_equals_record_and_merge():
    rng = random.Random(7)
    values = [rng.randrange(0, 10**7) for _ in range(3000)]
    a, b = Histogram(), Histogram()
    a.record_many(values)
    for v in values:
        b.record(v)
    assert a.buckets() == b.buckets() and a.summary() == b.summary()
    left, right = Histogram(), Histogram()
    left.record_many(values[:1000])
    right.record_many(values[1000:])
    left.merge(right)
    assert left.buckets() == a.buckets() and left.summary() == a.summary()
    with pytest.raises(ValueError):
        left.merge(Histogram(sub_bits=8))


def test_histogram_serialisation_round_trip():
    h = Histogram()
    h.record_many([0, 1, 5, 1023, 1024, 1025, 99_999, 10**9])
    d = json.loads(json.dumps(h.to_dict()))
    h2 = Histogram.from_dict(d)
    assert h2.buckets() == h.buckets() and h2.summary() == h.summary()
    bad = copy.deepcopy(d)
    bad["buckets"][-1][1] += 1  # a bucket that does not exist for sub_bits 10
    with pytest.raises(ValueError):
        Histogram.from_dict(bad)
    bad = copy.deepcopy(d)
    bad["count"] += 1
    with pytest.raises(ValueError, match="add up"):
        Histogram.from_dict(bad)


def test_histogram_rejects_bad_input():
    h = Histogram()
    with pytest.raises(ValueError):
        h.record(-1)
    with pytest.raises(ValueError):
        h.value_at_percentile(50)  # empty
    h.record(5)
    for p in (0, -1, 100.5):
        with pytest.raises(ValueError):
            h.value_at_percentile(p)
    with pytest.raises(ValueError):
        Histogram(sub_bits=1)
    assert Histogram().summary()["p50"] is None


def test_rates_and_ratio():
    s = summarize_rates([3.0, 1.0, 2.0])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "trials": [3.0, 1.0, 2.0]}
    assert summarize_rates([1.0, 4.0])["median"] == 2.5
    with pytest.raises(ValueError):
        summarize_rates([])
    assert ratio(10.0, 2.0, higher_is_better=True) == 5.0
    assert ratio(1.0, 4.0, higher_is_better=False) == 4.0
    assert ratio(None, 4.0, True) is None and ratio(1.0, 0.0, True) is None
    assert percentile_key(99.9) == "p99_9" and percentile_key(50.0) == "p50"


# ------------------------------------------------------------------------------------------------
# report: a synthetic document
def _latency(values):
    h = Histogram()
    h.record_many(values)
    out = h.summary()
    out["histogram"] = h.to_dict()
    return out


def _tput(rate, size):
    return {"msgs_per_s": rate, "bytes_per_s": rate * size, "min_msgs_per_s": rate,
            "max_msgs_per_s": rate, "trials": [rate], "messages_per_trial": 1000,
            "messages": 1000, "seconds": 1000 / rate}


def _rec(**kw):
    rec = {
        "scenario": "roundtrip", "group": "roundtrip/busy-poll/64/cross", "transport": "x",
        "label": "X", "is_pyivshmem": False, "variant": "calls", "mode": "busy-poll",
        "method": None, "size": 64, "batch": 1, "placement": "cross", "cpus": [0, 1],
        "producers": 1, "consumers": 1, "rank": None, "status": "ok", "note": None,
        "latency_ns": None, "throughput": None, "doorbells_per_msg": None, "counters": None,
        "reference": False,
        "ratio": None, "elapsed_s": 0.1,
    }
    rec.update(kw)
    return rec


def _records():
    g_tp = "throughput/single/64/cross"
    return [
        _rec(transport="pyivshmem", label="pyivshmem", is_pyivshmem=True, rank=0,
             variant="try_send/try_recv", latency_ns=_latency([500] * 90 + [900] * 10)),
        _rec(transport="pyivshmem", label="pyivshmem", is_pyivshmem=True, rank=1, mode="adaptive",
             variant="send/recv", latency_ns=_latency([400] * 100)),  # rank 1: not the reference
        _rec(transport="os-pipe", label="os.pipe", latency_ns=_latency([2000] * 100)),
        _rec(transport="mp-queue", label="multiprocessing.Queue", latency_ns=_latency([30000] * 100)),
        _rec(transport="zmq-pair", label="pyzmq", status="skipped", note="pyzmq is not installed"),
        _rec(scenario="throughput", group=g_tp, transport="pyivshmem", label="pyivshmem",
             is_pyivshmem=True, rank=0, mode="blocking", method="send/recv",
             throughput=_tput(8e6, 64)),
        _rec(scenario="throughput", group=g_tp, transport="os-pipe", label="os.pipe",
             mode="blocking", method="send/recv", throughput=_tput(1e6, 64)),
        _rec(scenario="throughput", group=g_tp, transport="mp-pipe", label="multiprocessing.Pipe",
             mode="blocking", method="send/recv", throughput=_tput(4e5, 64)),
        _rec(scenario="throughput", group="throughput/single/1048576/cross", transport="posix-mq",
             label="POSIX mq", mode="blocking", method="send/recv", size=1 << 20,
             status="failed", note="message too long"),
    ]


def _doc(records=None):
    return report.build_document(
        records if records is not None else _records(), Settings(quick=True).as_dict(),
        ["a note"], ["pyivshmem", "bench", "--quick"], [0, 1], 12.5,
        created="2026-01-01T00:00:00+00:00")


def test_ratios_and_reference():
    doc = _doc()
    recs = doc["records"]
    ref = [r for r in recs if r["reference"]]
    assert [(r["group"], r["rank"]) for r in ref] == [
        ("roundtrip/busy-poll/64/cross", 0), ("throughput/single/64/cross", 0)]
    by = {(r["scenario"], r["transport"]): r for r in recs if not r["is_pyivshmem"]}
    assert by[("roundtrip", "os-pipe")]["ratio"] == pytest.approx(4.0)     # 2000 / 500
    assert by[("roundtrip", "mp-queue")]["ratio"] == pytest.approx(60.0)
    assert by[("roundtrip", "zmq-pair")]["ratio"] is None                  # skipped
    assert by[("throughput", "os-pipe")]["ratio"] == pytest.approx(8.0)
    assert by[("throughput", "mp-pipe")]["ratio"] == pytest.approx(20.0)
    assert by[("throughput", "posix-mq")]["ratio"] is None                 # no reference there
    # non-reference pyivshmem rows carry no ratio
    assert all(r["ratio"] is None for r in recs if r["is_pyivshmem"])


def test_headlines_pick_best_peer():
    heads = {h["figure"]: h for h in _doc()["headlines"]}
    rt = heads["round trip, busy-poll, p50"]
    assert rt["pyivshmem"] == 500 and rt["best_peer"] == "os.pipe"
    assert rt["best_peer_value"] == 2000 and rt["ratio"] == pytest.approx(4.0)
    assert rt["higher_is_better"] is False and rt["unit"] == "ns"
    tp = heads["throughput, 64 B, one call per message"]
    assert tp["best_peer"] == "os.pipe" and tp["ratio"] == pytest.approx(8.0)
    assert tp["higher_is_better"] is True


def test_validate_accepts_document_and_rejects_damage():
    doc = json.loads(json.dumps(_doc()))
    report.validate(doc)
    damaged = copy.deepcopy(doc)
    del damaged["records"][0]["latency_ns"]["p99_9"]
    with pytest.raises(ValueError, match=r"records\[0\]\.latency_ns: missing field 'p99_9'"):
        report.validate(damaged)
    damaged = copy.deepcopy(doc)
    damaged["schema_version"] = 2
    with pytest.raises(ValueError, match="schema_version"):
        report.validate(damaged)
    damaged = copy.deepcopy(doc)
    damaged["records"][2]["status"] = "great"
    with pytest.raises(ValueError, match="status"):
        report.validate(damaged)
    damaged = copy.deepcopy(doc)
    damaged["records"][4]["note"] = None  # a skipped record must say why
    with pytest.raises(ValueError, match="needs a note"):
        report.validate(damaged)
    damaged = copy.deepcopy(doc)
    damaged["records"][0]["size"] = "64"
    with pytest.raises(ValueError, match="size"):
        report.validate(damaged)


def test_schema_is_stable():
    """Changing these field sets changes what readers of the JSON see: bump SCHEMA_VERSION (and
    docs/bench.md), then update this test."""
    assert report.SCHEMA == "pyivshmem-bench"
    assert report.SCHEMA_VERSION == 1
    assert set(report.TOP_FIELDS) == {
        "schema", "schema_version", "created", "command", "pyivshmem_version", "host",
        "settings", "records", "headlines", "notes", "duration_s"}
    assert set(report.HOST_FIELDS) == {
        "python", "implementation", "platform", "kernel", "cpu_model", "cpu_count",
        "usable_cpus", "packages"}
    assert set(report.RECORD_FIELDS) == {
        "scenario", "group", "transport", "label", "is_pyivshmem", "variant", "mode", "method",
        "size", "batch", "placement", "cpus", "producers", "consumers", "rank", "status", "note",
        "latency_ns", "throughput", "doorbells_per_msg", "counters", "reference", "ratio",
        "elapsed_s"}
    assert set(report.LATENCY_FIELDS) == {
        "count", "min", "p50", "p99", "p99_9", "max", "mean", "histogram"}
    assert set(report.THROUGHPUT_FIELDS) == {
        "msgs_per_s", "bytes_per_s", "min_msgs_per_s", "max_msgs_per_s", "trials",
        "messages_per_trial", "messages", "seconds"}
    assert set(report.HEADLINE_FIELDS) == {
        "figure", "group", "unit", "higher_is_better", "pyivshmem", "best_peer",
        "best_peer_value", "ratio"}
    # added to version 1 later: checked when present, so older documents still validate
    assert set(report.OPTIONAL_RECORD_FIELDS) == {"spread", "samples_alternated"}
    assert set(report.SPREAD_FIELDS) == {"metric", "values", "seq", "spread", "limit", "flagged"}
    assert set(report.OPTIONAL_HEADLINE_FIELDS) == {"spread_flagged"}
    # the documentation names every record field
    doc_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "docs", "bench.md")
    with open(doc_path) as f:
        text = f.read()
    for name in (set(report.RECORD_FIELDS) | set(report.TOP_FIELDS) | set(report.THROUGHPUT_FIELDS)
                 | set(report.OPTIONAL_RECORD_FIELDS) | set(report.SPREAD_FIELDS)
                 | set(report.OPTIONAL_HEADLINE_FIELDS)):
        assert f"`{name}`" in text, f"docs/bench.md does not describe field {name!r}"


def test_write_json_round_trip(tmp_path):
    path = tmp_path / "out.json"
    report.write_json(_doc(), str(path))
    loaded = json.loads(path.read_text())
    report.validate(loaded)
    assert loaded["records"][0]["latency_ns"]["p50"] == 500
    assert not [p for p in os.listdir(tmp_path) if p != "out.json"]  # no temporary left


def test_format_report_shows_figures_ratios_and_notes():
    text = report.format_report(_doc())
    assert "Round trip of a 64 B message" in text
    assert "One-way throughput" in text
    assert "x60.0" in text and "x4.0" in text and "ref" in text
    assert "8M" in text  # pyivshmem throughput
    assert "pyzmq is not installed" in text and "message too long" in text
    assert "a note" in text
    assert "pyivshmem x4" in text  # summary line


def test_markdown_section():
    md = report.format_markdown(_doc(), "plots/pyivshmem_vs_peers.png")
    assert md.startswith("## Results")
    assert "`pyivshmem bench --quick`" in md  # says how it was made
    assert "| figure | pyivshmem | best peer | pyivshmem vs best |" in md
    assert "| round trip, busy-poll, p50 | 0.50 us | os.pipe: 2.00 us | x4 |" in md
    assert "![pyivshmem against the alternatives](plots/pyivshmem_vs_peers.png)" in md


def test_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    paths = report.write_plots(_doc(), str(tmp_path / "plots"))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["latency_distribution.png", "pyivshmem_vs_peers.png", "throughput_by_size.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 5000


def test_plot_without_matplotlib_exits_2(monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    rc = bench.main(["--plot", str(tmp_path), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pip install" in err and "matplotlib" in err
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------------
# command line
@pytest.mark.parametrize("argv, needle", [
    (["--scenarios", "roundtrip,nope"], "unknown scenario nope"),
    (["--peers", "carrier-pigeon"], "unknown peer"),
    (["--sizes", "4"], "at least 8 bytes"),
    (["--mpmc", "2by2"], "PxC"),
    (["--json", "/nonexistent-dir-xyz/out.json"], "does not exist"),
])
def test_cli_rejects_bad_arguments(argv, needle, capsys):
    assert bench.main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("topology", ["host-guest", "guest-guest"])
def test_guest_topology_without_qemu_exits_2_saying_what_to_install(topology, monkeypatch,
                                                                    capsys, tmp_path):
    from pyivshmem.vm import harness as vmh

    monkeypatch.setattr(vmh, "qemu_binary", lambda: None)
    out = tmp_path / "out.json"
    assert bench.main(["--topology", topology, "--quick", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "QEMU" in err and "apt-get install qemu-system-x86 busybox-static cpio kmod" in err
    assert not out.exists()


def _guest_records():
    lat = _latency([90_000] * 50 + [200_000] * 5)
    return [
        _rec(transport="pyivshmem", label="pyivshmem", is_pyivshmem=True, rank=0,
             group="guest/host-guest/roundtrip/blocking/64", placement="host-guest", cpus=[],
             mode="blocking", variant="Channel send/recv, spin=0, MSI-X doorbell: host Peer <-> guest",
             latency_ns=lat, note=report.EMULATED),
        _rec(scenario="throughput", transport="pyivshmem", label="pyivshmem", is_pyivshmem=True,
             rank=0, group="guest/guest-guest/throughput/64/a2b", placement="guest-guest", cpus=[],
             mode="adaptive", method="send/recv", variant="Channel send/recv, guest a -> guest b",
             throughput=_tput(1.5e4, 64), note=report.EMULATED),
    ]


def test_guest_figures_are_reported_apart_and_never_compared(tmp_path):
    doc = _doc(_records() + _guest_records())
    report.validate(json.loads(json.dumps(doc)))
    # the headlines and the host tables are the same as without guest figures
    assert doc["headlines"] == _doc()["headlines"]
    assert not any(h["group"].startswith("guest/") for h in doc["headlines"])
    text = report.format_report(doc)
    host_part, guest_part = text.split("QEMU guests: ")
    assert "host-guest" not in host_part and "guest a -> guest b" not in host_part
    assert guest_part.startswith(
        "functional figures under software emulation (TCG), not speed claims")
    assert "host-guest" in guest_part and "90.0" in guest_part and "15k" in guest_part
    md = report.format_markdown(doc)
    assert "QEMU guests (functional figures under software emulation (TCG), not speed claims)" in md
    assert "| guest-guest | guest a -> guest b | 64 B | 15k/s |" in md


def test_only_guest_figures_table():
    text = report.format_report(_doc(_guest_records()))
    assert "QEMU guests under software emulation (TCG)" in text.splitlines()[1]
    assert "Round trip of a" not in text and "Summary" not in text


def test_guest_figures_are_not_plotted(tmp_path):
    pytest.importorskip("matplotlib")
    assert report.write_plots(_doc(_guest_records()), str(tmp_path / "plots")) == []


def test_guest_plan_shapes():
    """The plan of each topology: phases, rings with their own vectors, a region that holds them."""
    from pyivshmem.bench import guests

    s = Settings(quick=True)
    g = guests.guest_settings(s, {"sizes": [64, 4096, 1 << 20], "count": None, "rtt_samples": 40})
    assert g["sizes"] == [64, 4096] and g["too_big"] == [1 << 20] and g["rtt_samples"] == 40
    hg = guests._Plan("host-guest", s, g, busy_ok=True)
    assert [p["name"] for p in hg.phases] == [
        "rtt-busy-poll", "rtt-blocking", "wake", "stream-64-h2g", "stream-64-g2h",
        "stream-4096-h2g", "stream-4096-g2h"]
    wake = hg.phases[2]
    assert (wake["client"], wake["echo"], wake["mode"]) == ("host", "guest", "blocking")
    assert wake["samples"] == guests.WAKE_SAMPLES[1] and wake["gap"] >= 0.002
    assert sorted(r["vector"] for r in hg.rings.values()) == list(range(hg.vectors))
    need = sum(r["slot"] * r["capacity"] for r in hg.rings.values())
    assert hg.region_size >= 2 * need and hg.region_size & (hg.region_size - 1) == 0
    assert [p[1]["size"] for p in hg.skipped] == [1 << 20]
    gg = guests._Plan("guest-guest", s, g, busy_ok=False)
    assert [p["name"] for p in gg.phases] == ["rtt-blocking", "stream-64-a2b", "stream-4096-a2b"]
    assert {p[2] for p in gg.skipped} >= {"busy-polling needs two CPUs"}
    assert [p[0] for p in gg.skipped if p[1]["name"] == "wake"] == ["wakeup"]
    assert guests._Plan("guest-guest", s, g, busy_ok=True).phases[2]["name"] == "wake"
    only = Settings(quick=True, scenarios=("roundtrip",))
    assert [p["name"] for p in guests._Plan("host-guest", only, g, busy_ok=True).phases] == [
        "rtt-busy-poll", "rtt-blocking"]


def test_guest_loops_in_one_process(tmp_path):
    """vmloops' parts of a plan, host and guest both played by threads of this process, each a
    Peer of one embedded server (eventfd doorbells), as the host is in the real topology."""
    import threading

    from pyivshmem import Peer, Server
    from pyivshmem.bench import guests, vmloops

    s = Settings(quick=True)
    g = guests.guest_settings(s, {"sizes": [64, 200], "count": 300, "rtt_samples": 50,
                                  "wake_samples": 20})
    plan = guests._Plan("host-guest", s, g, busy_ok=True)
    sock = str(tmp_path / "ivshmem.sock")
    with Server(sock, size=plan.region_size, vectors=plan.vectors), \
            Peer.connect(sock, vectors=plan.vectors, timeout=30) as host, \
            Peer.connect(sock, vectors=plan.vectors, timeout=30) as guest:
        for name, r in plan.rings.items():
            host.region.create_ring(name, "spsc", slot_size=r["slot"], capacity=r["capacity"])
        d = plan.as_dict("x")
        d["op_timeout"] = 30.0
        out = {}
        t = threading.Thread(
            target=lambda: out.update(guest=vmloops.run_plan(d, "guest", guest.region, guest)))
        t.start()
        try:
            out["host"] = vmloops.run_plan(d, "host", host.region, host)
        finally:
            t.join(60)
        assert not t.is_alive()
    recs = guests._records_from(plan, out)
    assert all(r["status"] == "ok" for r in recs), [r["note"] for r in recs]
    by = {}
    for r in recs:
        by.setdefault(r["scenario"], []).append(r)
    assert [r["latency_ns"]["count"] for r in by["roundtrip"]] == [50, 50]
    assert [r["throughput"]["messages"] for r in by["throughput"]] == [300] * 4
    (wake,) = by["wakeup"]
    assert wake["latency_ns"]["count"] == 20 and wake["mode"] == "blocking"
    # every wake-up went to a receiver asleep on its doorbell (the waker waited until it was)
    assert "seen waiting before 20 of 20 sends" in wake["note"]
    assert wake["counters"]["b_sleeps"] >= 20 and wake["counters"]["a_doorbells"] == 20
    # one doorbells-per-message record per phase, from both sides' counters
    bells = {r["method"] + "/" + r["mode"]: r for r in by["doorbells"]}
    assert len(by["doorbells"]) == 7
    assert bells["wake-up/blocking"]["doorbells_per_msg"] == pytest.approx(20 / 40)
    assert bells["ping-pong/busy-poll"]["doorbells_per_msg"] == 0
    assert all(0 <= r["doorbells_per_msg"] <= 1 for r in by["doorbells"])
    assert all(r["placement"] == "host-guest" and r["group"].startswith("guest/") for r in recs)
    assert all(report.EMULATED in r["note"] for r in recs)


def test_cli_list(capsys):
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    for key in ("pyivshmem", "mp-queue", "mp-pipe", "unix-seqpacket", "os-pipe", "posix-mq",
                "faster-fifo", "zmq-pair", "iceoryx2"):
        assert key in out
    assert "roundtrip" in out


def test_cli_dispatch_reaches_bench(capsys):
    from pyivshmem import cli

    assert cli.main(["bench", "--list"]) == 0
    assert "transports:" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# a peer's framing, without processes
def test_pipe_framer_round_trips_any_size():
    r, w = os.pipe()
    sizes = [0, 1, 63, 64, 4096, 65535, 65536, 300_000, 8, 1 << 20]
    sender = _PipeFramer(-1, w, 1 << 20)
    receiver = _PipeFramer(r, -1, 1 << 20)
    msgs = [payload(n) for n in sizes]
    t = threading.Thread(target=lambda: [sender.send(m) for m in msgs])
    t.start()
    try:
        got = []
        for i in range(len(msgs)):
            m = receiver.try_recv() if i % 2 else receiver.recv()
            while m is None:
                m = receiver.try_recv()
            got.append(bytes(m))
        assert got == msgs
        assert receiver.try_recv() is None
    finally:
        t.join(30)
        os.close(r)
        os.close(w)


def test_pipe_framer_rejects_oversized_frame():
    r, w = os.pipe()
    try:
        _PipeFramer(-1, w, 1 << 20).send(payload(100))
        with pytest.raises(ValueError, match="exceeds"):
            _PipeFramer(r, -1, 50).recv()
    finally:
        os.close(r)
        os.close(w)


# ------------------------------------------------------------------------------------------------
# orchestration with processes (spawned; transports defined here are importable by the workers)
class BrokenTransport(Transport):
    """Opens fine in the parent, fails in every worker."""

    key = "broken"
    label = "broken transport"

    def open(self, state, role, size, mode):
        raise RuntimeError("this transport is broken on purpose")


class SilentTransport(Transport):
    """Its receive never returns: a task on it can only end by the parent's deadline."""

    key = "silent"
    label = "silent transport"

    def open(self, state, role, size, mode):
        def never():
            while True:
                time.sleep(1)

        return Endpoint(send=lambda m: None, recv=never, try_recv=lambda: None)


def _tiny_settings(**kw):
    s = Settings.preset(True)
    s.count = 200
    s.rtt_samples = 100
    s.rtt_seconds = 0.2
    s.wake_samples = 5
    s.wake_gap = 0.001
    s.sizes = (64, 4096)
    s.mpmc_producers = s.mpmc_consumers = 1
    for k, v in kw.items():
        setattr(s, k, v)
    return s


@pytest.mark.timeout(120)
def test_failing_transport_is_recorded_and_run_goes_on():
    s = _tiny_settings(scenarios=("roundtrip",))
    from pyivshmem.bench.peers import peer_by_key

    runner = Runner(s, [BrokenTransport(), peer_by_key("mp-pipe")])
    records = runner.run()
    broken = [r for r in records if r["transport"] == "broken"]
    assert broken and all(r["status"] == "failed" for r in broken)
    assert all("broken on purpose" in r["note"] for r in broken)
    pipe = [r for r in records if r["transport"] == "mp-pipe"]
    assert pipe and all(r["status"] == "ok" for r in pipe)


@pytest.mark.timeout(120)
def test_worker_group_deadline_kills_workers():
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    t = SilentTransport()
    group = WorkerGroup(t, t.setup(ctx, "x", [64], "/tmp"), ["a", "b"], [None, None], ctx)
    procs = list(group.procs.values())
    task = {"size": 64, "mode": "blocking", "busy": False, "count": 10, "batch": 1}
    with pytest.raises(WorkerFailed, match="did not answer in time"):
        group.run({"a": dict(task, pattern="tput-send"), "b": dict(task, pattern="tput-recv")},
                  timeout=2.0)
    assert group.dead
    assert all(not p.is_alive() for p in procs)


@pytest.mark.timeout(240)
def test_end_to_end_tiny_run(tmp_path, capsys):
    """A --quick-like run with tiny counts: checks what comes out, not how fast it was."""
    out = tmp_path / "r.json"
    plots = tmp_path / "plots"
    argv = ["--quick", "--count", "200", "--rtt-samples", "100", "--rtt-seconds", "0.2",
            "--wake-samples", "5", "--wake-gap", "0.001", "--sizes", "64,4K", "--mpmc", "1x1",
            "--peers", "mp-pipe,os-pipe,mp-queue", "--json", str(out), "--quiet",
            "--markdown", str(tmp_path / "results.md")]
    have_mpl = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        have_mpl = False
    if have_mpl:
        argv += ["--plot", str(plots)]
    rc = bench.main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(out.read_text())
    report.validate(doc)
    recs = doc["records"]
    scen = {r["scenario"] for r in recs}
    assert {"roundtrip", "throughput", "mpmc", "wakeup", "doorbells"} <= scen
    assert {r["transport"] for r in recs} == {"pyivshmem", "mp-pipe", "os-pipe", "mp-queue"}
    ours = {(r["scenario"], r["mode"], r["method"], r["size"]): r for r in recs if r["is_pyivshmem"]}
    for key in [("roundtrip", "busy-poll", None, 64), ("roundtrip", "adaptive", None, 64),
                ("roundtrip", "blocking", None, 64),
                ("throughput", "adaptive", "send/recv", 64),
                ("throughput", "adaptive", "send/recv", 4096),
                ("throughput", "busy-poll", "try_send/try_recv", 64),
                ("throughput", "busy-poll", "batch", 64),
                ("throughput", "busy-poll", "zero-copy", 4096),
                ("mpmc", "blocking", "send/recv", 64), ("wakeup", "blocking", None, 64),
                ("doorbells", "adaptive", "streaming", 64),
                ("doorbells", "blocking", "ping-pong", 64)]:
        assert ours[key]["status"] == "ok", (key, ours[key]["note"])
    # doorbells: counted from both sides' Channel.stats (the numbers themselves depend on timing)
    pp = ours[("doorbells", "blocking", "ping-pong", 64)]
    assert pp["counters"]["a_sent"] > 0 and pp["counters"]["b_sent"] > 0
    assert 0 <= pp["doorbells_per_msg"] <= 2
    assert 0 <= ours[("doorbells", "adaptive", "streaming", 64)]["doorbells_per_msg"] <= 1
    for r in recs:
        if r["status"] == "ok" and r["latency_ns"]:
            assert r["latency_ns"]["count"] > 0
            assert r["latency_ns"]["p50"] <= r["latency_ns"]["p99"] <= r["latency_ns"]["max"]
        if r["status"] == "ok" and r["throughput"]:
            assert r["throughput"]["messages_per_trial"] == 200
            assert r["throughput"]["msgs_per_s"] > 0
        if r["status"] == "ok" and not r["is_pyivshmem"] and r["scenario"] in ("roundtrip", "throughput"):
            assert r["ratio"] is not None and r["ratio"] > 0
    # peers without MPMC support say so
    pipe_mpmc = [r for r in recs if r["transport"] == "mp-pipe" and r["scenario"] == "mpmc"]
    assert pipe_mpmc[0]["status"] == "skipped" and pipe_mpmc[0]["note"]
    # the table went to stdout and names every transport
    for label in ("pyivshmem", "multiprocessing.Pipe", "os.pipe + length prefix"):
        assert label in captured.out
    assert "Round trip" in captured.out and "One-way throughput" in captured.out
    assert (tmp_path / "results.md").read_text().startswith("## Results")
    if have_mpl:
        assert sorted(os.listdir(plots)) == [
            "latency_distribution.png", "pyivshmem_vs_peers.png", "throughput_by_size.png"]
    # nothing left behind in /dev/shm by this run
    run_files = [f for f in os.listdir("/dev/shm") if f.startswith("pyivshmem-bench-")
                 and f.split("-")[2] == str(os.getpid())]
    assert run_files == []


def test_c_eventfd_reference_in_the_same_run(tmp_path, capsys):
    """The bare C eventfd ping-pong is measured beside pyivshmem's blocking figures: it takes part
    in the blocking round trip and the wake-up only, with every sample accounted for."""
    out = tmp_path / "r.json"
    argv = ["--quick", "--scenarios", "roundtrip,wakeup,throughput", "--sizes", "64",
            "--count", "200", "--rtt-samples", "150", "--rtt-seconds", "0.2",
            "--wake-samples", "7", "--wake-gap", "0.001", "--peers", "c-eventfd",
            "--json", str(out), "--quiet"]
    assert bench.main(argv) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    report.validate(doc)
    ref = [r for r in doc["records"] if r["transport"] == "c-eventfd"]
    assert {(r["scenario"], r["mode"]) for r in ref} == {("roundtrip", "blocking"),
                                                         ("wakeup", "blocking")}
    for r in ref:
        assert r["status"] == "ok", r["note"]
        assert r["ratio"] is not None and r["ratio"] > 0
        lat = r["latency_ns"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["max"]
    by = {r["scenario"]: r for r in ref}
    assert by["roundtrip"]["latency_ns"]["count"] == 150      # warm-up round trips not counted
    assert by["wakeup"]["latency_ns"]["count"] == 7
    assert "C: bare eventfd ping-pong" in capsys.readouterr().out


def test_python_eventfd_wakeups_in_the_same_run(tmp_path, capsys):
    """The bare eventfd from Python takes part in the wake-up only, every wake-up answered and
    timed from the send call to the receive's return, as pyivshmem's are."""
    out = tmp_path / "r.json"
    argv = ["--quick", "--scenarios", "roundtrip,wakeup", "--sizes", "64", "--rtt-samples", "50",
            "--rtt-seconds", "0.2", "--wake-samples", "9", "--wake-gap", "0.001",
            "--peers", "py-eventfd", "--json", str(out), "--quiet"]
    assert bench.main(argv) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    report.validate(doc)
    ref = [r for r in doc["records"] if r["transport"] == "py-eventfd"]
    assert [(r["scenario"], r["mode"]) for r in ref] == [("wakeup", "blocking")]
    rec = ref[0]
    assert rec["status"] == "ok", rec["note"]
    assert rec["latency_ns"]["count"] == 9 and rec["ratio"] > 0
    assert rec["samples_alternated"] is True  # in turns with pyivshmem's wake-ups
    assert "Python: bare eventfd ping-pong" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# guests under KVM or TCG: what the figures are called, and the choice on the command line
def test_guest_figures_under_kvm_are_labelled_speed_figures():
    recs = _guest_records()
    for r in recs:
        r["note"] = report.KVM_FIGURES
    doc = _doc(recs)
    doc["settings"]["guest"] = {"accel": "kvm"}
    text = report.format_report(doc)
    assert "QEMU guests under KVM" in text.splitlines()[1]
    assert "QEMU guests: speed figures: guests under KVM (hardware virtualisation)" in text
    assert "not speed claims" not in text
    md = report.format_markdown(doc)
    assert "QEMU guests (speed figures: guests under KVM" in md and "not speed claims" not in md
    # under TCG (or a document that does not say) they stay functional figures
    doc["settings"]["guest"] = {"accel": "tcg"}
    assert "QEMU guests: functional figures under software emulation (TCG), not speed claims" in (
        report.format_report(doc))
    from pyivshmem.bench import guests

    s = Settings(quick=True)
    g = guests.guest_settings(s, {"sizes": [64], "count": 10, "rtt_samples": 10})
    g["accel"] = "kvm"
    assert guests._Plan("host-guest", s, g, busy_ok=True).label == report.KVM_FIGURES


def _fake_guests(monkeypatch, seen):
    from pyivshmem.bench import guests

    monkeypatch.setattr(guests, "check_available", lambda: "image")

    def run_guests(s, guest, image, cpus, progress=None):
        seen.update(guest)
        return [], [f"{s.topology}: QEMU guests under {guest['accel'].upper()}"]

    monkeypatch.setattr(guests, "run_guests", run_guests)


def test_cli_accel_tcg_is_used_and_said(monkeypatch, capsys, tmp_path):
    from pyivshmem.vm import harness as vmh

    monkeypatch.setattr(vmh, "_kvm_verdict", None)
    monkeypatch.setattr(vmh, "probe_kvm", lambda **kw: pytest.fail("--accel tcg must not probe"))
    seen = {}
    _fake_guests(monkeypatch, seen)
    out = tmp_path / "g.json"
    assert bench.main(["--topology", "host-guest", "--accel", "tcg", "--quick", "--json",
                       str(out)]) == 0
    err = capsys.readouterr().err
    assert "QEMU guests run under TCG (software emulation): asked for" in err
    assert seen["accel"] == "tcg" and seen["accel_requested"] == "tcg"
    assert json.loads(out.read_text())["settings"]["guest"]["accel"] == "tcg"


def test_cli_accel_auto_probes_and_says_why(monkeypatch, capsys):
    from pyivshmem.vm import harness as vmh

    monkeypatch.setattr(vmh, "_kvm_verdict", None)
    monkeypatch.delenv("PYIVSHMEM_VM_ACCEL", raising=False)
    monkeypatch.setattr(vmh, "probe_kvm", lambda image=None, timeout=None: (
        False, f"a probe boot under KVM did not reach the guest's init within {timeout:g} s"))
    seen = {}
    _fake_guests(monkeypatch, seen)
    assert bench.main(["--topology", "guest-guest", "--quick", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert ("QEMU guests run under TCG (software emulation): a probe boot under KVM did not "
            "reach the guest's init within") in err
    assert seen["accel"] == "tcg" and "did not reach" in seen["accel_reason"]


def test_cli_accel_kvm_without_kvm_exits_2(monkeypatch, capsys):
    from pyivshmem.vm import harness as vmh

    monkeypatch.setattr(vmh, "kvm_device_problem", lambda path="/dev/kvm": "/dev/kvm does not exist")
    _fake_guests(monkeypatch, {})
    assert bench.main(["--topology", "host-guest", "--accel", "kvm", "--quick"]) == 2
    assert "--accel kvm: KVM was asked for, but /dev/kvm does not exist" in capsys.readouterr().err
    assert bench.main(["--accel", "hvf"]) == 2


def test_guest_wake_and_doorbell_figures_are_tabled():
    recs = _guest_records() + [
        _rec(scenario="wakeup", transport="pyivshmem", label="pyivshmem", is_pyivshmem=True,
             rank=0, group="guest/host-guest/wakeup/64", placement="host-guest", cpus=[],
             mode="blocking", variant="Channel send to the guest asleep in recv",
             latency_ns=_latency([3_000_000] * 20), note=report.EMULATED),
        _rec(scenario="doorbells", transport="pyivshmem", label="pyivshmem", is_pyivshmem=True,
             rank=0, group="guest/host-guest/doorbells/stream-4096-h2g", placement="host-guest",
             cpus=[], mode="adaptive", method="streaming", size=4096,
             variant="Channel send/recv, host -> guest", doorbells_per_msg=0.0075,
             counters={"a_sent": 400, "b_sent": 0, "a_doorbells": 3, "b_sleeps": 3},
             note=report.EMULATED),
    ]
    doc = _doc(_records() + recs)
    report.validate(json.loads(json.dumps(doc)))
    assert doc["headlines"] == _doc()["headlines"]  # still never compared or headlined
    guest_part = report.format_report(doc).split("QEMU guests: ")[1]
    assert "wake-up" in guest_part and "3,000" in guest_part
    assert "streaming" in guest_part and "4 KiB" in guest_part and "0.0075" in guest_part
    md = report.format_markdown(doc)
    assert "| host-guest | streaming | `Channel send/recv, host -> guest` | 4 KiB | 0.0075 | 0.0075 |" in md
