"""Issue 12 item 17: a Peer inherited across fork belongs to the parent.  Closing it in the child
used to remove the server socket from the epoll set the two processes share, so the parent's
close() raised and leaked its fds and mapping; using it in the child would read the parent's
server messages.  Now the child may only close it (its own copies) and gets a clear error for
anything else, and the parent never notices."""
import gc
import os

import pytest

from _fds import fd_count
from pyivshmem import InheritedError, Peer, Server



@pytest.mark.timeout(60)
def test_peer_closed_in_a_forked_child_leaves_the_parent_alone(tmp_path):
    sock = str(tmp_path / "s.sock")
    with Server(sock, size="64K", vectors=2) as server:
        server.start()
        gc.collect()  # earlier tests' garbage must not close its fds in the middle of this one
        base = fd_count()
        peer = Peer.connect(sock, timeout=10)
        pid = os.fork()
        if pid == 0:  # the child: only plain os calls after the checks, then _exit
            code = 0
            try:
                try:
                    peer.notify(peer.id, 0)
                    code = 3  # it must refuse
                except InheritedError as e:
                    if "fork" not in str(e):
                        code = 4
                peer.close()
                peer.close()
            except BaseException:
                code = 5
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # the parent's peer still works: its own doorbell, its server socket, its memory
        peer.notify(peer.id, 1)
        assert peer.wait(5) == [1]
        peer.events()
        peer.region.create_ring("still-mapped", slot_size=16, capacity=2).send(b"ok", timeout=1)
        assert server.wait_until(lambda peers: peer.id in peers, 10)
        peer.close()  # no error, nothing leaked
        assert server.wait_until(lambda peers: not peers, 10)
        assert fd_count() <= base, "the parent leaked descriptors"


@pytest.mark.timeout(60)
def test_region_closed_in_a_forked_child_leaves_the_parents_channels_alone(shm_path):
    # the region's close eventfd is shared across fork: a child closing its copy wrote it, and
    # every blocking call of the parent on that region raised ClosedError from then on
    from pyivshmem import Channel, Region

    with Region.create(shm_path, "1M") as r:
        rx = Channel(r.create_ring("a", slot_size=64, capacity=4), spin=0)
        tx = Channel(r.ring("a"), spin=0)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                r.close()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not r.closed
        tx.send(b"after the child closed its copy")
        assert rx.recv(timeout=10) == b"after the child closed its copy"
        from pyivshmem import WaitTimeout
        with pytest.raises(WaitTimeout):  # a real wait, not an instant ClosedError
            rx.recv(timeout=0.05)
        rx.close()
        tx.close()


@pytest.mark.timeout(60)
def test_a_forked_child_exits_and_leaves_the_parents_server_alone(tmp_path):
    # the atexit hook closed every live server, in the child too: it waited for a loop thread
    # that only the parent has (the child hung at exit), or would unlink the parent's socket
    import subprocess
    import sys
    import textwrap

    sock = str(tmp_path / "s.sock")
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pyivshmem import Peer, Server
        srv = Server({sock!r}, size="1M", vectors=1).start()
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a hang at exit dies of SIGALRM instead of blocking the test
            sys.exit(0)
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0, st
        assert os.path.exists({sock!r}), "the child unlinked the parent's socket"
        with Peer.connect({sock!r}, timeout=10) as p:
            assert p.id >= 0
        srv.close()
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stdout, p.stderr[-2000:])


@pytest.mark.timeout(60)
def test_a_forked_child_starts_with_no_sleepers_on_the_parents_doorbell_fds(shm_path):
    # The process's list of sleepers on a doorbell fd (the channels' fd share) names the parent's
    # sleeping threads, which do not exist in a child: a child that kept them would put rings
    # back for them for good, and would spin for ever on a share lock one of them held.
    import threading
    import time

    from _fdbell import FdBell, close_fds, make_fds

    from pyivshmem import Channel, Region, WaitTimeout, _ring

    fds = make_fds([0, 1])
    try:
        with Region.create(shm_path, "1M") as r:
            rx = Channel(r.create_ring("a", slot_size=64, capacity=4), FdBell(0, fds), spin=0,
                         recheck=60)
            done = threading.Event()

            def sleeper():
                try:
                    rx.recv(timeout=30)
                except WaitTimeout:
                    pass
                done.set()

            th = threading.Thread(target=sleeper, daemon=True)
            th.start()
            fd = fds[0][0]
            deadline = time.monotonic() + 20
            while _ring._fd_share_count(fd) != 1:
                assert time.monotonic() < deadline, "the thread never slept on its doorbell"
                time.sleep(0.001)
            pid = os.fork()
            if pid == 0:
                os._exit(0 if _ring._fd_share_count(fd) == 0 else 3)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, \
                "the child still counts the parent's sleeper"
            assert _ring._fd_share_count(fd) == 1  # the parent's is untouched
            Channel(r.ring("a"), FdBell(1, fds), spin=0).send(b"x")
            assert done.wait(20)
            th.join(5)
            assert _ring._fd_share_count(fd) == 0
            rx.close()
    finally:
        close_fds(fds)
