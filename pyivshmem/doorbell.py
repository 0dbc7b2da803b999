"""Doorbells: the interface a Channel needs from a host Peer or a guest PciDevice, and the
eventfd / epoll helpers behind the host side.

A *doorbell provider* (see :class:`Doorbell`) knows its own peer id, can ring any peer's vector,
and can wait until one of its own vectors fires.  On the host the vectors are eventfds handed out
by an ivshmem server; in a guest they are the BAR0 Doorbell register (to ring) and VFIO MSI-X
eventfds (to wait).

The helpers here call the C code in ``csrc/ivshm_doorbell.c`` (the one doorbell back-end: the
channel, Peer and PciDevice all use it) through cffi; the GIL is released
while a call blocks.  A blocked :meth:`WaitSet.wait` returns to Python when a signal arrives, so
Python runs its handlers (Ctrl-C raises ``KeyboardInterrupt`` as usual), and then resumes with the
time that is left.
"""
from __future__ import annotations

import errno
import math
import numbers
import os
import time
import warnings
from typing import List, Optional, Protocol, Tuple, runtime_checkable

from ._ffi_doorbell import ffi, lib
from ._ring import _FdKeeper  # noqa: F401 - the keeper of fds that calls use without the GIL
from .errors import ClosedError, ConfigError, InheritedError, error_from_code

__all__ = [
    "Doorbell",
    "NOTIFY_EVENTFD",
    "NOTIFY_MMIO32",
    "WaitSet",
    "eventfd",
    "ring",
    "drain",
    "wait_readable",
    "timeout_ms",
]

#: notify_target() kind: write the 64-bit integer 1 to the eventfd (``(1, fd, 0)``).
NOTIFY_EVENTFD = 1
#: notify_target() kind: a 32-bit volatile store of ``value`` at ``address``
#: (``(2, address, value)``).
NOTIFY_MMIO32 = 2

_INT_MAX_MS = 2**31 - 1


@runtime_checkable
class Doorbell(Protocol):
    """What a Channel needs to ring peers and to sleep until it is rung.

    Implemented by :class:`pyivshmem.Peer` (host, eventfds from a server) and by
    ``pyivshmem.PciDevice`` (guest, BAR0 + VFIO).

    Optionally, a provider also has ``_bell_table`` (the address of a C ``struct
    ivshm_bell_table``, csrc/ivshm_doorbell.h, that it keeps up to date: entries cleared before
    their fds are closed, memory valid while the provider lives) and ``_bell_refresh()`` (called,
    with the GIL, when the table's watch fd is readable).  A Channel over such a provider rings
    from C without calling :meth:`notify_target`; docs/wakeup.md says why that is safe.

    A provider that closes the fds a Channel sleeps on also has ``_register_channel(channel)``
    (called by the Channel when it is made): before those fds go, it calls
    ``channel._doorbell_closed()``, which wakes the channel's sleepers and refuses its later
    waits (ClosedError).  Such a provider may also have ``_fdk`` (an ``_FdKeeper``): a Channel
    holds it around each sleep on the provider's fd, so that the provider's close() closes that fd
    after the sleep ended, never under it.
    """

    @property
    def id(self) -> int:
        """My peer id."""
        ...

    def notify(self, peer_id: int, vector: int = 0) -> None:
        """Ring ``vector`` of ``peer_id``."""
        ...

    def vector_fd(self, vector: int) -> Optional[int]:
        """An eventfd readable when my ``vector`` fires (read 8 bytes to drain), or None when
        interrupts are unavailable and the caller must poll."""
        ...

    def notify_target(self, peer_id: int, vector: int) -> Optional[Tuple[int, int, int]]:
        """How to ring ``peer_id``'s ``vector`` from C: ``(NOTIFY_EVENTFD, fd, 0)`` or
        ``(NOTIFY_MMIO32, address, value)``; None when that peer or vector is unknown."""
        ...

    def wait(self, timeout: Optional[float]) -> List[int]:
        """Sleep until one of my vectors fires; the vectors that fired, [] on timeout."""
        ...

    def fileno(self) -> int:
        """An fd that is readable when one of my vectors fired (for select/epoll/asyncio)."""
        ...


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise error_from_code(rc, what)
    return rc


