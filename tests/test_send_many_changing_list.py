"""send_many of rings and channels against hostile callers: the message list changed by another
thread during the call, bad messages in the middle of a batch, and what a Channel owes its
sleepers when a batch stops on an error."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from _fdbell import FdBell, close_fds, make_fds
from _procwait import wait_until_in_wait

from pyivshmem import Channel, MessageTooLargeError

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ["spsc", "mpmc", "pubsub"]


def run_child(code, *args):
    """Run ``code`` in a fresh interpreter (a crash there is a failed assertion here)."""
    return subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": HERE})


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", KINDS)
def test_send_many_survives_its_list_cleared_while_it_waits_for_room(shm_path, kind):
    # The batch calls kept the list's item array and length from before their wait for room
    # (the GIL released): a list cleared meanwhile was read through a freed array (SIGSEGV).
    child = run_child("""
        import os, sys, threading
        from _procwait import wait_until_in_wait
        import pyivshmem as P
        path, kind = sys.argv[1], sys.argv[2]
        r = P.Region.create(path, "1M")
        ring = r.create_ring("q", kind, slot_size=64, capacity=4)
        sub = ring.subscribe() if kind == "pubsub" else None
        reader = sub if sub is not None else r.ring("q")
        for _ in range(4):
            assert ring.try_send(b"full")
        msgs = [b"m%d" % i for i in range(1000)]
        me = threading.get_native_id()

        def clear_then_free_room():
            wait_until_in_wait(os.getpid(), me, sleep=True, what="send_many's wait for room")
            msgs.clear()
            assert reader.recv_many(4) == [b"full"] * 4

        t = threading.Thread(target=clear_then_free_room)
        t.start()
        n = ring.send_many(msgs, timeout=60)
        t.join()
        print("sent", n, "left", msgs)
        if sub is not None:
            sub.close()
        r.close()
    """, shm_path, kind)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.split() == ["sent", "0", "left", "[]"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["spsc", "pubsub"])
def test_send_many_survives_its_list_cleared_during_a_large_copy(shm_path, kind):
    # Large batches are copied with the GIL released, from pointers borrowed from the list: a
    # list cleared by another thread freed (and unmapped) the messages under the copy.
    child = run_child("""
        import sys, threading
        import pyivshmem as P
        path, kind = sys.argv[1], sys.argv[2]
        r = P.Region.create(path, "128M")
        ring = r.create_ring("q", kind, slot_size=(1 << 20) if kind == "pubsub" else 65536,
                             capacity=64)
        sub = ring.subscribe() if kind == "pubsub" else None
        reader = sub if sub is not None else r.ring("q")
        for _ in range(20):
            msgs = [bytes(1 << 20) for _ in range(32)]
            go = threading.Event()

            def clear():
                go.wait()
                msgs.clear()

            t = threading.Thread(target=clear)
            t.start()
            go.set()
            n = ring.send_many(msgs)
            t.join()
            got = []
            while True:
                part = reader.recv_many(64)
                if not part:
                    break
                got += part
            assert len(got) == n and all(m == bytes(1 << 20) for m in got), (n, len(got))
        print("ok")
        if sub is not None:
            sub.close()
        r.close()
    """, shm_path, kind)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.split() == ["ok"]


def _too_large(ring):
    return b"x" * (ring.max_message + 1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", ["str", "int", "too-large-bytes", "too-large-bytearray"])
def test_send_many_error_in_the_middle_of_a_batch_says_how_many_were_sent(region, kind, bad):
    ring = region.create_ring("q", kind, slot_size=64, capacity=16)
    sub = ring.subscribe() if kind == "pubsub" else None
    reader = sub if sub is not None else region.ring("q")
    try:
        message = {"str": "text", "int": 5, "too-large-bytes": _too_large(ring),
                   "too-large-bytearray": bytearray(_too_large(ring))}[bad]
        with pytest.raises((TypeError, MessageTooLargeError)) as info:
            ring.send_many([b"a", bytearray(b"b"), message, b"d"])
        assert info.value.sent == 2
        assert reader.recv_many() == [b"a", b"b"]
    finally:
        if sub is not None:
            sub.close()


@pytest.mark.parametrize("kind", KINDS)
def test_send_many_of_other_buffers_fills_the_ring(region, kind):
    # (an SPSC batch of non-bytes messages used to stop after its first 256 with room left)
    ring = region.create_ring("q", kind, slot_size=8, capacity=1024)
    sub = ring.subscribe() if kind == "pubsub" else None
    reader = sub if sub is not None else region.ring("q")
    try:
        assert ring.send_many([bytearray(b"%d" % i) for i in range(300)]) == 300
        got = []
        while len(got) < 300:
            part = reader.recv_many(1024)
            assert part, f"only {len(got)} messages arrived"
            got += part
        assert got == [b"%d" % i for i in range(300)]
    finally:
        if sub is not None:
            sub.close()


@pytest.fixture
def fds():
    f = make_fds([0, 1])
    yield f
    close_fds(f)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["spsc", "mpmc"])
@pytest.mark.parametrize("bad", ["str", "too-large"])
def test_channel_send_many_wakes_a_sleeping_receiver_before_an_error(region, fds, kind, bad):
    # The messages a batch sent before a bad one were never announced: a receiver asleep on the
    # empty ring slept through them until its re-check (here an hour) or its timeout.
    ring = region.create_ring("q", kind, slot_size=64, capacity=16)
    producer = Channel(ring, FdBell(0, fds), vector=0, recheck=3600)
    consumer = Channel(region.ring("q"), FdBell(1, fds), vector=0, recheck=3600)
    got = []
    receiver = threading.Thread(target=lambda: got.append(consumer.recv(timeout=60)))
    receiver.start()
    wait_until_in_wait(os.getpid(), receiver.native_id, what="the receiver's sleep")
    message = "text" if bad == "str" else _too_large(ring)
    with pytest.raises((TypeError, MessageTooLargeError)) as info:
        producer.send_many([b"first", message])
    assert info.value.sent == 1
    receiver.join(90)
    assert got == [b"first"]
    assert producer.stats["sent"] == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["spsc", "mpmc"])
def test_channel_send_many_error_after_a_wait_counts_from_the_first_message(region, fds, kind):
    # After a wait for room the rest of the batch went to the ring as a slice: the error's .sent
    # (and its message) counted from the slice, not from the caller's list.
    ring = region.create_ring("q", kind, slot_size=64, capacity=4)
    producer = Channel(ring, FdBell(0, fds), vector=0, recheck=3600)
    consumer = Channel(region.ring("q"), FdBell(1, fds), vector=0, recheck=3600)
    for _ in range(2):
        assert ring.try_send(b"old")
    me = threading.get_native_id()
    got = []

    def drain_once_the_sender_sleeps():
        wait_until_in_wait(os.getpid(), me, what="the sender's sleep on the full ring")
        got.extend(consumer.recv(timeout=60) for _ in range(5))

    t = threading.Thread(target=drain_once_the_sender_sleeps)
    t.start()
    with pytest.raises(MessageTooLargeError, match="the 3 before it were sent") as info:
        producer.send_many([b"a", b"b", b"c", _too_large(ring)], timeout=60)
    t.join(90)
    assert info.value.sent == 3
    assert got == [b"old", b"old", b"a", b"b", b"c"]
    assert producer.stats["sent"] == 3
