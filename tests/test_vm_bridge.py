"""A guest's ring bridged by a host process (docs/bridge.md, "Guests").

Python in a QEMU guest (ivshmem-plain on a /dev/shm file, no server) sends numbered messages of
mixed sizes into an SPSC ring in the device's memory.  On the host, `pyivshmem bridge --region`
on that same file forwards the ring over 127.0.0.1 to a second bridge process, which delivers
into a ring of another host region; the test reads that ring and checks every message arrives
exactly once and in order.  The guest sends in four bursts; the sending bridge is SIGKILLed and
restarted after the first, while the guest goes on writing into its ring (which fills and holds
the guest back until the new bridge drains it): nothing is lost or repeated.

Needs qemu-system-x86_64 (skips otherwise, see tests/vm/harness.py) and pyzmq.  Guests boot under
software emulation here, so the count is small.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from _procwait import stop

from vm import harness

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.timeout(300)]

SHM_SIZE = 1 << 20
N = int(os.environ.get("PYIVSHMEM_VM_BRIDGE_N", "200"))
BURST = N // 4


def message(i: int) -> bytes:
    return i.to_bytes(8, "little") + bytes((i & 255,)) * (i * 37 % 200)


GUEST = r"""
import os, time
import vmguest
from pyivshmem import PciDevice

N, BURST = int(os.environ["N"]), int(os.environ["BURST"])
with PciDevice.open(vfio=False) as dev:
    ring = dev.region.ring("g2h")
    vmguest.stage("attached", generation=dev.region.generation)
    for i in range(N):
        if i and i % BURST == 0:
            time.sleep(1.0)  # in bursts: the host kills its bridge between two of them
        ring.send(i.to_bytes(8, "little") + bytes((i & 255,)) * (i * 37 % 200), timeout=120)
vmguest.result(sent=N)
"""


@pytest.fixture
def image():
    return harness.require_image()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_guest_ring_bridged_to_another_host_region_exactly_once(image, tmp_path):
    pytest.importorskip("zmq")
    from pyivshmem import Channel, Region

    guest_file, other_file = harness.unique_shm(), harness.unique_shm()
    port = free_port()
    common = [sys.executable, "-m", "pyivshmem", "bridge", "--stats-interval", "0",
              "--connect-timeout", "5"]
    cmds = {
        "rx": common + ["--region", str(other_file), "--listen", f"tcp://127.0.0.1:{port}",
                        "--in", "down", "--state-dir", str(tmp_path / "state-rx")],
        "tx": common + ["--region", str(guest_file), "--connect", f"tcp://127.0.0.1:{port}",
                        "--out", "g2h=down", "--state-dir", str(tmp_path / "state-tx")],
    }
    procs: dict = {}

    def start(which):
        with open(tmp_path / f"{which}.log", "ab") as log:
            procs[which] = subprocess.Popen(cmds[which], stdout=log, stderr=subprocess.STDOUT)

    def logs():
        return "\n".join(f"{w} log:\n" + (tmp_path / f"{w}.log").read_text(errors="replace")[-2000:]
                         for w in cmds if (tmp_path / f"{w}.log").exists())

    try:
        with Region.create(guest_file, SHM_SIZE) as ra, Region.create(other_file, "4M") as rb:
            ra.create_ring("g2h", "spsc", slot_size=256, capacity=64)
            rb.create_ring("down", "spsc", slot_size=256, capacity=64)
            start("rx")
            start("tx")
            ch = Channel(rb.ring("down"))
            with harness.Vm(GUEST, harness.ivshmem_plain(guest_file, SHM_SIZE),
                            workdir=tmp_path, iommu=False, image=image,
                            env={"N": str(N), "BURST": str(BURST)}) as vm:
                got = 0
                killed = False
                deadline = time.monotonic() + 240
                while got < N:
                    if time.monotonic() > deadline:
                        raise vm.fail(f"only {got}/{N} messages bridged\n{logs()}")
                    for m in ch.recv_many(64, timeout=0.5):
                        assert m == message(got), (
                            f"message {m[:8].hex()} ({len(m)} bytes) where #{got} was due")
                        got += 1
                    if not killed and got >= BURST:  # the first burst is through
                        procs["tx"].send_signal(signal.SIGKILL)  # the guest's ring's bridge
                        procs["tx"].wait(30)
                        start("tx")
                        killed = True
                    for w, p in procs.items():
                        assert p.poll() is None, f"bridge {w} exited\n{logs()}"
                res = vm.result(timeout=120)
            assert res["sent"] == N
            assert ch.recv_many(16, timeout=1.0) == [], "messages after the last"
            assert killed
            ch.close()
    finally:
        for p in procs.values():
            stop(p)
        for f in (guest_file, other_file):
            try:
                f.unlink()
            except FileNotFoundError:
                pass
