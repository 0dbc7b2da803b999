"""Channel: the wake-up protocol across processes, timeouts, signals, asyncio, polling."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from _fdbell import FdBell, close_fds, make_fds
from _procwait import wait_until_delivered, wait_until_in_wait

from pyivshmem import Channel, ClosedError, ConfigError, Region, WaitTimeout

HERE = os.path.dirname(os.path.abspath(__file__))


def spawn(mode, path, fds, *args):
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_channel_child.py"), mode, path, str(fds[0][0]),
         str(fds[1][0]), *map(str, args)],
        pass_fds=(fds[0][0], fds[1][0]), stdout=subprocess.PIPE, text=True)


@pytest.fixture
def fds():
    f = make_fds([0, 1])
    yield f
    close_fds(f)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind,seed", [("spsc", 1), ("spsc", 2), ("mpmc", 3)])
def test_no_lost_wakeup_randomized(shm_path, fds, kind, seed):
    """Producer and consumer both sleep often (spin=0, tiny ring, random pauses); re-checks are
    60 s apart, so a lost wake-up shows as a sleep that ended without a doorbell.  (Over a real
    server's eventfds: tests/test_chan_wakeup.py.)"""
    count = 20000
    with Region.create(shm_path, "1M") as region:
        ring = region.create_ring("a2b", kind, slot_size=16, capacity=4)
        ch = Channel(ring, FdBell(0, fds), spin=0, recheck=60)
        child = spawn("stress-producer", shm_path, fds, count, seed)
        try:
            expected = 0
            while True:
                m = ch.recv(timeout=120)
                if m == b"END":
                    break
                assert int.from_bytes(m, "little") == expected
                expected += 1
                if expected % 997 == 0:
                    time.sleep(0.0003)  # let the ring fill so the producer sleeps too
            assert expected == count
            prod = json.loads(child.stdout.readline())
            assert child.wait(60) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
    cons = ch.stats
    # both sides really slept and were woken by doorbells
    assert cons["sleeps"] > 0 and cons["wakeups"] > 0 and prod["sleeps"] > 0
    assert cons["received"] == count + 1 and prod["sent"] == count + 1
    # no wake-up was lost: every sleep on either side ended by a doorbell, none by its 60 s
    # re-check (which would only cost time, so the counts, not the timeout, must catch it)
    assert cons["sleeps"] == cons["wakeups"], cons
    assert prod["sleeps"] == prod["wakeups"], prod
    # every wake-up of the consumer was a doorbell of the producer (nobody else rings its fd);
    # the exact "one doorbell per sleep, none while awake" is tested in test_channel_doorbells.py
    assert 0 < cons["wakeups"] <= prod["doorbells"]
    # at most one doorbell per arming of the consumer: per sleep, or per recv that armed and then
    # found a message (those never sleep), which is at most one per message
    assert prod["doorbells"] <= cons["sleeps"] + cons["received"]


@pytest.mark.timeout(120)
def test_echo_round_trips_with_doorbells(shm_path, fds):
    with Region.create(shm_path, "1M") as region:
        a2b = region.create_ring("a2b", slot_size=64, capacity=64)
        b2a = region.create_ring("b2a", slot_size=64, capacity=64)
        child = spawn("echo", shm_path, fds, 0)
        try:
            assert child.stdout.readline().strip() == "ready"
            bell = FdBell(0, fds)
            tx = Channel(a2b, bell, spin=0)
            rx = Channel(b2a, bell, spin=0)
            for i in range(500):
                tx.send(b"%d" % i, timeout=60)
                assert rx.recv(timeout=60) == b"%d" % i
            tx.send(b"END")
            st = json.loads(child.stdout.readline())
            assert child.wait(60) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
    assert st["rx"]["received"] == 501 and st["tx"]["sent"] == 500
    assert rx.stats["wakeups"] > 0


def test_recv_timeout_and_polling_mode(region):
    ring = region.create_ring("p", slot_size=16, capacity=4)
    ch = Channel(ring)  # no doorbell: polls
    assert ch.fileno() == -1
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout):
        ch.recv(timeout=0.05)
    assert time.monotonic() - t0 >= 0.05
    assert ch.try_send(b"x") and ch.recv(timeout=1) == b"x"
    assert ch.send_many([b"1", b"2", b"3", b"4", b"5"]) == 4
    with pytest.raises(WaitTimeout, match="still full"):
        ch.send(b"6", timeout=0.02)
    assert ch.recv_many(10) == [b"1", b"2", b"3", b"4"]
    assert ch.recv_many(10, timeout=0.01) == []
    buf = bytearray(8)
    with pytest.raises(WaitTimeout):  # one rule: a timed-out receive raises, as recv does
        ch.recv_into(buf, timeout=0.01)
    ch.send(b"abc")
    assert ch.recv_into(buf, timeout=1) == 3 and buf[:3] == b"abc"


def test_polling_receiver_gets_message_from_thread(region):
    ring = region.create_ring("t", slot_size=16, capacity=4)
    rx = Channel(ring, recheck=0.01)
    threading.Timer(0.05, lambda: ring.try_send(b"late")).start()
    assert rx.recv(timeout=10) == b"late"


