"""Results of a run: the JSON document (versioned schema), ratios, the text table, and plots.

The document (``schema`` "pyivshmem-bench", ``schema_version`` 1) is described field by field in
docs/bench.md and checked by :func:`validate`.  Compatible additions keep the version; renaming or
removing a field, or changing its meaning or unit, bumps it.  Fields added since the first
documents of version 1 (``OPTIONAL_RECORD_FIELDS``, ``OPTIONAL_HEADLINE_FIELDS``) are checked when
present, so older documents still validate.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .stats import Histogram, ratio

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "TOP_FIELDS",
    "RECORD_FIELDS",
    "LATENCY_FIELDS",
    "THROUGHPUT_FIELDS",
    "HEADLINE_FIELDS",
    "OPTIONAL_RECORD_FIELDS",
    "OPTIONAL_HEADLINE_FIELDS",
    "SPREAD_FIELDS",
    "fmt_spread",
    "guest_label",
    "build_document",
    "compute_ratios",
    "headlines",
    "validate",
    "write_json",
    "format_report",
    "format_markdown",
    "write_plots",
    "PlotUnavailable",
    "host_info",
    "is_guest",
    "GUEST_PLACEMENTS",
    "EMULATED",
    "KVM_FIGURES",
]

SCHEMA = "pyivshmem-bench"
SCHEMA_VERSION = 1

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))

# field -> accepted JSON types (as Python types after json.load)
TOP_FIELDS: Dict[str, tuple] = {
    "schema": (str,),
    "schema_version": (int,),
    "created": (str,),
    "command": (list,),
    "pyivshmem_version": (str,),
    "host": (dict,),
    "settings": (dict,),
    "records": (list,),
    "headlines": (list,),
    "notes": (list,),
    "duration_s": _NUM,
}
HOST_FIELDS: Dict[str, tuple] = {
    "python": (str,),
    "implementation": (str,),
    "platform": (str,),
    "kernel": (str,),
    "cpu_model": (str,),
    "cpu_count": (int,),
    "usable_cpus": (list,),
    "packages": (dict,),
}
RECORD_FIELDS: Dict[str, tuple] = {
    "scenario": (str,),            # roundtrip | throughput | mpmc | wakeup | doorbells
    "group": (str,),               # records compared with each other share a group
    "transport": (str,),           # stable key: pyivshmem, mp-queue, os-pipe, ...
    "label": (str,),               # human name
    "is_pyivshmem": (bool,),
    "variant": (str,),             # the calls used
    "mode": _OPT_STR,              # busy-poll | blocking | adaptive | streaming | ping-pong
    "method": _OPT_STR,            # send/recv | try_send/try_recv | batch | zero-copy
    "size": (int, type(None)),     # message bytes
    "batch": (int,),               # messages per batch call (1: one call per message)
    "placement": (str,),           # cross | same | single-cpu
    "cpus": (list,),               # the CPUs the processes were pinned to
    "producers": (int,),
    "consumers": (int,),
    "rank": (int, type(None)),     # pyivshmem only: lowest available rank is the reference
    "status": (str,),              # ok | skipped | failed
    "note": _OPT_STR,              # why skipped/failed, or a caveat
    "latency_ns": (dict, type(None)),
    "throughput": (dict, type(None)),
    "doorbells_per_msg": _OPT_NUM,
    "counters": (dict, type(None)),  # raw counters behind doorbells_per_msg (Channel.stats)
    "reference": (bool,),          # this record is the pyivshmem figure of its group
    "ratio": _OPT_NUM,             # pyivshmem reference vs this record; > 1: pyivshmem better
    "elapsed_s": _OPT_NUM,
}
LATENCY_FIELDS: Dict[str, tuple] = {
    "count": (int,),
    "min": _OPT_NUM,
    "p50": _OPT_NUM,
    "p99": _OPT_NUM,
    "p99_9": _OPT_NUM,
    "max": _OPT_NUM,
    "mean": _OPT_NUM,
    "histogram": (dict,),
}
THROUGHPUT_FIELDS: Dict[str, tuple] = {
    "msgs_per_s": _NUM,
    "bytes_per_s": _NUM,
    "min_msgs_per_s": _NUM,
    "max_msgs_per_s": _NUM,
    "trials": (list,),
    "messages_per_trial": (int,),
    "messages": (int,),
    "seconds": _NUM,
}
HEADLINE_FIELDS: Dict[str, tuple] = {
    "figure": (str,),
    "group": (str,),
    "unit": (str,),
    "higher_is_better": (bool,),
    "pyivshmem": _OPT_NUM,
    "best_peer": _OPT_STR,
    "best_peer_value": _OPT_NUM,
    "ratio": _OPT_NUM,
}
# added in version 1 after its first documents: checked when present
OPTIONAL_RECORD_FIELDS: Dict[str, tuple] = {
    "spread": (dict, type(None)),  # how much the figure's trials disagree (below)
    "samples_alternated": (bool,),  # wake-up: samples alternated one by one with the others'
}
SPREAD_FIELDS: Dict[str, tuple] = {
    "metric": (str,),              # what each trial value is: "p50" (ns) or "msgs_per_s"
    "values": (list,),             # each trial's value, in the order they ran
    "seq": (list,),                # each trial's position in the run's sequence of trials
    "spread": _OPT_NUM,            # (max - min) / median of values; null below two trials
    "limit": _NUM,                 # the run's --max-spread, as a fraction
    "flagged": (bool,),            # spread > limit
}
OPTIONAL_HEADLINE_FIELDS: Dict[str, tuple] = {
    "spread_flagged": (bool,),     # pyivshmem's or the best peer's trials disagree > limit
}
_STATUSES = ("ok", "skipped", "failed")
# placements of figures measured with QEMU guests (--topology host-guest / guest-guest)
GUEST_PLACEMENTS = ("host-guest", "guest-guest")
EMULATED = "functional figures under software emulation (TCG), not speed claims"
KVM_FIGURES = "speed figures: guests under KVM (hardware virtualisation)"


def guest_label(accel: Optional[str]) -> str:
    """What guest figures are: speed figures under KVM, functional figures under TCG."""
    return KVM_FIGURES if accel == "kvm" else EMULATED


_SCENARIOS = ("roundtrip", "throughput", "mpmc", "wakeup", "doorbells")


def is_guest(rec: Dict[str, Any]) -> bool:
    """A figure measured with emulated QEMU guests: reported apart, never compared or headlined."""
    return rec.get("placement") in GUEST_PLACEMENTS


class PlotUnavailable(RuntimeError):
    """matplotlib is missing; the message says how to install it."""


# ------------------------------------------------------------------------------------------------
def _pkg_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def host_info(usable: Sequence[int]) -> Dict[str, Any]:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    packages = {}
    for name in ("pyzmq", "faster-fifo", "posix-ipc", "iceoryx2", "matplotlib"):
        v = _pkg_version(name)
        if v:
            packages[name] = v
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "cpu_model": model or "unknown",
        "cpu_count": os.cpu_count() or 0,
        "usable_cpus": list(usable),
        "packages": packages,
    }


def _figure(rec: Dict[str, Any]) -> Tuple[Optional[float], bool]:
    """The value a record is compared on, and whether higher is better."""
    if rec.get("status") != "ok":
        return None, True
    if rec.get("latency_ns"):
        return rec["latency_ns"].get("p50"), False
    if rec.get("throughput"):
        return rec["throughput"].get("msgs_per_s"), True
    if rec.get("doorbells_per_msg") is not None:
        return rec["doorbells_per_msg"], False
    return None, True


def compute_ratios(records: List[Dict[str, Any]]) -> None:
    """Mark each group's pyivshmem reference and set every peer record's ratio to it (in place)."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for rec in records:
        rec["reference"] = False
        rec["ratio"] = None
        groups.setdefault(rec["group"], []).append(rec)
    for recs in groups.values():
        candidates = [
            r for r in recs
            if r["is_pyivshmem"] and r["status"] == "ok" and _figure(r)[0] is not None
        ]
        if not candidates:
            continue
        ref = min(candidates, key=lambda r: (r["rank"] if r["rank"] is not None else 99))
        ref["reference"] = True
        ours, higher = _figure(ref)
        for r in recs:
            if not r["is_pyivshmem"]:
                theirs, _ = _figure(r)
                r["ratio"] = ratio(ours, theirs, higher)


