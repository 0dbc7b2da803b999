"""The bridge against ZeroMQ used directly from Python, over loopback, in the same run.

    pyivshmem bench bridge [--rounds 3] [--count 200000] [--sizes 64,1024] [--pings 2000]
                           [--json FILE]

(also ``python3 -m pyivshmem.bench.bridge`` and ``bench/bridge_bench.py``, the same options).

Throughput: ``count`` messages from a producer to a consumer.
- *zmq*: a DEALER process sends them in multipart batches of ``--batch`` frames (one frame per
  message) to a ROUTER process, with the same window of unacknowledged batches the bridge keeps
  (an ack per batch), so both run the same flow control;
- *bridge*: producer -> SPSC ring (host A's region) -> ``pyivshmem bridge`` -> TCP ->
  ``pyivshmem bridge`` -> SPSC ring (host B's region) -> consumer, every message exactly once.
Round trip: one message at a time, ``--pings`` times, p50/p99:
- *zmq*: DEALER -> ROUTER echo -> DEALER;
- *bridge*: ring -> bridge -> ring -> echo process -> ring -> bridge -> ring.
Trials alternate (zmq, bridge, zmq, bridge, ...) so a change of the machine's speed during the run
hits both alike.  Prints the medians over the rounds and the ratio bridge / zmq (throughput: the
fraction of the raw transport's rate the bridge keeps; round trip: how many times longer; CPU per
message: the two bridge processes against ZeroMQ's two ends, a figure that a busy machine
disturbs less than rates).
By default each "host" is a pyivshmem Server and the bridges, producers and consumers join it as
peers, so idle waits sleep on doorbells (`pyivshmem bridge --server`); ``--no-doorbells`` uses
/dev/shm region files instead, where idle waits poll with back-off up to 1 ms.
"""
import argparse
import ctypes
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import signal
import time

PY = sys.executable
ME = ["-m", "pyivshmem.bench.bridge"]  # how child processes run this module's roles
SLOTS = 1024  # slots of every ring of a Bridged pair
REGION = 64 << 20  # each side's region: 3 rings of SLOTS slots
MAX_SIZE = 16 << 10  # the largest message those rings take (slot = the largest --sizes)
FIRST_BATCH = 512  # the bridged consumer's recv_many: its first batch starts the clock


def _popen(args, **kw):
    """A child process that gets SIGTERM when this benchmark ends, however it ends (SIGKILL
    included): none of the bridges, producers, sinks and echoes it starts waits on for good.
    The child sets that up itself (``_exec`` below, then execv): no Python code runs between
    fork and exec in this process, which has threads."""
    return subprocess.Popen([PY, *ME, "_exec", str(os.getpid()), *args], **kw)


def _exec_dying_with(parent, args):
    """``_exec PARENT ARGS...``: PR_SET_PDEATHSIG(SIGTERM), kept across the execv of ARGS."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it ended before the prctl
        sys.exit(1)
    os.execv(args[0], args)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def payloads(size, n=256):
    return [bytes([i & 255]) * size for i in range(n)]


def open_side(where):
    """(region, doorbell provider or None, closer) for a region file or a server's socket."""
    from pyivshmem import Peer, Region

    if where.endswith(".sock"):
        peer = Peer.connect(where, timeout=30)
        return peer.region, peer, peer.close
    r = Region.open(where)
    return r, None, r.close


# -- roles run in child processes ----------------------------------------------------------------

def role_zmq_sink(port, count, batch):
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(f"tcp://127.0.0.1:{port}")
    got = 0
    t0 = None
    while got < count:
        frames = s.recv_multipart()
        if t0 is None:  # timed from the first batch, as the bridged consumer is
            t0, first, c0 = time.perf_counter(), len(frames) - 1, time.process_time()
        got += len(frames) - 1
        s.send_multipart([frames[0], b"A"])
    print(json.dumps({"rate": (count - first) / (time.perf_counter() - t0),
                      "cpu": time.process_time() - c0}), flush=True)
    s.close(0)
    ctx.term()


