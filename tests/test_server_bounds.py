"""What slow and quiet clients cost the server under churn, and what a Peer reads and when.

- A client that does not read costs the server at most the live peers' joins: announcements of
  peers that came and went meanwhile are coalesced, and their fds are closed when they leave.
- A Peer takes in its server's messages whenever it is used, so a peer that only sends never
  makes the server queue for it.
"""
from __future__ import annotations

import json
import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from typing import List

import pytest

from pyivshmem import Peer, Server
from pyivshmem.peer import DISCONNECTED, JOINED, LEFT
from pyivshmem.server import COALESCE_AFTER

from test_server import RawClient, _env, join, open_fd_count
from test_server_hostile import unread_bytes

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "ivshmem.sock")


@pytest.fixture(autouse=True)
def _nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


class RawPeer:
    """An honest peer that never reads its server socket after set-up: it rings and waits on
    the eventfds it got then, like an application that only uses its doorbells."""

    def __init__(self, path: str, vectors: int, others: int):
        self.client = RawClient(path)
        self.id, _shm = self.client.handshake()
        self.others = {}
        for _ in range(others):
            peer, fds = join(self.client, vectors)
            self.others[peer] = fds
        peer, self.own = join(self.client, vectors)
        assert peer == self.id

    def close(self) -> None:
        self.client.close()


@pytest.mark.timeout(300)
def test_churn_next_to_a_peer_that_never_reads(sock_path):
    """Two honest peers ring each other while 3,000 clients come and go, a part of them never
    reading; one honest peer never reads its server socket. Afterwards the server holds at
    most 64 fds more than before, every doorbell arrived, and a newcomer is announced."""
    vectors = 4
    cycles = 3000
    with Server(sock_path, size="64K", vectors=vectors) as server:
        a = Peer.connect(sock_path, vectors=vectors)
        b = RawPeer(sock_path, vectors, others=1)       # never reads its socket again
        assert set(b.others) == {a.id}
        try:
            deadline = time.monotonic() + 20
            while b.id not in a.peers:
                assert time.monotonic() < deadline, "a never heard of b"
                a.wait(0.05)
                a.events()
            assert server.wait_until(lambda p: p == (a.id, b.id), 10)
            before = open_fd_count()

            rounds = {"done": 0}
            stop = threading.Event()
            failure: List[str] = []

            def ping_pong() -> None:
                # every ring is seen on its own: a lost doorbell is a timeout here
                try:
                    while not stop.is_set():
                        a.notify(b.id, 1)
                        if not _readable(b.own[1], 30):
                            failure.append(f"b never saw a's ring {rounds['done']}")
                            return
                        assert os.read(b.own[1], 8) == (1).to_bytes(8, "little")
                        os.write(b.others[a.id][2], (1).to_bytes(8, "little"))
                        if a.wait(30) != [2]:
                            failure.append(f"a never saw b's ring {rounds['done']}")
                            return
                        rounds["done"] += 1
                except BaseException as exc:  # noqa: BLE001 - reported below
                    failure.append(repr(exc))

            t = threading.Thread(target=ping_pong, daemon=True)
            t.start()
            silent: List[socket.socket] = []
            try:
                for i in range(cycles):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(30)
                    s.connect(sock_path)
                    if i % 15 == 0:
                        silent.append(s)          # never reads; stays for a while
                        if len(silent) > 10:
                            silent.pop(0).close()
                        continue
                    if i % 3 == 1:
                        s.recv(24, socket.MSG_WAITALL)   # version, id, memory: then go
                    s.close()
                    if failure:
                        break
            finally:
                for s in silent:
                    s.close()
                stop.set()
                t.join(60)
            assert not failure, failure
            assert rounds["done"] > 0
            assert server.wait_until(lambda p: p == (a.id, b.id), 60), server.peers
            # a reads everything the churn left for it
            deadline = time.monotonic() + 30
            while a.peers != {b.id: vectors}:
                assert time.monotonic() < deadline, a.peers
                a.wait(0.05)
                assert not any(e.kind == DISCONNECTED for e in a.events())
            stats = server.stats
            assert stats["accepted"] == cycles + 2
            assert stats["dropped_overflow"] == 0, stats
            assert server.backlog(b.id) <= COALESCE_AFTER + 2 * vectors
            after = open_fd_count()
            assert after <= before + 64, (before, after, stats)

            # a newcomer joins, is announced to a, and the doorbells work both ways
            with Peer.connect(sock_path, vectors=vectors) as c:
                assert set(c.peers) == {a.id, b.id}
                deadline = time.monotonic() + 20
                seen = []
                while (JOINED, c.id) not in seen:
                    assert time.monotonic() < deadline, seen
                    a.wait(0.05)
                    seen += [(e.kind, e.peer) for e in a.events()]
                a.notify(c.id, 3)
                assert c.wait(10) == [3]
                c.notify(a.id, 0)
                assert a.wait(10) == [0]
        finally:
            a.close()
            b.close()


