"""A Region owns its mapping: close() from any thread never unmaps memory under a caller.

Calls that copy with the GIL released count as users of the mapping; close() marks the region
closed and unmaps when the last user leaves.  A call racing close() either completes or raises
ClosedError, and never crashes.  The races run in a child process so that a crash shows as a
failed test (with the child's output) instead of killing the test run.
"""
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from pyivshmem import ClosedError, Region

CHILD = textwrap.dedent(
    r'''
    import os, random, sys, threading, time, uuid
    from pyivshmem import ClosedError, Region

    kind, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rnd = random.Random(seed)
    BIG = 8 << 20
    msg = bytes(range(256)) * (BIG // 256)
    outcomes = {"closed": 0, "completed": 0}
    for r in range(rounds):
        path = f"/dev/shm/pyivshmem-life-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        region = Region.create(path, "32M")
        os.unlink(path)
        if kind == "spsc":
            ring = region.create_ring("big", "spsc", slot_size=1 << 20, capacity=16)
        else:
            ring = region.create_ring("big", "mpmc", slot_size=BIG, capacity=2)
        started = threading.Event()
        errors = []
        mode = r % 4

        def worker():
            buf = bytearray(BIG)
            try:
                for i in range(6):
                    started.set()
                    if mode == 0:
                        ring.send(msg, timeout=10)
                        got = ring.recv(timeout=10)
                    elif mode == 1:
                        ring.send(msg, timeout=10)
                        n = ring.recv_into(buf)
                        got = bytes(buf[:n])
                    elif mode == 2:
                        assert ring.send_many([msg], timeout=10) == 1
                        got = ring.recv_many(1, timeout=10)[0]
                    else:
                        ring.try_send(msg)
                        got = ring.try_recv()
                    if got != msg:
                        errors.append(f"round {r}: message {i} corrupted")
                        return
                outcomes["completed"] += 1
            except ClosedError:
                outcomes["closed"] += 1
            except BaseException as e:  # anything else is a failure
                errors.append(f"round {r} mode {mode}: {type(e).__name__}: {e}")

        t = threading.Thread(target=worker)
        t.start()
        if not started.wait(10):
            sys.exit(f"round {r}: the worker did not start")
        time.sleep(rnd.uniform(0, 0.004))  # a random point of the copies, not a synchronisation
        region.close()
        t.join(30)
        if t.is_alive():
            sys.exit(f"round {r}: the worker is stuck after close()")
        if errors:
            sys.exit("; ".join(errors))
        # everything after close raises, nothing crashes
        for call in (lambda: ring.try_send(b"x"), ring.try_recv, lambda: ring.recv(0)):
            try:
                call()
                sys.exit(f"round {r}: a call after close() did not raise")
            except ClosedError:
                pass
    print("OK", outcomes["closed"], outcomes["completed"])
    '''
)


def run_child(kind, rounds, seed):
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(rounds), str(seed)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"seed {seed}: child exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    assert proc.stdout.startswith("OK"), (seed, proc.stdout, proc.stderr)
    closed, completed = map(int, proc.stdout.split()[1:3])
    assert closed + completed == rounds
    return closed, completed


@pytest.mark.parametrize("kind", ["spsc", "mpmc"])
def test_close_while_another_thread_copies_8mib_messages_never_crashes(kind):
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    closed, completed = run_child(kind, 60, seed)
    # close() raced the copies for real in at least some rounds
    assert closed > 0, f"seed {seed}: close() never met a call in flight"


def test_close_wakes_a_thread_blocked_in_recv(region):
    ring = region.create_ring("w", "spsc", slot_size=64, capacity=4)
    out = []
    entered = threading.Event()

    def blocked():
        entered.set()
        try:
            ring.recv(timeout=30)
            out.append("returned")
        except ClosedError:
            out.append("closed")
        except BaseException as e:
            out.append(repr(e))

    t = threading.Thread(target=blocked)
    t.start()
    assert entered.wait(10)
    region.close()
    t.join(30)
    assert not t.is_alive() and out == ["closed"]


