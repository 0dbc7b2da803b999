"""Hot-unplug and replug of an ivshmem-doorbell device while a host process streams to the guest.

One boot: the host streams sequence-numbered messages through a ring in the server's memory; the
host removes the guest's device with QMP (``device_del``, then ``chardev-remove`` so the server
sees the guest leave), plugs it back (``chardev-add``, ``device_add``) and keeps streaming. The
guest's PciDevice (VFIO) is told by vfio-pci that the device is going, releases it, reports
DeviceGoneError, waits for the device with ``PciDevice.wait_for`` and re-opens it; the host sees
the guest leave and rejoin as peer events. Every message arrives exactly once, in order.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pyivshmem import Peer

from vm import harness

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.timeout(420)]

GUEST = r"""
import os
import vmguest
from pyivshmem import PciDevice, DeviceGoneError, ClosedError

N, AT = int(os.environ["N"]), int(os.environ["AT"])
dev = PciDevice.open(vfio=True)
bdf, first_id = dev.bdf, dev.id
ring = dev.region.ring("h2g")
vmguest.stage("open", id=dev.id, bdf=bdf)
got = []
while len(got) < N:
    try:
        m = ring.recv(timeout=120)
    except (ClosedError, DeviceGoneError) as e:
        ring_err = type(e).__name__
        try:
            dev.check()
            dev_err = None
        except DeviceGoneError as e2:
            dev_err = str(e2)
        try:
            dev.read_register(8)
            reg_err = None
        except DeviceGoneError as e3:
            reg_err = type(e3).__name__
        present = dev.present
        dev.close()
        vmguest.stage("gone", received=len(got), ring_err=ring_err, dev_err=dev_err,
                      reg_err=reg_err, present=present)
        info = PciDevice.wait_for(bdf, timeout=240)
        dev = PciDevice.open(info.bdf, vfio=True)
        ring = dev.region.ring("h2g")
        vmguest.stage("back", id=dev.id, bdf=dev.bdf)
        continue
    got.append(int.from_bytes(m[:4], "little"))
    if len(got) == AT:
        vmguest.stage("midway", received=len(got))
dev.close()
vmguest.result(n=len(got), in_order=got == list(range(N)), first_id=first_id)
"""


def _server_exe() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "pyivshmem-server")
    if not os.path.exists(exe):
        pytest.skip(f"pyivshmem-server is not installed next to {sys.executable}")
    return exe


def test_unplug_and_replug_during_a_stream(tmp_path):
    image = harness.require_image()
    sock = str(tmp_path / "ivshmem.sock")
    name = f"pyivshmem-hotplug-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    server = subprocess.Popen([_server_exe(), "-F", "-S", sock, "-M", name, "-l", "1M", "-n", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    n, at = 3000, 500
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the server made no socket within 30 s"
            time.sleep(0.05)
        with Peer.connect(sock, vectors=1, timeout=10) as host:
            ring = host.region.create_ring("h2g", "spsc", slot_size=64, capacity=64)
            msgs = [i.to_bytes(4, "little") + os.urandom(1 + i % 50) for i in range(n)]
            devices = ["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1"]
            devices += harness.ivshmem_doorbell(sock, vectors=1, extra=",id=ivs0,bus=rp1")
            events = []
            sent = 0

            def pump(until, what, timeout):
                """Stream while waiting for ``until()``; the host's peer events are collected."""
                nonlocal sent
                end = time.monotonic() + timeout
                while True:
                    events.extend(host.events())
                    r = until()
                    if r:
                        return r
                    if time.monotonic() > end:
                        raise vm.fail(f"no {what} within {timeout:.0f}s (sent {sent}, events {events})")
                    if vm.proc and vm.proc.poll() is not None:
                        raise vm.fail(f"QEMU ended while waiting for {what}")
                    moved = False
                    while sent < n and ring.try_send(msgs[sent]):
                        sent += 1
                        moved = True
                    if not moved:
                        time.sleep(0.001)

            def stage(name):
                return lambda: next((m.json() for m in vm.messages()
                                     if m.tag == "stage" and m.json()["name"] == name), None)

            with harness.Vm(GUEST, devices, workdir=tmp_path, image=image, qmp=True,
                            env={"N": str(n), "AT": str(at)}) as vm:
                opened = pump(stage("open"), "open", harness.BOOT_TIMEOUT)
                guest_id = opened["id"]
                pump(stage("midway"), "midway", 120)
                t0 = time.monotonic()
                vm.qmp("device_del", id="ivs0")
                gone = pump(stage("gone"), "the guest's DeviceGoneError", 120)
                vm.qmp_event("DEVICE_DELETED", timeout=120)
                vm.qmp("chardev-remove", id="ivs")
                pump(lambda: any(e.kind == "left" and e.peer == guest_id for e in events),
                     "the guest's peer leaving", 60)
                vm.qmp("chardev-add", id="ivs", backend={
                    "type": "socket",
                    "data": {"addr": {"type": "unix", "data": {"path": sock}}, "server": False}})
                vm.qmp("device_add", driver="ivshmem-doorbell", chardev="ivs", vectors=1,
                       id="ivs0", bus="rp1")
                back = pump(stage("back"), "the guest re-opening the device", 240)
                pump(lambda: sent >= n, "the end of the stream", 240)
                res = vm.result(timeout=240)
                sys.stderr.write(f"unplug to re-open: {time.monotonic() - t0:.1f}s\n")
        joined = [e.peer for e in events if e.kind == "joined"]
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(30)
        server.stderr.close()
    assert res == {"n": n, "in_order": True, "first_id": guest_id}
    # the guest was told, and every call on the gone device said so
    assert gone["ring_err"] in ("ClosedError", "DeviceGoneError")
    assert gone["dev_err"] and "is gone" in gone["dev_err"] and "wait_for" in gone["dev_err"]
    assert gone["reg_err"] == "DeviceGoneError" and gone["present"] is False
    assert at <= gone["received"] < n
    # the host saw it leave and come back under a new id, which the re-opened device reports
    assert back["id"] in joined and back["id"] != guest_id
    assert back["bdf"] == opened["bdf"]


