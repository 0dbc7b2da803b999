"""10,000 messages each way between the host and Python in a QEMU guest, through SPSC rings in the
ivshmem-doorbell memory, the guest sleeping on MSI-X (VFIO eventfds) and the host on eventfds.
Exactly once, in order, contents verified on both sides. Two phases in one boot:

1. full duplex (vector 0): both sides send and receive at once, ringing on progress, sleeping
   (bounded) when idle. Who sleeps how often depends on speed: reported, not asserted.
2. lockstep (vector 1): batches of 100 in turn, so every batch must be picked up by a sleeper woken
   by its doorbell: 100 MSI-X wake-ups in the guest and 100 eventfd wake-ups on the host, no
   bounded-sleep timeouts, and each batch complete when its doorbell is seen.

Server and host peer: tests/vm/mini_server.py. Needs qemu-system-x86_64 (skips otherwise).
"""
from __future__ import annotations

import json
import os
import threading

import pytest

from vm import harness
from vm.mini_server import MiniServer
from vm.pump import check_sequence, lockstep, make_messages, pump

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.timeout(300)]

SHM_SIZE = 1 << 20
N = int(os.environ.get("PYIVSHMEM_VM_STREAM_N", "10000"))
WINDOW = 100


STREAM_GUEST = r"""
import os, select
import vmguest
from pyivshmem import PciDevice
from pump import check_sequence, lockstep, make_messages, pump

HOST, N, WINDOW = int(os.environ["HOST_ID"]), int(os.environ["N"]), int(os.environ["WINDOW"])
with PciDevice.open(vfio=True) as dev:
    region = dev.region
    assert dev.interrupts and dev.vectors == 2
    vmguest.stage("ready", id=dev.id)
    fd0 = dev.vector_fd(0)

    def wait0(t):
        r, _, _ = select.select([fd0], [], [], t)
        return int.from_bytes(os.read(fd0, 8), "little") if r else 0

    stats = pump(region.ring("g2h"), region.ring("h2g"), make_messages(N, b"g2h"), N,
                 lambda: dev.notify(HOST, 0), wait0, timeout=240)
    check_sequence(stats["received"], make_messages(N, b"h2g"))
    out = dict(sent=stats["sent"], received=len(stats["received"]), rings=stats["rings"],
               sleeps=stats["sleeps"])
    vmguest.stage("duplex-done")
    fd1 = dev.vector_fd(1)

    def wait1(t):
        r, _, _ = select.select([fd1], [], [], t)
        return int.from_bytes(os.read(fd1, 8), "little") if r else 0

    ls = lockstep(region.ring("ls_g2h"), region.ring("ls_h2g"), make_messages(N, b"ls_g2h"), WINDOW,
                  lead=False, ring_peer=lambda: dev.notify(HOST, 1), wait=wait1)
    check_sequence(ls["received"], make_messages(N, b"ls_h2g"))
    out.update(ls_received=len(ls["received"]), ls_woken=ls["woken"], ls_timeouts=ls["timeouts"],
               ls_incomplete=ls["incomplete"], ls_batches=ls["batches"])
    vmguest.result(**out)
"""


def test_stream_10k_each_way(image, tmp_path):
    if not hasattr(os, "memfd_create") or not hasattr(os, "eventfd"):
        pytest.skip("needs os.memfd_create and os.eventfd (Python >= 3.10 on Linux)")
    from pyivshmem import Region

    fd = os.memfd_create("pyivshmem-vmtest", os.MFD_CLOEXEC)
    os.ftruncate(fd, SHM_SIZE)
    sock = str(tmp_path / "ivshmem.sock")
    pump_src = (harness.HERE / "pump.py").read_text()
    try:
        with Region.from_fd(fd, size=SHM_SIZE) as region, MiniServer(sock, fd, vectors=2) as server:
            h2g = region.create_ring("h2g", "spsc", slot_size=64, capacity=256)
            g2h = region.create_ring("g2h", "spsc", slot_size=64, capacity=256)
            ls_h2g = region.create_ring("ls_h2g", "spsc", slot_size=64, capacity=128)
            ls_g2h = region.create_ring("ls_g2h", "spsc", slot_size=64, capacity=128)
            env = {"HOST_ID": str(server.host_id), "N": str(N), "WINDOW": str(WINDOW)}
            with harness.Vm(STREAM_GUEST, harness.ivshmem_doorbell(sock, vectors=2), workdir=tmp_path,
                            image=image, files={"pump.py": pump_src}, env=env) as vm:
                (guest,) = server.wait_guests(1, timeout=30)
                ready = json.loads(vm.wait_for("stage", timeout=harness.BOOT_TIMEOUT).text)
                assert ready["id"] == guest
                box: dict = {}

                def host_side():
                    try:
                        box["stats"] = pump(h2g, g2h, make_messages(N, b"h2g"), N,
                                            lambda: server.ring(guest, 0),
                                            lambda t: server.wait(0, t), timeout=240)
                        vm.wait_for("stage", timeout=240, after=1)  # the guest finished phase 1
                        box["ls"] = lockstep(ls_h2g, ls_g2h, make_messages(N, b"ls_h2g"), WINDOW,
                                             lead=True, ring_peer=lambda: server.ring(guest, 1),
                                             wait=lambda t: server.wait(1, t))
                    except BaseException as e:  # reported below
                        box["error"] = e

                t = threading.Thread(target=host_side, name="host-pump", daemon=True)
                t.start()
                try:
                    res = vm.result(timeout=260)
                except BaseException as e:
                    t.join(timeout=5)
                    if "error" in box:
                        raise e from box["error"]
                    raise
                t.join(timeout=30)
                if "error" in box:
                    raise vm.fail(f"host side failed: {box['error']!r}")
                assert not t.is_alive()
                stats = box["stats"]
                ls = box["ls"]
            check_sequence(stats["received"], make_messages(N, b"g2h"))
            assert res["sent"] == N and res["received"] == N
            assert len(h2g) == 0 and g2h.try_recv() is None  # the guest drained h2g
            check_sequence(ls["received"], make_messages(N, b"ls_g2h"))
            assert res["ls_received"] == N
            batches = N // WINDOW
            assert res["ls_batches"] == batches and ls["batches"] == batches
            # every batch was picked up by a sleeper woken by its doorbell, none lost, none early
            assert (res["ls_woken"], res["ls_timeouts"], res["ls_incomplete"]) == (batches, 0, 0)
            assert (ls["woken"], ls["timeouts"], ls["incomplete"]) == (batches, 0, 0)
            print(f"duplex: guest rang {res['rings']}x slept {res['sleeps']}x; "
                  f"host rang {stats['rings']}x slept {stats['sleeps']}x")
    finally:
        os.close(fd)
