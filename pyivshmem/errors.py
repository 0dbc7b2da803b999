"""The exception hierarchy, and the one place that turns C error codes into exceptions.

Every exception is an :class:`IvshmemError` and also the builtin a caller would catch anyway
(``ValueError``, ``TimeoutError``, ``ConnectionError``, ``OSError``, ...).
"""
from __future__ import annotations

import errno as _errno
import os as _os

__all__ = [
    "IvshmemError",
    "ConfigError",
    "RegionFormatError",
    "StaleRegionError",
    "RegionLostError",
    "CorruptionError",
    "MessageTooLargeError",
    "WaitTimeout",
    "StallError",
    "ClosedError",
    "InheritedError",
    "ProtocolError",
    "PeerDisconnected",
    "SubscriberDroppedError",
    "DeviceError",
    "DeviceGoneError",
    "RingNotFoundError",
    "AlreadyExistsError",
    "RegionNotFoundError",
    "RegionFullError",
    "ViewInUseError",
    "AccessDeniedError",
    "SystemCallError",
    "error_from_code",
]


class IvshmemError(Exception):
    """Root of every error pyivshmem raises."""


class ConfigError(IvshmemError, ValueError):
    """A bad argument (a size that is not a power of two, an unknown ring kind, a name too long, a
    NaN timeout), or a call out of order (commit() without reserve(), a send on a handle whose
    reservation is still open)."""


class RegionFullError(ConfigError):
    """No room in the region for a new ring (space or directory entries): use a larger region."""


class RingNotFoundError(IvshmemError, KeyError):
    """No ring of that name in the region (also a KeyError, hence a LookupError)."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class AlreadyExistsError(IvshmemError, FileExistsError):
    """A region file or a ring of that name exists and ``exist_ok`` was false."""


class RegionNotFoundError(IvshmemError, FileNotFoundError):
    """No region file at that path."""


class AccessDeniedError(IvshmemError, PermissionError):
    """The operating system refused access (a region file's permissions, a device node)."""


class SystemCallError(IvshmemError, OSError):
    """A system call failed for a reason not covered by a more specific error (``errno`` says)."""


class ViewInUseError(IvshmemError, BufferError):
    """A zero-copy view's memory is still exported (a ``memoryview(view)``, a numpy array over
    it): commit()/release() refuse until that export is released, since it could otherwise write
    into, or read, a later message."""


class RegionFormatError(IvshmemError, ValueError):
    """The memory is not a pyivshmem region (bad magic, unknown layout version, wrong size)."""


class StaleRegionError(IvshmemError, RuntimeError):
    """The region was re-formatted (its generation changed) since this side attached to it."""


class RegionLostError(IvshmemError, RuntimeError):
    """The region's shared memory was truncated by another process (a peer shrank the file under
    the mapping).  The mapping was replaced by private zero pages so that this process did not die
    of SIGBUS; the messages in it are gone.  Every later call on the region, its rings and their
    channels raises this error: close them and re-open the region (a new Region on the file, or a
    new connection to the server for its memory).  docs/trust.md says what the guard covers."""


class CorruptionError(IvshmemError, RuntimeError):
    """A shared-memory invariant of one ring is violated; other rings are unaffected.

    ``ring`` names the ring; the message says which field held what.
    """

    def __init__(self, message: str, ring: str | None = None):
        super().__init__(message)
        self.ring = ring


class MessageTooLargeError(IvshmemError, ValueError):
    """A message longer than the ring can carry, or than the caller's buffer can hold."""


class WaitTimeout(IvshmemError, TimeoutError):
    """A blocking send/recv/wait ran out of time."""


class StallError(WaitTimeout):
    """An MPMC slot was claimed by a producer (or consumer) that never finished with it.

    ``slot`` is the slot's index (pass it to ``MpmcRing.recover`` once the holder is known to be
    dead), ``side`` is "producer" or "consumer"; ``sent``, on a ``send_many``, how many were sent.
    """

    def __init__(self, message: str = "", slot: int | None = None, side: str | None = None):
        super().__init__(message)
        self.slot = slot
        self.side = side


class ClosedError(IvshmemError, ValueError):
    """An operation on a region, ring, channel or peer that was already closed."""


class InheritedError(IvshmemError, RuntimeError):
    """An object that owns a connection (a Peer) was used in a child that inherited it across
    fork: it belongs to the parent.  Close it in the child and make a new one there."""


class ProtocolError(IvshmemError, ConnectionError):
    """An ivshmem server or client broke the protocol (IVSHMEM.md section 2)."""


class PeerDisconnected(IvshmemError, ConnectionError):
    """The peer or server at the other end went away."""


class SubscriberDroppedError(IvshmemError, ConnectionError):
    """A publish-subscribe subscriber was cut off by the publisher (it fell behind under
    ``slow="drop"``, was taken for dead, or misbehaved).  ``ring``, ``index`` (its table entry),
    ``reason`` and ``behind`` (messages it had not read when cut off) say what happened;
    subscribe again to follow the stream from now on."""

    def __init__(self, message: str, ring: str | None = None, index: int | None = None,
                 reason: str | None = None, behind: int | None = None):
        super().__init__(message)
        self.ring = ring
        self.index = index
        self.reason = reason
        self.behind = behind


class DeviceError(IvshmemError, OSError):
    """A PCI/VFIO problem inside a guest (not root, device missing, VFIO not usable)."""


class DeviceGoneError(DeviceError):
    """The guest's ivshmem device was removed (hot-unplug, ``device_del``) while it was open."""


def error_from_code(code: int, context: str, detail: str | None = None) -> Exception:
    """Map a negative errno from the C core to the matching exception.

    ``context`` says what was being done ("send on ring 'jobs'"); ``detail`` is the C core's own
    explanation where it has one (which field held which value).
    """
    code = -code if code < 0 else code
    msg = context if not detail else f"{context}: {detail}"
    if code == _errno.EPROTO:
        return CorruptionError(msg)
    if code == _errno.EMSGSIZE:
        return MessageTooLargeError(msg)
    if code == _errno.ETIMEDOUT:
        return WaitTimeout(msg)
    if code == _errno.EDEADLK:
        return StallError(msg)
    if code == _errno.ESTALE:
        return StaleRegionError(msg)
    if code in (_errno.EINVAL, _errno.ERANGE, _errno.ENAMETOOLONG):
        return ConfigError(msg)
    if code in (_errno.EBADMSG, _errno.ENOEXEC):
        return RegionFormatError(msg)
    if code == _errno.ENOENT:
        return RingNotFoundError(msg)
    if code == _errno.EEXIST:
        return AlreadyExistsError(code, msg)
    if code == _errno.ENOSPC:
        return RegionFullError(msg)
    if code in (_errno.EACCES, _errno.EPERM):
        return AccessDeniedError(code, msg)
    return SystemCallError(code, f"{msg}: {_os.strerror(code)}")
