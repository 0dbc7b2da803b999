"""Child for tests/test_region_lost.py: a peer that uses the server's memory until another peer
truncates it.

    _lost_child.py SOCKET ping COUNT   send COUNT numbered messages on "ab", expect each reversed
                                       on "ba", then send b"stop"; reports {"running": 1} after 100
    _lost_child.py SOCKET pong         echo reversed until b"stop"
    _lost_child.py SOCKET idle         one Channel.recv on "idle", blocked (nobody sends) until
                                       the memory goes or the test sends one message

Each line on stdout is a JSON object.  A RegionLostError is reported as {"error": "RegionLostError",
"second": <what a second call raised>} and the process exits 0: it lived.  Any other exception
is reported and the exit status is 3.
"""
import json
import sys

from pyivshmem import Channel, Peer, RegionLostError


def report(**kw):
    print(json.dumps(kw), flush=True)


def main():
    sock, role = sys.argv[1], sys.argv[2]
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    peer = Peer.connect(sock, timeout=30)
    region = peer.region
    ring = None
    done = 0
    try:
        if role in ("ping", "pong"):
            ab = region.create_ring("ab", slot_size=64, capacity=16)
            ba = region.create_ring("ba", slot_size=64, capacity=16)
            if role == "ping":
                ring = ab
                tx, rx = Channel(ab, peer, vector=0), Channel(ba, peer, vector=1)
                report(ready=peer.id)
                for i in range(count):
                    msg = b"message %d" % i
                    tx.send(msg, timeout=60)
                    got = rx.recv(timeout=60)
                    if got != msg[::-1]:
                        raise AssertionError(f"round trip {i}: got {got!r}")
                    done += 1
                    if done == 100:
                        report(running=done)
                tx.send(b"stop", timeout=60)
            else:
                ring = ba
                rx, tx = Channel(ab, peer, vector=0), Channel(ba, peer, vector=1)
                report(ready=peer.id)
                while True:
                    got = rx.recv(timeout=60)
                    if got == b"stop":
                        break
                    tx.send(got[::-1], timeout=60)
                    done += 1
            report(done=done)
        else:
            ring = region.create_ring("idle", slot_size=64, capacity=16)
            rx = Channel(ring, peer, vector=0, spin=0)
            report(ready=peer.id)
            got = rx.recv(timeout=120)
            report(got=got.hex())
    except RegionLostError as e:
        try:
            len(ring)  # every later call raises too
            second = "nothing"
        except Exception as e2:  # noqa: BLE001 - reported to the test
            second = type(e2).__name__
        report(error=type(e).__name__, message=str(e), done=done, second=second)
    except Exception as e:  # noqa: BLE001 - reported to the test
        report(error=type(e).__name__, message=str(e), done=done)
        sys.exit(3)
    finally:
        region.close()
        peer.close()


if __name__ == "__main__":
    main()
