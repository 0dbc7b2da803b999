"""Run by test_server_bounds.py in a child process: a server and its peers under a low
RLIMIT_NOFILE while clients connect and close thousands of times next to a quiet peer.

argv: socket path, cycles, fd limit. Prints one JSON line with what it saw; exits 0 when the
run finished (the parent asserts on the JSON).
"""
from __future__ import annotations

import json
import resource
import socket
import sys
import time


def main() -> int:
    path, cycles, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    from pyivshmem import Peer, Server
    from pyivshmem.peer import DISCONNECTED

    result = {"limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "connects": 0,
              "connect_errors": [], "healthy_events": 0, "disconnected": []}
    with Server(path, size="64K", vectors=4) as server:
        quiet = Peer.connect(path, vectors=4)     # joins, then is never used again
        healthy = Peer.connect(path, vectors=4)   # looks at its events every 200 cycles
        try:
            for i in range(cycles):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.settimeout(30)
                    s.connect(path)
                    if i % 2:
                        s.recv(8, socket.MSG_WAITALL)     # read the version, then go
                finally:
                    s.close()
                if i % 200 == 199:
                    for ev in healthy.events():
                        result["healthy_events"] += 1
                        if ev.kind == DISCONNECTED:
                            result["disconnected"].append("healthy")
                    try:
                        with Peer.connect(path, vectors=4, timeout=20) as newcomer:
                            assert healthy.id in newcomer.peers and quiet.id in newcomer.peers
                            result["connects"] += 1
                    except Exception as exc:   # reported, not raised: the parent asserts
                        result["connect_errors"].append(f"cycle {i}: {exc!r}")
            deadline = time.monotonic() + 60
            server.wait_until(lambda p: p == (quiet.id, healthy.id), 60)
            result["peers_at_end"] = list(server.peers)
            result["expected_peers"] = [quiet.id, healthy.id]
            result["stats"] = server.stats
            # the quiet peer reads at last: it was never dropped, so no DISCONNECTED
            while time.monotonic() < deadline:
                evs = quiet.events()
                if any(ev.kind == DISCONNECTED for ev in evs):
                    result["disconnected"].append("quiet")
                    break
                if quiet.peers == {healthy.id: 4}:
                    break
                quiet.wait(0.05)
            result["quiet_view"] = sorted(quiet.peers)
            result["fds"] = len(__import__("os").listdir("/proc/self/fd"))
        finally:
            quiet.close()
            healthy.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
