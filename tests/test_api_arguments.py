"""Arguments a demanding caller passes: the same value is refused (or accepted) the same way by
every call that takes it, with a ConfigError naming it."""
import asyncio

import pytest
from _fdbell import FdBell, close_fds, make_fds

from pyivshmem import Channel, ConfigError


@pytest.fixture
def fds():
    f = make_fds([0, 1])
    yield f
    close_fds(f)


@pytest.mark.parametrize("bad", ["8", 1.5, 2**70, -1, True, None])
def test_channel_recv_many_refuses_a_bad_max_count_as_the_ring_does(region, bad):
    # (a C-typed argument: TypeError for "8" and 1.5, OverflowError for 2**70, True taken as 1)
    ring = region.create_ring("q", "mpmc", slot_size=8, capacity=4)
    ring.try_send(b"kept")
    ch = Channel(ring)
    with pytest.raises(ConfigError, match="max_count"):
        ring.recv_many(bad)
    with pytest.raises(ConfigError, match="max_count"):
        ch.recv_many(bad)
    assert ch.recv_many(4) == [b"kept"]


@pytest.mark.parametrize("bad", [None, b"read-only", "text", memoryview(bytearray(16))[::2]])
def test_subscriber_recv_into_refuses_an_unusable_buffer_as_the_other_rings_do(region, bad):
    # (a TypeError or BufferError from the buffer protocol, unlike SpscRing's and MpmcRing's)
    ring = region.create_ring("p", "pubsub", slot_size=16, capacity=4)
    with ring.subscribe() as sub:
        ring.try_send(b"kept")
        with pytest.raises(ConfigError, match="recv_into needs a writable"):
            sub.recv_into(bad)
        buf = bytearray(16)
        assert sub.recv_into(buf) == 4 and buf[:4] == b"kept"


@pytest.mark.parametrize("bad", ["0", 1.0, 2**70, -1, 64, True])
def test_pubsub_cut_refuses_a_bad_index_with_a_config_error(region, bad):
    ring = region.create_ring("p", "pubsub", slot_size=16, capacity=4)
    with ring.subscribe() as sub:
        with pytest.raises(ConfigError, match="subscriber index"):
            ring.cut(bad)
        assert ring.cut(sub.index) is True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("side", ["recv", "send"])
def test_async_waits_take_a_timeout_too_large_for_a_float_as_forever(region, fds, side):
    # The blocking calls wait forever for such a timeout; the asyncio ones added it to the
    # loop's clock and raised OverflowError.
    ring = region.create_ring("q", "mpmc", slot_size=8, capacity=2)
    a = Channel(ring, FdBell(0, fds), vector=0)
    b = Channel(region.ring("q"), FdBell(1, fds), vector=0)
    if side == "send":
        assert ring.send_many([b"1", b"2"]) == 2

    async def main():
        if side == "recv":
            task = asyncio.ensure_future(a.recv_async(timeout=10**400))
        else:
            task = asyncio.ensure_future(a.send_async(b"3", timeout=10**400))
        await asyncio.sleep(0)  # the task's first step: its ring is empty (full), so it waits
        assert not task.done(), task.exception()
        if side == "recv":
            assert b.try_send(b"x")
        else:
            assert b.try_recv() == b"1"
        return await asyncio.wait_for(task, 30)

    result = asyncio.run(main())
    if side == "recv":
        assert result == b"x"
    else:
        assert b.recv_many(4) == [b"2", b"3"]
