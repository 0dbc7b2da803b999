"""`pyivshmem info PATH`: what is in a region - header, rings, fill levels, waiting flags."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ._ring import Region
from .errors import IvshmemError


def describe(path: str) -> dict:
    with Region.open(path) as region:
        return {"path": path, "header": region.info(), "rings": region.rings()}


def _known(v: object) -> str:
    return "?" if v is None else str(v)


def format_table(d: dict) -> str:
    h = d["header"]
    lines = [
        f"region {d['path']}: {h['size']} bytes, layout v{h['version']}, generation {h['generation']:#018x}",
        f"  {_known(h['rings'])} ring(s), {_known(h['allocated'])} bytes allocated, "
        f"{_known(h['free'])} free" + (", directory lock HELD" if h["directory_locked"] else ""),
    ]
    lines += [f"  header: CORRUPT: {e}" for e in h["errors"]]
    if d["rings"]:
        lines.append(f"  {'name':20s} {'kind':6s} {'slots':>8s} {'slot size':>9s} {'queued':>8s} "
                     f"{'fill':>6s} {'prod wait':>9s} {'cons wait':>9s}")
    for r in d["rings"]:
        if "error" in r:
            lines.append(f"  entry {r['index']}: CORRUPT: {r['error']}")
            continue
        count = r["count"]
        fill = "?" if count is None else f"{100.0 * count / r['capacity']:.0f}%"
        lines.append(
            f"  {r['name']:20s} {r['kind']:6s} {r['capacity']:8d} {r['slot_size']:9d} "
            f"{'?' if count is None else count:>8} {fill:>6s} {r['producers_waiting']:9d} "
            f"{r['consumers_waiting']:9d}"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="pyivshmem info", description=__doc__)
    ap.add_argument("path", help="region file, e.g. /dev/shm/ivshmem")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        d = describe(args.path)
    except (IvshmemError, OSError) as e:
        print(f"pyivshmem info: {e}", file=sys.stderr)
        return 1
    print(json.dumps(d, indent=2) if args.json else format_table(d))
    return 0
