"""The bridge over MPMC rings: one consumer among several of the local ring, one producer among
several of the remote ring, exactly once and in order across SIGKILLs of either bridge (bridge
processes on 127.0.0.1, like tests/test_bridge.py)."""
import subprocess
import time

import pytest

from pyivshmem import Bridge, Channel, ConfigError, StallError

import _bridge_child as bc
from test_bridge import CHILD, PY, Pair

zmq = pytest.importorskip("zmq")

OTHER = 1 << 40  # the remote ring's other producer numbers its messages from here
SLOT = 512


def run_mpmc(tmp_path, shm_path, count, killed=None, kills=3):
    """Producer -> MPMC "up" (a second, slower consumer beside bridge A) -> bridge A -> bridge B
    -> MPMC "down" (a second producer beside bridge B) -> this reader.  Every message of the
    producer is taken exactly once, by bridge A or by the other consumer; those bridge A took
    arrive, in order, and once; the other producer's arrive too."""
    p = Pair(tmp_path, shm_path, slot=SLOT, capacity=256, kind="mpmc")
    other_out = tmp_path / "other-consumer.bin"
    try:
        p.start("rx")
        p.start("tx")
        p.procs["other-consumer"] = subprocess.Popen(
            [PY, CHILD, "consume-to-file", p.a, "up", str(other_out), "0.002"])
        p.produce(count)
        others = 2000
        p.procs["other-producer"] = subprocess.Popen(
            [PY, CHILD, "produce", p.b, "down", str(OTHER), str(others), str(SLOT)])
        ch = Channel(p.rb.ring("down"))
        bridged = []
        other_seen = 0
        stalls = 0
        due = [count * k // (kills + 1) for k in range(1, kills + 1)] if killed else []
        start = last = time.monotonic()

        def taken_by_other():
            data = other_out.read_bytes() if other_out.exists() else b""
            return [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data) - 7, 8)]

        while True:
            try:
                msgs = ch.recv_many(256, timeout=0.5)
            except StallError:
                # a killed receiving bridge left a slot reserved; its successor finishes it
                # with the resent message
                msgs = []
                stalls += 1
            now = time.monotonic()
            assert now - start < 240, f"{len(bridged)} bridged after 240 s"
            for m in msgs:
                i = int.from_bytes(m[:8], "little")
                if i >= OTHER:
                    assert i == OTHER + other_seen, f"other producer's #{i - OTHER} out of order"
                    other_seen += 1
                    continue
                err = bc.check(m, i, SLOT)
                assert err is None, err
                assert not bridged or i > bridged[-1], (
                    f"message #{i} after #{bridged[-1]}: repeated or out of order")
                bridged.append(i)
            if msgs:
                last = now
                while due and len(bridged) >= due[0] - count // 10:
                    due.pop(0)
                    p.kill(killed)
                    p.start(killed)
            else:
                assert now - last < 60, (f"nothing for 60 s after {len(bridged)}; rx log:\n"
                                         f"{p.log_text('rx')[-3000:]}\ntx log:\n"
                                         f"{p.log_text('tx')[-3000:]}")
                for name in ("rx", "tx"):
                    assert p.procs[name].poll() is None, p.log_text(name)[-3000:]
            if (p.procs["producer"].poll() is not None and other_seen == others
                    and len(bridged) + len(taken_by_other()) >= count):
                break
        assert p.procs["producer"].wait(10) == 0
        assert ch.recv_many(16, timeout=0.5) == [], "messages after the last"
        p.procs["other-consumer"].terminate()
        p.procs["other-consumer"].wait(15)
        other = taken_by_other()
        ch.close()
        assert not set(other) & set(bridged), "taken by both the bridge and the other consumer"
        assert sorted(other + bridged) == list(range(count)), (
            f"{count - len(set(other + bridged))} lost, "
            f"{len(other) + len(bridged) - len(set(other + bridged))} repeated")
        assert not due
        assert len(bridged) > count // 2  # the bridge did most of the work
        return p
    finally:
        p.close()


def test_mpmc_rings_both_sides_exactly_once(tmp_path, shm_path):
    run_mpmc(tmp_path, shm_path, 50_000)


@pytest.mark.parametrize("killed", ["rx", "tx"])
def test_mpmc_bridge_killed_three_times_loses_and_repeats_nothing(tmp_path, shm_path, killed):
    run_mpmc(tmp_path, shm_path, 60_000, killed=killed)


def test_pubsub_ring_is_refused_with_what_is_supported(tmp_path, region):
    region.create_ring("news", "pubsub", slot_size=64, capacity=16)
    with pytest.raises(ConfigError, match="SPSC and MPMC"):
        Bridge(region, connect="tcp://127.0.0.1:1", out={"news": "news"},
               state_dir=str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="SPSC and MPMC"):
        Bridge(region, listen="tcp://127.0.0.1:0", in_rings=["news"],
               state_dir=str(tmp_path / "s2"))


def test_mpmc_sleepers_are_rung_by_the_bridges(tmp_path):
    """Server peers, MPMC rings: the bridges take and deliver by peek/release and reserve/commit,
    which ring nobody, so they ring the sleepers themselves.  The producer (on a ring of 8 slots)
    and the consumer sleep with a re-check interval far beyond the test's timeouts: each message
    gets through only if a doorbell wakes them."""
    from test_bridge import free_port, sleeping_bridges, two_servers_with_peers

    port = free_port()
    with two_servers_with_peers(tmp_path) as (app_a, app_b, peer_a, peer_b):
        app_a.region.create_ring("up", "mpmc", slot_size=64, capacity=8)
        app_b.region.create_ring("down", "mpmc", slot_size=64, capacity=8)
        ba, bb = sleeping_bridges(tmp_path, port, peer_a, peer_b)
        with ba, bb:
            ba.wait_connected(20)
            tx = Channel(app_a.region.ring("up"), app_a, vector=1, spin=0, recheck=600)
            rx = Channel(app_b.region.ring("down"), app_b, vector=1, spin=0, recheck=600)
            for i in range(50):  # one at a time: the consumer sleeps on an empty ring
                tx.send(b"one %d" % i, timeout=10)
                assert rx.recv(timeout=10) == b"one %d" % i
            assert rx.stats["wakeups"] > 0
            for i in range(0, 400, 40):  # bursts: the producer sleeps on a full ring
                burst = [b"burst %d" % k for k in range(i, i + 40)]
                assert tx.send_many(burst, timeout=10) == 40
                got = []
                for _ in range(5):  # recv_many returns [] on timeout: bounded tries
                    got += rx.recv_many(40 - len(got), timeout=10)
                    if len(got) == 40:
                        break
                assert got == burst
            assert tx.stats["wakeups"] > 0, tx.stats
            ba.check()
            bb.check()
            tx.close()
            rx.close()
