"""The server's shared memory back-ends: a sealed memfd, POSIX shared memory (QEMU's ``-M``), any
file, an unlinked file in a directory (QEMU's ``-m``, e.g. hugetlbfs), or a caller's fd; and
QEMU's size grammar.

The server never maps the memory. It creates or opens it, sizes it (a power of two, as QEMU
requires), invalidates a pyivshmem region an earlier session left in it, seals a memfd against
shrinking, and on close unlinks the ``-M`` name as QEMU's server does.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
import weakref
from typing import Optional, Tuple, Union

from .._size import parse_size
from ..errors import AccessDeniedError, ConfigError, SystemCallError
from ._ffi import lib

__all__ = ["Memory", "parse_qemu_size", "round_up_pow2", "MAX_SIZE", "SHM_DIR"]

log = logging.getLogger("pyivshmem.server")

#: Largest size accepted (the protocol itself has no limit; this only catches typos like "4E").
MAX_SIZE = 1 << 48
SHM_DIR = "/dev/shm"

# csrc/ivshm_layout.h: a formatted region's magic, the magic while a peer formats it, and the
# header's size.
REGION_MAGIC = int(lib.IVSHM_MAGIC)
REGION_FORMATTING = int(lib.IVSHM_MAGIC_FORMATTING)
REGION_HDR_SIZE = int(lib.IVSHM_HDR_SIZE)


def parse_qemu_size(value: Union[int, str]) -> int:
    """A memory size in the one size grammar (:func:`pyivshmem._size.parse_size`, QEMU's ``-l``:
    bytes, or K/M/G/T... powers of 1024, fractions allowed with a suffix, "1.5M"), at most
    MAX_SIZE. The result is NOT rounded; see :func:`round_up_pow2`."""
    size = parse_size(value, "size")
    if size > MAX_SIZE:
        raise ConfigError(f"invalid size {value!r}: larger than {MAX_SIZE >> 40} TiB")
    return size


def round_up_pow2(size: int) -> int:
    """The smallest power of two >= size (QEMU requires a power-of-two BAR2)."""
    return 1 << (size - 1).bit_length() if size > 1 else 1



_PATH_HINTS = {
    errno.ENOENT: "a directory on that path does not exist: create it or choose another path",
    errno.ENOTDIR: "a component of that path is not a directory: choose another path",
    errno.EISDIR: "it is a directory: give the path of a file",
    errno.EROFS: "a read-only file system: choose a writable place",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def path_error(exc: OSError, what: str, path) -> Exception:
    """An OSError about ``path`` turned into a pyivshmem error (still an OSError with the same
    errno) that says what to do."""
    if isinstance(exc, PermissionError):
        return AccessDeniedError(
            exc.errno, f"{what} {path}: permission denied (check its owner and mode, or run "
            "as a user allowed to write there)"
        )
    if exc.errno == errno.ELOOP:
        return ConfigError(f"{what} {path}: it is a symbolic link, which the server never follows")
    hint = _PATH_HINTS.get(exc.errno or 0)
    return SystemCallError(
        exc.errno, f"{what} {path}: {exc.strerror}" + (f" ({hint})" if hint else "")
    )


_locked: "weakref.WeakSet[Memory]" = weakref.WeakSet()


def _drop_inherited_locks() -> None:
    """In a forked child: close the copies of the servers' lock descriptors (the lock stays
    with the parent's; the child's copy would only keep it alive after the parent let go)."""
    for memory in list(_locked):
        if memory.lock_survives_fork:
            continue
        _locked.discard(memory)
        fd, memory._lock_fd = memory._lock_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


os.register_at_fork(after_in_child=_drop_inherited_locks)


def seal(fd: int) -> None:
    """Seal a memfd so that no peer can shrink (or grow) it: a shrunk region would kill every
    other peer with SIGBUS at its next access. F_SEAL_SEAL last, so nobody can lift the rest."""
    import fcntl

    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)


class Memory:
    """One shared memory choice of a server (see :class:`pyivshmem.Server` for the options)."""

    def __init__(
        self,
        *,
        shm_name: Optional[str] = None,
        shm_path: Optional[Union[str, os.PathLike]] = None,
        shm_dir: Optional[Union[str, os.PathLike]] = None,
        shm_fd: Optional[int] = None,
        memfd: bool = False,
        size: Union[int, str],
        mode: int,
        keep_region: bool = False,
        keep_shm: bool = False,
    ):
        chosen = [
            k for k, v in (
                ("shm_name", shm_name), ("shm_path", shm_path), ("shm_dir", shm_dir),
                ("shm_fd", shm_fd),
            ) if v is not None
        ] + (["memfd"] if memfd else [])
        if len(chosen) > 1:
            raise ConfigError(f"choose one kind of shared memory, not {' and '.join(chosen)}")
        self.kind = chosen[0] if chosen else "memfd"
        if shm_name is not None:
            if "/" in shm_name.strip("/") or shm_name.strip("/") in ("", ".", ".."):
                raise ConfigError(
                    f"invalid shared memory name {shm_name!r}: give a plain name such as "
                    "'ivshmem' (it becomes /dev/shm/<name>)"
                )
            shm_name = shm_name.strip("/")
        self._shm_name = shm_name
        self._shm_path = os.fspath(shm_path) if shm_path is not None else None
        self._shm_dir = os.fspath(shm_dir) if shm_dir is not None else None
        self.requested_size = parse_qemu_size(size)
        # The caller's fd is duplicated now, not when the server starts: the caller may close
        # its own at once, and that fd number may then name another file of the process.
        self._shm_fd: Optional[int] = None
        if shm_fd is not None:
            try:
                self._shm_fd = os.dup(shm_fd)
            except (OSError, TypeError) as exc:
                raise SystemCallError(
                    getattr(exc, "errno", None) or errno.EBADF,
                    f"cannot use shm_fd {shm_fd!r}: "
                    f"{getattr(exc, 'strerror', None) or exc} (pass an open file descriptor)",
                ) from exc
            os.set_inheritable(self._shm_fd, False)
        #: the real size once open() ran (a filesystem may have asked for more)
        self.size = round_up_pow2(self.requested_size)
        self._mode = mode
        self._keep_region = bool(keep_region)
        self._keep_shm = bool(keep_shm)
        self._link: Optional[Tuple[str, int, int]] = None   # (path, dev, ino) to unlink
        self._created = False
        self._lock_fd: Optional[int] = None
        #: True in the process that daemonizes: the daemon keeps the lock across its fork.
        #: Any other forked child drops its copy, so that a worker forked while the server
        #: ran never keeps the memory locked after the server closed.
        self.lock_survives_fork = False

    def open(self) -> int:
        """Create or open the memory, size it, prepare it; the fd (close-on-exec) is the
        caller's."""
        kind = self.kind
        flags = os.O_RDWR | os.O_CLOEXEC
        if kind == "memfd":
            fd = os.memfd_create("ivshmem", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            where = "a memfd"
        elif kind == "shm_fd":
            if self._shm_fd is None:
                raise ConfigError("this server's shm_fd was released already")
            fd, self._shm_fd = self._shm_fd, None      # the caller (the server) owns it now
            where = f"the shm_fd given (now fd {fd})"
        elif kind == "shm_dir":
            try:
                fd, tmp = tempfile.mkstemp(prefix="ivshmem.", dir=self._shm_dir)
            except OSError as exc:
                raise path_error(exc, "cannot create a file in directory", self._shm_dir) from exc
            os.unlink(tmp)
            where = f"an unlinked file in {self._shm_dir}"
            if self._mode != 0o600:
                os.fchmod(fd, self._mode)
        else:
            if kind == "shm_name":
                assert self._shm_name is not None
                path = os.path.join(SHM_DIR, self._shm_name)
            else:
                assert self._shm_path is not None
                path = self._shm_path
            try:
                try:
                    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, self._mode)
                    created = True
                except FileExistsError:
                    fd = os.open(path, flags | os.O_NOFOLLOW)
                    created = False
            except OSError as exc:
                raise path_error(exc, "cannot open the shared memory file", path) from exc
            if created:
                os.fchmod(fd, self._mode)       # exactly the mode asked, whatever the umask
            where = path
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise ConfigError(f"{path} is not a regular file; choose another shared memory path")
            self._lock_against_other_servers(fd, path)
            if kind == "shm_name":
                self._link = (path, st.st_dev, st.st_ino)
                self._created = created
        try:
            self._resize(fd, where)
            if not self._keep_region:
                self._invalidate_old_region(fd, where)
            if kind == "memfd":
                seal(fd)
        except BaseException:
            os.close(fd)
            self._unlock()
            raise
        return fd

    def _lock_against_other_servers(self, fd: int, path: str) -> None:
        """Refuse memory another pyivshmem server is serving. Two servers on one memory (every
        server's default -M name is the same) hand out the same peer ids, and the second one
        would resize it and wipe the first one's live region. The lock is taken on an open
        file description of its own, never handed to peers: it goes with this server, even
        while peers of a session that ended still hold the memory's fd."""
        import fcntl

        try:
            lock = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return       # no /proc: no check (as QEMU's server, which makes none)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                # a file system without locks (ENOLCK, EOPNOTSUPP): serve without the check
                log.debug("cannot lock %s (%s): not checking for another server",
                          path, exc.strerror)
                return
            os.close(fd)
            raise ConfigError(
                f"the shared memory {path} is in use by another ivshmem server; stop that "
                "server or choose another shared memory name (-M) or file"
            ) from None
        self._lock_fd = lock
        _locked.add(self)

    def _unlock(self) -> None:
        lock, self._lock_fd = self._lock_fd, None
        if lock is not None:
            os.close(lock)

    def close(self) -> None:
        """Release the copy of a caller's ``shm_fd`` if open() never took it over, and the
        lock that keeps other servers off named memory."""
        fd, self._shm_fd = self._shm_fd, None
        if fd is not None:
            os.close(fd)
        self._unlock()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def unlink(self, failed_start: bool = False) -> None:
        """Unlink the ``-M`` name (QEMU's behaviour) unless kept, only if it still names the
        object opened; after a failed start, only if this server created it."""
        link, self._link = self._link, None
        if link is None or self._keep_shm or (failed_start and not self._created):
            return
        path, dev, ino = link
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)
                log.info("unlinked the shared memory %s", path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not unlink the shared memory %s: %s", path, exc.strerror)

    def _invalidate_old_region(self, fd: int, where: str) -> None:
        """Zero the header of a pyivshmem region left in this memory by an earlier session."""
        head = os.pread(fd, 8, 0)
        if len(head) < 8 or int.from_bytes(head, "little") not in (REGION_MAGIC,
                                                                     REGION_FORMATTING):
            return
        os.pwrite(fd, bytes(REGION_HDR_SIZE), 0)
        log.info("invalidated the pyivshmem region left in %s by an earlier session: peers "
                 "format a fresh one (keep_region=True keeps it)", where)

    def _resize(self, fd: int, where: str) -> None:
        size = self.size
        if os.fstat(fd).st_size == size:
            return
        while True:
            try:
                os.ftruncate(fd, size)
                break
            except OSError as exc:
                # hugetlbfs only takes multiples of its page size: try the next powers of two
                if exc.errno == errno.EINVAL and size < (1 << 30):
                    size <<= 1
                    continue
                raise SystemCallError(
                    exc.errno,
                    f"cannot size the shared memory ({where}) to {self.size} bytes: "
                    f"{os.strerror(exc.errno or 0)}",
                ) from exc
        if size != self.size:
            log.warning("%s only accepted a size of %d bytes (asked %d)", where, size, self.size)
            self.size = size
