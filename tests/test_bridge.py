"""The bridge: rings forwarded between two bridge processes over ZeroMQ on 127.0.0.1, exactly
once and in order, across SIGKILLs of either bridge; backpressure with flat memory; the message
that says what to install when pyzmq is missing."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pyivshmem import Channel, Region

import _bridge_child as bc
from _procwait import stop

zmq = pytest.importorskip("zmq")

@contextlib.contextmanager
def two_servers_with_peers(tmp_path):
    """Two servers (two hosts' memory, 2 vectors each) and two peers of each: an application's
    and a bridge's, as (app_a, app_b, peer_a, peer_b)."""
    from pyivshmem import Peer, Server

    sa, sb = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    with Server(sa, size="1M", vectors=2) as server_a, Server(sb, size="1M", vectors=2) as server_b:
        server_a.start()
        server_b.start()
        with Peer.connect(sa, timeout=30) as app_a, Peer.connect(sb, timeout=30) as app_b, \
                Peer.connect(sa, timeout=30) as peer_a, Peer.connect(sb, timeout=30) as peer_b:
            yield app_a, app_b, peer_a, peer_b


PY = sys.executable
HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "_bridge_child.py")
SLOT = 1024
MILLION = 1_000_000


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Pair:
    """Two regions (the two hosts), a sending and a receiving bridge process, a producer."""

    def __init__(self, tmp_path, shm, *, slot=SLOT, capacity=1024, spill="8M", extra=(),
                 sender_listens=False, kind="spsc"):
        self.tmp, self.slot, self.spill, self.extra = tmp_path, slot, spill, list(extra)
        self.sender_listens = sender_listens
        self.a, self.b = shm + "-a", shm + "-b"
        self.ra = Region.create(self.a, "32M")
        self.rb = Region.create(self.b, "32M")
        self.ra.create_ring("up", kind, slot_size=slot, capacity=capacity)
        self.rb.create_ring("down", kind, slot_size=slot, capacity=capacity)
        self.port = free_port()
        self.procs = {}
        self.logs = {}

    def bridge_cmd(self, which):
        common = [PY, "-m", "pyivshmem", "bridge", "--stats-interval", "0", "--log-level",
                  "INFO", "--spill-size", self.spill, "--connect-timeout", "2"] + self.extra
        ep = f"tcp://127.0.0.1:{self.port}"
        listens = (which == "tx") == self.sender_listens
        end = ["--listen" if listens else "--connect", ep]
        if which == "rx":
            return common + ["--region", self.b] + end + [
                "--in", "down", "--state-dir", str(self.tmp / "state-b"), "--name", "B"]
        return common + ["--region", self.a] + end + [
            "--out", "up=down", "--state-dir", str(self.tmp / "state-a"), "--name", "A"]

    def start(self, which):
        log = open(self.tmp / f"{which}.log", "ab")
        self.logs[which] = self.tmp / f"{which}.log"
        self.procs[which] = subprocess.Popen(self.bridge_cmd(which), stdout=log,
                                             stderr=subprocess.STDOUT)
        log.close()
        return self.procs[which]

    def kill(self, which):
        p = self.procs[which]
        p.send_signal(signal.SIGKILL)
        p.wait(30)

    def produce(self, count, start=0):
        self.procs["producer"] = subprocess.Popen(
            [PY, CHILD, "produce", self.a, "up", str(start), str(count), str(self.slot)])
        return self.procs["producer"]

    def log_text(self, which):
        return self.logs[which].read_text(errors="replace")

    def close(self):
        for p in self.procs.values():
            stop(p)
        self.ra.close()
        self.rb.close()
        for path in (self.a, self.b):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


