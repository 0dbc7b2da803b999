"""ivshmem-plain in a real QEMU guest: a host process and Python inside the guest exchange data
through a /dev/shm file (raw bytes, then SPSC rings both ways), and the guest-side error paths.

Needs qemu-system-x86_64 (skips otherwise; see tests/vm/harness.py). Each test boots one guest.
"""
from __future__ import annotations

import json
import os
import time

import pytest

from vm import harness

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.timeout(240)]

SHM_SIZE = 1 << 20


@pytest.fixture
def shm_path():
    p = harness.unique_shm()
    yield p
    try:
        p.unlink()
    except FileNotFoundError:
        pass


RAW_GUEST = r"""
import json, os, sys, time
import vmguest
from pyivshmem import PciDevice

infos = PciDevice.list()
assert len(infos) == 1, infos
info = infos[0]
with PciDevice.open(vfio="auto") as dev:
    mem = dev.memory
    # what the host wrote before boot
    seed = bytes(mem[4096:4096 + 65536])
    hello = bytes(mem[0:32]).rstrip(b"\0")
    # answer: the seed reversed, plus a marker
    mem[131072:131072 + 65536] = seed[::-1]
    mem[64:96] = b"guest says hello".ljust(32, b"\0")
    vmguest.stage("ready")
    # live exchange: the host writes a token after seeing "ready"; echo it back incremented
    token = vmguest.poll_until(lambda: int.from_bytes(mem[200:208], "little"), 60)
    mem[208:216] = (token + 1).to_bytes(8, "little")
    out = dict(
        bdf=dev.bdf, flavour=dev.flavour, id=dev.id, vectors=dev.vectors, interrupts=dev.interrupts,
        uses_vfio=dev.uses_vfio, shm_size=dev.shm_size, bar_sizes=info.bar_sizes,
        hello=hello.decode(), seed_sha=__import__("hashlib").sha256(seed).hexdigest(), token=token,
        iommu_group=info.iommu_group, memory_enabled=info.memory_enabled,
    )
    del mem
vmguest.result(**out)
"""


def test_plain_raw_bytes(image, shm_path, tmp_path):
    """Bytes written by the host are read by the guest's PciDevice.memory, and the other way round,
    both before boot and while both run."""
    seed = os.urandom(65536)
    with open(shm_path, "wb") as f:
        f.truncate(SHM_SIZE)
    with open(shm_path, "r+b") as f:
        f.seek(0)
        f.write(b"host says hello")
        f.seek(4096)
        f.write(seed)
    import hashlib
    import mmap

    with open(shm_path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), SHM_SIZE)
    try:
        with harness.Vm(RAW_GUEST, harness.ivshmem_plain(shm_path, SHM_SIZE), workdir=tmp_path,
                        iommu=False, image=image) as vm:
            vm.wait_for("stage", timeout=harness.BOOT_TIMEOUT)
            token = int.from_bytes(os.urandom(7), "little") | 1
            mm[200:208] = token.to_bytes(8, "little")
            res = vm.result(timeout=120)
            # the echo was written while both were running
            deadline = time.monotonic() + 5
            while int.from_bytes(mm[208:216], "little") != token + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert int.from_bytes(mm[208:216], "little") == token + 1
        assert res["flavour"] == "plain"
        assert res["id"] == 0
        assert res["vectors"] == 0
        assert res["interrupts"] is False and res["uses_vfio"] is False
        assert res["shm_size"] == SHM_SIZE
        assert res["bar_sizes"]["2"] == SHM_SIZE and res["bar_sizes"]["0"] == 256
        assert res["bar_sizes"]["1"] == 0
        assert res["hello"] == "host says hello"
        assert res["seed_sha"] == hashlib.sha256(seed).hexdigest()
        assert res["token"] == token
        assert res["iommu_group"] is None
        assert res["memory_enabled"] is True
        assert mm[131072:131072 + 65536] == seed[::-1]
        assert mm[64:96].rstrip(b"\0") == b"guest says hello"
    finally:
        mm.close()


RINGS_GUEST = r"""
import hashlib, os
import vmguest
from pyivshmem import PciDevice

N = int(os.environ["N"])
with PciDevice.open(vfio=False) as dev:
    region = dev.region
    h2g, g2h = region.ring("h2g"), region.ring("g2h")
    vmguest.stage("attached", generation=region.generation, size=region.size)
    digest = hashlib.sha256()
    for i in range(N):
        msg = h2g.recv(timeout=60)
        digest.update(msg)
        seq = int.from_bytes(msg[:4], "little")
        if seq != i:
            raise AssertionError(f"message {i} carried sequence number {seq}")
        g2h.send(msg[::-1], timeout=60)
    rest = h2g.try_recv()
    vmguest.result(received=N, digest=digest.hexdigest(), extra=rest is not None)
"""


