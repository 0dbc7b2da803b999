"""Publish-subscribe across processes: 1, 4 and 32 subscriber processes each receive every
message of a 1,000,000-message stream exactly once and in order; late joiners and early leavers;
subscribers SIGSTOPped and SIGKILLed mid-stream under both slow policies; doorbell wake-ups of
every sleeping subscriber.

Run as a script, this file is the subscriber child:
    python test_pubsub_stream.py PATH RING MODE ARG...   (prints "ready <joined_at>", then JSON)
"""
import json
import os
import signal
import subprocess
import sys
import time
from array import array

import pytest

HERE = os.path.abspath(__file__)
BATCH = 4096


# -- the child ------------------------------------------------------------------------------------
def child_main(argv):
    from pyivshmem import Channel, Region, SubscriberDroppedError

    path, name, mode = argv[:3]
    args = argv[3:]
    region = Region.open(path)
    ring = region.ring(name)
    sub = ring.subscribe()
    endpoint = sub
    if mode == "bell":
        sys.path.insert(0, os.path.dirname(HERE))
        from _fdbell import FdBell

        fds = {0: [int(args[1])], int(args[3]): [int(args[2])]}
        endpoint = Channel(sub, FdBell(int(args[3]), fds), spin=0, recheck=60)
        args = args[:1]
    print("ready", sub.joined_at, flush=True)
    end = int(args[0])
    stop_after = int(args[1]) if len(args) > 1 and mode == "leave" else None
    expect = first = sub.joined_at
    out = {"first": first}
    try:
        while expect < end:
            want = BATCH if stop_after is None else min(BATCH, first + stop_after - expect)
            if want <= 0:
                break
            batch = endpoint.recv_many(want, timeout=60)
            if not batch:
                out["error"] = f"nothing for 60 s at {expect}"
                break
            data = b"".join(batch)
            got = array("Q")
            got.frombytes(data[: len(data) // 8 * 8])
            if len(data) != 8 * len(batch) or got != array("Q", range(expect, expect + len(batch))):
                bad = next((k for k in range(len(batch))
                            if batch[k] != (expect + k).to_bytes(8, "little")), None)
                out["error"] = f"at {expect}+{bad}: got {batch[bad]!r}"
                break
            expect += len(batch)
            if mode == "pause" and expect >= int(args[1]) and "paused" not in out:
                out["paused"] = expect
                print("paused", expect, flush=True)
                time.sleep(3600)  # stops reading here; the test kills or stops it
    except SubscriberDroppedError as e:
        out["dropped"] = {"reason": e.reason, "behind": e.behind, "message": str(e)}
    out["received"] = expect - first
    out["last"] = expect
    if mode == "bell":
        out["stats"] = endpoint.stats
    sub.close()
    ring.close()
    region.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    child_main(sys.argv[1:])
    sys.exit(0)


# -- the tests ------------------------------------------------------------------------------------
from pyivshmem import Channel, Region, WaitTimeout  # noqa: E402


def spawn(path, name, mode, *args, pass_fds=()):
    p = subprocess.Popen([sys.executable, HERE, path, name, mode, *map(str, args)],
                         stdout=subprocess.PIPE, text=True, pass_fds=pass_fds)
    return p


def wait_ready(children):
    starts = []
    for c in children:
        line = c.stdout.readline().split()
        assert line and line[0] == "ready", f"child did not start: {line}"
        starts.append(int(line[1]))
    return starts


def result(child, timeout=120):
    out = json.loads(child.stdout.readline())
    assert child.wait(timeout) == 0
    return out


def reap(children):
    for c in children:
        if c.poll() is None:
            try:
                os.kill(c.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            c.kill()
            c.wait()
        c.stdout.close()


def messages(start, stop):
    return [i.to_bytes(8, "little") for i in range(start, stop)]


def publish(ring, start, stop, timeout=60):
    for lo in range(start, stop, BATCH):
        chunk = messages(lo, min(stop, lo + BATCH))
        assert ring.send_many(chunk, timeout=timeout) == len(chunk), f"stuck at {lo}"


def run_stream(path, nsubs, total, capacity):
    with Region.create(path, "4M") as region:
        ring = region.create_ring("fan", kind="pubsub", slot_size=8, capacity=capacity)
        children = [spawn(path, "fan", "all", total) for _ in range(nsubs)]
        try:
            assert wait_ready(children) == [0] * nsubs
            t0 = time.monotonic()
            publish(ring, 0, total)
            results = [result(c) for c in children]
            elapsed = time.monotonic() - t0
        finally:
            reap(children)
        for r in results:
            assert "error" not in r, r
            assert r["received"] == total and r["first"] == 0 and r["last"] == total
        assert ring.stats["cuts"] == 0
        ring.close()
        return elapsed


@pytest.mark.timeout(180)
@pytest.mark.parametrize("nsubs", [1, 4, 32])
def test_million_messages_to_every_subscriber(shm_path, nsubs, report_figure):
    """Each of 1, 4 or 32 subscriber processes gets all 1,000,000 messages, exactly once, in order
    (each message is its index; every batch is compared with the expected run of indices)."""
    elapsed = run_stream(shm_path, nsubs, 1_000_000, 1 << 16)
    report_figure(f"pubsub: 1,000,000 messages to {nsubs} subscriber process(es) in {elapsed:.1f} s")


@pytest.mark.timeout(120)
def test_small_ring_many_subscribers_wraps_often(shm_path):
    """A 64-slot ring with 8 subscribers: the publisher waits on them thousands of times."""
    run_stream(shm_path, 8, 100_000, 64)


@pytest.mark.timeout(120)
def test_late_join_and_early_leave(shm_path):
    total = 300_000
    with Region.create(shm_path, "4M") as region:
        ring = region.create_ring("fan", kind="pubsub", slot_size=8, capacity=4096)
        steady = spawn(shm_path, "fan", "all", total)
        leaver = spawn(shm_path, "fan", "leave", total, 50_000)
        children = [steady, leaver]
        try:
            wait_ready(children)
            publish(ring, 0, 100_000)
            late = spawn(shm_path, "fan", "all", total)
            children.append(late)
            (joined,) = wait_ready([late])
            assert joined >= 100_000
            publish(ring, 100_000, total)
            r_steady, r_leaver, r_late = (result(c) for c in children)
        finally:
            reap(children)
        assert "error" not in r_steady and r_steady["received"] == total
        assert "error" not in r_leaver and r_leaver["received"] == 50_000 and r_leaver["last"] == 50_000
        assert "error" not in r_late and r_late["first"] == joined and r_late["last"] == total
        assert ring.stats["cuts"] == 0  # the leaver left; nobody had to be cut off
        assert ring.subscribers() == []
        ring.close()


def start_with_pauser(path, slow, slow_timeout, total, pause_at):
    region = Region.create(path, "4M")
    ring = region.create_ring("fan", kind="pubsub", slot_size=8, capacity=1024, slow=slow,
                              slow_timeout=slow_timeout)
    others = [spawn(path, "fan", "all", total) for _ in range(2)]
    pauser = spawn(path, "fan", "pause", total, pause_at)
    wait_ready(others + [pauser])
    return region, ring, others, pauser


def wait_paused(pauser):
    line = pauser.stdout.readline().split()
    assert line and line[0] == "paused", line
    return int(line[1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("slow", ["block", "drop"])
def test_sigkilled_subscriber_never_blocks_the_publisher(shm_path, slow):
    total, pause_at = 200_000, 20_000
    region, ring, others, pauser = start_with_pauser(shm_path, slow, 3600.0, total, pause_at)
    try:
        publish(ring, 0, pause_at)
        wait_paused(pauser)
        pauser.kill()
        pauser.wait()  # reaped: its pid is gone (a zombie still counts as alive)
        publish(ring, pause_at, total, timeout=30)  # slow_timeout is an hour: only death frees it
        results = [result(c) for c in others]
        assert ring.stats["cuts"] == 1 and ring.stats["last_reason"] == "dead"
        assert all("error" not in r and r["received"] == total for r in results), results
        assert len(ring.subscribers()) == 0  # the dead one's entry was freed
    finally:
        reap(others + [pauser])
        ring.close()
        region.close()


@pytest.mark.timeout(120)
def test_sigstopped_subscriber_under_block_holds_the_publisher_until_continued(shm_path):
    total, pause_at = 100_000, 10_000
    region, ring, others, pauser = start_with_pauser(shm_path, "block", 3600.0, total, pause_at)
    try:
        publish(ring, 0, pause_at)
        wait_paused(pauser)
        pauser.send_signal(signal.SIGSTOP)
        publish(ring, pause_at, pause_at + 1024)  # the ring is full for the stopped one now
        with pytest.raises(WaitTimeout, match="held back by subscriber .*1024 messages behind"):
            ring.send((pause_at + 1024).to_bytes(8, "little"), timeout=0.3)
        pauser.send_signal(signal.SIGCONT)  # it wakes in sleep(3600): end it, then go on
        pauser.kill()
        pauser.wait()
        publish(ring, pause_at + 1024, total, timeout=30)
        results = [result(c) for c in others]
        assert all("error" not in r and r["received"] == total for r in results), results
    finally:
        reap(others + [pauser])
        ring.close()
        region.close()


@pytest.mark.timeout(120)
def test_sigstopped_subscriber_under_drop_is_cut_off(shm_path):
    total, pause_at = 100_000, 10_000
    region, ring, others, pauser = start_with_pauser(shm_path, "drop", 0.2, total, pause_at)
    stopper = None
    try:
        publish(ring, 0, pause_at)
        wait_paused(pauser)
        pauser.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        publish(ring, pause_at, total, timeout=30)  # waits 0.2 s once, then streams on
        assert time.monotonic() - t0 >= 0.2
        results = [result(c) for c in others]
        assert all("error" not in r and r["received"] == total for r in results), results
        assert ring.stats["cuts"] == 1 and ring.stats["last_reason"] == "slow"
        listed = [s for s in ring.subscribers() if s["state"] == "dropped"]
        assert len(listed) == 1 and listed[0]["cut_behind"] == 1024 and listed[0]["pid"] == pauser.pid
        # (that a cut-off process is told at its next call: the test below)
    finally:
        reap(others + [pauser])
        ring.close()
        region.close()


@pytest.mark.timeout(120)
def test_dropped_subscriber_process_gets_the_error_with_how_far_behind(shm_path):
    """A subscriber process that stops reading (busy elsewhere) under slow='drop' raises
    SubscriberDroppedError at its next call, saying how far behind it was."""
    total = 20_000
    with Region.create(shm_path, "4M") as region:
        ring = region.create_ring("fan", kind="pubsub", slot_size=8, capacity=256, slow="drop",
                                  slow_timeout=0.1)
        child = spawn(shm_path, "fan", "all", total)
        try:
            wait_ready([child])
            child.send_signal(signal.SIGSTOP)
            publish(ring, 0, total, timeout=30)
            child.send_signal(signal.SIGCONT)
            r = result(child)
        finally:
            reap([child])
        assert r["dropped"]["reason"] == "slow" and r["dropped"]["behind"] >= 256
        assert "messages behind" in r["dropped"]["message"]
        assert r["received"] <= 256
        ring.close()


@pytest.mark.timeout(120)
def test_doorbells_wake_every_sleeping_subscriber(shm_path):
    """Four subscriber processes sleep on doorbells (spin 0, re-checks a minute apart: a lost
    wake-up would stall the run); the publisher's Channel rings every armed sleeper."""
    from _fdbell import FdBell

    total, nsubs = 3000, 4
    fds = {p: [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)] for p in range(nsubs + 1)}
    with Region.create(shm_path, "1M") as region:
        ring = region.create_ring("fan", kind="pubsub", slot_size=8, capacity=16, slow_timeout=3600)
        children = [spawn(shm_path, "fan", "bell", total, fds[0][0], fds[p][0], p,
                          pass_fds=(fds[0][0], fds[p][0])) for p in range(1, nsubs + 1)]
        try:
            wait_ready(children)
            ch = Channel(ring, FdBell(0, fds), spin=0, recheck=60)
            for i in range(total):
                ch.send(i.to_bytes(8, "little"), timeout=30)
                if i % 100 == 0:
                    time.sleep(0.002)  # let them all fall asleep
            results = [result(c) for c in children]
        finally:
            reap(children)
            for lst in fds.values():
                os.close(lst[0])
        for r in results:
            assert "error" not in r and r["received"] == total, r
            assert r["stats"]["sleeps"] > 0 and r["stats"]["wakeups"] > 0
        assert ch.stats["doorbells"] >= max(r["stats"]["wakeups"] for r in results)
        ch.close()
        ring.close()


@pytest.fixture(scope="module")
def fanout_c(tmp_path_factory):
    """examples/c/pubsub_fanout.c, built against the C core."""
    import shutil

    from _csrc import ROOT, c_core_sources

    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    csrc = os.path.join(ROOT, "csrc")
    if not os.path.isfile(os.path.join(ROOT, "examples", "c", "pubsub_fanout.c")):
        pytest.skip("needs the source tree (csrc/, examples/c/)")
    out = tmp_path_factory.mktemp("c") / "pubsub_fanout"
    sources = [os.path.join(ROOT, "examples", "c", "pubsub_fanout.c")] + [
        os.path.join(csrc, f) for f in c_core_sources()]
    subprocess.run([cc, "-std=gnu11", "-O2", "-I", csrc, *sources, "-o", str(out)], check=True)
    return str(out)


@pytest.mark.timeout(120)
def test_c_publisher_python_subscriber_and_back(shm_path, fanout_c):
    """The C example and the Python API share the pubsub layout: a C subscriber and a Python one
    follow a Python publisher, then a Python subscriber follows the C publisher."""
    total = 100_000
    with Region.create(shm_path, "4M") as region:
        ring = region.create_ring("fan", kind="pubsub", slot_size=8, capacity=4096, slow="block",
                                  slow_timeout=1.0)
        c_sub = subprocess.Popen([fanout_c, shm_path, "fan", "sub", str(total)],
                                 stdout=subprocess.PIPE, text=True)
        py_sub = spawn(shm_path, "fan", "all", total)
        try:
            assert c_sub.stdout.readline().split() == ["ready", "0"]
            wait_ready([py_sub])
            publish(ring, 0, total)
            assert "error" not in result(py_sub)
            assert c_sub.stdout.readline().strip() == f"received {total} in order"
            assert c_sub.wait(30) == 0
        finally:
            reap([c_sub, py_sub])
        ring.close()
        # now C publishes: it continues from the index the Python publisher announced
        py_sub = spawn(shm_path, "fan", "all", 2 * total)
        try:
            (joined,) = wait_ready([py_sub])
            assert joined == total
            c_pub = subprocess.run([fanout_c, shm_path, "fan", "pub", str(total)],
                                   capture_output=True, text=True, timeout=60)
            assert c_pub.returncode == 0, c_pub.stderr
            r = result(py_sub)
        finally:
            reap([py_sub])
        assert "error" not in r and r["first"] == total and r["last"] == 2 * total
