"""Child process for channel tests: python _channel_child.py MODE REGION FD0 FD1 [args]."""
import json
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _fdbell import FdBell  # noqa: E402

from pyivshmem import Channel, Region  # noqa: E402


def main():
    mode, path, fd0, fd1 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    bell = FdBell(1, {0: [fd0], 1: [fd1]})
    region = Region.open(path)
    if mode == "stress-producer":
        count, seed = int(sys.argv[5]), int(sys.argv[6])
        rnd = random.Random(seed)
        ch = Channel(region.ring("a2b"), bell, spin=0, recheck=60)
        i = 0
        while i < count:
            burst = rnd.choice([1, 1, 2, 5, 50])
            for _ in range(min(burst, count - i)):
                ch.send(i.to_bytes(8, "little"), timeout=120)
                i += 1
            pause = rnd.choice([0, 0, 0, 1e-6, 5e-5, 3e-4])
            if pause:
                time.sleep(pause)
        ch.send(b"END", timeout=120)
        print(json.dumps(ch.stats), flush=True)
    elif mode == "echo":
        rx = Channel(region.ring("a2b"), bell, spin=float(sys.argv[5]), recheck=60)
        tx = Channel(region.ring("b2a"), bell, spin=float(sys.argv[5]), recheck=60)
        print("ready", flush=True)
        while True:
            m = rx.recv(timeout=120)
            if m == b"END":
                break
            tx.send(m, timeout=120)
        print(json.dumps({"rx": rx.stats, "tx": tx.stats}), flush=True)
    elif mode == "block":
        handled = []
        signal.signal(signal.SIGUSR1, lambda *a: handled.append(1))
        # Python's own Ctrl-C handler, whatever this process inherited: a job started in the
        # background by a shell without job control starts with SIGINT ignored, and Python then
        # installs no handler at all
        signal.signal(signal.SIGINT, signal.default_int_handler)
        ch = Channel(region.ring("a2b"), bell, spin=0, recheck=60)
        print("waiting", flush=True)
        t0 = time.monotonic()
        try:
            ch.recv(timeout=float(sys.argv[5]))
        except TimeoutError:
            print(f"timeout {time.monotonic() - t0:.3f} signals {len(handled)}", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    region.close()


if __name__ == "__main__":
    main()
