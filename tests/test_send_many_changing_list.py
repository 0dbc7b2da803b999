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


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind", KINDS)
def test_handle_closed_during_a_channel_send_many_copy_still_wakes_and_counts(shm_path, kind):
    # The sending handle closed by another thread while send_many copied a large message with
    # the GIL released: the message was published, but the ClosedError that followed carried no
    # .sent (SPSC, pubsub) or one that left it out (MPMC).  The Channel then neither counted it
    # nor rang the receiver asleep on the ring, which slept on until its re-check (here an
    # hour), and the caller was told nothing of what went.
    child = run_child("""
        import os, sys, threading
        import pyivshmem as P
        from _fdbell import FdBell, make_fds
        from _procwait import wait_until_in_wait
        path, kind = sys.argv[1], sys.argv[2]
        MIB = 1 << 20
        sys.setswitchinterval(100)  # the sender gives the GIL up only for its copies
        fds = make_fds([0, 1])
        for rnd in range(10):  # until a close lands during a copy (rounds it missed prove little)
            r = P.Region.create(path + str(rnd), "128M")
            if kind == "mpmc":  # one large message: its copy releases the GIL
                ring = r.create_ring("q", kind, slot_size=32 * MIB, capacity=2)
                msgs, first = [bytes(32 * MIB)], 1
            else:  # a batch of 256 (30 MiB) copied without the GIL, then one more batch
                ring = r.create_ring("q", kind, slot_size=128 * 1024, capacity=512)
                msgs, first = [bytes(120 * 1024)] * 257, 256
            reader = ring.subscribe() if kind == "pubsub" else r.ring("q")
            rx = P.Channel(reader, FdBell(0, fds), vector=0, spin=0, recheck=3600)
            tx = P.Channel(ring, FdBell(1, fds), vector=0, spin=0, recheck=3600)
            got, err = [], []
            inside = threading.Event()

            def receive():
                try:
                    got.append(len(rx.recv()))  # no timeout: only the wake can end it
                except BaseException as e:
                    got.append(repr(e))

            def send():
                inside.set()
                try:
                    tx.send_many(msgs, timeout=0)
                except P.ClosedError as e:
                    err.append(e)

            t = threading.Thread(target=receive, daemon=True)  # (a failed run leaves it asleep)
            t.start()
            wait_until_in_wait(os.getpid(), t.native_id, what="the receiver's sleep")
            s = threading.Thread(target=send)
            s.start()
            inside.wait(30)
            ring.close()  # lands during a copy: the sender released the GIL for it
            s.join(60)
            t.join(60)
            assert not t.is_alive(), "the receiver was not woken for the messages that went"
            assert got == [len(msgs[0])], got
            if err:
                assert getattr(err[0], "sent", None) == first, (err[0], err[0].__dict__)
                assert tx.stats["sent"] == first, tx.stats
            rx.close()
            tx.close()
            if kind == "pubsub":
                reader.close()
            r.close()
            os.unlink(path + str(rnd))
            if err:
                print("ok", rnd)
                break
        else:
            print("the close never landed during a copy")
    """, shm_path, kind)
    for rnd in range(10):
        try:
            os.unlink(shm_path + str(rnd))
        except FileNotFoundError:
            pass
    assert child.returncode == 0, child.stdout + child.stderr[-3000:]
    assert "ok" in child.stdout
