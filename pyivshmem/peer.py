"""The host peer: the client side of the ivshmem server protocol.

``Peer.connect(path)`` connects to an ivshmem server (QEMU's ``ivshmem-server`` or
:class:`pyivshmem.Server`), receives its peer id, the shared memory and the eventfds of every peer,
and maps the memory as a :class:`pyivshmem.Region`.  Then it rings other peers' vectors
(:meth:`Peer.notify`), sleeps on its own (:meth:`Peer.wait`), and follows peers joining and
leaving (:meth:`Peer.events`).

Every message from the server is validated (docs/peer.md lists the rules); anything unexpected
raises :class:`pyivshmem.ProtocolError` saying what was received and what was expected, and
every fd that came with it is closed.

Every use of a Peer (:meth:`notify`, :meth:`notify_target`, :meth:`wait`, :meth:`events`) first
takes in every server message already waiting, so an application that only sends never leaves its
server queueing announcements for it (:attr:`peers` shows the result of the last such call).  A
Channel over a Peer rings from the Peer's C bell table instead of calling :meth:`notify_target`;
its waker looks at the server socket at most once per :data:`BELL_WATCH_INTERVAL` of doorbells
(and whenever it rings a peer the table lacks) and takes waiting messages in the same way
(docs/wakeup.md).  Events are kept for
:meth:`events`; when many pile up, a peer that joined and left meanwhile is dropped from them.

A Peer is meant to be used from one thread at a time; :meth:`notify` may also be called from
other threads as long as the peer being rung does not leave meanwhile.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Set, Tuple

from ._ffi_doorbell import ffi, lib
from .doorbell import (NOTIFY_EVENTFD, WaitSet, _deadline, _FdKeeper, _timeout_seconds,
                       timeout_ms)
from .doorbell import drain as doorbell_drain
from .doorbell import eventfd as doorbell_eventfd
from .doorbell import ring as doorbell_ring
from .errors import ClosedError, ConfigError, InheritedError, PeerDisconnected, ProtocolError

if TYPE_CHECKING:
    from ._ring import Region

__all__ = ["Peer", "PeerEvent", "JOINED", "LEFT", "DISCONNECTED", "DEFAULT_SOCKET"]

DEFAULT_SOCKET = "/tmp/ivshmem_socket"
#: Protocol limits, from csrc/ivshm_peer.h.
MAX_ID = int(lib.IVSHM_PROTO_MAX_ID)
MAX_VECTORS = int(lib.IVSHM_PROTO_MAX_VECTORS)
#: After my first vector, how long connect() waits for more of mine when no other peer tells
#: how many to expect (seconds).
SETUP_QUIET = 0.05

#: PeerEvent kinds.
JOINED = "joined"
LEFT = "left"
DISCONNECTED = "disconnected"

#: A Channel's waker looks at the server socket (taking in joins and leaves before it rings) at
#: most this often, and whenever it rings a peer it does not know (seconds).
BELL_WATCH_INTERVAL = 0.001

#: Events kept for events() before joined-and-left pairs are dropped (then twice what is left).
_COMPACT_MIN = 256

_SOCK_TAG = 0x7FFFFFFE  # wait-set tag of the server socket; vectors use their number


class PeerEvent(NamedTuple):
    """Something that happened on the server connection.

    ``kind`` is ``"joined"`` (``peer`` connected; its vector count is ``vectors``), ``"left"``
    (``peer`` disconnected) or ``"disconnected"`` (the server closed our connection; ``peer`` is
    None).
    """

    kind: str
    peer: Optional[int]
    vectors: int = 0


class _Msg(NamedTuple):
    value: int
    fd: int  # -1 when none; owned by the receiver of the _Msg


def _fd_kind(fd: int) -> str:
    buf = ffi.new("char[]", 256)
    if lib.ivshm_fd_describe(fd, buf, 256) < 0:
        return "an fd of unknown type"
    text = ffi.string(buf).decode(errors="replace")
    return {"anon_inode:[eventfd]": "an eventfd"}.get(text, repr(text))


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _quiet(poll: "Optional[select.poll]") -> bool:
    """True when ``poll`` (a Peer's look at its server socket) finds nothing waiting.  False
    when something is, when there is no socket, and when another thread polls it right now (a
    select.poll object refuses two at once: RuntimeError): the caller reads, under the lock."""
    if poll is None:
        return False
    try:
        return not poll.poll(0)
    except RuntimeError:
        return False


def _is_int(value: object, lo: int, hi: int) -> bool:
    """An int (not a bool) in [lo, hi]."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _show(value: int, fd: int) -> str:
    return f"{value} with an fd" if fd >= 0 else f"{value} without an fd"


class Peer:
    """A connection to an ivshmem server: my id, the shared memory, and the doorbells."""

    def __init__(self) -> None:
        # Use Peer.connect(); the constructor only makes an empty, closed-safe object.
        # (first: if this fails, nothing else exists to release)
        # How to ring every (peer, vector) I know, for Channel's wakers in C (the table's address
        # is _bell_table).  Entries follow _own and _peers: set when a vector arrives, cleared
        # BEFORE its fd is closed.  The table lives as long as this object (not just until close):
        # a Channel holds its Peer, so it never reads freed memory.
        out = ffi.new("struct ivshm_bell_table **")
        rc = lib.ivshm_bell_table_create(lib.IVSHM_BELL_EVENTFD, MAX_ID, MAX_VECTORS, out)
        if rc < 0:
            raise OSError(-rc, f"cannot make a doorbell table: {os.strerror(-rc)}")
        self._bells = ffi.gc(out[0], lib.ivshm_bell_table_destroy)
        # closed until every attribute below exists: __del__ (after a Ctrl-C in here) then
        # leaves the half-made object alone
        self._closed = True
        # Every fd this Peer closes goes through here: never under a call of it (or of a Channel
        # over it) that uses that fd with the GIL released.  (_FdKeeper, docs/wakeup.md)
        self._fdk = _FdKeeper("this Peer")
        # The process that made this Peer.  A child that inherits it across fork shares the
        # server connection and the epoll sets with the parent: it may only close() it (its own
        # copies of the fds), never read the socket or change the epoll sets.
        self._pid = os.getpid()
        self._sock: Optional[socket.socket] = None
        self._sock_watched = False
        self._poll: Optional["select.poll"] = None
        self._ws: Optional[WaitSet] = None
        # fileno(): an epoll over _ws and _ready, an eventfd rung while events wait for
        # events(), so a caller's event loop also wakes for messages another call took in
        self._outer: Optional[WaitSet] = None
        self._ready = -1
        self._msg = ffi.new("struct ivshm_proto_msg *")
        lib.ivshm_proto_msg_init(self._msg)
        self._id = -1
        self._own: List[int] = []  # my vector eventfds
        self._peers: Dict[int, List[int]] = {}  # other peer id -> its vector eventfds
        # The peers of _peers whose join completed (shown in peers, announced by JOINED unless
        # known at set-up): once in, a peer stays until it leaves, even when our own vector
        # count grows later, so that its JOINED and LEFT come once each and in pairs.
        self._whole: Set[int] = set()
        # Events not yet returned by events().  When they pile up (an application that never
        # calls events()), a peer that joined and left meanwhile is dropped from the list, so
        # memory stays bounded by the peers that exist.
        self._pending: List[PeerEvent] = []
        self._compact_at = _COMPACT_MIN
        self._error: Optional[ProtocolError] = None  # found by an implicit drain; for events()
        # One thread at a time reads the server socket and keeps the tables it fills (_own,
        # _peers, _msg), and close() does not tear them down under such a reader: it waits for
        # it, or (a signal handler interrupting this thread's own reader, which holds the lock:
        # re-entrant, hence RLock) leaves the release to that reader (_close_deferred).
        self._lock = threading.RLock()
        self._close_deferred = False
        # a _drain_locked() is under way (in some thread): set before its first recv
        self._reading = False
        self._server_gone: Optional[str] = None  # why the server connection ended
        self._path = ""
        self._format_region = True
        # the Channels over this Peer (weakly): close() tells them before their doorbell fds go
        self._channels: "weakref.WeakSet" = weakref.WeakSet()
        #: The shared memory, a pyivshmem Region (closed with the Peer).
        self.region: "Region" = None  # type: ignore[assignment]  # set by connect()
        self._closed = False

    # ------------------------------------------------------------------ connecting
    @classmethod
    def connect(
        cls,
        socket_path: str = DEFAULT_SOCKET,
        *,
        timeout: Optional[float] = 5.0,
        format_region: bool = True,
        vectors: Optional[int] = None,
    ) -> "Peer":
        """Connect to the ivshmem server listening on ``socket_path``.

        Waits (at most ``timeout`` seconds in all) for the protocol version, my id, the shared
        memory and my own vectors.  ``format_region`` formats the memory as a pyivshmem region if
        it is still empty (all zeros), as happens on a fresh server.

        ``vectors``: how many vectors of mine to wait for.  None (the default) waits for at least
        one, then for as many as the other peers have (every peer of a server has the same
        number), or until the server is quiet for a moment when I am alone.  Pass the server's
        vector count to wait for exactly that many, and 0 for a server with no vectors (which
        sends nothing after the memory).  Vectors arriving later are still added.

        Raises ProtocolError when the server breaks the protocol or stalls during set-up, and
        ConnectionRefusedError / FileNotFoundError when nothing listens there.
        """
        # arguments first (ConfigError), before anything is made
        try:
            path = os.fspath(socket_path)
        except TypeError:
            raise ConfigError(f"socket_path must be a str or os.PathLike, not "
                              f"{type(socket_path).__name__}") from None
        if vectors is not None and not _is_int(vectors, 0, MAX_VECTORS):
            raise ConfigError(f"vectors must be None or an int 0..{MAX_VECTORS}, not {vectors!r}")
        seconds = _timeout_seconds(timeout)
        self = cls()
        self._path = path
        self._format_region = format_region
        deadline = _deadline(seconds)
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(seconds)
            try:
                self._sock.connect(self._path)
            except OSError as e:
                raise type(e)(
                    e.errno,
                    f"cannot connect to the ivshmem server at {self._path!r}: "
                    f"{e.strerror} (is a server running there?)",
                ) from None
            self._sock.setblocking(False)
            self._ws = WaitSet()
            self._ws.add(self._sock.fileno(), _SOCK_TAG, drain=False)
            self._ready = doorbell_eventfd()
            self._outer = WaitSet()
            self._outer.add(self._ws.fileno(), 0, drain=False)
            self._outer.add(self._ready, 1, drain=False)
            self._sock_watched = True
            # a Channel's waker lets us take in the server's news before it rings (_bell_refresh)
            lib.ivshm_bell_table_set_watch(self._bells, self._sock.fileno(),
                                           int(BELL_WATCH_INTERVAL * 1e9))
            self._poll = select.poll()   # the cheap "anything waiting?" of implicit drains
            self._poll.register(self._sock.fileno(), select.POLLIN)
            self._setup(deadline, timeout, vectors)
        except BaseException:
            self._closed = True
            self._release()
            raise
        return self

    def _recv(self, deadline: Optional[float], what: str, got: List[str]) -> Optional[_Msg]:
        """One complete, transport-checked message, or None when none is complete by
        ``deadline`` (a partial one is kept for the next call).  Raises ProtocolError on a
        malformed message and PeerDisconnected on EOF."""
        assert self._sock is not None
        msg = self._msg
        while True:
            rc = lib.ivshm_proto_recv(self._sock.fileno(), msg, timeout_ms(deadline), 0, ffi.NULL)
            if rc == -errno.EINTR:
                continue  # Python runs its signal handlers here, then we resume
            break
        if rc == 0:
            m = _Msg(int(msg.value), int(msg.fd))
            msg.fd = -1  # ownership moves to the caller
            lib.ivshm_proto_msg_reset(msg)
            return m
        if rc == -errno.ETIMEDOUT:
            return None
        so_far = "; received so far: " + (", ".join(got) if got else "nothing")
        if rc == -errno.ECONNRESET:
            part = f" in the middle of a message ({msg.nbytes} of 8 bytes)" if msg.nbytes else ""
            lib.ivshm_proto_msg_reset(msg)
            raise PeerDisconnected(
                f"ivshmem server at {self._path!r} closed the connection{part} while we waited "
                f"for {what}{so_far}"
            )
        if rc == -errno.EBADMSG:
            value = int(msg.value)
            if msg.ctrunc:
                why = (f"its control data was truncated ({msg.nfds} fds arrived and were closed;"
                       " too many fds, or this process ran out of fds)")
            elif msg.late_fd:
                why = "an fd arrived in the middle of the 8-byte message (it was closed)"
            else:
                why = f"it carried {msg.nfds} fds (a message carries at most one; all were closed)"
            lib.ivshm_proto_msg_reset(msg)
            raise ProtocolError(
                f"ivshmem server at {self._path!r} sent a malformed message (value {value}): "
                f"{why}; expected {what}{so_far}"
            )
        lib.ivshm_proto_msg_reset(msg)
        raise OSError(-rc, f"receiving from the ivshmem server at {self._path!r}: "
                           f"{os.strerror(-rc)}")

    def _setup(self, deadline: Optional[float], timeout: Optional[float],
               vectors: Optional[int]) -> None:
        got: List[str] = []

        def recv(what: str) -> _Msg:
            try:
                m = self._recv(deadline, what, got)
            except PeerDisconnected as e:
                raise ProtocolError(f"set-up incomplete: {e}") from None
            if m is None:
                part = (f" (only {self._msg.nbytes} of its 8 bytes arrived)"
                        if self._msg.nbytes else "")
                hint = ""
                if self._id >= 0 and not self._own and vectors is None:
                    # after the memory, a server without vectors (-n 0) sends nothing at all
                    hint = ("; if the server has no vectors (ivshmem-server -n 0), connect with "
                            "vectors=0")
                raise ProtocolError(
                    f"set-up timed out after {timeout} s: the ivshmem server at {self._path!r} "
                    f"sent nothing more while we waited for {what}{part}; received so far: "
                    + (", ".join(got) if got else "nothing") + hint
                )
            return m

        def bad(m: _Msg, expected: str) -> ProtocolError:
            if m.fd >= 0:
                _close(m.fd)
            return ProtocolError(
                f"ivshmem server at {self._path!r} broke the set-up order: expected {expected}, "
                f"received {_show(m.value, m.fd)}; received before: "
                + (", ".join(got) if got else "nothing")
            )

        m = recv("the protocol version (0, without an fd)")
        if m.value != 0 or m.fd >= 0:
            what = (f"protocol version {m.value}" if m.fd < 0 else _show(m.value, m.fd))
            raise bad(m, f"protocol version 0 without an fd (got {what}; only version 0 exists)")
        got.append("version 0")

        m = recv("our peer id (0..65535, without an fd)")
        if m.fd >= 0 or lib.ivshm_proto_check_value(m.value, 0) != 0:
            raise bad(m, "our peer id, 0..65535, without an fd")
        self._id = m.value
        got.append(f"id {m.value}")

        m = recv("the shared memory (-1 with its fd)")
        if m.value != -1 or m.fd < 0:
            raise bad(m, "the shared memory: value -1 with a memory fd")
        self._map_memory(m.fd)
        got.append("the shared memory")

        # Then: every existing peer's vectors, and finally my own.
        want = 1 if vectors is None else vectors
        while len(self._own) < want:
            m = recv(f"the vectors of the existing peers and ours (id {self._id} with an fd)")
            self._handle(m, during_setup=True, got=got)
            got.append(_show(m.value, m.fd).replace(" with an fd", "+fd"))
            if len(got) > 12:
                got[3:-8] = ["..."]
        if vectors is None:
            self._rest_of_own_vectors(deadline)
        self._drain_server()

    def _rest_of_own_vectors(self, deadline: Optional[float]) -> None:
        """The server sends my vectors back to back, but they may reach us one by one.  Every
        peer of a server has the same number of vectors, so when others are connected, read
        until I have as many as they do; otherwise until the server stays quiet for
        SETUP_QUIET seconds.  A vector arriving later is still added when it comes."""
        target = max((len(fds) for fds in self._peers.values()), default=0)
        while target == 0 or len(self._own) < target:
            quiet = time.monotonic() + SETUP_QUIET
            try:
                m = self._recv(quiet if deadline is None else min(quiet, deadline),
                               f"more vectors of ours (id {self._id})", [])
            except PeerDisconnected as e:
                self._drop_server(str(e))
                self._note(PeerEvent(DISCONNECTED, None))
                return
            if m is None:
                return
            self._note(self._handle(m))
            if m.value != self._id:
                return  # the server has moved on to other business

    def _map_memory(self, fd: int) -> None:
        from . import Region

        try:
            size = ffi.new("uint64_t *")
            rc = lib.ivshm_fd_check_shm(fd, size)
            if rc == -errno.ENOTSUP:
                raise ProtocolError(
                    f"ivshmem server at {self._path!r} sent {_fd_kind(fd)} as the shared memory; "
                    "expected a regular file (memfd, /dev/shm or hugetlbfs file)"
                )
            if rc == -errno.EINVAL:
                raise ProtocolError(
                    f"ivshmem server at {self._path!r} sent shared memory of {int(size[0])} bytes; "
                    "expected a size that is a power of two (QEMU requires it)"
                )
            if rc < 0:
                raise OSError(-rc, f"cannot inspect the shared memory fd: {os.strerror(-rc)}")
            self.region = Region.from_fd(fd, format_if_empty=self._format_region)
        finally:
            _close(fd)  # Region.from_fd keeps its own duplicate

    # ------------------------------------------------------------------ messages
    def _handle(self, m: _Msg, *, during_setup: bool = False,
                got: Optional[List[str]] = None) -> Optional[PeerEvent]:
        """Apply one message after the memory step; the event it causes, if any."""
        value, fd = m
        ctx = ("during set-up" if during_setup else "")

        def fail(text: str) -> ProtocolError:
            if fd >= 0:
                _close(fd)
            before = f"; received before: {', '.join(got)}" if got else ""
            return ProtocolError(f"ivshmem server at {self._path!r} {ctx + ' ' if ctx else ''}"
                                 f"sent {_show(value, fd)}: {text}{before}")

        if value == -1:
            raise fail("a second shared memory message (-1 is only valid as the third message)")
        if lib.ivshm_proto_check_value(value, 0) != 0:
            raise fail(f"expected a peer id in 0..{MAX_ID}")
        if fd >= 0 and lib.ivshm_fd_check_eventfd(fd) != 0:
            kind = _fd_kind(fd)
            raise fail(f"expected an eventfd for a vector of peer {value}, got {kind}")

        if value == self._id:
            if fd < 0:
                raise fail("our own id without an fd would mean we disconnected")
            if len(self._own) >= MAX_VECTORS:
                raise fail(f"more than {MAX_VECTORS} vectors for us")
            os.set_blocking(fd, False)  # we may drain from several places; never block there
            try:
                assert self._ws is not None
                self._ws.add(fd, len(self._own), drain=True)
            except BaseException:
                _close(fd)
                raise
            lib.ivshm_bell_table_set_fd(self._bells, value, len(self._own), fd)
            self._own.append(fd)
            return None

        if fd < 0:
            fds = self._peers.pop(value, None)
            if fds is None:
                raise fail(f"a disconnect of peer {value}, which is not connected "
                           f"(known peers: {sorted(self._peers) or 'none'})")
            # out of the table first: a Channel's waker must never ring a closed (or reused) fd
            lib.ivshm_bell_table_clear_peer(self._bells, value)
            self._fdk.close_later(fds)  # a notify() may be writing one of them right now
            announced = value in self._whole
            self._whole.discard(value)
            return PeerEvent(LEFT, value, len(fds)) if announced and not during_setup else None

        fds = self._peers.get(value)
        if fds is None:
            fds = self._peers[value] = []
        elif len(fds) >= MAX_VECTORS:
            raise fail(f"more than {MAX_VECTORS} vectors for peer {value}")
        lib.ivshm_bell_table_set_fd(self._bells, value, len(fds), fd)
        fds.append(fd)
        # The server sends a new peer's vectors as separate messages, which may reach us one
        # by one: the peer is announced once it has as many as we do (every peer of a server
        # has the same number), never with a partial count, and only once: our own count may
        # grow later (vectors of ours arriving after set-up), which must not hide or announce
        # again a peer already announced.
        if value not in self._whole and len(fds) >= self._complete_at():
            self._whole.add(value)
            if not during_setup:
                return PeerEvent(JOINED, value, len(fds))
        return None

    def _complete_at(self) -> int:
        """How many vectors make another peer's join complete: as many as we have."""
        return max(1, len(self._own))

    def _note(self, ev: Optional[PeerEvent]) -> None:
        """Keep an event for events().  Past _compact_at events waiting, coalesce them."""
        if ev is None:
            return
        if not self._pending:
            self._ring_ready()
        self._pending.append(ev)
        if len(self._pending) > self._compact_at:
            self._compact()

    def _compact(self) -> None:
        """Drop every join whose departure follows it in the list, and that departure: what is
        left is at most a departure and a join per peer id.  The next compaction waits until
        the list has doubled, so appending stays O(1) amortised."""
        out: List[Optional[PeerEvent]] = []
        joined: Dict[Optional[int], int] = {}
        for ev in self._pending:
            if ev.kind == JOINED:
                joined[ev.peer] = len(out)
            elif ev.kind == LEFT and ev.peer in joined:
                out[joined.pop(ev.peer)] = None
                continue
            out.append(ev)
        self._pending = [ev for ev in out if ev is not None]
        self._compact_at = max(_COMPACT_MIN, 2 * len(self._pending))

    def _drain_server(self, setup_got: Optional[List[str]] = None, *,
                      implicit: bool = False) -> None:
        """Handle every message already waiting on the socket (never blocks); events go to the
        pending list.  On EOF the server connection is dropped and a DISCONNECTED event queued;
        on a protocol violation it is dropped and ProtocolError raised (``implicit``: kept
        for the next events() call instead).  A read in another thread is waited for (reads
        never block); inside this thread's own read (a signal handler) this does nothing."""
        if self._sock is None:
            return
        # The cheap look first, without the read lock or a hold (notify() and the Channel
        # wakers come here for every ring): nothing waiting and nobody reading.  In this order:
        # a read that took the last bytes before the poll still has _reading set after it.  (A
        # poll only looks: on a socket fd closed meanwhile it finds nothing to miss.)
        if implicit and _quiet(self._poll) and not self._reading:
            return
        with self._fdk.if_open() as held:  # (the socket's fd stays open while this reads it)
            if held:
                self._drain_keeping(setup_got, implicit)

    def _drain_keeping(self, setup_got: Optional[List[str]], implicit: bool) -> None:
        if self._lock._is_owned():  # type: ignore[attr-defined]
            return  # a signal handler inside this thread's own read: that read goes on
        # A with, not acquire() then try: an exception from a signal handler right after a
        # plain acquire() returned would leave the lock held for good (and close() in another
        # thread waiting on it).  Another thread's read is waited for (reads never block).
        try:
            with self._lock:
                if self._closed and setup_got is None:
                    return  # closed while this waited for the lock
                # (again under the lock: the read we waited for may have taken it all)
                if implicit and _quiet(self._poll):
                    return  # nothing waiting (and no EOF): one poll() instead of the whole path
                try:
                    self._drain_locked(setup_got)
                except ProtocolError as e:
                    if not implicit:
                        raise
                    self._error = e  # for events(); fileno() turns readable for it
                    self._ring_ready()
        finally:
            self._finish_deferred_close()

    def _finish_deferred_close(self) -> None:
        """After this thread let go of the read lock: a close() that a signal handler ran while
        it held it (anywhere in the with) left the release to it.  A handler that runs after
        this look finds the lock free and releases by itself; one that runs between the
        unlock and this look found the Peer closed already, and this look does its work."""
        if self._close_deferred and not self._lock._is_owned():  # type: ignore[attr-defined]
            with self._lock:
                if self._close_deferred:
                    self._close_deferred = False
                    self._release()

    def _drain_locked(self, setup_got: Optional[List[str]]) -> None:
        # (_reading: implicit drains of other threads wait for this one instead of skipping)
        self._reading = True
        try:
            self._drain_loop(setup_got)
        finally:
            self._reading = False

    def _drain_loop(self, setup_got: Optional[List[str]]) -> None:
        # (stops at a close() that a signal handler ran meanwhile: _close_deferred)
        while self._sock is not None and not self._close_deferred:
            try:
                m = self._recv(0.0, "a peer id", setup_got or [])
                if m is None:
                    return  # nothing (more) complete queued
                ev = self._handle(m, got=setup_got)
            except PeerDisconnected as e:
                self._drop_server(str(e))
                self._note(PeerEvent(DISCONNECTED, None))
                return
            except ProtocolError as e:
                self._drop_server(f"protocol error: {e}")
                raise
            self._note(ev)

    def _drop_server(self, why: str) -> None:
        self._server_gone = why
        sock, self._sock = self._sock, None
        if sock is not None:
            lib.ivshm_bell_table_set_watch(self._bells, -1, 0)  # before its fd number is closed
            if self._sock_watched and self._ws is not None and not self._ws.closed:
                self._ws.remove(sock.fileno())
            self._sock_watched = False
            self._poll = None
            self._fdk.close_later([sock.detach()])  # a drain may be reading it right now
        lib.ivshm_proto_msg_reset(self._msg)

    def _ring_ready(self) -> None:
        with self._fdk.if_open() as held:
            if held and self._ready >= 0:
                doorbell_ring(self._ready)

    # ------------------------------------------------------------------ public API
    def _live(self) -> None:
        if self._closed:
            raise ClosedError("this Peer is closed")
        if os.getpid() != self._pid:
            raise InheritedError(
                f"this Peer was made by process {self._pid} and inherited across fork: it shares "
                "that process's server connection, so it cannot be used here; call close() on it "
                "(which leaves the parent's connection alone) and Peer.connect() in this process")

    @property
    def id(self) -> int:
        """My peer id, as given by the server."""
        self._live()
        return self._id

    @property
    def vectors(self) -> int:
        """How many vectors (interrupt lines) I have."""
        self._live()
        return len(self._own)

    @property
    def peers(self) -> Dict[int, int]:
        """The other connected peers: ``{peer_id: number_of_vectors}`` (a copy).

        The server's waiting messages are taken in first, as notify() and wait() do (never
        blocking; their events wait for events()), so the view is as current as what the server
        has sent, and reading it keeps the server from queueing for this peer.  A protocol error
        found here drops the connection and is raised by the next events() call.  A peer that
        is joining shows once all its vectors have arrived (the server sends them one by one),
        as its JOINED event does: never with a partial count."""
        self._live()
        self._drain_server(implicit=True)
        return {pid: len(fds) for pid, fds in sorted(self._peers.items()) if pid in self._whole}

    @property
    def connected(self) -> bool:
        """False once the server closed our connection (doorbells keep working)."""
        return not self._closed and self._sock is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def socket_path(self) -> str:
        return self._path

    def _fds_of(self, peer_id: int) -> Optional[List[int]]:
        if peer_id == self._id:
            return self._own
        return self._peers.get(peer_id)

    def notify(self, peer_id: int, vector: int = 0) -> None:
        """Ring ``vector`` of ``peer_id`` (my own id rings myself).

        The server's waiting messages are taken in first (their events wait for events()), so
        a peer that has left is known to have left.  Raises ConfigError for a peer that is not
        connected or a vector it does not have."""
        self._live()
        self._drain_server(implicit=True)
        # held from the look-up to the write: a leave (or a close) in another thread meanwhile
        # closes the fd after the write, never under it
        with self._fdk.hold():
            fds = self._fds_of(peer_id)
            # closed by another thread since the look at the top (my own list is empty then,
            # another peer's is gone): ClosedError, not ConfigError
            self._live()
            if fds is None:
                raise ConfigError(
                    f"cannot notify peer {peer_id}: not connected to the server at "
                    f"{self._path!r} (connected peers: {sorted(self._peers) or 'none'}; my id "
                    f"is {self._id})")
            if not _is_int(vector, 0, len(fds) - 1):
                raise ConfigError(
                    f"cannot notify peer {peer_id} on vector {vector!r}: it has {len(fds)} "
                    f"vector(s), 0..{len(fds) - 1}")
            rc = lib.ivshm_eventfd_ring(fds[vector])
        if rc < 0:
            raise OSError(-rc, f"ringing peer {peer_id} vector {vector}: {os.strerror(-rc)}")

    def vector_fd(self, vector: int) -> Optional[int]:
        """The eventfd of my own ``vector`` (readable when it fires; read 8 bytes to drain).
        The Peer owns it: valid until close()."""
        self._live()
        if not _is_int(vector, 0, len(self._own) - 1):
            raise ConfigError(f"I have {len(self._own)} vector(s); there is no vector {vector!r}")
        return self._own[vector]

    def notify_target(self, peer_id: int, vector: int) -> Optional[Tuple[int, int, int]]:
        """``(NOTIFY_EVENTFD, fd, 0)`` to ring ``peer_id``'s ``vector`` from C, or None when that
        peer or vector is unknown.  The fd is closed when that peer leaves (a LEFT event) or this
        Peer is closed: stop using it then."""
        self._live()
        # take in the server's waiting messages first (never blocks; their events still reach
        # events(), and a protocol error is raised there)
        self._drain_server(implicit=True)
        fds = self._fds_of(peer_id)
        if fds is None or not _is_int(vector, 0, len(fds) - 1):
            return None
        return (NOTIFY_EVENTFD, fds[vector], 0)

    def _register_channel(self, channel: object) -> None:
        """A Channel over this Peer: told by close(), before the fds it sleeps on go."""
        self._channels.add(channel)
        if self._closed:
            # close() ran (in another thread) after the Channel took its vector fd and before
            # it got here, so its loop over the channels missed this one: tell it now.  (close()
            # sets _closed before that loop, so one of the two always tells it.)
            channel._doorbell_closed()  # type: ignore[attr-defined]

    @property
    def _bell_table(self) -> int:
        """The address of my bell table (csrc/ivshm_doorbell.h), for Channel: how to ring every
        (peer, vector) I know, kept up to date as peers join and leave, valid while this object
        lives (entries are cleared by close())."""
        return int(ffi.cast("uintptr_t", self._bells))

    def _bell_refresh(self) -> None:
        """A Channel's waker found my server socket readable: take in what is waiting, so that
        the table knows who left and who joined before it rings (and the server never queues
        for a peer that only sends through Channels)."""
        if self._closed:
            return
        if os.getpid() != self._pid:
            # an inherited Peer may not read the parent's socket: stop asking
            lib.ivshm_bell_table_set_watch(self._bells, -1, 0)
            return
        self._drain_server(implicit=True)

    def fileno(self) -> int:
        """An epoll fd, readable when one of my vectors fired, a server message is waiting, or
        events taken in by another call wait for events(): register it with
        select/epoll/asyncio, then call wait(0) and events()."""
        self._live()
        outer = self._outer
        if outer is None:  # closed since the look above (a signal handler)
            raise ClosedError("this Peer is closed")
        return outer.fileno()

    def wait(self, timeout: Optional[float] = None) -> List[int]:
        """Sleep (GIL released) until one of my vectors fires, at most ``timeout`` seconds (None:
        no limit).  Returns the vectors that fired (drained), or [] on timeout.

        Server messages arriving meanwhile are handled (their events wait for events()); a signal
        runs its Python handler (Ctrl-C raises KeyboardInterrupt) and the wait goes on.
        close() from another thread (or a signal handler) ends the wait with ClosedError."""
        self._live()
        ws = self._ws
        if ws is None:  # closed since the look above (a signal handler)
            raise ClosedError("this Peer is closed")
        deadline = _deadline(timeout)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                with self._fdk.hold():  # the vectors' fds, drained inside the wait, stay open
                    fired = ws.wait(left)
            except ClosedError:
                raise ClosedError("this Peer was closed while waiting") from None
            vectors = sorted({tag for tag, _ in fired if tag != _SOCK_TAG})
            if any(tag == _SOCK_TAG for tag, _ in fired):
                self._drain_server()
            if vectors:
                return vectors
            if deadline is not None and time.monotonic() >= deadline:
                return []
            if not fired:
                return []

    def events(self) -> List[PeerEvent]:
        """Handle the server messages waiting (never blocks); the peers that joined or left since
        the last call, and a DISCONNECTED event when the server closed the connection.

        Every message waiting is handled, however many.  When more than a few hundred events
        piled up since the last call, a peer that joined and left meanwhile is reported by
        neither event (memory stays bounded for an application that rarely calls events()).

        After the DISCONNECTED event was returned, further calls raise PeerDisconnected.  A server
        that breaks the protocol raises ProtocolError (also when another call found the error
        first) and the connection to it is dropped (the doorbells of known peers keep
        working)."""
        self._live()
        with self._fdk.hold():  # _ready, drained below
            return self._events_held()

    def _events_held(self) -> List[PeerEvent]:
        # a signal handler inside this thread's own read of the socket: no read of its own
        nested = self._lock._is_owned()  # type: ignore[attr-defined]
        try:
            return self._events_locked(nested)
        finally:
            self._finish_deferred_close()

    def _events_locked(self, nested: bool) -> List[PeerEvent]:
        with self._lock:
            if self._closed:
                raise ClosedError("this Peer is closed")
            if self._error is not None:
                err, self._error = self._error, None
                if self._ready >= 0:
                    doorbell_drain(self._ready)
                raise err
            if self._sock is None and not self._pending:
                raise PeerDisconnected(
                    f"no longer connected to the ivshmem server at {self._path!r}: "
                    f"{self._server_gone}"
                )
            if self._sock is not None and not nested:
                self._drain_locked(None)
            if self._closed:
                raise ClosedError("this Peer is closed")
            out, self._pending = self._pending, []
            self._compact_at = _COMPACT_MIN
            if self._ready >= 0:
                doorbell_drain(self._ready)   # rung by _note for what we now return
        # Report each joined peer with its vector count: as of its departure when it left
        # since, as of now otherwise.
        result: List[PeerEvent] = []
        left_with: Dict[Optional[int], int] = {}
        for e in reversed(out):
            if e.kind == LEFT:
                left_with[e.peer] = e.vectors
            elif e.kind == JOINED:
                n = left_with.pop(e.peer, None)
                if n is None:
                    n = len(self._peers.get(e.peer, ())) or e.vectors  # type: ignore[arg-type]
                e = PeerEvent(JOINED, e.peer, n)
            result.append(e)
        result.reverse()
        return result

    # ------------------------------------------------------------------ closing
    def _release(self) -> None:
        lib.ivshm_bell_table_clear(self._bells)  # before any fd is closed (see _bell_table)
        self._drop_server(self._server_gone or "closed")
        for ws in (self._outer, self._ws):
            if ws is not None:
                ws.close()  # a wait() asleep in another thread wakes: ClosedError
        self._outer = self._ws = None
        fds = [self._ready] + self._own + [fd for lst in self._peers.values() for fd in lst]
        self._ready, self._own, self._peers = -1, [], {}
        self._whole = set()
        # closed now, or by the last call still inside (a Channel waking from its sleep on
        # a vector, a wait() draining one, a notify() ringing one)
        self._fdk.close_later(fds, final=True)
        lib.ivshm_proto_msg_reset(self._msg)
        if self.region is not None:
            self.region.close()

    def _release_inherited(self) -> None:
        """Close this process's copies of the fds, touching nothing the parent shares: no epoll
        changes (an epoll set is shared across fork), no socket shutdown, no protocol state."""
        lib.ivshm_bell_table_clear(self._bells)  # our copy of the table; before the fds go
        if self._sock is not None:
            fd = self._sock.detach()  # close our copy without the socket object's bookkeeping
            _close(fd)
            self._sock = None
        for ws in (self._outer, self._ws):
            if ws is not None:
                ws.close()  # our copy of the epoll fd; its registrations belong to the parent too
        self._outer = self._ws = None
        fds = [self._ready] + self._own + [fd for lst in self._peers.values() for fd in lst]
        self._ready, self._own, self._peers = -1, [], {}
        self._whole = set()
        # this process's copies: closed now, or after this process's own Channel sleeps on
        # them have left (the keeper counts only this process's calls)
        self._fdk.close_later(fds, final=True)
        if self.region is not None:
            self.region.close()  # our mapping only

    def close(self) -> None:
        """Disconnect from the server (it tells the others we left), unmap the region (unless
        already closed) and close every fd.  Idempotent.  In a child that inherited this Peer
        across fork it closes only the child's copies and leaves the parent's connection alone."""
        if self._closed:
            # (a close() left to this thread's read of the socket, which an exception ended
            # before it could look: done now)
            self._finish_deferred_close()
            return
        self._closed = True
        # First the Channels sleeping on my vectors: they wake (ClosedError) instead of sleeping
        # on, until their re-check, on fds closed below, whose numbers a later open may reuse;
        # and they sleep on them no more.  (In a forked child the parent's sleepers are left
        # alone.)
        for ch in list(self._channels):
            ch._doorbell_closed()
        if os.getpid() != self._pid:
            self._release_inherited()
            return
        if self._lock._is_owned():  # type: ignore[attr-defined]
            # a signal handler inside this thread's own read of the server socket: tearing the
            # tables down under it would lose (or leak) what it is taking in.  It stops and
            # releases everything when it leaves; the waits of other threads wake now.
            self._close_deferred = True
            for ws in (self._outer, self._ws):
                if ws is not None:
                    ws.close()
            return
        with self._lock:  # after a read of the socket in another thread (never blocks long)
            self._release()

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if (not getattr(self, "_closed", True) and getattr(self, "_id", -1) >= 0
                and getattr(self, "_pid", None) == os.getpid()):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
        if not getattr(self, "_closed", True) or getattr(self, "_close_deferred", False):
            self.close()

    def __repr__(self) -> str:
        if self._closed:
            return "<Peer closed>"
        return (f"<Peer id={self._id} vectors={len(self._own)} peers={sorted(self._peers)} "
                f"server={self._path!r}{'' if self._sock else ' (disconnected)'}>")