def _mapped(region_addr):
    with open("/proc/self/maps") as f:
        return any(int(line.split("-", 1)[0], 16) == region_addr for line in f)


def test_memory_is_unmapped_when_the_last_export_goes(shm_path):
    region = Region.create(shm_path, "64K")
    ring = region.create_ring("v", slot_size=16, capacity=4)
    addr = region.address
    assert _mapped(addr)
    ring.try_send(b"abc")
    view = ring.peek()
    raw = memoryview(view)
    region.close()
    assert _mapped(addr), "unmapped while a zero-copy buffer was exported"
    assert bytes(raw) == b"abc"
    raw.release()
    view.release()
    assert not _mapped(addr), "still mapped after the last export went"
    with pytest.raises(ClosedError):
        ring.peek()


def test_close_without_users_unmaps_at_once(shm_path):
    region = Region.create(shm_path, "64K")
    region.create_ring("q", slot_size=16, capacity=4)
    addr = region.address
    region.close()
    assert not _mapped(addr)
    region.close()  # idempotent, never raises


STRESS_CHILD = textwrap.dedent(
    r'''
    import os, random, sys, threading, time, uuid
    from pyivshmem import ClosedError, Region, WaitTimeout

    rounds, seed = int(sys.argv[1]), int(sys.argv[2])
    rnd = random.Random(seed)
    big = bytes(range(256)) * 4096  # 1 MiB: copied with the GIL released
    stats = {"closed": 0, "done": 0}
    for r in range(rounds):
        path = f"/dev/shm/pyivshmem-stress-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        region = Region.create(path, "8M")
        os.unlink(path)
        spsc = region.create_ring("s", "spsc", slot_size=1 << 16, capacity=32)
        mpmc = region.create_ring("m", "mpmc", slot_size=1 << 17, capacity=8)
        errors, ready = [], threading.Barrier(5)

        def run(fn):
            try:
                ready.wait(10)
                fn()
                stats["done"] += 1
            except ClosedError:
                stats["closed"] += 1
            except BaseException as e:
                errors.append(f"round {r} {fn.__name__}: {type(e).__name__}: {e}")

        idle = region.create_ring("w", "mpmc", slot_size=64, capacity=4)

        def blocked_recv():  # asleep in recv when the region closes (nobody sends on it)
            idle.recv(timeout=30)

        def big_sender():
            for _ in range(4):
                spsc.send(big, timeout=30)

        def big_receiver():
            buf = bytearray(len(big))
            for i in range(4):
                if i % 2:
                    assert spsc.recv(timeout=30) == big
                else:
                    while spsc.recv_into(buf) is None:
                        time.sleep(0)

        def zero_copy():  # until the close: fill a reservation in place, read it in place
            chunk = big[: 1 << 17]
            while True:
                v = mpmc.reserve(1 << 17)
                v[:] = chunk
                mpmc.commit()
                p = mpmc.peek()
                assert p == chunk
                mpmc.release()

        threads = [threading.Thread(target=run, args=(f,)) for f in
                   (blocked_recv, big_sender, big_receiver, zero_copy)]
        for t in threads:
            t.start()
        ready.wait(10)
        time.sleep(rnd.uniform(0, 0.002))
        region.close()
        for t in threads:
            t.join(60)
            if t.is_alive():
                sys.exit(f"round {r}: a thread is stuck after close()")
        if errors:
            sys.exit("; ".join(errors))
    print("OK", stats["closed"], stats["done"])
    '''
)


def test_close_races_blocked_receivers_large_copies_and_zero_copy_1000_rounds():
    """1,000 rounds: close() while one thread sleeps in recv, one sends 1 MiB messages, one
    receives them (recv and recv_into), one fills zero-copy reservations.  No crash; every
    thread completes or raises ClosedError; none is left blocked."""
    seed = int.from_bytes(os.urandom(4), "little")
    proc = subprocess.run([sys.executable, "-c", STRESS_CHILD, "1000", str(seed)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"seed {seed}: child exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    closed, done = map(int, proc.stdout.split()[1:3])
    # the blocked receiver and the zero-copy loop always meet the close
    assert closed + done == 4000 and closed >= 2000