def test_lost_doorbell_costs_latency_not_a_hang(region, fds):
    """A producer with no route to the consumer (it never learnt its fds) cannot ring: the sleeper
    still finds the message at its next re-check."""
    ring = region.create_ring("l", slot_size=16, capacity=4)
    rx = Channel(ring, FdBell(0, fds), spin=0, recheck=0.02)
    tx = Channel(region.ring("l"), FdBell(1, {1: fds[1]}), spin=0)  # knows no peer 0
    me = threading.get_native_id()

    def send_once_asleep():  # sent while the receiver sleeps, so only a re-check can find it
        wait_until_in_wait(os.getpid(), me, what="the receiver's sleep")
        tx.try_send(b"hint lost")

    sender = threading.Thread(target=send_once_asleep, daemon=True)
    sender.start()
    assert rx.recv(timeout=10) == b"hint lost"
    sender.join(10)
    assert tx.stats["unrouted"] >= 1 and tx.stats["doorbells"] == 0


def test_arguments_and_close(region, fds):
    ring = region.create_ring("c", slot_size=16, capacity=4)
    with pytest.raises(ConfigError):
        Channel("not a ring")
    with pytest.raises(ConfigError):
        Channel(ring, vector=64)
    with pytest.raises(ConfigError):
        Channel(ring, recheck=0)
    with Channel(ring, FdBell(0, fds)) as ch:
        assert ch.fileno() == fds[0][0] and ch.ring is ring and ch.vector == 0
        with pytest.raises(ConfigError):
            ch.recv(timeout=-1)
    assert ch.closed
    with pytest.raises(ClosedError):
        ch.try_send(b"x")


@pytest.mark.timeout(60)
def test_sigint_interrupts_blocked_recv(shm_path, fds):
    with Region.create(shm_path, "64K") as region:
        region.create_ring("a2b", slot_size=16, capacity=4)
        child = spawn("block", shm_path, fds, 30)
        try:
            assert child.stdout.readline().strip() == "waiting"
            # the signal must land in the blocked recv: one sent earlier would prove less
            wait_until_in_wait(child.pid, what="its blocked recv")
            child.send_signal(signal.SIGINT)
            assert child.stdout.readline().strip() == "interrupted"
            assert child.wait(30) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()


@pytest.mark.timeout(60)
def test_other_signals_resume_with_remaining_timeout(shm_path, fds):
    with Region.create(shm_path, "64K") as region:
        region.create_ring("a2b", slot_size=16, capacity=4)
        child = spawn("block", shm_path, fds, 5.0)
        try:
            assert child.stdout.readline().strip() == "waiting"
            for _ in range(5):  # each signal lands in the blocked wait, not before or after it
                wait_until_in_wait(child.pid, what="its blocked recv")
                child.send_signal(signal.SIGUSR1)
                wait_until_delivered(child.pid, signal.SIGUSR1)
            line = child.stdout.readline().strip()
            assert line.startswith("timeout"), line
            assert float(line.split()[1]) >= 5.0  # resumed after each signal, never cut short
            assert line.split()[2:] == ["signals", "5"], line  # every signal ran its handler
            assert child.wait(30) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()


def test_asyncio_recv_and_send(region, fds):
    ring = region.create_ring("aio", slot_size=16, capacity=2)
    rx = Channel(ring, FdBell(0, fds), spin=0, recheck=30)
    tx = Channel(region.ring("aio"), FdBell(1, fds), spin=0, recheck=30)

    async def scenario():
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, tx.try_send, b"one")
        got = await asyncio.wait_for(rx.recv_async(), 20)
        with pytest.raises(WaitTimeout):
            await rx.recv_async(timeout=0.02)
        # a full ring: send_async sleeps until the receiver frees a slot
        assert tx.try_send(b"a") and tx.try_send(b"b") and not tx.try_send(b"c")
        loop.call_later(0.05, rx.try_recv)
        await asyncio.wait_for(tx.send_async(b"c"), 20)
        return got

    assert asyncio.run(scenario()) == b"one"
    assert rx.stats["wakeups"] >= 1 and tx.stats["wakeups"] >= 1
    assert [rx.try_recv(), rx.try_recv()] == [b"b", b"c"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["spsc", "mpmc"])
def test_send_many_spins_again_after_each_slot_it_waited_for(region, fds, kind):
    """A batch into a full ring waits slot after slot.  Each wait that follows progress spins
    again first, as a new send() would: with a consumer that frees a slot within the spin, the
    sender never sleeps on the doorbell (it used to spin before the first slot only and then
    sleep before every later one)."""
    ring = region.create_ring("batch", kind=kind, slot_size=64, capacity=2)
    bell = FdBell(0, fds)
    tx = Channel(ring, bell, vector=0, spin=2.0)  # far longer than the consumer needs per slot
    got = []

    def consume():
        r = region.ring("batch")
        while len(got) < 200:
            m = r.try_recv()
            if m is not None:
                got.append(m)

    th = threading.Thread(target=consume)
    th.start()
    try:
        assert tx.send_many([b"%d" % i for i in range(200)], timeout=60) == 200
    finally:
        th.join(60)
    assert got == [b"%d" % i for i in range(200)]
    assert tx.stats["sleeps"] == 0, tx.stats
    tx.close()
