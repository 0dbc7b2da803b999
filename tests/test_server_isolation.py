"""What one server or peer cannot do to the rest: shrink the shared memory under the other
peers, or change the state of the process that embeds the server."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap

import pytest

from pyivshmem import Peer, Server

from test_server import _env


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "ivshmem.sock")


def _run(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, env=_env())


# ------------------------------------------------------------------------------------------
# shrinking the memory
# ------------------------------------------------------------------------------------------
_OTHER_PEER = """
import os, sys
from pyivshmem import Peer
with Peer.connect(sys.argv[1], vectors=1) as p:
    ring = p.region.create_ring("work", "spsc", slot_size=64, capacity=64)
    size = os.fstat(p.region.fileno()).st_size
    print("ready", p.id, size, flush=True)
    sys.stdin.readline()            # the parent's peer tried to truncate meanwhile
    # touch the whole ring and the last page of the region: SIGBUS if it had shrunk
    for i in range(1000):
        assert ring.try_send(b"x" * (i % 64))
        assert ring.try_recv() == b"x" * (i % 64)
    with open(f"/proc/self/fd/{p.region.fileno()}", "r+b") as f:
        f.seek(size - 8)
        f.write(b"lastpage")
    print("ok", flush=True)
"""


@pytest.mark.timeout(120)
def test_a_peer_cannot_shrink_the_servers_memory(sock_path):
    """The server's memfd is sealed: ftruncate by any peer fails, and the other peers keep
    running (no SIGBUS)."""
    with Server(sock_path, size="1M", vectors=1) as server:
        other = subprocess.Popen([sys.executable, "-c", _OTHER_PEER, sock_path],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=_env())
        try:
            line = other.stdout.readline().split()
            assert line[:1] == ["ready"], other.stderr.read()
            assert int(line[2]) == 1 << 20
            with Peer.connect(sock_path, vectors=1) as bad:
                seals = fcntl.fcntl(bad.region.fileno(), fcntl.F_GET_SEALS)
                assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
                assert seals & fcntl.F_SEAL_SEAL      # and nobody can lift them
                with pytest.raises(PermissionError):
                    os.ftruncate(bad.region.fileno(), 4096)
                with pytest.raises(PermissionError):
                    os.ftruncate(bad.region.fileno(), 2 << 20)
                with pytest.raises(PermissionError):
                    fcntl.fcntl(bad.region.fileno(), fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
                assert os.fstat(server.shm_fd).st_size == 1 << 20
                # this peer's own mapping is intact as well
                mine = bad.region.create_ring("mine", "spsc", slot_size=64, capacity=8)
                assert mine.try_send(b"still here")
                assert mine.try_recv() == b"still here"
            other.stdin.write("go\n")
            other.stdin.flush()
            assert other.stdout.readline().strip() == "ok", other.stderr.read()
            assert other.wait(30) == 0
        finally:
            if other.poll() is None:
                other.kill()
            other.wait(30)
            for f in (other.stdin, other.stdout, other.stderr):
                f.close()


# ------------------------------------------------------------------------------------------
# the embedding process
# ------------------------------------------------------------------------------------------
_EMBED = """
import json, resource, signal, sys
from pyivshmem import Peer, Server
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
low = min(soft, hard, 512)
resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGPIPE)}
out = {"before": [low, hard]}
with Server(sys.argv[1], size="64K", **json.loads(sys.argv[2])) as server:
    with Peer.connect(sys.argv[1], vectors=1):
        out["running"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
out["after"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
out["signals_kept"] = all(signal.getsignal(s) is h for s, h in handlers.items())
print(json.dumps(out))
"""


@pytest.mark.timeout(60)
def test_an_embedded_server_leaves_the_fd_limit_and_signals_alone(sock_path):
    r = _run(_EMBED, sock_path, "{}")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["running"] == out["before"] and out["after"] == out["before"]
    assert out["signals_kept"]


@pytest.mark.timeout(60)
def test_raise_fd_limit_raises_it_when_asked(sock_path):
    r = _run(_EMBED, sock_path, '{"raise_fd_limit": true}')
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    low, hard = out["before"]
    if low == hard:
        pytest.skip("the hard limit is already this low")
    assert out["running"][0] == hard


@pytest.mark.timeout(60)
def test_the_command_line_raises_the_fd_limit(sock_path, tmp_path):
    """pyivshmem-server, as a server process, takes as many fds as the host allows."""
    import resource
    import signal
    import time

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, hard, 512)
    proc = subprocess.Popen(
        [sys.executable, "-c",
         f"import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, {hard}));"
         "from pyivshmem.cli import server_main; sys.exit(server_main())",
         "-F", "-S", sock_path, "-m", str(tmp_path), "-l", "64K"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock_path):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with Peer.connect(sock_path, vectors=1):
            pass
        assert resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)[0] == hard
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stderr.close()
