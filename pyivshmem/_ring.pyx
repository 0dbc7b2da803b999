# cython: language_level=3, boundscheck=False, cdivision=True
"""The hot path: regions and rings over the C core (csrc/), with no Python work per message beyond
the call itself.  Everything here maps 1:1 onto csrc/ivshm_*.h; errors go through
pyivshmem.errors.error_from_code, the one place that turns C error codes into exceptions.
"""
import os as _os
import stat as _stat
import warnings as _warnings

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBuffer_FillInfo, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_CheckExact
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_Append
from libc.errno cimport errno
from cpython.object cimport PyObject

cdef extern from "<errno.h>":
    enum:
        EAGAIN
        EPROTO
        EMSGSIZE
        ENOENT
        EEXIST
        ENOSPC
        ETIMEDOUT
        EBADMSG
        ENOEXEC
        ESTALE
        EINTR_ "EINTR"
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, strlen
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from posix.unistd cimport write as _c_write, close as _c_close
from posix.time cimport clock_gettime, CLOCK_MONOTONIC, timespec, nanosleep

from pyivshmem._core cimport *

cdef extern from "ivshm_atomic.h" nogil:
    void IVSHM_CPU_RELAX()

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

from pyivshmem.errors import (
    error_from_code as _error_from_code,
    ClosedError, ConfigError, CorruptionError, MessageTooLargeError, RegionFormatError,
    StallError, WaitTimeout,
)

__all__ = ["Region", "SpscRing", "MpmcRing", "Channel", "parse_size"]

cdef extern from "Python.h":
    int PySequence_Fast_GET_SIZE(object o)
    void *PySequence_Fast_ITEMS(object o)

_KINDS = {"spsc": IVSHM_KIND_SPSC, "mpmc": IVSHM_KIND_MPMC}
_KIND_NAMES = {IVSHM_KIND_SPSC: "spsc", IVSHM_KIND_MPMC: "mpmc"}
_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

#: Default busy-spin budget of blocking calls before they start sleeping, in seconds.
DEFAULT_SPIN = 50e-6
cdef int _LOCK_WAIT_MS = 2000
cdef int _FORMAT_WAIT_MS = 2000
cdef Py_ssize_t _BATCH = 256
# Batches publish (and release) once, except after messages this large, where letting the other
# side work on each message at once overlaps the two copies.
cdef uint64_t _OVERLAP_BYTES = 16384
# Copies of more than this many bytes release the GIL (and count as users of the mapping).
cdef uint64_t _NOGIL_BYTES = 65536


