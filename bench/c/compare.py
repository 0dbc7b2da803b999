#!/usr/bin/env python3
"""Compare the C rings of two revisions with ring_bench, alternating their runs.

    python3 bench/c/compare.py OLD_REV [NEW_REV] [--rounds N] [-n ELEMENTS] [--kinds mpmc,spsc]
                               [--placements 1-4] [--fast-above M]

Builds ring_bench once per revision and code placement (gcc's defaults and three -falign-*
settings: on this machine class a figure can move by a third with code placement alone), always
from NEW_REV's harness (bench/c) over each revision's csrc/.  NEW_REV defaults to the working tree.
Then runs every binary once per round (`-r 1`), in turn, so that both revisions meet the same
phases of a noisy machine, and prints per revision, phase and burst the quartiles of its figures,
of rte_ring's and of the ratio.  A run counts as "fast" when rte_ring's burst-32 figure of the
first kind is above --fast-above million/s (this machine class's two phases: docs/bench.md);
without DPDK every run is "all".  Figures belong to benchmarks, never to pass/fail tests.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PLACEMENTS = ["", "-falign-loops=32", "-falign-loops=64 -falign-functions=64",
              "-falign-jumps=32 -falign-functions=32"]


def tree_of(rev, dest):
    """csrc/ of `rev` (None: the working tree) in dest/csrc, with the working tree's bench/c."""
    if rev is None:
        shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(dest, "csrc"))
    else:
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "csrc"], capture_output=True)
        if archive.returncode != 0:
            sys.exit(f"compare.py: git archive {rev} failed: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    os.makedirs(os.path.join(dest, "bench"))
    shutil.copytree(HERE, os.path.join(dest, "bench", "c"),
                    ignore=shutil.ignore_patterns("ring_bench", "__pycache__"))


def build(dest, flags, out):
    cc = " ".join(["cc", flags]).strip()
    res = subprocess.run(["make", "-s", "-B", "-C", os.path.join(dest, "bench", "c"), "ring_bench",
                          f"CC={cc}"], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"compare.py: build failed ({cc}):\n{res.stdout}{res.stderr}")
    shutil.move(os.path.join(dest, "bench", "c", "ring_bench"), out)


def run(exe, kinds, n):
    res = subprocess.run([exe, "-k", ",".join(kinds + ["rte-" + k for k in kinds]), "-r", "1",
                          "-n", str(n)], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"compare.py: {exe} failed:\n{res.stdout}{res.stderr}")
    out = {}
    for m in re.finditer(r"^RESULT ring=(\S+) burst=(\d+) mops=([0-9.]+)", res.stdout, re.M):
        out[(m.group(1), int(m.group(2)))] = float(m.group(3))
    return out


def quartiles(xs):
    if len(xs) == 1:
        return xs * 3
    q = statistics.quantiles(xs, n=4)
    return [q[0], statistics.median(xs), q[2]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="revision to compare against (e.g. a commit)")
    ap.add_argument("new", nargs="?", default=None, help="revision to measure (default: working tree)")
    ap.add_argument("--rounds", type=int, default=5, help="runs of every binary (default 5)")
    ap.add_argument("-n", type=int, default=10_000_000, help="elements per run (default 10M)")
    ap.add_argument("--kinds", default="mpmc", help="pyivshmem rings: mpmc, spsc or both (mpmc)")
    ap.add_argument("--placements", type=int, default=4, choices=range(1, 5),
                    help="code placements per revision (default 4)")
    ap.add_argument("--fast-above", type=float, default=300.0,
                    help="rte_ring burst-32 figure above which a run is 'fast' (300)")
    a = ap.parse_args()
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    if not kinds or any(k not in ("mpmc", "spsc") for k in kinds) or a.rounds < 1 or a.n < 1:
        sys.exit("compare.py: --kinds takes mpmc and/or spsc; --rounds and -n must be positive")
    revs = [("old", a.old), ("new", a.new)]
    with tempfile.TemporaryDirectory(prefix="ring-compare-") as tmp:
        bins = []
        for label, rev in revs:
            dest = os.path.join(tmp, label)
            os.makedirs(dest)
            tree_of(rev, dest)
            for i, flags in enumerate(PLACEMENTS[:a.placements]):
                exe = os.path.join(tmp, f"{label}-{i}")
                build(dest, flags, exe)
                bins.append((label, exe))
        rows = []  # (label, phase, kind, burst, ours, rte)
        for r in range(a.rounds):
            for label, exe in bins:
                res = run(exe, kinds, a.n)
                rte32 = res.get(("rte-" + kinds[0], 32))
                phase = "all" if rte32 is None else ("fast" if rte32 > a.fast_above else "slow")
                for (ring, burst), mops in res.items():
                    for k in kinds:
                        if ring == "ivshm-" + k:
                            rows.append((label, phase, k, burst, mops, res.get(("rte-" + k, burst))))
            print(f"round {r + 1} of {a.rounds} done", file=sys.stderr)
    names = {"old": a.old, "new": a.new or "working tree"}
    print(f"# {a.placements} placement(s) x {a.rounds} round(s) per revision, {a.n} elements per run;"
          " quartiles (q1 median q3), millions of elements/s")
    print(f"{'revision':<14} {'phase':<5} {'ring':<5} {'burst':>5} {'runs':>4}  {'pyivshmem':>17}"
          f"  {'rte_ring':>17}  {'ratio (min .. max)':>30}")
    for label in ("old", "new"):
        for phase in ("fast", "slow", "all"):
            for k in kinds:
                for burst in (1, 8, 32):
                    sel = [x for x in rows if x[:4] == (label, phase, k, burst)]
                    if not sel:
                        continue
                    ours = quartiles([x[4] for x in sel])
                    line = (f"{names[label][:14]:<14} {phase:<5} {k:<5} {burst:>5} {len(sel):>4}  "
                            + " ".join(f"{v:5.0f}" for v in ours))
                    rte = [x[5] for x in sel if x[5]]
                    if len(rte) == len(sel):
                        ratios = [x[4] / x[5] for x in sel]
                        line += ("  " + " ".join(f"{v:5.0f}" for v in quartiles(rte)) + "  "
                                 + " ".join(f"{v:5.2f}x" for v in quartiles(ratios))
                                 + f" ({min(ratios):.2f} .. {max(ratios):.2f})")
                    print(line)


if __name__ == "__main__":
    main()