@pytest.fixture
def pair(tmp_path, shm_path):
    made = []

    def make(**kw):
        p = Pair(tmp_path, shm_path, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def consume(pair, count, *, on_progress=None, deadline_s=240, stall_s=60, slow=None):
    """Read ``count`` messages from the receiving side's ring, checking each is the next one;
    ``on_progress(n)`` runs after every batch (it may kill and restart bridges).  Bounded in time:
    fails when nothing arrives for ``stall_s`` seconds or all takes longer than ``deadline_s``."""
    ch = Channel(pair.rb.ring("down"))
    got = 0
    start = time.monotonic()
    last = start
    try:
        while got < count:
            now = time.monotonic()
            assert now - start < deadline_s, f"only {got} of {count} messages in {deadline_s} s"
            msgs = ch.recv_many(512 if slow is None else slow[0], timeout=1.0)
            if not msgs:
                assert now - last < stall_s, (
                    f"no message for {stall_s} s after {got}; rx log:\n{pair.log_text('rx')[-3000:]}"
                    f"\ntx log:\n{pair.log_text('tx')[-3000:]}")
                for name, p in pair.procs.items():
                    if name != "producer":
                        assert p.poll() is None, f"bridge {name} exited: {pair.log_text(name)[-3000:]}"
                continue
            last = now
            for m in msgs:
                err = bc.check(m, got, pair.slot)
                assert err is None, f"{err} (after {got} in order)"
                got += 1
            if on_progress is not None:
                on_progress(got)
            if slow is not None:
                time.sleep(slow[1])  # the slow consumer of the backpressure test: its pace
        # exactly once: nothing more arrives after the last one
        extra = ch.recv_many(16, timeout=0.5)
        assert extra == [], f"{len(extra)} message(s) after the last: {extra[0][:8].hex()}"
    finally:
        ch.close()
    return got


def test_million_messages_of_mixed_sizes_arrive_exactly_once_in_order(pair):
    p = pair()
    p.start("rx")
    p.start("tx")
    p.produce(MILLION)
    assert consume(p, MILLION) == MILLION
    assert p.procs["producer"].wait(60) == 0


def test_receiving_bridge_killed_three_times_loses_and_repeats_nothing(pair):
    p = pair()
    p.start("rx")
    p.start("tx")
    p.produce(MILLION)
    kills = [MILLION * k // 5 for k in (1, 2, 3)]

    def on_progress(n):
        if kills and n >= kills[0]:
            kills.pop(0)
            p.kill("rx")
            p.start("rx")

    assert consume(p, MILLION, on_progress=on_progress) == MILLION
    assert not kills
    tx = p.log_text("tx")
    assert "resending" in tx, tx[-2000:]


@pytest.mark.parametrize("killed", ["rx", "tx"])
def test_listening_sender_and_connecting_receiver_killed_lose_and_repeat_nothing(pair, killed):
    """The roles the other way round: the sender listens, the receiver connects."""
    p = pair(sender_listens=True)
    p.start("tx")
    p.start("rx")
    count = 200_000
    p.produce(count)
    kills = [count * k // 4 for k in (1, 2, 3)]

    def on_progress(n):
        if kills and n >= kills[0]:
            kills.pop(0)
            p.kill(killed)
            p.start(killed)

    assert consume(p, count, on_progress=on_progress) == count
    assert not kills


def test_sending_bridge_killed_and_restarted_loses_and_repeats_nothing(pair):
    p = pair()
    p.start("rx")
    p.start("tx")
    p.produce(MILLION)
    kills = [MILLION * k // 4 for k in (1, 2)]

    def on_progress(n):
        if kills and n >= kills[0]:
            kills.pop(0)
            p.kill("tx")
            p.start("tx")

    assert consume(p, MILLION, on_progress=on_progress) == MILLION
    assert not kills
    assert "unacknowledged message(s)" in p.log_text("tx")


def test_backpressure_from_a_slow_consumer_keeps_bridge_memory_flat(pair):
    # 60,000 messages of 3,500 bytes (210 MB) through a 2 MiB window and a consumer that sleeps
    # between small batches: the bridges must hold the producer back, not buffer.
    p = pair(slot=4096, capacity=256, spill="2M")
    p.start("rx")
    p.start("tx")
    count = 60_000
    # wait until both bridges are connected before taking the baseline
    deadline = time.monotonic() + 30
    while "connected to remote bridge" not in p.log_text("tx"):
        assert time.monotonic() < deadline, p.log_text("tx")
        time.sleep(0.05)
    base = {w: rss_kib(p.procs[w].pid) for w in ("tx", "rx")}
    peak = dict(base)
    p.procs["producer"] = subprocess.Popen(
        [PY, "-c", f"import sys; sys.path.insert(0, {HERE!r}); import _bridge_child as c; "
                   f"c.SIZE = 3500; c.produce_fixed({p.a!r}, 'up', {count}, 3500)"])

    def on_progress(n):
        for w in ("tx", "rx"):
            peak[w] = max(peak[w], rss_kib(p.procs[w].pid))

    ch = Channel(p.rb.ring("down"))
    got = 0
    start = time.monotonic()
    try:
        while got < count:
            assert time.monotonic() - start < 240, f"only {got} of {count}"
            msgs = ch.recv_many(16, timeout=5.0)
            for m in msgs:
                assert len(m) == 3500 and int.from_bytes(m[:8], "little") == got, got
                got += 1
            on_progress(got)
            time.sleep(0.002)  # the slow consumer's pace
    finally:
        ch.close()
    growth = {w: (peak[w] - base[w]) / 1024 for w in base}
    print(f"RSS growth of the bridges while 210 MB crossed: {growth} MiB")
    for w, g in growth.items():
        assert g < 48, f"bridge {w} grew by {g:.1f} MiB while 210 MB crossed: it buffers"


def test_both_directions_and_messages_longer_than_a_slot(tmp_path, shm_path):
    """One connection carries both directions; SPSC messages spanning several slots go through."""
    a, b = shm_path + "-a", shm_path + "-b"
    ra, rb = Region.create(a, "8M"), Region.create(b, "8M")
    try:
        for r in (ra, rb):
            r.create_ring("ab", slot_size=256, capacity=64)
            r.create_ring("ba", slot_size=256, capacity=64)
        port = free_port()
        from pyivshmem import Bridge

        ba = Bridge(ra, connect=f"tcp://127.0.0.1:{port}", out={"ab": "ab"}, in_rings=["ba"],
                    state_dir=str(tmp_path / "a"), name="A")
        bb = Bridge(rb, listen=f"tcp://127.0.0.1:{port}", out={"ba": "ba"}, in_rings=["ab"],
                    state_dir=str(tmp_path / "b"), name="B")
        with ba, bb:
            ba.wait_connected(20)
            bb.wait_connected(20)
            sa, sb = Channel(ra.ring("ab")), Channel(rb.ring("ba"))
            da, db = Channel(rb.ring("ab")), Channel(ra.ring("ba"))
            sizes = [0, 1, 255, 256, 257, 1000, 5000, 16 * 256 - 1]
            want_ab = [bytes([i % 251]) * s + b"ab" for i, s in enumerate(sizes * 20)]
            want_ba = [bytes([i % 241]) * s + b"ba" for i, s in enumerate(sizes * 20)]
            got_ab, got_ba = [], []
            ia = ib = 0
            deadline = time.monotonic() + 60
            while len(got_ab) < len(want_ab) or len(got_ba) < len(want_ba):
                assert time.monotonic() < deadline, (len(got_ab), len(got_ba), ba.metrics())
                if ia < len(want_ab) and sa.try_send(want_ab[ia]):
                    ia += 1
                if ib < len(want_ba) and sb.try_send(want_ba[ib]):
                    ib += 1
                got_ab += da.recv_many(64, timeout=0.001)
                got_ba += db.recv_many(64, timeout=0.001)
            assert got_ab == want_ab
            assert got_ba == want_ba
            m = ba.metrics()
            assert m["out"]["ab"]["messages"] == len(want_ab)
            assert m["out"]["ab"]["bytes"] == sum(map(len, want_ab))
            assert m["in"]["ba"]["messages"] == len(want_ba)
            for c in (sa, sb, da, db):
                c.close()
    finally:
        ra.close()
        rb.close()
        os.unlink(a)
        os.unlink(b)


def test_unreachable_remote_is_a_clear_error(tmp_path, region):
    from pyivshmem import Bridge
    from pyivshmem.bridge import RemoteUnreachable

    region.create_ring("up", slot_size=64, capacity=8)
    port = free_port()  # nothing listens there
    with Bridge(region, connect=f"tcp://127.0.0.1:{port}", out={"up": "down"},
                state_dir=str(tmp_path / "s")) as b:
        with pytest.raises(RemoteUnreachable, match="no answer from the remote bridge at "
                           f"tcp://127.0.0.1:{port}.*reachable"):
            b.wait_connected(0.5)
        assert isinstance(RemoteUnreachable("x"), ConnectionError)


def test_bad_configuration_is_refused_with_a_message(tmp_path, region):
    from pyivshmem import Bridge, ConfigError
    from pyivshmem.bridge import BridgeError

    region.create_ring("m", kind="mpmc", slot_size=64, capacity=8)
    region.create_ring("p", kind="pubsub", slot_size=64, capacity=8)
    with pytest.raises(ConfigError, match="exactly one"):
        Bridge(region, out={"m": "m"}, state_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="SPSC and MPMC"):
        Bridge(region, connect="tcp://127.0.0.1:1", out={"p": "m"}, state_dir=str(tmp_path))
    with pytest.raises(BridgeError, match="not in the region"):
        Bridge(region, connect="tcp://127.0.0.1:1", out={"nope": "x"}, state_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="tcp://"):
        Bridge(region, connect="localhost:7000", in_rings=["m"], state_dir=str(tmp_path))
    region.create_ring("s", slot_size=64, capacity=8)
    region.create_ring("t", slot_size=64, capacity=8)
    port = free_port()
    with Bridge(region, listen=f"tcp://127.0.0.1:{port}", in_rings=["s"],
                state_dir=str(tmp_path / "1")):
        with pytest.raises(BridgeError, match=f"cannot listen on tcp://127.0.0.1:{port}"):
            Bridge(region, listen=f"tcp://127.0.0.1:{port}", in_rings=["t"],
                   state_dir=str(tmp_path / "2"))


_BLOCK_ZMQ = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "zmq" or name.startswith("zmq."):
            raise ImportError("blocked for the test: no module named 'zmq'")
sys.meta_path.insert(0, _Block())
"""


def test_without_pyzmq_the_package_works_and_the_bridge_says_what_to_install(tmp_path):
    code = _BLOCK_ZMQ + """
import pyivshmem
from pyivshmem import Region
r = Region.create(sys.argv[1], "64K")
r.create_ring("x", slot_size=64, capacity=8).send(b"ok")
print("package works:", r.ring("x").recv(timeout=1))
r.close()
try:
    pyivshmem.Bridge(None, connect="tcp://127.0.0.1:1", in_rings=["x"], state_dir=".")
except pyivshmem.IvshmemError as e:
    print("Bridge:", type(e).__name__, e)
from pyivshmem.cli import main
sys.exit(main(["bridge", "--region", sys.argv[1], "--connect", "tcp://127.0.0.1:1",
               "--in", "x", "--state-dir", "."]))
"""
    path = f"/dev/shm/pyivshmem-test-nozmq-{os.getpid()}"
    try:
        r = subprocess.run([PY, "-c", code, path], capture_output=True, text=True, timeout=60,
                           cwd=str(tmp_path))
    finally:
        if os.path.exists(path):
            os.unlink(path)
    assert "package works: b'ok'" in r.stdout, r.stdout + r.stderr
    assert "Bridge: BridgeUnavailable" in r.stdout and "pip install 'pyivshmem[bridge]'" in r.stdout
    assert r.returncode == 2
    assert "pip install 'pyivshmem[bridge]'" in r.stderr, r.stderr


def sleeping_bridges(tmp_path, port, peer_a, peer_b):
    """Bridge a (ring "up" to b's "down", connecting) and bridge b (listening), each over its
    server peer's region, sleeping on vector 0 of that peer with no spin budget."""
    from pyivshmem import Bridge

    ba = Bridge(peer_a.region, connect=f"tcp://127.0.0.1:{port}", out={"up": "down"},
                state_dir=str(tmp_path / "a"), doorbell=peer_a, vector=0, spin=0)
    bb = Bridge(peer_b.region, listen=f"tcp://127.0.0.1:{port}", in_rings=["down"],
                state_dir=str(tmp_path / "b"), doorbell=peer_b, vector=0, spin=0)
    return ba, bb


@pytest.mark.timeout(120)
def test_bridges_of_server_peers_sleep_on_doorbells(tmp_path):
    """Rings in two servers' memory (two hosts), bridges that joined them as peers: with no spin
    budget every idle wait sleeps, and the bridges and the applications wake each other by
    doorbell (the eventfds the servers handed out), not by polling."""
    port = free_port()
    with two_servers_with_peers(tmp_path) as (app_a, app_b, peer_a, peer_b):
        app_a.region.create_ring("up", slot_size=64, capacity=16)
        app_b.region.create_ring("down", slot_size=64, capacity=16)
        # the bridges sleep on vector 0 of their peers; the applications on vector 1
        ba, bb = sleeping_bridges(tmp_path, port, peer_a, peer_b)
        with ba, bb:
            ba.wait_connected(20)
            tx = Channel(app_a.region.ring("up"), app_a, vector=1, spin=0)
            rx = Channel(app_b.region.ring("down"), app_b, vector=1, spin=0)
            for i in range(200):
                tx.send(b"message %d" % i, timeout=30)
                assert rx.recv(timeout=30) == b"message %d" % i  # one at a time: idle between
            m_a, m_b = ba.metrics(), bb.metrics()
            # the sending bridge slept on an empty ring and the producer's doorbell woke it
            assert m_a["out"]["up"]["channel"]["wakeups"] > 0, m_a
            assert tx.stats["doorbells"] > 0
            # the consumer slept on an empty ring and the receiving bridge rang it
            assert rx.stats["wakeups"] > 0 and m_b["in"]["down"]["channel"]["doorbells"] > 0, m_b
            tx.close()
            rx.close()


class CuttingProxy:
    """A TCP relay between the two bridges that can cut every connection through it."""

    def __init__(self, upstream_port):
        import threading

        self.up = upstream_port
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.conns = []
        self.lock = threading.Lock()
        self.cuts = 0
        self.closed = False
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        import threading

        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.up), timeout=5)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, u]
            for src, dst in ((c, u), (u, c)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                t.start()
                self.threads.append(t)

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                b = src.recv(1 << 16)
                if not b:
                    break
                dst.sendall(b)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        src.close()  # each socket is the source of exactly one pump

    def cut(self):
        """Reset every connection through the relay (the pumps close the sockets)."""
        with self.lock:
            conns, self.conns = self.conns, []
            self.cuts += 1
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.closed = True
        self.lsock.close()
        self.cut()
        for t in self.threads:
            t.join(5)


def test_cut_connections_lose_and_repeat_nothing(pair):
    p = pair()
    proxy = CuttingProxy(p.port)
    try:
        p.start("rx")
        cmd = p.bridge_cmd("tx")
        cmd[cmd.index(f"tcp://127.0.0.1:{p.port}")] = f"tcp://127.0.0.1:{proxy.port}"
        log = open(p.tmp / "tx.log", "ab")
        p.logs["tx"] = p.tmp / "tx.log"
        p.procs["tx"] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        count = 200_000
        p.produce(count)
        cuts = [count * k // 4 for k in (1, 2, 3)]

        def on_progress(n):
            if cuts and n >= cuts[0]:
                cuts.pop(0)
                proxy.cut()

        assert consume(p, count, on_progress=on_progress) == count
        assert not cuts and proxy.cuts == 3
        assert "lost the connection to the remote bridge" in p.log_text("tx")
    finally:
        proxy.close()


def test_benchmark_runs_both_transports_and_reports_ratios(tmp_path):
    out = tmp_path / "bridge-bench.json"
    r = subprocess.run([PY, "-m", "pyivshmem.bench.bridge", "--rounds", "1", "--count", "3000",
                        "--sizes", "64", "--pings", "20", "--json", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    res = __import__("json").loads(out.read_text())["results"]
    tp = res["throughput"]["64"]
    assert tp["zmq_msgs_per_s"] > 0 and tp["bridge_msgs_per_s"] > 0
    assert tp["ratio"] == pytest.approx(tp["bridge_msgs_per_s"] / tp["zmq_msgs_per_s"])
    assert set(res["roundtrip"]) == {"p50", "p99"}
    assert "bridge/zmq" in r.stdout


def test_pyivshmem_bench_bridge_runs_the_bridge_benchmark_from_the_cli(tmp_path):
    """`pyivshmem bench bridge` (tiny counts, region files): both transports, one ratio each."""
    out = tmp_path / "cli-bridge-bench.json"
    r = subprocess.run([PY, "-m", "pyivshmem", "bench", "bridge", "--rounds", "1", "--count",
                        "2000", "--sizes", "64", "--pings", "10", "--no-doorbells", "--json",
                        str(out)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    res = __import__("json").loads(out.read_text())["results"]
    assert res["throughput"]["64"]["bridge_msgs_per_s"] > 0
    assert res["roundtrip"]["p50"]["bridge_us"] > 0
    assert "bridge/zmq" in r.stdout
    bad = subprocess.run([PY, "-m", "pyivshmem", "bench", "bridge", "--rounds", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "pyivshmem bench bridge" in bad.stderr
