"""Objects made by ``cls.__new__(cls)`` (no Region, no ring) and a Channel set up twice: every
use raises an error, none crashes the interpreter or leaks a descriptor."""
import subprocess
import sys

import pytest
from _fds import fd_count

from pyivshmem import Channel, ConfigError

CALLS = [
    "Channel.__new__(Channel).recv(timeout=0)",
    "Channel.__new__(Channel).try_send(b'x')",
    "len(Channel.__new__(Channel))",
    "repr(Channel.__new__(Channel))",
    "SpscRing.__new__(SpscRing).try_recv()",
    "MpmcRing.__new__(MpmcRing).try_send(b'x')",
    "PubSubRing.__new__(PubSubRing).send(b'x', timeout=0)",
    "Subscriber.__new__(Subscriber).recv(timeout=0)",
    "repr(SpscRing.__new__(SpscRing))",
    "SlotView.__new__(SlotView).tobytes()",
    "repr(SlotView.__new__(SlotView))",
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("call", CALLS)
def test_objects_made_by_new_raise_closed_error_not_crash(call):
    # (the Channel's recv read its missing ring's fields: SIGSEGV; the rings read a missing
    # mapping's fields, and raised only by luck)
    code = ("from pyivshmem._ring import Channel, SpscRing, MpmcRing, PubSubRing, Subscriber, "
            "SlotView\nfrom pyivshmem import ClosedError\n"
            f"try:\n    r = {call}\nexcept ClosedError:\n    print('ClosedError')\n"
            "else:\n    print('ok', r)\n")
    child = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr[-2000:]
    if call.startswith("repr("):
        assert child.stdout.startswith("ok <pyivshmem."), child.stdout
    else:
        assert child.stdout.strip() == "ClosedError", child.stdout


def test_channel_set_up_twice_is_refused_and_leaks_nothing(region):
    ring = region.create_ring("q", slot_size=16, capacity=2)
    ch = Channel(ring)
    before = fd_count()
    for _ in range(5):
        with pytest.raises(ConfigError, match="already set up"):
            ch.__init__(ring)
    assert fd_count() == before
    ch.try_send(b"still works")
    assert ring.try_recv() == b"still works"
    ch.close()
