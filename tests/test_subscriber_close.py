"""A Subscriber closed by another thread while one of its receives copies large messages."""
import threading

import pytest

from pyivshmem import Region

MIB = 1 << 20


@pytest.mark.timeout(120)
@pytest.mark.parametrize("call", ["recv_many", "recv", "recv_into"])
def test_subscriber_closed_during_its_copy_never_moves_the_next_subscribers_cursor(shm_path, call):
    # close() freed the entry at once; the receive in flight then stored its cursor into it,
    # after a new subscriber (here of the same process; of any process in general) took it:
    # the newcomer's shared cursor went back, so the publisher saw it messages behind (and would
    # wait for it, or cut it off, for messages it never had to read).
    region = Region.create(shm_path, "64M")
    ring = region.create_ring("p", "pubsub", slot_size=4 * MIB, capacity=8, slow="drop",
                              slow_timeout=60)
    wrong = []
    for rnd in range(30):
        sub = ring.subscribe()
        assert ring.send_many([bytes(4 * MIB)] * 8) == 8
        inside = threading.Event()
        out = []

        def receive():
            inside.set()  # the close below lands in (or around) the copies of this call
            try:
                if call == "recv_many":
                    out.append(len(sub.recv_many(8)))
                elif call == "recv":
                    out.append(len(sub.recv(timeout=0)))
                else:
                    out.append(sub.recv_into(bytearray(4 * MIB)))
            except Exception as e:  # noqa: B902 - a ClosedError is a fine answer
                out.append(type(e).__name__)

        t = threading.Thread(target=receive)
        t.start()
        inside.wait(30)
        sub.close()
        newcomer = ring.subscribe()
        t.join(60)
        assert not t.is_alive()
        entry = {d["index"]: d for d in ring.subscribers()}[newcomer.index]
        if entry["cursor"] != newcomer.position:
            wrong.append((rnd, out, entry["cursor"], newcomer.position))
        newcomer.close()
    region.close()
    assert not wrong, f"(round, receive's result, shared cursor, newcomer's position): {wrong}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["close", "garbage collection"])
def test_subscriber_dropped_in_a_forked_child_stays_the_parents(shm_path, how):
    # The child's copy freed the parent's entry in the subscriber table: the publisher took it
    # back and the parent's subscriber was cut off (SubscriberDroppedError on its next call).
    import gc
    import os
    import warnings

    from pyivshmem import Region

    with Region.create(shm_path, "1M") as region:
        pub = region.create_ring("p", "pubsub", slot_size=16, capacity=4)
        sub = pub.subscribe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if how == "close":
                    sub.close()
                else:
                    warnings.simplefilter("ignore")  # (as errors, they would stop __del__)
                    del sub
                    gc.collect()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert [d["index"] for d in pub.subscribers() if d["state"] == "active"] == [sub.index]
        assert pub.send(b"after the child", timeout=10) is None
        assert sub.recv(timeout=10) == b"after the child"
        sub.close()


@pytest.mark.timeout(150)
def test_region_closed_during_a_subscribers_recv_copy_does_not_crash(shm_path):
    # Subscriber.recv (try_recv, Channel.recv) held the mapping only for the copy itself: a
    # Region.close() from another thread during it unmapped the memory when the copy ended,
    # and the check of the slot's stamp and the cursor's release after it touched unmapped
    # memory (SIGSEGV).
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, threading
        from pyivshmem import ClosedError, Region
        MIB = 1 << 20
        sys.setswitchinterval(100)  # the receiver gives the GIL up only for its copy
        for rnd in range(3):
            region = Region.create(sys.argv[1] + str(rnd), "128M")
            ring = region.create_ring("p", "pubsub", slot_size=32 * MIB, capacity=2)
            sub = ring.subscribe()
            assert ring.send_many([bytes(32 * MIB)]) == 1
            inside = threading.Event()
            out = []

            def receive():
                inside.set()
                try:
                    out.append(len(sub.recv(timeout=0)))
                except ClosedError as e:  # a close seen before or after the copy is fine
                    out.append("ClosedError")

            t = threading.Thread(target=receive)
            t.start()
            inside.wait(30)
            region.close()  # lands during the copy: the receiver released the GIL for it
            t.join(60)
            assert not t.is_alive()
            assert out and out[0] in (32 * MIB, "ClosedError"), out
    """)
    try:
        child = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, shm_path],
                               capture_output=True, text=True, timeout=120)
    finally:
        for rnd in range(3):
            try:
                os.unlink(shm_path + str(rnd))
            except FileNotFoundError:
                pass
    assert child.returncode == 0, child.stderr[-3000:]
