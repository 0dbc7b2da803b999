"""Closing what a blocked Channel call stands on ends the call with ClosedError."""
import asyncio
import errno
import os
import threading

import pytest
from _fdbell import FdBell, close_fds, make_fds
from _procwait import wait_until_in_wait

from pyivshmem import Channel, ClosedError


@pytest.fixture
def fds():
    f = make_fds([0, 1])
    yield f
    close_fds(f)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["spsc", "mpmc", "pubsub"])
@pytest.mark.parametrize("call", ["recv", "recv_many", "recv_into", "send", "send_many"])
def test_closing_the_ring_handle_wakes_a_channel_call_blocked_on_it(region, fds, kind, call):
    # The handle's close() told nobody: the call slept on until its re-check (here an hour) or
    # its timeout, and only then found the handle closed.
    ring = region.create_ring("q", kind, slot_size=16, capacity=2)
    sub = ring.subscribe() if kind == "pubsub" else None
    try:
        sending = call.startswith("send")
        if sending:
            assert ring.send_many([b"1", b"2"]) == 2  # full: the call waits for room
            handle = ring
        else:
            handle = sub if sub is not None else region.ring("q")
        ch = Channel(handle, FdBell(1 if sending else 0, fds), vector=0, recheck=3600)
        # no timeout: only the close can end the call (a timeout's error path meets the closed
        # handle too)
        calls = {"recv": lambda: ch.recv(),
                 "recv_many": lambda: ch.recv_many(4, timeout=None),
                 "recv_into": lambda: ch.recv_into(bytearray(16)),
                 "send": lambda: ch.send(b"3"),
                 "send_many": lambda: ch.send_many([b"3"], timeout=None)}
        out = []

        def blocked():
            try:
                out.append(calls[call]())
            except BaseException as e:  # noqa: B902 - reported below
                out.append(e)

        t = threading.Thread(target=blocked, daemon=True)  # (the region's close ends it anyway)
        t.start()
        wait_until_in_wait(os.getpid(), t.native_id, what=f"the channel's {call}")
        handle.close()
        t.join(60)
        assert not t.is_alive(), f"the channel's {call} did not end when its ring handle closed"
        assert len(out) == 1 and isinstance(out[0], ClosedError), out
    finally:
        if sub is not None:
            sub.close()


@pytest.mark.timeout(120)
def test_closing_the_ring_handle_wakes_an_asyncio_recv(region, fds):
    handle = region.create_ring("q", "mpmc", slot_size=16, capacity=2)
    ch = Channel(handle, FdBell(0, fds), vector=0, recheck=3600)

    async def main():
        task = asyncio.ensure_future(ch.recv_async())  # no timeout: only the close can end it
        await asyncio.sleep(0)  # the task's first step: the ring is empty, it waits
        assert not task.done()
        handle.close()
        with pytest.raises(ClosedError):
            await asyncio.wait_for(task, 60)

    asyncio.run(main())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["channel", "ring handle"])
def test_closing_in_a_forked_child_leaves_the_parents_channel_alone(shm_path, what):
    # The channel's cancel eventfd is shared across fork: a child closing its copy of the
    # channel wrote it, and every wait of the parent's channel raised ClosedError from then on.
    from pyivshmem import Region, WaitTimeout

    with Region.create(shm_path, "1M") as r:
        ring = r.create_ring("a", slot_size=64, capacity=4)
        rx = Channel(ring, spin=0)
        tx = Channel(r.ring("a"), spin=0)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                (rx if what == "channel" else ring).close()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not rx.closed
        with pytest.raises(WaitTimeout):  # a real wait, not an instant ClosedError
            rx.recv(timeout=0.05)
        tx.send(b"after the child closed its copy")
        assert rx.recv(timeout=10) == b"after the child closed its copy"
        rx.close()
        tx.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["the peer's region", "another region"])
def test_closing_the_peer_ends_a_channel_call_asleep_on_its_doorbell(tmp_path, shm_path, where):
    # Peer.close() closed the vector eventfd a Channel slept on and told it nothing: with its
    # ring in another region the call slept on until its re-check (here an hour), then it and
    # every later call raised a bare OSError (EBADF), or polled whatever file reused the number.
    from pyivshmem import Peer, Region, Server

    sock = os.path.join(tmp_path, "srv")
    with Server(sock, size="1M", vectors=2):
        peer = Peer.connect(sock)
        other = Region.create(shm_path, "1M") if where == "another region" else None
        try:
            region = other if other is not None else peer.region
            ch = Channel(region.create_ring("q", slot_size=16, capacity=2), peer, vector=0,
                         recheck=3600)
            out = []

            def blocked():
                try:
                    out.append(ch.recv())  # no timeout: only a close can end it
                except BaseException as e:  # noqa: B902 - reported below
                    out.append(e)

            t = threading.Thread(target=blocked, daemon=True)
            t.start()
            wait_until_in_wait(os.getpid(), t.native_id, what="the channel's sleep")
            peer.close()
            t.join(60)
            assert not t.is_alive(), "the channel's recv did not end when its Peer closed"
            assert len(out) == 1 and isinstance(out[0], ClosedError), out
            with pytest.raises(ClosedError):
                ch.recv(timeout=0.05)
        finally:
            peer.close()
            if other is not None:
                other.close()


