"""Micro-benchmarks of single ring operations from Python (pytest-benchmark).

The test suite collects them as correctness checks (pyproject's pytest options add
--benchmark-disable: each benchmarked call runs once, untimed, and its result is asserted).
Measure with

    PYTHONPATH=. python -m pytest bench/test_micro.py --benchmark-enable --benchmark-only
    PYTHONPATH=. python -m pytest bench/test_micro.py --benchmark-enable --benchmark-only \
        --benchmark-json out.json

Everything runs in one process on one ring, so each benchmark pairs the producer call with the
consumer call that empties the ring again: the figure is the cost of the two calls (and, for
batches, of the whole batch), without any cross-core traffic.  `pyivshmem bench` measures the
cross-process figures.
"""
import os
import uuid

import pytest

from pyivshmem import Region

MSG64 = bytes(range(64))
MSG4K = bytes(4096)
MSG1M = bytes(1 << 20)


@pytest.fixture(scope="module")
def region():
    path = f"/dev/shm/pyivshmem-micro-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    r = Region.create(path, "64M")
    yield r
    r.close()
    os.unlink(path)


@pytest.fixture
def spsc(region, request):
    return region.create_ring(f"s-{request.node.name[:24]}", "spsc", slot_size=64, capacity=4096)


@pytest.fixture
def mpmc(region, request):
    return region.create_ring(f"m-{request.node.name[:24]}", "mpmc", slot_size=64, capacity=4096)


def test_spsc_try_send_try_recv_64(benchmark, spsc):
    send, recv = spsc.try_send, spsc.try_recv

    def op():
        send(MSG64)
        return recv()

    assert benchmark(op) == MSG64


def test_spsc_send_recv_64(benchmark, spsc):
    send, recv = spsc.send, spsc.recv

    def op():
        send(MSG64)
        return recv()

    assert benchmark(op) == MSG64


def test_spsc_recv_into_64(benchmark, spsc):
    buf = bytearray(64)
    send, recv_into = spsc.try_send, spsc.recv_into

    def op():
        send(MSG64)
        return recv_into(buf)

    assert benchmark(op) == 64 and buf == MSG64


def test_spsc_send_many_recv_many_32x64(benchmark, spsc):
    batch = [MSG64] * 32
    send_many, recv_many = spsc.send_many, spsc.recv_many

    def op():
        send_many(batch)
        return recv_many(32)

    assert benchmark(op) == batch


def test_spsc_reserve_commit_peek_release_64(benchmark, spsc):
    reserve, commit, peek, release = spsc.reserve, spsc.commit, spsc.peek, spsc.release

    def op():
        view = reserve(64)
        view[:] = MSG64
        commit()
        n = len(peek())
        release()
        return n

    assert benchmark(op) == 64


def test_spsc_send_recv_4k(benchmark, region):
    ring = region.create_ring("s-4k", "spsc", slot_size=4096, capacity=64)

    def op():
        ring.try_send(MSG4K)
        return ring.try_recv()

    assert benchmark(op) == MSG4K


def test_spsc_send_recv_1m(benchmark, region):
    ring = region.create_ring("s-1m", "spsc", slot_size=1 << 20, capacity=4)

    def op():
        ring.try_send(MSG1M)
        return ring.try_recv()

    assert benchmark(op) == MSG1M


def test_spsc_send_recv_1m_chunked(benchmark, region):
    """A 1 MiB message through 64 KiB slots: split and joined by the ring."""
    ring = region.create_ring("s-1m-chunks", "spsc", slot_size=64 << 10, capacity=32)

    def op():
        ring.try_send(MSG1M)
        return ring.try_recv()

    assert benchmark(op) == MSG1M


def test_spsc_empty_try_recv(benchmark, spsc):
    assert benchmark(spsc.try_recv) is None


def test_mpmc_try_send_try_recv_64(benchmark, mpmc):
    send, recv = mpmc.try_send, mpmc.try_recv

    def op():
        send(MSG64)
        return recv()

    assert benchmark(op) == MSG64


def test_mpmc_send_many_recv_many_32x64(benchmark, mpmc):
    batch = [MSG64] * 32
    send_many, recv_many = mpmc.send_many, mpmc.recv_many

    def op():
        send_many(batch)
        return recv_many(32)

    assert benchmark(op) == batch


def test_channel_send_recv_64(benchmark, spsc):
    """A Channel without a doorbell (nobody sleeps): one send and one recv per message."""
    from pyivshmem import Channel

    tx, rx = Channel(spsc, None), Channel(spsc, None)

    def op():
        tx.send(MSG64)
        return rx.recv()

    assert benchmark(op) == MSG64


def test_channel_send_recv_many_one_waiting_64(benchmark, spsc):
    """Channel.recv_many with one message waiting: the per-call cost of a batch receive, to set
    against test_channel_send_recv_64."""
    from pyivshmem import Channel

    tx, rx = Channel(spsc, None), Channel(spsc, None)

    def op():
        tx.send(MSG64)
        return rx.recv_many(32)

    assert benchmark(op) == [MSG64]
