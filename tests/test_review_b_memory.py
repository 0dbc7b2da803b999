"""The memory a server hands out: a caller's ``shm_fd`` is the server's own copy from the moment
the Server exists, so closing the caller's fd (as "duplicated; the caller keeps its own" invites)
can never make the server size, and zero the start of, whatever file reuses that fd number."""
from __future__ import annotations

import os

import pytest

from pyivshmem.errors import IvshmemError
from pyivshmem.server import Server


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(60)
def test_closing_the_callers_shm_fd_before_start_is_safe(tmp_path):
    mem = os.memfd_create("caller-memory")
    os.ftruncate(mem, 4096)
    os.pwrite(mem, b"shared", 0)
    server = Server(str(tmp_path / "s.sock"), shm_fd=mem, size=4096)
    os.close(mem)                                  # the server has its own copy
    victim = os.open(tmp_path / "victim", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(victim, b"precious data")
        with server:
            assert os.pread(server.shm_fd, 6, 0) == b"shared"       # the caller's memory
            assert os.fstat(server.shm_fd).st_size == 4096
        with open(tmp_path / "victim", "rb") as f:
            assert f.read() == b"precious data"    # untouched (not truncated to 4096 bytes)
    finally:
        os.close(victim)


def test_a_bad_shm_fd_is_refused_when_the_server_is_made(tmp_path):
    with pytest.raises(IvshmemError, match="shm_fd"):
        Server(str(tmp_path / "s.sock"), shm_fd=10_000_000, size=4096)


def test_a_server_never_started_releases_its_copy_of_shm_fd(tmp_path):
    mem = os.memfd_create("caller-memory")
    try:
        before = _fd_count()
        server = Server(str(tmp_path / "s.sock"), shm_fd=mem, size=4096)
        server.close()
        assert _fd_count() == before
        server = Server(str(tmp_path / "s.sock"), shm_fd=mem, size=4096)
        with server:
            pass
        assert _fd_count() == before
    finally:
        os.close(mem)
