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
