"""A deliberately small ivshmem server for VM tests, with the test process as one of the peers.

It speaks the protocol of IVSHMEM.md section 2 (version, id, memory fd, announcements with one eventfd
per vector) so QEMU's ivshmem-doorbell can connect, and registers the host test itself as a peer that
owns eventfds but no socket: ``ring(peer, vector)`` rings a guest, ``wait(vector, timeout)`` sleeps
on the host's own vector. It is independent of pyivshmem.Server/Peer on purpose: a second
implementation to test the guest side against.
"""
from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
from typing import Dict, Iterator, List, Optional


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # type: ignore[attr-defined]


class MiniServer:
    def __init__(self, socket_path: str, shm_fd: int, vectors: int = 1):
        self.path = socket_path
        self.shm_fd = shm_fd
        self.vectors = vectors
        self.lock = threading.Lock()
        self.peer_fds: Dict[int, List[int]] = {}
        self.socks: Dict[int, socket.socket] = {}
        self.order: List[int] = []
        self.next_id = 0
        self.host_id = self._new_peer(None)
        self.joined = threading.Condition(self.lock)
        self.left: List[int] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(socket_path)
        self.sock.listen(16)
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(target=self._loop, name="mini-ivshmem-server", daemon=True)
        self.thread.start()

    def _new_peer(self, sock: Optional[socket.socket]) -> int:
        pid = self.next_id
        self.next_id += 1
        self.peer_fds[pid] = [_eventfd() for _ in range(self.vectors)]
        if sock is not None:
            self.socks[pid] = sock
        self.order.append(pid)
        return pid

    @staticmethod
    def _send(sock: socket.socket, value: int, fd: Optional[int] = None) -> None:
        data = struct.pack("<q", value)
        if fd is None:
            sock.sendall(data)
        else:
            socket.send_fds(sock, [data], [fd])

    def _accept(self) -> None:
        conn, _ = self.sock.accept()
        with self.lock:
            new = self._new_peer(conn)
            self._send(conn, 0)
            self._send(conn, new)
            self._send(conn, -1, self.shm_fd)
            for pid, s in self.socks.items():
                if pid != new:
                    for fd in self.peer_fds[new]:
                        self._send(s, new, fd)
            for pid in self.order:
                if pid != new:
                    for fd in self.peer_fds[pid]:
                        self._send(conn, pid, fd)
            for fd in self.peer_fds[new]:
                self._send(conn, new, fd)
            self.joined.notify_all()

    def _drop(self, pid: int) -> None:
        with self.lock:
            s = self.socks.pop(pid)
            s.close()
            for fd in self.peer_fds.pop(pid):
                os.close(fd)
            self.order.remove(pid)
            for other in self.socks.values():
                try:
                    self._send(other, pid)
                except OSError:
                    pass
            self.left.append(pid)
            self.joined.notify_all()

    def _loop(self) -> None:
        while True:
            with self.lock:
                socks = dict(self.socks)
            rl = [self.sock, self._stop_r] + list(socks.values())
            ready, _, _ = select.select(rl, [], [], 1.0)
            if self._stop_r in ready:
                return
            for r in ready:
                if r is self.sock:
                    self._accept()
                else:
                    pid = next(p for p, s in socks.items() if s is r)
                    self._drop(pid)

    # -- the host as a peer ----------------------------------------------------------------------
    def guests(self) -> List[int]:
        with self.lock:
            return [p for p in self.order if p != self.host_id]

    def wait_guests(self, n: int, timeout: float) -> List[int]:
        with self.lock:
            if not self.joined.wait_for(lambda: len(self.socks) >= n, timeout):
                raise TimeoutError(f"{n} guests did not connect within {timeout}s")
            return [p for p in self.order if p != self.host_id]

    def ring(self, peer: int, vector: int = 0) -> None:
        with self.lock:
            fd = self.peer_fds[peer][vector]
        os.write(fd, (1).to_bytes(8, "little"))

    def host_fd(self, vector: int = 0) -> int:
        return self.peer_fds[self.host_id][vector]

    def wait(self, vector: int = 0, timeout: Optional[float] = None) -> int:
        """Sleep until the host's ``vector`` is rung; the count drained (0 on timeout)."""
        fd = self.host_fd(vector)
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            return 0
        try:
            return int.from_bytes(os.read(fd, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self.thread.join(timeout=10)
        with self.lock:
            for s in self.socks.values():
                s.close()
            for fds in self.peer_fds.values():
                for fd in fds:
                    os.close(fd)
            self.socks.clear()
            self.peer_fds.clear()
        self.sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "MiniServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def ivshmem_server(socket_path: str, size: int, vectors: int) -> Iterator[object]:
    """pyivshmem.Server when the package has it, else a MiniServer over a fresh memfd."""
    try:
        from pyivshmem.server import Server
    except ImportError:
        Server = None
    if Server is not None:
        with Server(socket_path, size=size, vectors=vectors) as srv:
            yield srv
        return
    fd = os.memfd_create("pyivshmem-vmtest", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with MiniServer(socket_path, fd, vectors) as srv:
            yield srv
    finally:
        os.close(fd)
