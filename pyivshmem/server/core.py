"""The ivshmem server's protocol core: accepting clients, handing out the memory and eventfds,
announcing peers, and keeping what a slow client costs bounded.

The server hands every client (a QEMU ``ivshmem-doorbell`` device or a host :class:`Peer`) the
shared memory file descriptor, a peer id and one eventfd per vector for itself and for every other
peer, and announces peers joining and leaving (IVSHMEM.md section 2). It never blocks on a client:
every client has its own outgoing queue, drained when its socket becomes writable. Announcements
a client is behind on are coalesced (docs/server.md, "Slow clients"), and a client whose backlog
still grows beyond a bound is disconnected (and its departure announced) instead of holding the
others back.
"""
from __future__ import annotations

import atexit
import collections
import errno
import itertools
import logging
import os
import resource
import selectors
import signal
import socket
import stat
import threading
import time
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Set, Tuple, Union

from ..errors import (
    AccessDeniedError, ClosedError, ConfigError, IvshmemError, SystemCallError,
)
from ._ffi import ffi, lib
from .memory import Memory, path_error

__all__ = [
    "Server",
    "DEFAULT_SOCKET",
    "DEFAULT_SHM_NAME",
    "DEFAULT_SIZE",
    "DEFAULT_VECTORS",
    "MAX_VECTORS",
    "DEFAULT_PIDFILE",
    "DEFAULT_MODE",
    "DEFAULT_MAX_QUEUE",
    "COALESCE_AFTER",
]

log = logging.getLogger("pyivshmem.server")

DEFAULT_SOCKET = "/tmp/ivshmem_socket"
DEFAULT_SHM_NAME = "ivshmem"
DEFAULT_SIZE = 4 << 20
DEFAULT_VECTORS = 1
# csrc/ivshm_peer.h: the protocol's version and limits
PROTOCOL_VERSION = int(lib.IVSHM_PROTO_VERSION)
MAX_PEER_ID = int(lib.IVSHM_PROTO_MAX_ID)
MAX_VECTORS = int(lib.IVSHM_PROTO_MAX_VECTORS)
DEFAULT_PIDFILE = "/var/run/ivshmem-server.pid"
DEFAULT_MODE = 0o600
#: Messages a client may have waiting in the server beyond its own start-up burst.
DEFAULT_MAX_QUEUE = 16384
#: A client with this many messages waiting in the server (at most half its max_queue) is
#: behind: a peer that joins and leaves meanwhile is never announced to it.
COALESCE_AFTER = 256
_ACCEPT_BATCH = 64
_ACCEPT_PAUSE = 0.1      # seconds without accepting after running out of fds
_RETRY_INTERVAL = 0.05   # seconds between retries of a send the kernel refused for now


class _Fd:
    """A file descriptor shared by a peer and the queued messages that still carry it.

    The server keeps a peer's eventfds open until the last queued message referencing them has
    been sent (or dropped), so a slow client never receives a closed, or worse, reused, fd."""

    __slots__ = ("fd", "refs")

    def __init__(self, fd: int):
        self.fd = fd
        self.refs = 1

    def acquire(self) -> "_Fd":
        self.refs += 1
        return self

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0 and self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class _Item:
    """One entry of a client's outgoing queue: ``value`` sent once per entry of ``refs``, each
    time with that fd (None: without an fd). A join is one item (one message per vector), so
    a departure can cancel it whole; a join of a server without vectors is an empty item,
    which still orders the departure after it."""

    __slots__ = ("value", "refs")

    def __init__(self, value: int, refs: List[Optional[_Fd]]):
        self.value = value
        self.refs = refs


class _Client:
    __slots__ = (
        "id", "sock", "fileno", "vectors", "queue", "pos", "done", "pending", "limit",
        "writing", "dead", "retry",
    )

    def __init__(self, peer_id: int, sock: socket.socket, vectors: List[_Fd], limit: int):
        self.id = peer_id
        self.sock = sock
        self.fileno = sock.fileno()
        self.vectors = vectors
        # Keys: ("j", peer) its join, ("l", peer) its departure, ("f", n) a set-up message.
        # At most one join and one departure per other peer are ever waiting (a departure
        # cancels a join not yet started), so the queue is bounded by the live peers.
        self.queue: "collections.OrderedDict[tuple, _Item]" = collections.OrderedDict()
        self.pos = 0           # messages of the head item already sent
        self.done = 0          # bytes of the head message already sent
        self.pending = 0       # messages waiting, in all items
        self.limit = limit     # pending messages beyond which the client is dropped
        self.writing = False   # registered for EVENT_WRITE
        self.dead = False
        self.retry = False     # in the retry set (kernel said ETOOMANYREFS/ENOBUFS)

    def release_queue(self) -> None:
        for item in self.queue.values():
            for ref in item.refs:
                if ref is not None:
                    ref.release()
        self.queue.clear()
        self.pos = self.done = self.pending = 0


