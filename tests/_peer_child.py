"""Child for tests/test_channel_peers.py: connect to a server, echo on a Channel, report stats."""
import json
import sys

from pyivshmem import Channel, Peer


def main():
    sock, count = sys.argv[1], int(sys.argv[2])
    with Peer.connect(sock, timeout=30) as peer:
        region = peer.region
        rx = Channel(region.create_ring("to_b", slot_size=64, capacity=16), peer, vector=0, spin=0)
        tx = Channel(region.create_ring("to_a", slot_size=64, capacity=16), peer, vector=1, spin=0)
        print(json.dumps({"id": peer.id}), flush=True)
        for _ in range(count):
            tx.send(rx.recv(timeout=60)[::-1], timeout=60)
        print(json.dumps({"rx": rx.stats, "tx": tx.stats}), flush=True)
        region.close()


if __name__ == "__main__":
    main()
