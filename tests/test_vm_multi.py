"""Several QEMU guests on one ivshmem server: guest <-> guest messaging with doorbells both ways, and
a guest killed mid-stream (the host peer sees it leave, keeps every committed message, and a new
guest joins afterwards).

Server: pyivshmem.Server when the package has it, else tests/vm/mini_server.py. Needs
qemu-system-x86_64 (skips otherwise).
"""
from __future__ import annotations

import json
import time

import pytest

from vm import harness
from vm.mini_server import ivshmem_server
from vm.pump import check_sequence, make_messages

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.timeout(300)]

SHM_SIZE = 1 << 20
RECHECK, PING_TIMEOUT = 30.0, 20.0


PAIR_GUEST = r"""
import os, threading, time
import vmguest
from pyivshmem import Channel, PciDevice
from pump import check_sequence, make_messages

ME, OTHER = os.environ["ROLE"], os.environ["OTHER"]
N, PINGS = int(os.environ["N"]), int(os.environ["PINGS"])
RECHECK, PING_TIMEOUT = float(os.environ["RECHECK"]), float(os.environ["PING_TIMEOUT"])
with PciDevice.open(vfio=True) as dev:
    region = dev.region                      # both guests may format the empty memory: safe
    def ring(name, cap):
        return region.create_ring(name, "spsc", slot_size=64, capacity=cap, exist_ok=True)
    rx = Channel(ring(f"{OTHER}2{ME}", 128), dev, vector=0)
    tx = Channel(ring(f"{ME}2{OTHER}", 128), dev, vector=1)
    vmguest.stage("ready", id=dev.id)
    got, errors = [], []

    def receive():
        try:
            for _ in range(N):
                got.append(rx.recv(timeout=150))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=receive)
    t.start()
    for m in make_messages(N, f"{ME}2{OTHER}".encode()):
        tx.send(m, timeout=150)
    t.join(200)
    if errors:
        raise errors[0]
    check_sequence(got, make_messages(N, f"{OTHER}2{ME}".encode()))
    out = {"id": dev.id, "stream_rx": rx.stats, "stream_tx": tx.stats}

    # ping-pong twice: first a pings b, then b pings a. The pinger sends only once the ponger
    # sleeps on its ring; sleepers re-check only every RECHECK s and give up after PING_TIMEOUT
    # (< RECHECK), so every ping and pong must be delivered by a doorbell.
    for rnd, pinger in enumerate(("a", "b")):
        ping = Channel(ring(f"ping{rnd}", 4), dev, vector=2, spin=0, recheck=RECHECK)
        pong = Channel(ring(f"pong{rnd}", 4), dev, vector=3, spin=0, recheck=RECHECK)
        for i in range(PINGS):
            if ME == pinger:
                deadline = time.monotonic() + PING_TIMEOUT
                while not next(r for r in region.rings() if r.get("name") == f"ping{rnd}")["consumers_waiting"]:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"round {rnd} ping {i}: the other guest never slept")
                    time.sleep(0.0005)
                m = f"{rnd}:{i}".encode()
                ping.send(m, timeout=PING_TIMEOUT)
                assert pong.recv(timeout=PING_TIMEOUT) == m[::-1]
            else:
                pong.send(ping.recv(timeout=PING_TIMEOUT)[::-1], timeout=PING_TIMEOUT)
        out[f"ping{rnd}"], out[f"pong{rnd}"] = ping.stats, pong.stats
    vmguest.result(**out)
"""


def test_guest_to_guest(image, tmp_path):
    """Two guests on one server stream to each other and ping-pong with doorbells both ways."""
    sock = str(tmp_path / "ivshmem.sock")
    n, pings = 2000, 20
    pump_src = (harness.HERE / "pump.py").read_text()
    base_env = {"N": str(n), "PINGS": str(pings), "RECHECK": str(RECHECK), "PING_TIMEOUT": str(PING_TIMEOUT)}
    with ivshmem_server(sock, SHM_SIZE, vectors=4):
        a = harness.Vm(PAIR_GUEST, harness.ivshmem_doorbell(sock, vectors=4), workdir=tmp_path, name="vm-a",
                       image=image, files={"pump.py": pump_src}, env={**base_env, "ROLE": "a", "OTHER": "b"})
        b = harness.Vm(PAIR_GUEST, harness.ivshmem_doorbell(sock, vectors=4), workdir=tmp_path, name="vm-b",
                       image=image, files={"pump.py": pump_src}, env={**base_env, "ROLE": "b", "OTHER": "a"})
        with a, b:
            ra = a.result(timeout=240)
            rb = b.result(timeout=60)
    assert ra["id"] != rb["id"]
    for r in (ra, rb):
        assert r["stream_rx"]["received"] == n and r["stream_tx"]["sent"] == n
    # round 0: a pinged, b slept on ping0 and was woken by a's doorbells every time; round 1 the
    # other way round
    for sleeper, rnd in ((rb, 0), (ra, 1)):
        st = sleeper[f"ping{rnd}"]
        assert st["received"] == pings
        assert st["sleeps"] >= 1 and st["wakeups"] == st["sleeps"]
    assert ra["ping0"]["doorbells"] >= 1 and rb["ping1"]["doorbells"] >= 1
    print(f"a: {json.dumps(ra, sort_keys=True)}\nb: {json.dumps(rb, sort_keys=True)}")


