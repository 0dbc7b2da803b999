"""The check that a socket path is in use connects to it. QEMU's ivshmem-server shuts down (exit
status 0) when one of its first three sends to a new client fails (IVSHMEM.md section 3), so a
probe that connects and closes at once would kill a live QEMU server while checking whether it
is alive. The probe now reads the server's greeting before it closes."""
from __future__ import annotations

import array
import os
import socket
import threading

import pytest

from pyivshmem.errors import ConfigError
from pyivshmem.server import Server


class _QemuLikeServer:
    """Accepts one client and sends it the first three messages as QEMU's server does,
    recording a failed send (on which QEMU's server would exit)."""

    def __init__(self, path: str):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.mem = os.memfd_create("qemu-like")
        self.send_failed = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            try:
                for value, fd in ((0, None), (0, None), (-1, self.mem)):
                    anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                           if fd is not None else [])
                    conn.sendmsg([value.to_bytes(8, "little", signed=True)], anc)
            except OSError as exc:
                self.send_failed = exc
            conn.settimeout(30)
            conn.recv(1)      # the client leaves

    def close(self) -> None:
        self.thread.join(30)
        self.listener.close()
        os.close(self.mem)


@pytest.mark.timeout(60)
def test_the_in_use_check_does_not_break_a_live_qemu_servers_first_sends(tmp_path):
    path = str(tmp_path / "ivshmem.sock")
    live = _QemuLikeServer(path)
    try:
        fds_before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ConfigError, match="in use"):
            Server(path, size=4096).listen()
        live.thread.join(30)
        assert not live.thread.is_alive()
        assert live.send_failed is None, f"a send of the greeting failed: {live.send_failed}"
        # the memory fd the probe received was closed again
        assert len(os.listdir("/proc/self/fd")) == fds_before
    finally:
        live.close()
