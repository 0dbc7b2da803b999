"""PciDevice without a VM: discovery and error paths against a fake sysfs tree, and the C register
helpers against ordinary memory. (The real device is exercised in tests/test_vm_*.py guests.)"""
from __future__ import annotations

import errno
import mmap
import os
import select
import shutil
import struct
from pathlib import Path

import pytest

from pyivshmem import ConfigError, DeviceError, PciDevice
from pyivshmem.pci import _msix_vectors


def _config(command: int = 0x0007, msix_table_size: int | None = None) -> bytes:
    cfg = bytearray(256)
    struct.pack_into("<HH", cfg, 0, 0x1AF4, 0x1110)
    struct.pack_into("<H", cfg, 4, command)
    if msix_table_size is not None:
        struct.pack_into("<H", cfg, 6, 0x10)  # capability list present
        cfg[0x34] = 0x40
        cfg[0x40:0x42] = bytes([0x09, 0x50])  # vendor-specific cap, next at 0x50
        cfg[0x50:0x52] = bytes([0x11, 0x00])  # MSI-X, last
        struct.pack_into("<H", cfg, 0x52, msix_table_size - 1)
    return bytes(cfg)


def _device(root: Path, bdf: str, *, vendor="0x1af4", device="0x1110", bars=(256, 0, 1 << 20),
            cfg: bytes | None = None, group: int | None = None, driver: str | None = None) -> Path:
    d = root / "bus" / "pci" / "devices" / bdf
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
    (d / "revision").write_text("0x01\n")
    lines = []
    base = 0xFE000000
    for size in list(bars) + [0] * (6 - len(bars)):
        if size:
            lines.append(f"0x{base:016x} 0x{base + size - 1:016x} 0x0000000000040200")
            base += max(size, 4096)
        else:
            lines.append("0x0000000000000000 0x0000000000000000 0x0000000000000000")
    (d / "resource").write_text("\n".join(lines) + "\n")
    (d / "config").write_bytes(cfg if cfg is not None else _config())
    (d / "driver_override").write_text("(null)\n")
    for i, size in enumerate(bars):
        if size:
            (d / f"resource{i}").write_bytes(b"\0" * min(size, 4096))
    if group is not None:
        g = root / "kernel" / "iommu_groups" / str(group)
        (g / "devices").mkdir(parents=True)
        os.symlink(d, g / "devices" / bdf)
        os.symlink(g, d / "iommu_group")
    if driver is not None:
        drv = root / "bus" / "pci" / "drivers" / driver
        drv.mkdir(parents=True, exist_ok=True)
        os.symlink(drv, d / "driver")
    return d


@pytest.fixture
def sysfs(tmp_path):
    root = tmp_path / "sys"
    (root / "bus" / "pci" / "devices").mkdir(parents=True)
    return root


def test_list_finds_ivshmem_devices_only(sysfs):
    _device(sysfs, "0000:00:02.0", vendor="0x8086", device="0x10d3")
    _device(sysfs, "0000:00:03.0", bars=(256, 0, 1 << 20))
    _device(sysfs, "0000:00:04.0", bars=(256, 4096, 4 << 20), cfg=_config(msix_table_size=2), group=7,
            driver="vfio-pci")
    devs = PciDevice.list(sysfs=str(sysfs))
    assert [d.bdf for d in devs] == ["0000:00:03.0", "0000:00:04.0"]
    plain, bell = devs
    assert plain.flavour == "plain" and plain.bar_sizes[2] == 1 << 20 and plain.bar_sizes[1] == 0
    assert plain.shm_size == 1 << 20 and plain.iommu_group is None and plain.driver is None
    assert plain.msix_vectors == 0 and plain.memory_enabled is True and plain.revision == 1
    assert bell.flavour == "doorbell" and bell.msix_vectors == 2 and bell.iommu_group == 7
    assert bell.driver == "vfio-pci" and bell.bar_sizes[0] == 256 and bell.shm_size == 4 << 20


def test_list_without_sysfs(tmp_path):
    assert PciDevice.list(sysfs=str(tmp_path / "nothing")) == []