def role_zmq_source(port, count, size, batch, window):
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{port}")
    msgs = payloads(size)
    sent = inflight = 0
    c0 = time.process_time()
    while sent < count:
        while inflight >= window:
            s.recv()
            inflight -= 1
        n = min(batch, count - sent)
        s.send_multipart(msgs[:n] if n <= len(msgs) else (msgs * (n // len(msgs) + 1))[:n])
        sent += n
        inflight += 1
    while inflight:
        s.recv()
        inflight -= 1
    print(json.dumps({"cpu": time.process_time() - c0}), flush=True)
    s.close(0)
    ctx.term()


def role_zmq_echo(port):
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(f"tcp://127.0.0.1:{port}")
    while True:
        frames = s.recv_multipart()
        if frames[1] == b"stop":
            break
        s.send_multipart(frames)
    s.close(0)
    ctx.term()


def role_ring_producer(path, count, size):
    from pyivshmem import Channel

    r, bell, closer = open_side(path)
    ch = Channel(r.ring("up"), bell, vector=0)
    msgs = payloads(size)
    sent = 0
    while sent < count:
        n = min(len(msgs), count - sent)
        k = 0
        while k < n:
            k += ch.send_many(msgs[k:n], timeout=60)
        sent += n
    ch.close()
    closer()


def role_ring_echo(path):
    from pyivshmem import Channel

    r, bell, closer = open_side(path)
    rx, tx = Channel(r.ring("ping"), bell, vector=0), Channel(r.ring("pong"), bell, vector=1)
    while True:
        m = rx.recv(timeout=60)
        tx.send(m, timeout=60)
        if m == b"stop":
            break
    rx.close()
    tx.close()
    closer()


# -- trials ----------------------------------------------------------------------------------------

def zmq_throughput(count, size, batch):
    port = free_port()
    sink = _popen([PY, *ME, "_role", "zmq_sink", str(port), str(count), str(batch)],
                            stdout=subprocess.PIPE, text=True)
    src = _popen([PY, *ME, "_role", "zmq_source", str(port), str(count), str(size),
                            str(batch), "64"], stdout=subprocess.PIPE, text=True)
    out = json.loads(sink.communicate(timeout=600)[0])
    src_cpu = json.loads(src.communicate(timeout=60)[0])["cpu"]
    return out["rate"], (out["cpu"] + src_cpu) / count * 1e6


def cpu_seconds(pid):
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def zmq_roundtrip(pings, size):
    import zmq

    port = free_port()
    echo = _popen([PY, *ME, "_role", "zmq_echo", str(port)])
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{port}")
    msg = b"p" * size
    s.send(msg)
    s.recv()  # connected
    lat = []
    for _ in range(pings):
        t = time.perf_counter_ns()
        s.send(msg)
        s.recv()
        lat.append(time.perf_counter_ns() - t)
    s.send(b"stop")
    echo.wait(30)
    s.close(0)
    ctx.term()
    return lat


class Bridged:
    """Two regions (two hosts) and two bridge processes between them, kept for the whole run."""

    def __init__(self, tmp, slot, doorbells, source=None):
        self.tmp = tmp
        self.procs, self.closers = [], []
        try:
            self._start(tmp, slot, doorbells, source)
        except BaseException:
            self.close()
            raise

    def _start(self, tmp, slot, doorbells, source):
        from pyivshmem import Peer, Region, Server

        os.makedirs(tmp, exist_ok=True)
        env = None
        if source is not None:  # the bridge processes run another tree's pyivshmem
            env = dict(os.environ, PYTHONPATH=os.path.abspath(source))
        if doorbells:  # two servers (the two hosts); everyone joins as a peer, sleeps on doorbells
            self.a, self.b = os.path.join(tmp, "a.sock"), os.path.join(tmp, "b.sock")
            for sock in (self.a, self.b):
                srv = Server(sock, size=REGION, vectors=4)
                srv.start()
                self.closers.append(srv.close)
            self.pa, self.pb = Peer.connect(self.a), Peer.connect(self.b)
            self.closers[:0] = [self.pa.close, self.pb.close]
            self.ra, self.rb = self.pa.region, self.pb.region
            where = ["--server", self.a, "--vector", "0"], ["--server", self.b, "--vector", "0"]
        else:
            self.pa = self.pb = None
            tag = "base" if source else "this"
            self.a = f"/dev/shm/pyivshmem-bb-{os.getpid()}-{tag}-a"
            self.b = f"/dev/shm/pyivshmem-bb-{os.getpid()}-{tag}-b"
            self.ra = Region.create(self.a, REGION)
            self.closers += [self.ra.close, lambda: os.unlink(self.a)]
            self.rb = Region.create(self.b, REGION)
            self.closers += [self.rb.close, lambda: os.unlink(self.b)]
            where = ["--region", self.a], ["--region", self.b]
        for r in (self.ra, self.rb):
            r.create_ring("ping", slot_size=slot, capacity=SLOTS)
            r.create_ring("pong", slot_size=slot, capacity=SLOTS)
        self.ra.create_ring("up", slot_size=slot, capacity=SLOTS)
        self.rb.create_ring("down", slot_size=slot, capacity=SLOTS)
        port = free_port()
        common = [PY, "-m", "pyivshmem", "bridge", "--stats-interval", "0", "--log-level",
                  "WARNING"]
        self.procs.append(
            _popen(common + where[1] + ["--listen", f"tcp://127.0.0.1:{port}",
                                       "--in", "down", "--in", "ping", "--out", "pong",
                                       "--state-dir", os.path.join(tmp, "b")], env=env))
        self.procs.append(
            _popen(common + where[0] + ["--connect", f"tcp://127.0.0.1:{port}",
                                       "--out", "up=down", "--out", "ping", "--in", "pong",
                                       "--state-dir", os.path.join(tmp, "a")], env=env))

    def throughput(self, count, size):
        from pyivshmem import Channel

        ch = Channel(self.rb.ring("down"), self.pb, vector=1)
        c0 = sum(cpu_seconds(p.pid) for p in self.procs)
        prod = _popen([PY, *ME, "_role", "ring_producer", self.a, str(count), str(size)])
        got = 0
        t0 = None
        while got < count:
            msgs = ch.recv_many(FIRST_BATCH, timeout=60)
            if not msgs:
                raise RuntimeError(f"bridged throughput stalled after {got} messages")
            if t0 is None:  # timed from the first batch, as the zmq sink is
                t0, first = time.perf_counter(), len(msgs)
            got += len(msgs)
        el = time.perf_counter() - t0
        cpu = sum(cpu_seconds(p.pid) for p in self.procs) - c0
        prod.wait(60)
        ch.close()
        return (count - first) / el, cpu / count * 1e6

    def roundtrip(self, pings, size):
        from pyivshmem import Channel

        echo = _popen([PY, *ME, "_role", "ring_echo", self.b])
        tx = Channel(self.ra.ring("ping"), self.pa, vector=0)
        rx = Channel(self.ra.ring("pong"), self.pa, vector=1)
        msg = b"p" * size
        tx.send(msg, timeout=30)
        rx.recv(timeout=30)  # both bridges connected
        lat = []
        for _ in range(pings):
            t = time.perf_counter_ns()
            tx.send(msg, timeout=30)
            rx.recv(timeout=30)
            lat.append(time.perf_counter_ns() - t)
        tx.send(b"stop", timeout=30)
        rx.recv(timeout=30)
        echo.wait(30)
        tx.close()
        rx.close()
        return lat

    def close(self):
        procs, self.procs = self.procs, []
        closers, self.closers = self.closers, []
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for c in closers:
            c()


def pct(lat, q):
    s = sorted(lat)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="pyivshmem bench bridge",
                                 description=__doc__.split("\n\n")[0])
    from . import _positive_int, _size_list

    def sizes_type(text):
        sizes = _size_list(text)
        big = [n for n in sizes if n > MAX_SIZE]
        if big:
            raise argparse.ArgumentTypeError(
                f"{big[0]} bytes: at most {MAX_SIZE} (the benchmark's rings hold {SLOTS} slots "
                f"of the largest size in a {REGION >> 20} MiB region)")
        return sizes

    ap.add_argument("--rounds", type=_positive_int, default=3, help="trials of each figure")
    ap.add_argument("--count", type=_positive_int, default=200_000,
                    help="messages per throughput trial")
    ap.add_argument("--sizes", default=[64, 1024], type=sizes_type,
                    help=f"message sizes, comma-separated, 8 to {MAX_SIZE >> 10}K (64,1024)")
    ap.add_argument("--batch", type=_positive_int, default=256,
                    help="messages per ZeroMQ batch of the direct trials")
    ap.add_argument("--pings", type=_positive_int, default=2000,
                    help="round trips per round-trip trial")
    ap.add_argument("--no-doorbells", action="store_true",
                    help="regions in /dev/shm files and no doorbells (idle waits poll with "
                         "back-off up to 1 ms) instead of two servers whose peers ring each other")
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run the bridge of another source tree (DIR holds its pyivshmem "
                         "package, built), in the same alternation: this bridge against that one")
    ap.add_argument("--json", metavar="FILE")
    try:
        args = ap.parse_args(argv)
        if args.json and (os.path.isdir(args.json)
                          or not os.path.isdir(os.path.dirname(os.path.abspath(args.json)))):
            # checked now: the figures of a whole run are not lost at its end
            ap.error(f"--json {args.json}: name a file in an existing directory")
        if args.count <= max(args.batch, FIRST_BATCH):
            # each rate is timed from its first batch: a run of one batch has no rate
            ap.error(f"--count {args.count}: more than {max(args.batch, FIRST_BATCH)} messages "
                     f"(--batch and the consumer's first batch of up to {FIRST_BATCH})")
    except SystemExit as exc:  # usage errors and --help: a status, as `pyivshmem bench` returns
        return int(exc.code or 0)
    try:
        import zmq  # noqa: F401
    except ImportError:
        print("pyivshmem bench bridge: the bridge benchmark needs pyzmq: "
              "pip install 'pyivshmem[bridge]'", file=sys.stderr)
        return 2
    from . import interrupted_status, sigterm_interrupts

    sizes = args.sizes
    try:
        with sigterm_interrupts():
            res, kinds = _run(args, sizes)
    except KeyboardInterrupt as exc:
        print("pyivshmem bench bridge: interrupted", file=sys.stderr)
        return interrupted_status(exc)
    _report(args, sizes, res, kinds)
    return 0


def _run(args, sizes):
    tmp = tempfile.mkdtemp(prefix="pyivshmem-bridge-bench-")
    kinds = {}
    res = {"throughput": {s: {k: [] for k in ["zmq", "bridge", "baseline"]} for s in sizes},
           "cpu": {s: {k: [] for k in ["zmq", "bridge", "baseline"]} for s in sizes},
           "roundtrip": {k: [] for k in ["zmq", "bridge", "baseline"]}}
    try:
        kinds["bridge"] = Bridged(os.path.join(tmp, "this"), max(sizes), not args.no_doorbells)
        if args.baseline:
            kinds["baseline"] = Bridged(os.path.join(tmp, "base"), max(sizes),
                                        not args.no_doorbells, source=args.baseline)
        for b in kinds.values():
            b.roundtrip(10, 64)  # warm up: both bridges connected
        for r in range(args.rounds):
            for s in sizes:
                rate, cpu = zmq_throughput(args.count, s, args.batch)
                res["throughput"][s]["zmq"].append(rate)
                res["cpu"][s]["zmq"].append(cpu)
                for k, b in kinds.items():
                    rate, cpu = b.throughput(args.count, s)
                    res["throughput"][s][k].append(rate)
                    res["cpu"][s][k].append(cpu)
            res["roundtrip"]["zmq"].append(zmq_roundtrip(args.pings, 64))
            for k, b in kinds.items():
                res["roundtrip"][k].append(b.roundtrip(args.pings, 64))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for b in kinds.values():
            b.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return res, kinds


def _report(args, sizes, res, kinds):
    out = {"throughput": {}, "roundtrip": {}}
    base = "baseline" in kinds
    head = f"{'figure':34s} {'zmq direct':>14s} {'bridged':>14s} {'bridge/zmq':>11s}"
    if base:
        head += f" {'baseline':>14s} {'baseline/zmq':>13s}"
    print(head)
    for s in sizes:
        z = statistics.median(res["throughput"][s]["zmq"])
        b = statistics.median(res["throughput"][s]["bridge"])
        out["throughput"][s] = {"zmq_msgs_per_s": z, "bridge_msgs_per_s": b, "ratio": b / z}
        line = f"{f'throughput {s} B (msg/s)':34s} {z:14,.0f} {b:14,.0f} {b / z:10.2f}x"
        if base:
            o = statistics.median(res["throughput"][s]["baseline"])
            out["throughput"][s].update(baseline_msgs_per_s=o, baseline_ratio=o / z)
            line += f" {o:14,.0f} {o / z:12.2f}x"
        print(line)
    for s in sizes:  # the transport's CPU: ZeroMQ's two ends against the two bridges
        z = statistics.median(res["cpu"][s]["zmq"])
        b = statistics.median(res["cpu"][s]["bridge"])
        out["throughput"][s].update(zmq_cpu_us=z, bridge_cpu_us=b)
        line = f"{f'CPU per message {s} B (us)':34s} {z:14,.2f} {b:14,.2f} {b / z:10.2f}x"
        if base:
            o = statistics.median(res["cpu"][s]["baseline"])
            out["throughput"][s].update(baseline_cpu_us=o)
            line += f" {o:14,.2f} {o / z:12.2f}x"
        print(line)
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        z = statistics.median(pct(lat, q) for lat in res["roundtrip"]["zmq"])
        b = statistics.median(pct(lat, q) for lat in res["roundtrip"]["bridge"])
        out["roundtrip"][name] = {"zmq_us": z, "bridge_us": b, "ratio": b / z}
        line = f"{f'round trip 64 B {name} (us)':34s} {z:14,.1f} {b:14,.1f} {b / z:10.2f}x"
        if base:
            o = statistics.median(pct(lat, q) for lat in res["roundtrip"]["baseline"])
            out["roundtrip"][name].update(baseline_us=o, baseline_ratio=o / z)
            line += f" {o:14,.1f} {o / z:12.2f}x"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": out}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_exec":
        _exec_dying_with(int(sys.argv[2]), sys.argv[3:])
    if len(sys.argv) > 1 and sys.argv[1] == "_role":
        role, rest = sys.argv[2], sys.argv[3:]
        fn = globals()[f"role_{role}"]
        fn(*[a if a.startswith("/") else int(a) for a in rest])
        sys.exit(0)
    sys.exit(main())
