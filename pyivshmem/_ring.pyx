# cython: language_level=3, boundscheck=False, cdivision=True
"""The hot path: regions and rings over the C core (csrc/), with no Python work per message beyond
the call itself.  Everything here maps 1:1 onto csrc/ivshm_*.h; errors go through
pyivshmem.errors.error_from_code, the one place that turns C error codes into exceptions.
"""
import collections.abc as _abc
import errno as _errno
import fcntl as _fcntl
import mmap as _mmap
import numbers as _numbers
import operator as _operator
import os as _os
import stat as _stat
import sys as _sys
import warnings as _warnings
import weakref as _weakref

cimport cython

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBuffer_FillInfo, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_CheckExact
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetInterrupt
from cpython.list cimport PyList_Append
from cpython.long cimport PyLong_CheckExact, PyLong_AsSsize_t
from cpython.float cimport PyFloat_CheckExact, PyFloat_AS_DOUBLE
from cpython.slice cimport PySlice_Check, PySlice_GetIndicesEx
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.errno cimport errno
from cpython.object cimport PyObject

cdef extern from "<sys/vfs.h>" nogil:
    cdef struct statfs:
        long f_type
        long f_bsize
    int fstatfs(int fd, statfs *buf)

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
        EINVAL
        EINTR_ "EINTR"
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset, strlen
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
    StallError, WaitTimeout, AlreadyExistsError, RegionNotFoundError, RegionFullError,
    RingNotFoundError, ViewInUseError, AccessDeniedError, SystemCallError,
    SubscriberDroppedError, RegionLostError,
)
from pyivshmem._size import parse_size  # the one size grammar (pure Python, shared with the server)

__all__ = ["Region", "SpscRing", "MpmcRing", "PubSubRing", "Subscriber", "SlotView", "Channel",
           "parse_size"]

cdef extern from "Python.h":
    Py_ssize_t PySequence_Fast_GET_SIZE(object o)
    void *PySequence_Fast_ITEMS(object o)

_KINDS = {"spsc": IVSHM_KIND_SPSC, "mpmc": IVSHM_KIND_MPMC, "pubsub": IVSHM_KIND_PUBSUB}
_KIND_NAMES = {IVSHM_KIND_SPSC: "spsc", IVSHM_KIND_MPMC: "mpmc", IVSHM_KIND_PUBSUB: "pubsub"}

#: Default busy-spin budget of blocking calls before they start sleeping, in seconds.
DEFAULT_SPIN = 50e-6
cdef int _LOCK_WAIT_MS = 2000
cdef int _FORMAT_WAIT_MS = 2000
cdef Py_ssize_t _BATCH = 256
# Batches publish (and release) once, and again each time this many bytes were written (read)
# since the last time, so that the other side's copy overlaps ours.
cdef uint64_t _OVERLAP_BYTES = 16384
# recv_many stops gathering once this many bytes are in its list (always taking at least one
# message): a list of many large messages is fresh memory, page-faulted in on every call, and
# made a batch of 1 MiB messages six times slower than one call per message.
cdef uint64_t _BATCH_BYTES = 1 << 20
# Copies of more than this many bytes release the GIL (and count as users of the mapping).
cdef uint64_t _NOGIL_BYTES = 65536


#: Largest region size accepted (a sanity bound far above any ivshmem device).
MAX_REGION_SIZE = 1 << 48


def _int_arg(value, what, lo, hi):
    """An int in [lo, hi] (bools, floats, strings and None refused), else ConfigError naming it."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an int, not {value!r}")
    try:
        v = _operator.index(value)
    except TypeError:
        raise ConfigError(f"{what} must be an int, not {type(value).__name__} {value!r}") from None
    if not lo <= v <= hi:
        raise ConfigError(f"{what} must be between {lo} and {hi}, got {v}")
    return v


cdef inline Py_ssize_t _size_arg(object value, what, Py_ssize_t lo, Py_ssize_t hi) except? -1:
    """_int_arg for a Py_ssize_t range, with a fast path for a plain int (the hot calls)."""
    cdef Py_ssize_t v
    if PyLong_CheckExact(value):
        try:
            v = PyLong_AsSsize_t(value)
        except OverflowError:
            return _int_arg(value, what, lo, hi)
        if lo <= v <= hi:
            return v
    return _int_arg(value, what, lo, hi)


cdef double _timeout_arg(object timeout, what="timeout") except -2.0:
    """Validate a timeout: -1.0 for None (or +inf: wait forever), else its seconds (>= 0).
    NaN, negative numbers and non-numbers raise ConfigError naming the argument."""
    cdef double f
    if timeout is None:
        return -1.0
    if PyFloat_CheckExact(timeout):  # the hot path: 0.0, 0.5 ...
        f = PyFloat_AS_DOUBLE(timeout)
        if f >= 0 and f != float("inf"):
            return f
    elif PyLong_CheckExact(timeout) and 0 <= timeout <= 1000000000:  # 0, 5 ... (no ABC check)
        return <double><long long>timeout
    if isinstance(timeout, bool) or not isinstance(timeout, _numbers.Real):
        raise ConfigError(f"{what} must be a number of seconds, or None to wait forever, not "
                          f"{type(timeout).__name__} {timeout!r}")
    cdef double t
    try:
        t = float(timeout)
    except OverflowError:
        t = float("inf") if timeout > 0 else float("-inf")
    if t != t:
        raise ConfigError(f"{what} is NaN: pass a number of seconds, or None to wait forever")
    if t < 0:
        raise ConfigError(f"{what} must be >= 0 seconds, or None to wait forever, got {timeout!r}")
    if t == float("inf"):
        return -1.0
    return t


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
    Ctrl-C honoured.  Used by the rings' blocking calls; Channel replaces sleeping by doorbells.
    Made by _Waiter.make() from a timeout that _timeout_arg validated (-1: forever)."""
    cdef double deadline
    cdef double spin_until
    cdef double spin
    cdef long sleep_ns
    cdef bint forever

    @staticmethod
    cdef _Waiter make(double timeout, double spin):
        cdef _Waiter w = _Waiter.__new__(_Waiter)
        cdef double now = _now()
        w.forever = timeout < 0
        w.deadline = now + timeout
        w.spin = spin
        w.spin_until = now + spin
        w.sleep_ns = 1000
        return w

    cdef void progress(self) noexcept:
        """Part of a batch went: spin again before sleeping, back-off from its shortest step,
        as a new call would (the deadline stays)."""
        self.spin_until = _now() + self.spin
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


# A counter bumped in every child after fork(): a ring handle inherited by a child must not give
# back the parent's reservation or peek when the child drops it.
cdef uint64_t _fork_gen = 0


def _after_fork_in_child():
    global _fork_gen
    _fork_gen += 1


_os.register_at_fork(after_in_child=_after_fork_in_child)


cdef class _FdKeeper:
    """The fds of one owner (a WaitSet, a Peer, a PciDevice) that its calls use with the GIL
    released: a wait sleeping on them, a ring or a drain writing or reading them.

    A call holds the keeper from before it looks an fd up until its C call returned
    (:meth:`enter`, :meth:`leave`).  The owner hands the fds it no longer needs to
    :meth:`close_later`: they are closed at once when no call is inside, else by the last call
    to leave.  So an fd number is never closed, and reused by another file, under a call that
    still uses it (as _Mapping keeps its memory).  ``final=True`` (the owner is closing) also
    refuses every later :meth:`enter`.

    Each method runs no Python code (the closes are close(2) calls with the GIL held), so it is
    atomic under the GIL: another thread or a signal handler runs between two calls, never
    inside one, and nothing here can deadlock (docs/wakeup.md, "fd lifetimes").

    Python callers hold it with ``with keeper.hold():`` (ClosedError naming ``what`` once the
    owner closed) or ``with keeper.if_open() as held:`` (False then).  Each gives a hold object
    of its own: the with statement takes the hold and arms its release in one step, and the
    object gives the hold back when it is freed if __exit__ never ran (Python 3.10 can unwind a
    with block without calling __exit__ when a second signal handler raises meanwhile), so an
    exception from a signal handler cannot leave a hold taken for good."""
    cdef Py_ssize_t inside
    cdef list pending
    cdef bint final
    cdef object what
    cdef uint64_t gen  # _fork_gen of the process whose calls ``inside`` counts

    def __cinit__(self, what="this object"):
        self.inside = 0
        self.pending = []
        self.final = False
        self.what = what
        self.gen = _fork_gen

    cdef inline void _here(self) noexcept:
        # In a child made by fork the parent's threads do not exist: the calls they had inside
        # never leave here.  Count this process's own calls only.
        if self.gen != _fork_gen:
            self.gen = _fork_gen
            self.inside = 0

    def hold(self):
        """A context manager that holds the fds; ClosedError once the owner closed."""
        cdef _FdHold h = _FdHold.__new__(_FdHold)
        h.keeper = self
        return h

    def if_open(self):
        """A context manager: holds the fds and gives True, or gives False once the owner
        closed (and holds nothing)."""
        cdef _FdHold h = _FdHold.__new__(_FdHold)
        h.keeper = self
        h.quiet = True
        return h

    def enter(self):
        """Hold the fds; False (and nothing held) once the owner closed."""
        return self.c_enter()

    def leave(self):
        self.c_leave()

    cdef inline bint c_enter(self) noexcept:
        self._here()
        if self.final:
            return False
        self.inside += 1
        return True

    cdef inline void c_leave(self) noexcept:
        self._here()
        if self.inside > 0:
            self.inside -= 1
        if self.inside == 0 and self.pending:
            self._close_pending()

    def close_later(self, fds, final=False):
        cdef int fd
        self._here()
        if final:
            self.final = True
        for f in fds:
            fd = f
            if fd >= 0:
                self.pending.append(fd)
        if self.inside == 0:
            self._close_pending()

    cdef void _close_pending(self) noexcept:
        cdef int fd
        while self.pending:
            fd = self.pending.pop()
            _c_close(fd)

    def __dealloc__(self):
        # (a keeper of a Peer that was never closed: its __del__ closed it, or the process ends)
        cdef int fd
        if self.pending:
            for fd in self.pending:
                _c_close(fd)