SYSFS_GUEST = r"""
import mmap, os, time
import vmguest
from pyivshmem import PciDevice, DeviceGoneError

dev = PciDevice.open(vfio=False)
bdf = dev.bdf
# a child holding its own raw mapping of BAR2 across the removal shows what touching it does
r1, w1 = os.pipe()
r2, w2 = os.pipe()
pid = os.fork()
if pid == 0:
    fd = os.open(f"/sys/bus/pci/devices/{bdf}/resource2", os.O_RDWR)
    mm = mmap.mmap(fd, 4096)
    os.write(w1, b"r")
    os.read(r2, 1)
    os._exit(mm[0])          # the first byte, or death by a signal
os.read(r1, 1)
vmguest.stage("open", bdf=bdf)
deadline = time.monotonic() + 120
while dev.present:
    if time.monotonic() > deadline:
        raise TimeoutError("the device never went away")
    time.sleep(0.01)
try:
    dev.read_register(8)
    reg_err = None
except DeviceGoneError as e:
    reg_err = type(e).__name__
os.write(w2, b"g")
_, status = os.waitpid(pid, 0)
child = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
dev.close()
vmguest.stage("gone", reg_err=reg_err, child=child)
info = PciDevice.wait_for(bdf, timeout=240)
with PciDevice.open(info.bdf, vfio=False) as dev:
    first = dev.memory[0]
vmguest.result(first=first, bdf=info.bdf)
"""


def test_sysfs_unplug_is_noticed_and_replug_reopens(tmp_path):
    """Without VFIO the kernel removes the device at once: ``present`` turns False, calls raise
    DeviceGoneError, and what a raw mapping of BAR2 does afterwards is recorded (the documented
    limit); the device re-opens after device_add."""
    image = harness.require_image()
    shm = harness.unique_shm()
    with open(shm, "wb") as f:
        f.write(b"\x5a")
        f.truncate(1 << 20)
    devices = ["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1"]
    devices += harness.ivshmem_plain(shm, 1 << 20, extra=",id=ivs0,bus=rp1")
    try:
        with harness.Vm(SYSFS_GUEST, devices, workdir=tmp_path, image=image, iommu=False,
                        qmp=True) as vm:
            vm.wait_for("stage", timeout=harness.BOOT_TIMEOUT)
            vm.qmp("device_del", id="ivs0")
            vm.qmp_event("DEVICE_DELETED", timeout=120)
            gone = vm.wait_for("stage", timeout=120, after=1).json()
            # QEMU 7.2 aborts when ivshmem-plain is plugged again with the memory backend it had
            # (qemu_ram_set_idstr assertion): plug it back with a new backend over the same file
            vm.qmp("object-add", **{"qom-type": "memory-backend-file", "id": "hm2",
                                    "mem-path": str(shm), "size": 1 << 20, "share": True})
            vm.qmp("device_add", driver="ivshmem-plain", memdev="hm2", id="ivs0", bus="rp1")
            res = vm.result(timeout=240)
    finally:
        shm.unlink()
    sys.stderr.write(f"a raw BAR2 mapping touched after removal: {gone['child']}\n")
    assert gone["reg_err"] == "DeviceGoneError"
    # nothing is promised for a raw mapping after removal (printed above, not asserted): runs
    # under TCG with QEMU 7.2 and Linux 6.1 read the old memory once and zeros once
    assert res == {"first": 0x5A, "bdf": res["bdf"]}
