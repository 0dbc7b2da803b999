"""Publish-subscribe against hostile values in its shared table: a subscriber cut off for a
cursor ahead of the publisher is told so, not that it was 2**64 - N messages behind."""
import mmap
import os
import struct

import pytest

from pyivshmem import SubscriberDroppedError


def _entry_offset(region, name, index):
    ring = next(r for r in region.rings() if r["name"] == name)
    return ring["offset"] + 640 + 128 + index * 128  # control block, config line, table


def _poke_u64(path, offset, value):
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as mm:
            struct.pack_into("<Q", mm, offset, value)
    finally:
        os.close(fd)


@pytest.mark.parametrize("forged", [10**6, 2**63])
def test_cursor_ahead_of_the_publisher_is_not_reported_as_messages_behind(region, shm_path,
                                                                          forged):
    ring = region.create_ring("ps", kind="pubsub", slot_size=16, capacity=8, slow="drop",
                              slow_timeout=0)
    bad = ring.subscribe()
    for i in range(8):
        ring.send(b"%d" % i, timeout=1)
    _poke_u64(shm_path, _entry_offset(region, "ps", bad.index) + 8, forged)
    ring.send(b"8", timeout=1)  # the publisher looks at the table and cuts it off
    cut = [s for s in ring.subscribers() if s["index"] == bad.index]
    assert cut and cut[0]["state"] == "dropped"
    assert cut[0]["cut_behind"] is None
    with pytest.raises(SubscriberDroppedError) as e:
        bad.recv(timeout=1)
    assert e.value.reason == "bad-cursor"
    assert e.value.behind is None
    assert str(forged - 8) not in str(e.value) and str(2**64 - forged + 8) not in str(e.value)
    assert "ahead of the publisher" in str(e.value)
    assert bad.status()["behind"] is None
    bad.close()
    ring.close()
