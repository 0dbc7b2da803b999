"""`pyivshmem bench`: pyivshmem against the transports a user would pick instead, in one run.

Runs with nothing but the package installed: it starts its own ivshmem server (a memfd), starts
its own worker processes (spawned, pinned to different CPUs when there are two) and measures round-trip
latency, one-way throughput, MPMC throughput and wake-up latency for pyivshmem and for every peer
that is installed (the others are skipped with a note saying how to install them).  docs/bench.md
describes every figure and the JSON schema.

With ``--topology host-guest`` or ``guest-guest`` it boots QEMU guests instead (guests.py) and
measures pyivshmem across the VM boundary, under KVM when a probe boot under KVM succeeds (speed
figures) and under software emulation otherwise (functional figures); ``--accel`` forces one.
Guest figures are reported apart from the host figures.

Modules: stats (histogram, percentiles), peers (the other transports), scenarios (pyivshmem's
variants), workers (spawned processes and measuring loops), runner (what runs in which order),
report (JSON, table, plots), guests and vmloops (the guest topologies).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator, List, Optional, Sequence

__all__ = ["main"]

_EXAMPLES = """\
examples:
  pyivshmem bench --quick                      everything, in under a minute
  pyivshmem bench --json results.json --plot plots/
  pyivshmem bench --scenarios roundtrip --peers os-pipe,unix-seqpacket
  pyivshmem bench --list                       which peers are installed here
  pyivshmem bench --topology host-guest --quick   host <-> QEMU guest (needs qemu-system-x86)
  pyivshmem bench --topology guest-guest --accel tcg   two guests, KVM not even probed
  pyivshmem bench pubsub --quick               publish-subscribe against iceoryx2 (docs/pubsub.md)
  pyivshmem bench bridge                       the bridge against ZeroMQ used directly (docs/bridge.md)
"""


def _size_list(text: str) -> List[int]:
    from .. import ConfigError, parse_size

    out = []
    for part in text.split(","):
        part = part.strip()
        if part:
            try:
                n = parse_size(part, "message size")
            except ConfigError as exc:  # argparse shows only an ArgumentTypeError's message
                raise argparse.ArgumentTypeError(str(exc)) from None
            if n < 8:
                raise argparse.ArgumentTypeError(f"message size {part!r}: at least 8 bytes")
            out.append(n)
    if not out:
        raise argparse.ArgumentTypeError("no sizes given")
    return out


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < x < float("inf"):  # inf: a trial (or a sleep) that never ends
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number")
    return x


def _percent(text: str) -> float:
    """``20`` or ``20%`` -> 0.2."""
    x = _positive_float(text.strip().rstrip("%"))
    return x / 100.0


def _mpmc_shape(text: str) -> tuple:
    try:
        p, c = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mpmc {text!r}: use PxC, e.g. 2x2") from None
    if p < 1 or c < 1 or p + c > 64:
        raise argparse.ArgumentTypeError(f"--mpmc {text!r}: 1..63 producers and consumers")
    return p, c


def _cpu_pair(text: str) -> tuple:
    try:
        cpus = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cpus {text!r}: use A,B, e.g. 0,1") from None
    if not 1 <= len(cpus) <= 2 or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"--cpus {text!r}: one or two CPU numbers")
    if len(cpus) == 2 and cpus[0] == cpus[1]:  # the figures would say "cross" for one CPU
        raise argparse.ArgumentTypeError(f"--cpus {text!r}: two different CPUs; for both "
                                         f"processes on one CPU give --cpus {cpus[0]}")
    return cpus


def build_parser() -> argparse.ArgumentParser:
    from .runner import SCENARIOS

    p = argparse.ArgumentParser(
        prog="pyivshmem bench",
        description="Benchmark pyivshmem against the alternatives, in the same run.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="short run (under a minute on 2 CPUs)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (docs/bench.md)")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots to DIR (needs matplotlib)")
    p.add_argument("--markdown", metavar="FILE",
                   help="write a Markdown results section (the README's is made this way)")
    p.add_argument("--scenarios", default="all",
                   help=f"comma-separated, from {','.join(SCENARIOS)} (default: all)")
    p.add_argument("--peers", default="all",
                   help="comma-separated peer keys, 'all' (default) or 'none'; see --list")
    p.add_argument("--sizes", type=_size_list, help="throughput message sizes (default 64,4K,1M)")
    p.add_argument("--rtt-size", type=_size_list, help="round-trip / wake-up message size (64)")
    p.add_argument("--duration", type=_positive_float, help="seconds per throughput trial")
    p.add_argument("--repeat", type=_positive_int,
                   help="trials per figure, interleaved across transports (A B C A B C ...); "
                        "throughput reports their median, latency all their samples (5; 3 with "
                        "--quick)")
    p.add_argument("--max-spread", type=_percent, metavar="PCT",
                   help="flag a figure whose trials disagree by more than PCT percent, "
                        "(max - min) / median of the trials (default 20)")
    p.add_argument("--count", type=_positive_int,
                   help="messages per throughput trial (default: calibrated to --duration)")
    p.add_argument("--batch", type=_positive_int, help="messages per batch call (32)")
    p.add_argument("--rtt-samples", type=_positive_int, help="most round trips timed per figure")
    p.add_argument("--rtt-seconds", type=_positive_float, help="most seconds per round-trip figure")
    p.add_argument("--wake-samples", type=_positive_int, help="wake-ups timed per figure")
    p.add_argument("--wake-gap", type=_positive_float,
                   help="seconds the receiver sleeps before each wake-up (0.002)")
    p.add_argument("--mpmc", type=_mpmc_shape, metavar="PxC", help="producers x consumers (2x2)")
    p.add_argument("--placement", choices=("cross", "same"),
                   help="cross: the two processes on different CPUs (default); same: one CPU")
    p.add_argument("--cpus", type=_cpu_pair, metavar="A,B", help="CPUs to pin to (default: first two)")
    p.add_argument("--topology", choices=("host", "host-guest", "guest-guest"), default="host",
                   help="host: two host processes (default); host-guest: a host process and a "
                        "QEMU guest; guest-guest: two QEMU guests (both need qemu-system-x86; "
                        "emulated guests give functional figures, not speed claims)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None,
                   help="guest topologies: run the guests under KVM or TCG; auto (default) uses "
                        "KVM when a probe boot under KVM succeeds within seconds "
                        "(PYIVSHMEM_VM_ACCEL sets the default)")
    p.add_argument("--list", action="store_true", help="list scenarios and peers, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that its clean-up (workers, servers, temp dirs and
    sockets, /dev/shm files) runs as it does for Ctrl-C."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread while the block runs (the default
    action would end the process at once, leaving the run's files and processes behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def interrupted_status(exc: KeyboardInterrupt) -> int:
    """The shell's status for a run ended by ``exc``: 128 + the signal's number."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def _select_peers(spec: str) -> list:
    from .peers import PEERS, peer_by_key

    spec = spec.strip().lower()
    if spec == "all":
        return list(PEERS)
    if spec in ("none", ""):
        return []
    # each once: a peer named twice was measured twice, two rows of one name in every table
    return list(dict.fromkeys(peer_by_key(k.strip()) for k in spec.split(",") if k.strip()))


