"""Rings between processes: exactly-once, in-order delivery; the layout as an ABI with C."""
import multiprocessing as mp
import os
import subprocess

import pytest

from pyivshmem import Region

from _csrc import build_example

CTX = mp.get_context("spawn")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _payload(i):
    """Message i: its index, a length that varies from 0 to ~3 slots, checkable content."""
    n = (i * 7919) % 700
    body = (i.to_bytes(8, "little") * (n // 8 + 1))[:n]
    return i.to_bytes(8, "little") + body


def _spsc_producer(path, count):
    with Region.open(path) as r:
        ring = r.ring("data")
        i = 0
        while i < count:
            batch = [_payload(j) for j in range(i, min(i + 64, count))]
            i += ring.send_many(batch, timeout=60)
        ring.send(b"END", timeout=60)


def test_spsc_million_messages_exactly_once_in_order(shm_path):
    count = 1_000_000
    with Region.create(shm_path, "4M") as r:
        ring = r.create_ring("data", slot_size=256, capacity=4096)
        p = CTX.Process(target=_spsc_producer, args=(shm_path, count))
        p.start()
        try:
            expected = 0
            total_bytes = 0
            while True:
                msgs = ring.recv_many(256, timeout=60)
                assert msgs, "producer stalled"
                for m in msgs:
                    if m == b"END":
                        assert expected == count
                        break
                    assert m == _payload(expected), f"message {expected} wrong"
                    total_bytes += len(m)
                    expected += 1
                else:
                    continue
                break
            assert ring.try_recv() is None
        finally:
            p.join(60)
        assert p.exitcode == 0
        assert expected == count and total_bytes > count * 300


def _mpmc_producer(path, pid, count):
    with Region.open(path) as r:
        ring = r.ring("mp")
        for i in range(count):
            ring.send(b"%d:%d" % (pid, i), timeout=60)


def _mpmc_consumer(path, q, stop_after):
    got = []
    with Region.open(path) as r:
        ring = r.ring("mp")
        while True:
            msgs = ring.recv_many(64, timeout=60)
            assert msgs
            for j, m in enumerate(msgs):
                if m == b"STOP":
                    # only stop tokens can follow (producers are done): hand them back
                    for extra in msgs[j + 1:]:
                        assert extra == b"STOP"
                        ring.send(extra, timeout=60)
                    q.put(got)
                    return
                got.append(m)


def test_mpmc_two_producers_two_consumers(shm_path):
    per = 100_000
    with Region.create(shm_path, "1M") as r:
        ring = r.create_ring("mp", "mpmc", slot_size=32, capacity=1024)
        q = CTX.Queue()
        cons = [CTX.Process(target=_mpmc_consumer, args=(shm_path, q, None)) for _ in range(2)]
        prods = [CTX.Process(target=_mpmc_producer, args=(shm_path, k, per)) for k in range(2)]
        for p in cons + prods:
            p.start()
        for p in prods:
            p.join(120)
            assert p.exitcode == 0
        ring.send(b"STOP", timeout=60)
        ring.send(b"STOP", timeout=60)
        results = [q.get(timeout=120) for _ in cons]
        for p in cons:
            p.join(60)
            assert p.exitcode == 0
    seen = {0: [], 1: []}
    for got in results:
        last = {0: -1, 1: -1}
        for m in got:
            k, i = map(int, m.split(b":"))
            assert i > last[k], "per-producer order broken within a consumer"
            last[k] = i
            seen[k].append(i)
    for k in (0, 1):
        assert sorted(seen[k]) == list(range(per)), f"producer {k}: lost or duplicated messages"


@pytest.fixture(scope="module")
def ring_echo(tmp_path_factory):
    return build_example("ring_echo", tmp_path_factory.mktemp("c"))


def test_c_program_and_python_share_the_layout(shm_path, ring_echo):
    with Region.create(shm_path, "1M") as r:
        proc = subprocess.Popen([ring_echo, shm_path, "py2c", "c2py"], stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            tx = r.ring("py2c")
            rx = r.ring("c2py")
            sent = [os.urandom((i * 37) % 2000) for i in range(2000)]
            got = []
            for m in sent:
                tx.send(m, timeout=30)
                got.extend(rx.recv_many(64))
            while len(got) < len(sent):
                got.append(rx.recv(timeout=30))
            assert got == [m[::-1] for m in sent]
            tx.send(b"quit", timeout=30)
            assert proc.stdout.readline().strip() == f"answered {len(sent)}"
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
        # the C side created the rings: Python sees them in the directory like its own
        names = {x["name"]: x for x in r.rings()}
        assert names["py2c"]["slot_size"] == 256 and names["c2py"]["capacity"] == 64