def timeout_ms(deadline: Optional[float]) -> int:
    """Milliseconds (rounded up) from now until ``deadline`` (a time.monotonic() value);
    -1 for no deadline, 0 when it has passed."""
    if deadline is None:
        return -1
    left = deadline - time.monotonic()
    if left <= 0:
        return 0
    return min(_INT_MAX_MS, math.ceil(left * 1000.0))


#: A timeout longer than this (about 285 years) waits forever, as in the rings' calls.
_FOREVER_S = 9e9


def _timeout_seconds(timeout: object, what: str = "timeout") -> Optional[float]:
    """A timeout as every call takes it (docs/api-rules.md): None, math.inf (and anything over
    _FOREVER_S, an int too large for a float too) wait forever (None); NaN, negative numbers,
    bools and anything not a real number raise ConfigError naming the argument."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise ConfigError(f"{what} must be a number of seconds, or None to wait forever, not "
                          f"{type(timeout).__name__} {timeout!r}")
    try:
        t = float(timeout)
    except OverflowError:
        t = math.inf if timeout > 0 else -math.inf
    if t != t:
        raise ConfigError(f"{what} is NaN: pass a number of seconds, or None to wait forever")
    if t < 0:
        raise ConfigError(f"{what} must be >= 0 seconds, or None to wait forever, got {timeout!r}")
    return None if t > _FOREVER_S else t


def _deadline(timeout: object, what: str = "timeout") -> Optional[float]:
    t = _timeout_seconds(timeout, what)
    return None if t is None else time.monotonic() + t


def eventfd(*, nonblock: bool = True) -> int:
    """A new close-on-exec eventfd (non-blocking unless asked otherwise).  The caller owns it."""
    return _check(lib.ivshm_eventfd_create(1 if nonblock else 0), "create an eventfd")


def ring(fd: int) -> None:
    """Ring a doorbell: add 1 to the eventfd's counter."""
    _check(lib.ivshm_eventfd_ring(fd), f"ring eventfd {fd}")


def drain(fd: int) -> int:
    """Read and reset an eventfd's counter without blocking; the number of rings (0 if none)."""
    count = ffi.new("uint64_t *")
    _check(lib.ivshm_eventfd_drain(fd, count), f"drain eventfd {fd}")
    return int(count[0])


def wait_readable(fd: int, timeout: Optional[float]) -> bool:
    """Block (GIL released) until ``fd`` is readable; False on timeout."""
    deadline = _deadline(timeout)
    while True:
        rc = lib.ivshm_wait_readable(fd, timeout_ms(deadline), 0, ffi.NULL)
        if rc == -errno.EINTR:
            continue  # Python runs its signal handlers here (Ctrl-C raises), then we resume
        return _check(rc, f"wait for fd {fd}") > 0


#: The tag of a WaitSet's own close eventfd: not for add().
_WS_CLOSE_TAG = lib.IVSHM_WS_TAG_MAX


