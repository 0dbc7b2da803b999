"""SlotView, the zero-copy view reserve() and peek() return: what existing code relies on from a
memoryview still works, and nothing outlives its message."""
import pytest

from pyivshmem import ClosedError, ConfigError
from pyivshmem._ring import SlotView

KINDS = ["spsc", "mpmc"]


@pytest.mark.parametrize("kind", KINDS)
def test_slot_view_behaves_like_a_memoryview_of_bytes(region, kind):
    ring = region.create_ring("v", kind, slot_size=16, capacity=4)
    v = ring.reserve(8)
    assert isinstance(v, SlotView) and len(v) == 8 and v.nbytes == 8 and not v.readonly
    assert (v.format, v.itemsize, v.ndim, v.shape) == ("B", 1, 1, (8,))
    v[:] = b"abcdefgh"
    v[0] = ord("A")
    v[-1] = ord("H")
    v[2:4] = bytearray(b"CD")
    v[4:6] = memoryview(b"EF")
    assert bytes(v) == b"AbCDEFgH" and v.tobytes() == b"AbCDEFgH" and v == b"AbCDEFgH"
    assert v[1] == ord("b") and v[-2] == ord("g") and v[::2] == b"ACEg"
    assert bytes(v[2:6]) == b"CDEF" and isinstance(v[2:6], SlotView) and len(v[6:2]) == 0
    assert v.hex() == b"AbCDEFgH".hex() and list(v) == list(b"AbCDEFgH") and v.tolist() == list(v)
    with memoryview(v) as raw:  # the buffer protocol
        assert raw.tobytes() == b"AbCDEFgH" and not raw.readonly
    assert bytearray(v) == b"AbCDEFgH"
    with pytest.raises(IndexError):
        v[8]
    with pytest.raises(ConfigError, match="lengths must match"):
        v[0:2] = b"xyz"
    with pytest.raises(ConfigError, match="0 to 255"):
        v[0] = 256
    with pytest.raises(TypeError):
        hash(v)
    ring.commit()
    p = ring.peek()
    assert p.readonly and p == b"AbCDEFgH"
    with pytest.raises(ConfigError, match="read-only"):
        p[0] = 1
    other = region.create_ring("o", kind, slot_size=16, capacity=4)
    other.try_send(b"x")
    with pytest.raises(ConfigError, match="read-only"):
        other.recv_into(p)  # a writable buffer is asked of it
    assert other.try_recv() == b"x"  # and the message stayed
    p.release()  # drops this object only, like memoryview.release(); the peek stays
    with pytest.raises(ClosedError, match="released"):
        len(p)
    assert not p.valid
    with pytest.raises(ConfigError, match="still held"):
        ring.peek()
    ring.release()
    assert ring.peek() is None


def test_slot_views_cannot_be_made_directly():
    with pytest.raises(TypeError):
        SlotView()