_HEADLINES = (
    ("round trip, busy-poll, p50", "roundtrip/busy-poll/", "ns"),
    ("round trip, blocking, p50", "roundtrip/blocking/", "ns"),
    ("throughput, 64 B, one call per message", "throughput/single/64/", "msgs/s"),
    ("throughput, 64 B, batched", "throughput/batch/64/", "msgs/s"),
    ("throughput, 1 MiB", "throughput/single/1048576/", "msgs/s"),
    ("MPMC throughput", "mpmc/", "msgs/s"),
    ("wake-up of a sleeping receiver, p50", "wakeup/", "ns"),
)


def headlines(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """pyivshmem's reference figure against the best peer, for the figures a reader looks for."""
    out = []
    for title, prefix, unit in _HEADLINES:
        recs = [r for r in records if r["group"].startswith(prefix) and not is_guest(r)]
        refs = [r for r in recs if r["reference"]]
        if not refs:
            continue
        ref = refs[0]
        ours, higher = _figure(ref)
        peers = [r for r in recs if not r["is_pyivshmem"] and r["group"] == ref["group"]
                 and _figure(r)[0] is not None]
        best = None
        if peers:
            pick = max if higher else min
            best = pick(peers, key=lambda r: _figure(r)[0] or 0.0)
        if ref["scenario"] in ("roundtrip", "wakeup") and ref["mode"] and ref["mode"] not in ref["group"]:
            title += f" (pyivshmem {ref['mode']})"
        flagged = any((r.get("spread") or {}).get("flagged") for r in (ref, best) if r)
        out.append({
            "figure": title,
            "group": ref["group"],
            "unit": unit,
            "higher_is_better": higher,
            "pyivshmem": ours,
            "best_peer": best["label"] if best else None,
            "best_peer_value": _figure(best)[0] if best else None,
            "ratio": best["ratio"] if best else None,
            "spread_flagged": flagged,
        })
    return out


def build_document(records: List[Dict[str, Any]], settings: Dict[str, Any], notes: List[str],
                   command: Sequence[str], usable_cpus: Sequence[int], duration_s: float,
                   created: Optional[str] = None) -> Dict[str, Any]:
    from .. import __version__

    compute_ratios(records)
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command),
        "pyivshmem_version": __version__,
        "host": host_info(usable_cpus),
        "settings": settings,
        "records": records,
        "headlines": headlines(records),
        "notes": list(notes),
        "duration_s": duration_s,
    }