def test_plain_rings(image, shm_path, tmp_path):
    """Host and guest exchange messages through two SPSC rings in an ivshmem-plain region."""
    import hashlib

    from pyivshmem import Region

    n = 2000
    with Region.create(shm_path, SHM_SIZE) as region:
        h2g = region.create_ring("h2g", "spsc", slot_size=256, capacity=64)
        g2h = region.create_ring("g2h", "spsc", slot_size=256, capacity=64)
        msgs = [i.to_bytes(4, "little") + os.urandom(1 + i % 200) for i in range(n)]
        with harness.Vm(RINGS_GUEST, harness.ivshmem_plain(shm_path, SHM_SIZE), workdir=tmp_path,
                        iommu=False, image=image, env={"N": str(n)}) as vm:
            got = []
            sent = 0
            deadline = time.monotonic() + 180
            while len(got) < n:
                if time.monotonic() > deadline:
                    raise vm.fail(f"only {len(got)}/{n} replies (sent {sent})")
                progressed = False
                while sent < n and h2g.try_send(msgs[sent]):
                    sent += 1
                    progressed = True
                while True:
                    m = g2h.try_recv()
                    if m is None:
                        break
                    got.append(m)
                    progressed = True
                if not progressed:
                    if vm.proc and vm.proc.poll() is not None:
                        raise vm.fail("QEMU ended early")
                    time.sleep(0.0005)
            res = vm.result(timeout=60)
            att = [json.loads(m.text) for m in vm.messages() if m.tag == "stage"][0]
        assert att["generation"] == region.generation and att["size"] == SHM_SIZE
        assert res["received"] == n and res["extra"] is False
        assert res["digest"] == hashlib.sha256(b"".join(msgs)).hexdigest()
        assert got == [m[::-1] for m in msgs]
        assert g2h.try_recv() is None


ERRORS_GUEST = r"""
import errno, os, warnings
import vmguest
import pyivshmem
from pyivshmem import PciDevice, DeviceError, ClosedError, ConfigError

out = {}
info = PciDevice.list()[0]

# vfio=True without an IOMMU: a clear DeviceError
try:
    PciDevice.open(vfio=True)
except DeviceError as e:
    out["no_iommu"] = str(e)

# wrong address
try:
    PciDevice.open("0000:00:1f.7")
except DeviceError as e:
    out["not_found"] = str(e)

# "auto" on a plain device: sysfs, no warning (there are no interrupts to lose)
with warnings.catch_warnings():
    warnings.simplefilter("error")
    dev = PciDevice.open(vfio="auto", poll_interval=0.002)
out["auto_vfio"] = dev.uses_vfio
out["vector_fd"] = dev.vector_fd(0)
out["notify_target"] = dev.notify_target(1, 0)
dev.notify(1, 0)  # nothing to ring on plain: a no-op
fired = dev.wait(0.05)
out["wait"] = fired
out["fileno_is_int"] = isinstance(dev.fileno(), int)
try:
    dev.notify(70000)
except ConfigError as e:
    out["bad_peer"] = str(e)
dev.close()
dev.close()
try:
    dev.notify(0)
except ClosedError as e:
    out["closed"] = str(e)

# close() refuses while a view of the memory is alive, and works once it is released
dev = PciDevice.open(vfio=False)
view = dev.memory
try:
    dev.close()
except BufferError:
    out["busy"] = not dev.closed
view.release()
dev.close()
out["closed_after_release"] = dev.closed

# memory decoding off: clear bit 1 of the command register through sysfs config space
cfg = f"/sys/bus/pci/devices/{info.bdf}/config"
with open(cfg, "r+b", buffering=0) as f:
    f.seek(4)
    cmd = int.from_bytes(f.read(2), "little")
    f.seek(4)
    f.write((cmd & ~0x2).to_bytes(2, "little"))
    try:
        PciDevice.open(vfio=False)
    except DeviceError as e:
        out["decoding_off"] = str(e)
    f.seek(4)
    f.write(cmd.to_bytes(2, "little"))

# not root
pid = os.fork()
if pid == 0:
    code = 3
    try:
        os.setuid(65534)
        try:
            PciDevice.open(vfio=False)
            code = 1
        except DeviceError as e:
            code = 0 if "root" in str(e) else 2
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
out["not_root_status"] = os.waitstatus_to_exitcode(status)
vmguest.result(**out)
"""


def test_plain_errors(image, shm_path, tmp_path):
    """The guest-side errors say what is wrong and what to do."""
    with open(shm_path, "wb") as f:
        f.truncate(SHM_SIZE)
    with harness.Vm(ERRORS_GUEST, harness.ivshmem_plain(shm_path, SHM_SIZE), workdir=tmp_path,
                    iommu=False, image=image) as vm:
        res = vm.result(timeout=120)
    assert "no IOMMU" in res["no_iommu"] and "intel-iommu" in res["no_iommu"]
    assert "no ivshmem device at 0000:00:1f.7" in res["not_found"]
    assert res["auto_vfio"] is False
    assert res["vector_fd"] is None and res["notify_target"] is None
    assert res["wait"] == []
    assert res["fileno_is_int"] is True
    assert "0..65535" in res["bad_peer"]
    assert "closed" in res["closed"]
    assert "memory decoding is off" in res["decoding_off"]
    assert res["not_root_status"] == 0
    assert res["busy"] is True and res["closed_after_release"] is True