@pytest.mark.timeout(120)
def test_closing_the_peer_ends_an_asyncio_recv_on_its_doorbell(tmp_path, shm_path):
    from pyivshmem import Peer, Region, Server

    sock = os.path.join(tmp_path, "srv")
    with Server(sock, size="1M", vectors=2), Region.create(shm_path, "1M") as region:
        peer = Peer.connect(sock)
        try:
            ch = Channel(region.create_ring("q", slot_size=16, capacity=2), peer, vector=0,
                         recheck=3600)

            async def main():
                task = asyncio.ensure_future(ch.recv_async())  # only a close can end it
                await asyncio.sleep(0)  # the task's first step: the ring is empty, it waits
                assert not task.done()
                peer.close()
                with pytest.raises(ClosedError):
                    await asyncio.wait_for(task, 60)
                with pytest.raises(ClosedError):
                    await ch.recv_async(timeout=0.05)

            asyncio.run(main())
        finally:
            peer.close()


@pytest.mark.timeout(120)
def test_a_peer_closed_while_a_channel_is_made_on_it_still_ends_its_waits(tmp_path, shm_path):
    # Peer.close() tells the Channels it knows; one being made took its vector fd before the
    # close and registered after it, so it was never told: its waits slept on the closed fd
    # number (or on whatever file reused it) until their timeout.
    from pyivshmem import Peer, Region, Server

    class ClosedMeanwhile(Peer):
        # another thread's close(), landing after the Channel took its fd, before it registered
        @property
        def _bell_table(self):
            table = Peer._bell_table.fget(self)
            self.close()
            return table

    sock = os.path.join(tmp_path, "srv")
    with Server(sock, size="1M", vectors=2), Region.create(shm_path, "1M") as region:
        peer = ClosedMeanwhile.connect(sock)
        try:
            ch = Channel(region.create_ring("q", slot_size=16, capacity=2), peer, vector=0,
                         recheck=3600)
            assert peer.closed
            with pytest.raises(ClosedError):
                ch.recv(timeout=30)  # not a WaitTimeout after 30 s
        finally:
            peer.close()


@pytest.mark.timeout(120)
def test_an_asyncio_recv_woken_by_its_peers_close_reads_nothing_from_the_fd_number(tmp_path,
                                                                                    shm_path):
    # Woken by the Peer's close(), the task settled its doorbell fd (an 8-byte read) as after
    # any sleep, though that fd was closed by then: a file opened meanwhile under the same
    # number lost what it held to the task's read, and the loop's remove_reader() could drop
    # that file's registration.  Now the fd stays open while the loop watches it (the Peer's
    # fd keeper): nothing can take its number until the task has left, and the task, told of
    # the close, does not read it.
    from pyivshmem import Peer, Region, Server

    sock = os.path.join(tmp_path, "srv")
    with Server(sock, size="1M", vectors=2), Region.create(shm_path, "1M") as region:
        peer = Peer.connect(sock)
        held = []
        try:
            fd = peer.vector_fd(0)
            ch = Channel(region.create_ring("q", slot_size=16, capacity=2), peer, vector=0,
                         spin=0, recheck=3600)

            async def main():
                task = asyncio.ensure_future(ch.recv_async())  # only a close can end it
                await asyncio.sleep(0)  # the task's first step: the ring is empty, it sleeps
                assert not task.done()
                peer.close()
                assert os.fstat(fd)  # still open: the task watches it
                same = os.dup(fd)  # the same eventfd, to look at it once the Peer's copy is gone
                held.append(same)
                os.eventfd_write(fd, 5)
                with pytest.raises(ClosedError):
                    await asyncio.wait_for(task, 60)
                assert os.eventfd_read(same) == 5  # the task did not read it
                # the last user has left: closed now, and its number free for another file
                while not held or held[-1] != fd:
                    held.append(os.eventfd(7, os.EFD_NONBLOCK))
                    assert len(held) < 1000, "the fd was not closed after the task left"

            asyncio.run(main())
            assert os.eventfd_read(held[-1]) == 7  # the new file under the number is untouched
        finally:
            peer.close()
            for f in held:
                os.close(f)


@pytest.mark.timeout(60)
def test_a_wait_on_a_doorbell_fd_its_provider_closed_raises_a_pyivshmem_error(region):
    # A provider without _register_channel that closes its fds under a Channel: the wait failed
    # with a bare OSError (EBADF), not one of the package's errors saying what to do.
    from pyivshmem import IvshmemError

    fds = make_fds([0])
    ch = Channel(region.create_ring("q", "mpmc", slot_size=16, capacity=2), FdBell(0, fds),
                 vector=0, spin=0, recheck=3600)
    close_fds(fds)
    with pytest.raises(IvshmemError) as info:
        ch.recv(timeout=5)
    assert isinstance(info.value, OSError) and info.value.errno == errno.EBADF
    assert "doorbell" in str(info.value)
