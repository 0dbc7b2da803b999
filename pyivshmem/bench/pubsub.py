"""`pyivshmem bench pubsub` (or `python -m pyivshmem.bench.pubsub`): publish-subscribe throughput and latency, pyivshmem's pubsub
ring against iceoryx2 publish-subscribe, with 1, 2 and 4 subscriber processes, 64 B, 4 KiB and
1 MiB messages, copying and zero-copy receives.  The trials of the two alternate (pyivshmem,
iceoryx2, pyivshmem, ...) so that a change of the machine's speed during the run hits both alike;
each figure is the median of its trials.

Both are lossless (pyivshmem slow="block"; iceoryx2 without overflow, RetryUntilDelivered) and both
poll on both sides (no doorbells, no event service; an empty or full poll yields the CPU, so that
more processes than CPUs still make progress), one message per call, so the figures compare the
two transports' data paths:

- copy: the publisher sends bytes (pyivshmem try_send; iceoryx2 loan, memmove, send), each
  subscriber receives a bytes object (pyivshmem try_recv; iceoryx2 receive + string_at).
- zero-copy: the publisher writes into the slot it loaned (pyivshmem reserve/commit; iceoryx2
  loan/send), each subscriber reads the message in place, touching its first and last byte
  (pyivshmem peek/release; iceoryx2 receive, payload pointer, delete).

Throughput: messages per second delivered to every subscriber (the publisher's count over the time
until the last subscriber has them all).  Latency: the publisher stamps perf_counter_ns (the same
CLOCK_MONOTONIC in every process) into paced messages, every subscriber records arrival minus
stamp; p50 and p99 over all subscribers.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import statistics
import struct
import sys
import time
import uuid
from typing import Dict, List, Optional, Sequence

STOP = 1  # first byte of the last message of a run
STAMP = struct.Struct("<BxxxxxxxQ")  # flag, pad, perf_counter_ns: 16 bytes at the front


def _payload(size: int) -> bytearray:
    pattern = bytes(range(2, 256))
    return bytearray((pattern * (size // len(pattern) + 1))[:size])


# -- processes -----------------------------------------------------------------------------------
def _child(parent, target, *args):
    """A subscriber process: it ends with the benchmark (PR_SET_PDEATHSIG, so even a SIGKILLed
    benchmark leaves no subscriber polling for a stop marker that never comes), and Ctrl-C is
    the benchmark's to handle (it stops its subscribers itself)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the benchmark ended before the prctl
        return
    target(*args)


def _start(ctx, target, args, n):
    procs = [ctx.Process(target=_child, args=(os.getpid(), target) + tuple(args), daemon=True)
             for _ in range(n)]
    for p in procs:
        p.start()
    return procs


class BenchFailed(RuntimeError):
    """A run that cannot give a figure (a subscriber died, a message was lost); the message says
    which."""


def _check_alive(procs):
    """BenchFailed if a subscriber process has ended before its results (is_alive() reaps it:
    unreaped, a killed subscriber stays a zombie that the publisher must take for alive)."""
    for i, p in enumerate(procs):
        if not p.is_alive() and p.exitcode != 0:
            raise BenchFailed(f"subscriber process {i + 1} of {len(procs)} (pid {p.pid}) ended "
                              f"with exit code {p.exitcode} during the run")


def _meet(procs, *barriers, timeout=60.0):
    """The publisher's side of the start barriers; BenchFailed, naming a subscriber that died,
    when they break."""
    import threading

    try:
        for b in barriers:
            b.wait(timeout)
    except threading.BrokenBarrierError:
        for b in barriers:
            b.abort()  # the subscribers still waiting are released (and stopped by _stop)
        _check_alive(procs)
        raise BenchFailed(f"the subscribers did not start within {timeout:.0f} s") from None


def _results(out, procs, timeout=120.0):
    """Every subscriber's (count, end time, latencies), watching that none has died."""
    import queue

    res = []
    deadline = time.monotonic() + timeout
    while len(res) < len(procs):
        try:
            res.append(out.get(timeout=0.1))
            continue
        except queue.Empty:
            pass
        _check_alive(procs)
        if time.monotonic() > deadline:
            raise BenchFailed(f"{len(procs) - len(res)} subscriber(s) did not report within "
                              f"{timeout:.0f} s")
    return res


