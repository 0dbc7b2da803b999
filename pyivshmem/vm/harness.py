"""Boot throw-away QEMU guests that run a Python script against pyivshmem.

Used by ``pyivshmem bench --topology host-guest|guest-guest`` and by the VM tests (tests/vm/harness.py
wraps it and turns "cannot run a VM here" into pytest skips). Not a stable API.

Everything the guest needs is assembled from Debian packages and from the host's own Python, and
cached under ``~/.cache/pyivshmem/vm`` (``PYIVSHMEM_VM_CACHE`` overrides it):

* ``kernel-<version>/``: the kernel of ``linux-image-<version>`` (fetched with ``apt-get download`` and
  unpacked with ``dpkg -x``) and ``base.cpio.gz``: busybox, ``/init``, and the modules VFIO needs
  (dependency order from ``depmod -b``).
* ``python-<key>.cpio.gz``: the host's interpreter, its standard library (no tests, no GUI), every
  shared library ``ldd`` names for it and its extension modules, at the same absolute paths, plus
  cffi's ``_cffi_backend``.

Per boot, two small uncompressed archives are appended: the pyivshmem package as built in place
(compiled extensions included) and the test script. The kernel unpacks concatenated archives in order.

The guest's ``/init`` mounts the usual file systems, loads the modules, runs ``/test/main.py`` with the
copied interpreter and powers off. Results come back over the serial console (QEMU's stdout) as lines
``@@PYIVSHMEM:<tag> <text>``; the guest side helper (``pyivshmem/vm/guest.py``, importable in the guest as
``vmguest``) prints them. Every wait is bounded, QEMU is killed by its own pid, and the serial log is kept
in a file and printed when a test fails.

Accelerator: guests run under KVM when a probe boot under KVM reaches the guest's init within a
few seconds, under software emulation (TCG) otherwise (:func:`choose_accel`; the verdict is made
once per process and printed with its reason). ``/dev/kvm`` being there proves nothing: on some hosts it
opens fine and a guest under KVM never prints its first line, so the probe is a real boot with a
timeout. ``accel="kvm"|"tcg"`` (``Vm``, ``choose_accel``; ``--accel`` of ``pyivshmem bench``) or
``PYIVSHMEM_VM_ACCEL`` forces one.

Environment:
  PYIVSHMEM_VM_CACHE        cache folder (default ~/.cache/pyivshmem/vm)
  PYIVSHMEM_VM_ACCEL        auto (default), kvm or tcg
  PYIVSHMEM_VM_KVM_PROBE_TIMEOUT  seconds the KVM probe boot may take (default 6)
  PYIVSHMEM_VM_CPU          QEMU -cpu model (default: QEMU's own; e.g. host under KVM)
  PYIVSHMEM_VM_KERNEL_PKG   kernel package to use (default: what linux-image-amd64 depends on)
  PYIVSHMEM_REQUIRE_VM=1    tests: turn "cannot run a VM here" skips into failures (set it in CI)
  PYIVSHMEM_VM_KEEP_LOGS=1  print every serial log, not only failing ones
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from ..errors import ConfigError, IvshmemError

MARK = "@@PYIVSHMEM:"
GUEST_HELPER = Path(__file__).resolve().parent / "guest.py"
# modules VFIO needs, by module name; their dependencies are added from modules.dep
VFIO_MODULES = ("irqbypass", "vfio", "vfio_iommu_type1", "vfio_virqfd", "vfio-pci-core", "vfio-pci")
KERNEL_ARGS = "console=ttyS0 quiet loglevel=1 panic=-1 oops=panic intel_iommu=on"
BOOT_TIMEOUT = float(os.environ.get("PYIVSHMEM_VM_BOOT_TIMEOUT", "120"))
KVM_PROBE_TIMEOUT = float(os.environ.get("PYIVSHMEM_VM_KVM_PROBE_TIMEOUT", "6"))
ACCELS = ("auto", "kvm", "tcg")


class VmUnavailable(IvshmemError, RuntimeError):
    """This machine cannot boot test VMs (no QEMU, no kernel package reachable, ...)."""


class VmError(IvshmemError, RuntimeError):
    """A VM did not behave: timeout, crash, unexpected output. The message includes the serial log."""


class VmTimeout(VmError):
    """A wait on a guest's output ran out of time (QEMU was still running)."""