def _list(out) -> int:
    from .peers import PEERS
    from .runner import SCENARIOS
    from .scenarios import PyivshmemTransport, channel_problem

    print("scenarios: " + ", ".join(SCENARIOS), file=out)
    why = channel_problem()
    if why:
        print(f"  (doorbell figures: {why})", file=out)
    print("transports:", file=out)
    for t in [PyivshmemTransport()] + list(PEERS):
        why = t.unavailable()
        print(f"  {t.key:16s} {t.label:36s} {'ok' if not why else why}", file=out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `pyivshmem bench`; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["pubsub"]:  # its own options: pyivshmem bench pubsub --help
        from .pubsub import main as pubsub_main

        return pubsub_main(args_list[1:])
    if args_list[:1] == ["bridge"]:  # its own options: pyivshmem bench bridge --help
        from .bridge import main as bridge_main

        return bridge_main(args_list[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse's usage errors and --help
        return int(exc.code or 0)

    from .runner import SCENARIOS, Runner, Settings

    if args.list:
        return _list(sys.stdout)
    if args.plot:
        from .report import PlotUnavailable, _matplotlib

        try:
            _matplotlib()
        except PlotUnavailable as exc:
            print(f"pyivshmem bench: {exc}", file=sys.stderr)
            return 2
    try:
        peers = _select_peers(args.peers)
    except KeyError as exc:
        print(f"pyivshmem bench: {exc.args[0]}", file=sys.stderr)
        return 2
    if args.scenarios.strip().lower() == "all":
        scenarios = SCENARIOS
    else:
        scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
        bad = [s for s in scenarios if s not in SCENARIOS]
        if bad or not scenarios:
            print(f"pyivshmem bench: unknown scenario {', '.join(bad) or '(none)'}; choose from "
                  f"{', '.join(SCENARIOS)}", file=sys.stderr)
            return 2
    # everything that could make the run's end fail is checked before the run
    for opt, path in (("--json", args.json), ("--markdown", args.markdown)):
        if not path:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            print(f"pyivshmem bench: {opt} {path}: directory {parent} does not exist",
                  file=sys.stderr)
            return 2
        if os.path.isdir(path):
            print(f"pyivshmem bench: {opt} {path} is a directory; name a file in it, e.g. "
                  f"{os.path.join(path, 'results.json' if opt == '--json' else 'results.md')}",
                  file=sys.stderr)
            return 2
    if args.plot and os.path.exists(args.plot) and not os.path.isdir(args.plot):
        print(f"pyivshmem bench: --plot {args.plot} is not a directory; name a directory "
              "(it is created if missing)", file=sys.stderr)
        return 2
    if args.cpus:
        from .workers import usable_cpus

        bad = [c for c in args.cpus if c not in usable_cpus()]
        if bad:
            print(f"pyivshmem bench: --cpus: this process may not run on CPU "
                  f"{', '.join(map(str, bad))}; choose from "
                  f"{', '.join(map(str, usable_cpus()))}", file=sys.stderr)
            return 2

    s = Settings.preset(args.quick)
    s.scenarios = scenarios
    for name in ("duration", "repeat", "count", "batch", "rtt_samples", "rtt_seconds",
                 "wake_samples", "wake_gap", "placement", "cpus", "max_spread"):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    if args.sizes:
        s.sizes = tuple(args.sizes)
    if args.rtt_size:
        s.rtt_size = args.rtt_size[0]
    if args.mpmc:
        s.mpmc_producers, s.mpmc_consumers = args.mpmc
    s.topology = args.topology

    from .report import build_document, format_markdown, format_report, write_json, write_plots
    from .scenarios import PyivshmemTransport
    from .workers import usable_cpus

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.monotonic()
    settings = s.as_dict()
    if s.topology == "host":
        transports = [PyivshmemTransport()] + peers
        runner = Runner(s, transports, None if args.quiet else progress)
        try:
            with sigterm_interrupts():
                records = runner.run()
        except KeyboardInterrupt as exc:
            print("pyivshmem bench: interrupted", file=sys.stderr)
            return interrupted_status(exc)
        notes = runner.notes
    else:
        from .guests import GuestsUnavailable, check_available, guest_settings, run_guests

        from ..vm.harness import VmUnavailable, choose_accel

        guest = guest_settings(s, {"sizes": args.sizes, "count": args.count,
                                   "rtt_samples": args.rtt_samples,
                                   "wake_samples": args.wake_samples})
        settings["guest"] = guest
        if not args.quiet:
            progress(f"--topology {s.topology}: preparing the guest image "
                     "(cached after the first run)")
        try:
            image = check_available()
        except GuestsUnavailable as exc:
            print(f"pyivshmem bench: --topology {s.topology} needs QEMU guests: {exc}",
                  file=sys.stderr)
            return 2
        try:
            choice = choose_accel(args.accel, image=image)
        except VmUnavailable as exc:
            print(f"pyivshmem bench: --accel {args.accel}: {exc}", file=sys.stderr)
            return 2
        # the choice and its reason, always (also in the table's notes and the JSON settings)
        print(f"pyivshmem bench: {choice.describe()}", file=sys.stderr, flush=True)
        guest.update(accel=choice.accel, accel_reason=choice.reason,
                     accel_requested=choice.requested)
        try:
            with sigterm_interrupts():
                records, notes = run_guests(s, guest, image, list(s.cpus) or usable_cpus(),
                                            None if args.quiet else progress)
        except KeyboardInterrupt as exc:
            print("pyivshmem bench: interrupted", file=sys.stderr)
            return interrupted_status(exc)
    doc = build_document(records, settings, notes, ["pyivshmem", "bench"] + args_list,
                         list(s.cpus) or usable_cpus(), time.monotonic() - started)
    print(format_report(doc))
    if args.json:
        write_json(doc, args.json)
        print(f"JSON written to {args.json}", file=sys.stderr)
    plots = []
    if args.plot:
        plots = write_plots(doc, args.plot)
        for path in plots:
            print(f"plot written to {path}", file=sys.stderr)
    if args.markdown:
        main_plot = next((p for p in plots if p.endswith("pyivshmem_vs_peers.png")), None)
        if main_plot:
            main_plot = os.path.relpath(main_plot, os.path.dirname(os.path.abspath(args.markdown)))
        with open(args.markdown, "w") as f:
            f.write(format_markdown(doc, main_plot) + "\n")
        print(f"Markdown written to {args.markdown}", file=sys.stderr)
    failed = [r for r in records if r["is_pyivshmem"] and r["status"] == "failed"]
    return 1 if failed else 0
