"""The host-peer side of the server protocol in the C library (csrc/ivshm_hostpeer.c, part of
libivshm.a): examples/c/peer_doorbell.c joins a running server and plays doorbell ping-pong with a
Python Peer, against an embedded Server, the pyivshmem-server command and, where installed, QEMU's
own ivshmem-server."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from pyivshmem import Peer, Server

from _csrc import build_example
from test_server import _env, _wait_for

ROUNDS = 20


@pytest.fixture(scope="module")
def peer_doorbell(tmp_path_factory):
    return build_example("peer_doorbell", tmp_path_factory.mktemp("c"), lib=True,
                         warnings=("-Wall", "-Werror", "-Wno-maybe-uninitialized"))


def _ping_pong(exe: str, sock_path: str, py: Peer) -> None:
    """Run the C peer against the server at sock_path; answer each of its rings."""
    proc = subprocess.Popen([exe, sock_path, str(py.id), str(ROUNDS), "10000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        m = re.match(r"joined id=(\d+) size=(\d+) peers=(\d+) word0=([0-9a-f]{16})$", first.strip())
        assert m, f"C peer did not join: {first!r} {proc.stderr.read()}"
        c_id, size, npeers = int(m.group(1)), int(m.group(2)), int(m.group(3))
        assert c_id != py.id
        assert size == py.region.size
        assert npeers >= 1                  # it saw the Python peer's vectors
        # The C peer mapped the same memory: the first word is what Python sees there.
        assert int.from_bytes(os.pread(py.region.fileno(), 8, 0), "little") == int(m.group(4), 16)
        # The server may announce the C peer to us after its set-up, even after its first ring:
        # wait for the announcement, keeping a ring that arrives meanwhile for round 0.
        rung = False
        deadline = time.monotonic() + 10
        while c_id not in py.peers and time.monotonic() < deadline:
            rung = 0 in py.wait(deadline - time.monotonic()) or rung
        assert c_id in py.peers, "the C peer's join never reached the Python peer"
        for i in range(ROUNDS):
            if not (i == 0 and rung):
                assert py.wait(10) == [0], f"round {i}: the C peer's doorbell did not arrive"
            py.notify(c_id, 0)
        assert proc.wait(30) == 0, proc.stderr.read()
        lines = proc.stdout.read().split()
        assert lines[-1] == "done" and lines.count("round") == ROUNDS
        # Its leave reaches the Python peer too.
        deadline = time.monotonic() + 10
        while c_id in py.peers and time.monotonic() < deadline:
            py.wait(0.2)
        assert c_id not in py.peers
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.timeout(120)
def test_c_peer_with_embedded_server(peer_doorbell, tmp_path):
    path = str(tmp_path / "s.sock")
    with Server(path, size="1M", vectors=2):
        with Peer.connect(path, vectors=2) as py:
            _ping_pong(peer_doorbell, path, py)
            # A second C peer after the first left: ids and tables stay right.
            _ping_pong(peer_doorbell, path, py)


def _installed(name: str) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), name)
    return exe if os.path.exists(exe) else (shutil.which(name) or "")


def _run_cli_server(argv, sock_path, exe, env=None):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        _wait_for(lambda: os.path.exists(sock_path) or proc.poll() is not None, what="socket")
        assert proc.poll() is None, proc.stderr.read()
        with Peer.connect(sock_path, vectors=1) as py:
            _ping_pong(exe, sock_path, py)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)
        proc.stderr.close()


@pytest.mark.timeout(120)
def test_c_peer_with_pyivshmem_server_command(peer_doorbell, tmp_path):
    exe = _installed("pyivshmem-server")
    if not exe:
        pytest.skip(f"pyivshmem-server is not installed next to {sys.executable}")
    sock = str(tmp_path / "s.sock")
    _run_cli_server([exe, "-F", "-S", sock, "-m", str(tmp_path), "-l", "64K", "-n", "1"], sock,
                    peer_doorbell, env=_env())


@pytest.mark.timeout(120)
def test_c_peer_with_qemu_ivshmem_server(peer_doorbell, tmp_path):
    exe = shutil.which("ivshmem-server")
    if not exe:
        pytest.skip("QEMU's ivshmem-server is not installed (`which ivshmem-server` finds none)")
    sock = str(tmp_path / "s.sock")
    _run_cli_server([exe, "-F", "-S", sock, "-m", str(tmp_path), "-l", "64K", "-n", "1"], sock,
                    peer_doorbell)