def _stop(procs):
    """Subscribers still running when a run ends early (an error, Ctrl-C, SIGTERM) are killed."""
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(10)


# -- pyivshmem -----------------------------------------------------------------------------------
def _region_size(size: int, capacity: int) -> int:
    need = 64 * 1024 + capacity * (size + 64) + 16 * 1024
    n = 1 << 16
    while n < need:
        n <<= 1
    return n


def _capacity(size: int) -> int:
    return 8 if size >= 1 << 20 else 64 if size >= 4096 else 1024


def _ivs_sub(path, ready, go, out, mode, latency):
    from pyivshmem import Region

    region = Region.open(path)
    ring = region.ring("bench")
    sub = ring.subscribe()
    ready.wait()
    go.wait()
    count, lat = 0, []
    peek, release, recv = sub.peek, sub.release, sub.try_recv
    now, yield_ = time.perf_counter_ns, os.sched_yield
    while True:
        if mode == "zero-copy":
            v = peek()
            if v is None:
                yield_()
                continue
            flag = v[0]
            _ = v[len(v) - 1]
            if latency:
                lat.append(now() - STAMP.unpack_from(v)[1])
            release()
        else:
            m = recv()
            if m is None:
                yield_()
                continue
            flag = m[0]
            if latency:
                lat.append(now() - STAMP.unpack_from(m)[1])
        if flag == STOP:
            break
        count += 1
    out.put((count, time.perf_counter_ns(), lat))
    sub.close()
    ring.close()
    region.close()


def _ivs_pub(ring, size, mode, seconds, latency, gap_ns, procs=()):
    data = _payload(size)
    try_send, reserve, commit, sched_yield = ring.try_send, ring.reserve, ring.commit, os.sched_yield
    waits = 0

    def yield_():  # a full ring: every 1024th time, see that no subscriber died
        nonlocal waits
        waits += 1
        if not waits & 1023:
            _check_alive(procs)
        sched_yield()

    def publish():  # one message, waiting (yielding the CPU) while the slowest subscriber lags
        if mode == "zero-copy":
            v = reserve(size)
            while v is None:
                yield_()
                v = reserve(size)
            v[:] = data
            commit()
        else:
            while not try_send(data):
                yield_()

    return _publish_for(seconds, latency, gap_ns, data, publish)


def _publish_for(seconds, latency, gap_ns, data, publish):
    """The publisher's loop, the same for both transports: ``publish()`` (which sends ``data``)
    for ``seconds``, paced ``gap_ns`` apart with a timestamp in ``data`` when measuring latency,
    then the stop marker; how many messages were published before it."""
    now = time.perf_counter_ns
    end = now() + int(seconds * 1e9)
    nxt = now()
    sent = 0
    while now() < end:
        if latency:
            while now() < nxt:
                pass
            nxt += gap_ns
            STAMP.pack_into(data, 0, 0, now())
        publish()
        sent += 1
    data[0] = STOP
    publish()
    return sent


def _run_ivs(nsubs, size, mode, seconds, latency, gap_ns):
    from pyivshmem import Region

    ctx = mp.get_context("spawn")
    path = f"/dev/shm/pyivshmem-bench-pubsub-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    cap = _capacity(size)
    region = Region.create(path, _region_size(size, cap))
    procs: list = []
    try:
        ring = region.create_ring("bench", kind="pubsub", slot_size=max(size, 16), capacity=cap)
        ready, go, out = ctx.Barrier(nsubs + 1), ctx.Barrier(nsubs + 1), ctx.Queue()
        procs = _start(ctx, _ivs_sub, (path, ready, go, out, mode, latency), nsubs)
        _meet(procs, ready, go)
        t0 = time.perf_counter_ns()
        sent = _ivs_pub(ring, size, mode, seconds, latency, gap_ns, procs)
        res = _results(out, procs)
        for p in procs:
            p.join(30)
        ring.close()
    finally:
        _stop(procs)
        region.close()
        os.unlink(path)
    return _summary(sent, t0, res)


