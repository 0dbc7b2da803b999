"""Channel across the VM boundary: the same Channel code on a host Peer and in a QEMU guest on a
PciDevice (VFIO, MSI-X), 10,000 messages each way at once, then a ping-pong in which every sleep
must end by a doorbell.

Server: pyivshmem.Server when the package has it, else tests/vm/mini_server.py. Needs
qemu-system-x86_64 (skips otherwise).
"""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from vm import harness
from vm.mini_server import ivshmem_server
from vm.pump import check_sequence, make_messages

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.timeout(300)]

SHM_SIZE = 1 << 20
N = int(os.environ.get("PYIVSHMEM_VM_STREAM_N", "10000"))
PINGS = 50
# ping-pong: sleepers re-check shared memory only every RECHECK seconds, and give up after
# PING_TIMEOUT < RECHECK, so a ping can only complete in time if its doorbell arrived
RECHECK, PING_TIMEOUT = 30.0, 20.0


CHANNEL_GUEST = r"""
import os, threading
import vmguest
from pyivshmem import Channel, PciDevice
from pump import check_sequence, make_messages

N, PINGS = int(os.environ["N"]), int(os.environ["PINGS"])
RECHECK, PING_TIMEOUT = float(os.environ["RECHECK"]), float(os.environ["PING_TIMEOUT"])
with PciDevice.open(vfio=True) as dev:
    region = dev.region
    rx = Channel(region.ring("h2g"), dev, vector=0)
    tx = Channel(region.ring("g2h"), dev, vector=1)
    vmguest.stage("ready", id=dev.id)
    got, errors = [], []

    def receive():
        try:
            for _ in range(N):
                got.append(rx.recv(timeout=120))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=receive)
    t.start()
    for m in make_messages(N, b"g2h"):
        tx.send(m, timeout=120)
    t.join(180)
    if errors:
        raise errors[0]
    check_sequence(got, make_messages(N, b"h2g"))
    out = {"stream_rx": rx.stats, "stream_tx": tx.stats}
    vmguest.stage("streamed")

    ping = Channel(region.ring("ping"), dev, vector=2, spin=0, recheck=RECHECK)
    pong = Channel(region.ring("pong"), dev, vector=3, spin=0, recheck=RECHECK)
    for i in range(PINGS):
        m = ping.recv(timeout=PING_TIMEOUT)
        pong.send(m[::-1], timeout=PING_TIMEOUT)
    out["ping"], out["pong"] = ping.stats, pong.stats
    vmguest.result(**out)
"""


def _wait_joined(peer, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peer.wait(0.1)
        for ev in peer.events():
            if ev.kind == "joined":
                return ev.peer
    raise TimeoutError("no guest joined the server")


def _ring_info(region, name):
    return next(r for r in region.rings() if r.get("name") == name)


def test_channel_host_guest(image, tmp_path):
    from pyivshmem import Channel, Peer

    sock = str(tmp_path / "ivshmem.sock")
    env = {"N": str(N), "PINGS": str(PINGS), "RECHECK": str(RECHECK), "PING_TIMEOUT": str(PING_TIMEOUT)}
    with ivshmem_server(sock, SHM_SIZE, vectors=4), Peer.connect(sock, vectors=4) as peer:
        region = peer.region
        for name, cap in (("h2g", 256), ("g2h", 256), ("ping", 4), ("pong", 4)):
            region.create_ring(name, "spsc", slot_size=64, capacity=cap)
        rx = Channel(region.ring("g2h"), peer, vector=0)
        tx = Channel(region.ring("h2g"), peer, vector=1)
        with harness.Vm(CHANNEL_GUEST, harness.ivshmem_doorbell(sock, vectors=4), workdir=tmp_path,
                        image=image, files={"pump.py": (harness.HERE / "pump.py").read_text()},
                        env=env) as vm:
            guest = _wait_joined(peer, timeout=60)
            ready = json.loads(vm.wait_for("stage", timeout=harness.BOOT_TIMEOUT).text)
            assert ready["id"] == guest
            got, errors = [], []

            def receive():
                try:
                    for _ in range(N):
                        got.append(rx.recv(timeout=120))
                except BaseException as e:  # reported below
                    errors.append(e)

            t = threading.Thread(target=receive, daemon=True)
            t.start()
            try:
                for m in make_messages(N, b"h2g"):
                    tx.send(m, timeout=120)
            except BaseException as e:
                raise vm.fail(f"host send failed: {e!r}") from e
            t.join(180)
            if errors:
                raise vm.fail(f"host receive failed: {errors[0]!r}") from errors[0]
            check_sequence(got, make_messages(N, b"g2h"))
            vm.wait_for("stage", timeout=180, after=1)  # "streamed"

            ping = Channel(region.ring("ping"), peer, vector=2, spin=0, recheck=RECHECK)
            pong = Channel(region.ring("pong"), peer, vector=3, spin=0, recheck=RECHECK)
            for i, m in enumerate(make_messages(PINGS, b"ping")):
                # send only once the guest is (about to be) asleep on the ping ring
                deadline = time.monotonic() + PING_TIMEOUT
                while not _ring_info(region, "ping")["consumers_waiting"]:
                    if time.monotonic() > deadline:
                        raise vm.fail(f"ping {i}: the guest never went to sleep on the ring")
                    time.sleep(0.0005)
                ping.send(m, timeout=PING_TIMEOUT)
                try:
                    reply = pong.recv(timeout=PING_TIMEOUT)
                except TimeoutError:
                    raise vm.fail(f"ping {i}: no reply within {PING_TIMEOUT}s (a lost doorbell?)") from None
                assert reply == m[::-1]
            res = vm.result(timeout=120)
        host_stats = {"stream_rx": rx.stats, "stream_tx": tx.stats, "ping": ping.stats, "pong": pong.stats}
    assert res["stream_rx"]["received"] == N and res["stream_tx"]["sent"] == N
    assert res["ping"]["received"] == PINGS and res["pong"]["sent"] == PINGS
    # the guest slept on the ping ring and every such sleep ended by an MSI-X doorbell (a sleep
    # ended by its re-check interval would have outlasted PING_TIMEOUT)
    assert res["ping"]["sleeps"] >= 1
    assert res["ping"]["wakeups"] == res["ping"]["sleeps"]
    # the host rang the guest for every ping it sent to a sleeping guest
    assert host_stats["ping"]["doorbells"] >= 1
    print(f"guest: {json.dumps(res, sort_keys=True)}\nhost: {json.dumps(host_stats, sort_keys=True)}")