# ------------------------------------------------------------------------------------------------
def _check_fields(obj: Any, spec: Dict[str, tuple], where: str,
                  optional: Optional[Dict[str, tuple]] = None) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    spec = dict(spec)
    for name, types in (optional or {}).items():
        if name in obj:
            spec[name] = types
    for name, types in spec.items():
        if name not in obj:
            raise ValueError(f"{where}: missing field {name!r}")
        value = obj[name]
        if isinstance(value, bool) and bool not in types:
            raise ValueError(f"{where}.{name}: a boolean where {types} was expected")
        if not isinstance(value, types):
            raise ValueError(f"{where}.{name}: {type(value).__name__} is not one of "
                             f"{', '.join(t.__name__ for t in types)}")


def validate(doc: Dict[str, Any]) -> None:
    """Raise ValueError naming the first field that does not follow schema version 1."""
    _check_fields(doc, TOP_FIELDS, "document")
    if doc["schema"] != SCHEMA:
        raise ValueError(f"document.schema is {doc['schema']!r}, not {SCHEMA!r}")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"document.schema_version is {doc['schema_version']}, "
                         f"this reader knows {SCHEMA_VERSION}")
    _check_fields(doc["host"], HOST_FIELDS, "host")
    for i, rec in enumerate(doc["records"]):
        where = f"records[{i}]"
        _check_fields(rec, RECORD_FIELDS, where, OPTIONAL_RECORD_FIELDS)
        if rec.get("spread") is not None:
            _check_fields(rec["spread"], SPREAD_FIELDS, where + ".spread")
            if len(rec["spread"]["values"]) != len(rec["spread"]["seq"]):
                raise ValueError(f"{where}.spread: {len(rec['spread']['values'])} values but "
                                 f"{len(rec['spread']['seq'])} sequence numbers")
        if rec["status"] not in _STATUSES:
            raise ValueError(f"{where}.status: {rec['status']!r} is not one of {_STATUSES}")
        if rec["scenario"] not in _SCENARIOS:
            raise ValueError(f"{where}.scenario: {rec['scenario']!r} is not one of {_SCENARIOS}")
        if rec["status"] != "ok" and not rec["note"]:
            raise ValueError(f"{where}: a {rec['status']} record needs a note saying why")
        if rec["latency_ns"] is not None:
            _check_fields(rec["latency_ns"], LATENCY_FIELDS, where + ".latency_ns")
            Histogram.from_dict(rec["latency_ns"]["histogram"])  # consistent buckets
        if rec["throughput"] is not None:
            _check_fields(rec["throughput"], THROUGHPUT_FIELDS, where + ".throughput")
        if rec["status"] == "ok" and _figure(rec)[0] is None:
            raise ValueError(f"{where}: an ok record without a latency, throughput or count")
    for i, h in enumerate(doc["headlines"]):
        _check_fields(h, HEADLINE_FIELDS, f"headlines[{i}]", OPTIONAL_HEADLINE_FIELDS)
    for i, n in enumerate(doc["notes"]):
        if not isinstance(n, str):
            raise ValueError(f"notes[{i}]: not a string")


def write_json(doc: Dict[str, Any], path: str) -> None:
    validate(doc)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Text report
def fmt_us(ns: Optional[float]) -> str:
    if ns is None:
        return "-"
    us = ns / 1000.0
    if us < 10:
        return f"{us:.2f}"
    if us < 1000:
        return f"{us:.1f}"
    return f"{us:,.0f}"


