"""`pyivshmem bench --topology host-guest|guest-guest` end to end: the command boots its QEMU
guests, measures, and writes a JSON document whose guest records are ok and count what was asked.
Never asserts a speed. Needs qemu-system-x86_64 (skips otherwise; PYIVSHMEM_REQUIRE_VM=1 fails).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pyivshmem.bench import report

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.timeout(240)]

RTT, COUNT, WAKE = 60, 400, 20


def _bench(tmp_path, topology):
    out = tmp_path / f"{topology}.json"
    cmd = [sys.executable, "-m", "pyivshmem", "bench", "--topology", topology, "--quick",
           "--rtt-samples", str(RTT), "--count", str(COUNT), "--wake-samples", str(WAKE),
           "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=tmp_path)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    doc = json.loads(out.read_text())
    report.validate(doc)
    accel = doc["settings"]["guest"]["accel"]
    assert accel in ("kvm", "tcg")
    # the choice and its reason are printed, and the table labels the figures accordingly
    assert f"QEMU guests run under {'KVM' if accel == 'kvm' else 'TCG'}" in p.stderr
    assert doc["settings"]["guest"]["accel_reason"]
    assert report.guest_label(accel) in p.stdout
    assert doc["headlines"] == []          # guest figures are never headlined
    return doc


def _check(doc, topology, streams):
    recs = doc["records"]
    assert recs and all(r["status"] == "ok" for r in recs), [r["note"] for r in recs]
    label = report.guest_label(doc["settings"]["guest"]["accel"])
    assert all(r["placement"] == topology and r["group"].startswith(f"guest/{topology}/")
               and label in r["note"] for r in recs)
    rtt = {r["mode"]: r for r in recs if r["scenario"] == "roundtrip"}
    busy_ok = len(os.sched_getaffinity(0)) >= 2
    assert set(rtt) == ({"busy-poll", "blocking"} if busy_ok else {"blocking"})
    for r in rtt.values():
        lat = r["latency_ns"]
        assert lat["count"] == RTT and 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"]
        warm = min(100, max(10, RTT // 10))
        assert r["counters"]["a_sent"] == r["counters"]["b_received"] == RTT + warm
    # every blocking receive that slept was ended by a doorbell
    c = rtt["blocking"]["counters"]
    assert c["a_doorbells"] + c["b_doorbells"] >= 1
    assert c["a_wakeups"] == c["a_sleeps"] and c["b_wakeups"] == c["b_sleeps"]
    tp = sorted((r["size"], r["variant"].split(", ")[-1]) for r in recs if r["scenario"] == "throughput")
    assert tp == sorted(streams)
    for r in recs:
        if r["scenario"] == "throughput":
            assert r["throughput"]["messages"] == COUNT and r["throughput"]["msgs_per_s"] > 0
            assert r["counters"]["a_sent"] == r["counters"]["b_received"] == COUNT
    # the wake-up of a sleeping guest: every ping found the receiver waiting and rang it
    if busy_ok:
        (wake,) = [r for r in recs if r["scenario"] == "wakeup"]
        lat, c = wake["latency_ns"], wake["counters"]
        assert lat["count"] == WAKE and 0 < lat["min"] <= lat["p50"] <= lat["max"]
        assert f"seen waiting before {WAKE} of {WAKE} sends" in wake["note"]
        assert c["a_doorbells"] == WAKE and c["b_sleeps"] >= WAKE
    # doorbells per message of every phase, from both sides' counters
    bells = {r["group"].rsplit("/", 1)[-1]: r for r in recs if r["scenario"] == "doorbells"}
    phases = {r["group"] for r in recs if r["scenario"] in ("roundtrip", "wakeup", "throughput")}
    assert len(bells) == len(phases)
    assert all(0 <= r["doorbells_per_msg"] <= 1 for r in bells.values())
    assert bells["rtt-blocking"]["doorbells_per_msg"] > 0  # every blocking receive slept


def test_bench_host_guest(image, tmp_path):
    doc = _bench(tmp_path, "host-guest")
    _check(doc, "host-guest", [(n, d) for n in (64, 4096)
                               for d in ("host -> guest", "guest -> host")])


def test_bench_guest_guest(image, tmp_path):
    doc = _bench(tmp_path, "guest-guest")
    _check(doc, "guest-guest", [(64, "guest a -> guest b"), (4096, "guest a -> guest b")])
