#!/usr/bin/env python3
"""Where a sleeping Python receiver's wake-up time goes: three receivers, alternated sample by
sample between the same two processes, so that a change of the machine's speed meets them alike.

    python3 bench/wake_python.py [--samples N] [--gap SECONDS] [--cpus A,B]

  read     a blocking os.eventfd_read (what the bare eventfd ping-pong does, from Python)
  poll     poll() on the eventfd and two idle eventfds with a 1 s timeout, then a read: what a
           sleeper that can be cancelled and re-checks must do (a Channel's sleep in C)
  channel  Channel.recv over a Peer of an embedded server (vector 0), no spinning

The sender sleeps --gap before each wake-up, takes the time, and at once writes the eventfd or
sends a message made beforehand through the Channel; the receiver takes the time when its call
returns, and the i-th arrival is paired with the i-th send.  The sender waits for an
acknowledgement before the next sample.  Prints the p50 of each and the ratios; figures belong to
benchmarks, never to pass/fail tests.
"""
import argparse
import multiprocessing as mp
import os
import select
import statistics
import tempfile
import time

from pyivshmem import Channel, Peer, Server

KINDS = ("read", "poll", "channel")


def _child(role, cpu, sock, fds, n, gap, out, ready):
    os.sched_setaffinity(0, {cpu})
    clock = time.monotonic_ns
    bare, polled, ack, idle1, idle2 = fds
    peer = Peer.connect(sock, timeout=10)
    ring = peer.region.ring("wake")
    chan = Channel(ring, peer, vector=0 if role == "recv" else 1, spin=0.0)
    msg = b"x" * 64
    try:
        if role == "send":
            ready.get()  # the receiver is ready
            sent = {k: [] for k in KINDS}
            for i in range(len(KINDS) * n):
                time.sleep(gap)
                kind = KINDS[i % len(KINDS)]
                t = clock()
                if kind == "read":
                    os.eventfd_write(bare, 1)
                elif kind == "poll":
                    os.eventfd_write(polled, 1)
                else:
                    chan.send(msg)
                sent[kind].append(t)
                os.eventfd_read(ack)
            out.put(("sent", sent))
            return
        po = select.poll()
        for fd in (polled, idle1, idle2):
            po.register(fd, select.POLLIN)
        arrived = {k: [] for k in KINDS}
        ready.put("ready")
        for i in range(len(KINDS) * n):
            kind = KINDS[i % len(KINDS)]
            if kind == "read":
                os.eventfd_read(bare)
            elif kind == "poll":
                po.poll(1000)
                os.eventfd_read(polled)
            else:
                chan.recv(timeout=10)
            arrived[kind].append(clock())
            os.eventfd_write(ack, 1)
        out.put(("arrived", arrived))
    finally:
        chan.close()
        peer.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000, help="wake-ups per receiver")
    ap.add_argument("--gap", type=float, default=0.0005, help="seconds asleep before each")
    ap.add_argument("--cpus", default="0,1", help="sender CPU, receiver CPU")
    a = ap.parse_args()
    cpu_s, cpu_r = (int(c) for c in a.cpus.split(","))
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "s")
        with Server(sock, memfd=True, size="1M", vectors=2) as server:
            server.start()
            with Peer.connect(sock, timeout=10) as p:
                p.region.create_ring("wake", "spsc", slot_size=128, capacity=64)
            fds = [os.eventfd(0), os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0),
                   os.eventfd(0), os.eventfd(0)]
            ctx = mp.get_context("fork")
            out, ready = ctx.Queue(), ctx.Queue()
            common = (sock, fds, a.samples, a.gap, out, ready)
            recv = ctx.Process(target=_child, args=("recv", cpu_r) + common)
            recv.start()
            send = ctx.Process(target=_child, args=("send", cpu_s) + common)
            send.start()
            got = dict(out.get(timeout=60) for _ in range(2))
            send.join()
            recv.join()
            for fd in fds:
                os.close(fd)
    lat = {k: [b - a for a, b in zip(got["sent"][k], got["arrived"][k])] for k in KINDS}
    p50 = {k: statistics.median(v) / 1e3 for k, v in lat.items()}
    print(f"one-way wake-up p50, {a.samples} samples each, alternated, CPUs {a.cpus}: "
          + ", ".join(f"{k} {p50[k]:.2f} us" for k in KINDS))
    print(f"read/poll x{p50['read'] / p50['poll']:.3f}, poll/channel x{p50['poll'] / p50['channel']:.3f}, "
          f"read/channel x{p50['read'] / p50['channel']:.3f}")


if __name__ == "__main__":
    main()
