"""Channels between two host processes that met through the ivshmem server: the memory is the
server's, the doorbells are the eventfds it handed out."""
import json
import os
import subprocess
import sys
import time

import pytest

from pyivshmem import Channel, Peer, Server
from pyivshmem.peer import JOINED, LEFT

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.timeout(120)
def test_two_peers_echo_over_server_memory_with_doorbells(tmp_path):
    count = 2000
    sock = str(tmp_path / "ivshmem.sock")
    with Server(sock, size="1M", vectors=2) as server:
        server.start()
        with Peer.connect(sock, timeout=30) as me:
            child = subprocess.Popen([sys.executable, os.path.join(HERE, "_peer_child.py"), sock,
                                      str(count)], stdout=subprocess.PIPE, text=True)
            try:
                other = json.loads(child.stdout.readline())["id"]
                region = me.region
                tx = Channel(region.create_ring("to_b", slot_size=64, capacity=16), me, vector=0,
                             spin=0)
                rx = Channel(region.create_ring("to_a", slot_size=64, capacity=16), me, vector=1,
                             spin=0)
                for i in range(count):
                    msg = b"message %d" % i
                    tx.send(msg, timeout=60)
                    assert rx.recv(timeout=60) == msg[::-1]
                stats = json.loads(child.stdout.readline())
                assert child.wait(60) == 0
                # the server announced the child while it ran and its departure once it exited
                seen = me.events()
                deadline = time.monotonic() + 30
                while (LEFT, other) not in [(e.kind, e.peer) for e in seen]:
                    assert time.monotonic() < deadline, f"no LEFT event for peer {other}: {seen}"
                    me.wait(0.2)  # the channels are done: draining their vectors is harmless
                    seen += me.events()
                kinds = [(e.kind, e.peer) for e in seen]
                assert (JOINED, other) in kinds, kinds
                assert kinds.index((JOINED, other)) < kinds.index((LEFT, other)), kinds
                assert other not in me.peers
                region.close()
            finally:
                if child.poll() is None:
                    child.kill()
                child.stdout.close()
    # with spin=0 every wait sleeps: the round trips ran on doorbells through the server's eventfds
    assert rx.stats["wakeups"] > 0 and stats["rx"]["wakeups"] > 0
    assert tx.stats["doorbells"] > 0 and stats["tx"]["doorbells"] > 0
    assert stats["rx"]["received"] == count