def fmt_ns(ns: Optional[float]) -> str:
    """A duration with its unit, for progress lines ("3.21 us", "415 us", "2.1 ms")."""
    if ns is None:
        return "-"
    if ns < 1_000_000:
        return f"{fmt_us(ns)} us" if ns < 10_000 else f"{ns / 1000:.0f} us"
    return f"{ns / 1e6:.1f} ms"


def fmt_rate(r: Optional[float]) -> str:
    if r is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if r >= scale:
            v = r / scale
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{r:.0f}"


def fmt_size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def fmt_ratio(rec: Dict[str, Any]) -> str:
    if rec.get("reference"):
        return "ref"
    r = rec.get("ratio")
    if r is None:
        return ""
    if r < 1:
        return f"x{r:.2g}"
    return f"x{r:.1f}" if r < 100 else f"x{r:.0f}"


def fmt_spread(rec: Dict[str, Any]) -> str:
    """``"4%"``, ``"31%!"`` when the trials disagree more than the run's limit, ``""`` if unknown."""
    sp = rec.get("spread")
    if not sp or sp.get("spread") is None:
        return ""
    text = f"{sp['spread'] * 100:.0f}%"
    return text + "!" if sp.get("flagged") else text


def _table(rows: List[List[str]], right: Iterable[int] = ()) -> List[str]:
    right = set(right)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def _ordered(recs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """pyivshmem first (by rank), then peers in the order they ran."""
    ours = sorted((r for r in recs if r["is_pyivshmem"]), key=lambda r: r["rank"] or 0)
    return ours + [r for r in recs if not r["is_pyivshmem"]]


def _latency_section(title: str, recs: List[Dict[str, Any]], key: str) -> List[str]:
    ok = [r for r in recs if r["status"] == "ok"]
    if not ok:
        return []
    lines = [title]
    rows = [["", "transport", "calls", "p50", "p99", "p99.9", "max", "spread", "vs"]]
    for k in dict.fromkeys(r[key] for r in ok):
        for r in _ordered([x for x in ok if x[key] == k]):
            lat = r["latency_ns"]
            rows.append([k, r["label"], r["variant"], fmt_us(lat["p50"]), fmt_us(lat["p99"]),
                         fmt_us(lat["p99_9"]), fmt_us(lat["max"]), fmt_spread(r), fmt_ratio(r)])
            k = ""
    return lines + _table(rows, right=(3, 4, 5, 6, 7, 8)) + [""]


def _rate_cell(r: Optional[Dict[str, Any]]) -> str:
    if r is None:
        return ""
    if r["status"] != "ok":
        return r["status"]
    tp = r["throughput"]
    text = fmt_rate(tp["msgs_per_s"])
    if (r["size"] or 0) >= 4096:
        text += f" {tp['bytes_per_s'] / 1e9:.1f}GB/s"
    rt = fmt_ratio(r)
    sp = fmt_spread(r)
    return f"{text} {rt}{f' [{sp}]' if sp else ''}".strip()


def _throughput_section(recs: List[Dict[str, Any]]) -> List[str]:
    if not any(r["status"] == "ok" for r in recs):
        return []
    sizes = sorted({r["size"] for r in recs})
    lines = ["One-way throughput, messages/s (GB/s from 4 KiB), median of trials [spread]; "
             "higher is better"]
    rows = [["", "transport", "calls"] + [fmt_size(s) for s in sizes]]
    for kind, title in (("single", "one call per message"), ("batch", "batched")):
        mine = [r for r in recs if r["group"].startswith(f"throughput/{kind}/")]
        keys: Dict[Tuple[str, str], Dict[int, Dict[str, Any]]] = {}
        for r in _ordered(mine):
            keys.setdefault((r["label"], r["variant"]), {})[r["size"]] = r
        first = True
        for (label, _variant), by_size in keys.items():
            if not any(x["status"] == "ok" for x in by_size.values()):
                continue
            variant = next(iter(by_size.values()))["variant"]
            rows.append([title if first else "", label, variant] +
                        [_rate_cell(by_size.get(s)) for s in sizes])
            first = False
    return lines + _table(rows, right=range(3, 3 + len(sizes))) + [""]


def _mpmc_section(recs: List[Dict[str, Any]]) -> List[str]:
    ok = [r for r in recs if r["status"] == "ok"]
    if not ok:
        return []
    r0 = ok[0]
    lines = [f"MPMC: {r0['producers']} producers, {r0['consumers']} consumers, "
             f"{fmt_size(r0['size'])} messages, messages/s in all; higher is better"]
    rows = [["transport", "calls", "msgs/s", "spread", "vs"]]
    for r in _ordered(ok):
        rows.append([r["label"], r["variant"], fmt_rate(r["throughput"]["msgs_per_s"]),
                     fmt_spread(r), fmt_ratio(r)])
    return lines + _table(rows, right=(2, 3, 4)) + [""]


def _doorbell_section(recs: List[Dict[str, Any]]) -> List[str]:
    ok = [r for r in recs if r["status"] == "ok"]
    if not ok:
        return []
    rows = [["load", "calls", "doorbells/msg", "sleeps/msg"]]
    for r in ok:
        c = r["counters"] or {}
        sent = sum(v for k, v in c.items() if k.endswith("_sent")) or 1
        sleeps = sum(v for k, v in c.items() if k.endswith("_sleeps"))
        rows.append([r["method"] or "", r["variant"], f"{r['doorbells_per_msg']:.4f}",
                     f"{sleeps / sent:.4f}"])
    return (["Doorbells rung per message sent (pyivshmem Channel; both sides together)"]
            + _table(rows, right=(2, 3)) + [""])


def _headline_lines(doc: Dict[str, Any]) -> List[str]:
    lines = []
    for h in doc["headlines"]:
        if h["pyivshmem"] is None:
            continue
        if h["unit"] == "ns":
            ours = f"{fmt_us(h['pyivshmem'])} us"
            theirs = f"{fmt_us(h['best_peer_value'])} us" if h["best_peer"] else ""
        else:
            ours = f"{fmt_rate(h['pyivshmem'])} msg/s"
            theirs = f"{fmt_rate(h['best_peer_value'])} msg/s" if h["best_peer"] else ""
        shaky = " (trials disagree: uncertain)" if h.get("spread_flagged") else ""
        if h["best_peer"]:
            lines.append(f"  {h['figure']}: pyivshmem {ours}; best peer {h['best_peer']} {theirs}: "
                         f"pyivshmem x{h['ratio']:.2g}{shaky}")
        else:
            lines.append(f"  {h['figure']}: pyivshmem {ours} (no peer measured)")
    return ["Summary (pyivshmem against the best peer measured in this run)"] + lines + [""] if lines else []


_GUEST_FIGURE = {"roundtrip": "round trip", "wakeup": "wake-up"}


def _sleeps_per_msg(r: Dict[str, Any]) -> str:
    c = r["counters"] or {}
    sent = sum(v for k, v in c.items() if k.endswith("_sent")) or 1
    sleeps = sum(v for k, v in c.items() if k.endswith("_sleeps"))
    return f"{sleeps / sent:.4f}"


def _guest_rows(recs: List[Dict[str, Any]], fmt_lat, fmt_tp
                ) -> Tuple[List[List[str]], List[List[str]], List[List[str]]]:
    ok = [r for r in recs if r["status"] == "ok"]
    lat = [[r["placement"], _GUEST_FIGURE.get(r["scenario"], r["scenario"]), r["mode"] or "",
            r["variant"]] + fmt_lat(r["latency_ns"]) for r in ok if r["latency_ns"]]
    tp = [[r["placement"], r["variant"].split(", ")[-1], fmt_size(r["size"])] + fmt_tp(r)
          for r in ok if r["throughput"]]
    bells = [[r["placement"], r["method"] or "", r["variant"], fmt_size(r["size"]),
              f"{r['doorbells_per_msg']:.4f}", _sleeps_per_msg(r)]
             for r in ok if r["doorbells_per_msg"] is not None]
    return lat, tp, bells


def _guest_accel(doc: Dict[str, Any]) -> Optional[str]:
    return ((doc.get("settings") or {}).get("guest") or {}).get("accel")


def _guest_section(recs: List[Dict[str, Any]], label: str = EMULATED) -> List[str]:
    """Figures measured with QEMU guests, apart from the host figures and never compared."""
    def lat(x: Dict[str, Any]) -> List[str]:
        return [fmt_us(x["p50"]), fmt_us(x["p99"]), fmt_us(x["p99_9"]), fmt_us(x["max"]),
                str(x["count"])]

    def tp(r: Dict[str, Any]) -> List[str]:
        t = r["throughput"]
        return [fmt_rate(t["msgs_per_s"]), f"{t['bytes_per_s'] / 1e6:.3g}", str(t["messages"])]

    lat_rows, tp_rows, bell_rows = _guest_rows(recs, lat, tp)
    if not lat_rows and not tp_rows and not bell_rows:
        return []
    out = [f"QEMU guests: {label}"]
    if lat_rows:
        out.append("Round trip and wake-up of a sleeping guest, microseconds")
        out += _table([["topology", "figure", "mode", "calls", "p50", "p99", "p99.9", "max", "n"]]
                      + lat_rows, right=(4, 5, 6, 7, 8))
    if tp_rows:
        out.append("One-way throughput")
        out += _table([["topology", "direction", "size", "msgs/s", "MB/s", "messages"]] + tp_rows,
                      right=(3, 4, 5))
    if bell_rows:
        out.append("Doorbells rung per message sent (both sides together, whole phase)")
        out += _table([["topology", "load", "calls", "size", "doorbells/msg", "sleeps/msg"]]
                      + bell_rows, right=(3, 4, 5))
    return out + [""]


def _trials_line(settings: Dict[str, Any]) -> str:
    n = settings.get("repeat") or 1
    limit = settings.get("max_spread")
    text = (f"Each figure: {n} trial{'s' if n != 1 else ''}, interleaved across transports "
            "(A B C A B C ...), wake-ups alternating one by one within each trial; "
            "spread = (max - min) / median of a figure's trials")
    if limit is not None:
        text += f", ! = above {limit * 100:.0f}% (--max-spread)"
    return text + "."


def format_report(doc: Dict[str, Any]) -> str:
    """The human-readable table of a document."""
    host = doc["host"]
    guests = [r for r in doc["records"] if is_guest(r)]
    recs = [r for r in doc["records"] if not is_guest(r)]
    cpus = sorted({c for r in recs for c in r["cpus"]})
    placement = {r["placement"] for r in recs if r["scenario"] in ("roundtrip", "throughput")}
    where = (f"processes pinned to CPUs {', '.join(map(str, cpus))}" if cpus else "processes not pinned")
    if "same" in placement or "single-cpu" in placement:
        where += " (both on one CPU)"
    accel = _guest_accel(doc)
    if guests and not recs:
        where = ("QEMU guests under KVM" if accel == "kvm"
                 else "QEMU guests under software emulation (TCG)")
    out = [
        f"pyivshmem {doc['pyivshmem_version']} bench, {doc['created']}",
        f"{host['cpu_model']}, {host['cpu_count']} CPUs, Linux {host['kernel']}, "
        f"{host['implementation']} {host['python']}; {where}",
        "Latencies in microseconds (percentiles of a log-linear histogram). "
        "vs: xN = pyivshmem's reference (ref) is N times better.",
    ]
    if recs:
        out.append(_trials_line(doc["settings"]))
    out.append("")
    by = lambda sc: [r for r in recs if r["scenario"] == sc]  # noqa: E731
    rtt = by("roundtrip")
    if rtt:
        size = fmt_size(rtt[0]["size"])
        out += _latency_section(f"Round trip of a {size} message; lower is better", rtt, "mode")
    out += _throughput_section(by("throughput"))
    out += _mpmc_section(by("mpmc"))
    wake = by("wakeup")
    if wake:
        out += _latency_section(
            "Wake-up: one-way latency to a receiver asleep in a blocking receive; lower is better",
            wake, "mode")
    out += _doorbell_section(by("doorbells"))
    out += _headline_lines(doc)
    out += _guest_section(guests, guest_label(accel))
    notes = list(doc["notes"])
    for r in recs + guests:
        if r["status"] != "ok":
            what = " ".join(str(x) for x in (r["scenario"], r["mode"] or r["method"] or "",
                                             fmt_size(r["size"]) if r["size"] else "") if x)
            notes.append(f"{r['label']}, {what}: {r['status']}: {r['note']}")
    if notes:
        out.append("Notes")
        seen = set()
        for n in notes:
            if n not in seen:
                seen.add(n)
                out.append(f"  - {n}")
        out.append("")
    out.append(f"Run took {doc['duration_s']:.1f} s.")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Plots
def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'pyivshmem[bench]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _percentile_curve(hist: Histogram) -> Tuple[List[float], List[float]]:
    """(1/(1-q) for each bucket's cumulative fraction q, bucket value in us): HDR-style curve."""
    xs, ys = [], []
    seen = 0
    for low, high, n in hist.buckets():
        seen += n
        q = seen / hist.count
        value = low if high - low == 1 else (low + high - 1) / 2
        value = min(max(value, hist.min or 0), hist.max or value)
        xs.append(1.0 / max(1.0 - q, 1e-6))
        ys.append(value / 1000.0)
    return xs, ys


def write_plots(doc: Dict[str, Any], directory: str) -> List[str]:
    """PNG files: latency distributions, throughput by size, pyivshmem against peers."""
    plt = _matplotlib()
    os.makedirs(directory, exist_ok=True)
    recs = [r for r in doc["records"] if not is_guest(r)]  # emulated guests are not plotted
    written: List[str] = []

    # 1. latency distribution (round trip by mode; wake-up)
    panels = []
    for mode in ("busy-poll", "blocking"):
        rs = [r for r in recs if r["scenario"] == "roundtrip" and r["status"] == "ok"
              and r["group"].startswith(f"roundtrip/{mode}/")]
        if rs:
            panels.append((f"round trip, {mode}", rs))
    ws = [r for r in recs if r["scenario"] == "wakeup" and r["status"] == "ok"]
    if ws:
        panels.append(("wake-up of a sleeping receiver", ws))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, (title, rs) in zip(axes[0], panels):
            for r in _ordered(rs):
                xs, ys = _percentile_curve(Histogram.from_dict(r["latency_ns"]["histogram"]))
                name = r["label"] if not r["is_pyivshmem"] else f"pyivshmem {r['mode']}"
                ax.plot(xs, ys, label=name, linewidth=2.2 if r["is_pyivshmem"] else 1.2,
                        drawstyle="steps-post")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ticks = [2, 10, 100, 1000, 10000]
            ax.set_xticks(ticks)
            ax.set_xticklabels(["50%", "90%", "99%", "99.9%", "99.99%"])
            ax.set_xlabel("percentile")
            ax.set_ylabel("microseconds")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("Latency distribution (lower is better)")
        fig.tight_layout()
        path = os.path.join(directory, "latency_distribution.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 2. throughput by message size
    tp = [r for r in recs if r["scenario"] == "throughput" and r["status"] == "ok"]
    if tp:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        series: Dict[str, List[Tuple[int, float, float]]] = {}
        for r in _ordered(tp):
            name = r["label"] if not r["is_pyivshmem"] else f"pyivshmem {r['method']}"
            if r["batch"] > 1 and not r["is_pyivshmem"]:
                name += " (batch)"
            series.setdefault(name, []).append(
                (r["size"], r["throughput"]["msgs_per_s"], r["throughput"]["bytes_per_s"] / 1e9))
        colors = plt.get_cmap("tab20").colors
        for i, (name, pts) in enumerate(series.items()):
            pts.sort()
            bold = name.startswith("pyivshmem")
            style = dict(marker="o", label=name, color=colors[i % len(colors)],
                         linewidth=2.4 if bold else 1.2, linestyle="-" if bold else "--")
            for ax, idx in ((axes[0], 1), (axes[1], 2)):
                ax.plot([p[0] for p in pts], [p[idx] for p in pts], **style)
        sizes = sorted({r["size"] for r in tp})
        for ax, ylabel in ((axes[0], "messages/s"), (axes[1], "GB/s")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(sizes)
            ax.set_xticklabels([fmt_size(s) for s in sizes])
            ax.set_xlabel("message size")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle("One-way throughput by message size (higher is better)")
        fig.tight_layout()
        path = os.path.join(directory, "throughput_by_size.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 3. pyivshmem against each peer: the ratios of the headline groups
    groups = []
    for h in doc["headlines"]:
        rs = [r for r in recs if r["group"] == h["group"] and r["ratio"] is not None]
        if rs:
            groups.append((h["figure"], rs))
    if groups:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        heights = [len(rs) + 1.5 for _, rs in groups]
        fig, axes = plt.subplots(len(groups), 1, figsize=(8, 0.9 + 0.32 * sum(heights)),
                                 gridspec_kw={"height_ratios": heights}, squeeze=False)
        for ax, (title, rs) in zip(axes[:, 0], groups):
            names = [r["label"] for r in rs]
            values = [r["ratio"] for r in rs]
            colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
            ax.barh(names, values, color=colors, height=0.6)
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log")
            lo, hi = min(values + [1.0]), max(values + [1.0])
            ax.set_xlim(lo / 1.5, hi * 2.5)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"x{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            for i, r in enumerate(rs):
                ax.text(r["ratio"], i, " " + fmt_ratio(r), va="center", fontsize=8)
            ax.set_title(f"{title}: pyivshmem is N times better", fontsize=9)
            ax.invert_yaxis()
            ax.tick_params(labelsize=8)
        fig.tight_layout()
        path = os.path.join(directory, "pyivshmem_vs_peers.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------
# Markdown (the README's results section is generated with --markdown)
def _md_table(header: List[str], rows: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def format_markdown(doc: Dict[str, Any], plot: Optional[str] = None) -> str:
    """A results section in Markdown: summary, round trip, throughput, MPMC, wake-up."""
    host = doc["host"]
    guests = [r for r in doc["records"] if is_guest(r)]
    recs = [r for r in doc["records"] if not is_guest(r)]
    cmd = " ".join(doc["command"])
    out = [
        "## Results",
        "",
        f"Measured by `{cmd}` on {host['cpu_model']} ({host['cpu_count']} CPUs, Linux "
        f"{host['kernel']}, {host['implementation']} {host['python']}), {doc['created'][:10]}. "
        "Every peer is measured in the same run; compare ratios, not absolute numbers, across "
        "machines. Latencies in microseconds; xN means pyivshmem's figure is N times better.",
        "",
    ]
    if recs:
        out += [_trials_line(doc["settings"]), ""]
    heads = [h for h in doc["headlines"] if h["pyivshmem"] is not None]
    if heads:
        rows = []
        for h in heads:
            f = (lambda v: f"{fmt_us(v)} us") if h["unit"] == "ns" else (lambda v: f"{fmt_rate(v)}/s")
            ratio_text = f"x{h['ratio']:.2g}" if h["ratio"] else "-"
            if h.get("spread_flagged"):
                ratio_text += " (!)"
            rows.append([h["figure"], f(h["pyivshmem"]),
                         f"{h['best_peer']}: {f(h['best_peer_value'])}" if h["best_peer"] else "-",
                         ratio_text])
        out += _md_table(["figure", "pyivshmem", "best peer", "pyivshmem vs best"], rows)
        if any(h.get("spread_flagged") for h in heads):
            out += ["(!): the trials of pyivshmem's or the best peer's figure disagree by more "
                    "than the run's --max-spread; that ratio is uncertain.", ""]
    if plot:
        out += [f"![pyivshmem against the alternatives]({plot})", ""]
    rtt = [r for r in recs if r["scenario"] == "roundtrip" and r["status"] == "ok"]
    if rtt:
        out.append(f"Round trip, {fmt_size(rtt[0]['size'])} messages, processes on two CPUs:")
        out.append("")
        ordered = [r for g in dict.fromkeys(x["group"] for x in rtt)
                   for r in _ordered([x for x in rtt if x["group"] == g])]
        rows = [[r["mode"] or "", r["label"], f"`{r['variant']}`", fmt_us(r["latency_ns"]["p50"]),
                 fmt_us(r["latency_ns"]["p99"]), fmt_us(r["latency_ns"]["p99_9"]),
                 fmt_us(r["latency_ns"]["max"]), fmt_spread(r), fmt_ratio(r)] for r in ordered]
        out += _md_table(["mode", "transport", "calls", "p50", "p99", "p99.9", "max", "spread",
                          "vs"], rows)
    tp = [r for r in recs if r["scenario"] == "throughput"]
    if any(r["status"] == "ok" for r in tp):
        sizes = sorted({r["size"] for r in tp})
        by: Dict[Tuple[str, str, str], Dict[int, Dict[str, Any]]] = {}
        for r in _ordered(tp):
            by.setdefault((r["label"], r["method"], r["variant"]), {})[r["size"]] = r
        rows = [[label, f"`{variant}`"] + [_rate_cell(cells.get(s)) for s in sizes]
                for (label, _method, variant), cells in by.items()
                if any(c["status"] == "ok" for c in cells.values())]
        out.append("One-way throughput, messages/s (GB/s from 4 KiB), median of trials [spread]:")
        out.append("")
        out += _md_table(["transport", "calls"] + [fmt_size(s) for s in sizes], rows)
    mp = [r for r in recs if r["scenario"] == "mpmc" and r["status"] == "ok"]
    if mp:
        out.append(f"MPMC, {mp[0]['producers']} producers and {mp[0]['consumers']} consumers, "
                   f"{fmt_size(mp[0]['size'])} messages:")
        out.append("")
        out += _md_table(["transport", "msgs/s", "spread", "vs"],
                         [[r["label"], fmt_rate(r["throughput"]["msgs_per_s"]), fmt_spread(r),
                           fmt_ratio(r)] for r in _ordered(mp)])
    wk = [r for r in recs if r["scenario"] == "wakeup" and r["status"] == "ok"]
    if wk:
        out.append("Wake-up of a receiver asleep in a blocking receive (one way):")
        out.append("")
        out += _md_table(["transport", "calls", "p50", "p99", "spread", "vs"],
                         [[r["label"], f"`{r['variant']}`", fmt_us(r["latency_ns"]["p50"]),
                           fmt_us(r["latency_ns"]["p99"]), fmt_spread(r), fmt_ratio(r)]
                          for r in _ordered(wk)])
    lat_rows, tp_rows, bell_rows = _guest_rows(
        guests,
        lambda x: [fmt_us(x["p50"]), fmt_us(x["p99"]), fmt_us(x["p99_9"]), fmt_us(x["max"])],
        lambda r: [f"{fmt_rate(r['throughput']['msgs_per_s'])}/s"])
    if lat_rows or tp_rows or bell_rows:
        out.append(f"QEMU guests ({guest_label(_guest_accel(doc))}):")
        out.append("")
        if lat_rows:
            out += _md_table(["topology", "figure", "mode", "calls", "p50", "p99", "p99.9", "max"],
                             [r[:3] + [f"`{r[3]}`"] + r[4:] for r in lat_rows])
        if tp_rows:
            out += _md_table(["topology", "direction", "size", "messages/s"], tp_rows)
        if bell_rows:
            out += _md_table(["topology", "load", "calls", "size", "doorbells/msg", "sleeps/msg"],
                             [r[:2] + [f"`{r[2]}`"] + r[3:] for r in bell_rows])
    return "\n".join(out)