_seq = itertools.count()


class Server:
    """An ivshmem server (QEMU's protocol), run in a background thread or in the foreground.

    Parameters
    ----------
    socket_path:
        UNIX socket to listen on. A stale socket file (nobody accepting) is replaced; a live one
        is refused with :class:`ConfigError`; anything else at that path (a regular file, a
        symlink) is never touched and is refused as well.
    shm_name, shm_path, shm_dir, shm_fd, memfd:
        Where the shared memory lives; at most one. ``shm_name``: POSIX shared memory
        ``/dev/shm/<name>`` (QEMU's ``-M``; created if missing, unlinked when the server closes,
        as QEMU's server does, unless ``keep_shm``). ``shm_path``: any file (created if
        missing, never unlinked). ``shm_dir``: an unnamed temporary file in that directory, e.g.
        a hugetlbfs mount (QEMU's ``-m``). ``shm_fd``: a file descriptor of the caller's
        (duplicated at once: the caller keeps, and may close, its own). ``memfd=True`` or none
        of them: a memfd, sealed against shrinking and growing (F_SEAL_SHRINK, F_SEAL_GROW, then
        F_SEAL_SEAL), so no
        peer can truncate it under the others. The memory is a plain file of ``size`` bytes; it
        is not formatted (peers format it).
    size:
        Bytes, or a string with a K/M/G/T suffix; rounded up to a power of two. On a filesystem
        that refuses that size (hugetlbfs and its page size) the next powers of two are tried up
        to 1 GiB, like QEMU. :attr:`size` is the real size.
    vectors:
        Interrupt vectors (eventfds) per peer, 0..64.
    mode:
        Permissions of the socket and of files the server creates (default 0600). Existing
        files keep theirs.
    max_queue:
        Messages a client may have waiting in the server (on top of its own start-up burst)
        before it is considered stuck: it is then disconnected, with a warning, and its
        departure announced. Before that, announcements it is behind on are coalesced (from
        ``min(COALESCE_AFTER, max_queue // 2)`` messages waiting): a peer that joins and leaves
        meanwhile is never announced to it, so what it costs is bounded by the live peers.
    shutdown_timeout:
        Seconds :meth:`close` spends delivering the final departure announcements to clients
        that are slow to read.
    raise_fd_limit:
        Raise this process's RLIMIT_NOFILE soft limit to its hard limit when the server starts
        (the command line does; an embedded server leaves the process's limits alone unless
        asked).
    keep_region:
        The memory of a named shm object or file outlives its server.  By default a pyivshmem
        region found in it when the server starts (a previous server's session) is invalidated:
        its header is zeroed, so this server's first peer formats a fresh region with a new
        generation, and the previous session's peers still mapping it get
        :class:`RegionFormatError` / :class:`StaleRegionError` from ``region.check()`` instead of
        silently sharing rings with the new session.  ``keep_region=True`` leaves the memory as it
        is (for a region prepared before the server starts).
    keep_shm:
        Leave ``/dev/shm/<shm_name>`` in place when the server closes (by default it is
        unlinked then, like QEMU's ``ivshmem-server`` does with ``-M``; a server that fails to
        start unlinks it only if it created it). The unlink is skipped when the name by then
        points to another object than the one the server opened.
    """

    def __init__(
        self,
        socket_path: Union[str, os.PathLike] = DEFAULT_SOCKET,
        *,
        shm_name: Optional[str] = None,
        shm_path: Optional[Union[str, os.PathLike]] = None,
        shm_dir: Optional[Union[str, os.PathLike]] = None,
        shm_fd: Optional[int] = None,
        memfd: bool = False,
        size: Union[int, str] = DEFAULT_SIZE,
        vectors: int = DEFAULT_VECTORS,
        mode: int = DEFAULT_MODE,
        max_queue: int = DEFAULT_MAX_QUEUE,
        shutdown_timeout: float = 2.0,
        raise_fd_limit: bool = False,
        keep_region: bool = False,
        keep_shm: bool = False,
    ):
        self._closed = False
        self._pid = os.getpid()  # a forked child's copy owns neither the loop nor the socket path
        self._listening = False
        if isinstance(vectors, bool) or not isinstance(vectors, int):
            raise ConfigError(f"vectors must be an integer, not {vectors!r}")
        if not 0 <= vectors <= MAX_VECTORS:
            raise ConfigError(f"too many requested vectors {vectors} (0..{MAX_VECTORS})")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ConfigError(f"max_queue must be a positive integer, not {max_queue!r}")
        if not isinstance(mode, int) or mode & ~0o7777:
            raise ConfigError(f"invalid permission mode {mode!r}")
        self._socket_path = os.fspath(socket_path)
        if not self._socket_path or len(os.fsencode(self._socket_path)) >= 108:
            raise ConfigError(
                f"socket path {self._socket_path!r} is empty or longer than the 107 bytes a "
                "UNIX socket address holds; choose a shorter path"
            )
        self._memory = Memory(
            shm_name=shm_name, shm_path=shm_path, shm_dir=shm_dir, shm_fd=shm_fd, memfd=memfd,
            size=size, mode=mode, keep_region=keep_region, keep_shm=keep_shm,
        )
        self._vectors = vectors
        self._mode = mode
        self._max_queue = max_queue
        self._shutdown_timeout = float(shutdown_timeout)
        self._raise_fd_limit = bool(raise_fd_limit)

        self._ffi, self._lib = ffi, lib
        self._done = self._ffi.new("unsigned *")
        self._efd = self._ffi.new("int *")

        self._shm: Optional[_Fd] = None
        # stands in for the vectors of a peer that left before its join reached a client
        self._orphan: Optional[_Fd] = None
        self._coalesce_after = min(COALESCE_AFTER, max(1, max_queue // 2))
        self._listener: Optional[socket.socket] = None
        self._socket_id: Optional[Tuple[int, int]] = None
        self._sel: Optional[selectors.BaseSelector] = None
        self._wake_r = -1
        self._wake_w = -1
        self._clients: Dict[int, _Client] = {}        # by peer id, in connection order
        self._next_id = 0
        self._dirty: Set[_Client] = set()
        self._overflow: List[_Client] = []
        self._retry: Set[_Client] = set()
        self._accept_paused_until = 0.0
        # a plain flag, not an Event: a signal handler sets it, and Event.set() takes a lock that
        # the interrupted thread may hold (a second signal during the first one's set())
        self._stop = False
        self._finished = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self._loop_ident: Optional[int] = None
        self._shutting_down = False
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._peer_ids: Tuple[int, ...] = ()
        self._stats = {
            "accepted": 0,
            "disconnected": 0,
            "dropped_overflow": 0,
            "setup_failures": 0,
            "messages_sent": 0,
            "max_queue_seen": 0,
            "coalesced": 0,
        }

    # ---------------------------------------------------------------- public properties
    @property
    def socket_path(self) -> str:
        return self._socket_path

    @property
    def size(self) -> int:
        """The shared memory size in bytes (a power of two)."""
        return self._memory.size

    @property
    def vectors(self) -> int:
        return self._vectors

    @property
    def peers(self) -> Tuple[int, ...]:
        """Ids of the connected peers, in connection order (a snapshot)."""
        return self._peer_ids

    @property
    def shm_fd(self) -> int:
        """The shared memory file descriptor (owned by the server; dup it to keep it)."""
        self._check_open()
        if self._shm is None:
            raise ClosedError("the server has not opened its memory yet: call listen() or start()")
        return self._shm.fd

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def running(self) -> bool:
        return self._running

    @property
    def stats(self) -> Dict[str, int]:
        """Counters: accepted, disconnected, dropped_overflow, setup_failures, messages_sent,
        max_queue_seen (most messages any client had waiting in the server), coalesced (joins
        never sent to a client that was behind, because the peer left before it read them)."""
        return dict(self._stats)

    def wait_until(
        self, predicate: Callable[[Tuple[int, ...]], bool], timeout: Optional[float] = None
    ) -> bool:
        """Wait until ``predicate(peers)`` holds; False if ``timeout`` seconds passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._peer_ids), timeout)

    # ---------------------------------------------------------------- lifecycle
    def listen(self) -> "Server":
        """Bind the socket and open the memory (done by start() and serve_forever())."""
        self._check_open()
        if self._listening:
            return self
        try:
            if self._raise_fd_limit:
                _raise_nofile_limit()
            # the socket first: a server refused for a socket in use leaves memory untouched
            self._listener = self._bind()
            self._shm = _Fd(self._memory.open())
            rc = self._lib.ivshm_server_eventfd(self._efd)
            if rc < 0:
                raise SystemCallError(-rc, f"cannot create an eventfd: {os.strerror(-rc)}")
            self._orphan = _Fd(self._efd[0])
            self._sel = selectors.DefaultSelector()
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        except OSError as exc:
            self._abandon()
            if isinstance(exc, IvshmemError):
                raise
            raise _start_error(exc, self._socket_path) from exc
        except BaseException:
            self._abandon()
            raise
        self._listening = True
        log.info(
            "listening on %s: %d bytes of shared memory, %d vector(s)",
            self._socket_path, self._memory.size, self._vectors,
        )
        return self

    def _abandon(self) -> None:
        """Undo listen() for a start that failed: close everything, unlink the socket path, and
        unlink the ``-M`` memory only if this server created it. The server is closed after."""
        self._memory.unlink(failed_start=True)
        self._release_all()
        self._closed = True

    def start(self) -> "Server":
        """Listen and run the server loop in a background (daemon) thread."""
        self._check_open()
        if self._thread is not None:
            return self
        self.listen()
        self._running = True
        _live_servers.add(self)
        self._thread = threading.Thread(
            target=self._run, name=f"ivshmem-server {self._socket_path}", daemon=True
        )
        self._thread.start()
        self._loop_ident = self._thread.ident
        return self

    def serve_forever(self, handle_signals: bool = False) -> None:
        """Listen and run the server loop in this thread until :meth:`stop` (or, with
        ``handle_signals``, SIGTERM, SIGINT or SIGHUP: :data:`STOP_SIGNALS`) ends it; then shut
        down cleanly. The handlers are in place before the socket and the memory exist, so a
        signal sent as soon as the socket appears still stops the server cleanly; a SIGHUP that
        is ignored (``nohup``) stays ignored."""
        self._check_open()
        if self._running:
            raise ConfigError("this server is already running")
        old: Dict[int, object] = {}
        got: List[int] = []
        if handle_signals:
            # The handler only asks the loop to stop: it runs between any two bytecodes of this
            # thread, which may be inside a write to the log's stream, and a log call from here
            # would re-enter that stream (RuntimeError, and no stop). The loop logs it.
            def on_signal(signum, frame):
                got.append(signum)
                self._request_stop()

            old = install_stop_handlers(on_signal)
        try:
            self.listen()
            self._running = True
            self._loop_ident = threading.get_ident()
            self._run(lambda: got and log.info("received %s, shutting down",
                                               signal.Signals(got[0]).name))
        finally:
            restore_handlers(old)

    def stop(self) -> None:
        """Stop serving: every peer is told of every other's departure, the socket path is
        unlinked, everything is closed. Idempotent; same as :meth:`close`."""
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        if self._inherited():
            return
        if self._running:
            self._request_stop()
            if self._loop_ident == threading.get_ident():
                return          # called from inside the loop (a signal handler): it finishes
            self._finished.wait()
            if self._thread is not None:
                self._thread.join()
            return
        # never ran a loop: release directly
        self._closed = True
        self._release_all()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _inherited(self) -> bool:
        """True (and marked closed) in a forked child: the loop thread, the socket path and the
        memory are the parent's, and releasing them here would stop or unlink the parent's
        server; the child's copies of the descriptors go when it exits."""
        if getattr(self, "_pid", None) in (None, os.getpid()):
            return False
        self._closed = True
        return True

    def __del__(self) -> None:
        if getattr(self, "_closed", True) or self._inherited():
            return
        if getattr(self, "_listening", False):
            warnings.warn(
                f"unclosed ivshmem server on {self._socket_path}", ResourceWarning, stacklevel=2
            )
        try:
            self._closed = True
            self._release_all()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.running else "idle")
        return (
            f"<pyivshmem.Server {self._socket_path!r} size={self._memory.size} "
            f"vectors={self._vectors} peers={len(self._peer_ids)} {state}>"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"the ivshmem server on {self._socket_path} is closed")

    def _request_stop(self) -> None:
        self._stop = True
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    # ---------------------------------------------------------------- socket
    def _bind(self) -> socket.socket:
        path = self._socket_path
        _clear_stale_socket(path)
        # Bound under a temporary name and linked into place once it listens: a client that sees
        # the path never finds a socket that refuses connections (bind() creates the file before
        # listen() makes it accept them).
        tmp: Optional[str] = os.path.join(os.path.dirname(path) or ".",
                                          f".{os.path.basename(path)[:16]}.{os.getpid()}")
        if len(os.fsencode(tmp)) > 107 or os.path.lexists(tmp):  # sun_path's limit
            tmp = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # the mode of a socket's inode is applied to the file bind() creates: no window in
            # which the socket is more open than asked (umask can only narrow it further)
            os.fchmod(sock.fileno(), self._mode)
            try:
                sock.bind(tmp or path)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and tmp is None:
                    raise self._appeared(path) from exc
                raise path_error(exc, "cannot bind the socket", path) from exc
            st = os.lstat(tmp or path)
            if tmp is None:
                self._socket_id = (st.st_dev, st.st_ino)
            if stat.S_IMODE(st.st_mode) != self._mode and stat.S_ISSOCK(st.st_mode):
                os.chmod(tmp or path, self._mode)    # the umask narrowed it
            sock.listen(4096)
            if tmp is not None:
                try:
                    os.link(tmp, path)  # fails, unlike rename(), where another server appeared
                except FileExistsError as exc:
                    raise self._appeared(path) from exc
                except OSError as exc:
                    raise path_error(exc, "cannot bind the socket", path) from exc
                self._socket_id = (st.st_dev, st.st_ino)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            if self._socket_id is not None:
                self._unlink_socket()
            raise
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        return sock

    @staticmethod
    def _appeared(path: str) -> ConfigError:
        return ConfigError(f"{path} appeared while the server was starting (another server?); "
                           "stop it or choose another socket path (-S)")

    def _unlink_socket(self) -> None:
        """Remove the socket path, only if it still is the socket this server created."""
        if self._socket_id is None:
            return
        try:
            st = os.lstat(self._socket_path)
            if (st.st_dev, st.st_ino) == self._socket_id:
                os.unlink(self._socket_path)
        except OSError:
            pass
        self._socket_id = None

    # ---------------------------------------------------------------- the loop
    def _run(self, before_shutdown: Optional[Callable[[], object]] = None) -> None:
        try:
            try:
                self._loop()
            except BaseException:
                log.exception("ivshmem server loop failed; shutting down")
                raise
            finally:
                try:
                    if before_shutdown is not None:
                        before_shutdown()
                finally:
                    self._shutdown()
        finally:
            self._closed = True
            self._running = False
            _live_servers.discard(self)
            self._finished.set()

    def _loop(self) -> None:
        sel = self._sel
        assert sel is not None
        while not self._stop:
            timeout: Optional[float] = None
            if self._retry:
                timeout = _RETRY_INTERVAL
            if self._accept_paused_until:
                left = self._accept_paused_until - time.monotonic()
                if left <= 0:
                    self._resume_accept()
                else:
                    timeout = left if timeout is None else min(timeout, left)
            events = sel.select(timeout)
            for key, mask in events:
                tag = key.data
                if tag == "listen":
                    self._accept()
                elif tag == "wake":
                    _drain(self._wake_r)
                else:
                    client: _Client = tag
                    if client.dead:
                        continue
                    if mask & selectors.EVENT_READ:
                        # clients never write: data, EOF, a half-close or an error all mean
                        # this client is gone
                        self._disconnect(client, "closed its socket or sent data")
                    elif mask & selectors.EVENT_WRITE:
                        self._dirty.add(client)
            if self._retry:
                for client in self._retry:
                    client.retry = False
                    self._dirty.add(client)
                self._retry.clear()
            self._flush_dirty()

    def _flush_dirty(self) -> None:
        while self._dirty or self._overflow:
            while self._overflow:
                client = self._overflow.pop()
                if not client.dead:
                    self._stats["dropped_overflow"] += 1
                    log.warning(
                        "peer %d does not read its socket: %d messages waiting (limit %d); "
                        "disconnecting it", client.id, client.pending, client.limit,
                    )
                    self._disconnect(client, "queue limit exceeded")
            if self._dirty:
                dirty, self._dirty = self._dirty, set()
                for client in dirty:
                    if not client.dead:
                        self._flush(client)

    def _flush(self, client: _Client) -> None:
        queue = client.queue
        send = self._lib.ivshm_server_send_msg
        done = self._done
        fileno = client.fileno
        sent = 0
        rc = 0
        while queue:
            item = next(iter(queue.values()))
            refs = item.refs
            pos = client.pos
            if pos >= len(refs):
                queue.popitem(last=False)
                client.pos = 0
                continue
            ref = refs[pos]
            done[0] = client.done
            rc = send(fileno, item.value, ref.fd if ref is not None else -1, done)
            if rc != 0:
                if done[0] and ref is not None:
                    # the fd went with the first byte: the kernel holds it now
                    refs[pos] = None
                    ref.release()
                client.done = done[0]
                break
            if ref is not None:
                refs[pos] = None
                ref.release()
            client.pos = pos + 1
            client.done = 0
            client.pending -= 1
            sent += 1
        self._stats["messages_sent"] += sent
        if rc == 0:
            self._set_writing(client, False)
            return
        if rc == -errno.EAGAIN:
            self._set_writing(client, True)
        elif rc in (-errno.ETOOMANYREFS, -errno.ENOBUFS, -errno.ENOMEM):
            # the kernel refuses for now (too many fds in flight for this user, or memory):
            # keep the message and retry shortly; the queue bound still applies
            if not client.retry:
                log.warning(
                    "sending to peer %d: %s; will retry", client.id, os.strerror(-rc)
                )
                client.retry = True
                self._retry.add(client)
            self._set_writing(client, False)
        else:
            self._disconnect(client, f"send failed: {os.strerror(-rc)}")
            return
        # the bound applies to what the client leaves unread, not to a burst being delivered
        if client.pending > client.limit and client not in self._overflow:
            self._overflow.append(client)

    def _set_writing(self, client: _Client, on: bool) -> None:
        if client.writing == on or client.dead:
            return
        client.writing = on
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        self._sel.modify(client.sock, events, client)  # type: ignore[union-attr]

    def _push(self, client: _Client, key: tuple, value: int, refs: List[Optional[_Fd]]) -> None:
        """Queue ``value`` once per entry of ``refs`` (already acquired for this client)."""
        if client.dead:
            for ref in refs:
                if ref is not None:
                    ref.release()
            return
        client.queue[key] = _Item(value, refs)
        client.pending += len(refs)
        self._dirty.add(client)
        if client.pending > self._stats["max_queue_seen"]:
            self._stats["max_queue_seen"] = client.pending

    def _send_one(self, client: _Client, value: int, ref: Optional[_Fd] = None) -> None:
        """Queue one set-up message (never cancelled)."""
        self._push(client, ("f", next(_seq)), value, [ref.acquire() if ref is not None else None])

    def _announce_join(self, client: _Client, peer: _Client) -> None:
        """Queue ``peer``'s vectors for ``client`` (one message per vector)."""
        self._push(client, ("j", peer), peer.id, [ref.acquire() for ref in peer.vectors])

    def _announce_leave(self, client: _Client, gone: _Client) -> None:
        """Tell ``client`` that ``gone`` left.

        The fds of ``gone`` must not outlive it in the server. When its join still waits in
        ``client``'s queue: a client that keeps up (fewer than ``_coalesce_after`` messages
        waiting) still gets the whole story, the join carrying a stand-in eventfd that nobody
        listens to, then the departure; a client that is behind is never told of ``gone`` at
        all (the join is cancelled), so what waits for it is bounded by the live peers."""
        if client.dead:
            return
        key = ("j", gone)
        item = client.queue.get(key)
        if item is not None:
            started = (client.pos or client.done) and next(iter(client.queue)) == key
            if started or client.pending < self._coalesce_after:
                orphan = self._orphan
                assert orphan is not None
                refs = item.refs
                for i, ref in enumerate(refs):
                    if ref is not None:      # None: sent already, or its fd went with byte 1
                        refs[i] = orphan.acquire()
                        ref.release()
            else:
                del client.queue[key]
                for ref in item.refs:
                    if ref is not None:
                        ref.release()
                client.pending -= len(item.refs)
                self._stats["coalesced"] += 1
                return
        self._push(client, ("l", gone), gone.id, [None])

    def backlog(self, peer_id: int) -> int:
        """Messages waiting in the server for ``peer_id`` (not yet handed to its socket);
        0 for a peer that is not connected."""
        client = self._clients.get(peer_id)
        return client.pending if client is not None else 0

    # ---------------------------------------------------------------- connections
    def _pause_accept(self) -> None:
        if self._accept_paused_until or self._listener is None:
            return
        self._sel.unregister(self._listener)  # type: ignore[union-attr]
        self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE

    def _resume_accept(self) -> None:
        self._accept_paused_until = 0.0
        if self._listener is not None:
            self._sel.register(self._listener, selectors.EVENT_READ, "listen")  # type: ignore

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept a connection: %s; pausing briefly", exc.strerror)
                    self._pause_accept()
                    return
                log.debug("accept failed: %s", exc)     # ECONNABORTED and the like
                continue
            self._stats["accepted"] += 1
            try:
                self._new_client(conn)
            except Exception as exc:  # never let one connection stop the server
                self._stats["setup_failures"] += 1
                log.warning("could not set up a new connection: %s", exc)
                conn.close()

    def _allocate_id(self) -> Optional[int]:
        for _ in range(MAX_PEER_ID + 1):
            candidate = self._next_id
            self._next_id = (self._next_id + 1) & MAX_PEER_ID
            if candidate not in self._clients:
                return candidate
        return None

    def _new_client(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        peer_id = self._allocate_id()
        if peer_id is None:
            self._stats["setup_failures"] += 1
            log.warning("all %d peer ids are in use; refusing a connection", MAX_PEER_ID + 1)
            conn.close()
            return
        vectors: List[_Fd] = []
        try:
            for _ in range(self._vectors):
                rc = self._lib.ivshm_server_eventfd(self._efd)
                if rc < 0:
                    raise OSError(-rc, f"cannot create an eventfd: {os.strerror(-rc)}")
                vectors.append(_Fd(self._efd[0]))
        except BaseException:
            for ref in vectors:
                ref.release()
            raise
        others = list(self._clients.values())
        burst = 3 + self._vectors * (len(others) + 1)
        client = _Client(peer_id, conn, vectors, self._max_queue + burst)
        try:
            self._sel.register(conn, selectors.EVENT_READ, client)  # type: ignore[union-attr]
        except BaseException:
            for ref in vectors:
                ref.release()
            raise
        self._clients[peer_id] = client
        # IVSHMEM.md section 2, steps 1-6, in this order
        self._send_one(client, PROTOCOL_VERSION)
        self._send_one(client, peer_id)
        self._send_one(client, -1, self._shm)
        for other in others:
            self._announce_join(other, client)
        for other in others:
            self._announce_join(client, other)
        self._announce_join(client, client)
        self._peers_changed()
        log.debug("peer %d connected (%d peers)", peer_id, len(self._clients))

    def _disconnect(self, client: _Client, reason: str, announce: bool = True) -> None:
        if client.dead:
            return
        client.dead = True
        self._stats["disconnected"] += 1
        self._clients.pop(client.id, None)
        self._dirty.discard(client)
        self._retry.discard(client)
        try:
            self._sel.unregister(client.sock)  # type: ignore[union-attr]
        except (KeyError, ValueError):
            pass
        client.sock.close()
        client.release_queue()
        if announce and not self._shutting_down:
            for other in self._clients.values():
                self._announce_leave(other, client)
        for ref in client.vectors:
            ref.release()
        client.vectors = []
        self._peers_changed()
        log.debug("peer %d disconnected: %s (%d peers)", client.id, reason, len(self._clients))

    def _peers_changed(self) -> None:
        with self._changed:
            self._peer_ids = tuple(self._clients)
            self._changed.notify_all()

    # ---------------------------------------------------------------- shutdown
    def _shutdown(self) -> None:
        """Stop accepting, tell every peer of every other's departure, deliver that within
        shutdown_timeout, close everything."""
        sel = self._sel
        if self._listener is not None and sel is not None:
            if not self._accept_paused_until:
                sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
        self._unlink_socket()
        self._shutting_down = True
        clients = list(self._clients.values())
        for client in clients:
            client.limit = 1 << 62   # no drops now: everyone gets the final news if it reads
        for client in clients:
            for other in clients:
                if other is not client:
                    self._announce_leave(client, other)
        deadline = time.monotonic() + self._shutdown_timeout
        try:
            self._flush_dirty()
            while sel is not None and any(c.pending and not c.dead for c in clients):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for key, mask in sel.select(min(left, _RETRY_INTERVAL) if self._retry else left):
                    client = key.data
                    if not isinstance(client, _Client) or client.dead:
                        if key.data == "wake":
                            _drain(self._wake_r)
                        continue
                    if mask & selectors.EVENT_READ:
                        self._disconnect(client, "closed during shutdown", announce=False)
                    else:
                        self._dirty.add(client)
                for client in list(self._retry):
                    client.retry = False
                    self._dirty.add(client)
                self._retry.clear()
                self._flush_dirty()
        finally:
            self._release_all()

    def _release_all(self) -> None:
        for client in list(self._clients.values()):
            self._disconnect(client, "server shutting down", announce=False)
        self._clients.clear()
        self._dirty.clear()
        self._overflow.clear()
        self._retry.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._unlink_socket()
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        # -1 first: a signal handler (_request_stop) that runs between the two closes must not
        # write to a closed fd, whose number another thread may already have reused
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        if self._shm is not None:
            self._shm.release()
            self._shm = None
        if self._orphan is not None:
            self._orphan.release()
            self._orphan = None
        self._memory.unlink()
        self._memory.close()
        self._listening = False
        self._peers_changed()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
_live_servers: "weakref.WeakSet[Server]" = weakref.WeakSet()


@atexit.register
def _close_live_servers() -> None:
    """Background servers still running at interpreter exit shut down cleanly (announcements
    delivered, socket unlinked) instead of dying with their daemon thread."""
    for server in list(_live_servers):
        try:
            server.close()
        except Exception:  # pragma: no cover
            pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file nobody accepts on; refuse anything else at that path."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(
            f"{path} is a directory; -S takes the path of the socket file to create, such as "
            f"{os.path.join(path, 'ivshmem_socket')}"
        )
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a socket"
        raise ConfigError(
            f"{path} exists and is {kind}; remove it or choose another socket path (-S)"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        probe.connect(path)
        _read_greeting(probe)
    except ConnectionRefusedError:
        try:
            now = os.lstat(path)
            # only the file that was probed: another server starting at the same moment may
            # have replaced it with its own live socket since
            # (the inode number alone is not enough: a freed one is soon handed out again)
            if ((now.st_dev, now.st_ino, now.st_ctime_ns) ==
                    (st.st_dev, st.st_ino, st.st_ctime_ns)):
                log.info("replacing stale socket file %s (nobody accepts on it)", path)
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            # e.g. another user's stale socket in a sticky directory such as /tmp
            cls = AccessDeniedError if isinstance(exc, PermissionError) else SystemCallError
            raise cls(
                exc.errno, f"{path} is a stale socket file (nobody accepts on it) that cannot "
                f"be removed: {exc.strerror}; remove it as its owner (uid {st.st_uid}) or "
                "choose another socket path (-S)"
            ) from exc
        return
    except FileNotFoundError:
        return
    except (BlockingIOError, InterruptedError):
        pass   # a listener with a full backlog: alive
    except PermissionError as exc:
        raise AccessDeniedError(
            exc.errno, f"cannot check whether {path} is in use: permission denied (run as a "
            "user allowed to connect to it, or choose another socket path (-S))"
        ) from exc
    finally:
        probe.close()
    raise ConfigError(
        f"{path} is in use: a server accepts connections on it; stop that server or choose "
        "another socket path (-S)"
    )


#: The signals that stop a server cleanly when it handles signals (the command line does).
#: QEMU's server stops cleanly on the first two only; SIGHUP (a closed terminal) killed it,
#: leaving the socket file and the -M memory behind.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def install_stop_handlers(handler: Callable[[int, object], None]) -> Dict[int, object]:
    """Install ``handler`` for :data:`STOP_SIGNALS`; the previous handlers, for
    :func:`restore_handlers`. A SIGHUP ignored by whoever started the process (``nohup``) is
    left ignored."""
    if threading.current_thread() is not threading.main_thread():
        raise ConfigError(
            "signal handlers can only be installed from the main thread: call "
            "serve_forever(handle_signals=True) there, or handle_signals=False (and stop() the "
            "server yourself) in another thread"
        )
    old: Dict[int, object] = {}
    for sig in STOP_SIGNALS:
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        old[sig] = signal.signal(sig, handler)
    return old


def restore_handlers(old: Dict[int, object]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]


def _start_error(exc: OSError, socket_path: str) -> IvshmemError:
    """An OSError from starting a server, as a pyivshmem error with the same errno."""
    what = f"cannot start the ivshmem server on {socket_path}: {exc.strerror or exc}"
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        what += (" (out of file descriptors: raise the open-file limit, e.g. ulimit -n, or "
                 "close some)")
    if isinstance(exc, PermissionError):
        return AccessDeniedError(exc.errno, what)
    return SystemCallError(exc.errno, what)


#: How long the in-use check waits for a live server's greeting before it hangs up.
_PROBE_WAIT = 2.0


def _read_greeting(probe: socket.socket) -> None:
    """Read what a live ivshmem server sends a new client first (version, id, memory: 24
    bytes), closing any fd received, or give up after _PROBE_WAIT seconds or at EOF. QEMU's
    ivshmem-server exits when one of those first three sends fails, which it would if the
    check hung up at once; with the greeting read, it only sees a peer come and go."""
    import array
    import select

    want = 3 * 8
    got = 0
    deadline = time.monotonic() + _PROBE_WAIT
    poller = select.poll()
    poller.register(probe.fileno(), select.POLLIN)
    while got < want:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(int(left * 1000) + 1):
            return
        try:
            data, anc, _flags, _addr = probe.recvmsg(
                want - got, socket.CMSG_SPACE(8 * 4), socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            return
        for level, kind, payload in anc:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    os.close(fd)
        if not data:
            return
        got += len(data)


def _raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.debug("raised the open-file limit from %d to %d", soft, target)
    except (ValueError, OSError) as exc:
        log.debug("could not raise the open-file limit: %s", exc)