def test_list_survives_garbage(sysfs):
    d = _device(sysfs, "0000:00:03.0")
    (d / "resource").write_text("garbage\n\n0x1 zz\n")
    (d / "config").write_bytes(b"\xff" * 10)
    _device(sysfs, "0000:00:05.0", vendor="not-hex")
    (dev,) = PciDevice.list(sysfs=str(sysfs))
    assert dev.bdf == "0000:00:03.0" and dev.shm_size == 0 and dev.msix_vectors is None


def test_msix_capability_walk_is_bounded():
    cfg = bytearray(_config(msix_table_size=4))
    assert _msix_vectors(bytes(cfg)) == 4
    cfg[0x41] = 0x40  # a capability pointing at itself: must not loop forever
    assert _msix_vectors(bytes(cfg)) == 0
    assert _msix_vectors(b"") is None


def test_open_without_device(sysfs):
    with pytest.raises(DeviceError) as e:
        PciDevice.open(sysfs=str(sysfs))
    assert e.value.errno == errno.ENODEV and "ivshmem-plain" in str(e.value)


def test_open_wrong_address(sysfs):
    _device(sysfs, "0000:00:03.0")
    with pytest.raises(DeviceError, match=r"no ivshmem device at 0000:00:09.0 .*0000:00:03.0"):
        PciDevice.open("00:09.0", sysfs=str(sysfs))
    with pytest.raises(ConfigError):
        PciDevice.open("not-an-address", sysfs=str(sysfs))
    with pytest.raises(ConfigError):
        PciDevice.open(vfio="sometimes", sysfs=str(sysfs))  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        PciDevice.open(poll_interval=0, sysfs=str(sysfs))


def test_open_vfio_without_iommu(sysfs):
    _device(sysfs, "0000:00:03.0", bars=(256, 4096, 1 << 20), cfg=_config(msix_table_size=1))
    with pytest.raises(DeviceError, match="no IOMMU.*intel-iommu"):
        PciDevice.open(vfio=True, sysfs=str(sysfs))


@pytest.mark.skipif(os.geteuid() != 0, reason="the memory-decoding check comes after the root check")
def test_open_memory_decoding_off(sysfs):
    _device(sysfs, "0000:00:03.0", cfg=_config(command=0x0000))
    with pytest.raises(DeviceError, match="memory decoding is off.*enable"):
        PciDevice.open(vfio=False, sysfs=str(sysfs))