# -- iceoryx2 ------------------------------------------------------------------------------------
def _iox_service(name, size, nsubs):
    import iceoryx2 as iox2

    iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
    node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
    svc = (node.service_builder(iox2.ServiceName.new(name))
           .publish_subscribe(iox2.Slice[ctypes.c_uint8])
           .enable_safe_overflow(False)
           .subscriber_max_buffer_size(_capacity(size))
           .history_size(0)
           .max_publishers(1)
           .max_subscribers(nsubs)
           .open_or_create())
    return node, svc


def _iox_sub(name, size, nsubs, ready, go, out, mode, latency):
    node, svc = _iox_service(name, size, nsubs)
    sub = svc.subscriber_builder().buffer_size(_capacity(size)).create()
    ready.wait()
    go.wait()
    count, lat = 0, []
    receive, string_at, now = sub.receive, ctypes.string_at, time.perf_counter_ns
    u8 = ctypes.c_uint8
    while True:
        s = receive()
        if s is None:
            os.sched_yield()
            continue
        ptr, n = s.payload_ptr, s.header.number_of_elements
        if mode == "zero-copy":
            flag = u8.from_address(ptr).value
            _ = u8.from_address(ptr + n - 1).value
            if latency:
                lat.append(now() - ctypes.c_uint64.from_address(ptr + 8).value)
        else:
            m = string_at(ptr, n)
            flag = m[0]
            if latency:
                lat.append(now() - STAMP.unpack_from(m)[1])
        s.delete()
        if flag == STOP:
            break
        count += 1
    out.put((count, time.perf_counter_ns(), lat))
    sub.delete()


def _run_iox(nsubs, size, mode, seconds, latency, gap_ns):
    import iceoryx2 as iox2

    ctx = mp.get_context("spawn")
    name = f"pyivshmem-bench/pubsub/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    node, svc = _iox_service(name, max(size, 16), nsubs)
    pub = (svc.publisher_builder().initial_max_slice_len(max(size, 16))
           .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered).create())
    ready, go, out = ctx.Barrier(nsubs + 1), ctx.Barrier(nsubs + 1), ctx.Queue()
    procs = _start(ctx, _iox_sub, (name, max(size, 16), nsubs, ready, go, out, mode, latency),
                   nsubs)
    try:
        _meet(procs, ready, go)
        data = _payload(size)
        buf = (ctypes.c_uint8 * size).from_buffer(data)
        loan, memmove = pub.loan_slice_uninit, ctypes.memmove

        def send_one():
            s = loan(size)
            memmove(s.payload_ptr, buf, size)
            s.assume_init().send()

        t0 = time.perf_counter_ns()
        sent = _publish_for(seconds, latency, gap_ns, data, send_one)
        res = _results(out, procs)
        for p in procs:
            p.join(30)
        del buf
    finally:
        _stop(procs)
    pub.delete()
    return _summary(sent, t0, res)