cdef class _FdHold:
    """One hold of an _FdKeeper (``hold()``, ``if_open()``), taken by __enter__, given back by
    __exit__ or, failing that, when this object is freed."""
    cdef _FdKeeper keeper
    cdef bint held
    cdef bint quiet

    def __enter__(self):
        self.held = self.keeper.c_enter()
        if not self.held and not self.quiet:
            raise ClosedError(f"{self.keeper.what} is closed")
        return self.held

    def __exit__(self, *exc):
        if self.held:
            self.held = False
            self.keeper.c_leave()
        return False

    def __dealloc__(self):
        if self.held and self.keeper is not None:
            self.held = False
            self.keeper.c_leave()


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
    All fields are used with the GIL held, except ``lost``.

    ``lost`` is set by the SIGBUS guard (csrc/ivshm_guard.h), from a signal handler in whatever
    thread faulted, when another process truncated the memory under the mapping: the mapping is
    then private zero pages, and the guard also writes ``closed_fd`` so that sleepers wake.  Every
    operation checks ``lost`` after it touched the memory (one load and a branch) and raises
    RegionLostError, so nothing read from the zero pages is returned.  ``guard_id`` is the guard's
    registry slot (-1: not guarded, a memfd sealed against shrinking needs none).
    """
    cdef uint8_t *base
    cdef uint64_t size
    cdef bint closed
    cdef Py_ssize_t users
    cdef int closed_fd
    cdef int lost
    cdef int guard_id
    cdef uint64_t fork_gen  # _fork_gen in the process that made this mapping (and closed_fd)

    def __cinit__(self):
        self.fork_gen = _fork_gen
        self.base = NULL
        self.size = 0
        self.closed = False
        self.users = 0
        self.closed_fd = -1
        self.lost = 0
        self.guard_id = -1

    cdef object lost_error(self, what):
        return RegionLostError(
            f"{what}: the region's shared memory was truncated by another process (a peer shrank "
            "the file under this mapping), so its contents are gone; this process was kept alive "
            "by mapping zero pages over it.  Close the region and its rings and channels, and "
            "re-open it (or reconnect to the server for its memory)")

    cdef inline void enter(self):
        self.users += 1

    cdef inline void leave(self):
        self.users -= 1
        if self.closed and self.users == 0:
            self._unmap()

    cdef void _unmap(self):
        if self.guard_id >= 0:  # before the memory and the eventfd the guard would touch go
            ivshm_guard_remove(self.guard_id)
            self.guard_id = -1
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
        # Not in a forked child: its closed_fd is the parent's eventfd, and writing it would
        # wake (and fail) the parent's sleepers on a region the parent still uses.  The child's
        # own sleepers, if it made any, see the close at their next re-check.
        if self.closed_fd >= 0 and self.fork_gen == _fork_gen:
            _c_write(self.closed_fd, &one, 8)
        if self.users == 0:
            self._unmap()

    def __dealloc__(self):
        self._unmap()
        if self.closed_fd >= 0:
            _c_close(self.closed_fd)
            self.closed_fd = -1


cdef _Mapping _CLOSED_MAPPING = _Mapping.__new__(_Mapping)
_CLOSED_MAPPING.closed = True


# ---------------------------------------------------------------------------------------------
# Zero-copy views
# ---------------------------------------------------------------------------------------------

cdef class _ViewState:
    """What all views of one reserved or peeked slot share: valid until commit()/release() (or the
    handle's close), and the count of raw buffer exports alive, which commit()/release() refuse
    to outlive."""
    cdef _Mapping m
    cdef char *base
    cdef Py_ssize_t exports
    cdef bint valid
    cdef bint readonly
    cdef object what          # "reservation" or "peeked message", for messages


cdef _ViewState _new_state(_Mapping m, void *base, bint readonly):
    cdef _ViewState st = _ViewState.__new__(_ViewState)
    st.m = m
    st.base = <char *>base
    st.readonly = readonly
    st.valid = True
    st.what = "peeked message" if readonly else "reservation"
    return st


cdef SlotView _new_view(_ViewState st, Py_ssize_t off, Py_ssize_t n):
    cdef SlotView v = SlotView.__new__(SlotView)
    v.released = False
    v.st = st
    v.off = off
    v.n = n
    return v


cdef class SlotView:
    """A zero-copy view of a reserved slot (writable) or of a peeked message (read-only), returned
    by ``reserve()`` and ``peek()``.

    It behaves like a one-dimensional memoryview of bytes: ``len(v)``, ``v[i]``, ``v[a:b]`` (a
    SlotView of the same slot), ``v[a:b] = data``, ``bytes(v)``, ``v.tobytes()``, ``v == b"..."``,
    ``v.nbytes``, ``v.readonly``, ``v.release()``, and the buffer protocol.  Unlike a memoryview it
    cannot outlive its message: after ``commit()``/``release()``, a later message, the handle's
    ``close()`` or the region's, every access to it or to any slice of it raises ClosedError
    instead of reading or writing another message.  A raw buffer export (``memoryview(v)``, a numpy
    array over it) cannot be revoked, so ``commit()``/``release()`` refuse with ViewInUseError while
    one is alive.
    """
    cdef _ViewState st
    cdef Py_ssize_t off
    cdef Py_ssize_t n
    cdef bint released

    def __cinit__(self):
        # one made by SlotView.__new__ has no slot: every use raises ClosedError (_ok looks at
        # `released` first); _new_view clears it
        self.released = True

    def __init__(self, *a, **k):
        raise TypeError("SlotViews are made by reserve() and peek()")

    cdef inline int _ok(self) except -1:
        if self.released:
            raise ClosedError("this view was released")
        if not self.st.valid:
            raise ClosedError(f"this view of a {self.st.what} is no longer valid: the message was "
                              "committed or released (or its ring handle closed); it would show "
                              "another message now")
        if self.st.m.closed:
            raise ClosedError("the region behind this view is closed")
        if self.st.m.lost:
            raise self.st.m.lost_error("a zero-copy view")
        return 0

    def __len__(self):
        self._ok()
        return self.n

    @property
    def nbytes(self):
        self._ok()
        return self.n

    @property
    def readonly(self):
        return self.st is None or self.st.readonly

    @property
    def format(self):
        return "B"

    @property
    def itemsize(self):
        return 1

    @property
    def ndim(self):
        return 1

    @property
    def shape(self):
        return (self.n,)

    @property
    def valid(self):
        """False once the message was committed/released, the view released, or the region closed."""
        return not self.released and self.st.valid and not self.st.m.closed

    def release(self):
        """Drop this view object (the reservation or peek stays open: commit()/release() it on the
        ring).  Idempotent, like memoryview.release()."""
        self.released = True

    def __enter__(self):
        self._ok()
        return self

    def __exit__(self, *exc):
        self.release()

    cdef Py_ssize_t _index(self, object i) except -1:
        cdef Py_ssize_t k = _operator.index(i)
        if k < 0:
            k += self.n
        if not 0 <= k < self.n:
            raise IndexError(f"index {i} out of range for a view of {self.n} bytes")
        return k

    def __getitem__(self, key):
        self._ok()
        cdef Py_ssize_t start, stop, step, length
        if PySlice_Check(key):
            PySlice_GetIndicesEx(key, self.n, &start, &stop, &step, &length)
            if step != 1:
                return self.tobytes()[key]  # strided: a copy
            return _new_view(self.st, self.off + start, length)
        cdef Py_ssize_t k = self._index(key)
        cdef uint8_t b = <uint8_t>self.st.base[self.off + k]
        self._ok()  # the read may have met the memory lost (the guard's zero pages)
        return b

    def __setitem__(self, key, value):
        self._ok()
        if self.st.readonly:
            raise ConfigError("this view is read-only (a peeked message); reserve() gives a writable one")
        cdef Py_ssize_t start, stop, step, k, length
        cdef Py_buffer buf
        cdef _ViewState st = self.st
        cdef _Mapping m
        if not PySlice_Check(key):
            k = self._index(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                raise ConfigError(f"a byte is an int from 0 to 255, not {value!r}")
            st.base[self.off + k] = <char>(<int>value)
            self._ok()
            return
        PySlice_GetIndicesEx(key, self.n, &start, &stop, &step, &length)
        if step != 1:
            raise ConfigError("slice assignment to a view needs a step of 1")
        stop = start + length
        if PyBytes_CheckExact(value) and PyBytes_GET_SIZE(value) == length and length <= 4096:
            memcpy(st.base + self.off + start, PyBytes_AS_STRING(value), length)  # the hot path
            self._ok()
            return
        PyObject_GetBuffer(value, &buf, PyBUF_SIMPLE)
        try:
            if buf.len != stop - start:
                raise ConfigError(f"cannot assign {buf.len} bytes to a slice of {stop - start} bytes "
                                  "(lengths must match, as for memoryview)")
            self._ok()  # getting the buffer may have run Python code
            if <uint64_t>buf.len <= _NOGIL_BYTES:
                memcpy(st.base + self.off + start, buf.buf, buf.len)
            else:
                # counted as an export while the GIL is released, so a commit() from another
                # thread cannot publish the slot in the middle of the copy
                m = st.m
                st.exports += 1
                m.enter()
                try:
                    with nogil:
                        memcpy(st.base + self.off + start, buf.buf, buf.len)
                finally:
                    st.exports -= 1
                    m.leave()
        finally:
            PyBuffer_Release(&buf)
        self._ok()

    def tobytes(self):
        self._ok()
        out = PyBytes_FromStringAndSize(self.st.base + self.off, self.n)
        self._ok()  # the copy may have met the memory lost (the guard's zero pages)
        return out

    def __bytes__(self):
        return self.tobytes()

    def hex(self, *args):
        return self.tobytes().hex(*args)

    def tolist(self):
        return list(self.tobytes())

    def __iter__(self):
        return iter(self.tobytes())

    def __eq__(self, other):
        if isinstance(other, SlotView):
            return self.tobytes() == (<SlotView>other).tobytes()
        try:
            mv = memoryview(other)
        except TypeError:
            return NotImplemented
        with mv:
            return mv.format in ("B", "b", "c") and mv.ndim <= 1 and self.tobytes() == mv.tobytes()

    def __ne__(self, other):
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    __hash__ = None

    def __repr__(self):
        if self.st is None:
            return "<pyivshmem.SlotView of nothing>"
        state = "valid" if self.valid else "invalid"
        kind = "read-only" if self.st.readonly else "writable"
        return f"<pyivshmem.SlotView {kind} {self.n} bytes, {state}>"

    def __getbuffer__(self, Py_buffer *buf, int flags):
        self._ok()
        if self.st.readonly and (flags & PyBUF_WRITABLE):
            raise ConfigError("this view is read-only (a peeked message)")
        PyBuffer_FillInfo(buf, self, self.st.base + self.off, self.n, self.st.readonly, flags)
        self.st.exports += 1
        self.st.m.enter()

    def __releasebuffer__(self, Py_buffer *buf):
        self.st.exports -= 1
        self.st.m.leave()


cdef int _retire(_ViewState st, what) except -1:
    """Invalidate the views of a slot at commit()/release(); refused while raw exports live."""
    if st.exports > 0:
        raise ViewInUseError(
            f"{what}: {st.exports} buffer export(s) of the zero-copy view are still alive (a "
            "memoryview(view), a numpy array over it...): release them first, they would otherwise "
            "see a later message")
    st.valid = False
    return 0


# ---------------------------------------------------------------------------------------------
# Region
# ---------------------------------------------------------------------------------------------

cdef class Region:
    """A shared-memory region: a header, a directory of named rings, the rings.

    Make one with :meth:`create`, :meth:`open` or :meth:`from_fd`.  The size is a power of two
    (QEMU requires it of ivshmem memory).  Closing it, from any thread, makes every later call on
    it and on its rings raise ClosedError; the memory is unmapped once no call is inside it and no
    zero-copy buffer of it is exported.  A context manager.
    """
    cdef ivshm_region _r
    cdef _Mapping _m
    cdef uint64_t _size
    cdef int _fd
    cdef object _path
    cdef object _handles       # the ring handles made from this region (weak), for close()

    def __cinit__(self):
        self._fd = -1

    # -- construction -------------------------------------------------------------------------
    @staticmethod
    def _check_size(size, what):
        if size > MAX_REGION_SIZE or ivshm_region_size_ok(<uint64_t>size) != 0:
            raise ConfigError(
                f"{what} is {size} bytes: a region must be a power of two of at least "
                f"{IVSHM_MIN_REGION_SIZE} bytes (QEMU requires a power of two) and at most "
                f"{MAX_REGION_SIZE}; e.g. 64K, 16M, 1G")

    @classmethod
    def create(cls, path, size, *, exist_ok=True, mode=0o600):
        """Create a region file at ``path`` (e.g. /dev/shm/name or a hugetlbfs file) of ``size``
        bytes (int or "64K"/"16M"/"1G") and format it.  If the file exists, the region there is
        opened (its size must match) unless ``exist_ok=False``, which refuses it with
        AlreadyExistsError; ``exist_ok`` means the same for ``create_ring``."""
        n = parse_size(size, "size")
        Region._check_size(n, "the requested size")
        mode = _int_arg(mode, "mode", 0, 0o7777)
        path = _fspath(path, "path")
        flags = _os.O_RDWR | _os.O_CREAT | _os.O_EXCL | _os.O_NOFOLLOW | _os.O_CLOEXEC
        try:
            fd = _os.open(path, flags, mode)
        except FileExistsError:
            if not exist_ok:
                raise AlreadyExistsError(
                    _errno.EEXIST, f"region file {path} already exists: use Region.open({path!r}) "
                    "to attach to it, or exist_ok=True") from None
            region = cls.open(path, format_if_empty=True)
            if region.size != n:
                region.close()
                raise ConfigError(f"region file {path} exists with size {region.size}, not {n}")
            return region
        except OSError as e:
            raise _os_error(e, f"cannot create region file {path}") from None
        try:
            huge = _huge_page_size(fd)
            if huge and n % huge:
                raise ConfigError(
                    f"{path} is on hugetlbfs with {huge >> 10}K pages: a region there must be a "
                    f"multiple of the huge page size and a power of two, so at least {huge} bytes "
                    f"(asked {n}); use size={huge} or more")
            try:
                _os.ftruncate(fd, n)
            except OSError as e:
                raise SystemCallError(e.errno, f"cannot size region file {path} to {n} bytes: "
                                      f"{e.strerror} (on hugetlbfs the size must be a multiple of "
                                      "the huge page size)") from None
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
        path = _fspath(path, "path")
        try:
            fd = _os.open(path, _os.O_RDWR | _os.O_CLOEXEC)
        except FileNotFoundError:
            raise RegionNotFoundError(
                _errno.ENOENT, f"no region file at {path}: create it with Region.create(path, size)") from None
        except OSError as e:
            raise _os_error(e, f"cannot open region file {path}") from None
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
    def from_fd(cls, fd, *, size=None, offset=0, format_if_empty=True):
        """Attach to memory behind a file descriptor (a memfd, the server's memory fd, a VFIO
        device fd with ``offset``).  ``fd`` is duplicated; the caller keeps its own.  For a regular
        file (a memfd, a /dev/shm file), ``offset + size`` must lie within it (ConfigError
        otherwise).  A memfd that allows sealing is sealed against shrinking (F_SEAL_SHRINK, for
        every process that shares it), so no peer can truncate it under the others; memory that
        cannot be sealed is covered by the SIGBUS guard (RegionLostError, docs/trust.md)."""
        fd = _int_arg(fd, "fd", 0, 2**31 - 1)
        offset = _int_arg(offset, "offset", 0, 2**62)
        if offset % _mmap.PAGESIZE:
            raise ConfigError(f"offset {offset} must be a multiple of the page size ({_mmap.PAGESIZE})")
        try:
            st = _os.fstat(fd)
        except OSError as e:
            raise _os_error(e, f"fd {fd}") from None
        if size is None:
            n = st.st_size - offset if st.st_size > offset else 0
        else:
            n = parse_size(size, "size")
        Region._check_size(n, f"the memory behind fd {fd}")
        if _stat.S_ISREG(st.st_mode) and offset + n > st.st_size:
            raise ConfigError(f"fd {fd} holds {st.st_size} bytes: a region of {n} bytes at offset "
                              f"{offset} does not fit in it (pass a smaller size, or none to use "
                              "the file's)")
        if _stat.S_ISREG(st.st_mode):
            try:
                _seal_shrink(fd)
            except OSError as e:
                raise SystemCallError(e.errno, f"cannot seal fd {fd} against shrinking: "
                                      f"{e.strerror}") from None
        try:
            dup = _os.dup(fd)
        except OSError as e:
            raise _os_error(e, f"cannot duplicate fd {fd}") from None
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
            raise SystemCallError(e, f"cannot make an eventfd for the region: {_os.strerror(e)}")
        cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, <long>offset)
        if p == MAP_FAILED:
            e = errno
            huge = _huge_page_size(fd)
            if huge and e in (_errno.ENOMEM, _errno.ENOSPC):
                # hugetlbfs reserves every page of a shared mapping at mmap time
                raise SystemCallError(
                    e, f"cannot map {size} bytes of {path or 'fd %d' % fd} on hugetlbfs: not enough "
                    f"free huge pages ({size // huge} of {huge >> 10}K needed; {_huge_pages_free(huge)}). "
                    f"Reserve them as root, e.g. \"echo {max(64, size // huge)} > "
                    "/proc/sys/vm/nr_hugepages\" (or the pool of this page size under "
                    "/sys/kernel/mm/hugepages/)")
            raise SystemCallError(e, f"cannot map {size} bytes of {path or 'fd %d' % fd}: {_os.strerror(e)}")
        m.base = <uint8_t *>p  # m._unmap() undoes everything from here on
        m.size = size
        cdef int rc
        where = path or f"fd {fd}"
        if _may_shrink(fd):
            # Another process could truncate the file under us: guard the mapping (SIGBUS ->
            # zero pages and RegionLostError instead of death).
            rc = ivshm_guard_add(p, size, &m.lost, m.closed_fd)
            if rc < 0:
                m._unmap()
                if rc == -_errno.ENOSPC:
                    raise SystemCallError(
                        _errno.ENOSPC, f"cannot open {where}: this process already has "
                        f"{IVSHM_GUARD_MAX} regions open whose memory another process could "
                        "truncate (the SIGBUS guard's limit); close some, or use memory the "
                        "server seals (its default memfd)")
                raise SystemCallError(-rc, f"cannot install the SIGBUS guard for {where}: "
                                      f"{_os.strerror(-rc)}")
            m.guard_id = rc
        cdef uint64_t gen = int.from_bytes(_os.urandom(8), "little") | 1
        with nogil:
            rc = ivshm_region_attach(&self._r, p, size, flags, gen, _FORMAT_WAIT_MS)
        if m.lost:
            m._unmap()
            raise m.lost_error(f"attach to {where}")
        if rc != 0:
            m._unmap()
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
        self._m = m
        self._size = size
        self._fd = fd
        self._path = path
        self._handles = _weakref.WeakSet()
        return self

    # -- lifetime -----------------------------------------------------------------------------
    def close(self):
        """Close the region, from any thread; idempotent, never raises.  Calls that start later,
        on the region or its rings, raise ClosedError, and so do blocked sleepers of this process.
        Open reservations and peeks of its MPMC ring handles are given back first (as their
        handles' close() does).  The memory is unmapped now, or, while calls are inside it with the
        GIL released or zero-copy buffers are exported, when the last of them leaves."""
        cdef _Mapping m = self._m
        cdef _Ring ring
        if m is None or m.closed:
            return
        if self._handles is not None:
            for h in list(self._handles):
                ring = <_Ring>h
                try:
                    ring._drop_zero_copy(False)
                except Exception:
                    pass  # a ring whose views are still exported keeps its claim; nothing to raise
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                _os.close(fd)
            except OSError:
                pass
        m._close()
        # The region and its ring handles forget the mapping (the handles see a closed stand-in):
        # once views, channels and calls in flight that hold it have gone too, it dies and its
        # eventfd is closed, so closed objects that are still referenced hold no descriptor.
        self._m = None
        if self._handles is not None:
            for h in list(self._handles):
                (<_Ring>h)._m = _CLOSED_MAPPING

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
        """ClosedError, or RegionLostError once another process truncated the memory; called
        before and after each operation (the memory may be lost during it)."""
        if self._m is None or self._m.closed:
            raise ClosedError("the region is closed")
        if self._m.lost:
            raise self._m.lost_error(f"region {self._path or 'fd'}")
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
        self._ensure_open()
        if rc != 0:
            raise _error_from_code(rc, "region check",
                                   "the region was re-formatted (generation changed); re-open it"
                                   if rc == -ESTALE else "the region header's magic is gone")

    # -- rings ------------------------------------------------------------------------------
    def create_ring(self, name, kind="spsc", *, slot_size=256, capacity=1024, exist_ok=True,
                    slow=None, slow_timeout=None):
        """Create a ring of ``capacity`` slots (a power of two) carrying messages of up to
        ``slot_size`` bytes.  If a ring of that name exists with the same shape it is opened
        (safe when several processes do it at once), unless ``exist_ok=False``, which refuses it
        with AlreadyExistsError; one of another shape is refused with ConfigError.  No room in the
        region: RegionFullError.  ``kind="pubsub"`` makes a publish-subscribe ring
        (:class:`PubSubRing`); ``slow`` ("block", the default, or "drop") and ``slow_timeout``
        (seconds, default 1.0) say what happens to subscribers that fall behind (docs/pubsub.md)."""
        self._ensure_open()
        bname = _ring_name(name)
        if not isinstance(kind, str) or kind not in _KINDS:
            raise ConfigError(f"unknown ring kind {kind!r}: use 'spsc', 'mpmc' or 'pubsub'")
        cdef uint32_t k = _KINDS[kind]
        cdef uint32_t pol = IVSHM_PUBSUB_BLOCK
        cdef int64_t slow_ns = 0
        if k == IVSHM_KIND_PUBSUB:
            slow = "block" if slow is None else slow
            if slow not in ("block", "drop"):
                raise ConfigError(f"slow must be 'block' or 'drop', not {slow!r}")
            pol = IVSHM_PUBSUB_BLOCK if slow == "block" else IVSHM_PUBSUB_DROP
            slow_ns = _seconds_ns(1.0 if slow_timeout is None else slow_timeout, "slow_timeout",
                                  False)
        elif slow is not None or slow_timeout is not None:
            raise ConfigError(f"slow and slow_timeout apply to kind='pubsub' rings, not {kind!r}")
        slot_size = parse_size(slot_size, f"slot_size (the slot size of ring {name!r})")
        if slot_size > IVSHM_MAX_SLOT_SIZE:
            raise ConfigError(f"slot_size (the slot size of ring {name!r}) is {slot_size}: at most "
                              f"{IVSHM_MAX_SLOT_SIZE} bytes")
        capacity = _int_arg(capacity, f"capacity of ring {name!r}", -2**63, 2**63)
        if not 2 <= capacity <= IVSHM_MAX_CAPACITY or capacity & (capacity - 1):
            raise ConfigError(f"capacity of ring {name!r} is {capacity}: it must be a power of two "
                              f"between 2 and {IVSHM_MAX_CAPACITY} slots")
        cdef ivshm_ring_info info
        cdef const char *why = NULL
        cdef uint64_t token = int.from_bytes(_os.urandom(8), "little") | 1
        cdef int rc
        cdef const char *cname = bname
        cdef uint32_t ss = slot_size
        cdef uint32_t cap = capacity
        cdef _Mapping m = self._m
        m.enter()
        try:
            with nogil:
                if k == IVSHM_KIND_PUBSUB:
                    rc = ivshm_pubsub_create(&self._r, cname, ss, cap, pol, <uint64_t>slow_ns,
                                             token, _LOCK_WAIT_MS, &info, &why)
                else:
                    rc = ivshm_region_create_ring(&self._r, cname, k, ss, cap, token,
                                                  _LOCK_WAIT_MS, &info, &why)
        finally:
            m.leave()
        self._ensure_open()
        if rc == 1 and not exist_ok:
            raise AlreadyExistsError(_errno.EEXIST, f"a ring named {name!r} already exists in this "
                                     "region (exist_ok=False); open it with region.ring(name)")
        if rc < 0:
            detail = why.decode() if why != NULL else None
            if rc == -EEXIST and k == IVSHM_KIND_PUBSUB:
                raise ConfigError(f"cannot create pubsub ring {name!r} (slot_size={slot_size}, "
                                  f"capacity={capacity}, slow={slow!r}, slow_timeout="
                                  f"{slow_ns / 1e9:g}): {detail}")
            if rc == -EEXIST:
                raise ConfigError(f"ring {name!r} exists as {_KIND_NAMES.get(info.kind, '?')} with "
                                  f"slot_size={info.slot_size}, capacity={info.capacity}; asked for "
                                  f"{kind} with slot_size={slot_size}, capacity={capacity}")
            if rc == -ENOSPC:
                need = ivshm_ring_bytes(k, ss, cap)
                raise RegionFullError(f"cannot create ring {name!r}: {detail}; it needs {need} bytes "
                                      f"and the region has {self._size} in all: use a larger region "
                                      "or a smaller ring")
            raise _ring_error(rc, f"create ring {name!r}", why, name)
        return self._attach(&info)

    def ring(self, name):
        """Open an existing ring by name (RingNotFoundError, a KeyError, if there is none)."""
        self._ensure_open()
        bname = _ring_name(name)
        cdef ivshm_ring_info info
        cdef const char *why = NULL
        cdef int rc = ivshm_region_find_ring(&self._r, bname, &info, &why)
        self._ensure_open()
        if rc == -ENOENT:
            known = [r.get("name") for r in self.rings()]
            raise RingNotFoundError(f"no ring named {name!r} in this region (rings: {known})")
        if rc < 0:
            raise _ring_error(rc, f"open ring {name!r}", why, name)
        return self._attach(&info)

    cdef object _attach(self, ivshm_ring_info *info):
        cls = (SpscRing if info.kind == IVSHM_KIND_SPSC else
               PubSubRing if info.kind == IVSHM_KIND_PUBSUB else MpmcRing)
        cdef _Ring ring
        cdef _Mapping m = self._m
        m.enter()  # _init reads the control block after Python allocations
        try:
            ring = cls.__new__(cls)
            ring._init(self, info)
        except BaseException:
            if m.lost:  # what _init found wrong was the guard's zero pages
                raise m.lost_error(f"open ring {info.name.decode('utf-8', 'replace')!r}") from None
            raise
        finally:
            m.leave()
        self._ensure_open()
        self._handles.add(ring)
        return ring

    def rings(self):
        """The rings in this region: name, kind, capacity, slot_size, offset, size, count (messages
        waiting), producers_waiting, consumers_waiting.  Corrupt entries are listed with an error."""
        self._ensure_open()
        out = []
        cdef _Mapping m = self._m
        m.enter()  # Python code runs between the reads below: a thread switch could close us
        try:
            self._list_rings(out)
        finally:
            m.leave()
        self._ensure_open()
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
        """The region header as a dict: size, version, generation, rings (directory entries
        handed out), allocated and free bytes, directory_locked, and errors.  Any peer can write
        the header: a count out of its range is given as None, with the reason in ``errors``
        (empty when the header is sound)."""
        self._ensure_open()
        cdef ivshm_region_hdr *h = <ivshm_region_hdr *>self._m.base
        # copies first: no Python code (and so no thread switch) between the reads
        cdef uint32_t version = h.version, nrings = h.nrings
        cdef uint64_t gen = h.generation, alloc = h.alloc_off, lock = h.lock
        self._ensure_open()
        errors = []
        if version != IVSHM_LAYOUT_VERSION:
            errors.append(f"layout version {version} (this library reads "
                          f"{IVSHM_LAYOUT_VERSION}): overwritten since the region was opened")
        rings = nrings
        if nrings > IVSHM_MAX_RINGS:
            errors.append(f"ring count {nrings} is over the directory's {IVSHM_MAX_RINGS} entries")
            rings = None
        allocated = alloc
        if alloc < IVSHM_HDR_SIZE or alloc > self._size:
            errors.append(f"allocation offset {alloc} is outside the region's data area "
                          f"({IVSHM_HDR_SIZE}..{self._size})")
            allocated = None
        return {"size": self._size, "version": version, "generation": gen, "rings": rings,
                "allocated": allocated,
                "free": None if allocated is None else self._size - alloc,
                "directory_locked": lock != 0, "errors": errors}


def _may_shrink(int fd):
    """True if another process could truncate the file behind ``fd`` under a mapping of it: a
    regular file (a /dev/shm or hugetlbfs file, a memfd) that is not sealed against shrinking."""
    try:
        st = _os.fstat(fd)
    except OSError:
        return False
    if not _stat.S_ISREG(st.st_mode):
        return False  # a device (a VFIO BAR) cannot be truncated
    try:
        seals = _fcntl.fcntl(fd, _fcntl.F_GET_SEALS)
    except OSError:
        return True  # not a memfd: no seals
    return not (seals & _fcntl.F_SEAL_SHRINK)


def _seal_shrink(int fd):
    """Seal a memfd against shrinking where it allows sealing; a file that cannot be sealed (not
    a memfd: EINVAL; a memfd made without MFD_ALLOW_SEALING or already F_SEAL_SEAL'd: EPERM) is
    left as it is (the SIGBUS guard covers it)."""
    try:
        _fcntl.fcntl(fd, _fcntl.F_ADD_SEALS, _fcntl.F_SEAL_SHRINK)
    except OSError as e:
        if e.errno not in (_errno.EPERM, _errno.EINVAL):
            raise


def _fspath(path, what):
    try:
        p = _os.fspath(path)
    except TypeError:
        raise ConfigError(f"{what} must be a str or os.PathLike, not {type(path).__name__}") from None
    if isinstance(p, bytes):
        p = _os.fsdecode(p)
    if "\0" in p:
        raise ConfigError(f"{what} contains a NUL character")
    try:
        p.encode(_sys.getfilesystemencoding(), "surrogateescape")
    except UnicodeEncodeError:
        raise ConfigError(f"{what} {p!r} cannot be encoded as a file name") from None
    return p


_HUGETLBFS_MAGIC = 0x958458f6


def _huge_page_size(int fd):
    """The huge page size of the hugetlbfs that ``fd`` lives on, or 0 when it is not on one."""
    cdef statfs st
    if fstatfs(fd, &st) != 0:
        return 0
    if <unsigned long>st.f_type & 0xffffffff != _HUGETLBFS_MAGIC:
        return 0
    return st.f_bsize


def _huge_pages_free(huge):
    """What the kernel says about the pool of ``huge``-byte pages, for error messages."""
    base = f"/sys/kernel/mm/hugepages/hugepages-{huge >> 10}kB"
    try:
        with open(base + "/free_hugepages") as f:
            free = int(f.read())
        with open(base + "/nr_hugepages") as f:
            total = int(f.read())
    except (OSError, ValueError):
        return "free count unknown"
    return f"{free} free of {total} reserved"


def _os_error(e, context):
    """The IvshmemError for an OSError `e` met while doing `context`."""
    if isinstance(e, PermissionError):
        return AccessDeniedError(e.errno, f"{context}: permission denied")
    if isinstance(e, FileNotFoundError):
        return RegionNotFoundError(e.errno, f"{context}: {e.strerror}")
    return SystemCallError(e.errno, f"{context}: {e.strerror}")


def _ring_name(name):
    if not isinstance(name, str):
        raise ConfigError(f"ring names are str, not {type(name).__name__}")
    try:
        b = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"ring name {name!r} is not valid Unicode (a lone surrogate?)") from None
    if not 0 < len(b) < IVSHM_NAME_MAX:
        raise ConfigError(f"ring name {name!r} must be 1 to {IVSHM_NAME_MAX - 1} bytes of UTF-8")
    if b"\0" in b:
        raise ConfigError("ring names cannot contain NUL")
    return b


# ---------------------------------------------------------------------------------------------
# Rings
# ---------------------------------------------------------------------------------------------

cdef class _Ring:
    """Common part of SpscRing and MpmcRing.

    A handle is used by one thread at a time.  While it has an open reservation (``reserve()``
    without ``commit()``), it refuses other sends; while it holds a peeked message, it refuses
    other receives: either would overwrite or skip the message the view shows.
    """
    cdef Region _region
    cdef _Mapping _m
    cdef bint _closed
    cdef ivshm_ring_info _info
    cdef object _name
    cdef double _spin
    cdef _ViewState _wst       # the open reservation's views, or None
    cdef Py_ssize_t _wview_len # its reserved bytes, or -1
    cdef _ViewState _rst       # the peeked message's views, or None
    cdef uint64_t _zc_gen      # _fork_gen when the reservation or peek was made
    cdef ivshm_ring_ctrl *_ctrl
    cdef const char **_ptrs    # batch calls' pointer and length arrays (_batch_arrays), or NULL
    cdef uint64_t *_lens
    cdef object _channels      # the Channels over this handle (weak), woken by close(), or None
    cdef object __weakref__

    cdef Py_ssize_t _send_batch(self, seq, Py_ssize_t start, Py_ssize_t total) except -1:
        raise NotImplementedError  # rings that send in batches (SPSC, publish-subscribe)

    cdef Py_ssize_t _send_slow(self, seq, Py_ssize_t start, Py_ssize_t end) except -1:
        cdef Py_ssize_t i
        for i in range(start, end):
            if i >= PySequence_Fast_GET_SIZE(seq):
                return i - start  # another thread shortened the list: the rest is gone
            try:
                if self._send_obj(seq[i]) != 0:
                    return i - start
            except Exception as e:
                # too large, or not bytes-like (TypeError): the caller must learn how many of
                # the batch went before it, or it could not resend the rest exactly once
                e.sent = i
                raise
        return end - start

    cdef _send_many_batched(self, messages, timeout):
        """send_many of the rings with a _send_batch (arguments checked, then _send_many_from)."""
        self._check_send()
        cdef double t = _timeout_arg(timeout)
        seq = self._sequence(messages)
        return self._send_many_from(seq, 0, t, timeout)

    cdef Py_ssize_t _send_many_from(self, seq, Py_ssize_t start, double t, timeout) except -1:
        """send_many from message ``start`` of ``seq`` (a list or tuple), ``t`` a timeout that
        _timeout_arg validated: the index reached, so messages before it are sent.  An error
        about a message carries ``.sent``, counted from ``seq[0]``: a Channel resumes a batch at
        ``start`` without slicing it, and still tells its caller what went.  This one batches
        (rings with a _send_batch) until all are sent, the ring is full (t=0) or the wait for
        room ends."""
        cdef Py_ssize_t sent = start
        cdef _Waiter w = None
        cdef Py_ssize_t n
        while True:
            # its length again after each pause: the GIL was released, and another thread may
            # have shortened the list
            n = self._send_batch(seq, sent, PySequence_Fast_GET_SIZE(seq))
            sent += n
            if sent >= PySequence_Fast_GET_SIZE(seq) or t == 0:
                if self._m.lost: self._raise_lost()
                return sent
            if w is None:
                w = _Waiter.make(t, self._spin)
            elif n:
                w.progress()
            if not w.pause():
                if self._m.lost: self._raise_lost()
                return sent

    cdef int _batch_arrays(self) except -1:
        self._ptrs = <const char **>malloc(_BATCH * sizeof(char *))
        self._lens = <uint64_t *>malloc(_BATCH * sizeof(uint64_t))
        if self._ptrs == NULL or self._lens == NULL:
            raise MemoryError()
        return 0

    def __dealloc__(self):
        # (after a subclass's own __dealloc__) nothing of a reservation or a peek becomes visible
        # in shared memory without commit()/release(): the views no export holds go invalid
        if self._wst is not None and self._wst.exports == 0:
            self._wst.valid = False
        if self._rst is not None and self._rst.exports == 0:
            self._rst.valid = False
        free(self._ptrs)
        free(self._lens)

    def __cinit__(self):
        # one made by __new__ (not by a Region) has no ring: every call raises ClosedError
        self._closed = True
        self._m = _CLOSED_MAPPING

    cdef _init(self, Region region, ivshm_ring_info *info):
        self._region = region
        self._closed = False
        self._m = region._m
        self._info = info[0]
        self._ctrl = <ivshm_ring_ctrl *>(region._m.base + info.offset)
        self._name = info.name.decode("utf-8", "replace")
        self._spin = DEFAULT_SPIN
        self._wst = None
        self._wview_len = -1
        self._rst = None

    def __init__(self, *a, **k):
        raise TypeError("rings are made by Region.create_ring() or Region.ring()")

    cdef inline int _check(self) except -1:
        if self._closed:
            raise ClosedError(f"ring {self._name!r}: this handle is closed")
        if self._m.closed:
            raise ClosedError(f"ring {self._name!r}: its region is closed")
        if self._m.lost:  # also inside wait loops: a blocking call without a timeout must see it
            self._raise_lost()
        return 0

    cdef inline int _check_send(self) except -1:
        """_check, and refuse a send while this handle's reservation is open."""
        self._check()
        if self._wview_len >= 0:
            raise ConfigError(f"ring {self._name!r}: this handle has an open reservation; commit() "
                              "or cancel() it before sending other messages (a send now would "
                              "overwrite or overtake it)")
        return 0

    cdef inline int _check_recv(self) except -1:
        """_check, and refuse a receive while this handle holds a peeked message."""
        self._check()
        if self._rst is not None:
            raise ConfigError(f"ring {self._name!r}: this handle holds a peeked message; release() "
                              "it before receiving others")
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

    @property
    def spin(self):
        """Seconds a blocking call busy-polls before it starts sleeping."""
        return self._spin

    @spin.setter
    def spin(self, value):
        cdef double s = _timeout_arg(value, "spin")
        if s < 0:
            raise ConfigError("spin must be a number of seconds, not None")
        self._spin = s

    def close(self):
        """Drop this handle (the ring stays in the region).  Idempotent.  An open reservation is
        given back (MPMC: the slot is handed back, or committed as an empty message when other
        producers claimed slots after it; SPSC: nothing was visible yet); a held MPMC peek is
        released (the message counts as received; an SPSC peek leaves the message queued).  Raises
        ViewInUseError, and stays open, while a raw buffer export of such a view is alive."""
        if self._closed:
            return
        if not self._m.closed:
            self._drop_zero_copy(True)
        self._closed = True
        if self._channels is not None:
            # their calls asleep on a doorbell would otherwise sleep on until their re-check:
            # woken, they find this handle closed and raise ClosedError
            for ch in list(self._channels):
                ch._ring_closed()

    cdef int _drop_zero_copy(self, bint strict) except -1:
        """Give back an open reservation or peek (see close()).  With raw exports alive: raise if
        strict, else leave them."""
        if self._wst is not None:
            if self._wst.exports > 0:
                if strict:
                    _retire(self._wst, f"close ring {self._name!r}")
            else:
                _retire(self._wst, "")
                self._wst = None
                self._wview_len = -1
                if self._zc_gen == _fork_gen and not self._m.closed:
                    self._give_back_reservation()
        if self._rst is not None:
            if self._rst.exports > 0:
                if strict:
                    _retire(self._rst, f"close ring {self._name!r}")
            else:
                _retire(self._rst, "")
                self._rst = None
                if self._zc_gen == _fork_gen and not self._m.closed:
                    self._give_back_peek()
        return 0

    cdef int _give_back_reservation(self) except -1:
        return 0

    cdef int _give_back_peek(self) except -1:
        return 0

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self._name is None:
            return f"<pyivshmem.{type(self).__name__} of no ring>"
        return f"<pyivshmem.{type(self).__name__} {self._name!r} capacity={self.capacity} slot_size={self.slot_size}>"

    cdef int _raise_lost(self) except -1:
        raise self._m.lost_error(f"ring {self._name!r}")

    cdef object _corrupt(self, int rc, const char *why, uint64_t a, uint64_t b, what):
        if self._m.lost:  # the "corruption" is the guard's zero pages
            return self._m.lost_error(f"{what} on ring {self._name!r}")
        err = _error_from_code(rc, f"{what} on ring {self._name!r}", _detail(why, a, b))
        if isinstance(err, CorruptionError):
            err.ring = self._name
        return err

    # subclass hooks ---------------------------------------------------------------------------
    cdef int _send_ptr(self, const char *p, uint64_t n) except -2:
        raise NotImplementedError

    cdef object _recv_raw(self):
        raise NotImplementedError

    @cython.final
    cdef object _recv_obj(self):
        """The next message or None (the subclass's _recv_raw), unless the memory was lost on
        the way: then RegionLostError, so zeros read from the guard's pages never come out."""
        msg = self._recv_raw()
        if self._m.lost:
            self._raise_lost()
        return msg

    cdef int _send_obj(self, data) except -2:
        """0 sent, -1 full."""
        cdef Py_buffer buf
        cdef int rc
        if PyBytes_CheckExact(data):
            rc = self._send_ptr(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        else:
            PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
            try:
                rc = self._send_ptr(<const char *>buf.buf, buf.len)
            finally:
                PyBuffer_Release(&buf)
        if self._m.lost:  # the message went into the guard's zero pages: nobody will see it
            self._raise_lost()
        return rc

    cdef _full_error(self, timeout):
        raise WaitTimeout(f"send on ring {self._name!r}: still full after {timeout} s "
                          f"({len(self)} of {self.capacity} slots in use); is the consumer running?")

    cdef _timeout_error(self, timeout):
        raise WaitTimeout(f"recv on ring {self._name!r}: nothing arrived within {timeout} s")

    cdef int _stalled_sending(self, timeout, Py_ssize_t sent) except -1:
        """Raise StallError if the producers of this ring are stuck at a dead consumer's slot."""
        return 0

    cdef int _stalled_receiving(self, timeout) except -1:
        """Raise StallError if the consumers of this ring are stuck at a dead producer's slot."""
        return 0

    cdef object _sequence(self, messages):
        if type(messages) is list or type(messages) is tuple:
            return messages
        if isinstance(messages, _abc.Sequence) and not isinstance(messages, (str, bytes, bytearray)):
            return list(messages)  # the caller keeps the original to slice the rest from
        raise ConfigError(
            f"send_many needs a sequence of messages (a list or tuple), not {type(messages).__name__}: "
            "it returns how many were sent, and the rest, messages[n:], must still be there to "
            "retry; pass list(...) of an iterator or generator")

    # public, common ---------------------------------------------------------------------------
    def try_send(self, data):
        """Send one message if there is room: True if sent, False if the ring is full.  Never
        waits."""
        return self._send_obj(data) == 0

    def try_recv(self):
        """The next message as bytes, or None if the ring is empty.  Never waits."""
        return self._recv_obj()

    def send(self, data, timeout=None):
        """Send, waiting up to ``timeout`` seconds (None: forever) for room; WaitTimeout if the
        ring stays full (StallError if an MPMC consumer died holding the slot producers need).
        Waits by spinning for ``self.spin`` seconds, then sleeping briefly."""
        cdef double t = _timeout_arg(timeout)
        if self._send_obj(data) == 0:
            return
        cdef _Waiter w = _Waiter.make(t, self._spin)
        while w.pause():
            if self._send_obj(data) == 0:
                return
        self._stalled_sending(timeout, -1)
        self._full_error(timeout)

    def recv(self, timeout=None):
        """Receive, waiting up to ``timeout`` seconds (None: forever); WaitTimeout if none came
        (StallError if an MPMC producer died holding the slot consumers need)."""
        cdef double t = _timeout_arg(timeout)
        msg = self._recv_obj()
        if msg is not None:
            return msg
        cdef _Waiter w = _Waiter.make(t, self._spin)
        while w.pause():
            msg = self._recv_obj()
            if msg is not None:
                return msg
        self._stalled_receiving(timeout)
        self._timeout_error(timeout)


cdef class SpscRing(_Ring):
    """Single-producer single-consumer ring.  Exactly one process (or thread) sends and one
    receives.  Messages longer than ``slot_size`` are split over consecutive slots automatically
    (up to ``capacity * slot_size`` bytes) and arrive whole."""
    cdef ivshm_spsc _q
    cdef uint32_t _peeked_slots  # slots of the message peek() validated, consumed by release()

    cdef _init(self, Region region, ivshm_ring_info *info):
        _Ring._init(self, region, info)
        cdef const char *why = NULL
        rc = ivshm_spsc_attach(&self._q, &region._r, info, &why)
        if rc != 0:
            raise _ring_error(rc, f"open ring {self._name!r}", why, self._name)
        self._batch_arrays()

    @property
    def kind(self):
        return "spsc"

    @property
    def max_message(self):
        """Largest message this ring carries (it is split over up to ``capacity`` slots)."""
        return <uint64_t>self._info.capacity * self._info.slot_size

    def __len__(self):
        self._check()
        n = ivshm_spsc_count(&self._q)
        if self._m.lost: self._raise_lost()
        return n

    cdef int _send_ptr(self, const char *p, uint64_t n) except -2:
        self._check_send()
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

    cdef object _recv_raw(self):
        self._check_recv()
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
        """Send messages from the front of ``messages`` (a list or tuple; other sequences are
        copied first, iterators are refused since their unsent rest would be lost) with one
        publish per batch.  With ``timeout=0`` (default) it stops when the ring is full; otherwise
        it waits up to ``timeout`` seconds (None: forever) for room.  Returns how many were sent:
        the rest are ``messages[n:]``.  A message too large raises MessageTooLargeError with
        ``.sent``, the number sent before it."""
        return self._send_many_batched(messages, timeout)

    cdef Py_ssize_t _send_batch(self, seq, Py_ssize_t start, Py_ssize_t total) except -1:
        cdef Py_ssize_t k, n, done = 0
        cdef int rc = 0
        cdef object item, keep
        cdef PyObject **items
        cdef _Mapping mp = self._m
        cdef uint64_t nbytes
        while True:
            # (again after each copy without the GIL: another thread may have changed the list,
            # moving its items array or shortening it)
            if total > PySequence_Fast_GET_SIZE(seq):
                total = PySequence_Fast_GET_SIZE(seq)
            if start + done >= total:
                break
            try:
                self._check_send()  # the GIL may have been released: the region may have been closed
            except BaseException as e:
                # after a batch that went: the caller (a Channel waking the receivers for them)
                # must learn how many did
                e.sent = start + done
                raise
            items = <PyObject **>PySequence_Fast_ITEMS(seq)
            n = total - start - done
            if n > _BATCH:
                n = _BATCH
            # gather pointers with the GIL (bytes fast path; other buffers are converted)
            nbytes = 0
            for k in range(n):
                item = <object>items[start + done + k]
                if not PyBytes_CheckExact(item):
                    k = self._send_slow(seq, start + done, start + done + n)
                    done += k
                    if k < n:
                        return done
                    break
                self._ptrs[k] = PyBytes_AS_STRING(item)
                self._lens[k] = PyBytes_GET_SIZE(item)
                nbytes += self._lens[k]
            else:
                if nbytes <= _NOGIL_BYTES:
                    # a short copy keeps the GIL: no other thread can free the messages meanwhile
                    rc = self._write_n(n, &k)
                else:
                    # the pointers are borrowed from the caller's list, which another thread may
                    # change while the GIL is released: hold the batch's messages until done
                    keep = seq[start + done:start + done + n]
                    mp.enter()
                    try:
                        with nogil:
                            rc = self._write_n(n, &k)
                    finally:
                        mp.leave()
                    keep = None
                done += k
                if rc == -EAGAIN:
                    return done
                if rc != 0:
                    self._send_error(rc, start + done)
        return done

    cdef int _write_n(self, Py_ssize_t n, Py_ssize_t *written) noexcept nogil:
        """Write the n gathered messages and publish (as they go, every _OVERLAP_BYTES): 0, or
        the error that stopped it; *written says how many went."""
        cdef Py_ssize_t k = 0
        cdef int rc = 0
        cdef uint64_t pending = 0
        while k < n:
            rc = ivshm_spsc_write(&self._q, self._ptrs[k], self._lens[k])
            if rc != 0:
                break
            pending += self._lens[k]
            if pending >= _OVERLAP_BYTES:
                # much written: let the consumer start on it now
                ivshm_spsc_publish(&self._q)
                pending = 0
            k += 1
        ivshm_spsc_publish(&self._q)
        written[0] = k
        return rc

    cdef _send_error(self, int rc, Py_ssize_t index):
        if rc == -EMSGSIZE:
            err = MessageTooLargeError(
                f"message {index} does not fit ring {self._name!r} (at most {self.max_message} "
                f"bytes); the {index} before it were sent")
            err.sent = index
            raise err
        err = self._corrupt(rc, self._q.why, self._q.why_a, self._q.why_b, "send_many")
        err.sent = index
        raise err

    def recv_many(self, max_count=_BATCH, timeout=0.0):
        """Up to ``max_count`` messages that are already there, as a list (one release for all),
        and no more once about 1 MiB is gathered (at least one message).  With ``timeout`` > 0
        or None, waits that long for the first one; ``timeout=0`` (default) never waits."""
        self._check_recv()
        cdef Py_ssize_t maxc = _size_arg(max_count, "max_count", 0, PY_SSIZE_T_MAX)
        cdef double t = _timeout_arg(timeout)
        cdef list out = []
        cdef ivshm_spsc_msg m
        cdef int rc = 0
        cdef Py_ssize_t got = 0
        cdef _Waiter w = None
        cdef object b
        cdef char *dst
        cdef uint64_t gathered = 0, released = 0
        cdef _Mapping mp = self._m
        while True:
            self._check()
            mp.enter()
            try:
                while got < maxc and gathered < _BATCH_BYTES and not mp.closed:
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
                    got += 1
                    gathered += m.len
                    released += m.len
                    if released >= _OVERLAP_BYTES:
                        ivshm_spsc_release(&self._q)  # much read: hand the slots back now
                        released = 0
                ivshm_spsc_release(&self._q)
            finally:
                mp.leave()
            if rc != 0 and rc != -EAGAIN and got == 0:
                raise self._corrupt(rc, self._q.why, self._q.why_a, self._q.why_b, "recv_many")
            if got or t == 0 or maxc <= 0:
                if self._m.lost: self._raise_lost()
                return out
            if w is None:
                w = _Waiter.make(t, self._spin)
            if not w.pause():
                if self._m.lost: self._raise_lost()
                return out

    def recv_into(self, buffer):
        """Receive the next message into a writable buffer: its length, or None if the ring is
        empty.  Never waits.  MessageTooLargeError if the buffer is too small (the message stays
        queued)."""
        self._check_recv()
        cdef Py_buffer buf
        cdef ivshm_spsc_msg m
        cdef int rc
        cdef _Mapping mp = self._m
        _get_writable(buffer, &buf)
        try:
            self._check_recv()  # getting the buffer may have run Python code
            mp.enter()
            try:
                rc = ivshm_spsc_next(&self._q, &m)
                if rc == -EAGAIN:
                    if self._m.lost: self._raise_lost()
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
        if self._m.lost: self._raise_lost()
        return m.len

    # zero copy -------------------------------------------------------------------------------
    def reserve(self, size):
        """A writable SlotView of ``size`` bytes inside the next free slot, or None if the ring is
        full.  Fill it, then :meth:`commit` (or :meth:`cancel`); the view is invalid afterwards.
        Until then this handle refuses other sends."""
        self._check()
        if self._wview_len >= 0:
            raise ConfigError(f"ring {self._name!r}: a reservation is already open; commit() or "
                              "cancel() it first")
        cdef Py_ssize_t n = _size_arg(size, "size", 0, 2**62)
        cdef uint8_t *p = NULL
        cdef int rc = ivshm_spsc_reserve(&self._q, n, &p)
        if rc == -EAGAIN:
            if self._m.lost: self._raise_lost()
            return None
        if rc == -EMSGSIZE:
            raise MessageTooLargeError(f"reserve({size}) on ring {self._name!r}: zero-copy messages "
                                       f"are at most one slot ({self.slot_size} bytes)")
        if rc != 0:
            raise self._corrupt(rc, self._q.why, self._q.why_a, self._q.why_b, "reserve")
        self._wst = _new_state(self._m, p, False)
        self._wview_len = n
        self._zc_gen = _fork_gen
        if self._m.lost: self._raise_lost()
        return _new_view(self._wst, 0, n)

    def commit(self, size=None):
        """Publish the reserved slot with ``size`` bytes (default: all that was reserved).  The
        reservation's views become invalid; ViewInUseError while a raw export of one is alive."""
        self._check()
        if self._wview_len < 0:
            raise ConfigError(f"ring {self._name!r}: commit() without reserve()")
        cdef Py_ssize_t n = self._wview_len if size is None else _size_arg(size, "size", 0, self._wview_len)
        _retire(self._wst, f"commit on ring {self._name!r}")
        self._wst = None
        self._wview_len = -1
        ivshm_spsc_commit(&self._q, <uint32_t>n)
        if self._m.lost: self._raise_lost()

    def cancel(self):
        """Drop the open reservation without sending anything; its views become invalid."""
        self._check()
        if self._wview_len < 0:
            raise ConfigError(f"ring {self._name!r}: cancel() without reserve()")
        _retire(self._wst, f"cancel on ring {self._name!r}")
        self._wst = None
        self._wview_len = -1

    def peek(self):
        """A read-only SlotView of the next message without consuming it, or None if the ring is
        empty.  Call :meth:`release` when done; the view is invalid afterwards.  Until then this
        handle refuses other receives."""
        self._check()
        if self._rst is not None:
            raise ConfigError(f"ring {self._name!r}: a peeked message is still held; release() it first")
        cdef ivshm_spsc_msg m
        cdef int rc = ivshm_spsc_next(&self._q, &m)
        if rc == -EAGAIN:
            if self._m.lost: self._raise_lost()
            return None
        if rc != 0:
            raise self._corrupt(rc, self._q.why, self._q.why_a, self._q.why_b, "peek")
        if m.nslots != 1:
            raise MessageTooLargeError(f"the next message on ring {self._name!r} spans {m.nslots} "
                                       "slots and cannot be viewed in place: use recv()")
        self._rst = _new_state(self._m, <void *>m.data, True)
        self._peeked_slots = m.nslots
        self._zc_gen = _fork_gen
        if self._m.lost: self._raise_lost()
        return _new_view(self._rst, 0, m.len)

    def release(self):
        """Consume the peeked message; its views become invalid (ViewInUseError while a raw
        export of one is alive)."""
        self._check()
        if self._rst is None:
            raise ConfigError(f"ring {self._name!r}: release() without peek()")
        _retire(self._rst, f"release on ring {self._name!r}")
        self._rst = None
        # the slots peek() validated, not a second look at shared memory a peer may have changed
        cdef ivshm_spsc_msg m
        m.nslots = self._peeked_slots
        ivshm_spsc_advance(&self._q, &m)
        ivshm_spsc_release(&self._q)
        if self._m.lost: self._raise_lost()


cdef int _get_writable(buffer, Py_buffer *buf) except -1:
    """A writable, contiguous buffer of `buffer`, or ConfigError saying why it is not one."""
    if buffer is None:
        raise ConfigError("recv_into needs a writable buffer (a bytearray, a writable memoryview), not None")
    try:
        PyObject_GetBuffer(buffer, buf, PyBUF_SIMPLE | PyBUF_WRITABLE)
    except (TypeError, BufferError) as e:
        raise ConfigError(f"recv_into needs a writable, contiguous buffer (a bytearray, a writable "
                          f"memoryview), not {type(buffer).__name__}: {e}") from None
    return 0


@cython.no_gc_clear  # __dealloc__ needs its fields to give back a forgotten claim
cdef class MpmcRing(_Ring):
    """Multi-producer multi-consumer ring (per-slot sequence numbers).  Any number of processes
    send and receive.  Messages are at most ``slot_size`` bytes.

    Only between cooperating peers: a producer that dies between reserving and committing a slot
    stalls consumers at that slot, and a consumer that dies between claiming a message and
    releasing it (in a receive, or holding a peek) stalls producers at that slot one lap later.
    Blocking calls report either as StallError naming the slot, :meth:`stalled` reports it, and
    :meth:`recover` (an operator's call, once the holder is known to be dead) gets the ring moving.
    """
    cdef ivshm_mpmc _q
    cdef object _pending_error    # corruption met in a batch that also returned good messages
    cdef uint64_t _wpos, _rpos

    cdef _init(self, Region region, ivshm_ring_info *info):
        _Ring._init(self, region, info)
        cdef const char *why = NULL
        rc = ivshm_mpmc_attach(&self._q, &region._r, info, &why)
        if rc != 0:
            raise _ring_error(rc, f"open ring {self._name!r}", why, self._name)

    def __dealloc__(self):
        # a forgotten reservation or peek would stall the ring for every process: give it back
        # (not in a child that inherited the handle, nor while a raw export could still use it)
        if self._m is None or self._m.base == NULL or self._zc_gen != _fork_gen:
            return
        if self._wst is not None and self._wst.exports == 0:
            self._wst.valid = False
            ivshm_mpmc_abandon(&self._q, self._wpos)
        if self._rst is not None and self._rst.exports == 0:
            self._rst.valid = False
            ivshm_mpmc_release_one(&self._q, self._rpos)

    cdef int _give_back_reservation(self) except -1:
        ivshm_mpmc_abandon(&self._q, self._wpos)
        return 0

    cdef int _give_back_peek(self) except -1:
        ivshm_mpmc_release_one(&self._q, self._rpos)
        return 0

    @property
    def kind(self):
        return "mpmc"

    @property
    def max_message(self):
        return self._info.slot_size

    def __len__(self):
        self._check()
        n = ivshm_mpmc_count(&self._q)
        if self._m.lost: self._raise_lost()
        return n

    def stalled(self):
        """The index of a slot that stops the ring, or None: claimed by a producer that has not
        committed it (consumers wait there), or by a consumer that has not released it (producers
        wait there).  A live party is in that state only for the length of one copy: a slot
        reported again after a while belongs to a party that stalled or died."""
        self._check()
        cdef uint64_t pos
        if ivshm_mpmc_stalled(&self._q, &pos):
            if self._m.lost: self._raise_lost()
            return pos
        if ivshm_mpmc_consumer_stalled(&self._q, &pos):
            if self._m.lost: self._raise_lost()
            return pos
        if self._m.lost: self._raise_lost()
        return None

    def recover(self, slot, message=None):
        """Operator recovery of ``slot`` (as :meth:`stalled` or a StallError names it), claimed by
        a party that died: a consumer's claim is handed to the next lap (its message is lost:
        :meth:`read_claimed` reads it first), a producer's is committed as an empty message, or
        with ``message`` (bytes-like, at most ``slot_size`` bytes) when given: a restarted producer
        finishes the reservation its dead predecessor left open.  Returns "consumer" or
        "producer".  Only call it once the holder is known to be dead: a live one would go on using
        a slot others now use.  ConfigError if nothing holds that slot, or if ``message`` is given
        for a consumer's claim."""
        self._check()
        cdef uint64_t pos = _int_arg(slot, "slot", 0, 2**64 - 1)
        if (self._rst is not None and pos == self._rpos) or (self._wview_len >= 0 and pos == self._wpos):
            raise ConfigError(f"recover({slot}) on ring {self._name!r}: this handle holds that slot "
                              "itself (its open peek() or reserve()); release()/commit() or cancel() "
                              "it instead: recover() is for slots whose holder died")
        cdef int rc
        cdef Py_buffer buf
        if message is None:
            rc = ivshm_mpmc_recover(&self._q, pos)
        else:
            PyObject_GetBuffer(message, &buf, PyBUF_SIMPLE)
            try:
                if <uint64_t>buf.len > self._info.slot_size:
                    raise MessageTooLargeError(
                        f"recover({slot}, message=...) on ring {self._name!r}: the message has "
                        f"{buf.len} bytes, its slots hold at most {self.slot_size}")
                rc = ivshm_mpmc_recover_with(&self._q, pos, buf.buf, <uint32_t>buf.len)
            finally:
                PyBuffer_Release(&buf)
        if self._m.lost: self._raise_lost()
        if rc == IVSHM_MPMC_RECOVERED_CONSUMER:
            return "consumer"
        if rc == IVSHM_MPMC_RECOVERED_PRODUCER:
            return "producer"
        if rc == -EINVAL:
            raise ConfigError(f"recover({slot}) on ring {self._name!r}: that index is not within a "
                              "lap of the ring's indices (use the index stalled() reports)")
        if rc == -EBUSY:
            raise ConfigError(f"recover({slot}, message=...) on ring {self._name!r}: that slot is "
                              "a consumer's claim, which holds a message already; read it with "
                              "read_claimed(slot), recover it without message")
        raise ConfigError(f"recover({slot}) on ring {self._name!r}: nobody holds that slot "
                          "(nothing to recover, or its holder finished meanwhile)")

    def read_claimed(self, slot):
        """The message (bytes) in ``slot``, claimed by a consumer that has not released it: what a
        dead consumer was taking, to be handed on before :meth:`recover` drops the claim (which
        stays).  The length is checked against the slot size and the claim re-checked after the
        copy.  ConfigError if no consumer holds that slot (or it was released during the copy);
        CorruptionError for a length over the slot size."""
        self._check()
        cdef uint64_t pos = _int_arg(slot, "slot", 0, 2**64 - 1)
        cdef uint64_t cap = self._info.slot_size
        cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>cap)
        cdef int64_t n = ivshm_mpmc_read_claimed(&self._q, pos, PyBytes_AS_STRING(out), cap, NULL)
        if self._m.lost: self._raise_lost()
        if n >= 0:
            return out[:n]
        if n == -EINVAL:
            raise ConfigError(f"read_claimed({slot}) on ring {self._name!r}: that index is not "
                              "within a lap of the ring's indices")
        if n == -ENOENT:
            raise ConfigError(f"read_claimed({slot}) on ring {self._name!r}: no consumer holds "
                              "that slot (never claimed, or released meanwhile): see claims()")
        raise self._corrupt(n, self._q.why, self._q.why_a, self._q.why_b, "read_claimed")

    def claims(self, holder, since=0):
        """The indices (ascending) of slots claimed and not finished by ``holder``: "consumer"
        (claimed, not released: a receive in progress, a peek held, or a dead consumer's) or
        "producer" (reserved, not committed), from index ``since`` on, within a lap.  A snapshot:
        a live party holds a slot for one copy, so a slot listed again after a while belongs to a
        party that stalled or died (see :meth:`recover`)."""
        self._check()
        if holder not in ("consumer", "producer"):
            raise ConfigError(f"claims(holder) takes 'consumer' or 'producer', not {holder!r}")
        cdef uint64_t pos = _int_arg(since, "since", 0, 2**64 - 1)
        cdef int consumer = holder == "consumer"
        out = []
        while ivshm_mpmc_next_claim(&self._q, consumer, pos, &pos):
            out.append(pos)
            pos += 1
        if self._m.lost: self._raise_lost()
        return out

    @property
    def peeked_slot(self):
        """The index of the slot this handle's open :meth:`peek` holds (as :meth:`claims`,
        :meth:`stalled` and :meth:`recover` name slots), or None."""
        return self._rpos if self._rst is not None else None

    @property
    def reserved_slot(self):
        """The index of the slot this handle's open :meth:`reserve` holds, or None."""
        return self._wpos if self._wview_len >= 0 else None

    @property
    def head(self):
        """The producer index: how many slots producers have claimed since the ring was made."""
        self._check()
        cdef uint64_t h, t
        ivshm_mpmc_indices(&self._q, &h, &t)
        return h

    @property
    def tail(self):
        """The consumer index: how many slots consumers have claimed since the ring was made."""
        self._check()
        cdef uint64_t h, t
        ivshm_mpmc_indices(&self._q, &h, &t)
        return t

    cdef int _send_ptr(self, const char *p, uint64_t n) except -2:
        self._check_send()
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

    cdef object _recv_raw(self):
        self._check_recv()
        self._raise_pending()
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

    cdef _full_error(self, timeout):
        raise WaitTimeout(f"send on ring {self._name!r}: still full after {timeout} s "
                          f"({len(self)} of {self.capacity} slots hold messages); is a consumer running?")

    cdef int _stalled_sending(self, timeout, Py_ssize_t sent) except -1:
        cdef uint64_t pos
        if not ivshm_mpmc_consumer_stalled(&self._q, &pos):
            return 0
        err = StallError(
            f"send on ring {self._name!r}: slot {pos} was claimed by a consumer that has not "
            f"released it for {timeout} s (a consumer that died in a receive or holding a peek?); "
            f"producers wait at it.  Once that consumer is known to be dead, ring.recover({pos}) "
            "hands the slot on (its message is lost)", slot=pos, side="consumer")
        if sent >= 0:
            err.sent = sent
        raise err

    cdef int _stalled_receiving(self, timeout) except -1:
        cdef uint64_t pos
        if not ivshm_mpmc_stalled(&self._q, &pos):
            return 0
        raise StallError(
            f"recv on ring {self._name!r}: slot {pos} was claimed by a producer that has not "
            f"committed it for {timeout} s (producer stalled or died; later messages wait behind "
            f"it).  Once that producer is known to be dead, ring.recover({pos}) commits it as an "
            "empty message", slot=pos, side="producer")

    cdef _timeout_error(self, timeout):
        self._stalled_receiving(timeout)
        _Ring._timeout_error(self, timeout)

    def send_many(self, messages, timeout=0.0):
        """Send messages from the front of ``messages``; see SpscRing.send_many.  Waiting in vain
        for room because a consumer died holding a slot raises StallError with ``.sent``."""
        self._check_send()
        cdef double t = _timeout_arg(timeout)
        seq = self._sequence(messages)
        return self._send_many_from(seq, 0, t, timeout)

    cdef Py_ssize_t _send_many_from(self, seq, Py_ssize_t start, double t, timeout) except -1:
        cdef Py_ssize_t total, sent = start
        cdef _Waiter w = None
        cdef PyObject **items
        cdef object item
        cdef Py_ssize_t ln, before = start
        cdef int rc
        while True:
            try:
                self._check_send()  # again after each pause: the region may have been closed
                # and the list looked at again: another thread may have changed it meanwhile
                items = <PyObject **>PySequence_Fast_ITEMS(seq)
                total = PySequence_Fast_GET_SIZE(seq)
                while sent < total:
                    item = <object>items[sent]
                    ln = PyBytes_GET_SIZE(item) if PyBytes_CheckExact(item) else -1
                    if 0 <= ln <= <Py_ssize_t>min(self._info.slot_size, _NOGIL_BYTES):
                        # the hot path: checked once above, no Python code runs in between
                        rc = ivshm_mpmc_try_send(&self._q, PyBytes_AS_STRING(item), ln)
                        if rc == -EAGAIN:
                            break
                        if rc != 0:
                            raise self._corrupt(rc, self._q.why, self._q.why_a, self._q.why_b, "send_many")
                    else:
                        if self._send_obj(item) != 0:
                            break
                        sent += 1  # before the look below: an error there must count it as sent
                        # a buffer object may have run Python code, and a large copy released
                        # the GIL: look at everything again
                        self._check_send()
                        items = <PyObject **>PySequence_Fast_ITEMS(seq)
                        total = min(total, PySequence_Fast_GET_SIZE(seq))
                        continue
                    sent += 1
            except Exception as e:
                # too large, not bytes-like (TypeError), or corrupt: the caller must learn how
                # many went before it, or it could not resend the rest exactly once
                e.sent = sent
                if isinstance(e, MessageTooLargeError):
                    e.args = (f"{e.args[0]}; message {sent} of the batch, the {sent} before it "
                              "were sent",)
                raise
            if sent >= total or t == 0:
                if self._m.lost: self._raise_lost()
                return sent
            if w is None:
                w = _Waiter.make(t, self._spin)
            elif sent > before:
                w.progress()
            before = sent
            if not w.pause():
                self._stalled_sending(timeout, sent)
                if self._m.lost: self._raise_lost()
                return sent

    def recv_many(self, max_count=_BATCH, timeout=0.0):
        """Up to ``max_count`` messages already there (claimed with one CAS per burst), and no
        more than about 1 MiB of slots at a time (at least one message).  With ``timeout`` > 0
        or None, waits that long for the first (StallError if a dead producer's slot is what
        stops it)."""
        self._check_recv()
        cdef Py_ssize_t maxc = _size_arg(max_count, "max_count", 0, PY_SSIZE_T_MAX)
        cdef double t = _timeout_arg(timeout)
        self._raise_pending()
        cdef list out = []
        cdef uint64_t pos
        cdef int64_t m, k, n
        cdef object err = None
        cdef object b
        cdef _Waiter w = None
        cdef _Mapping mp = self._m
        # slots of up to slot_size bytes each: a burst claims at most _BATCH_BYTES of them
        cdef Py_ssize_t per_call = max(1, <Py_ssize_t>(_BATCH_BYTES // max(1, self._info.slot_size)))
        if maxc > per_call:
            maxc = per_call
        while True:
            self._check()
            mp.enter()
            try:
                while len(out) < maxc and not mp.closed:
                    m = ivshm_mpmc_claim_recv(&self._q, maxc - len(out), &pos)
                    if m <= 0:
                        if m != -EAGAIN and not out:
                            raise self._corrupt(m, self._q.why, self._q.why_a, self._q.why_b, "recv_many")
                        break
                    k = 0
                    try:
                        while k < m:
                            n = ivshm_mpmc_msg_len(&self._q, pos + k)
                            if 0 <= n <= <int64_t>_NOGIL_BYTES:
                                b = PyBytes_FromStringAndSize(
                                    <const char *>ivshm_mpmc_payload(&self._q, pos + k), n)
                                ivshm_mpmc_release_one(&self._q, pos + k)
                                k += 1
                                out.append(b)
                            elif n >= 0:
                                k += 1
                                out.append(self._recv_big(pos + k - 1, n))  # releases it
                            else:
                                if err is None:
                                    err = self._corrupt(n, self._q.why, self._q.why_a, self._q.why_b,
                                                        "recv_many")
                                ivshm_mpmc_release_one(&self._q, pos + k)
                                k += 1
                    finally:
                        while k < m:  # only after an exception: the claimed slots must move on
                            ivshm_mpmc_release_one(&self._q, pos + k)
                            k += 1
            finally:
                mp.leave()
            if err is not None:
                if not out:
                    raise err
                self._pending_error = err  # raised by the next receive: nothing is hidden
                if self._m.lost: self._raise_lost()
                return out
            if out or t == 0 or maxc <= 0:
                if self._m.lost: self._raise_lost()
                return out
            if w is None:
                w = _Waiter.make(t, self._spin)
            if not w.pause():
                self._stalled_receiving(timeout)
                if self._m.lost: self._raise_lost()
                return out

    def recv_into(self, buffer):
        """Receive into a writable buffer: the length, or None if empty.  Never waits.  The buffer
        is checked before anything is claimed: an unusable one raises ConfigError, and a message
        longer than the buffer raises MessageTooLargeError and stays in the ring, for any
        consumer."""
        self._check_recv()
        self._raise_pending()
        cdef Py_buffer buf
        cdef uint64_t pos, needed = 0
        cdef int64_t m, n
        cdef _Mapping mp = self._m
        _get_writable(buffer, &buf)
        try:
            self._check_recv()  # getting the buffer may have run Python code
            mp.enter()
            try:
                if <uint64_t>buf.len >= self._info.slot_size:
                    m = ivshm_mpmc_claim_recv(&self._q, 1, &pos)
                else:
                    m = ivshm_mpmc_claim_recv_max(&self._q, 1, buf.len, &pos, &needed)
                if m <= 0:
                    if m == -EAGAIN:
                        if self._m.lost: self._raise_lost()
                        return None
                    if m == -EMSGSIZE:
                        raise MessageTooLargeError(
                            f"the next message on ring {self._name!r} is {needed} bytes; the buffer "
                            f"holds {buf.len}: pass a larger buffer (the message stays in the ring)")
                    raise self._corrupt(m, self._q.why, self._q.why_a, self._q.why_b, "recv_into")
                n = ivshm_mpmc_msg_len(&self._q, pos)
                if n >= 0 and n > buf.len:
                    self._q.why = "slot length changed after the claim"
                    self._q.why_a = n
                    self._q.why_b = buf.len
                    n = -EPROTO
                if n < 0:
                    ivshm_mpmc_release_one(&self._q, pos)
                    raise self._corrupt(n, self._q.why, self._q.why_a, self._q.why_b, "recv_into")
                if n <= <int64_t>_NOGIL_BYTES:
                    memcpy(buf.buf, ivshm_mpmc_payload(&self._q, pos), n)
                    ivshm_mpmc_release_one(&self._q, pos)
                else:
                    with nogil:
                        memcpy(buf.buf, ivshm_mpmc_payload(&self._q, pos), n)
                        ivshm_mpmc_release_one(&self._q, pos)
            finally:
                mp.leave()
        finally:
            PyBuffer_Release(&buf)
        if self._m.lost: self._raise_lost()
        return n

    def reserve(self, size):
        """Claim the next free slot and return a writable SlotView of ``size`` bytes (None if
        full).  Consumers wait at this slot until :meth:`commit` (or :meth:`cancel`, or this
        handle's close()), so commit promptly.  Until then this handle refuses other sends."""
        self._check()
        if self._wview_len >= 0:
            raise ConfigError(f"ring {self._name!r}: a reservation is already open; commit() or "
                              "cancel() it first")
        cdef Py_ssize_t n = _size_arg(size, "size", 0, 2**62)
        if n > self._info.slot_size:
            raise MessageTooLargeError(f"reserve({size}) on ring {self._name!r}: at most {self.slot_size} bytes")
        cdef uint64_t pos
        cdef int64_t m = ivshm_mpmc_claim_send(&self._q, 1, &pos)
        if m == -EAGAIN:
            if self._m.lost: self._raise_lost()
            return None
        if m < 0:
            raise self._corrupt(m, self._q.why, self._q.why_a, self._q.why_b, "reserve")
        self._wpos = pos
        self._wst = _new_state(self._m, ivshm_mpmc_payload(&self._q, pos), False)
        self._wview_len = n
        self._zc_gen = _fork_gen
        if self._m.lost: self._raise_lost()
        return _new_view(self._wst, 0, n)

    def commit(self, size=None):
        """Publish the reserved slot with ``size`` bytes (default: all that was reserved).  The
        reservation's views become invalid; ViewInUseError while a raw export of one is alive."""
        self._check()
        if self._wview_len < 0:
            raise ConfigError(f"ring {self._name!r}: commit() without reserve()")
        cdef Py_ssize_t n = self._wview_len if size is None else _size_arg(size, "size", 0, self._wview_len)
        _retire(self._wst, f"commit on ring {self._name!r}")
        self._wst = None
        self._wview_len = -1
        ivshm_mpmc_commit_one(&self._q, self._wpos, <uint32_t>n)
        if self._m.lost: self._raise_lost()

    def cancel(self):
        """Give the reserved slot back without sending: it is as if never claimed, or, when other
        producers claimed slots after it, it is committed as an empty message so that consumers
        move past it.  Its views become invalid."""
        self._check()
        if self._wview_len < 0:
            raise ConfigError(f"ring {self._name!r}: cancel() without reserve()")
        _retire(self._wst, f"cancel on ring {self._name!r}")
        self._wst = None
        self._wview_len = -1
        ivshm_mpmc_abandon(&self._q, self._wpos)

    def peek(self):
        """Claim the next message and return a read-only SlotView of it (None if empty); other
        consumers skip it.  :meth:`release` hands the slot back; until then this handle refuses
        other receives, and producers stop at this slot one lap later."""
        self._check()
        if self._rst is not None:
            raise ConfigError(f"ring {self._name!r}: a peeked message is still held; release() it first")
        self._raise_pending()
        cdef uint64_t pos
        cdef int64_t m = ivshm_mpmc_claim_recv(&self._q, 1, &pos)
        if m == -EAGAIN:
            if self._m.lost: self._raise_lost()
            return None
        if m < 0:
            raise self._corrupt(m, self._q.why, self._q.why_a, self._q.why_b, "peek")
        cdef int64_t n = ivshm_mpmc_msg_len(&self._q, pos)
        if n < 0:
            ivshm_mpmc_release_one(&self._q, pos)
            raise self._corrupt(n, self._q.why, self._q.why_a, self._q.why_b, "peek")
        self._rpos = pos
        self._rst = _new_state(self._m, ivshm_mpmc_payload(&self._q, pos), True)
        self._zc_gen = _fork_gen
        if self._m.lost: self._raise_lost()
        return _new_view(self._rst, 0, n)

    def release(self):
        """Hand the peeked slot back (the message is consumed); its views become invalid
        (ViewInUseError while a raw export of one is alive)."""
        self._check()
        if self._rst is None:
            raise ConfigError(f"ring {self._name!r}: release() without peek()")
        _retire(self._rst, f"release on ring {self._name!r}")
        self._rst = None
        ivshm_mpmc_release_one(&self._q, self._rpos)
        if self._m.lost: self._raise_lost()


# ---------------------------------------------------------------------------------------------
# Publish-subscribe: one publisher, every subscriber reads every message (csrc/ivshm_pubsub.h)
# ---------------------------------------------------------------------------------------------

cdef extern from "<errno.h>":
    enum:
        ECONNRESET
        ENOBUFS
        EBUSY
        EPIPE

cdef uint64_t _NS_KEY = 0
cdef bint _NS_KEY_SET = False


def _cut_behind(cut_head, cut_cursor):
    """Messages a cut-off subscriber had not read, or None when its cursor was ahead of the
    publisher (a forged cursor: the u64 difference would wrap to nearly 2**64)."""
    return cut_head - cut_cursor if cut_cursor <= cut_head else None


_CUT_REASONS = {
    IVSHM_SUB_CUT_SLOW: "slow",
    IVSHM_SUB_CUT_DEAD: "dead",
    IVSHM_SUB_CUT_CURSOR: "bad-cursor",
    IVSHM_SUB_CUT_BY_PUBLISHER: "by-publisher",
}
_CUT_WHY = {
    "slow": "it held the publisher back for longer than slow_timeout",
    "dead": "its process was gone, or it made no progress for slow_timeout while behind",
    "bad-cursor": "its cursor was outside the publisher's window (misbehaving)",
    "by-publisher": "the publisher dropped it (PubSubRing.cut)",
}
_SUB_STATES = {IVSHM_SUB_FREE: "free", IVSHM_SUB_JOINING: "joining", IVSHM_SUB_ACTIVE: "active",
               IVSHM_SUB_DROPPED: "dropped"}


cdef uint64_t _ns_key():
    """This process's pid-namespace key (the same after fork: a child shares the namespace)."""
    global _NS_KEY, _NS_KEY_SET
    if not _NS_KEY_SET:
        _NS_KEY = ivshm_pubsub_ns_key()
        _NS_KEY_SET = True
    return _NS_KEY


cdef class PubSubRing(_Ring):
    """A publish-subscribe ring: this handle is its publisher (one per ring, in any process or
    VM), with the send side of the ring methods; :meth:`subscribe` returns a :class:`Subscriber`
    that receives every message published after it joined, in order.  Messages are at most
    ``slot_size`` bytes.  What happens to subscribers that fall behind is the ring's ``slow``
    policy: "block" (the publisher waits, up to its timeout, for the slowest live subscriber) or
    "drop" (a subscriber that held it back for ``slow_timeout`` seconds is cut off; its next call
    raises SubscriberDroppedError).  Dead subscribers never hold the publisher for good.
    docs/pubsub.md has the details."""
    cdef ivshm_pubsub_pub _p
    cdef uint32_t _policy
    cdef uint64_t _slow_ns

    cdef _init(self, Region region, ivshm_ring_info *info):
        _Ring._init(self, region, info)
        cdef const char *why = NULL
        cdef int rc = ivshm_pubsub_config(&region._r, info, &self._policy, &self._slow_ns,
                                          _LOCK_WAIT_MS, &why)
        if rc == 0:
            rc = ivshm_pubsub_pub_attach(&self._p, &region._r, info, _LOCK_WAIT_MS, &why)
        if rc != 0:
            raise _ring_error(rc, f"open ring {self._name!r}", why, self._name)
        self._batch_arrays()

    @property
    def kind(self):
        return "pubsub"

    @property
    def max_message(self):
        return self._info.slot_size

    @property
    def slow(self):
        """The slow-subscriber policy: "block" or "drop"."""
        return "block" if self._policy == IVSHM_PUBSUB_BLOCK else "drop"

    @property
    def slow_timeout(self):
        return self._slow_ns / 1e9

    def __len__(self):
        """Messages published that the slowest subscriber has not read (at the publisher's last
        look at the subscriber table)."""
        self._check()
        cdef uint64_t h = self._ctrl.head, t = self._ctrl.tail
        if self._m.lost: self._raise_lost()
        return h - t if t <= h and h - t <= self._info.capacity else 0

    # -- errors ------------------------------------------------------------------------------
    cdef object _pub_error(self, int rc, what):
        if self._m.lost:
            return self._m.lost_error(f"{what} on ring {self._name!r}")
        if rc == -EMSGSIZE:
            return MessageTooLargeError(
                f"{what} on ring {self._name!r}: messages are at most {self.slot_size} bytes "
                "(the ring's slot size)")
        err = self._corrupt(rc, self._p.why, self._p.why_a, self._p.why_b, what)
        if isinstance(err, CorruptionError):
            err.subscriber = self._p.why_sub if self._p.why_sub >= 0 else None
            if self._p.why_sub >= 0:
                err.args = (f"{err.args[0]} [subscriber {self._p.why_sub}]",)
        return err

    cdef str _held_back(self):
        """Who holds the publisher back, for timeout messages."""
        worst = None
        for s in self.subscribers():
            if s["state"] == "active" and s["behind"] is not None and (
                    worst is None or s["behind"] > worst["behind"]):
                worst = s
        if worst is None:
            return "no subscriber holds it back now"
        return (f"held back by subscriber {worst['index']} (pid {worst['pid']}), "
                f"{worst['behind']} messages behind")

    # -- sending -----------------------------------------------------------------------------
    cdef int _send_ptr(self, const char *p, uint64_t n) except -2:
        self._check_send()
        cdef int rc
        cdef _Mapping mp
        if n <= _NOGIL_BYTES:
            rc = ivshm_pubsub_try_send(&self._p, p, n)
        else:
            mp = self._m
            mp.enter()
            try:
                with nogil:
                    rc = ivshm_pubsub_try_send(&self._p, p, n)
            finally:
                mp.leave()
        if rc == 0:
            return 0
        if rc == -EAGAIN:
            return -1
        raise self._pub_error(rc, "send")

    cdef object _recv_raw(self):
        raise ConfigError(f"ring {self._name!r} is a pubsub ring: this handle publishes; "
                          "receive through ring.subscribe()")

    def recv_many(self, *a, **k):
        self._recv_obj()

    def recv_into(self, *a, **k):
        self._recv_obj()

    def peek(self):
        self._recv_obj()

    def release(self):
        self._recv_obj()

    cdef _full_error(self, timeout):
        raise WaitTimeout(f"send on pubsub ring {self._name!r}: still full after {timeout} s; "
                          f"{self._held_back()}")

    def send_many(self, messages, timeout=0.0):
        """Send messages from the front of ``messages`` (one announce per batch); see
        SpscRing.send_many.  With ``timeout=0`` (default) it stops when the ring is full;
        otherwise it waits up to ``timeout`` seconds (None: forever) for room.  Returns how many
        were sent."""
        return self._send_many_batched(messages, timeout)

    cdef Py_ssize_t _send_batch(self, seq, Py_ssize_t start, Py_ssize_t total) except -1:
        cdef Py_ssize_t k, n, m = 0, done = 0
        cdef int64_t room = 0
        cdef int rc = 0
        cdef object item, keep
        cdef PyObject **items
        cdef _Mapping mp = self._m
        cdef uint64_t nbytes
        while True:
            # (again after each copy without the GIL: another thread may have changed the list)
            if total > PySequence_Fast_GET_SIZE(seq):
                total = PySequence_Fast_GET_SIZE(seq)
            if start + done >= total:
                break
            try:
                self._check()  # the GIL may have been released: the region may have been closed
            except BaseException as e:
                e.sent = start + done  # (as for SPSC: after a batch that went)
                raise
            items = <PyObject **>PySequence_Fast_ITEMS(seq)
            n = total - start - done
            if n > _BATCH:
                n = _BATCH
            nbytes = 0
            for k in range(n):
                item = <object>items[start + done + k]
                if not PyBytes_CheckExact(item):
                    # other buffers one at a time, through the buffer protocol
                    k = self._send_slow(seq, start + done, start + done + n)
                    done += k
                    if k < n:
                        return done
                    break
                self._ptrs[k] = PyBytes_AS_STRING(item)
                self._lens[k] = PyBytes_GET_SIZE(item)
                nbytes += self._lens[k]
            else:
                if nbytes <= _NOGIL_BYTES:
                    # a short copy keeps the GIL: no other thread can free the messages meanwhile
                    rc = self._publish_n(n, &room, &m)
                else:
                    # the pointers are borrowed from the caller's list, which another thread may
                    # change while the GIL is released: hold the batch's messages until done
                    keep = seq[start + done:start + done + n]
                    mp.enter()
                    try:
                        with nogil:
                            rc = self._publish_n(n, &room, &m)
                    finally:
                        mp.leave()
                    keep = None
                done += m
                if room < 0:
                    err = self._pub_error(<int>room, "send_many")
                    err.sent = start + done
                    raise err
                if rc != 0:
                    err = MessageTooLargeError(
                        f"message {start + done} does not fit pubsub ring {self._name!r} (at most "
                        f"{self.slot_size} bytes); the {start + done} before it were sent")
                    err.sent = start + done
                    raise err
                if m < n:
                    return done
        return done

    cdef int _publish_n(self, Py_ssize_t n, int64_t *room_out, Py_ssize_t *written) noexcept nogil:
        """Publish the n gathered messages, as many as there is room for: 0, or -EMSGSIZE for
        one over the slot size; *room_out is the room found (< 0: an error code), *written how
        many went."""
        cdef uint32_t ss = self._info.slot_size
        cdef uint64_t cap = self._info.capacity
        cdef Py_ssize_t m = 0
        cdef int rc = 0
        # asking for the whole batch makes a look at the table when the cached room is smaller,
        # so a batch is cut short only by a real lack of room
        cdef int64_t room = ivshm_pubsub_room(&self._p, <uint64_t>n if <uint64_t>n <= cap else cap)
        if room > 0:
            while m < n and m < room:
                if self._lens[m] > ss:
                    rc = -EMSGSIZE
                    break
                memcpy(ivshm_pubsub_begin(&self._p), self._ptrs[m], self._lens[m])
                ivshm_pubsub_end(&self._p, <uint32_t>self._lens[m])
                m += 1
            ivshm_pubsub_publish(&self._p)
        room_out[0] = room
        written[0] = m
        return rc

    def reserve(self, size):
        """A writable SlotView of ``size`` bytes in the next slot, or None when the ring is full;
        fill it, then :meth:`commit` (every subscriber reads it in place: zero copy).  Until then
        this handle refuses other sends."""
        self._check()
        if self._wview_len >= 0:
            raise ConfigError(f"ring {self._name!r}: a reservation is already open; commit() or "
                              "cancel() it first")
        cdef Py_ssize_t n = _int_arg(size, "size", 0, 2**62)
        if n > self._info.slot_size:
            raise MessageTooLargeError(f"reserve({size}) on ring {self._name!r}: at most {self.slot_size} bytes")
        cdef uint8_t *p = NULL
        cdef int rc = ivshm_pubsub_reserve(&self._p, n, &p)
        if rc == -EAGAIN:
            if self._m.lost: self._raise_lost()
            return None
        if rc != 0:
            raise self._pub_error(rc, "reserve")
        self._wst = _new_state(self._m, p, False)
        self._wview_len = n
        self._zc_gen = _fork_gen
        if self._m.lost: self._raise_lost()
        return _new_view(self._wst, 0, n)

    def commit(self, size=None):
        """Publish the reserved slot with ``size`` bytes (default: all that was reserved); the
        reservation's views become invalid (ViewInUseError while a raw export is alive)."""
        self._check()
        if self._wview_len < 0:
            raise ConfigError(f"ring {self._name!r}: commit() without reserve()")
        cdef Py_ssize_t n = self._wview_len if size is None else _int_arg(size, "size", 0, self._wview_len)
        _retire(self._wst, f"commit on ring {self._name!r}")
        self._wst = None
        self._wview_len = -1
        ivshm_pubsub_commit(&self._p, <uint32_t>n)
        if self._m.lost: self._raise_lost()

    def cancel(self):
        """Drop the reservation without publishing (subscribers never see it)."""
        self._check()
        if self._wview_len < 0:
            raise ConfigError(f"ring {self._name!r}: cancel() without reserve()")
        _retire(self._wst, f"cancel on ring {self._name!r}")
        self._wst = None
        self._wview_len = -1  # the slot's stamp stays cleared: nothing was published there

    # -- subscribers --------------------------------------------------------------------------
    def subscribe(self):
        """Join as a subscriber (in this process): a :class:`Subscriber` that receives every
        message published from now on.  At most 64 subscribers per ring."""
        self._check()
        cdef Subscriber s = Subscriber.__new__(Subscriber)
        cdef _Mapping m = self._m
        m.enter()
        try:
            s._subscribe(self._region, &self._info)
        finally:
            m.leave()
        if self._m.lost: self._raise_lost()
        return s

    def subscribers(self):
        """The subscriber table: one dict per entry in use (index, state, cursor, behind, pid,
        joined_at, and for those cut off: reason, cut_behind)."""
        self._check()
        cdef ivshm_pubsub_subinfo *buf = <ivshm_pubsub_subinfo *>malloc(
            IVSHM_PUBSUB_MAX_SUBS * sizeof(ivshm_pubsub_subinfo))
        if buf == NULL:
            raise MemoryError()
        cdef int n, i
        cdef uint64_t head = self._ctrl.head
        try:
            n = ivshm_pubsub_list(&self._p, buf, IVSHM_PUBSUB_MAX_SUBS)
            out = []
            for i in range(n):
                d = {"index": buf[i].index, "state": _SUB_STATES.get(buf[i].state, "corrupt"),
                     "cursor": buf[i].cursor, "pid": buf[i].pid, "joined_at": buf[i].joined_at,
                     "behind": head - buf[i].cursor if buf[i].cursor <= head else None,
                     "same_host": buf[i].ns_key == _ns_key() and buf[i].ns_key != 0}
                if buf[i].state == IVSHM_SUB_DROPPED:
                    d["reason"] = _CUT_REASONS.get(buf[i].reason, "unknown")
                    d["cut_behind"] = _cut_behind(buf[i].cut_head, buf[i].cut_cursor)
                out.append(d)
            if self._m.lost: self._raise_lost()
            return out
        finally:
            free(buf)

    def cut(self, index):
        """Cut subscriber ``index`` off (its next call raises SubscriberDroppedError): True if it
        was active."""
        self._check()
        index = _int_arg(index, "subscriber index", 0, IVSHM_PUBSUB_MAX_SUBS - 1)
        n = ivshm_pubsub_cut(&self._p, index) == 1
        if self._m.lost: self._raise_lost()
        return n

    @property
    def stats(self):
        """The publisher's counters: subscribers cut off by this handle, the last one cut (entry,
        reason, how far behind), active subscribers at its last look at the table."""
        if self._m.lost: self._raise_lost()
        return {"cuts": self._p.cuts, "active": self._p.active,
                "last_cut": self._p.last_cut if self._p.last_cut >= 0 else None,
                "last_reason": _CUT_REASONS.get(self._p.last_reason),
                "last_behind": self._p.last_behind if self._p.last_cut >= 0 else None}


cdef class Subscriber(_Ring):
    """One subscriber of a :class:`PubSubRing` (made by ``ring.subscribe()``): the receive side of
    the ring methods.  It receives every message published after it joined, in order, from its
    own cursor; nothing it does affects the other subscribers.  When the publisher cuts it off,
    its next call raises SubscriberDroppedError saying why and how far behind it was.
    :meth:`close` leaves the ring (do close it: under slow="block" the publisher waits for every
    subscriber still in the table)."""
    cdef ivshm_pubsub_sub _s
    cdef bint _joined
    cdef Py_ssize_t _busy         # calls of this handle inside a stretch that may let another
                                  # thread run (a copy with the GIL released)
    cdef bint _leave_pending      # close() came during one: the last of them leaves the ring
    cdef uint64_t _sub_gen        # _fork_gen in the process that subscribed (owns the entry)
    cdef object _pending_error

    def __cinit__(self):
        self._joined = False

    cdef _subscribe(self, Region region, ivshm_ring_info *info):
        _Ring._init(self, region, info)
        cdef const char *why = NULL
        cdef uint32_t pid = _os.getpid()
        cdef uint64_t key = _ns_key()
        cdef int rc
        with nogil:
            rc = ivshm_pubsub_subscribe(&self._s, &region._r, info, pid, key, _LOCK_WAIT_MS, &why)
        if rc == -EBUSY:
            raise ConfigError(f"cannot subscribe to ring {self._name!r}: all "
                              f"{IVSHM_PUBSUB_MAX_SUBS} subscriber entries are taken (close "
                              "subscribers that are done)")
        if rc != 0:
            raise _ring_error(rc, f"subscribe to ring {self._name!r}", why, self._name)
        self._joined = True
        self._sub_gen = _fork_gen

    @property
    def kind(self):
        return "pubsub"

    @property
    def max_message(self):
        return self._info.slot_size

    @property
    def index(self):
        """This subscriber's entry in the ring's subscriber table."""
        return self._s.index

    @property
    def joined_at(self):
        """Index of the first message this subscriber receives."""
        return self._s.joined_at

    @property
    def position(self):
        """Index of the next message it receives."""
        return self._s.cursor

    def __len__(self):
        """Messages published that this subscriber has not received yet."""
        self._check()
        n = ivshm_pubsub_pending(&self._s)
        if self._m.lost: self._raise_lost()
        return n

    def status(self):
        """{"state", "position", "head", and when cut off: "reason", "behind"}."""
        self._check()
        cdef ivshm_pubsub_status st
        rc = ivshm_pubsub_sub_status(&self._s, &st)
        d = {"state": _SUB_STATES.get(st.state, "corrupt"), "position": st.cursor, "head": st.head}
        if rc != 0:
            d["state"] = "dropped"
            d["reason"] = _CUT_REASONS.get(st.reason, "unknown") if st.state == IVSHM_SUB_DROPPED else "unknown"
            d["behind"] = (_cut_behind(st.cut_head, st.cut_cursor)
                           if st.state == IVSHM_SUB_DROPPED else None)
        if self._m.lost: self._raise_lost()
        return d

    def close(self):
        """Leave the ring (frees this subscriber's entry).  Idempotent.  From another thread
        while a receive of this handle copies, the entry is freed when that receive is done.  In
        a child that inherited it across fork, it only drops the child's copy: the entry stays
        the parent's."""
        cdef _Mapping m = self._m
        _Ring.close(self)
        if self._joined:
            if self._busy:
                # The receive in flight still moves this entry's cursor when its copy is done:
                # freed now, the entry could be taken by a new subscriber (of any process) at
                # once, and that write would set the newcomer's cursor back.
                self._leave_pending = True
                return
            self._unjoin(m)

    cdef int _unjoin(self, _Mapping m) except -1:
        self._leave_pending = False
        self._joined = False
        # Not in a forked child: the entry is the parent's subscriber's, which goes on reading
        # (freed, the publisher would take it back and cut the parent's subscriber off).
        if m is not None and not m.closed and self._sub_gen == _fork_gen:
            ivshm_pubsub_unsubscribe(&self._s)
        return 0

    cdef int _done(self) except -1:
        """The end of a stretch counted in _busy: leave the ring if close() came meanwhile."""
        self._busy -= 1
        if self._busy == 0 and self._leave_pending:
            self._unjoin(self._m)
        return 0

    def __del__(self):
        if self._joined:
            if self._sub_gen == _fork_gen:  # (a copy inherited across fork is the parent's)
                _warnings.warn(f"unclosed {self!r}: a subscriber holds a place in the ring until "
                               "it closes (or, once its region is closed, until its process "
                               "exits)", ResourceWarning, source=self)
            self.close()

    def __repr__(self):
        return f"<pyivshmem.Subscriber {self._name!r} index={self._s.index} position={self._s.cursor}>"

    # -- errors ------------------------------------------------------------------------------
    cdef object _sub_error(self, int64_t rc, what):
        cdef ivshm_pubsub_status st
        if self._m.lost:
            return self._m.lost_error(f"{what} on ring {self._name!r}")
        if rc == -ECONNRESET:
            ivshm_pubsub_sub_status(&self._s, &st)
            if st.state == IVSHM_SUB_DROPPED:
                reason = _CUT_REASONS.get(st.reason, "unknown")
                behind = _cut_behind(st.cut_head, st.cut_cursor)
                where = (f"it was {behind} messages behind" if behind is not None else
                         "its cursor was ahead of the publisher")
                msg = (f"{what}: subscriber {self._s.index} of ring {self._name!r} was cut off by "
                       f"the publisher: {_CUT_WHY.get(reason, 'reason unknown')}; {where} "
                       f"(at message {st.cut_cursor}, the publisher at "
                       f"{st.cut_head}).  Close it and subscribe again to follow the stream from now.")
            else:
                reason, behind = "unknown", None
                msg = (f"{what}: subscriber {self._s.index} of ring {self._name!r} was cut off by "
                       "the publisher (its entry was taken back).  Close it and subscribe again.")
            return SubscriberDroppedError(msg, self._name, self._s.index, reason, behind)
        if rc == -EPIPE:
            return ClosedError(f"{what}: this subscriber of ring {self._name!r} has left it")
        return self._corrupt(rc, self._s.why, self._s.why_a, self._s.why_b, what)

    cdef inline int _check_sub(self) except -1:
        self._check_recv()
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise err
        return 0

    # -- receiving ---------------------------------------------------------------------------
    cdef object _send_obj_error(self):
        return ConfigError(f"ring {self._name!r}: a subscriber receives; publish through the ring's "
                           "PubSubRing handle")

    cdef int _send_ptr(self, const char *p, uint64_t n) except -2:
        raise self._send_obj_error()

    def send_many(self, *a, **k):
        raise self._send_obj_error()

    cdef Py_ssize_t _send_many_from(self, seq, Py_ssize_t start, double t, timeout) except -1:
        raise self._send_obj_error()

    def reserve(self, *a, **k):
        raise self._send_obj_error()

    def commit(self, *a, **k):
        raise self._send_obj_error()

    cdef object _take(self, ivshm_pubsub_msg *m):
        """Copy the message found by next() out and move past it (no release); the bytes, or
        raises (a torn copy: this subscriber was cut off)."""
        cdef object out
        cdef char *dst
        cdef int rc
        cdef _Mapping mp
        if m.len <= _NOGIL_BYTES:
            out = PyBytes_FromStringAndSize(<const char *>m.data, m.len)
        else:
            out = PyBytes_FromStringAndSize(NULL, m.len)
            dst = PyBytes_AS_STRING(out)
            mp = self._m
            mp.enter()
            try:
                with nogil:
                    memcpy(dst, m.data, m.len)
            finally:
                mp.leave()
        rc = ivshm_pubsub_check(&self._s)
        if rc != 0:
            raise self._sub_error(rc, "recv")
        ivshm_pubsub_advance(&self._s)
        return out

    cdef object _recv_raw(self):
        self._check_sub()
        cdef ivshm_pubsub_msg m
        cdef int rc = ivshm_pubsub_next(&self._s, &m)
        if rc == -EAGAIN:
            return None
        if rc != 0:
            raise self._sub_error(rc, "recv")
        # A large copy releases the GIL: a Region.close() meanwhile must not unmap the memory
        # that _take's check of the slot and the release below still read and write (the copy's
        # own enter/leave ends before them), and a close() of this handle waits for _done().
        cdef _Mapping mp = self._m
        mp.enter()
        self._busy += 1
        try:
            out = self._take(&m)
            ivshm_pubsub_release(&self._s)
        finally:
            self._done()
            mp.leave()
        return out

    def recv_many(self, max_count=_BATCH, timeout=0.0):
        """Up to ``max_count`` messages already there, as a list (one release for all).  With
        ``timeout`` > 0 or None, waits that long for the first one."""
        self._check_sub()
        cdef Py_ssize_t maxc = _int_arg(max_count, "max_count", 0, _sys.maxsize)
        cdef double t = _timeout_arg(timeout)
        cdef list out = []
        cdef ivshm_pubsub_msg m
        cdef int rc = 0
        cdef _Waiter w = None
        cdef _Mapping mp = self._m
        while True:
            self._check()
            mp.enter()
            self._busy += 1  # large copies release the GIL: a close() then waits for _done()
            try:
                while len(out) < maxc and not self._closed:
                    rc = ivshm_pubsub_next(&self._s, &m)
                    if rc != 0:
                        break
                    try:
                        out.append(self._take(&m))
                    except Exception as e:
                        if not out:
                            raise
                        self._pending_error = e  # raised by the next call: nothing is hidden
                        break
            finally:
                ivshm_pubsub_release(&self._s)  # what was taken, also when the next one failed
                self._done()
                mp.leave()
            if rc != 0 and rc != -EAGAIN:
                err = self._sub_error(rc, "recv_many")
                if not out:
                    raise err
                self._pending_error = err
                if self._m.lost: self._raise_lost()
                return out
            if out or t == 0 or maxc <= 0:
                if self._m.lost: self._raise_lost()
                return out
            if w is None:
                w = _Waiter.make(t, self._spin)
            if not w.pause():
                if self._m.lost: self._raise_lost()
                return out

    def recv_into(self, buffer):
        """Receive the next message into a writable buffer: its length, or None if there is none.
        MessageTooLargeError if the buffer is too small (the message stays queued)."""
        self._check_sub()
        cdef Py_buffer buf
        cdef ivshm_pubsub_msg m
        cdef int rc
        _get_writable(buffer, &buf)  # ConfigError for an unusable one, as the other rings say
        cdef _Mapping mp = self._m
        try:
            self._check()
            mp.enter()
            self._busy += 1  # the copy releases the GIL: a close() then waits for _done()
            try:
                rc = ivshm_pubsub_next(&self._s, &m)
                if rc == -EAGAIN:
                    if self._m.lost: self._raise_lost()
                    return None
                if rc != 0:
                    raise self._sub_error(rc, "recv_into")
                if <uint64_t>buf.len < m.len:
                    raise MessageTooLargeError(
                        f"the next message on ring {self._name!r} is {m.len} bytes; the buffer "
                        f"holds {buf.len}: pass a larger buffer (it stays queued)")
                with nogil:
                    memcpy(buf.buf, m.data, m.len)
                rc = ivshm_pubsub_check(&self._s)
                if rc != 0:
                    raise self._sub_error(rc, "recv_into")
                ivshm_pubsub_advance(&self._s)
                ivshm_pubsub_release(&self._s)
            finally:
                self._done()
                mp.leave()
        finally:
            PyBuffer_Release(&buf)
        if self._m.lost: self._raise_lost()
        return m.len

    def peek(self):
        """A read-only view of the next message in the ring's memory (zero copy), or None.  Call
        :meth:`release` when done: the view is invalid afterwards.  Under slow="drop" the
        publisher may cut this subscriber off and rewrite the slot while the view is held;
        release() then raises SubscriberDroppedError, meaning the bytes seen may be torn."""
        self._check()
        if self._rst is not None:
            raise ConfigError(f"ring {self._name!r}: a peeked message is still held; release() it first")
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise err
        cdef ivshm_pubsub_msg m
        cdef int rc = ivshm_pubsub_next(&self._s, &m)
        if rc == -EAGAIN:
            if self._m.lost: self._raise_lost()
            return None
        if rc != 0:
            raise self._sub_error(rc, "peek")
        self._rst = _new_state(self._m, <void *>m.data, True)
        self._zc_gen = _fork_gen
        if self._m.lost: self._raise_lost()
        return _new_view(self._rst, 0, m.len)

    def release(self):
        """Consume the peeked message (SubscriberDroppedError if its slot was rewritten meanwhile)."""
        self._check()
        if self._rst is None:
            raise ConfigError(f"ring {self._name!r}: release() without peek()")
        _retire(self._rst, f"release on ring {self._name!r}")
        self._rst = None
        cdef int rc = ivshm_pubsub_check(&self._s)
        if rc != 0:
            raise self._sub_error(rc, "release")
        ivshm_pubsub_advance(&self._s)
        ivshm_pubsub_release(&self._s)
        if self._m.lost: self._raise_lost()


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
        EBADF

cdef int _chan_eventfd() except -1:
    cdef int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if fd < 0:
        e = errno
        raise SystemCallError(e, f"cannot create an eventfd for a channel: {_os.strerror(e)}"
                              " (out of file descriptors? raise the limit, e.g. ulimit -n)")
    return fd


cdef void _chan_signal(int fd) noexcept:
    """Make an eventfd readable for good (nobody drains it)."""
    cdef uint64_t one = 1
    if fd >= 0:
        _c_write(fd, &one, 8)


cdef int64_t _seconds_ns(value, name, bint allow_none) except? -2:
    """A duration argument in ns, validated by _timeout_arg: -1 for None (wait forever) where
    allowed.  Durations that must be finite (spin, recheck) refuse None."""
    if value is None and not allow_none:
        raise ConfigError(f"{name} must be a number of seconds >= 0, not None")
    cdef double t = _timeout_arg(value, name)
    if t < 0:
        if not allow_none:
            raise ConfigError(f"{name} must be a finite number of seconds, not {value!r}")
        return -1
    if t > 9e9:
        return -1 if allow_none else <int64_t>9e18
    return <int64_t>(t * 1e9)


cdef int _resolve_bell(void *ctx, uint32_t peer, uint32_t vector, ivshm_bell *out) noexcept with gil:
    """The C channel asks how to ring (peer, vector), for a provider without a bell table: its
    ``notify_target``.  Asked afresh for every doorbell (at most one per sleep of the other side):
    a provider closes a departed peer's fds, so a cached fd number could name an unrelated file
    later."""
    cdef Channel ch = <Channel>(<_BellCtx *>ctx).channel
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


# how many doorbells of one wake the table resolver remembers for the look after them (a wake
# rings at most one sleeper per table entry)
cdef enum:
    _RUNG_MAX = 32


cdef struct _BellCtx:
    ivshm_bell_table *table  # the provider's bell table (NULL: ask notify_target)
    void *channel            # the Channel (borrowed: the Channel owns this struct)
    int closed               # the Channel was closed: ring nobody
    int nrung                # doorbells rung from the table since the last look after them
    int refreshed            # a lookup that missed took the news in since then
    uint32_t rung_peer[_RUNG_MAX]
    uint32_t rung_vector[_RUNG_MAX]
    uint32_t rung_gen[_RUNG_MAX]  # the peer's ivshm_bell_table_changes() when it was rung


cdef void _refresh_bells(void *chan) noexcept with gil:
    """The provider has news (its server socket is readable): let it take them in, so that the
    table names the peers that exist now (a peer that left and one that joined with its id)."""
    cdef Channel ch = <Channel>chan
    try:
        ch._doorbell._bell_refresh()
    except KeyboardInterrupt:
        # (Ctrl-C while the refresh waited for another thread's read of the socket) not lost:
        # raised again at the next check, once the wake is done
        PyErr_SetInterrupt()
    except BaseException:
        pass  # the table stays as it is; a ring to a peer it lacks is lost and re-checked


cdef int _resolve_table(void *ctx, uint32_t peer, uint32_t vector, ivshm_bell *out) noexcept nogil:
    """The C channel asks how to ring (peer, vector), for a provider with a bell table: read it in
    C, without a system call.  Whether the table is stale (the watch fd, a Peer's server socket,
    is readable: a peer left, or one joined with a reused id) is looked at after the ring, by
    _bells_after_wake(), so that this look is not between the publish and the doorbell; only a
    lookup that misses (a peer that has just joined) looks first.

    Lifetime (docs/wakeup.md): wakes run with the GIL held from this lookup to the ring, and the
    provider clears an entry before it takes the GIL to close its fd, so a ring never reaches a
    closed (or reused) fd number; the Channel holds the provider, which owns the table."""
    cdef _BellCtx *c = <_BellCtx *>ctx
    if c.closed:
        return -1
    cdef int rc = ivshm_bell_table_resolve(c.table, peer, vector, out)
    if rc < 0 and ivshm_bell_table_stale(c.table, 1):
        _refresh_bells(c.channel)
        c.refreshed = 1  # it may have changed entries rung before it in this wake
        rc = ivshm_bell_table_resolve(c.table, peer, vector, out)
    if rc == 0 and c.nrung < _RUNG_MAX:
        c.rung_peer[c.nrung] = peer
        c.rung_vector[c.nrung] = vector
        c.rung_gen[c.nrung] = ivshm_bell_table_changes(c.table, peer)
        c.nrung += 1
    return rc


cdef void _bells_after_wake(_BellCtx *c) noexcept:
    """After a wake that rang from the table: when the table's owner has news (looked at once
    per watch interval), let it take them in, and ring again each doorbell whose peer's entries
    it changed: the peer id may have been reused by a peer that joined since, whose sleeper
    was rung on the departed peer's fd (the new fd may even have the same number, so numbers
    cannot tell).  Called with the GIL held, as the wake was.

    The refresh runs Python, so the GIL may pass meanwhile to another thread waking through the
    same Channel, which records its own doorbells in c.rung_*: ours are copied out first."""
    cdef int n = c.nrung
    cdef int i
    cdef ivshm_bell b
    cdef uint32_t peer[_RUNG_MAX]
    cdef uint32_t vector[_RUNG_MAX]
    cdef uint32_t gen[_RUNG_MAX]
    cdef int refreshed = c.refreshed
    c.nrung = 0
    c.refreshed = 0
    if n == 0 or c.closed or c.table == NULL:
        return
    # A lookup that missed during the wake took the news in (a forced look): that look also
    # put off the next unforced one, so compare the entries rung before it without looking.
    if not refreshed and not ivshm_bell_table_stale(c.table, 0):
        return
    for i in range(n):
        peer[i] = c.rung_peer[i]
        vector[i] = c.rung_vector[i]
        gen[i] = c.rung_gen[i]
    if not refreshed:
        _refresh_bells(c.channel)
    if c.closed:
        return
    for i in range(n):
        if (ivshm_bell_table_changes(c.table, peer[i]) != gen[i]
                and ivshm_bell_table_resolve(c.table, peer[i], vector[i], &b) == 0):
            ivshm_bell_ring(&b)


cdef class _FdShare:
    """This process's sleepers on one doorbell fd, shared by every Channel that sleeps on it
    (ivshm_chan.h, fd_share; all zero is its empty state)."""
    cdef ivshm_fd_share share


# doorbell fd -> its _FdShare; entries stay (an fd number reused later shares it with nobody
# still sleeping, which is all it has to tell)
_fd_shares = {}


def _reset_fd_shares():
    # After fork, only the forking thread lives in the child: the sleepers listed in the shares
    # (nodes on the other threads' stacks) never wake there to leave, and a lock one of them
    # held is never released.  Their rings are the parent's business.
    cdef _FdShare share
    for share in _fd_shares.values():
        memset(&share.share, 0, sizeof(share.share))


_os.register_at_fork(after_in_child=_reset_fd_shares)


def _fd_share_count(int fd):
    """The number of this process's sleepers counted on doorbell fd ``fd`` (tests)."""
    share = _fd_shares.get(fd)
    return 0 if share is None else (<_FdShare>share).share.count


# An event loop keeps one reader per fd: a second add_reader on the fd replaces the first's
# callback, and the first remove_reader drops both.  Channels of one process that sleep on one
# vector, or on one region's closed fd, in one loop would then wait for their re-check.  So every
# asyncio wait watches its fds through one reader per (loop, fd) that wakes all its waiters.
# event loop -> {fd: its _FdWatch}, both weakly: the watch lives in the loop's reader (the futures
# in it hold their loop, so a table that held them would keep every loop closed with a waiter
# left, its tasks, and their sleeper entries, for good)
_loop_watches = _weakref.WeakKeyDictionary()


class _FdWatch:
    """The futures of one loop waiting on one fd; held by the loop's reader on the fd."""
    __slots__ = ("futs", "__weakref__")

    def __init__(self):
        self.futs = set()


def _wake_waiters(watch):
    for fut in watch.futs:
        if not fut.done():
            fut.set_result(None)


def _watch_fd(loop, fd, fut):
    per = _loop_watches.get(loop)
    if per is None:
        per = _loop_watches[loop] = _weakref.WeakValueDictionary()
    watch = per.get(fd)
    if watch is None:
        watch = _FdWatch()
        loop.add_reader(fd, _wake_waiters, watch)  # raises: nothing is left registered
        per[fd] = watch
    watch.futs.add(fut)


def _unwatch_fd(loop, fd, fut):
    per = _loop_watches.get(loop)
    watch = None if per is None else per.get(fd)
    if watch is None or fut not in watch.futs:
        return  # not ours to remove: the reader of another waiter, or another library's
    watch.futs.discard(fut)
    if not watch.futs:
        del per[fd]
        loop.remove_reader(fd)


cdef class _AsyncCall:
    """One asyncio wait's C state (coroutines keep it across awaits)."""
    cdef ivshm_chan_call call


cdef class Channel:
    """A ring bound to doorbells: blocking send/recv that sleep only when they must, and wake the
    other side only when it sleeps.  The wake-up protocol is csrc/ivshm_chan.c (docs/wakeup.md
    proves it): any number of senders and receivers may sleep on one ring, in any processes or VMs,
    and each doorbell wakes one sleeper that is actually asleep.

    ``doorbell`` is a doorbell provider (a host :class:`Peer`, a guest :class:`PciDevice`, or any
    object with ``id``, ``vector_fd(v)`` and ``notify_target(peer, v)``; a provider that also has
    ``_bell_table``, the address of a C ``struct ivshm_bell_table`` it keeps up to date and alive
    while it lives, and ``_bell_refresh()``, is rung from C without calling into Python, see
    docs/wakeup.md); ``vector`` is this side's
    vector to sleep on (use one vector per blocking channel in a process; threads of one process
    may share a channel).  Without a doorbell, or when the provider has no interrupt fd (a guest
    without VFIO), sleeping degrades to polling with back-off (50 us to 1 ms).

    ``close()`` (of the channel, its ring handle or its region), from any thread, wakes every
    call blocked on this channel; they raise ClosedError.  So does closing its :class:`Peer`
    (their doorbell fds go with it), and every later wait then raises ClosedError too.
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
    cdef _FdShare _share
    cdef _BellCtx _bells
    cdef uint64_t _fork_gen        # _fork_gen in the process that made _cancel_fd
    cdef bint _doorbell_gone       # the doorbell provider was closed: its fds are gone
    cdef _FdKeeper _fdk            # the provider's fd keeper, or None
    cdef object __weakref__

    def __cinit__(self):
        self._cancel_fd = -1
        self._fd = -1
        self._fork_gen = _fork_gen
        self._closed = True  # until __init__ completes: a Channel made by __new__ has no ring

    def __init__(self, ring, doorbell=None, *, vector=0, spin=None, recheck=None):
        if self._ring is not None or self._cancel_fd >= 0:
            # (it would leak its cancel eventfd, and change the C channel under calls asleep in it)
            raise ConfigError("this Channel is already set up: make a new Channel for another "
                              "ring or doorbell")
        if not isinstance(ring, _Ring):
            raise ConfigError(f"Channel needs an SpscRing, MpmcRing, PubSubRing (its publisher) or "
                              f"Subscriber, not {type(ring).__name__}")
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
            # held around each sleep on the provider's fd: a close() meanwhile closes it after
            # the sleep, never under it
            fdk = getattr(doorbell, "_fdk", None)
            self._fdk = fdk if isinstance(fdk, _FdKeeper) else None
            fd = doorbell.vector_fd(vector)
            if fd is not None:
                _os.set_blocking(fd, False)
                self._fd = fd
        else:
            self._my_id = -1
        self._bells.channel = <void *>self
        self._bells.table = NULL
        table = getattr(doorbell, "_bell_table", None) if doorbell is not None else None
        if table is not None:
            if isinstance(table, bool) or not isinstance(table, int) or table <= 0:
                raise ConfigError(f"the doorbell's _bell_table must be the address of a bell table, "
                                  f"not {table!r}")
            self._bells.table = <ivshm_bell_table *><size_t>table
        self._cancel_fd = _chan_eventfd()
        cdef void *q
        if r._info.kind == IVSHM_KIND_SPSC:
            q = <void *>&(<SpscRing>r)._q
        elif isinstance(r, PubSubRing):
            q = <void *>&(<PubSubRing>r)._p  # the publisher: sleeps while full, rings every sleeper
        elif isinstance(r, Subscriber):
            q = <void *>&(<Subscriber>r)._s  # a subscriber: sleeps while empty, wakes the publisher
        else:
            q = <void *>&(<MpmcRing>r)._q
        rc = ivshm_chan_init(&self._ch, r._info.kind, q, self._my_id, vector, self._fd,
                             r._m.closed_fd,
                             _resolve_table if self._bells.table != NULL else _resolve_bell,
                             <void *>&self._bells, spin_ns, recheck_ns)
        if rc != 0:
            raise _error_from_code(rc, "set up the channel")
        self._ch.cancel_fd2 = self._cancel_fd
        if self._fd >= 0:
            share = _fd_shares.get(self._fd)
            if share is None:
                share = _fd_shares[self._fd] = _FdShare()
            self._share = share
            self._ch.fd_share = &self._share.share
        if r._channels is None:
            r._channels = _weakref.WeakSet()
        r._channels.add(self)
        register = getattr(doorbell, "_register_channel", None) if doorbell is not None else None
        if register is not None:
            register(self)  # a Peer tells its channels before it closes their doorbell fds
        self._closed = False

    def _doorbell_closed(self):
        """Its doorbell provider (a Peer) is closing, and its fds go: calls asleep on them wake
        and raise ClosedError, and so does every later wait (it would sleep on a closed fd, or
        on whatever file reused its number).  Calls that need no wait go on; they ring nobody
        (the provider's bell table is empty)."""
        self._doorbell_gone = True
        self._bells.closed = 1
        self._cancel()

    cdef inline int _check_doorbell(self) except -1:
        if self._doorbell_gone:
            raise ClosedError(f"channel over ring {self._ring._name!r}: its doorbell provider "
                              f"({type(self._doorbell).__name__}) was closed, so it cannot sleep "
                              "(calls that need no wait still work)")
        return 0

    def _ring_closed(self):
        """Its ring handle was closed: wake every call blocked on this channel (they raise
        ClosedError, as every later call does)."""
        self._cancel()

    cdef void _cancel(self) noexcept:
        """Make _cancel_fd readable for good: every call asleep on this channel wakes and leaves.
        Not in a forked child: the fd is the parent's eventfd, and writing it would end every
        wait of the parent's channel, which the parent still uses (the child's own sleepers, if
        it made any, see the close at their next re-check)."""
        if self._fork_gen == _fork_gen:
            _chan_signal(self._cancel_fd)

    def __dealloc__(self):
        if self._cancel_fd >= 0:
            _os.close(self._cancel_fd)
            self._cancel_fd = -1

    # -- plumbing -------------------------------------------------------------------------------
    cdef inline int _check(self) except -1:
        if self._closed:
            raise ClosedError("the channel is closed")
        return self._ring._check()

    cdef inline int _wake_other(self, uint32_t my_side) noexcept:
        """Ring the sleepers of the other side that need it; how many were rung."""
        # A send or receive that copied with the GIL released may have seen the region closed
        # and unmapped when it left: then there is nobody to wake through this mapping.
        if self._ring._m.closed:
            return 0
        cdef int rung
        if self._ring._info.kind == IVSHM_KIND_PUBSUB and my_side == IVSHM_CHAN_SEND:
            rung = ivshm_chan_wake_all(&self._ch, my_side)  # every subscriber needs every message
        else:
            rung = ivshm_chan_wake_other(&self._ch, my_side)
        if self._bells.nrung or self._bells.refreshed:
            _bells_after_wake(&self._bells)
        return rung

    cdef int _own_cancel_fd(self) except -1:
        """In a child made by fork, before its first wait there: a cancel fd of its own (the
        inherited one is the parent's, which this process must not write), so that a close in
        this process wakes this process's sleepers."""
        cdef int fd = _chan_eventfd()
        if self._cancel_fd >= 0:
            _os.close(self._cancel_fd)  # this process's copy of the parent's
        self._cancel_fd = fd
        self._ch.cancel_fd2 = fd
        self._fork_gen = _fork_gen
        if self._closed or self._doorbell_gone:
            _chan_signal(fd)  # (closed before the fork: its waits end at once here too)
        return 0

    cdef int _wait(self, ivshm_chan_call *call, timeout, bint sending) except -1:
        """One blocking wait (GIL released, mapping held).  Returns when the ring may be ready;
        raises ClosedError, WaitTimeout/StallError, KeyboardInterrupt (signals), OSError."""
        cdef _Mapping m = self._ring._m
        cdef int rc
        cdef _FdKeeper fdk
        if self._fork_gen != _fork_gen:
            self._own_cancel_fd()
        while True:
            if self._closed or m.closed:  # a copy that released the GIL may have seen a close
                raise ClosedError(f"channel over ring {self._ring._name!r} closed while waiting")
            self._check_doorbell()
            fdk = self._fdk
            if fdk is not None and not fdk.c_enter():
                self._doorbell_gone = True  # (its close told us, or is about to)
                self._check_doorbell()
            m.enter()
            with nogil:
                rc = ivshm_chan_wait(&self._ch, call)
            m.leave()
            if fdk is not None:
                fdk.c_leave()
            if m.lost:  # the SIGBUS guard wrote the region's closed_fd: the memory is gone
                raise m.lost_error(f"channel over ring {self._ring._name!r}")
            if self._closed or m.closed or rc == -ECANCELED:
                self._check_doorbell()
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
            what = f"waiting on channel over ring {self._ring._name!r}: {_os.strerror(-rc)}"
            if rc == -EBADF:
                what += (f" (its doorbell fd {self._fd}, vector {self._vector} of its "
                         f"{type(self._doorbell).__name__}, was closed under it: close this "
                         "channel, and make a new one over an open doorbell provider)")
            raise SystemCallError(-rc, what)

    cdef uint64_t _slots_for(self, data) except 0:
        """Slots the message needs: an SPSC producer waits for that much room."""
        if data is None or self._ring._info.kind != IVSHM_KIND_SPSC:
            return 1
        cdef Py_ssize_t n = len(data) if PyBytes_CheckExact(data) else memoryview(data).nbytes
        cdef uint64_t k = ivshm_spsc_slots_for(&(<SpscRing>self._ring)._q, n)
        return k if k else 1

    cdef int _full_timeout(self, timeout) except -1:
        self._ring._stalled_sending(timeout, -1)  # StallError naming a dead consumer's slot
        self._ring._full_error(timeout)

    cdef void _pass_on(self, ivshm_chan_call *call) noexcept:
        if not self._ring._m.closed:
            ivshm_chan_pass_on(&self._ch, call)
            if self._bells.nrung or self._bells.refreshed:
                _bells_after_wake(&self._bells)

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

    def recv_many(self, max_count=256, timeout=0.0):
        """Up to ``max_count`` messages already there; with ``timeout`` > 0 or None, waits that
        long for the first one ([] when none came)."""
        cdef int64_t t = _seconds_ns(timeout, "timeout", True)
        # as the ring's recv_many checks it (ConfigError), not as a C argument (TypeError for a
        # float or a str, OverflowError for a large int; True taken for 1)
        max_count = _size_arg(max_count, "max_count", 0, PY_SSIZE_T_MAX)
        self._check()
        out = self._ring.recv_many(max_count, 0.0)
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
                    out = self._ring.recv_many(max_count, 0.0)
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
        were sent: the rest are ``messages[n:]``, so ``messages`` must be a sequence (a list or
        tuple; ConfigError for an iterator, whose unsent rest could not be given back)."""
        cdef int64_t t = _seconds_ns(timeout, "timeout", True)
        self._check()
        self._ring._check_send()
        seq = self._ring._sequence(messages)  # a sequence: the rest, messages[n:], stays the caller's
        cdef Py_ssize_t sent = self._send_part(seq, 0)
        if sent >= len(seq) or t == 0:
            return sent
        cdef ivshm_chan_call call
        cdef Py_ssize_t n
        ivshm_chan_call_init(&call, IVSHM_CHAN_SEND, t, self._slots_for(seq[sent]))
        try:
            while sent < len(seq):
                try:
                    self._wait(&call, timeout, True)
                except WaitTimeout as e:
                    if type(e) is WaitTimeout:
                        break
                    raise
                n = self._send_part(seq, sent)
                if n > sent:
                    sent = n
                    ivshm_chan_call_progress(&call)  # spin again before the next slot's sleep
        finally:
            self._pass_on(&call)
        return sent

    cdef Py_ssize_t _send_part(self, seq, Py_ssize_t start) except -1:
        """The ring's send_many from message ``start`` of ``seq``, never waiting: the index
        reached.  Messages sent before an error (one too large, one not bytes-like) are counted
        and woken for like any others: a receiver asleep on the empty ring must not sleep through
        them.  The error's ``.sent`` counts from ``seq[0]``, whatever the waits in between."""
        cdef Py_ssize_t n
        try:
            n = self._ring._send_many_from(seq, start, 0.0, 0.0)
        except BaseException as e:
            sent = getattr(e, "sent", None)
            if type(sent) is int and sent > start:
                self._sent += sent - start
                self._wake_other(IVSHM_CHAN_SEND)
            raise
        if n > start:
            self._sent += n - start
            self._wake_other(IVSHM_CHAN_SEND)
        return n

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
        # the validated seconds, not the argument: math.inf and ints too large for a float wait
        # forever, as in the blocking calls
        cdef double t = _timeout_arg(timeout)
        deadline = None if t < 0 else loop.time() + t
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
                self._check()  # closed meanwhile (another thread): the mapping may be gone
                self._check_doorbell()  # its fd may be gone
                m.enter()  # the mapping stays while this call holds a sleeper entry
                try:
                    armed = ivshm_chan_arm(&self._ch, &c.call)
                    if not ivshm_chan_ready(&self._ch, side, c.call.need if side == IVSHM_CHAN_SEND else 1):
                        # claimed between the re-check and the count: do not sleep; absorb
                        # settles the fd keeping no ring for this call (ivshm_chan_sleep_begin)
                        claimed = ivshm_chan_sleep_begin(&self._ch, &c.call)
                        try:
                            if claimed:
                                if not self._closed:
                                    ivshm_chan_absorb(&self._ch, &c.call)
                            elif ivshm_chan_sleep_on_fd(&self._ch, &c.call):
                                await self._await_fds(loop, span, True, armed, m.closed_fd, c)
                            else:
                                # the fd holds rings for other sleepers (ivshm_chan_sleep_on_fd):
                                # a back-off step off it; not armed (the table is full): 1 ms
                                step = ivshm_chan_backoff_ns(&c.call) / 1e9 if armed else 0.001
                                await self._await_fds(loop, min(span, step), False, armed,
                                                      m.closed_fd, c)
                        finally:
                            ivshm_chan_sleep_end(&self._ch, &c.call)
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

    async def _await_fds(self, loop, span, bint on_fd, bint armed, int closed_fd, _AsyncCall c):
        cdef _FdKeeper fdk = None
        if self._fork_gen != _fork_gen:
            self._own_cancel_fd()  # (see there)
        fut = loop.create_future()
        fds = [self._cancel_fd, closed_fd]  # the mapping's own: held by the caller
        if on_fd:
            # the provider's fd stays open while the loop watches it: a close() meanwhile closes
            # it after the remove_reader below, which so never unregisters another file that
            # took its number
            fdk = self._fdk
            if fdk is not None and not fdk.c_enter():
                self._doorbell_gone = True  # (its close told us, or is about to)
                self._check_doorbell()
            fds.append(self._fd)
        try:
            try:
                for fd in fds:
                    _watch_fd(loop, fd, fut)  # shared with other waiters on the fd (see there)
                await _asyncio.wait_for(fut, span)
            except _asyncio.TimeoutError:
                pass
            finally:
                for fd in fds:
                    _unwatch_fd(loop, fd, fut)
            self._absorb_after_await(armed, c)
        finally:
            if fdk is not None:
                fdk.c_leave()

    cdef void _absorb_after_await(self, bint armed, _AsyncCall c) noexcept:
        # Not once its doorbell provider closed: the fd goes with it (when not watched, at
        # once), and the number may name another file by then, whose contents the settling
        # read (and write) would take.  (The provider tells the channel, with the GIL, before
        # it closes its fds, and absorb runs with the GIL held: no close can fall between this
        # look and the read.)
        if armed and not self._closed and not self._doorbell_gone:
            ivshm_chan_absorb(&self._ch, &c.call)

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
        wake-ups passed on to a sleeper of one's own side, and armings (sleeper entries taken;
        the other side rings at most once per arming)."""
        cdef ivshm_chan_stats st
        ivshm_chan_get_stats(&self._ch, &st)
        return {"sent": self._sent, "received": self._received, "doorbells": st.doorbells,
                "sleeps": st.sleeps, "wakeups": st.wakeups, "unrouted": st.unrouted,
                "passed_on": st.passes, "armed": st.arms}

    def fileno(self):
        """The doorbell fd this side sleeps on (for select/epoll), or -1 when it polls.  The
        ring that woke a blocking call may stay in it until this channel's next sleep
        (docs/wakeup.md), so readable does not mean a message is there."""
        return self._fd

    def __len__(self):
        if self._ring is None:
            raise ClosedError("this Channel was never set up (made by Channel.__new__)")
        return len(self._ring)

    def close(self):
        """Stop using the ring and doorbell (neither is closed: they belong to the caller).
        Calls blocked on this channel in other threads or tasks wake and raise ClosedError.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._bells.closed = 1
        self._cancel()

    @property
    def closed(self):
        return self._closed or self._ring.closed

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self._ring is None:
            return "<pyivshmem.Channel of no ring>"
        return f"<pyivshmem.Channel ring={self._ring._name!r} vector={self._vector} fd={self._fd}>"

    def wake(self, side):
        """Wake a sleeper of ``side`` after messages were taken or put outside this channel's own
        calls (``ring.peek()``/``release()``, ``ring.reserve()``/``commit()``, or another handle),
        which ring nobody: "senders" after taking (one producer asleep on a full ring),
        "receivers" after putting (one consumer asleep on an empty ring; every subscriber for a
        PubSubRing publisher).  Like the channel's own calls it rings only a sleeper that is
        actually asleep, through this channel's doorbell.  Returns how many were rung."""
        self._check()
        cdef uint32_t my_side
        if side == "senders":
            my_side = IVSHM_CHAN_RECV  # a consumer's doing wakes producers
        elif side == "receivers":
            my_side = IVSHM_CHAN_SEND
        else:
            raise ConfigError(f"wake(side) takes 'senders' or 'receivers', not {side!r}")
        return self._wake_other(my_side)