def _open_as_nobody(sysfs) -> str:
    """As root: PciDevice.open in a forked child that dropped to uid/gid 65534 first; what it
    raised (its class and message), or "opened"."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                PciDevice.open(vfio=False, sysfs=str(sysfs)).close()
                out = "opened"
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                out = f"{type(exc).__name__}: {exc}"
            os.write(w, out.encode()[:4000])
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, out)
    return out


def test_open_not_root(sysfs):
    if os.geteuid() != 0:
        _device(sysfs, "0000:00:03.0")
        with pytest.raises(DeviceError, match="root"):
            PciDevice.open(vfio=False, sysfs=str(sysfs))
        return
    # as root: from an unprivileged child, on a fake sysfs anyone may read (as the real one is)
    import tempfile

    top = tempfile.mkdtemp(prefix="pyivshmem-sysfs-")
    try:
        os.chmod(top, 0o755)
        public = Path(top) / "sys"
        (public / "bus" / "pci" / "devices").mkdir(parents=True)
        _device(public, "0000:00:03.0")
        out = _open_as_nobody(public)
        assert out.startswith("DeviceError") and "map the BARs" in out and "root" in out, out
        # and where sysfs itself cannot be read, the error says so instead of a bare OSError
        os.chmod(public / "bus" / "pci" / "devices", 0o700)
        out = _open_as_nobody(public)
        assert out.startswith("DeviceError") and "not readable" in out and "root" in out, out
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="bind_vfio needs root")
def test_bind_vfio_writes_override_and_reports_failure(sysfs):
    d = _device(sysfs, "0000:00:03.0", group=3)
    (sysfs / "bus" / "pci" / "drivers" / "vfio-pci").mkdir(parents=True)
    (sysfs / "bus" / "pci" / "drivers_probe").write_text("")
    with pytest.raises(DeviceError, match="did not bind to vfio-pci"):
        PciDevice.bind_vfio("0000:00:03.0", sysfs=str(sysfs), timeout=0.1)
    assert (d / "driver_override").read_text() == "vfio-pci"
    assert (sysfs / "bus" / "pci" / "drivers_probe").read_text() == "0000:00:03.0"


def test_bind_vfio_already_bound(sysfs):
    _device(sysfs, "0000:00:03.0", group=5, driver="vfio-pci")
    assert PciDevice.bind_vfio("0000:00:03.0", sysfs=str(sysfs)) == 5


def test_bind_vfio_without_driver(sysfs, monkeypatch):
    _device(sysfs, "0000:00:03.0", group=5)
    monkeypatch.setattr("pyivshmem.pci._try_modprobe", lambda name: None)
    with pytest.raises(DeviceError, match="vfio-pci driver is not loaded"):
        PciDevice.bind_vfio("0000:00:03.0", sysfs=str(sysfs))


# -- the C helpers on ordinary memory ---------------------------------------------------------
@pytest.fixture
def lib():
    from pyivshmem._ffi_vfio import ffi, lib

    return ffi, lib


def test_register_access_and_doorbell_encoding(lib):
    ffi, c = lib
    fd = os.memfd_create("pyivshmem-bar0-test") if hasattr(os, "memfd_create") else None
    if fd is None:
        pytest.skip("needs os.memfd_create")
    try:
        os.ftruncate(fd, 4096)
        addr = ffi.new("uintptr_t *")
        assert c.ivshm_mmio_map(fd, 0, 256, 1, addr) == 0
        base = int(addr[0])
        try:
            assert c.ivshm_mmio_doorbell(base, 5, 3) == 0
            out = ffi.new("uint32_t *")
            assert c.ivshm_mmio_read32(base, 256, 0x0C, out) == 0
            assert out[0] == (5 << 16) | 3
            assert c.ivshm_mmio_write32(base, 256, 0x08, 0xDEADBEEF) == 0
            mm = mmap.mmap(fd, 4096)
            assert struct.unpack_from("<II", mm, 8) == (0xDEADBEEF, 0x50003)
            mm.close()
            # misaligned, out of range, bad ids: refused, nothing written
            assert c.ivshm_mmio_write32(base, 256, 0x0D, 1) == -errno.EINVAL
            assert c.ivshm_mmio_write32(base, 256, 256, 1) == -errno.EINVAL
            assert c.ivshm_mmio_read32(base, 256, 254, out) == -errno.EINVAL
            assert c.ivshm_mmio_doorbell(base, 65536, 0) == -errno.EINVAL
        finally:
            assert c.ivshm_mmio_unmap(base, 256) == 0
    finally:
        os.close(fd)


def test_poll_timer_fires(lib):
    ffi, c = lib
    fd = ffi.new("int *")
    assert c.ivshm_poll_timer_create(0, fd) == -errno.EINVAL
    assert c.ivshm_poll_timer_create(2000, fd) == 0
    try:
        r, _, _ = select.select([fd[0]], [], [], 5)
        assert r and int.from_bytes(os.read(fd[0], 8), "little") >= 1
    finally:
        os.close(fd[0])


def test_vfio_open_reports_the_failing_step(lib):
    ffi, c = lib
    v = ffi.new("struct ivshm_vfio *")
    stage = ffi.new("int *")
    rc = c.ivshm_vfio_open(v, 987654, b"0000:00:03.0", stage)
    assert rc < 0
    assert stage[0] in (c.IVSHM_VFIO_STAGE_CONTAINER, c.IVSHM_VFIO_STAGE_GROUP)
    assert (v.container_fd, v.group_fd, v.device_fd) == (-1, -1, -1)  # nothing left open
    assert c.ivshm_vfio_close(v) == 0  # idempotent on a closed struct


def test_closed_device_refuses_use():
    dev = PciDevice()  # never opened: behaves as closed
    assert dev.closed
    dev.close()
    from pyivshmem import ClosedError

    for call in (lambda: dev.notify(1), lambda: dev.wait(0), dev.fileno, lambda: dev.vector_fd(0),
                 lambda: dev.notify_target(1, 0), lambda: dev.region, lambda: dev.read_register(8)):
        with pytest.raises(ClosedError):
            call()