STREAMER_GUEST = r"""
import os
import vmguest
from pyivshmem import Channel, PciDevice
from pump import message

TAG, N = os.environ["TAG"].encode(), int(os.environ["N"])
with PciDevice.open(vfio=True) as dev:
    tx = Channel(dev.region.ring(os.environ["RING"]), dev, vector=1)
    vmguest.stage("ready", id=dev.id)
    for i in range(N):
        tx.send(message(i, TAG), timeout=120)
        if (i + 1) % 200 == 0:
            vmguest.stage("committed", count=i + 1)   # every message before this one is in the ring
    vmguest.result(sent=N)
"""


def _events_until(peer, pred, timeout: float):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        peer.wait(0.1)
        for ev in peer.events():
            seen.append(ev)
            if pred(ev):
                return ev, seen
    raise TimeoutError(f"expected peer event did not come within {timeout}s; saw {seen}")


def test_guest_killed_mid_stream(image, tmp_path):
    """SIGKILL a streaming guest: the host sees it leave, every committed message is there in
    order, and a second guest joins and streams afterwards."""
    from pyivshmem import Channel, Peer

    sock = str(tmp_path / "ivshmem.sock")
    pump_src = (harness.HERE / "pump.py").read_text()
    total = 1_000_000  # more than the first guest can send before it is killed
    with ivshmem_server(sock, SHM_SIZE, vectors=2), Peer.connect(sock, vectors=2) as peer:
        region = peer.region
        g1 = Channel(region.create_ring("g1", "spsc", slot_size=64, capacity=64), peer, vector=0)
        g2 = Channel(region.create_ring("g2", "spsc", slot_size=64, capacity=64), peer, vector=0)
        expected = make_messages(5000, b"first")
        vm1 = harness.Vm(STREAMER_GUEST, harness.ivshmem_doorbell(sock, vectors=2), workdir=tmp_path, name="vm-1",
                         image=image, files={"pump.py": pump_src},
                         env={"TAG": "first", "RING": "g1", "N": str(total)})
        with vm1:
            ev, _ = _events_until(peer, lambda e: e.kind == "joined", 60)
            first_id = ev.peer
            got = []
            while len(got) < 1000:
                got.append(g1.recv(timeout=120))
            # the guest reports progress only after send() returned: those messages are committed
            committed = json.loads(vm1.wait_for("stage", timeout=60, after=2).text)["count"]
            vm1.kill()
            ev, _ = _events_until(peer, lambda e: e.kind == "left", 30)
            assert ev.peer == first_id
            assert first_id not in peer.peers
            # nothing was lost: drain what the dead guest committed
            while True:
                m = g1.try_recv()
                if m is None:
                    break
                got.append(m)
            check_sequence(got, expected[:len(got)])
            assert len(got) >= committed
            # ringing the departed guest is a lost hint, not an error
            assert peer.notify_target(first_id, 0) is None
        # a new guest joins the same server and region
        vm2 = harness.Vm(STREAMER_GUEST, harness.ivshmem_doorbell(sock, vectors=2), workdir=tmp_path, name="vm-2",
                         image=image, files={"pump.py": pump_src}, env={"TAG": "second", "RING": "g2", "N": "500"})
        with vm2:
            ev, _ = _events_until(peer, lambda e: e.kind == "joined", 60)
            assert ev.peer != first_id
            got2 = [g2.recv(timeout=120) for _ in range(500)]
            res = vm2.result(timeout=60)
        check_sequence(got2, make_messages(500, b"second"))
        assert res["sent"] == 500
        assert g1.try_recv() is None