def parse_size(size):
    """Bytes from an int or a string such as "4096", "64K", "16M", "1G" (powers of 1024)."""
    if isinstance(size, bool):
        raise ConfigError(f"size must be an int or a string like '16M', not {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ConfigError(f"size must be positive, got {size}")
        return size
    if not isinstance(size, str):
        raise ConfigError(f"size must be an int or a string like '16M', not {type(size).__name__}")
    s = size.strip().upper()
    if s.endswith("IB"):
        s = s[:-2]
    elif s.endswith("B"):
        s = s[:-1]
    mult = 1
    if s and s[-1] in _SUFFIX:
        mult = _SUFFIX[s[-1]]
        s = s[:-1]
    try:
        n = int(s.strip())
    except ValueError:
        raise ConfigError(f"cannot parse size {size!r}: use bytes or a K/M/G suffix, e.g. '16M'") from None
    if n <= 0:
        raise ConfigError(f"size must be positive, got {size!r}")
    return n * mult


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline void _sleep_ns(long ns) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = ns // 1000000000
    ts.tv_nsec = ns % 1000000000
    nanosleep(&ts, NULL)


cdef class _Waiter:
    """Spin, then sleep with exponential back-off (1 us .. 1 ms), GIL released while asleep,
    Ctrl-C honoured.  Used by the rings' blocking calls; Channel replaces sleeping by doorbells."""
    cdef double deadline
    cdef double spin_until
    cdef long sleep_ns
    cdef bint forever

    def __cinit__(self, timeout, double spin):
        cdef double now = _now()
        self.forever = timeout is None
        if not self.forever:
            if timeout < 0:
                raise ConfigError(f"timeout must be >= 0 or None, got {timeout}")
            self.deadline = now + <double>timeout
        self.spin_until = now + spin
        self.sleep_ns = 1000

    cdef int pause(self) except -1:
        """Return 1 to try again, 0 when the deadline passed."""
        cdef double now = _now()
        if not self.forever and now >= self.deadline:
            return 0
        if now < self.spin_until:
            return 1
        with nogil:
            _sleep_ns(self.sleep_ns)
        if self.sleep_ns < 1000000:
            self.sleep_ns *= 2
        PyErr_CheckSignals()
        return 1


cdef object _ring_error(int rc, context, const char *why, name):
    """The exception for error code rc about ring `name`; a CorruptionError carries the name."""
    err = _error_from_code(rc, context, why.decode() if why != NULL else None)
    if isinstance(err, CorruptionError):
        err.ring = name
    return err


cdef object _detail(const char *why, uint64_t a, uint64_t b):
    if why == NULL:
        return None
    return f"{why.decode()} (values {a}, {b})"


cdef class _Mapping:
    """The mapping of one Region, owned jointly by the region, its rings, its channels and every
    call or zero-copy view in flight.

    ``closed`` is set by Region.close(); every call checks it first, with the GIL held.  ``users``
    counts the calls that touch the memory with the GIL released (or across Python code that could
    switch threads) and the live buffer exports of zero-copy views: Region.close() unmaps at once
    when there are none, otherwise the last user to leave unmaps.  So memory is never unmapped under
    a caller, and calls that start after close() raise ClosedError.  ``closed_fd`` is an eventfd
    that close() makes readable for good (nobody drains it): a sleeper in this process polls it
    beside its doorbell and leaves with ClosedError.  It is closed only when this object dies.
    All fields are used with the GIL held.
    """
    cdef uint8_t *base
    cdef uint64_t size
    cdef bint closed
    cdef Py_ssize_t users
    cdef int closed_fd

    def __cinit__(self):
        self.base = NULL
        self.size = 0
        self.closed = False
        self.users = 0
        self.closed_fd = -1

    cdef inline void enter(self):
        self.users += 1

    cdef inline void leave(self):
        self.users -= 1
        if self.closed and self.users == 0:
            self._unmap()

    cdef void _unmap(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL
        # Nobody polls closed_fd any more: a sleeper holds a user count while it waits, and
        # every later call checks `closed` before it waits.  So it goes with the memory, and a
        # closed region holds no descriptor however long its objects live.
        if self.closed_fd >= 0:
            _c_close(self.closed_fd)
            self.closed_fd = -1

    cdef void _close(self):
        """Mark closed, wake sleepers, unmap unless users are inside (then the last one does)."""
        cdef uint64_t one = 1
        if self.closed:
            return
        self.closed = True
        if self.closed_fd >= 0:
            _c_write(self.closed_fd, &one, 8)
        if self.users == 0:
            self._unmap()

    def __dealloc__(self):
        self._unmap()
        if self.closed_fd >= 0:
            _c_close(self.closed_fd)
            self.closed_fd = -1


cdef class _SlotView:
    """Buffer over one slot's payload; each export counts as a user of the mapping, so the memory
    outlives it even across Region.close()."""
    cdef _Mapping m
    cdef char *ptr
    cdef Py_ssize_t n
    cdef bint readonly

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if self.m.closed:
            raise ClosedError("the region behind this view is closed")
        PyBuffer_FillInfo(buf, self, self.ptr, self.n, self.readonly, flags)
        self.m.enter()

    def __releasebuffer__(self, Py_buffer *buf):
        self.m.leave()


cdef _release_view(view):
    """Invalidate a zero-copy view at commit/release (further access raises ValueError)."""
    if view is not None:
        try:
            view.release()
        except BufferError:
            pass  # the caller holds sub-views; they stay readable until dropped


cdef memoryview _make_view(_Mapping m, void *ptr, Py_ssize_t n, bint readonly):
    cdef _SlotView v = _SlotView.__new__(_SlotView)
    v.m = m
    v.ptr = <char *>ptr
    v.n = n
    v.readonly = readonly
    return memoryview(v)


cdef class Region:
    """A shared-memory region: a header, a directory of named rings, the rings.

    Make one with :meth:`create`, :meth:`open` or :meth:`from_fd`.  The size is a power of two
    (QEMU requires it of ivshmem memory).  Closing it, from any thread, makes every later call on
    it and on its rings raise ClosedError; the memory is unmapped once no call is inside it and no
    zero-copy view of it is exported.  A context manager.
    """
    cdef ivshm_region _r
    cdef _Mapping _m
    cdef uint64_t _size
    cdef int _fd
    cdef object _path

    def __cinit__(self):
        self._fd = -1

    # -- construction -------------------------------------------------------------------------
    @staticmethod
    def _check_size(uint64_t size, what):
        if ivshm_region_size_ok(size) != 0:
            raise ConfigError(
                f"{what} is {size} bytes: a region must be a power of two of at least "
                f"{IVSHM_MIN_REGION_SIZE} bytes (QEMU requires a power of two); e.g. 64K, 16M, 1G")

    @classmethod
    def create(cls, path, size, *, exist_ok=False, mode=0o600):
        """Create a new region file at ``path`` (e.g. /dev/shm/name or a hugetlbfs file) of ``size``
        bytes (int or "64K"/"16M"/"1G") and format it.  Existing files are refused unless
        ``exist_ok``, in which case the region there is opened (its size must match)."""
        cdef uint64_t n = parse_size(size)
        Region._check_size(n, "the requested size")
        path = _os.fspath(path)
        flags = _os.O_RDWR | _os.O_CREAT | _os.O_EXCL | _os.O_NOFOLLOW | _os.O_CLOEXEC
        try:
            fd = _os.open(path, flags, mode)
        except FileExistsError:
            if not exist_ok:
                raise FileExistsError(
                    f"region file {path} already exists: use Region.open({path!r}) to attach to it, "
                    f"or exist_ok=True") from None
            region = cls.open(path, format_if_empty=True)
            if region.size != n:
                region.close()
                raise ConfigError(f"region file {path} exists with size {region.size}, not {n}")
            return region
        except PermissionError as e:
            raise PermissionError(e.errno, f"cannot create region file {path}: permission denied") from None
        try:
            try:
                _os.ftruncate(fd, n)
            except OSError as e:
                raise OSError(e.errno, f"cannot size region file {path} to {n} bytes: {e.strerror} "
                              "(on hugetlbfs the size must be a multiple of the huge page size)") from None
            region = cls._map(fd, n, 0, path, IVSHM_ATTACH_FORMAT)
        except BaseException:
            _os.close(fd)
            try:
                _os.unlink(path)
            except OSError:
                pass
            raise
        return region

    @classmethod
    def open(cls, path, *, format_if_empty=False):
        """Attach to the region in an existing file (its size is the file's size).  An all-zero
        file is formatted when ``format_if_empty`` (safe when several processes race)."""
        path = _os.fspath(path)
        try:
            fd = _os.open(path, _os.O_RDWR | _os.O_CLOEXEC)
        except FileNotFoundError:
            raise FileNotFoundError(2, f"no region file at {path}: create it with Region.create(path, size)") from None
        except PermissionError:
            raise PermissionError(13, f"cannot open region file {path}: permission denied") from None
        try:
            st = _os.fstat(fd)
            if not (_stat.S_ISREG(st.st_mode)):
                raise ConfigError(f"{path} is not a regular file")
            Region._check_size(st.st_size, f"file {path}")
            return cls._map(fd, st.st_size, 0, path,
                            IVSHM_ATTACH_FORMAT_IF_EMPTY if format_if_empty else 0)
        except BaseException:
            _os.close(fd)
            raise

    @classmethod
    def from_fd(cls, int fd, *, size=None, offset=0, format_if_empty=True):
        """Attach to memory behind a file descriptor (a memfd, the server's memory fd, a VFIO
        device fd with ``offset``).  ``fd`` is duplicated; the caller keeps its own."""
        if size is None:
            st = _os.fstat(fd)
            size = st.st_size
        cdef uint64_t n = parse_size(size)
        Region._check_size(n, f"the memory behind fd {fd}")
        dup = _os.dup(fd)
        _os.set_inheritable(dup, False)
        try:
            return cls._map(dup, n, offset, None,
                            IVSHM_ATTACH_FORMAT_IF_EMPTY if format_if_empty else 0)
        except BaseException:
            _os.close(dup)
            raise

    @classmethod
    def _map(cls, int fd, uint64_t size, offset, path, unsigned flags):
        cdef Region self = cls.__new__(cls)
        cdef _Mapping m = _Mapping.__new__(_Mapping)
        m.closed_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if m.closed_fd < 0:
            e = errno
            raise OSError(e, f"cannot make an eventfd for the region: {_os.strerror(e)}")
        cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, <long>offset)
        if p == MAP_FAILED:
            e = errno
            raise OSError(e, f"cannot map {size} bytes of {path or 'fd %d' % fd}: {_os.strerror(e)}")
        cdef uint64_t gen = int.from_bytes(_os.urandom(8), "little") | 1
        cdef int rc
        with nogil:
            rc = ivshm_region_attach(&self._r, p, size, flags, gen, _FORMAT_WAIT_MS)
        if rc != 0:
            munmap(p, size)
            where = path or f"fd {fd}"
            if rc == -EBADMSG:
                raise RegionFormatError(
                    f"{where} is not a pyivshmem region (bad magic); create it with Region.create, "
                    "or pass format_if_empty=True for fresh all-zero memory")
            if rc == -ENOEXEC:
                raise RegionFormatError(f"{where} uses an unsupported layout version "
                                        f"(this pyivshmem reads version {IVSHM_LAYOUT_VERSION})")
            if rc == -EPROTO:
                raise RegionFormatError(f"{where}: region header is inconsistent (size or fields "
                                        "do not match the mapping)")
            if rc == -ETIMEDOUT:
                raise WaitTimeout(f"{where}: another process started formatting the region and did not finish")
            raise _error_from_code(rc, f"attach to {where}")
        m.base = <uint8_t *>p
        m.size = size
        self._m = m
        self._size = size
        self._fd = fd
        self._path = path
        return self

    # -- lifetime -----------------------------------------------------------------------------
    def close(self):
        """Close the region, from any thread; idempotent, never raises.  Calls that start later,
        on the region or its rings, raise ClosedError, and so do blocked sleepers of this process.
        The memory is unmapped now, or, while calls are inside it with the GIL released or
        zero-copy buffers are exported, when the last of them leaves."""
        cdef _Mapping m = self._m
        if m is None or m.closed:
            return
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                _os.close(fd)
            except OSError:
                pass
        m._close()

    def __dealloc__(self):
        # the mapping is unmapped by _Mapping itself when its last holder goes
        if self._fd >= 0:
            _c_close(self._fd)
            self._fd = -1

    def __del__(self):
        if self._m is not None and not self._m.closed:
            _warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self.close()

    def __enter__(self):
        self._ensure_open()
        return self

    def __exit__(self, *exc):
        self.close()

    cdef inline int _ensure_open(self) except -1:
        if self._m is None or self._m.closed:
            raise ClosedError("the region is closed")
        return 0

    def __repr__(self):
        state = "closed" if self._m is None or self._m.closed else f"size={self._size}"
        return f"<pyivshmem.Region {self._path or 'fd'} {state}>"

    # -- properties ---------------------------------------------------------------------------
    @property
    def closed(self):
        return self._m is None or self._m.closed

    @property
    def size(self):
        return self._size

    @property
    def path(self):
        return self._path

    @property
    def address(self):
        """Base address of the mapping in this process (for C code sharing the mapping)."""
        self._ensure_open()
        return <size_t>self._m.base

    @property
    def generation(self):
        """Generation seen at attach: a new random value on every (re)format."""
        return self._r.generation

    def fileno(self):
        self._ensure_open()
        return self._fd

    def check(self):
        """Raise StaleRegionError if the region was re-formatted since this side attached."""
        self._ensure_open()
        rc = ivshm_region_check(&self._r)
        if rc != 0:
            raise _error_from_code(rc, "region check",
                                   "the region was re-formatted (generation changed); re-open it"
                                   if rc == -ESTALE else "the region header's magic is gone")

    # -- rings ------------------------------------------------------------------------------
    def create_ring(self, name, kind="spsc", *, slot_size=256, capacity=1024, exist_ok=True):
        """Create a ring of ``capacity`` slots (a power of two) carrying messages of up to
        ``slot_size`` bytes, or open it if it exists with the same shape (``exist_ok``).  Safe when
        several processes do it at once."""
        self._ensure_open()
        if kind not in _KINDS:
            raise ConfigError(f"unknown ring kind {kind!r}: use 'spsc' or 'mpmc'")
        try:
            slot_size = parse_size(slot_size)
        except ConfigError as e:
            raise ConfigError(f"slot size of ring {name!r}: {e}") from None
        bname = _ring_name(name)
        cdef ivshm_ring_info info
        cdef const char *why = NULL
        cdef uint64_t token = int.from_bytes(_os.urandom(8), "little") | 1
        cdef int rc
        cdef const char *cname = bname
        cdef uint32_t k = _KINDS[kind]
        if slot_size > 0xFFFFFFFF or capacity > 0xFFFFFFFF or capacity < 0:
            raise ConfigError(f"slot_size {slot_size} or capacity {capacity} out of range")
        cdef uint32_t ss = slot_size
        cdef uint32_t cap = capacity
        cdef _Mapping m = self._m
        m.enter()
        try:
            with nogil:
                rc = ivshm_region_create_ring(&self._r, cname, k, ss, cap, token, _LOCK_WAIT_MS,
                                              &info, &why)
        finally:
            m.leave()
        self._ensure_open()
        if rc == 1 and not exist_ok:
            raise FileExistsError(f"a ring named {name!r} already exists in this region")
        if rc < 0:
            detail = why.decode() if why != NULL else None
            if rc == -EEXIST:
                raise ConfigError(f"ring {name!r} exists as {_KIND_NAMES.get(info.kind, '?')} with "
                                  f"slot_size={info.slot_size}, capacity={info.capacity}; asked for "
                                  f"{kind} with slot_size={slot_size}, capacity={capacity}")
            if rc == -ENOSPC:
                need = ivshm_ring_bytes(k, ss, cap)
                raise ConfigError(f"cannot create ring {name!r}: {detail}; it needs {need} bytes "
                                  f"and the region has {self._size} in all: use a larger region or "
                                  "a smaller ring")
            raise _ring_error(rc, f"create ring {name!r}", why, name)
        return self._attach(&info)

    def ring(self, name):
        """Open an existing ring by name (KeyError if there is none)."""
        self._ensure_open()
        bname = _ring_name(name)
        cdef ivshm_ring_info info
        cdef const char *why = NULL
        cdef int rc = ivshm_region_find_ring(&self._r, bname, &info, &why)
        if rc == -ENOENT:
            known = [r["name"] for r in self.rings()]
            raise KeyError(f"no ring named {name!r} in this region (rings: {known})")
        if rc < 0:
            raise _ring_error(rc, f"open ring {name!r}", why, name)
        return self._attach(&info)

    cdef object _attach(self, ivshm_ring_info *info):
        cls = SpscRing if info.kind == IVSHM_KIND_SPSC else MpmcRing
        cdef _Ring ring
        cdef _Mapping m = self._m
        m.enter()  # _init reads the control block after Python allocations
        try:
            ring = cls.__new__(cls)
            ring._init(self, info)
        finally:
            m.leave()
        return ring

    def rings(self):
        """The rings in this region: name, kind, capacity, slot_size, offset, size, count (messages
        waiting), producers_waiting, consumers_waiting.  Corrupt entries are listed with an error."""
        self._ensure_open()
        out = []
        cdef ivshm_ring_info info
        cdef const char *why = NULL
        cdef ivshm_ring_ctrl *c
        cdef uint64_t h, t
        cdef _Mapping m = self._m
        m.enter()  # Python code runs between the reads below: a thread switch could close us
        try:
            self._list_rings(out)
        finally:
            m.leave()
        return out

    cdef _list_rings(self, list out):
        cdef ivshm_ring_info info
        cdef const char *why = NULL
        cdef ivshm_ring_ctrl *c
        cdef uint64_t h, t
        for i in range(IVSHM_MAX_RINGS):
            why = NULL
            rc = ivshm_region_ring_at(&self._r, i, &info, &why)
            if rc == -ENOENT:
                continue
            if rc < 0:
                out.append({"index": i, "error": why.decode() if why != NULL else str(rc)})
                continue
            c = <ivshm_ring_ctrl *>(self._m.base + info.offset)
            h = c.head
            t = c.tail
            out.append({
                "index": i,
                "name": info.name.decode("utf-8", "replace"),
                "kind": _KIND_NAMES[info.kind],
                "capacity": info.capacity,
                "slot_size": info.slot_size,
                "offset": info.offset,
                "size": info.size,
                "head": h,
                "tail": t,
                "count": (h - t) if h - t <= info.capacity else None,
                "producers_waiting": c.prod_waiting,
                "consumers_waiting": c.cons_waiting,
            })

    def info(self):
        """The region header as a dict."""
        self._ensure_open()
        cdef ivshm_region_hdr *h = <ivshm_region_hdr *>self._m.base
        # copies first: no Python code (and so no thread switch) between the reads
        cdef uint32_t version = h.version, nrings = h.nrings
        cdef uint64_t gen = h.generation, alloc = h.alloc_off, lock = h.lock
        return {"size": self._size, "version": version, "generation": gen,
                "rings": nrings, "allocated": alloc, "free": self._size - alloc
                if alloc <= self._size else 0, "directory_locked": lock != 0}


def _ring_name(name):
    if not isinstance(name, str):
        raise ConfigError(f"ring names are str, not {type(name).__name__}")
    b = name.encode("utf-8")
    if not 0 < len(b) < IVSHM_NAME_MAX:
        raise ConfigError(f"ring name {name!r} must be 1 to {IVSHM_NAME_MAX - 1} bytes of UTF-8")
    if b"\0" in b:
        raise ConfigError("ring names cannot contain NUL")
    return b


cdef class _Ring:
    """Common part of SpscRing and MpmcRing."""
    cdef Region _region
    cdef _Mapping _m
    cdef bint _closed
    cdef ivshm_ring_info _info
    cdef object _name
    cdef public double spin
    cdef object _wview         # producer: the open reservation's memoryview, or None
    cdef Py_ssize_t _wview_len # its reserved bytes, or -1
    cdef object _rview         # consumer: the peeked message's memoryview, or None
    cdef ivshm_ring_ctrl *_ctrl

    cdef _init(self, Region region, ivshm_ring_info *info):
        self._region = region
        self._m = region._m
        self._info = info[0]
        self._ctrl = <ivshm_ring_ctrl *>(region._m.base + info.offset)
        self._name = info.name.decode("utf-8", "replace")
        self.spin = DEFAULT_SPIN
        self._wview = None
        self._wview_len = -1
        self._rview = None

    def __init__(self, *a, **k):
        raise TypeError("rings are made by Region.create_ring() or Region.ring()")

    cdef inline int _check(self) except -1:
        if self._closed:
            raise ClosedError(f"ring {self._name!r}: this handle is closed")
        if self._m.closed:
            raise ClosedError(f"ring {self._name!r}: its region is closed")
        return 0

    @property
    def name(self):
        return self._name

    @property
    def capacity(self):
        return self._info.capacity

    @property
    def slot_size(self):
        return self._info.slot_size

    @property
    def region(self):
        return self._region

    @property
    def closed(self):
        return self._closed or self._m is None or self._m.closed

    def close(self):
        """Drop this handle (the ring stays in the region).  Idempotent."""
        self._drop_wview()
        self._drop_rview()
        self._closed = True

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<pyivshmem.{type(self).__name__} {self._name!r} capacity={self.capacity} slot_size={self.slot_size}>"

    cdef _drop_wview(self):
        _release_view(self._wview)
        self._wview = None
        self._wview_len = -1

    cdef _drop_rview(self):
        _release_view(self._rview)
        self._rview = None

    cdef object _corrupt(self, int rc, const char *why, uint64_t a, uint64_t b, what):
        err = _error_from_code(rc, f"{what} on ring {self._name!r}", _detail(why, a, b))
        if isinstance(err, CorruptionError):
            err.ring = self._name
        return err

    # subclass hooks ---------------------------------------------------------------------------
    cdef int _send_ptr(self, const char *p, uint64_t n) except -2:
        raise NotImplementedError

    cdef object _recv_obj(self):
        raise NotImplementedError

    cdef int _send_obj(self, data) except -2:
        """0 sent, -1 full."""
        cdef Py_buffer buf
        cdef int rc
        if PyBytes_CheckExact(data):
            return self._send_ptr(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
        try:
            rc = self._send_ptr(<const char *>buf.buf, buf.len)
        finally:
            PyBuffer_Release(&buf)
        return rc

    # public, common ---------------------------------------------------------------------------
    def try_send(self, data):
        """Send one message if there is room: True if sent, False if the ring is full."""
        return self._send_obj(data) == 0

    def try_recv(self):
        """The next message as bytes, or None if the ring is empty."""
        return self._recv_obj()

    def send(self, data, timeout=None):
        """Send, waiting up to ``timeout`` seconds (None: forever) for room; WaitTimeout if the
        ring stays full.  Waits by spinning for ``self.spin`` seconds, then sleeping briefly."""
        if timeout is not None and timeout < 0:
            raise ConfigError(f"timeout must be >= 0 or None, got {timeout}")
        if self._send_obj(data) == 0:
            return
        cdef _Waiter w = _Waiter(timeout, self.spin)
        while w.pause():
            if self._send_obj(data) == 0:
                return
        raise WaitTimeout(f"send on ring {self._name!r}: still full after {timeout} s "
                          f"({len(self)} of {self.capacity} slots in use); is the consumer running?")

    def recv(self, timeout=None):
        """Receive, waiting up to ``timeout`` seconds (None: forever); WaitTimeout if none came."""
        if timeout is not None and timeout < 0:
            raise ConfigError(f"timeout must be >= 0 or None, got {timeout}")
        msg = self._recv_obj()
        if msg is not None:
            return msg
        cdef _Waiter w = _Waiter(timeout, self.spin)
        while w.pause():
            msg = self._recv_obj()
            if msg is not None:
                return msg
        self._timeout_error(timeout)

    cdef _timeout_error(self, timeout):
        raise WaitTimeout(f"recv on ring {self._name!r}: nothing arrived within {timeout} s")


cdef class SpscRing(_Ring):
    """Single-producer single-consumer ring.  Exactly one process (or thread) sends and one
    receives.  Messages longer than ``slot_size`` are split over consecutive slots automatically
    (up to ``capacity * slot_size`` bytes) and arrive whole."""
    cdef ivshm_spsc _q
    cdef uint32_t _peeked_slots  # slots of the message peek() validated, consumed by release()
    cdef const char **_ptrs
    cdef uint64_t *_lens

    cdef _init(self, Region region, ivshm_ring_info *info):
        _Ring._init(self, region, info)
        cdef const char *why = NULL
        rc = ivshm_spsc_attach(&self._q, &region._r, info, &why)
        if rc != 0:
            raise _ring_error(rc, f"open ring {self._name!r}", why, self._name)
        self._ptrs = <const char **>malloc(_BATCH * sizeof(char *))
        self._lens = <uint64_t *>malloc(_BATCH * sizeof(uint64_t))
        if self._ptrs == NULL or self._lens == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self._ptrs)
        free(self._lens)

    @property
    def kind(self):
        return "spsc"

    @property
    def max_message(self):
        """Largest message this ring carries (it is split over up to ``capacity`` slots)."""
        return <uint64_t>self._info.capacity * self._info.slot_size

    def __len__(self):
        self._check()
        return ivshm_spsc_count(&self._q)

    cdef int _send_ptr(self, const char *p, uint64_t n) except -2:
        self._check()
        cdef int rc
        cdef _Mapping mp
        if n <= _NOGIL_BYTES:
            rc = ivshm_spsc_try_send(&self._q, p, n)
        else:
            mp = self._m
            mp.enter()
            try:
                with nogil:
                    rc = ivshm_spsc_try_send(&self._q, p, n)
            finally:
                mp.leave()
        if rc == 0:
            return 0
        if rc == -EAGAIN:
            return -1
        if rc == -EMSGSIZE:
            raise MessageTooLargeError(
                f"message of {n} bytes does not fit ring {self._name!r}: at most "
                f"{self.max_message} bytes ({self.capacity} slots of {self.slot_size})")
        raise self._corrupt(rc, self._q.why, self._q.why_a, self._q.why_b, "send")

    cdef object _recv_obj(self):
        self._check()
        cdef ivshm_spsc_msg m
        cdef char *dst
        cdef int rc = ivshm_spsc_next(&self._q, &m)
        if rc != 0:
            if rc == -EAGAIN:
                return None
            raise self._corrupt(rc, self._q.why, self._q.why_a, self._q.why_b, "recv")
        cdef object out
        cdef _Mapping mp
        if m.nslots == 1 and m.len <= _NOGIL_BYTES:
            out = PyBytes_FromStringAndSize(<const char *>m.data, m.len)
        else:
            mp = self._m
            mp.enter()
            try:
                out = PyBytes_FromStringAndSize(NULL, m.len)
                dst = PyBytes_AS_STRING(out)
                with nogil:
                    ivshm_spsc_copy(&self._q, &m, dst)
                    ivshm_spsc_advance(&self._q, &m)
                    ivshm_spsc_release(&self._q)
            finally:
                mp.leave()
            return out
        ivshm_spsc_advance(&self._q, &m)
        ivshm_spsc_release(&self._q)
        return out

    def send_many(self, messages, timeout=0.0):
        """Send messages from the front of ``messages`` (a list or tuple; other iterables are
        materialised first) with one publish per batch.  With ``timeout=0`` (default) it stops when
        the ring is full; otherwise it waits up to ``timeout`` seconds (None: forever) for room.
        Returns how many were sent: the rest are ``messages[n:]``."""
        self._check()
        seq = messages if type(messages) is list or type(messages) is tuple else list(messages)
        cdef Py_ssize_t total = len(seq), sent = 0
        cdef _Waiter w = None
        while True:
            sent += self._send_batch(seq, sent, total)
            if sent >= total or timeout == 0:
                return sent
            if w is None:
                w = _Waiter(timeout, self.spin)
            if not w.pause():
                return sent

    cdef Py_ssize_t _send_batch(self, seq, Py_ssize_t start, Py_ssize_t total) except -1:
        cdef Py_ssize_t i, k, n, done = 0
        cdef int rc = 0
        cdef object item
        cdef PyObject **items = <PyObject **>PySequence_Fast_ITEMS(seq)
        cdef _Mapping mp = self._m
        while start + done < total:
            self._check()  # the GIL may have been released: the region may have been closed
            n = total - start - done
            if n > _BATCH:
                n = _BATCH
            # gather pointers with the GIL (bytes fast path; other buffers are converted)
            for k in range(n):
                item = <object>items[start + done + k]
                if not PyBytes_CheckExact(item):
                    return done + self._send_slow(seq, start + done, start + done + n)
                self._ptrs[k] = PyBytes_AS_STRING(item)
                self._lens[k] = PyBytes_GET_SIZE(item)
            # copy and publish without it
            mp.enter()
            try:
                with nogil:
                    k = 0
                    while k < n:
                        rc = ivshm_spsc_write(&self._q, self._ptrs[k], self._lens[k])
                        if rc != 0:
                            break
                        if self._lens[k] >= _OVERLAP_BYTES:
                            ivshm_spsc_publish(&self._q)  # large: let the consumer start on it now
                        k += 1
                    ivshm_spsc_publish(&self._q)
            finally:
                mp.leave()
            done += k
            if rc == -EAGAIN:
                return done
            if rc != 0:
                self._send_error(rc, start + done)
        return done

    cdef Py_ssize_t _send_slow(self, seq, Py_ssize_t start, Py_ssize_t end) except -1:
        cdef Py_ssize_t i
        for i in range(start, end):
            if self._send_obj(seq[i]) != 0:
                return i - start
        return end - start

    cdef _send_error(self, int rc, Py_ssize_t index):
        if rc == -EMSGSIZE:
            raise MessageTooLargeError(
                f"message {index} does not fit ring {self._name!r} (at most {self.max_message} "
                f"bytes); the {index} before it were sent")
        raise self._corrupt(rc, self._q.why, self._q.why_a, self._q.why_b, "send_many")

    def recv_many(self, Py_ssize_t max_count=_BATCH, timeout=0.0):
        """Up to ``max_count`` messages that are already there, as a list (one release for all).
        With ``timeout`` > 0 or None, waits that long for the first one."""
        self._check()
        cdef list out = []
        cdef ivshm_spsc_msg m
        cdef int rc = 0
        cdef Py_ssize_t got = 0
        cdef _Waiter w = None
        cdef object b
        cdef char *dst
        cdef _Mapping mp = self._m
        while True:
            self._check()
            mp.enter()
            try:
                while got < max_count and not mp.closed:
                    rc = ivshm_spsc_next(&self._q, &m)
                    if rc != 0:
                        break
                    if m.nslots == 1 and m.len <= _NOGIL_BYTES:
                        b = PyBytes_FromStringAndSize(<const char *>m.data, m.len)
                    else:
                        b = PyBytes_FromStringAndSize(NULL, m.len)
                        dst = PyBytes_AS_STRING(b)
                        with nogil:
                            ivshm_spsc_copy(&self._q, &m, dst)
                    PyList_Append(out, b)
                    ivshm_spsc_advance(&self._q, &m)
                    if m.len >= _OVERLAP_BYTES:
                        ivshm_spsc_release(&self._q)  # large: hand the slots back to the producer now
                    got += 1
                ivshm_spsc_release(&self._q)
            finally:
                mp.leave()
            if rc != 0 and rc != -EAGAIN and got == 0:
                raise self._corrupt(rc, self._q.why, self._q.why_a, self._q.why_b, "recv_many")
            if got or timeout == 0 or max_count <= 0:
                return out
            if w is None:
                w = _Waiter(timeout, self.spin)
            if not w.pause():
                return out

    def recv_into(self, buffer):
        """Receive the next message into a writable buffer: its length, or None if the ring is
        empty.  MessageTooLargeError if the buffer is too small (the message stays queued)."""
        self._check()
        cdef Py_buffer buf
        cdef ivshm_spsc_msg m
        cdef int rc
        cdef _Mapping mp = self._m
        PyObject_GetBuffer(buffer, &buf, PyBUF_SIMPLE | 0x0001)  # PyBUF_WRITABLE
        try:
            self._check()  # getting the buffer may have run Python code
            mp.enter()
            try:
                rc = ivshm_spsc_next(&self._q, &m)
                if rc == -EAGAIN:
                    return None
                if rc != 0:
                    raise self._corrupt(rc, self._q.why, self._q.why_a, self._q.why_b, "recv_into")
                if <uint64_t>buf.len < m.len:
                    raise MessageTooLargeError(
                        f"the next message on ring {self._name!r} is {m.len} bytes; the buffer "
                        f"holds {buf.len}: pass a larger buffer (it stays queued)")
                with nogil:
                    ivshm_spsc_copy(&self._q, &m, buf.buf)
                    ivshm_spsc_advance(&self._q, &m)
                    ivshm_spsc_release(&self._q)
            finally:
                mp.leave()
        finally:
            PyBuffer_Release(&buf)
        return m.len

    # zero copy -------------------------------------------------------------------------------
    def reserve(self, Py_ssize_t size):
        """A writable memoryview of ``size`` bytes inside the next free slot, or None if the ring
        is full.  Fill it, then :meth:`commit`; the view is invalid afterwards."""
        self._check()
        if self._wview_len >= 0:
            raise ConfigError(f"ring {self._name!r}: a reservation is already open; commit() it first")
        if size < 0:
            raise ConfigError("size must be >= 0")
        cdef uint8_t *p = NULL
        cdef int rc = ivshm_spsc_reserve(&self._q, size, &p)
        if rc == -EAGAIN:
            return None
        if rc == -EMSGSIZE:
            raise MessageTooLargeError(f"reserve({size}) on ring {self._name!r}: zero-copy messages "
                                       f"are at most one slot ({self.slot_size} bytes)")
        if rc != 0:
            raise self._corrupt(rc, self._q.why, self._q.why_a, self._q.why_b, "reserve")
        self._wview = _make_view(self._m, p, size, False)
        self._wview_len = size
        return self._wview

    def commit(self, size=None):
        """Publish the reserved slot with ``size`` bytes (default: all that was reserved)."""
        self._check()
        if self._wview_len < 0:
            raise ConfigError(f"ring {self._name!r}: commit() without reserve()")
        cdef Py_ssize_t n = self._wview_len if size is None else size
        if n < 0 or n > self._wview_len:
            raise ConfigError(f"commit({size}): between 0 and the {self._wview_len} bytes reserved")
        self._drop_wview()
        ivshm_spsc_commit(&self._q, <uint32_t>n)

    def peek(self):
        """A read-only memoryview of the next message without consuming it, or None if the ring
        is empty.  Call :meth:`release` when done; the view is invalid afterwards."""
        self._check()
        if self._rview is not None:
            raise ConfigError(f"ring {self._name!r}: a peeked message is still held; release() it first")
        cdef ivshm_spsc_msg m
        cdef int rc = ivshm_spsc_next(&self._q, &m)
        if rc == -EAGAIN:
            return None
        if rc != 0:
            raise self._corrupt(rc, self._q.why, self._q.why_a, self._q.why_b, "peek")
        if m.nslots != 1:
            raise MessageTooLargeError(f"the next message on ring {self._name!r} spans {m.nslots} "
                                       "slots and cannot be viewed in place: use recv()")
        self._rview = _make_view(self._m, <void *>m.data, m.len, True)
        self._peeked_slots = m.nslots
        return self._rview

    def release(self):
        """Consume the peeked message."""
        self._check()
        if self._rview is None:
            raise ConfigError(f"ring {self._name!r}: release() without peek()")
        self._drop_rview()
        # the slots peek() validated, not a second look at shared memory a peer may have changed
        cdef ivshm_spsc_msg m
        m.nslots = self._peeked_slots
        ivshm_spsc_advance(&self._q, &m)
        ivshm_spsc_release(&self._q)


cdef class MpmcRing(_Ring):
    """Multi-producer multi-consumer ring (per-slot sequence numbers).  Any number of processes
    send and receive.  Messages are at most ``slot_size`` bytes.  Only between cooperating peers: a
    producer that dies between reserving and committing a slot stalls consumers at that slot;
    blocking receives report that as StallError instead of waiting forever."""
    cdef ivshm_mpmc _q
    cdef object _stash            # a message that did not fit a recv_into buffer
    cdef object _pending_error    # corruption met in a batch that also returned good messages
    cdef uint64_t _wpos, _rpos

    cdef _init(self, Region region, ivshm_ring_info *info):
        _Ring._init(self, region, info)
        cdef const char *why = NULL
        rc = ivshm_mpmc_attach(&self._q, &region._r, info, &why)
        if rc != 0:
            raise _ring_error(rc, f"open ring {self._name!r}", why, self._name)
        self._stash = None

    @property
    def kind(self):
        return "mpmc"

    @property
    def max_message(self):
        return self._info.slot_size

    def __len__(self):
        self._check()
        return ivshm_mpmc_count(&self._q) + (self._stash is not None)

    def stalled(self):
        """The index of a slot claimed by a producer that has not committed it, or None."""
        self._check()
        cdef uint64_t pos
        return pos if ivshm_mpmc_stalled(&self._q, &pos) else None

    cdef int _send_ptr(self, const char *p, uint64_t n) except -2:
        self._check()
        if n > self._info.slot_size:
            raise MessageTooLargeError(
                f"message of {n} bytes does not fit ring {self._name!r}: MPMC slots hold at most "
                f"{self.slot_size} bytes (use a larger slot_size, or an SPSC ring, which splits "
                "large messages)")
        cdef int rc
        cdef _Mapping mp
        if n <= _NOGIL_BYTES:
            rc = ivshm_mpmc_try_send(&self._q, p, n)
        else:
            mp = self._m
            mp.enter()
            try:
                with nogil:
                    rc = ivshm_mpmc_try_send(&self._q, p, n)
            finally:
                mp.leave()
        if rc == 0:
            return 0
        if rc == -EAGAIN:
            return -1
        raise self._corrupt(rc, self._q.why, self._q.why_a, self._q.why_b, "send")

    cdef int _raise_pending(self) except -1:
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise err
        return 0

    cdef object _recv_obj(self):
        self._check()
        self._raise_pending()
        if self._stash is not None:
            out, self._stash = self._stash, None
            return out
        cdef uint64_t pos
        cdef int64_t m = ivshm_mpmc_claim_recv(&self._q, 1, &pos)
        if m <= 0:
            if m == -EAGAIN:
                return None
            raise self._corrupt(m, self._q.why, self._q.why_a, self._q.why_b, "recv")
        cdef int64_t n = ivshm_mpmc_msg_len(&self._q, pos)
        if n < 0:
            ivshm_mpmc_release_one(&self._q, pos)
            raise self._corrupt(n, self._q.why, self._q.why_a, self._q.why_b, "recv")
        if n <= <int64_t>_NOGIL_BYTES:
            out = PyBytes_FromStringAndSize(<const char *>ivshm_mpmc_payload(&self._q, pos), n)
            ivshm_mpmc_release_one(&self._q, pos)
            return out
        return self._recv_big(pos, n)

    cdef object _recv_big(self, uint64_t pos, int64_t n):
        """Copy claimed message `pos` of `n` bytes out with the GIL released, and release it."""
        cdef _Mapping mp = self._m
        cdef char *dst
        mp.enter()
        try:
            try:
                out = PyBytes_FromStringAndSize(NULL, n)
            except BaseException:
                ivshm_mpmc_release_one(&self._q, pos)
                raise
            dst = PyBytes_AS_STRING(out)
            with nogil:
                memcpy(dst, ivshm_mpmc_payload(&self._q, pos), n)
                ivshm_mpmc_release_one(&self._q, pos)
        finally:
            mp.leave()
        return out

    cdef _timeout_error(self, timeout):
        cdef uint64_t pos
        if ivshm_mpmc_stalled(&self._q, &pos):
            raise StallError(
                f"recv on ring {self._name!r}: slot {pos} was claimed by a producer that has not "
                f"committed it for {timeout} s (producer stalled or died; later messages wait behind it)")
        _Ring._timeout_error(self, timeout)

    def send_many(self, messages, timeout=0.0):
        """Send messages from the front of ``messages``; see SpscRing.send_many."""
        self._check()
        seq = messages if type(messages) is list or type(messages) is tuple else list(messages)
        cdef Py_ssize_t total = len(seq), sent = 0
        cdef _Waiter w = None
        while True:
            while sent < total and self._send_obj(seq[sent]) == 0:
                sent += 1
            if sent >= total or timeout == 0:
                return sent
            if w is None:
                w = _Waiter(timeout, self.spin)
            if not w.pause():
                return sent

    def recv_many(self, Py_ssize_t max_count=_BATCH, timeout=0.0):
        """Up to ``max_count`` messages already there (claimed with one CAS per burst)."""
        self._check()
        self._raise_pending()
        cdef list out = []
        cdef uint64_t pos
        cdef int64_t m, k, n
        cdef object err = None
        cdef _Waiter w = None
        cdef _Mapping mp = self._m
        if self._stash is not None and max_count > 0:
            out.append(self._stash)
            self._stash = None
        while True:
            self._check()
            mp.enter()
            try:
                while len(out) < max_count and not mp.closed:
                    m = ivshm_mpmc_claim_recv(&self._q, max_count - len(out), &pos)
                    if m <= 0:
                        if m != -EAGAIN and not out:
                            raise self._corrupt(m, self._q.why, self._q.why_a, self._q.why_b, "recv_many")
                        break
                    for k in range(m):
                        n = ivshm_mpmc_msg_len(&self._q, pos + k)
                        if n > <int64_t>_NOGIL_BYTES:
                            out.append(self._recv_big(pos + k, n))
                            continue
                        if n >= 0:
                            out.append(PyBytes_FromStringAndSize(
                                <const char *>ivshm_mpmc_payload(&self._q, pos + k), n))
                        elif err is None:
                            err = self._corrupt(n, self._q.why, self._q.why_a, self._q.why_b, "recv_many")
                        ivshm_mpmc_release_one(&self._q, pos + k)
            finally:
                mp.leave()
            if err is not None:
                if not out:
                    raise err
                self._pending_error = err  # raised by the next receive: nothing is hidden
                return out
            if out or timeout == 0 or max_count <= 0:
                return out
            if w is None:
                w = _Waiter(timeout, self.spin)
            if not w.pause():
                return out

    def recv_into(self, buffer):
        """Receive into a writable buffer: the length, or None if empty.  A message too large for
        the buffer raises MessageTooLargeError and is kept for the next recv/recv_into."""
        self._check()
        msg = self._recv_obj()
        if msg is None:
            return None
        mv = memoryview(buffer)
        try:
            if mv.readonly:
                raise ConfigError("recv_into needs a writable buffer")
            if mv.nbytes < len(msg):
                self._stash = msg
                raise MessageTooLargeError(
                    f"the next message on ring {self._name!r} is {len(msg)} bytes; the buffer holds "
                    f"{mv.nbytes}: pass a larger buffer (it is kept for the next receive)")
            mv.cast("B")[:len(msg)] = msg
        finally:
            mv.release()
        return len(msg)

    def reserve(self, Py_ssize_t size):
        """Claim the next free slot and return a writable view of ``size`` bytes (None if full).
        Consumers wait at this slot until :meth:`commit`, so commit promptly."""
        self._check()
        if self._wview_len >= 0:
            raise ConfigError(f"ring {self._name!r}: a reservation is already open; commit() it first")
        if size < 0 or size > self._info.slot_size:
            raise MessageTooLargeError(f"reserve({size}) on ring {self._name!r}: at most {self.slot_size} bytes")
        cdef uint64_t pos
        cdef int64_t m = ivshm_mpmc_claim_send(&self._q, 1, &pos)
        if m == -EAGAIN:
            return None
        if m < 0:
            raise self._corrupt(m, self._q.why, self._q.why_a, self._q.why_b, "reserve")
        self._wpos = pos
        self._wview = _make_view(self._m, ivshm_mpmc_payload(&self._q, pos), size, False)
        self._wview_len = size
        return self._wview

    def commit(self, size=None):
        self._check()
        if self._wview_len < 0:
            raise ConfigError(f"ring {self._name!r}: commit() without reserve()")
        cdef Py_ssize_t n = self._wview_len if size is None else size
        if n < 0 or n > self._wview_len:
            raise ConfigError(f"commit({size}): between 0 and the {self._wview_len} bytes reserved")
        self._drop_wview()
        ivshm_mpmc_commit_one(&self._q, self._wpos, <uint32_t>n)

    def peek(self):
        """Claim the next message and return a read-only view of it (None if empty); other
        consumers skip it.  :meth:`release` hands the slot back."""
        self._check()
        if self._rview is not None:
            raise ConfigError(f"ring {self._name!r}: a peeked message is still held; release() it first")
        if self._stash is not None:
            self._rview = memoryview(self._stash)
            self._rpos = <uint64_t>-1
            return self._rview
        cdef uint64_t pos
        cdef int64_t m = ivshm_mpmc_claim_recv(&self._q, 1, &pos)
        if m == -EAGAIN:
            return None
        if m < 0:
            raise self._corrupt(m, self._q.why, self._q.why_a, self._q.why_b, "peek")
        cdef int64_t n = ivshm_mpmc_msg_len(&self._q, pos)
        if n < 0:
            ivshm_mpmc_release_one(&self._q, pos)
            raise self._corrupt(n, self._q.why, self._q.why_a, self._q.why_b, "peek")
        self._rpos = pos
        self._rview = _make_view(self._m, ivshm_mpmc_payload(&self._q, pos), n, True)
        return self._rview

    def release(self):
        self._check()
        if self._rview is None:
            raise ConfigError(f"ring {self._name!r}: release() without peek()")
        self._drop_rview()
        if self._rpos == <uint64_t>-1:
            self._stash = None
            return
        ivshm_mpmc_release_one(&self._q, self._rpos)


# ---------------------------------------------------------------------------------------------
# Channel: a ring bound to doorbells
# ---------------------------------------------------------------------------------------------

#: Default busy-spin budget of a Channel before it sleeps on its doorbell, in seconds.  A wake-up
#: through a doorbell costs tens of microseconds on virtual machines, so a short spin pays off.
CHANNEL_SPIN = 100e-6
#: Default interval after which a sleeper re-checks shared memory even without a doorbell: a
#: safety net for doorbells lost outside the protocol (a peer not connected yet), never needed
#: by a correct wake-up.
CHANNEL_RECHECK = 1.0

import asyncio as _asyncio
import math as _math

cdef extern from "<errno.h>":
    enum:
        ECANCELED

cdef int _chan_eventfd() except -1:
    cdef int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if fd < 0:
        e = errno
        raise OSError(e, f"cannot create an eventfd: {_os.strerror(e)}")
    return fd


cdef void _chan_signal(int fd) noexcept:
    """Make an eventfd readable for good (nobody drains it)."""
    cdef uint64_t one = 1
    if fd >= 0:
        _c_write(fd, &one, 8)


cdef int64_t _seconds_ns(value, name, bint allow_none) except? -2:
    """A duration argument in ns: -1 for None (wait forever) where allowed; ConfigError naming
    the argument for anything that is not a number >= 0 (NaN, negative, bool, str)."""
    if value is None:
        if allow_none:
            return -1
        raise ConfigError(f"{name} must be a number of seconds >= 0, not None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be None (no limit) or a number of seconds >= 0, not {value!r}")
    cdef double v = value
    if v != v or v < 0:
        raise ConfigError(f"{name} must be None (no limit) or a number of seconds >= 0, not {value!r}")
    if v > 9e9:
        return -1 if allow_none else <int64_t>9e18
    return <int64_t>(v * 1e9)


cdef int _resolve_bell(void *ctx, uint32_t peer, uint32_t vector, ivshm_bell *out) noexcept with gil:
    """The C channel asks how to ring (peer, vector): the doorbell provider's notify_target.
    Asked afresh for every doorbell (at most one per sleep of the other side): a provider closes
    a departed peer's fds, so a cached fd number could name an unrelated file later."""
    cdef Channel ch = <Channel>ctx
    try:
        if ch._doorbell is None or ch._closed:
            return -1
        target = ch._doorbell.notify_target(peer, vector)
        if target is None:
            return -1  # that peer is not connected (yet): the doorbell is lost, it re-checks
        kind, where, value = target
        if kind == IVSHM_BELL_EVENTFD:
            out.kind = IVSHM_BELL_EVENTFD
            out.fd = where
        elif kind == IVSHM_BELL_MMIO:
            out.kind = IVSHM_BELL_MMIO
            out.reg = <volatile uint32_t *><size_t>where
            out.value = value
        else:
            return -1
        return 0
    except BaseException:
        return -1  # counted as unrouted; the sleeper's re-check covers it


cdef class _AsyncCall:
    """One asyncio wait's C state (coroutines keep it across awaits)."""
    cdef ivshm_chan_call call


cdef class Channel:
    """A ring bound to doorbells: blocking send/recv that sleep only when they must, and wake the
    other side only when it sleeps.  The wake-up protocol is csrc/ivshm_chan.c (docs/wakeup.md
    proves it): any number of senders and receivers may sleep on one ring, in any processes or VMs,
    and each doorbell wakes one sleeper that is actually asleep.

    ``doorbell`` is a doorbell provider (a host :class:`Peer`, a guest :class:`PciDevice`, or any
    object with ``id``, ``vector_fd(v)`` and ``notify_target(peer, v)``); ``vector`` is this side's
    vector to sleep on (use one vector per blocking channel in a process; threads of one process
    may share a channel).  Without a doorbell, or when the provider has no interrupt fd (a guest
    without VFIO), sleeping degrades to polling with back-off (50 us to 1 ms).

    ``close()`` (of the channel or of its region), from any thread, wakes every call blocked on
    this channel; they raise ClosedError.
    """
    cdef _Ring _ring
    cdef object _doorbell
    cdef int _vector
    cdef int _fd
    cdef int _my_id
    cdef int _cancel_fd            # ours: written by close(), never drained
    cdef bint _closed
    cdef ivshm_chan _ch
    cdef double _spin, _recheck
    cdef uint64_t _sent, _received
    cdef object __weakref__

    def __cinit__(self):
        self._cancel_fd = -1
        self._fd = -1

    def __init__(self, ring, doorbell=None, *, vector=0, spin=None, recheck=None):
        if not isinstance(ring, _Ring):
            raise ConfigError(f"Channel needs an SpscRing or MpmcRing, not {type(ring).__name__}")
        if isinstance(vector, bool) or not isinstance(vector, int) or not 0 <= vector < IVSHM_MAX_VECTORS:
            raise ConfigError(f"vector must be an int in 0..{IVSHM_MAX_VECTORS - 1}, not {vector!r}")
        cdef int64_t spin_ns = _seconds_ns(CHANNEL_SPIN if spin is None else spin, "spin", False)
        cdef int64_t recheck_ns = _seconds_ns(CHANNEL_RECHECK if recheck is None else recheck,
                                              "recheck", False)
        if recheck_ns <= 0:
            raise ConfigError(f"recheck must be > 0 seconds, not {recheck!r}")
        cdef _Ring r = ring
        r._check()
        self._ring = r
        self._doorbell = doorbell
        self._vector = vector
        self._spin = CHANNEL_SPIN if spin is None else spin
        self._recheck = CHANNEL_RECHECK if recheck is None else recheck
        if doorbell is not None:
            my_id = doorbell.id
            if isinstance(my_id, bool) or not isinstance(my_id, int) or not 0 <= my_id <= IVSHM_MAX_PEER_ID:
                raise ConfigError(f"the doorbell's id must be a peer id 0..{IVSHM_MAX_PEER_ID}, not {my_id!r}")
            self._my_id = my_id
            fd = doorbell.vector_fd(vector)
            if fd is not None:
                _os.set_blocking(fd, False)
                self._fd = fd
        else:
            self._my_id = -1
        self._cancel_fd = _chan_eventfd()
        cdef void *q
        if r._info.kind == IVSHM_KIND_SPSC:
            q = <void *>&(<SpscRing>r)._q
        else:
            q = <void *>&(<MpmcRing>r)._q
        rc = ivshm_chan_init(&self._ch, r._info.kind, q, self._my_id, vector, self._fd,
                             r._m.closed_fd, _resolve_bell, <void *>self, spin_ns, recheck_ns)
        if rc != 0:
            raise _error_from_code(rc, "set up the channel")
        self._ch.cancel_fd2 = self._cancel_fd

    def __dealloc__(self):
        if self._cancel_fd >= 0:
            _os.close(self._cancel_fd)
            self._cancel_fd = -1

    # -- plumbing -------------------------------------------------------------------------------
    cdef inline int _check(self) except -1:
        if self._closed:
            raise ClosedError("the channel is closed")
        return self._ring._check()

    cdef inline void _wake_other(self, uint32_t my_side) noexcept:
        ivshm_chan_wake_other(&self._ch, my_side)

    cdef int _wait(self, ivshm_chan_call *call, timeout, bint sending) except -1:
        """One blocking wait (GIL released, mapping held).  Returns when the ring may be ready;
        raises ClosedError, WaitTimeout/StallError, KeyboardInterrupt (signals), OSError."""
        cdef _Mapping m = self._ring._m
        cdef int rc
        while True:
            m.enter()
            with nogil:
                rc = ivshm_chan_wait(&self._ch, call)
            m.leave()
            if self._closed or m.closed or rc == -ECANCELED:
                raise ClosedError(f"channel over ring {self._ring._name!r} closed while waiting")
            if rc == -EINTR_:
                PyErr_CheckSignals()  # Ctrl-C raises here; otherwise wait again
                continue
            if rc == 1:
                return 0
            if rc == 0:
                if sending:
                    self._full_timeout(timeout)
                self._ring._timeout_error(timeout)
            raise OSError(-rc, f"waiting on channel over ring {self._ring._name!r}: {_os.strerror(-rc)}")

    cdef uint64_t _slots_for(self, data) except 0:
        """Slots the message needs: an SPSC producer waits for that much room."""
        if data is None or self._ring._info.kind != IVSHM_KIND_SPSC:
            return 1
        cdef Py_ssize_t n = len(data) if PyBytes_CheckExact(data) else memoryview(data).nbytes
        cdef uint64_t k = ivshm_spsc_slots_for(&(<SpscRing>self._ring)._q, n)
        return k if k else 1

    cdef int _full_timeout(self, timeout) except -1:
        cdef uint64_t pos
        if self._ring._info.kind == IVSHM_KIND_MPMC and hasattr(self._ring, "stalled_consumer"):
            slot = self._ring.stalled_consumer()
            if slot is not None:
                raise StallError(f"send on channel over ring {self._ring._name!r}: slot {slot} was "
                                 f"claimed by a consumer that has not released it for {timeout} s "
                                 "(consumer stalled or died); see MpmcRing.recover()")
        raise WaitTimeout(f"send on channel over ring {self._ring._name!r}: still full after "
                          f"{timeout} s; is a consumer running?")

    cdef void _pass_on(self, ivshm_chan_call *call) noexcept:
        if not self._ring._m.closed:
            ivshm_chan_pass_on(&self._ch, call)

    # -- receive ------------------------------------------------------------------------------
    def try_recv(self):
        """The next message, or None; wakes a producer that sleeps on a full ring."""
        self._check()
        msg = self._ring._recv_obj()
        if msg is not None:
            self._received += 1
            self._wake_other(IVSHM_CHAN_RECV)
        return msg

    def recv(self, timeout=None):
        """The next message, waiting up to ``timeout`` seconds (None: forever): spin for
        ``spin`` seconds, then sleep on the doorbell.  WaitTimeout when nothing came (StallError
        when an MPMC producer holds the next slot)."""
        cdef int64_t t = _seconds_ns(timeout, "timeout", True)
        self._check()
        msg = self._ring._recv_obj()
        if msg is not None:
            self._received += 1
            self._wake_other(IVSHM_CHAN_RECV)
            return msg
        cdef ivshm_chan_call call
        ivshm_chan_call_init(&call, IVSHM_CHAN_RECV, t, 1)
        try:
            while True:
                self._wait(&call, timeout, False)
                msg = self._ring._recv_obj()
                if msg is not None:
                    self._received += 1
                    self._wake_other(IVSHM_CHAN_RECV)
                    return msg
        finally:
            self._pass_on(&call)

    def recv_many(self, Py_ssize_t max_count=256, timeout=0.0):
        """Up to ``max_count`` messages already there; with ``timeout`` > 0 or None, waits that
        long for the first one ([] when none came)."""
        cdef int64_t t = _seconds_ns(timeout, "timeout", True)
        if max_count < 0:
            raise ConfigError(f"max_count must be >= 0, not {max_count}")
        self._check()
        out = self._ring.recv_many(max_count, timeout=0)
        cdef ivshm_chan_call call
        if not out and t != 0 and max_count > 0:
            ivshm_chan_call_init(&call, IVSHM_CHAN_RECV, t, 1)
            try:
                while not out:
                    try:
                        self._wait(&call, timeout, False)
                    except WaitTimeout as e:
                        if type(e) is WaitTimeout:
                            return []
                        raise  # a StallError says more than an empty list
                    out = self._ring.recv_many(max_count, timeout=0)
            finally:
                self._pass_on(&call)
        if out:
            self._received += len(out)
            self._wake_other(IVSHM_CHAN_RECV)
        return out

    def recv_into(self, buffer, timeout=None):
        """Receive into ``buffer``, waiting up to ``timeout`` seconds (None: forever): the
        message's length.  WaitTimeout when nothing came; MessageTooLargeError (the message
        stays queued) when the buffer is too small."""
        cdef int64_t t = _seconds_ns(timeout, "timeout", True)
        self._check()
        n = self._ring.recv_into(buffer)
        cdef ivshm_chan_call call
        if n is None:
            if t == 0:
                self._ring._timeout_error(timeout)
            ivshm_chan_call_init(&call, IVSHM_CHAN_RECV, t, 1)
            try:
                while n is None:
                    self._wait(&call, timeout, False)
                    n = self._ring.recv_into(buffer)
            finally:
                self._pass_on(&call)
        self._received += 1
        self._wake_other(IVSHM_CHAN_RECV)
        return n

    # -- send ---------------------------------------------------------------------------------
    def try_send(self, data):
        """Send if there is room (True), else False; rings a consumer only if one sleeps."""
        self._check()
        if self._ring._send_obj(data) != 0:
            return False
        self._sent += 1
        self._wake_other(IVSHM_CHAN_SEND)
        return True

    def send(self, data, timeout=None):
        """Send, waiting up to ``timeout`` seconds (None: forever) for room: spin, then sleep on
        the doorbell until a consumer frees slots.  WaitTimeout if the ring stays full."""
        cdef int64_t t = _seconds_ns(timeout, "timeout", True)
        self._check()
        if self._ring._send_obj(data) == 0:
            self._sent += 1
            self._wake_other(IVSHM_CHAN_SEND)
            return
        cdef ivshm_chan_call call
        ivshm_chan_call_init(&call, IVSHM_CHAN_SEND, t, self._slots_for(data))
        try:
            while True:
                self._wait(&call, timeout, True)
                if self._ring._send_obj(data) == 0:
                    break
        finally:
            self._pass_on(&call)
        self._sent += 1
        self._wake_other(IVSHM_CHAN_SEND)

    def send_many(self, messages, timeout=0.0):
        """Send from the front of ``messages`` (one publish per batch, at most one doorbell per
        batch); with ``timeout`` > 0 or None waits for room until all are sent.  Returns how many
        were sent: the rest are ``messages[n:]`` (an iterator is materialised into a list first,
        so nothing of it is lost)."""
        cdef int64_t t = _seconds_ns(timeout, "timeout", True)
        self._check()
        seq = messages if type(messages) is list or type(messages) is tuple else list(messages)
        cdef Py_ssize_t total = len(seq)
        cdef Py_ssize_t sent = self._ring.send_many(seq, timeout=0)
        if sent:
            self._sent += sent
            self._wake_other(IVSHM_CHAN_SEND)
        if sent >= total or t == 0:
            return sent
        cdef ivshm_chan_call call
        cdef Py_ssize_t n
        ivshm_chan_call_init(&call, IVSHM_CHAN_SEND, t, self._slots_for(seq[sent]))
        try:
            while sent < total:
                try:
                    self._wait(&call, timeout, True)
                except WaitTimeout as e:
                    if type(e) is WaitTimeout:
                        break
                    raise
                n = self._ring.send_many(seq[sent:] if sent else seq, timeout=0)
                if n:
                    sent += n
                    self._sent += n
                    self._wake_other(IVSHM_CHAN_SEND)
        finally:
            self._pass_on(&call)
        return sent

    # -- asyncio ------------------------------------------------------------------------------
    async def recv_async(self, timeout=None):
        """``await channel.recv_async()``: the next message, sleeping in the event loop (a reader
        on the doorbell fd, re-checking every ``recheck`` seconds).  WaitTimeout on timeout;
        ClosedError when the channel or its region is closed meanwhile."""
        _seconds_ns(timeout, "timeout", True)
        msg = self.try_recv()
        if msg is not None:
            return msg
        return await self._async_wait(IVSHM_CHAN_RECV, None, timeout)

    async def send_async(self, data, timeout=None):
        """``await channel.send_async(data)``: send, sleeping in the event loop while full."""
        _seconds_ns(timeout, "timeout", True)
        if self.try_send(data):
            return
        await self._async_wait(IVSHM_CHAN_SEND, data, timeout)

    async def _async_wait(self, uint32_t side, data, timeout):
        loop = _asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        cdef _AsyncCall c = _AsyncCall()
        ivshm_chan_call_init(&c.call, side, -1, self._slots_for(data) if side == IVSHM_CHAN_SEND else 1)
        c.call.slept = 1  # pass on when leaving without acting on a wake-up
        cdef _Mapping m = self._ring._m
        try:
            while True:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    if side == IVSHM_CHAN_SEND:
                        self._full_timeout(timeout)
                    self._ring._timeout_error(timeout)
                span = self._recheck if left is None else min(self._recheck, left)
                m.enter()  # the mapping stays while this call holds a sleeper entry
                try:
                    armed = ivshm_chan_arm(&self._ch, &c.call)
                    if not ivshm_chan_ready(&self._ch, side, c.call.need if side == IVSHM_CHAN_SEND else 1):
                        ivshm_chan_note_sleep(&self._ch)
                        await self._await_fds(loop, span if armed else min(span, 0.001), armed)
                finally:
                    ivshm_chan_disarm(&self._ch, &c.call)  # also when the task is cancelled
                    m.leave()
                self._check()
                if side == IVSHM_CHAN_RECV:
                    msg = self.try_recv()
                    if msg is not None:
                        return msg
                elif self.try_send(data):
                    return
        finally:
            self._pass_on(&c.call)

    async def _await_fds(self, loop, span, bint armed):
        fut = loop.create_future()

        def ready():
            if not fut.done():
                fut.set_result(None)

        fds = [self._cancel_fd, self._ring._m.closed_fd]
        if armed:
            fds.append(self._fd)
        for fd in fds:
            loop.add_reader(fd, ready)
        try:
            await _asyncio.wait_for(fut, span)
        except _asyncio.TimeoutError:
            pass
        finally:
            for fd in fds:
                loop.remove_reader(fd)
        if armed and not self._closed:
            ivshm_chan_absorb(&self._ch)

    # -- the rest -----------------------------------------------------------------------------
    @property
    def spin(self):
        """Seconds a blocking call busy-polls before it sleeps."""
        return self._spin

    @spin.setter
    def spin(self, value):
        self._ch.spin_ns = _seconds_ns(value, "spin", False)
        self._spin = value

    @property
    def recheck(self):
        """Seconds after which a sleeper looks at the ring even without a doorbell."""
        return self._recheck

    @recheck.setter
    def recheck(self, value):
        cdef int64_t ns = _seconds_ns(value, "recheck", False)
        if ns <= 0:
            raise ConfigError(f"recheck must be > 0 seconds, not {value!r}")
        self._ch.recheck_ns = ns
        self._recheck = value

    @property
    def ring(self):
        return self._ring

    @property
    def doorbell(self):
        return self._doorbell

    @property
    def vector(self):
        return self._vector

    @property
    def stats(self):
        """Counters of this side: messages sent/received, doorbells rung, sleeps, wake-ups by a
        doorbell, sleepers claimed that could not be rung (their peer unknown: they re-check),
        wake-ups passed on to a sleeper of one's own side."""
        cdef ivshm_chan_stats st
        ivshm_chan_get_stats(&self._ch, &st)
        return {"sent": self._sent, "received": self._received, "doorbells": st.doorbells,
                "sleeps": st.sleeps, "wakeups": st.wakeups, "unrouted": st.unrouted,
                "passed_on": st.passes}

    def fileno(self):
        """The doorbell fd this side sleeps on (for select/epoll), or -1 when it polls."""
        return self._fd

    def __len__(self):
        return len(self._ring)

    def close(self):
        """Stop using the ring and doorbell (neither is closed: they belong to the caller).
        Calls blocked on this channel in other threads or tasks wake and raise ClosedError.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        _chan_signal(self._cancel_fd)

    @property
    def closed(self):
        return self._closed or self._ring.closed

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<pyivshmem.Channel ring={self._ring._name!r} vector={self._vector} fd={self._fd}>"
