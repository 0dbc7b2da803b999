#!/usr/bin/env python3
"""Compare the Python API of two revisions with `pyivshmem bench`, alternating their runs.

    python3 bench/compare_py.py OLD_REV [NEW_REV] [--rounds N] [--duration S] [--peers c-eventfd]

OLD_REV and NEW_REV are git revisions or directories holding an unpacked source tree (for a
machine without the repository's history).
Builds each revision's package in place in a temporary directory (`git archive`; NEW_REV defaults
to the working tree), then runs `python -m pyivshmem bench` once per revision per round, in turn,
so that both revisions meet the same phases of a noisy machine.  Each run measures the busy-poll
and blocking round trips, 64-byte throughput (one call per message and batched) and the wake-up
of a sleeping receiver, with the bare C eventfd ping-pong beside them.  Prints, per figure, each
revision's median and quartiles over the rounds and the ratio new/old of the medians (for
latencies lower is better, for throughput higher).  Figures belong to benchmarks, never to
pass/fail tests.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PATHS = ["csrc", "pyivshmem", "setup.py", "pyproject.toml", "README.md"]


def copy_tree(root, dest):
    for p in PATHS:
        src = os.path.join(root, p)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, p), ignore=shutil.ignore_patterns(
                "*.so", "*.o", "__pycache__", "_ring.c", "_ffi_*.c"))
        elif os.path.exists(src):
            shutil.copy(src, dest)


def tree_of(rev, dest):
    """Build `rev` (a git revision, a directory holding an unpacked source tree, or None for the
    working tree) in place in dest."""
    if rev is None or os.path.isdir(rev):
        copy_tree(rev or ROOT, dest)
    else:
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev] + PATHS, capture_output=True)
        if archive.returncode != 0:
            sys.exit(f"compare_py.py: git archive {rev} failed: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest,
                         capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"compare_py.py: building {rev or 'the working tree'} failed:\n{res.stderr[-3000:]}")


def figures(path):
    """{figure name: (value, unit)} from one bench JSON file."""
    out = {}
    for r in json.load(open(path))["records"]:
        if r.get("status") != "ok":
            continue
        who = "pyivshmem" if r["is_pyivshmem"] else r["transport"]
        if r["scenario"] in ("roundtrip", "wakeup") and r.get("latency_ns"):
            name = f"{r['scenario']} {r['mode']} p50 ({who}: {r['variant']})"
            out[name] = (r["latency_ns"]["p50"] / 1000.0, "us")
        elif r["scenario"] == "throughput" and r.get("throughput"):
            name = f"throughput {r['group'].split('/')[1]} {r['size']} B ({who}: {r['variant']})"
            out[name] = (r["throughput"]["msgs_per_s"] / 1e6, "M msg/s")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new", nargs="?")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", default="0.3", help="seconds per throughput trial")
    ap.add_argument("--peers", default="c-eventfd")
    ap.add_argument("--scenarios", default="roundtrip,throughput,wakeup")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pyivshmem-compare-")
    try:
        revs = {"old": args.old, "new": args.new}
        dirs = {}
        for key, rev in revs.items():
            dirs[key] = os.path.join(work, key)
            os.makedirs(dirs[key])
            print(f"building {key} ({rev or 'working tree'})", file=sys.stderr, flush=True)
            tree_of(rev, dirs[key])
        runs = {k: [] for k in revs}
        for i in range(args.rounds):
            for key in (("old", "new") if i % 2 == 0 else ("new", "old")):
                out = os.path.join(work, f"{key}-{i}.json")
                path = os.environ.get("PYTHONPATH")  # keep what else the caller needs (cffi)
                env = dict(os.environ, PYTHONPATH=dirs[key] + (os.pathsep + path if path else ""))
                res = subprocess.run([sys.executable, "-m", "pyivshmem", "bench", "--quiet",
                                      "--scenarios", args.scenarios, "--peers", args.peers,
                                      "--sizes", "64", "--duration", args.duration, "--repeat", "1",
                                      "--json", out], env=env, cwd=work, capture_output=True,
                                     text=True)
                if res.returncode != 0:
                    if not os.path.exists(out):
                        sys.exit(f"compare_py.py: bench of {key} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
                    # some figure failed (a worker too slow on a loaded machine): keep the others
                    print(f"round {i + 1}: {key}: some figures failed; the others count",
                          file=sys.stderr, flush=True)
                runs[key].append(figures(out))
                print(f"round {i + 1}/{args.rounds}: {key} done", file=sys.stderr, flush=True)
        names = sorted(set().union(*(r.keys() for rs in runs.values() for r in rs)))
        print(f"{args.rounds} alternated rounds; medians (quartiles); ratio = new / old")
        for name in names:
            cells, med = [], {}
            unit = ""
            for key in ("old", "new"):
                vals = sorted(r[name][0] for r in runs[key] if name in r)
                if not vals:
                    cells.append(f"{key}: -")
                    continue
                unit = next(r[name][1] for r in runs[key] if name in r)
                q = statistics.quantiles(vals, n=4) if len(vals) > 1 else [vals[0]] * 3
                med[key] = statistics.median(vals)
                cells.append(f"{key}: {med[key]:.3g} ({q[0]:.3g}-{q[2]:.3g})")
            ratio = f"x{med['new'] / med['old']:.2f}" if len(med) == 2 and med["old"] else ""
            print(f"  {name} [{unit}]: " + "  ".join(cells) + f"  {ratio}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