@pytest.mark.timeout(300)
def test_connect_close_cycles_under_a_2048_fd_limit(sock_path):
    """8,000 connect/close cycles next to a quiet peer, in a process limited to 2,048 fds:
    every new Peer still connects and neither the quiet nor the healthy peer is dropped."""
    cycles = 8000
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "_churn_child.py"), sock_path, str(cycles), "2048"],
        capture_output=True, text=True, timeout=280, env=_env(),
    )
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["limit"] == 2048
    assert result["connect_errors"] == []
    assert result["connects"] == cycles // 200
    assert result["disconnected"] == []
    assert result["peers_at_end"] == result["expected_peers"]
    assert result["quiet_view"] == [result["expected_peers"][1]]
    assert result["stats"]["dropped_overflow"] == 0
    assert result["stats"]["accepted"] == cycles + cycles // 200 + 2
    assert result["fds"] < 200, result


# ------------------------------------------------------------------------------------------
# what a Peer reads, and when
# ------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_peer_that_only_sends_never_makes_the_server_queue(sock_path):
    vectors = 2
    with Server(sock_path, size="64K", vectors=vectors) as server:
        with Peer.connect(sock_path, vectors=vectors) as sender, \
                Peer.connect(sock_path, vectors=vectors) as receiver:
            deadline = time.monotonic() + 20
            while receiver.id not in sender.peers:   # notify_target takes in messages too
                assert time.monotonic() < deadline
                sender.notify_target(receiver.id, 0)
            most = 0
            for i in range(1000):
                with socket.socket(socket.AF_UNIX) as s:   # a peer comes and goes
                    s.connect(sock_path)
                # ... and the server is done with it (3 messages queued for each peer)
                assert server.wait_until(
                    lambda p: p == (sender.id, receiver.id)
                    and server.stats["accepted"] == i + 3, 10)
                sender.notify(receiver.id, i % vectors)
                assert receiver.wait(10) == [i % vectors]
                receiver.events()
                most = max(most, server.backlog(sender.id))
            # without reading, its socket would have filled within ~100 cycles and the
            # server's backlog for it would have grown to COALESCE_AFTER
            assert most <= 8, most
            assert server.stats["dropped_overflow"] == 0
            # what the sender took in waits for its events(); fileno() says so
            assert _readable(sender.fileno(), 10)
            events = sender.events()
            assert events and all(e.kind in (JOINED, LEFT) for e in events)
            assert not _readable(sender.fileno(), 0)


@pytest.mark.timeout(120)
def test_one_events_call_takes_in_everything_waiting(sock_path):
    vectors = 2
    n = 50
    with Server(sock_path, size="64K", vectors=vectors) as server:
        with Peer.connect(sock_path, vectors=vectors) as p:
            others = []
            try:
                for _ in range(n):
                    c = RawClient(sock_path)
                    c.handshake()
                    others.append(c)
                assert server.wait_until(lambda peers: len(peers) == n + 1, 20)
                # everything for p is in its socket, nothing left in the server
                deadline = time.monotonic() + 20
                while server.backlog(p.id):
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                events = p.events()
                assert [e.kind for e in events] == [JOINED] * n
                assert {e.peer for e in events} == {c_id for c_id in server.peers if c_id != p.id}
                assert all(e.vectors == vectors for e in events)
                assert p.events() == []
                assert not _readable(p.fileno(), 0)
            finally:
                for c in others:
                    c.close()