class WaitSet:
    """A set of fds to sleep on (an epoll instance).

    Each fd is registered with a tag (0..0x7ffffffe).  Eventfds registered with ``drain=True``
    are drained when they fire and reported with the count read; other fds (a socket) are only
    reported.  The WaitSet does not own the fds it watches; close them after removing them (or
    after closing the WaitSet).  close() from another thread (or a signal handler) wakes a
    blocked :meth:`wait`, which raises ClosedError; the epoll fd is closed once it has left.
    A child that inherits it across fork may only close() it: add(), remove() and wait() raise
    InheritedError there (the epoll set is the parent's too).
    """

    def __init__(self, max_events: int = 64):
        if max_events < 1:
            raise ConfigError(f"max_events must be at least 1, not {max_events}")
        self._fd = -1
        self._wake = -1
        self._fdk = _FdKeeper("this WaitSet")
        self._pid = os.getpid()
        self._fd = _check(lib.ivshm_waitset_create(), "create an epoll wait set")
        try:
            self._wake = eventfd()
            _check(lib.ivshm_waitset_add(self._fd, self._wake, _WS_CLOSE_TAG, 0),
                   "watch the wait set's close eventfd")
        except BaseException:
            self._fdk.close_later([self._fd, self._wake], final=True)
            self._fd = self._wake = -1
            raise
        self._max = max_events
        self._out = ffi.new("struct ivshm_fired[]", max_events)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _live(self) -> int:
        if self._fd < 0:
            raise ClosedError("this WaitSet is closed")
        return self._fd

    def _here(self) -> None:
        """Refuse a use in a child that inherited this WaitSet across fork."""
        if os.getpid() != self._pid:
            # The epoll set and the close eventfd are the parent's too: a wait here would drain
            # the parent's eventfds, and nothing could wake it (ringing the close eventfd ends
            # the parent's waits), so close() would close the fd under it.
            if self._fd < 0:
                raise ClosedError("this WaitSet is closed")
            raise InheritedError(
                f"this WaitSet was made by process {self._pid} and inherited across fork: its "
                "epoll set is shared with that process, so it cannot be used here; close() it "
                "(which leaves the parent's alone) and make a new one in this process")

    def fileno(self) -> int:
        """The epoll fd: readable whenever a watched fd is readable."""
        return self._live()

    def add(self, fd: int, tag: int, *, drain: bool = True) -> None:
        if isinstance(tag, bool) or not isinstance(tag, int) or not 0 <= tag < _WS_CLOSE_TAG:
            raise ConfigError(f"tag must be an int in 0..{_WS_CLOSE_TAG - 1}, not {tag!r} "
                              f"({_WS_CLOSE_TAG} is the wait set's own)")
        flags = lib.IVSHM_WS_DRAIN if drain else 0
        self._here()
        with self._fdk.hold():  # the epoll fd stays open until the call returned
            _check(lib.ivshm_waitset_add(self._live(), fd, tag, flags), f"watch fd {fd}")

    def remove(self, fd: int) -> None:
        self._here()
        with self._fdk.hold():
            _check(lib.ivshm_waitset_remove(self._live(), fd), f"stop watching fd {fd}")

    def wait(self, timeout: Optional[float]) -> List[Tuple[int, int]]:
        """Sleep (GIL released) until a watched fd is readable or ``timeout`` seconds pass
        (None: no limit).  Returns ``[(tag, count), ...]`` (count 0 for non-drained fds), or []
        on timeout.  Signals interrupt the sleep so their Python handlers run; the wait then
        resumes with the time left.  ClosedError when the WaitSet is closed, also while it
        sleeps."""
        deadline = _deadline(timeout)
        out = self._out
        self._here()
        with self._fdk.hold():  # the epoll fd stays open until the wait returned
            ep = self._live()  # (close() sets _fd before it hands the fd over)
            while True:
                rc = lib.ivshm_waitset_wait(ep, timeout_ms(deadline), 0, out, self._max,
                                            ffi.NULL)
                if rc == -errno.EINTR:
                    if self._fd < 0:  # closed by the signal's handler
                        raise ClosedError("this WaitSet was closed while waiting")
                    continue  # Python runs its signal handlers here (Ctrl-C raises); resume
                n = _check(rc, "wait on the doorbells")
                fired = [(int(out[i].tag), int(out[i].count)) for i in range(n)]
                if any(tag == _WS_CLOSE_TAG for tag, _ in fired):
                    raise ClosedError("this WaitSet was closed while waiting")
                return fired

    def close(self) -> None:
        """Close the epoll fd; a wait blocked in another thread wakes and raises ClosedError
        (the fd is closed once it has left).  Idempotent.  In a process that inherited it
        across fork, closes that process's copies and leaves the parent's waits alone."""
        fd, wake = self._fd, self._wake
        if fd < 0:
            return
        self._fd = self._wake = -1
        if os.getpid() != self._pid:
            # the eventfd is the parent's too (ringing it would end the parent's waits), and
            # the keeper's count may be the parent's threads': close this process's copies
            for f in (fd, wake):
                if f >= 0:
                    os.close(f)
            return
        if wake >= 0:
            ring(wake)  # level-triggered and never drained: every wait inside wakes
        self._fdk.close_later([fd, wake], final=True)

    def __enter__(self) -> "WaitSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed WaitSet (epoll fd {self._fd})", ResourceWarning, source=self)
            self.close()

    def __repr__(self) -> str:
        return f"<WaitSet fd={self._fd}>" if self._fd >= 0 else "<WaitSet closed>"