def cache_dir() -> Path:
    d = Path(os.environ.get("PYIVSHMEM_VM_CACHE", Path.home() / ".cache" / "pyivshmem" / "vm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def qemu_binary() -> Optional[str]:
    return shutil.which("qemu-system-x86_64")


def _tool(name: str) -> Optional[str]:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """A lock file, so parallel test processes build a cache entry only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: Sequence[str], *, cwd: Optional[Path] = None, timeout: float = 300) -> str:
    p = subprocess.run(
        list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if p.returncode != 0:
        raise VmUnavailable(f"`{' '.join(cmd)}` failed ({p.returncode}):\n{p.stdout[-2000:]}")
    return p.stdout


# ---------------------------------------------------------------------------------------------
# cpio "newc" archives, written directly (no cpio tool needed; owner root, explicit modes)
# ---------------------------------------------------------------------------------------------
class Cpio:
    def __init__(self, out: io.BufferedIOBase):
        self._out = out
        self._ino = 1
        self._dirs: set = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: Tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08X}"
            for v in (
                self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0,
            )
        )
        self._ino += 1
        self._out.write(hdr.encode() + nb)
        self._out.write(b"\0" * ((4 - (110 + len(nb)) % 4) % 4))
        self._out.write(data)
        self._out.write(b"\0" * ((4 - len(data) % 4) % 4))

    def dir(self, path: str) -> None:
        path = "/" + path.strip("/")
        if path == "/" or path in self._dirs:
            return
        self.dir(os.path.dirname(path))
        self._dirs.add(path)
        self._entry(path, stat.S_IFDIR | 0o755)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(path))
        self._entry(path, stat.S_IFREG | mode, data)

    def copy(self, src: Union[str, Path], dest: Optional[str] = None) -> None:
        """Copy a host file (symlinks followed) to the same or another absolute path."""
        src = str(src)
        with open(src, "rb") as f:
            data = f.read()
        mode = os.stat(src).st_mode & 0o777
        self.file(dest or os.path.abspath(src), data, mode)

    def symlink(self, path: str, target: str) -> None:
        self.dir(os.path.dirname(path))
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.dir(os.path.dirname(path))
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> None:
        self._entry("TRAILER!!!", 0)


def _write_cpio_gz(dest: Path, fill) -> None:
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
        c = Cpio(gz)  # type: ignore[arg-type]
        fill(c)
        c.finish()
    os.replace(tmp, dest)


def _cpio_bytes(fill) -> bytes:
    buf = io.BytesIO()
    c = Cpio(buf)
    fill(c)
    c.finish()
    # pad to 512 bytes so the next concatenated archive starts cleanly
    data = buf.getvalue()
    return data + b"\0" * ((512 - len(data) % 512) % 512)


# ---------------------------------------------------------------------------------------------
# kernel and base initramfs
# ---------------------------------------------------------------------------------------------
def kernel_package() -> str:
    pkg = os.environ.get("PYIVSHMEM_VM_KERNEL_PKG")
    if pkg:
        return pkg
    try:
        out = _run(["apt-cache", "depends", "linux-image-amd64"], timeout=60)
    except (OSError, VmUnavailable) as e:
        cached = sorted(cache_dir().glob("kernel-*/base-*.cpio.gz"))
        if cached:
            return "linux-image-" + cached[-1].parent.name[len("kernel-"):]
        raise VmUnavailable(f"cannot find the Debian kernel package (apt-cache): {e}") from None
    m = re.search(r"Depends:\s*<?(linux-image-[0-9][^\s>]*)", out)
    if not m:
        cached = sorted(cache_dir().glob("kernel-*/base-*.cpio.gz"))
        if cached:
            return "linux-image-" + cached[-1].parent.name[len("kernel-"):]
        raise VmUnavailable(
            "apt-cache does not know linux-image-amd64; run `apt-get update` (Debian/Ubuntu hosts only)"
        )
    return m.group(1)


def _apt_download(pkg: str, where: Path) -> Path:
    try:
        _run(["apt-get", "download", pkg], cwd=where, timeout=600)
    except (OSError, VmUnavailable):
        if os.geteuid() != 0:
            raise
        _run(["apt-get", "update"], timeout=600)
        _run(["apt-get", "download", pkg], cwd=where, timeout=600)
    debs = sorted(where.glob(f"{pkg}_*.deb"))
    if not debs:
        raise VmUnavailable(f"apt-get download {pkg} produced no .deb in {where}")
    return debs[-1]


def _module_order(moddir: Path, wanted: Sequence[str]) -> List[str]:
    """Module files (relative to moddir) in load order: dependencies first."""
    deps: Dict[str, List[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod] = rest.split()

    def name_of(rel: str) -> str:
        base = os.path.basename(rel)
        return re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base).replace("-", "_")

    by_name = {name_of(m): m for m in deps}
    order: List[str] = []

    def visit(rel: str) -> None:
        if rel in order:
            return
        for d in reversed(deps.get(rel, [])):
            visit(d)
        order.append(rel)

    for w in wanted:
        rel = by_name.get(w.replace("-", "_"))
        if rel is None:
            raise VmUnavailable(f"kernel module {w} is not in {moddir}")
        visit(rel)
    return order


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        import lzma

        data = lzma.decompress(data)
    elif path.name.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".zst"):
        raise VmUnavailable(f"{path}: zstd-compressed modules are not supported by the harness")
    return data


INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm
mount -t tmpfs tmpfs /dev/shm
echo 1 > /proc/sys/kernel/printk
while read m; do
  insmod "/lib/modules/pyivshmem/$m" || echo "@@PYIVSHMEM:warn insmod $m failed"
done < /etc/pyivshmem/modules
[ -f /etc/pyivshmem/python.env ] && . /etc/pyivshmem/python.env
[ -f /test/env ] && . /test/env
echo "@@PYIVSHMEM:booted $(uname -r)"
cd /test
# a last bound, so a guest whose host went away still powers off (and its QEMU ends)
if [ -f /test/main.py ] && [ -n "$PYIVSHMEM_PYTHON" ]; then
  timeout -s KILL "${PYIVSHMEM_GUEST_TIMEOUT:-900}" "$PYIVSHMEM_PYTHON" -u /test/main.py
  rc=$?
elif [ -f /test/main.sh ]; then
  sh /test/main.sh
  rc=$?
else
  echo "@@PYIVSHMEM:warn nothing to run"
  rc=127
fi
echo "@@PYIVSHMEM:exit $rc"
sync
poweroff -f
"""


@dataclass
class Kernel:
    version: str
    vmlinuz: Path
    base: Path  # base.cpio.gz


def ensure_kernel() -> Kernel:
    pkg = kernel_package()
    version = pkg[len("linux-image-"):]
    kdir = cache_dir() / f"kernel-{version}"
    key = hashlib.sha256((INIT_SCRIPT + "|".join(VFIO_MODULES)).encode()).hexdigest()[:12]
    vmlinuz, base = kdir / "vmlinuz", kdir / f"base-{key}.cpio.gz"
    if vmlinuz.exists() and base.exists():
        return Kernel(version, vmlinuz, base)
    with _locked(cache_dir() / f"kernel-{version}.lock"):
        if vmlinuz.exists() and base.exists():
            return Kernel(version, vmlinuz, base)
        if not _tool("depmod"):
            raise VmUnavailable("depmod not found: install kmod (apt-get install kmod)")
        kdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            t = Path(tmp)
            deb = _apt_download(pkg, t)
            root = t / "root"
            _run(["dpkg", "-x", str(deb), str(root)])
            moddir = root / "lib" / "modules" / version
            if not moddir.exists():  # merged-/usr layouts
                moddir = root / "usr" / "lib" / "modules" / version
                (root / "lib" / "modules").mkdir(parents=True, exist_ok=True)
                os.symlink(moddir, root / "lib" / "modules" / version)
            _run([_tool("depmod") or "depmod", "-b", str(root), version])
            order = _module_order(moddir, VFIO_MODULES)
            bb = _static_busybox(t)

            def fill(c: Cpio) -> None:
                for d in ("/bin", "/sbin", "/usr/bin", "/usr/sbin", "/proc", "/sys", "/dev", "/tmp",
                          "/run", "/root", "/etc/pyivshmem", "/lib/modules/pyivshmem"):
                    c.dir(d)
                c.chardev("/dev/console", 5, 1)
                c.chardev("/dev/null", 1, 3, 0o666)
                c.copy(bb, "/bin/busybox")
                c.file("/init", INIT_SCRIPT.encode(), 0o755)
                names = []
                for rel in order:
                    data = _module_bytes(moddir / rel)
                    name = re.sub(r"\.(xz|gz)$", "", os.path.basename(rel))
                    c.file(f"/lib/modules/pyivshmem/{name}", data)
                    names.append(name)
                c.file("/etc/pyivshmem/modules", ("\n".join(names) + "\n").encode())

            _write_cpio_gz(base, fill)
            for old in kdir.glob("base*.cpio.gz"):
                if old != base:
                    old.unlink()
            vm_src = root / "boot" / f"vmlinuz-{version}"
            shutil.copyfile(vm_src, vmlinuz.with_name("vmlinuz.tmp"))
            os.replace(vmlinuz.with_name("vmlinuz.tmp"), vmlinuz)
    return Kernel(version, vmlinuz, base)


def _is_static(path: str) -> bool:
    try:
        p = subprocess.run(["ldd", path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError:
        return False
    return "not a dynamic executable" in p.stdout or "statically linked" in p.stdout


def _static_busybox(work: Path) -> str:
    for cand in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if cand and os.path.exists(cand) and _is_static(cand):
            return cand
    deb = _apt_download("busybox-static", work)
    _run(["dpkg", "-x", str(deb), str(work / "bb")])
    for cand in (work / "bb" / "bin" / "busybox", work / "bb" / "usr" / "bin" / "busybox"):
        if cand.exists():
            return str(cand)
    raise VmUnavailable("no static busybox (apt-get install busybox-static)")


# ---------------------------------------------------------------------------------------------
# the host's Python, for the guest
# ---------------------------------------------------------------------------------------------
_STDLIB_SKIP_DIRS = {
    "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
    "site-packages", "dist-packages", "__phello__", "pydoc_data",
}


def _ldd(paths: Iterable[str]) -> List[str]:
    libs: List[str] = []
    for p in paths:
        out = subprocess.run(["ldd", p], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
        for line in out.splitlines():
            m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s*\(", line)
            if m and m.group(1) not in libs:
                libs.append(m.group(1))
    return libs


def _python_files() -> Tuple[str, Dict[str, str], List[str]]:
    """(interpreter path, {guest path: host path}, library dirs)."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    files: Dict[str, str] = {exe: exe}
    stdlib = sysconfig.get_paths()["stdlib"]
    # a venv's stdlib path is the base interpreter's; resolve symlinks for the guest
    stdlib = os.path.realpath(stdlib)
    dynload = os.path.join(stdlib, "lib-dynload")
    tag = sys.implementation.cache_tag
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        is_cache = os.path.basename(dirpath) == "__pycache__"
        for fn in filenames:
            if is_cache:
                if not fn.endswith(f".{tag}.pyc"):  # no .opt-1/.opt-2 copies
                    continue
            elif not (fn.endswith(".py") or fn.endswith(".so")):
                continue
            if dirpath == dynload and (fn.startswith("_tkinter") or fn.startswith("_test")
                                       or fn.startswith("xxlimited")):
                continue
            full = os.path.join(dirpath, fn)
            files[full] = full
    sos = [f for f in files if f.endswith(".so")]
    import _cffi_backend  # noqa: F401  (pyivshmem's cffi modules need it in the guest)

    cffi_so = os.path.realpath(_cffi_backend.__file__)
    files["/opt/pyivshmem/site/" + os.path.basename(cffi_so)] = cffi_so
    libdirs: List[str] = []
    for lib in _ldd([exe, cffi_so] + sos):
        files[lib] = lib
        d = os.path.dirname(lib)
        if d not in libdirs:
            libdirs.append(d)
    interp = _elf_interp(exe)
    if interp:
        files[interp] = os.path.realpath(interp)
    return exe, files, libdirs


def _elf_interp(path: str) -> Optional[str]:
    out = subprocess.run(["ldd", path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    for line in out.splitlines():
        m = re.match(r"\s*(/\S*ld-linux\S*)\s", line)
        if m:
            return m.group(1)
    return None


def python_key() -> str:
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    import _cffi_backend

    parts = [f"{sys.version}|{HARNESS_FORMAT}"]
    for f in (exe, os.path.realpath(_cffi_backend.__file__)):
        st = os.stat(f)
        parts.append(f"{f}|{st.st_size}|{st.st_mtime_ns}")
    raw = "|".join(parts)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


HARNESS_FORMAT = 1  # bump when the layout of the cached archives changes


def ensure_python() -> Path:
    dest = cache_dir() / f"python-{python_key()}.cpio.gz"
    if dest.exists():
        return dest
    with _locked(cache_dir() / "python.lock"):
        if dest.exists():
            return dest
        exe, files, libdirs = _python_files()
        env = (
            f"export PYIVSHMEM_PYTHON={shlex.quote(exe)}\n"
            f"export LD_LIBRARY_PATH={shlex.quote(':'.join(libdirs))}\n"
            "export PYTHONPATH=/test:/opt/pyivshmem/pkg:/opt/pyivshmem/site\n"
            "export PYTHONDONTWRITEBYTECODE=1\n"
            "export PYTHONHASHSEED=0\n"
            "export HOME=/root\n"
        )

        def fill(c: Cpio) -> None:
            for guest, host in sorted(files.items()):
                try:
                    c.copy(host, guest)
                except OSError:
                    continue
            c.file("/etc/pyivshmem/python.env", env.encode())

        _write_cpio_gz(dest, fill)
    return dest


# ---------------------------------------------------------------------------------------------
# per-boot archives: the package under test and the test script
# ---------------------------------------------------------------------------------------------
def package_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pyivshmem")  # does not import it
    if spec is None or not spec.origin:
        raise VmUnavailable("pyivshmem is not importable from this process (set PYTHONPATH)")
    return Path(spec.origin).resolve().parent


def package_cpio(pkg: Optional[Path] = None) -> bytes:
    pkg = pkg or package_dir()

    def fill(c: Cpio) -> None:
        for dirpath, dirnames, filenames in os.walk(pkg):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for fn in filenames:
                if fn.endswith((".py", ".so", ".pyi", ".typed")):
                    full = os.path.join(dirpath, fn)
                    rel = os.path.relpath(full, pkg.parent)
                    c.copy(full, "/opt/pyivshmem/pkg/" + rel)

    return _cpio_bytes(fill)


def script_cpio(script: str, files: Optional[Dict[str, Union[str, bytes]]] = None,
              env: Optional[Dict[str, str]] = None, *, shell: bool = False) -> bytes:
    """The test's archive: ``script`` as /test/main.py (or /test/main.sh with ``shell``, which
    the guest runs with busybox when it has no Python)."""
    def fill(c: Cpio) -> None:
        if shell:
            c.file("/test/main.sh", script.encode(), 0o755)
        else:
            c.file("/test/main.py", script.encode())
            c.copy(GUEST_HELPER, "/test/vmguest.py")
        for name, data in (files or {}).items():
            c.file("/test/" + name, data.encode() if isinstance(data, str) else data)
        if env:
            c.file("/test/env", "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()).encode())

    return _cpio_bytes(fill)


@dataclass
class Image:
    kernel: Kernel
    python: Path


_image: Optional[Image] = None
_image_lock = threading.Lock()


def ensure_image() -> Image:
    """Build (or find in the cache) everything a VM needs. Raises VmUnavailable."""
    global _image
    with _image_lock:
        if _image is None:
            if not qemu_binary():
                raise VmUnavailable("qemu-system-x86_64 not found (apt-get install qemu-system-x86 "
                                    "busybox-static cpio kmod)")
            _image = Image(ensure_kernel(), ensure_python())
        return _image


# ---------------------------------------------------------------------------------------------
# QEMU device arguments
# ---------------------------------------------------------------------------------------------
def ivshmem_plain(mem_path: Union[str, Path], size: Union[int, str], *, ident: str = "hm",
                  extra: str = "") -> List[str]:
    return [
        "-object", f"memory-backend-file,size={size},share=on,mem-path={mem_path},id={ident}",
        "-device", f"ivshmem-plain,memdev={ident}{extra}",
    ]


def ivshmem_doorbell(socket_path: Union[str, Path], *, vectors: int = 1, ident: str = "ivs",
                     extra: str = "") -> List[str]:
    return [
        "-chardev", f"socket,path={socket_path},id={ident}",
        "-device", f"ivshmem-doorbell,vectors={vectors},chardev={ident}{extra}",
    ]


# ---------------------------------------------------------------------------------------------
# one running guest
# ---------------------------------------------------------------------------------------------
@dataclass
class Message:
    tag: str
    text: str

    def json(self):
        return json.loads(self.text)


class Vm:
    """A QEMU guest running ``script`` (Python source) inside, as ``/test/main.py``.

    ``devices`` are QEMU arguments (see ivshmem_plain / ivshmem_doorbell). ``iommu`` adds an emulated
    intel-iommu before them (needed for VFIO). ``accel``: "kvm", "tcg", or None/"auto" for
    :func:`choose_accel`'s verdict (``PYIVSHMEM_VM_ACCEL`` when None). ``python=False`` boots
    without the Python archive and the package: ``script`` is then a busybox shell script. Use as a context
    manager: leaving kills QEMU if still running and removes the per-boot initrd.
    """

    def __init__(self, script: str, devices: Sequence[str] = (), *, workdir: Union[str, Path],
                 name: str = "vm", iommu: bool = True, memory: int = 1024, smp: int = 1,
                 files: Optional[Dict[str, Union[str, bytes]]] = None,
                 env: Optional[Dict[str, str]] = None, image: Optional[Image] = None,
                 kernel_args: str = "", guest_timeout: float = 900, accel: Optional[str] = None,
                 python: bool = True, qmp: bool = False, extra_args: Sequence[str] = ()):
        self.image = image or ensure_image()
        if accel in ("kvm", "tcg"):
            self.accel = accel
        else:
            self.accel = choose_accel(accel, image=self.image, report=_report_once).accel
        self._python = python
        self.name = f"{name}-{uuid.uuid4().hex[:6]}"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.serial.log"
        self.initrd = self.workdir / f"{self.name}.initrd"
        # the guest kills its own script after guest_timeout seconds and powers off, so even a
        # QEMU orphaned by a crashed test process ends
        env = {"PYIVSHMEM_GUEST_TIMEOUT": str(int(guest_timeout)), **(env or {})}
        self._script, self._files, self._env = script, files, env
        self._devices = list(devices)
        self._iommu, self._memory, self._smp, self._kargs = iommu, memory, smp, kernel_args
        #: QMP monitor socket (``qmp=True``); talk to it with :meth:`qmp`
        self.qmp_path: Optional[Path] = self.workdir / f"{self.name}.qmp" if qmp else None
        self._qmp: Optional["Qmp"] = None
        self._extra = list(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader: Optional[threading.Thread] = None
        self._logf = None
        self.started_at = 0.0

    # -- lifecycle -----------------------------------------------------------------------------
    def command(self) -> List[str]:
        machine = "q35"
        if self.accel == "kvm" and self._iommu:
            # intel-iommu under KVM wants the IOAPIC in QEMU (its interrupt remapping cannot work
            # with the whole irqchip in the kernel)
            machine += ",kernel-irqchip=split"
        cmd = [
            qemu_binary() or "qemu-system-x86_64", "-accel", self.accel, "-M", machine, "-m",
            str(self._memory), "-smp", str(self._smp), "-nographic", "-no-reboot", "-net", "none",
            "-vga", "none",
        ]
        cpu = os.environ.get("PYIVSHMEM_VM_CPU")
        if cpu:
            cmd += ["-cpu", cpu]
        if self._iommu:
            cmd += ["-device", "intel-iommu"]
        cmd += self._devices
        if self.qmp_path is not None:
            cmd += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        cmd += self._extra
        args = KERNEL_ARGS + (" " + self._kargs if self._kargs else "")
        cmd += ["-kernel", str(self.image.kernel.vmlinuz), "-initrd", str(self.initrd), "-append", args]
        return cmd

    def start(self) -> "Vm":
        parts = [self.image.kernel.base] + ([self.image.python] if self._python else [])
        with open(self.initrd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
                # the kernel accepts an uncompressed archive only at a 4-byte aligned offset of the
                # whole initrd, and skips zeros between archives
                out.write(b"\0" * ((512 - out.tell() % 512) % 512))
            if self._python:
                out.write(package_cpio())
            out.write(script_cpio(self._script, self._files, self._env, shell=not self._python))
        self._logf = open(self.log_path, "w", encoding="utf-8", errors="replace")
        self._logf.write("# " + " ".join(shlex.quote(a) for a in self.command()) + "\n")
        self._logf.flush()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"serial-{self.name}", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        proc = self.proc
        if proc is None or proc.stdout is None:
            return
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
            with self._cond:
                self.lines.append(line)
                if self._logf:
                    self._logf.write(line + "\n")
                    self._logf.flush()
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def kill(self) -> None:
        """Kill QEMU (by its own pid) if it is still running, and reap it."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=30)
        if self._reader:
            self._reader.join(timeout=10)
        if p.stdout:
            p.stdout.close()

    def qmp(self, command: str, timeout: float = 30, **arguments):
        """Run a QMP command on this guest's monitor (``qmp=True``); its ``return`` value."""
        if self.qmp_path is None:
            raise VmError(f"{self.name}: started without qmp=True")
        if self._qmp is None:
            self._qmp = Qmp(self.qmp_path, timeout=timeout)
        return self._qmp.execute(command, timeout=timeout, **arguments)

    def qmp_event(self, name: str, timeout: float = 30) -> Dict:
        """Wait for the QMP event ``name`` (events seen earlier count too, each once)."""
        if self._qmp is None:
            self.qmp("query-status")
        assert self._qmp is not None
        return self._qmp.event(name, timeout)

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        self.kill()
        if self._logf:
            self._logf.close()
            self._logf = None
        with contextlib.suppress(FileNotFoundError):
            self.initrd.unlink()

    def __enter__(self) -> "Vm":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, et, ev, tb) -> None:
        self.close()
        # a VmError already carries the log
        if (et is not None and not issubclass(et, VmError)) or os.environ.get("PYIVSHMEM_VM_KEEP_LOGS") == "1":
            sys.stderr.write(self.log_text())

    # -- output --------------------------------------------------------------------------------
    def log_text(self) -> str:
        with self._cond:
            body = "\n".join(self.lines)
        return f"\n===== serial log of {self.name} ({self.log_path}) =====\n{body}\n===== end of {self.name} =====\n"

    def messages(self) -> List[Message]:
        out = []
        with self._cond:
            lines = list(self.lines)
        for line in lines:
            i = line.find(MARK)
            if i >= 0:
                tag, _, text = line[i + len(MARK):].partition(" ")
                out.append(Message(tag, text))
        return out

    def fail(self, why: str, cls: type = VmError) -> "VmError":
        return cls(f"{self.name}: {why}\n{self.log_text()}")

    def wait_for(self, tag: str, timeout: float, *, after: int = 0) -> Message:
        """The first message with ``tag`` (the ``after``-th and later); raises VmError on timeout,
        when the guest exits first, or when it reports an error."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                seen = 0
                for msg in self._parse_locked():
                    if msg.tag == tag:
                        if seen >= after:
                            return msg
                        seen += 1
                    elif msg.tag == "error" and tag != "error":
                        raise self.fail(f"guest reported an error while waiting for {tag!r}:\n{msg.text}")
                    elif msg.tag == "exit" and tag != "exit":
                        raise self.fail(f"guest exited ({msg.text}) before {tag!r}")
                if self._eof:
                    raise self.fail(f"QEMU ended before {tag!r} (exit code {self.proc and self.proc.poll()})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self.fail(f"no {tag!r} within {timeout:.0f}s", VmTimeout)
                self._cond.wait(min(left, 1.0))

    def _parse_locked(self) -> List[Message]:
        out = []
        for line in self.lines:
            i = line.find(MARK)
            if i >= 0:
                tag, _, text = line[i + len(MARK):].partition(" ")
                out.append(Message(tag, text))
        return out

    def result(self, timeout: float) -> Dict:
        """Wait for the guest script to finish successfully; its ``result`` message as a dict."""
        ex = self.wait_for("exit", timeout)
        res = [m for m in self.messages() if m.tag == "result"]
        if ex.text.strip() != "0":
            raise self.fail(f"guest script exited with status {ex.text.strip()}")
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        if not res:
            return {}
        return res[-1].json()

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU itself to end; its exit code."""
        if self.proc is None:
            raise VmError(f"{self.name}: not started")
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self.fail(f"QEMU still running after {timeout:.0f}s") from None


class Qmp:
    """A minimal synchronous QMP client (QEMU's JSON monitor) over a unix socket."""

    def __init__(self, path: Union[str, Path], timeout: float = 30):
        import socket

        deadline = time.monotonic() + timeout
        while True:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self._sock.close()
                if time.monotonic() > deadline:
                    raise VmError(f"no QMP monitor at {path} within {timeout:.0f}s") from None
                time.sleep(0.05)
        self._buf = b""
        self.events: List[Dict] = []
        self._read(time.monotonic() + timeout)            # the greeting
        self.execute("qmp_capabilities", timeout=timeout)

    def _read(self, deadline: float) -> Dict:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VmTimeout("QMP: no answer in time")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except OSError as e:
                raise VmError(f"QMP: {e}") from None
            if not chunk:
                raise VmError("QMP: QEMU closed the monitor")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def execute(self, command: str, timeout: float = 30, **arguments):
        msg: Dict = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise VmError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def event(self, name: str, timeout: float = 30) -> Dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") == name:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


# ---------------------------------------------------------------------------------------------
# KVM or TCG
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AccelChoice:
    """Which accelerator guests run under, and why."""

    accel: str       # "kvm" or "tcg"
    reason: str
    requested: str   # "auto", "kvm" or "tcg"

    def describe(self) -> str:
        what = "KVM" if self.accel == "kvm" else "TCG (software emulation)"
        return f"QEMU guests run under {what}: {self.reason}"


Probe = Callable[..., Tuple[bool, str]]

_kvm_verdict: Optional[Tuple[bool, str]] = None
_kvm_lock = threading.Lock()
_reported: set = set()


def kvm_device_problem(path: str = "/dev/kvm") -> Optional[str]:
    """Why KVM cannot even be tried here, or None (the device opens: that proves nothing more)."""
    if not os.path.exists(path):
        return f"{path} does not exist (no KVM on this host, or the kvm module is not loaded)"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{path} cannot be opened ({e.strerror}): add this user to its group (usually kvm)"
    os.close(fd)
    return None


def probe_kvm(image: Optional[Image] = None,
              timeout: float = KVM_PROBE_TIMEOUT) -> Tuple[bool, str]:
    """Boot a minimal guest (no Python) under KVM: (True, how long it took to reach its init) or
    (False, why not). QEMU is killed when its guest has not reached init within ``timeout``."""
    problem = kvm_device_problem()
    if problem:
        return False, problem
    image = image or ensure_image()
    with tempfile.TemporaryDirectory(prefix="pyivshmem-kvm-probe-") as tmp:
        # the machine the guests get (q35, intel-iommu), without Python or the package
        vm = Vm("echo probe\n", workdir=tmp, name="kvm-probe", iommu=True, memory=256,
                image=image, accel="kvm", python=False, guest_timeout=30)
        t0 = time.monotonic()
        try:
            vm.start()
            vm.wait_for("booted", timeout)
            return True, (f"a probe boot under KVM reached the guest's init in "
                          f"{time.monotonic() - t0:.1f} s")
        except VmTimeout:
            return False, (f"a probe boot under KVM did not reach the guest's init within "
                           f"{timeout:g} s (QEMU killed); guests hang under KVM on this host")
        except VmError:
            with vm._cond:
                lines = [ln.strip() for ln in vm.lines if ln.strip()]
            last = lines[-1] if lines else "no output"
            return False, f"QEMU could not boot a guest under KVM: {last[:200]}"
        except OSError as e:
            return False, f"QEMU could not be started for the KVM probe: {e}"
        finally:
            vm.close()


def kvm_verdict(*, image: Optional[Image] = None, probe: Optional[Probe] = None,
                timeout: Optional[float] = None) -> Tuple[bool, str]:
    """The probe's verdict, made once per process (later calls return the first answer)."""
    global _kvm_verdict
    with _kvm_lock:
        if _kvm_verdict is None:
            _kvm_verdict = (probe or probe_kvm)(
                image=image, timeout=KVM_PROBE_TIMEOUT if timeout is None else timeout)
        return _kvm_verdict


def choose_accel(requested: Optional[str] = None, *, image: Optional[Image] = None,
                 probe: Optional[Probe] = None, timeout: Optional[float] = None,
                 report: Optional[Callable[[str], None]] = None) -> AccelChoice:
    """KVM when a probe boot under KVM succeeds within ``timeout`` seconds, TCG otherwise.

    ``requested`` "kvm" or "tcg" forces one (no probe; "kvm" still needs a usable /dev/kvm, else
    VmUnavailable); None means ``PYIVSHMEM_VM_ACCEL``, then "auto". ``report`` gets the choice
    and its reason as one line.
    """
    req = (requested or os.environ.get("PYIVSHMEM_VM_ACCEL") or "auto").strip().lower()
    if req not in ACCELS:
        raise ConfigError(f"accelerator {req!r}: use one of {', '.join(ACCELS)}")
    if req == "tcg":
        choice = AccelChoice("tcg", "asked for (accel tcg), KVM not probed", req)
    elif req == "kvm":
        problem = kvm_device_problem()
        if problem:
            raise VmUnavailable(f"KVM was asked for, but {problem}")
        choice = AccelChoice("kvm", "asked for (accel kvm), not probed", req)
    else:
        ok, why = kvm_verdict(image=image, probe=probe, timeout=timeout)
        choice = AccelChoice("kvm" if ok else "tcg", why, req)
    if report is not None:
        report(choice.describe())
    return choice


def _report_once(text: str) -> None:
    if text not in _reported:
        _reported.add(text)
        sys.stderr.write(f"pyivshmem VM harness: {text}\n")
        sys.stderr.flush()


def unique_shm(prefix: str = "pyivshmem-vmtest") -> Path:
    return Path("/dev/shm") / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m pyivshmem.vm build|smoke|probe`: build the cache (and boot a trivial guest once,
    or only say which accelerator guests would run under, and why)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pyivshmem.vm")
    ap.add_argument("command", choices=["build", "smoke", "probe"])
    ap.add_argument("--accel", choices=ACCELS, default=None,
                    help="auto (probe KVM, default), kvm or tcg")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    img = ensure_image()
    print(f"image ready in {time.monotonic() - t0:.1f}s: kernel {img.kernel.version}, {img.python}")
    if a.command == "probe":
        print(choose_accel(a.accel, image=img).describe())
    if a.command == "smoke":
        choice = choose_accel(a.accel, image=img)
        print(choice.describe())
        with tempfile.TemporaryDirectory() as tmp:
            script = "import vmguest, sys\nvmguest.result(python=sys.version)\n"
            with Vm(script, workdir=tmp, iommu=False, accel=choice.accel) as vm:
                print(vm.result(timeout=120))
        print(f"total {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