@pytest.mark.timeout(120)
def test_events_that_pile_up_unread_are_compacted(sock_path):
    """An application that never calls events() keeps at most a few hundred events, however
    many peers come and go; and those left say what changed."""
    with Server(sock_path, size="64K", vectors=1) as server:
        with Peer.connect(sock_path, vectors=1) as p, Peer.connect(sock_path, vectors=1) as q:
            for _ in range(1500):
                with RawClient(sock_path) as c:
                    c.handshake()
                    c.recv_fd()
                p.notify(q.id)          # takes in what is waiting
                assert len(p._pending) <= 600   # white-box: the bound
            assert server.wait_until(lambda peers: peers == (p.id, q.id), 20)
            deadline = time.monotonic() + 20
            events = []
            while True:
                p.wait(0.05)
                events += p.events()
                if server.backlog(p.id) == 0 and not _readable(p.fileno(), 0.05):
                    break
                assert time.monotonic() < deadline
            # what is left is consistent: every joined peer left again
            joined = [e.peer for e in events if e.kind == JOINED and e.peer != q.id]
            left = [e.peer for e in events if e.kind == LEFT]
            assert sorted(joined) == sorted(left), (set(joined) ^ set(left), events[-6:])
            assert p.peers == {q.id: 1}


@pytest.mark.timeout(120)
def test_a_client_a_little_behind_hears_of_a_short_lived_peer_without_its_fds(sock_path):
    """A client whose socket is full but who is less than COALESCE_AFTER messages behind still
    hears of a peer that came and went meanwhile: its join arrives with a stand-in eventfd
    (the same one for every vector), then its departure. The server closed that peer's own
    eventfds when it left."""
    from test_server import same_eventfd

    vectors = 64
    with Server(sock_path, size="64K", vectors=vectors) as server:
        behind = RawClient(sock_path)
        others: List[RawClient] = []
        try:
            assert server.wait_until(lambda p: len(p) == 1, 10)

            def state() -> tuple:
                return server.backlog(0), unread_bytes(behind.sock)

            while True:              # fill its socket with other peers' joins
                sent = 8 * (3 + vectors * (len(others) + 1))
                deadline = time.monotonic() + 10
                while True:          # everything arrived, or the socket stays full
                    now = state()
                    if now == (0, sent):
                        break
                    if now[0] > 0 and 0 < now[1] < sent:
                        time.sleep(0.05)
                        if state() == now:
                            break
                    assert time.monotonic() < deadline, now
                    time.sleep(0.005)
                if now[0] > 0:
                    break
                c = RawClient(sock_path)
                c.handshake()
                others.append(c)
                assert len(others) < 50
            before = open_fd_count()
            with RawClient(sock_path) as brief:
                brief_id = brief.handshake()[0]
                assert server.wait_until(lambda p: brief_id in p, 10)
            assert server.wait_until(lambda p: brief_id not in p, 10)
            # its 64 eventfds and its socket (both ends) are gone
            assert open_fd_count() == before
            assert server.backlog(0) < COALESCE_AFTER
            assert server.stats["coalesced"] == 0
            # now it reads: everyone, the short-lived peer included, then its departure
            assert behind.handshake()[0] == 0
            assert join(behind, vectors)[0] == 0
            for c in others:
                assert join(behind, vectors)[0] != brief_id
                behind.drop_fds()
            peer, fds = join(behind, vectors)
            assert peer == brief_id
            assert all(same_eventfd(fds[0], fd) for fd in fds[1:])   # one stand-in
            assert behind.recv_nofd() == brief_id
        finally:
            behind.close()
            for c in others:
                c.close()