def _summary(sent, t0, res):
    for count, _, _ in res:
        if count != sent:
            raise BenchFailed(f"a subscriber got {count} of {sent} messages (lossless run)")
    t_end = max(r[1] for r in res)
    lat = sorted(x for r in res for x in r[2])
    d = {"sent": sent, "rate": sent / ((t_end - t0) / 1e9)}
    if lat:
        d["p50_us"] = lat[len(lat) // 2] / 1e3
        d["p99_us"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e3
    return d


# -- driver --------------------------------------------------------------------------------------
MODES = ("copy", "zero-copy")
PEERS = ("pyivshmem", "iceoryx2")
MAX_SUBSCRIBERS = 64  # a pubsub ring's table


def _list_of(parse, what):
    def convert(text):
        out = []
        for part in text.split(","):
            part = part.strip()
            if part:
                try:
                    out.append(parse(part))
                except (ValueError, argparse.ArgumentTypeError) as exc:
                    raise argparse.ArgumentTypeError(f"{part!r}: {exc}") from None
        if not out:
            raise argparse.ArgumentTypeError(f"no {what} given")
        return out
    return convert


def _size(text):
    from pyivshmem import parse_size

    n = parse_size(text, "message size")
    if n < STAMP.size:
        raise argparse.ArgumentTypeError(f"at least {STAMP.size} bytes (the latency stamp)")
    return n


def _subscribers(text):
    n = int(text)
    if not 1 <= n <= MAX_SUBSCRIBERS:
        raise argparse.ArgumentTypeError(f"1 to {MAX_SUBSCRIBERS} subscribers (a ring's table)")
    return n


def _choice(choices):
    def convert(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return text
    return convert


def _positive(kind):
    def convert(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < x < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
        return x
    return convert


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="pyivshmem bench pubsub", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subscribers", default=[1, 2, 4], type=_list_of(_subscribers, "counts"),
                    help="subscriber counts (1,2,4)")
    ap.add_argument("--sizes", default=[64, 4096, 1 << 20], type=_list_of(_size, "sizes"),
                    help="message sizes (64,4K,1M)")
    ap.add_argument("--modes", default=list(MODES), type=_list_of(_choice(MODES), "modes"),
                    help="copy, zero-copy or both (copy,zero-copy)")
    ap.add_argument("--seconds", type=_positive(float), default=1.0,
                    help="seconds per throughput trial")
    ap.add_argument("--repeat", type=_positive(int), default=3, help="trials per figure (median)")
    ap.add_argument("--latency-gap-us", type=_positive(float), default=200.0,
                    help="microseconds between latency probes (paced)")
    ap.add_argument("--quick", action="store_true", help="0.3 s trials, one each")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--peers", default=list(PEERS), type=_list_of(_choice(PEERS), "peers"),
                    help="pyivshmem, iceoryx2 or both (pyivshmem,iceoryx2)")
    args = ap.parse_args(argv)
    if args.json:  # checked now: the figures of a whole run are not lost at its end
        parent = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(parent):
            ap.error(f"--json {args.json}: name a file in an existing directory")
    if args.quick:
        args.seconds, args.repeat = 0.3, 1
    runners = {"pyivshmem": _run_ivs, "iceoryx2": _run_iox}
    peers = list(dict.fromkeys(args.peers))
    if "iceoryx2" in peers:
        try:
            import iceoryx2  # noqa: F401
        except ImportError:
            print("iceoryx2 is not installed (pip install iceoryx2): measuring pyivshmem alone",
                  file=sys.stderr)
            peers.remove("iceoryx2")
    if not peers:
        print("pyivshmem bench pubsub: nothing to measure", file=sys.stderr)
        return 2
    from . import interrupted_status, sigterm_interrupts

    try:
        with sigterm_interrupts():
            results = _run_all(args, peers, runners)
    except KeyboardInterrupt as exc:
        print("pyivshmem bench pubsub: interrupted", file=sys.stderr)
        return interrupted_status(exc)
    except BenchFailed as exc:
        print(f"pyivshmem bench pubsub: {exc}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": args.seconds, "repeat": args.repeat, "results": results}, f,
                      indent=2)
    return 0


def _run_all(args, peers, runners) -> List[Dict]:
    results: List[Dict] = []
    gap = int(args.latency_gap_us * 1000)
    for nsubs in args.subscribers:
        for size in args.sizes:
            for mode in args.modes:
                fig: Dict[str, Dict[str, List[float]]] = {p: {"rate": [], "p50": [], "p99": []}
                                                          for p in peers}
                for _ in range(args.repeat):
                    for p in peers:  # alternated
                        r = runners[p](nsubs, size, mode, args.seconds, False, gap)
                        fig[p]["rate"].append(r["rate"])
                        r = runners[p](nsubs, size, mode, min(args.seconds, 0.5), True, gap)
                        fig[p]["p50"].append(r["p50_us"])
                        fig[p]["p99"].append(r["p99_us"])
                row = {"subscribers": nsubs, "size": size, "mode": mode}
                for p in peers:
                    row[p] = {k: statistics.median(v) for k, v in fig[p].items()}
                results.append(row)
                _print_row(row, peers)
    return results


def _print_row(row, peers):
    size = row["size"]
    label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB" if size >= 1024 else f"{size} B"
    parts = [f"{row['subscribers']} sub  {label:>6s}  {row['mode']:9s}"]
    for p in peers:
        r = row[p]
        parts.append(f"{p}: {r['rate'] / 1e6:7.3f} M/s  p50 {r['p50']:7.1f} us  p99 {r['p99']:8.1f} us")
    if len(peers) == 2:
        a, b = row[peers[0]], row[peers[1]]
        parts.append(f"rate x{a['rate'] / b['rate']:.2f}  p50 x{b['p50'] / a['p50']:.2f}")
    print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    sys.exit(main())
