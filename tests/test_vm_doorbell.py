"""ivshmem-doorbell in a real QEMU guest: the guest binds the device to vfio-pci, reads its peer id,
rings the host, and sleeps on MSI-X eventfds until the host rings back.

The server here is tests/vm/mini_server.py (an independent implementation of the protocol, with the
test process as a peer). Needs qemu-system-x86_64 (skips otherwise).
"""
from __future__ import annotations

import os

import pytest

from vm import harness
from vm.mini_server import MiniServer

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.timeout(240)]

SHM_SIZE = 1 << 20


@pytest.fixture
def memfd():
    if not hasattr(os, "memfd_create") or not hasattr(os, "eventfd"):
        pytest.skip("needs os.memfd_create and os.eventfd (Python >= 3.10 on Linux)")
    fd = os.memfd_create("pyivshmem-vmtest", os.MFD_CLOEXEC)
    os.ftruncate(fd, SHM_SIZE)
    yield fd
    os.close(fd)


DOORBELL_GUEST = r"""
import os, select, warnings
import vmguest
from pyivshmem import PciDevice

HOST = int(os.environ["HOST_ID"])
info = PciDevice.list()[0]
with warnings.catch_warnings():
    warnings.simplefilter("error")
    dev = PciDevice.open(vfio="auto")
with dev:
    mem = dev.memory
    out = dict(id=dev.id, flavour=dev.flavour, vectors=dev.vectors, interrupts=dev.interrupts,
               uses_vfio=dev.uses_vfio, iommu_group=info.iommu_group, msix=info.msix_vectors,
               driver_before=info.driver, driver_after=PciDevice.list()[0].driver)
    t = dev.notify_target(HOST, 1)
    out["target_kind"], out["target_value"] = t[0], t[2]
    out["vector_fds_distinct"] = len({dev.vector_fd(v) for v in range(dev.vectors)}) == dev.vectors
    out["early_wait"] = dev.wait(0.05)  # nothing rang yet: a timeout
    vmguest.stage("ready", id=dev.id)
    dev.notify(HOST, 0)                              # 1. ring the host
    fired = dev.wait(60)                             # 3. the host rang our vector 1
    out["fired"] = fired
    out["token"] = int.from_bytes(mem[0:8], "little")
    mem[8:16] = (out["token"] + 1).to_bytes(8, "little")
    dev.notify(HOST, 1)                              # 4. ring the host's vector 1
    # 6. the host rings vector 0 again; this time sleep in select() on fileno()
    r, _, _ = select.select([dev.fileno()], [], [], 60)
    out["select_ready"] = bool(r)
    out["fired2"] = dev.wait(0)
    del mem
vmguest.result(**out)
"""


def test_doorbell_host_guest(image, memfd, tmp_path):
    sock = str(tmp_path / "ivshmem.sock")
    with MiniServer(sock, memfd, vectors=2) as server:
        mm = __import__("mmap").mmap(memfd, SHM_SIZE)
        try:
            with harness.Vm(DOORBELL_GUEST, harness.ivshmem_doorbell(sock, vectors=2),
                            workdir=tmp_path, image=image, env={"HOST_ID": str(server.host_id)}) as vm:
                (guest_id,) = server.wait_guests(1, timeout=30)
                import json

                ready = json.loads(vm.wait_for("stage", timeout=harness.BOOT_TIMEOUT).text)
                assert ready["id"] == guest_id
                # 2. the guest's ring arrives on our vector 0
                if not server.wait(0, timeout=60):
                    raise vm.fail("the guest's doorbell never reached the host's vector 0")
                token = int.from_bytes(os.urandom(7), "little") | 1
                mm[0:8] = token.to_bytes(8, "little")
                server.ring(guest_id, 1)
                # 5. the guest answers on our vector 1
                if not server.wait(1, timeout=60):
                    raise vm.fail("the guest's second doorbell never reached the host's vector 1")
                assert int.from_bytes(mm[8:16], "little") == token + 1
                server.ring(guest_id, 0)
                res = vm.result(timeout=60)
        finally:
            mm.close()
    assert res["flavour"] == "doorbell"
    assert res["id"] == guest_id
    assert res["uses_vfio"] is True and res["interrupts"] is True
    assert res["vectors"] == 2 and res["msix"] == 2
    assert res["iommu_group"] is not None
    assert res["driver_before"] is None and res["driver_after"] == "vfio-pci"
    assert res["target_kind"] == 2 and res["target_value"] == (server.host_id << 16) | 1
    assert res["vector_fds_distinct"] is True
    assert res["early_wait"] == []
    assert res["fired"] == [1]
    assert res["token"] == token
    assert res["select_ready"] is True
    assert res["fired2"] == [0]


NOT_VIABLE_GUEST = r"""
import os
import vmguest
from pyivshmem import PciDevice, DeviceError

info = PciDevice.list()[0]
group = f"/sys/kernel/iommu_groups/{info.iommu_group}/devices"
out = {"members": sorted(os.listdir(group))}
try:
    PciDevice.open(vfio=True)
    out["error"] = None
except DeviceError as e:
    out["error"], out["errno"] = str(e), e.errno
vmguest.result(**out)
"""


def test_vfio_group_not_viable(image, memfd, tmp_path):
    """Behind a PCIe-to-PCI bridge the ivshmem device shares its IOMMU group with a PCI serial port
    that the guest's serial driver owns: VFIO refuses the group, and the error names the culprit."""
    sock = str(tmp_path / "ivshmem.sock")
    devices = ["-device", "pcie-pci-bridge,id=br0", "-device", "pci-serial,bus=br0,addr=1"]
    devices += harness.ivshmem_doorbell(sock, vectors=1, extra=",bus=br0,addr=2")
    with MiniServer(sock, memfd, vectors=1):
        with harness.Vm(NOT_VIABLE_GUEST, devices, workdir=tmp_path, image=image) as vm:
            res = vm.result(timeout=120)
    assert len(res["members"]) >= 2
    assert res["error"] is not None, "VFIO accepted a group with a host-owned device"
    assert "not viable" in res["error"] and "serial" in res["error"]
    import errno

    assert res["errno"] == errno.EBUSY
