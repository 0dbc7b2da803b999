"""The guest side: an ivshmem PCI device (1af4:1110) seen from inside a Linux VM.

``PciDevice.list()`` finds the devices in sysfs; ``PciDevice.open()`` maps the shared memory (BAR2) as
a :class:`~pyivshmem.Region` and the registers (BAR0), reads this VM's peer id (IVPosition), rings
peers through the Doorbell register, and waits for interrupts.

Two ways in, neither needing a kernel module of our own:

* **VFIO** (``vfio=True``, or ``"auto"`` when the guest has an IOMMU and the ``vfio-pci`` driver): the
  device is bound to ``vfio-pci``, BARs are mapped through the VFIO device fd, bus mastering is
  switched on, and every MSI-X vector is bound to an eventfd. ``wait()`` sleeps on those eventfds.
* **sysfs** (``vfio=False``, or ``"auto"`` without VFIO): ``resource0``/``resource2`` are mapped
  directly. There is no way to receive interrupts, so ``wait()`` degrades to bounded polling: it
  returns after at most ``poll_interval`` seconds and the caller re-checks shared memory. A doorbell
  device opened this way with ``vfio="auto"`` says so with a ``RuntimeWarning``; ``interrupts`` is
  False.

A PciDevice is a doorbell provider (the same interface as a host ``Peer``): ``id``, ``notify()``,
``vector_fd()``, ``notify_target()``, ``wait()``, ``fileno()``, so a Channel runs unchanged in a guest.
Everything here needs root.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from ._ffi_doorbell import ffi as _dffi
from ._ffi_doorbell import lib as _dlib
from .doorbell import WaitSet, _FdKeeper
from .errors import ClosedError, ConfigError, DeviceError, DeviceGoneError, WaitTimeout


def _new_eventfd() -> int:
    """A non-blocking, close-on-exec eventfd (through the C helpers, which work on every
    Python the package supports)."""
    from .doorbell import eventfd

    return eventfd(nonblock=True)

__all__ = ["PciDevice", "PciDeviceInfo", "IVSHMEM_VENDOR", "IVSHMEM_DEVICE"]

IVSHMEM_VENDOR = 0x1AF4
IVSHMEM_DEVICE = 0x1110
VFIO_DRIVER = "vfio-pci"
DEFAULT_POLL_INTERVAL = 0.001  # seconds: the longest a guest without interrupts sleeps between checks

# the ivshmem BAR0 layout, from csrc/ivshm_vfio.h through the binding (never a copy)
try:
    from ._ffi_vfio import lib as _vlib  # type: ignore[import-not-found]

    _REG_IVPOSITION = int(_vlib.IVSHM_REG_IVPOSITION)
    _REG_DOORBELL = int(_vlib.IVSHM_REG_DOORBELL)
    _BAR0_SIZE = int(_vlib.IVSHM_BAR0_SIZE)
except ImportError:  # pragma: no cover - a broken build: PciDevice.open() says so through _cffi()
    _REG_IVPOSITION = _REG_DOORBELL = _BAR0_SIZE = 0
_GONE_TAG = 0x7FFFFFFE  # wait-set tag of the hot-unplug eventfd; vectors use their number
_PCI_COMMAND = 0x04
_PCI_COMMAND_MEMORY = 0x2
_PCI_STATUS = 0x06
_PCI_STATUS_CAP_LIST = 0x10
_PCI_CAP_PTR = 0x34
_PCI_CAP_ID_MSIX = 0x11
# VFIO_DEVICE_SET_IRQS and its flags (linux/vfio.h): the "request" interrupt is how vfio-pci asks
# user space to give a device back before the kernel removes it (hot-unplug)
_VFIO_DEVICE_SET_IRQS = (ord(";") << 8) | (100 + 10)
_VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
_VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
_VFIO_PCI_REQ_IRQ_INDEX = 4

_lib = None
_ffi = None


def _cffi():
    global _lib, _ffi
    if _lib is None:
        try:
            from ._ffi_vfio import ffi, lib  # type: ignore[import-not-found]
        except ImportError as e:  # pragma: no cover - only in a broken build
            raise DeviceError(
                errno.ENOSYS,
                f"pyivshmem._ffi_vfio is not built ({e}): run `python setup.py build_ext --inplace`",
            ) from None
        _lib, _ffi = lib, ffi
    return _lib, _ffi


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise DeviceError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def _normalize_bdf(bdf: str) -> str:
    bdf = bdf.strip().lower()
    if bdf.count(":") == 1:
        bdf = "0000:" + bdf
    parts = bdf.replace(".", ":").split(":")
    if len(parts) != 4 or not all(p and all(c in "0123456789abcdef" for c in p) for p in parts):
        raise ConfigError(f"{bdf!r} is not a PCI address like 0000:00:03.0")
    return bdf


# ---------------------------------------------------------------------------------------------
# discovery (sysfs, no root needed)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PciDeviceInfo:
    """One ivshmem device as sysfs describes it."""

    bdf: str
    flavour: str  # "plain" (memory only) or "doorbell" (memory + MSI-X interrupts)
    bar_sizes: Dict[int, int] = field(default_factory=dict)  # BAR index -> bytes (0 if absent)
    driver: Optional[str] = None  # kernel driver bound to it, e.g. "vfio-pci"
    iommu_group: Optional[int] = None  # None: the guest has no IOMMU for it
    msix_vectors: Optional[int] = None  # from the MSI-X capability; None if unreadable (not root)
    memory_enabled: Optional[bool] = None  # memory decoding bit of the PCI command register
    revision: int = 0
    sysfs_path: str = ""

    @property
    def shm_size(self) -> int:
        return self.bar_sizes.get(2, 0)


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _bar_sizes(devdir: str) -> Dict[int, int]:
    sizes: Dict[int, int] = {}
    text = _read_text(os.path.join(devdir, "resource")) or ""
    for i, line in enumerate(text.splitlines()[:6]):
        try:
            start, end, _flags = (int(x, 16) for x in line.split())
        except ValueError:
            continue
        sizes[i] = end - start + 1 if end > start else 0
    return sizes


def _config_bytes(devdir: str) -> bytes:
    try:
        with open(os.path.join(devdir, "config"), "rb") as f:
            return f.read(256)  # beyond 64 bytes only for root
    except OSError:
        return b""


def _msix_vectors(cfg: bytes) -> Optional[int]:
    if len(cfg) < 64:
        return None
    status = int.from_bytes(cfg[_PCI_STATUS:_PCI_STATUS + 2], "little")
    if not status & _PCI_STATUS_CAP_LIST:
        return 0
    if len(cfg) < 256:
        return None
    ptr, seen = cfg[_PCI_CAP_PTR] & 0xFC, 0
    while ptr and seen < 48 and ptr + 4 <= len(cfg):
        if cfg[ptr] == _PCI_CAP_ID_MSIX:
            return (int.from_bytes(cfg[ptr + 2:ptr + 4], "little") & 0x7FF) + 1
        ptr, seen = cfg[ptr + 1] & 0xFC, seen + 1
    return 0


def _describe(devdir: str, bdf: str) -> Optional[PciDeviceInfo]:
    try:
        vendor = int(_read_text(os.path.join(devdir, "vendor")) or "0", 16)
        device = int(_read_text(os.path.join(devdir, "device")) or "0", 16)
    except ValueError:
        return None
    if (vendor, device) != (IVSHMEM_VENDOR, IVSHMEM_DEVICE):
        return None
    sizes = _bar_sizes(devdir)
    drv = os.path.join(devdir, "driver")
    driver = os.path.basename(os.readlink(drv)) if os.path.islink(drv) else None
    grp = os.path.join(devdir, "iommu_group")
    group = None
    if os.path.islink(grp):
        try:
            group = int(os.path.basename(os.readlink(grp)))
        except ValueError:
            group = None
    cfg = _config_bytes(devdir)
    memory = bool(int.from_bytes(cfg[4:6], "little") & _PCI_COMMAND_MEMORY) if len(cfg) >= 6 else None
    try:
        rev = int(_read_text(os.path.join(devdir, "revision")) or "0", 16)
    except ValueError:
        rev = 0
    msix = _msix_vectors(cfg)
    flavour = "doorbell" if sizes.get(1, 0) > 0 or (msix or 0) > 0 else "plain"
    return PciDeviceInfo(bdf, flavour, sizes, driver, group, msix, memory, rev, devdir)


# ---------------------------------------------------------------------------------------------
# the device
# ---------------------------------------------------------------------------------------------
_STAGE_TEXT = {
    "container": "open /dev/vfio/vfio",
    "api": "check the VFIO API version",
    "type1": "find the type1 IOMMU driver",
    "group": "open the IOMMU group",
    "group_status": "query the IOMMU group",
    "viable": "check the IOMMU group is viable",
    "set_container": "attach the group to a VFIO container",
    "set_iommu": "select the type1 IOMMU",
    "device": "get the VFIO device fd",
}


class PciDevice:
    """An opened ivshmem PCI device. Create with :meth:`PciDevice.open`."""

    def __init__(self) -> None:  # use PciDevice.open()
        self._closed = True
        self._closing = False  # a close() is under way (in some thread)
        self._sysfs = "/sys"
        self.info: PciDeviceInfo
        self.bdf = ""
        self.flavour = ""
        self.id = 0
        self.vectors = 0
        self.uses_vfio = False
        self.interrupts = False
        self.poll_interval = DEFAULT_POLL_INTERVAL
        self._format_if_empty = True
        self._vfio: Any = None  # cdata struct ivshm_vfio
        self._bar0 = 0
        self._bar0_len = 0
        self._bar0_off = 0  # VFIO offset of BAR0 when it cannot be mapped (pwrite fallback)
        self._bar2_off = 0
        self._bar2_size = 0
        self._mem_fd = -1  # resource2 (sysfs) or a dup of the VFIO device fd
        self._efds: List[int] = []
        self._ws: Optional[WaitSet] = None  # the MSI-X eventfds and _gone_fd (csrc/ivshm_doorbell.c)
        # How a Channel's waker rings a peer from C (csrc/ivshm_doorbell.h): the Doorbell register
        # once BAR0 is mapped on a doorbell device, cleared BEFORE BAR0 is unmapped.  It lives as
        # long as this object: a Channel holds its PciDevice.
        out = _dffi.new("struct ivshm_bell_table **")
        rc = _dlib.ivshm_bell_table_create(_dlib.IVSHM_BELL_MMIO, 0xFFFF, 256, out)
        if rc < 0:
            raise DeviceError(-rc, f"cannot make a doorbell table: {os.strerror(-rc)}")
        self._bells = _dffi.gc(out[0], _dlib.ivshm_bell_table_destroy)
        self._timer_fd = -1
        self._region = None
        self._mmap: Optional[mmap.mmap] = None
        # the Channels over this device (weakly): close() and a hot-unplug tell them, so that
        # calls asleep on its vectors wake (ClosedError) instead of sleeping on, until their
        # re-check, on eventfds that fire no more or are closed
        self._channels: "weakref.WeakSet" = weakref.WeakSet()
        # hot-unplug: why the device is gone (None while present), the VFIO request eventfd, an
        # eventfd the watcher raises (in the epoll set, so wait() wakes), and the lock that keeps
        # register accesses and the release apart
        self._gone: Optional[str] = None
        self._req_fd = -1
        self._gone_fd = -1
        self._stop_fd = -1
        self._watcher: Optional[threading.Thread] = None
        self._lock = threading.RLock()
        # close(): the thread whose close() is under way (_closing), and the others' wait for it
        self._closer: Optional[int] = None
        self._close_done = threading.Condition(self._lock)
        # the eventfds that waits (and Channels asleep on a vector) use with the GIL released:
        # close() closes them once those calls have left (_FdKeeper, docs/wakeup.md)
        self._fdk = _FdKeeper("this PciDevice")

    # -- discovery -----------------------------------------------------------------------------
    @staticmethod
    def list(*, sysfs: str = "/sys") -> List[PciDeviceInfo]:
        """Every ivshmem device (1af4:1110) of this machine, in PCI address order."""
        base = os.path.join(sysfs, "bus", "pci", "devices")
        try:
            names = sorted(os.listdir(base))
        except FileNotFoundError:
            return []
        except PermissionError as exc:
            raise DeviceError(
                errno.EACCES,
                f"cannot list PCI devices: {base} is not readable by this user; run as root "
                f"(or give it read access)",
            ) from exc
        out = []
        for bdf in names:
            info = _describe(os.path.join(base, bdf), bdf)
            if info is not None:
                out.append(info)
        return out

    @classmethod
    def _find(cls, bdf: Optional[str], sysfs: str) -> PciDeviceInfo:
        devices = cls.list(sysfs=sysfs)
        if bdf is None:
            if not devices:
                raise DeviceError(
                    errno.ENODEV,
                    "no ivshmem device (PCI 1af4:1110) in this machine: start the VM with "
                    "`-device ivshmem-plain,memdev=...` or `-device ivshmem-doorbell,chardev=...`",
                )
            return devices[0]
        want = _normalize_bdf(bdf)
        for d in devices:
            if d.bdf == want:
                return d
        found = ", ".join(d.bdf for d in devices) or "none"
        raise DeviceError(errno.ENODEV, f"no ivshmem device at {want} (ivshmem devices here: {found})")

    @classmethod
    def wait_for(cls, bdf: Optional[str] = None, timeout: float = 30.0, *, sysfs: str = "/sys",
                 interval: float = 0.05) -> PciDeviceInfo:
        """Wait until the ivshmem device at ``bdf`` (any one when None) is in this machine, e.g.
        after the host plugged it back (QMP ``device_add``); its info. Open it with
        ``PciDevice.open(info.bdf)``. Raises WaitTimeout after ``timeout`` seconds."""
        if not (timeout >= 0):
            raise ConfigError(f"timeout must be a number >= 0, not {timeout!r}")
        want = None if bdf is None else _normalize_bdf(bdf)
        deadline = time.monotonic() + timeout
        while True:
            for info in cls.list(sysfs=sysfs):
                if want is None or info.bdf == want:
                    return info
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"no ivshmem device {want or '(any)'} appeared within {timeout:g} s: "
                                  "has the host plugged it in (QMP device_add)?")
            time.sleep(interval)

    # -- VFIO binding --------------------------------------------------------------------------
    @staticmethod
    def bind_vfio(bdf: str, *, sysfs: str = "/sys", timeout: float = 5.0) -> int:
        """Bind the device to vfio-pci (driver_override + drivers_probe); its IOMMU group number.

        Needs root, an IOMMU in the guest, and the vfio-pci driver loaded (``modprobe vfio-pci``).
        Idempotent: a device already bound to vfio-pci is left as it is.
        """
        bdf = _normalize_bdf(bdf)
        devdir = os.path.join(sysfs, "bus", "pci", "devices", bdf)
        if not os.path.isdir(devdir):
            raise DeviceError(errno.ENODEV, f"no PCI device {bdf} in {sysfs}/bus/pci/devices")
        group = _iommu_group(devdir, bdf)
        drvdir = os.path.join(sysfs, "bus", "pci", "drivers", VFIO_DRIVER)
        if not os.path.isdir(drvdir):
            _try_modprobe("vfio-pci")
            if not os.path.isdir(drvdir):
                raise DeviceError(
                    errno.ENOENT,
                    "the vfio-pci driver is not loaded: `modprobe vfio-pci` (modules vfio, "
                    "vfio_iommu_type1, vfio-pci-core, vfio-pci)",
                )
        if _driver_of(devdir) == VFIO_DRIVER:
            return group
        _need_root(f"bind {bdf} to vfio-pci")
        _write_sysfs(os.path.join(devdir, "driver_override"), VFIO_DRIVER)
        if _driver_of(devdir) is not None:
            _write_sysfs(os.path.join(devdir, "driver", "unbind"), bdf)
        _write_sysfs(os.path.join(sysfs, "bus", "pci", "drivers_probe"), bdf, missing_ok=True)
        deadline = time.monotonic() + timeout
        while _driver_of(devdir) != VFIO_DRIVER:
            if time.monotonic() > deadline:
                raise DeviceError(
                    errno.EIO,
                    f"{bdf} did not bind to vfio-pci within {timeout}s (driver now: "
                    f"{_driver_of(devdir)}); see the kernel log (dmesg)",
                )
            time.sleep(0.01)
        return group

    @staticmethod
    def unbind_vfio(bdf: str, *, sysfs: str = "/sys") -> None:
        """Undo :meth:`bind_vfio`: unbind from vfio-pci and clear the driver override."""
        bdf = _normalize_bdf(bdf)
        devdir = os.path.join(sysfs, "bus", "pci", "devices", bdf)
        _need_root(f"unbind {bdf} from vfio-pci")
        if _driver_of(devdir) == VFIO_DRIVER:
            _write_sysfs(os.path.join(devdir, "driver", "unbind"), bdf)
        _write_sysfs(os.path.join(devdir, "driver_override"), "\n")

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        bdf: Optional[str] = None,
        *,
        vfio: Union[str, bool] = "auto",
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        format_if_empty: bool = True,
        sysfs: str = "/sys",
    ) -> "PciDevice":
        """Open an ivshmem device (the first one when ``bdf`` is None).

        ``vfio``: True binds the device to vfio-pci and uses MSI-X interrupts (errors if that is
        impossible); False maps sysfs resources and polls; "auto" uses VFIO for a doorbell device
        when the guest has an IOMMU and vfio-pci, else sysfs (with a RuntimeWarning for a doorbell
        device, whose interrupts are then lost). ``poll_interval`` bounds every sleep when there are no
        interrupts. ``format_if_empty``: an all-zero BAR2 is formatted as a region when ``region`` is
        first used.
        """
        if vfio not in ("auto", True, False):
            raise ConfigError(f"vfio must be 'auto', True or False, not {vfio!r}")
        if not (0 < poll_interval <= 60):
            raise ConfigError(f"poll_interval must be in (0, 60] seconds, not {poll_interval!r}")
        info = cls._find(bdf, sysfs)
        use_vfio = bool(vfio)
        reason = ""
        if vfio == "auto":
            use_vfio, reason = _vfio_usable(info, sysfs)
        self = cls()
        self._sysfs = sysfs
        self.info, self.bdf, self.flavour = info, info.bdf, info.flavour
        self.poll_interval = float(poll_interval)
        self._format_if_empty = format_if_empty
        self._closed = False
        try:
            if use_vfio:
                self._open_vfio()
            else:
                self._open_sysfs()
                if info.flavour == "doorbell" and vfio == "auto":
                    warnings.warn(
                        f"ivshmem device {info.bdf}: no interrupts without VFIO ({reason}); "
                        f"waiting falls back to polling every {self.poll_interval * 1000:g} ms",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            if not self.interrupts:
                self._timer_fd = self._make_timer()
            if self.flavour != "plain" and self._bar0:
                _dlib.ivshm_bell_table_set_mmio(self._bells, self._bar0 + _REG_DOORBELL)
        except BaseException:
            self.close()
            raise
        return self

    def _open_sysfs(self) -> None:
        lib, ffi = _cffi()
        devdir = self.info.sysfs_path
        _need_root(f"map the BARs of {self.bdf}")
        cfg = _config_bytes(devdir)
        if len(cfg) >= 6 and not int.from_bytes(cfg[4:6], "little") & _PCI_COMMAND_MEMORY:
            raise DeviceError(
                errno.EIO,
                f"memory decoding is off for {self.bdf} (PCI command register "
                f"{int.from_bytes(cfg[4:6], 'little'):#06x}), so its BARs read as all ones: enable it "
                f"with `echo 1 > {devdir}/enable` (or setpci -s {self.bdf} COMMAND=0x2:0x2), or use "
                "PciDevice.open(vfio=True)",
            )
        if self.info.shm_size <= 0:
            raise DeviceError(errno.ENODEV, f"{self.bdf} has no BAR2 (shared memory)")
        fd0 = _open_resource(os.path.join(devdir, "resource0"))
        try:
            addr = ffi.new("uintptr_t *")
            _check(lib.ivshm_mmio_map(fd0, 0, _BAR0_SIZE, 1, addr), f"map BAR0 of {self.bdf}")
            self._bar0, self._bar0_len = int(addr[0]), _BAR0_SIZE
        finally:
            os.close(fd0)
        self._mem_fd = _open_resource(os.path.join(devdir, "resource2"))
        self._bar2_off, self._bar2_size = 0, self.info.shm_size
        self.id = self.read_register(_REG_IVPOSITION)
        self.vectors = self.info.msix_vectors or 0

    def _open_vfio(self) -> None:
        lib, ffi = _cffi()
        group = PciDevice.bind_vfio(self.bdf, sysfs=self._sysfs)
        v = ffi.new("struct ivshm_vfio *")
        lib.ivshm_vfio_init(v)
        self._vfio = v
        stage = ffi.new("int *")
        rc = lib.ivshm_vfio_open(v, group, self.bdf.encode(), stage)
        if rc < 0:
            raise _vfio_open_error(-rc, int(stage[0]), group, self.bdf, self._sysfs)
        dev = v.device_fd
        before = ffi.new("uint32_t *")
        _check(lib.ivshm_vfio_enable_master(dev, before), f"enable bus mastering on {self.bdf}")
        off, size, flags = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint32_t *")
        # BAR0: registers
        _check(lib.ivshm_vfio_region(dev, lib.IVSHM_VFIO_BAR0_INDEX, off, size, flags), f"BAR0 of {self.bdf}")
        if size[0] < 16:
            raise DeviceError(errno.ENODEV, f"{self.bdf}: BAR0 is {size[0]} bytes, expected {_BAR0_SIZE}")
        self._bar0_off = int(off[0])
        bar0_len = int(min(size[0], _BAR0_SIZE))
        if flags[0] & lib.IVSHM_VFIO_REGION_MMAP:
            addr = ffi.new("uintptr_t *")
            if lib.ivshm_mmio_map(dev, off[0], bar0_len, 1, addr) == 0:
                self._bar0, self._bar0_len = int(addr[0]), bar0_len
        if not self._bar0:
            self._bar0_len = bar0_len  # registers through pread/pwrite on the device fd
        # BAR2: shared memory
        _check(lib.ivshm_vfio_region(dev, lib.IVSHM_VFIO_BAR2_INDEX, off, size, flags), f"BAR2 of {self.bdf}")
        if size[0] == 0 or not flags[0] & lib.IVSHM_VFIO_REGION_MMAP:
            raise DeviceError(errno.ENODEV, f"{self.bdf}: BAR2 (shared memory) cannot be mapped through VFIO")
        self._bar2_off, self._bar2_size = int(off[0]), int(size[0])
        self._mem_fd = os.dup(dev)
        os.set_inheritable(self._mem_fd, False)
        self.id = self.read_register(_REG_IVPOSITION)
        self.uses_vfio = True
        self._gone_fd = _new_eventfd()
        self._start_watch(dev)
        # MSI-X: one eventfd per vector
        count = ffi.new("uint32_t *")
        _check(lib.ivshm_vfio_irq_info(dev, lib.IVSHM_VFIO_MSIX_INDEX, count, flags), f"MSI-X of {self.bdf}")
        n = int(count[0])
        if n > 0:
            fds = ffi.new("int[]", n)
            _check(lib.ivshm_vfio_msix_enable(v, n, fds), f"bind {n} MSI-X vectors of {self.bdf} to eventfds")
            self._efds = [int(fds[i]) for i in range(n)]
            self._ws = WaitSet()
            for i, fd in enumerate(self._efds):
                self._ws.add(fd, i, drain=True)
            self._ws.add(self._gone_fd, _GONE_TAG, drain=False)
            self.interrupts = True
        self.vectors = n

    def _make_timer(self) -> int:
        lib, ffi = _cffi()
        fd = ffi.new("int *")
        us = max(1, int(self.poll_interval * 1e6))
        _check(lib.ivshm_poll_timer_create(us, fd), "create the polling timer")
        return int(fd[0])

    # -- lifetime ------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def _live(self) -> None:
        if self._closed:
            raise ClosedError(f"PciDevice {self.bdf or '?'} is closed")
        if self._gone is not None:
            raise self._gone_error()

    def _gone_error(self) -> DeviceGoneError:
        return DeviceGoneError(
            errno.ENODEV,
            f"ivshmem device {self.bdf} is gone: {self._gone}. Its region and memory are released "
            "(ring calls on them raise ClosedError); close() this PciDevice, wait for the device with "
            f"PciDevice.wait_for({self.bdf!r}, timeout) after the host plugs it back (device_add), "
            "and open it again",
        )

    @property
    def present(self) -> bool:
        """False once the device was removed (hot-unplug). With VFIO the kernel tells us before
        it removes the device; through sysfs this looks at the device's sysfs directory."""
        if self._gone is None and not self._closed and not self.uses_vfio:
            if not os.path.isdir(self.info.sysfs_path):
                self._release_gone("its sysfs directory disappeared (hot-unplug)")
        return self._gone is None

    def check(self) -> None:
        """Raise DeviceGoneError if the device was removed, ClosedError if closed."""
        if not self.present:
            raise self._gone_error()
        self._live()

    def _release_gone(self, why: str) -> None:
        """The device is going away: release the memory and the device so the kernel can finish
        removing it. Eventfds, the epoll set and the timer stay until close() (a thread may be
        sleeping on them)."""
        with self._lock:
            if self._gone is not None or self._closed:
                return
            self._gone = why
            with self._fdk.if_open() as held:  # (a close() meanwhile closes it after the write)
                if held and self._gone_fd >= 0:
                    os.write(self._gone_fd, (1).to_bytes(8, "little"))
            self._tell_channels()
            if self._region is not None:
                self._region.close()      # callers inside finish first; later calls: ClosedError
                self._region = None
            if self._mmap is not None:
                try:
                    self._mmap.close()
                    self._mmap = None
                except BufferError:
                    # views of PciDevice.memory are still held: the kernel waits for them
                    pass
            lib = _lib
            if self._vfio is not None and lib is not None:
                lib.ivshm_vfio_close(self._vfio)
                self._vfio = None
            _dlib.ivshm_bell_table_clear(self._bells)  # no waker may store into BAR0 any more
            if self._bar0 and lib is not None:
                lib.ivshm_mmio_unmap(self._bar0, self._bar0_len)
            self._bar0 = 0
            if self._mem_fd >= 0 and self._mmap is None:
                os.close(self._mem_fd)
                self._mem_fd = -1

    def _register_channel(self, channel: object) -> None:
        """A Channel over this device: told by close() and by a hot-unplug."""
        self._channels.add(channel)
        if self._closed or self._gone is not None:
            # closed or unplugged (in another thread) after the Channel took its vector fd and
            # before it got here: the loop over the channels missed this one, so tell it now
            channel._doorbell_closed()  # type: ignore[attr-defined]

    def _tell_channels(self) -> None:
        for ch in list(self._channels):
            ch._doorbell_closed()

    def _start_watch(self, dev_fd: int) -> None:
        """VFIO: bind the device's request interrupt to an eventfd and release everything on it."""
        lib, ffi = _cffi()
        count, flags = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        if lib.ivshm_vfio_irq_info(dev_fd, _VFIO_PCI_REQ_IRQ_INDEX, count, flags) < 0 or count[0] < 1:
            return  # an old kernel without the request interrupt: removal waits for close()
        self._req_fd = _new_eventfd()
        arg = struct.pack("=IIIIIi", 24, _VFIO_IRQ_SET_DATA_EVENTFD | _VFIO_IRQ_SET_ACTION_TRIGGER,
                          _VFIO_PCI_REQ_IRQ_INDEX, 0, 1, self._req_fd)
        try:
            fcntl.ioctl(dev_fd, _VFIO_DEVICE_SET_IRQS, arg)
        except OSError:
            os.close(self._req_fd)
            self._req_fd = -1
            return
        self._stop_fd = _new_eventfd()
        req, stop = self._req_fd, self._stop_fd

        def watch() -> None:
            with WaitSet() as ws:
                ws.add(req, 0, drain=False)
                ws.add(stop, 1, drain=False)
                while True:
                    tags = {tag for tag, _ in ws.wait(None)}
                    if 1 in tags:
                        return
                    if 0 in tags:
                        self._release_gone("the host removed it (hot-unplug: vfio-pci asked for it back)")
                        return

        self._watcher = threading.Thread(target=watch, name=f"pci-watch-{self.bdf}", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Release everything (interrupts, mappings, fds). Idempotent. The vfio-pci binding stays
        (see :meth:`unbind_vfio`). Refused (BufferError) while views of ``memory`` are held.
        A close() while another thread's close() is under way returns once that one is done
        (it tries again if that one was refused); one run by a signal handler inside this
        thread's own close() returns at once."""
        # One close() releases: the steps below let the GIL go (the watcher's join, the mmap's
        # close) before the device is marked closed, and a second close() that got past a plain
        # look at _closed closed the same fd numbers (and freed the VFIO handle) again.  The
        # others wait for it: returning at once would let a caller go on (check `closed`, unbind
        # the driver) while the device is still open.
        me = threading.get_ident()
        with self._lock:  # (held only for the look: the watcher takes it too, and is joined)
            while self._closing and self._closer != me:
                self._close_done.wait()  # (lets the lock go meanwhile)
            if self._closed or self._closing:
                return
            self._closing, self._closer = True, me
        try:
            self._close_claimed()
        finally:
            with self._lock:
                self._closing, self._closer = False, None
                self._close_done.notify_all()

    def _close_claimed(self) -> None:
        # (an exception before _closed is set released nothing: a later close() tries again)
        if self._watcher is not None and self._watcher is not threading.current_thread():
            os.write(self._stop_fd, (1).to_bytes(8, "little"))
            self._watcher.join()
        # these two refuse (BufferError) while views of them are held: release nothing
        # else then
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self._region is not None:
            self._region.close()
            self._region = None
        self._closed = True
        self._tell_channels()  # before their eventfds are closed
        _dlib.ivshm_bell_table_clear(self._bells)  # before BAR0 is unmapped
        lib = _lib
        if self._ws is not None:
            self._ws.close()  # a wait() asleep in another thread wakes: ClosedError
            self._ws = None
        # not under a register access of another thread (BAR0's mapping, or the VFIO device
        # fd when BAR0 is not mapped): those take the lock, and see the device closed after
        with self._lock:
            if self._vfio is not None and lib is not None:
                lib.ivshm_vfio_close(self._vfio)  # disables MSI-X before closing the device
                self._vfio = None
            if self._bar0 and lib is not None:
                lib.ivshm_mmio_unmap(self._bar0, self._bar0_len)
            self._bar0 = 0
        # closed now, or by the last wait (or Channel sleep) still using them
        fds, self._efds = self._efds + [self._timer_fd, self._gone_fd], []
        self._timer_fd = self._gone_fd = -1
        self._fdk.close_later(fds, final=True)
        if self._mem_fd >= 0:
            os.close(self._mem_fd)
            self._mem_fd = -1
        for name in ("_req_fd", "_stop_fd"):  # the watcher's: it has returned (joined above)
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self._watcher = None
        self.interrupts = False

    def __enter__(self) -> "PciDevice":
        self._live()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed PciDevice {self.bdf}", ResourceWarning, stacklevel=2, source=self)
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else (
            f"id={self.id}, {'vfio' if self.uses_vfio else 'sysfs'}, "
            f"{'msix x%d' % self.vectors if self.interrupts else 'polling'}, shm={self._bar2_size}"
        )
        return f"<PciDevice {self.bdf} {self.flavour} {state}>"

    # -- memory --------------------------------------------------------------------------------
    @property
    def shm_size(self) -> int:
        """BAR2 size in bytes."""
        return self._bar2_size

    @property
    def region(self):
        """BAR2 as a :class:`~pyivshmem.Region` (attached on first use; formatted if all zero and
        ``format_if_empty`` was given to open)."""
        self._live()
        if self._region is None:
            from . import Region

            self._region = Region.from_fd(
                self._mem_fd, size=self._bar2_size, offset=self._bar2_off, format_if_empty=self._format_if_empty
            )
        return self._region

    @property
    def memory(self) -> memoryview:
        """BAR2 as raw bytes (no region format), e.g. for a layout of your own."""
        self._live()
        if self._mmap is None:
            self._mmap = mmap.mmap(self._mem_fd, self._bar2_size, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=self._bar2_off)
        return memoryview(self._mmap)

    # -- registers -----------------------------------------------------------------------------
    def read_register(self, offset: int) -> int:
        """An aligned 32-bit load from BAR0 (IntrMask 0x00, IntrStatus 0x04, IVPosition 0x08)."""
        lib, ffi = _cffi()
        _check_reg(offset)
        out = ffi.new("uint32_t *")
        with self._lock:
            self._live()
            return self._read_register_locked(lib, offset, out)

    def _read_register_locked(self, lib, offset: int, out) -> int:
        if self._bar0:
            _check(lib.ivshm_mmio_read32(self._bar0, self._bar0_len, offset, out), f"read BAR0+{offset:#x}")
        else:
            _check(lib.ivshm_vfio_read32(self._vfio.device_fd, self._bar0_off + offset, out),
                   f"read BAR0+{offset:#x}")
        return int(out[0])

    def write_register(self, offset: int, value: int) -> None:
        """An aligned 32-bit store to BAR0 (after a full memory fence)."""
        lib, _ = _cffi()
        _check_reg(offset)
        if not 0 <= value <= 0xFFFFFFFF:
            raise ConfigError(f"register value must fit in 32 bits, not {value!r}")
        with self._lock:
            self._live()
            if self._bar0:
                _check(lib.ivshm_mmio_write32(self._bar0, self._bar0_len, offset, value),
                       f"write BAR0+{offset:#x}")
            else:
                _check(lib.ivshm_vfio_write32(self._vfio.device_fd, self._bar0_off + offset, value),
                       f"write BAR0+{offset:#x}")

    # -- doorbell provider ---------------------------------------------------------------------
    def notify(self, peer_id: int, vector: int = 0) -> None:
        """Ring ``peer_id``'s ``vector``: one 32-bit store of ``(peer_id << 16) | vector`` to the
        Doorbell register. QEMU silently drops rings for unknown peers or vectors (a guest cannot
        tell). On ivshmem-plain there is nobody to ring and this does nothing."""
        self._live()
        _check_peer_vector(peer_id, vector)
        if self.flavour == "plain":
            return
        self.write_register(_REG_DOORBELL, (peer_id << 16) | vector)

    def notify_target(self, peer_id: int, vector: int) -> Optional[Tuple[int, int, int]]:
        """How C code rings that peer: ``(2, address of the Doorbell register, value)`` for a 32-bit
        volatile store. None on ivshmem-plain, or when BAR0 could not be mapped (use notify())."""
        self._live()
        _check_peer_vector(peer_id, vector)
        if self.flavour == "plain" or not self._bar0:
            return None
        return (2, self._bar0 + _REG_DOORBELL, (peer_id << 16) | vector)

    @property
    def _bell_table(self) -> int:
        """The address of my bell table (csrc/ivshm_doorbell.h), for Channel: the Doorbell
        register (nothing on ivshmem-plain or without a mapped BAR0), cleared by close() and on
        hot-unplug, valid while this object lives."""
        return int(_dffi.cast("uintptr_t", self._bells))

    def _bell_refresh(self) -> None:
        """Nothing to take in: the table has no watch fd."""

    def vector_fd(self, vector: int) -> Optional[int]:
        """The eventfd MSI-X ``vector`` fires on (read 8 bytes to drain it); None without interrupts."""
        self._live()
        if not isinstance(vector, int) or vector < 0:
            raise ConfigError(f"vector must be an int >= 0, not {vector!r}")
        if not self.interrupts:
            return None
        if vector >= len(self._efds):
            raise ConfigError(f"{self.bdf} has {len(self._efds)} MSI-X vectors, no vector {vector}")
        return self._efds[vector]

    def fileno(self) -> int:
        """An fd for select/epoll/asyncio: readable when one of my vectors fired (an epoll fd over
        the eventfds); without interrupts, a timerfd that fires every ``poll_interval``."""
        self._live()
        if self._ws is not None:
            return self._ws.fileno()
        return self._timer_fd

    def wait(self, timeout: Optional[float] = None) -> List[int]:
        """Sleep until one of my vectors fires; the vectors that fired (their eventfds drained).

        Returns [] on timeout. Without interrupts, returns [] after at most ``poll_interval``
        seconds: re-check shared memory and call again.
        """
        self._live()
        if timeout is not None and (timeout != timeout or timeout < 0):
            raise ConfigError(f"timeout must be None or a number >= 0, not {timeout!r}")
        try:
            with self._fdk.hold():  # the eventfds stay open until this wait has left
                return self._wait_held(timeout)
        except ClosedError:
            raise ClosedError(f"PciDevice {self.bdf or '?'} was closed while waiting") from None

    def _wait_held(self, timeout: Optional[float]) -> List[int]:
        ws, timer = self._ws, self._timer_fd
        if ws is None:
            delay = self.poll_interval if timeout is None else min(timeout, self.poll_interval)
            if delay > 0:
                time.sleep(delay)
            self.check()
            _drain(timer)
            return []
        fired = self._drain_vectors()
        if fired:
            return fired
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = ws.wait(left)  # drains the vectors that fired; ClosedError on close()
            if self._gone is not None:
                raise self._gone_error()
            fired = sorted({tag for tag, _ in events if tag != _GONE_TAG})
            if fired:
                return fired
            if deadline is not None and time.monotonic() >= deadline:
                return []

    def _drain_vectors(self) -> List[int]:
        return [i for i, fd in enumerate(self._efds) if _drain(fd)]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _check_reg(offset: int) -> None:
    if not isinstance(offset, int) or offset < 0 or offset % 4 or offset + 4 > _BAR0_SIZE:
        raise ConfigError(f"BAR0 register offset must be a multiple of 4 below {_BAR0_SIZE}, not {offset!r}")


def _check_peer_vector(peer_id: int, vector: int) -> None:
    if not isinstance(peer_id, int) or not 0 <= peer_id <= 0xFFFF:
        raise ConfigError(f"peer id must be in 0..65535, not {peer_id!r}")
    if not isinstance(vector, int) or not 0 <= vector <= 0xFF:
        raise ConfigError(f"vector must be in 0..255 (QEMU keeps 8 bits), not {vector!r}")


def _drain(fd: int) -> int:
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise DeviceError(errno.EACCES, f"cannot {what}: this needs root (run as root or with sudo)")


def _open_resource(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        raise DeviceError(errno.EACCES, f"cannot open {path}: permission denied (needs root)") from None
    except FileNotFoundError:
        raise DeviceError(errno.ENODEV, f"{path} does not exist (BAR missing?)") from None


def _driver_of(devdir: str) -> Optional[str]:
    link = os.path.join(devdir, "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def _iommu_group(devdir: str, bdf: str) -> int:
    link = os.path.join(devdir, "iommu_group")
    if not os.path.islink(link):
        raise DeviceError(
            errno.ENODEV,
            f"no IOMMU: {bdf} has no IOMMU group, so VFIO cannot use it. In QEMU add "
            "`-M q35 -device intel-iommu` (before the ivshmem device) and boot the guest with "
            "`intel_iommu=on`; or open with vfio=False (no interrupts, polling)",
        )
    return int(os.path.basename(os.readlink(link)))


def _vfio_usable(info: PciDeviceInfo, sysfs: str) -> Tuple[bool, str]:
    if info.flavour != "doorbell":
        return False, "ivshmem-plain has no interrupts"
    if info.iommu_group is None:
        return False, "no IOMMU in this guest"
    if os.geteuid() != 0:
        return False, "not root"
    if info.driver == VFIO_DRIVER:
        return True, ""
    if info.driver is not None:
        return False, f"bound to driver {info.driver}"
    if not os.path.isdir(os.path.join(sysfs, "bus", "pci", "drivers", VFIO_DRIVER)):
        _try_modprobe("vfio-pci")
        if not os.path.isdir(os.path.join(sysfs, "bus", "pci", "drivers", VFIO_DRIVER)):
            return False, "vfio-pci is not loaded"
    return True, ""


def _try_modprobe(module: str) -> None:
    import shutil
    import subprocess

    exe = shutil.which("modprobe") or next(
        (p for p in ("/sbin/modprobe", "/usr/sbin/modprobe") if os.access(p, os.X_OK)), None
    )
    if exe and os.geteuid() == 0:
        try:
            subprocess.run([exe, module], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass


def _write_sysfs(path: str, value: str, *, missing_ok: bool = False) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:
        if not missing_ok:
            raise DeviceError(errno.ENOENT, f"cannot write {value.strip()!r} to {path}: no such file") from None
    except PermissionError:
        raise DeviceError(errno.EACCES, f"cannot write to {path}: permission denied (needs root)") from None
    except OSError as e:
        raise DeviceError(e.errno or errno.EIO, f"writing {value.strip()!r} to {path} failed: {e.strerror}") from None


def _group_members(group: int, sysfs: str) -> str:
    d = os.path.join(sysfs, "kernel", "iommu_groups", str(group), "devices")
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return "?"
    parts = []
    for n in names:
        drv = _driver_of(os.path.join(d, n))
        parts.append(f"{n} ({drv or 'no driver'})")
    return ", ".join(parts)


def _vfio_open_error(err: int, stage: int, group: int, bdf: str, sysfs: str) -> DeviceError:
    lib, _ = _cffi()
    names = {
        lib.IVSHM_VFIO_STAGE_CONTAINER: "container",
        lib.IVSHM_VFIO_STAGE_API: "api",
        lib.IVSHM_VFIO_STAGE_TYPE1: "type1",
        lib.IVSHM_VFIO_STAGE_GROUP: "group",
        lib.IVSHM_VFIO_STAGE_GROUP_STATUS: "group_status",
        lib.IVSHM_VFIO_STAGE_VIABLE: "viable",
        lib.IVSHM_VFIO_STAGE_SET_CONTAINER: "set_container",
        lib.IVSHM_VFIO_STAGE_SET_IOMMU: "set_iommu",
        lib.IVSHM_VFIO_STAGE_DEVICE: "device",
    }
    name = names.get(stage, "?")
    what = f"VFIO: cannot {_STAGE_TEXT.get(name, 'open the device')} for {bdf} (group {group})"
    if name == "viable":
        hint = (f"IOMMU group {group} is not viable: every device in it must be bound to vfio-pci or "
                f"to no driver; members: {_group_members(group, sysfs)}")
        return DeviceError(errno.EBUSY, f"{what}: {hint}")
    if name == "container" and err == errno.ENOENT:
        return DeviceError(err, f"{what}: /dev/vfio/vfio is missing; load the vfio modules (modprobe vfio-pci)")
    if name in ("container", "group") and err in (errno.EACCES, errno.EPERM):
        return DeviceError(err, f"{what}: permission denied (needs root, or access to /dev/vfio/{group})")
    if name == "group" and err == errno.EBUSY:
        return DeviceError(err, f"{what}: /dev/vfio/{group} is already open (another process uses the device)")
    if name == "type1":
        return DeviceError(err, f"{what}: the kernel has no type1 IOMMU support (vfio_iommu_type1 not loaded?)")
    if name == "set_iommu":
        return DeviceError(err, f"{what}: {os.strerror(err)} (no usable IOMMU?)")
    return DeviceError(err, f"{what}: {os.strerror(err)}")
