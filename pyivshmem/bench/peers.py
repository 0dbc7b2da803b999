"""The transports a user would pick instead of pyivshmem, measured in the same run.

Every transport (pyivshmem's own included, see scenarios.py) is a :class:`Transport`:

* in the parent, :meth:`Transport.unavailable` says why it cannot run here (a missing optional
  package and how to install it), :meth:`Transport.size_problem` why one message size cannot be
  carried, and :meth:`Transport.setup` creates what both processes share (queues, pipes, socket
  pairs, names); the returned state is handed to the spawned workers as a process argument, so it
  may hold multiprocessing objects and file descriptors (see :class:`InheritedFd`);
* in a worker, :meth:`Transport.endpoint` opens (and caches) an :class:`Endpoint` for one role and
  one message size: role ``"a"`` and ``"b"`` are the two ends of a bidirectional pair (``a`` sends
  to ``b`` in one-way runs), ``"p<i>"`` producers and ``"c<i>"`` consumers share one queue in MPMC
  runs.

An :class:`Endpoint` exposes the transport's own calls as plain attributes so the measuring loops
add nothing of their own: ``send(bytes)``, ``recv() -> bytes`` (blocking), ``try_recv() -> bytes |
None`` (for busy-polling), and optionally ``try_send``, ``send_many`` and ``recv_many``.

Peers and their settings (docs/bench.md says more):

=================  ======================================================================
mp-queue           multiprocessing.Queue (spawn context), put/get
mp-pipe            multiprocessing.Pipe (duplex), send_bytes/recv_bytes
unix-seqpacket     socket.socketpair(AF_UNIX, SOCK_SEQPACKET), 4 MiB buffers
os-pipe            os.pipe with a 4-byte length prefix, buffered reads
posix-mq           posix_ipc.MessageQueue (POSIX message queue, 10 messages deep)
faster-fifo        faster_fifo.Queue (bytes passed as they are); put/get and put_many/get_many
zmq-pair           pyzmq PAIR sockets over ipc://
iceoryx2           iceoryx2 publish-subscribe (lossless: no overflow, retry until delivered),
                   blocking through its event service
c-eventfd          not a queue: the floor of every blocking figure, a bare eventfd ping-pong in
                   C (csrc/ivshm_bench_ref.c), blocking round trips and wake-ups only
py-eventfd         not a queue: the same ping-pong from Python (8-byte os.write/os.read),
                   timed as pyivshmem is: what a Python sender and receiver cost by themselves;
                   wake-ups only
=================  ======================================================================
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import queue as _queue
import select
import socket
import struct
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from .. import doorbell as _doorbell

__all__ = [
    "Endpoint",
    "Transport",
    "InheritedFd",
    "PEERS",
    "peer_by_key",
    "payload",
]


def payload(size: int) -> bytes:
    """A deterministic message of ``size`` bytes (not all zeros, so nothing can elide copies)."""
    pattern = bytes(range(1, 256))
    return (pattern * (size // len(pattern) + 1))[:size]


class InheritedFd:
    """A raw file descriptor handed to a spawned worker (duplicated into it at spawn time).

    In the worker, the unpickled object is the plain ``int`` descriptor.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> Any:
        from multiprocessing import reduction

        return _rebuild_fd, (reduction.DupFd(self.fd),)


def _rebuild_fd(dupfd: Any) -> int:
    return int(dupfd.detach())


class Endpoint:
    """One side of a transport as plain callables; ``close()`` releases what the endpoint opened."""

    send: Callable[[Any], Any]
    recv: Callable[[], Any]
    try_recv: Callable[[], Any]
    try_send: Optional[Callable[[Any], bool]] = None
    send_many: Optional[Callable[[List[bytes]], Any]] = None
    recv_many: Optional[Callable[[int], List[Any]]] = None
    # True when send_many returns how many it sent (pyivshmem); False when it sends them all.
    send_many_partial: bool = False
    # Counters of the endpoint (pyivshmem Channel: sent, doorbells, sleeps, ...), or None.
    stats: Optional[Callable[[], Dict[str, int]]] = None

    def __init__(self, **calls: Any) -> None:
        self._closers: List[Callable[[], Any]] = []
        for name, fn in calls.items():
            setattr(self, name, fn)

    def on_close(self, fn: Callable[[], Any]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        closers, self._closers = self._closers, []
        for fn in reversed(closers):
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort while tearing down
                pass


class Transport:
    """Base class: a named way of moving messages between processes."""

    key: str = ""                  # stable identifier (command line, JSON)
    label: str = ""                # what the tables print
    module: Optional[str] = None   # import name of the optional package, if any
    package: Optional[str] = None  # pip name of that package
    is_pyivshmem: bool = False
    mpmc: bool = False             # several producers and consumers may share one queue
    batch: bool = False            # has a native batch send/receive

    # -- parent side --------------------------------------------------------------------------
    def unavailable(self) -> Optional[str]:
        """Why this transport cannot run here, or None."""
        if self.module and importlib.util.find_spec(self.module) is None:
            return f"{self.package or self.module} is not installed (pip install {self.package})"
        return None

    def size_problem(self, size: int) -> Optional[str]:
        """Why a message of ``size`` bytes cannot be carried, or None."""
        return None

    def setup(self, ctx: Any, run_id: str, sizes: Sequence[int], workdir: str) -> Dict[str, Any]:
        """Create what the workers share; returns a picklable state (see the module doc)."""
        return {"run_id": run_id, "workdir": workdir}

    def teardown(self, state: Dict[str, Any]) -> None:
        """Release what :meth:`setup` created (parent side, after the workers are gone)."""

    # -- worker side --------------------------------------------------------------------------
    def endpoint(self, state: Dict[str, Any], role: str, size: int, mode: str) -> Endpoint:
        """The (cached) endpoint of ``role`` for messages up to ``size`` bytes.

        ``mode`` is the waiting mode of the variant being measured ("busy-poll", "blocking",
        "adaptive"); most transports ignore it.
        """
        cache = state.setdefault("_endpoints", {})
        key = (role, size, mode)
        ep = cache.get(key)
        if ep is None:
            ep = self.open(state, role, size, mode)
            cache[key] = ep
        return ep

    def open(self, state: Dict[str, Any], role: str, size: int, mode: str) -> Endpoint:
        raise NotImplementedError

    def close_all(self, state: Dict[str, Any]) -> None:
        for ep in state.pop("_endpoints", {}).values():
            ep.close()
        self.worker_exit(state)

    def worker_exit(self, state: Dict[str, Any]) -> None:
        """Worker-side cleanup after every endpoint is closed."""

    # -- what to measure (pyivshmem's transport overrides these) ---------------------------------
    # The calls each figure uses, for the tables: blocking, busy-poll, batch.
    calls: Dict[str, str] = {}

    def roundtrip_variants(self) -> List[Dict[str, Any]]:
        return [
            {"mode": "busy-poll", "variant": self.calls.get("busy", "non-blocking receive"),
             "busy": True, "group_mode": "busy-poll"},
            {"mode": "blocking", "variant": self.calls.get("blocking", "blocking send/receive"),
             "busy": False, "group_mode": "blocking"},
        ]

    def throughput_variants(self, size: int, batch: int) -> List[Dict[str, Any]]:
        out = [{"method": "send/recv", "variant": self.calls.get("blocking", "send/receive"),
                "busy": False, "batch": 1}]
        if self.batch:
            out.append({"method": "batch",
                        "variant": f"{self.calls.get('batch', 'batch calls')} x{batch}",
                        "busy": False, "batch": batch})
        return out

    def mpmc_variant(self) -> Dict[str, Any]:
        return {"variant": self.calls.get("blocking", "send/receive"), "busy": False}

    def wakeup_variants(self) -> List[Dict[str, Any]]:
        return [{"mode": "blocking", "variant": self.calls.get("blocking", "blocking receive")}]

    def __repr__(self) -> str:
        return f"<transport {self.key}>"


def _direction(role: str) -> tuple:
    """(outgoing, incoming) channel names of a role: a sends on "ab", b on "ba"; MPMC uses "mpmc"."""
    if role == "a":
        return "ab", "ba"
    if role == "b":
        return "ba", "ab"
    if role[:1] in ("p", "c"):
        return "mpmc", "mpmc"
    raise ValueError(f"unknown role {role!r}")


def _nowait(fn: Callable[[], Any], empty: Any) -> Callable[[], Any]:
    def try_recv() -> Any:
        try:
            return fn()
        except empty:
            return None

    return try_recv


# ------------------------------------------------------------------------------------------------
class MpQueue(Transport):
    key = "mp-queue"
    calls = {"blocking": "put/get", "busy": "get_nowait"}
    label = "multiprocessing.Queue"
    mpmc = True

    def setup(self, ctx, run_id, sizes, workdir):
        state = super().setup(ctx, run_id, sizes, workdir)
        state["queues"] = {"ab": ctx.Queue(), "ba": ctx.Queue(), "mpmc": ctx.Queue()}
        return state

    def open(self, state, role, size, mode):
        out, inc = _direction(role)
        qo, qi = state["queues"][out], state["queues"][inc]
        return Endpoint(send=qo.put, recv=qi.get, try_recv=_nowait(qi.get_nowait, _queue.Empty))

    def worker_exit(self, state):
        # Everything sent was received before a task ended; never wait for a feeder at exit.
        for q in state.get("queues", {}).values():
            q.cancel_join_thread()

    def teardown(self, state):
        for q in state.get("queues", {}).values():
            q.close()
            q.join_thread()


class MpPipe(Transport):
    key = "mp-pipe"
    calls = {"blocking": "send_bytes/recv_bytes", "busy": "poll(0) + recv_bytes"}
    label = "multiprocessing.Pipe"

    def setup(self, ctx, run_id, sizes, workdir):
        state = super().setup(ctx, run_id, sizes, workdir)
        state["conns"] = ctx.Pipe(duplex=True)
        return state

    def open(self, state, role, size, mode):
        conn = state["conns"][0 if role == "a" else 1]
        poll, recv = conn.poll, conn.recv_bytes

        def try_recv() -> Optional[bytes]:
            return recv() if poll(0) else None

        return Endpoint(send=conn.send_bytes, recv=recv, try_recv=try_recv)

    def teardown(self, state):
        for c in state.get("conns", ()):
            c.close()


class UnixSeqpacket(Transport):
    key = "unix-seqpacket"
    calls = {"blocking": "send/recv", "busy": "recv(MSG_DONTWAIT)"}
    label = "AF_UNIX SOCK_SEQPACKET socketpair"
    mpmc = True  # each datagram goes to exactly one reader, whole
    BUFFER = 4 << 20

    def _pair(self) -> tuple:
        pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in pair:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    s.setsockopt(socket.SOL_SOCKET, opt, self.BUFFER)
                except OSError:
                    pass
        return pair

    def size_problem(self, size):
        a, b = self._pair()
        try:
            sndbuf = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        finally:
            a.close()
            b.close()
        if size + 4096 > sndbuf:
            return (
                f"a {size}-byte datagram does not fit the {sndbuf}-byte socket buffer "
                "(raise net.core.wmem_max)"
            )
        return None

    def setup(self, ctx, run_id, sizes, workdir):
        state = super().setup(ctx, run_id, sizes, workdir)
        state["pair"] = self._pair()
        state["mpmc"] = self._pair()
        return state

    def open(self, state, role, size, mode):
        if role == "a":
            s_out = s_in = state["pair"][0]
        elif role == "b":
            s_out = s_in = state["pair"][1]
        else:
            s_out, s_in = state["mpmc"][0], state["mpmc"][1]
        recv = functools.partial(s_in.recv, max(size, 16))
        peek = functools.partial(s_in.recv, max(size, 16), socket.MSG_DONTWAIT)
        return Endpoint(send=s_out.send, recv=recv, try_recv=_nowait(peek, BlockingIOError))

    def teardown(self, state):
        for s in tuple(state.get("pair", ())) + tuple(state.get("mpmc", ())):
            s.close()


class _PipeFramer:
    """Length-prefixed messages over a pipe, read through a private buffer (few syscalls); a
    large message is read straight into its own buffer."""

    HDR = struct.Struct("<I")
    CHUNK = 65536

    def __init__(self, rfd: int, wfd: int, max_size: int) -> None:
        self.rfd, self.wfd, self.max_size = rfd, wfd, max_size
        self.buf = b""
        self.pos = 0
        self.poller = select.poll()
        if rfd >= 0:
            self.poller.register(rfd, select.POLLIN)

    def send(self, data: bytes) -> None:
        n = len(data)
        hdr = self.HDR.pack(n)
        done = os.writev(self.wfd, (hdr, data))
        if done < n + 4:  # a large message went out in pieces
            if done < 4:
                os.write(self.wfd, hdr[done:])  # 4 bytes <= PIPE_BUF: all at once
                done = 4
            rest = memoryview(data)[done - 4:]
            while rest:
                rest = rest[os.write(self.wfd, rest):]

    def _frame(self, block: bool) -> Optional[bytes]:
        buf, pos = self.buf, self.pos
        avail = len(buf) - pos
        if avail < 4:
            if not block:
                return None
            while avail < 4:
                more = os.read(self.rfd, self.CHUNK)
                if not more:
                    raise EOFError("os.pipe peer closed its end")
                buf = buf[pos:] + more
                pos, avail = 0, len(buf)
            self.buf, self.pos = buf, pos
        (n,) = self.HDR.unpack_from(buf, pos)
        if n > self.max_size:
            raise ValueError(f"os.pipe peer: frame of {n} bytes exceeds {self.max_size}")
        end = pos + 4 + n
        if end <= len(buf):
            self.pos = end
            return buf[pos + 4:end]
        if not block:
            return None
        # Finish this message: straight into a buffer of its own.
        out = bytearray(n)
        have = len(buf) - pos - 4
        out[:have] = buf[pos + 4:]
        self.buf, self.pos = b"", 0
        view = memoryview(out)
        while have < n:
            got = os.readv(self.rfd, [view[have:]])
            if not got:
                raise EOFError("os.pipe peer closed its end")
            have += got
        return out  # type: ignore[return-value]

    def recv(self) -> bytes:
        return self._frame(True)  # type: ignore[return-value]

    def try_recv(self) -> Optional[bytes]:
        msg = self._frame(False)
        if msg is None and (len(self.buf) > self.pos or self.poller.poll(0)):
            msg = self._frame(True)  # part of it is here: the rest is on its way
        return msg


class OsPipe(Transport):
    key = "os-pipe"
    calls = {"blocking": "writev/read", "busy": "poll(0) + read"}
    label = "os.pipe + length prefix"

    def setup(self, ctx, run_id, sizes, workdir):
        state = super().setup(ctx, run_id, sizes, workdir)
        fds: Dict[str, Any] = {}
        raw = []
        for name in ("ab", "ba"):
            r, w = os.pipe()
            raw += [r, w]
            fds[name] = (InheritedFd(r), InheritedFd(w))
        state["fds"], state["raw"] = fds, raw
        return state

    def open(self, state, role, size, mode):
        out, inc = _direction(role)
        rfd, wfd = state["fds"][inc][0], state["fds"][out][1]
        f = _PipeFramer(rfd, wfd, max(size, 16))
        return Endpoint(send=f.send, recv=f.recv, try_recv=f.try_recv)

    def teardown(self, state):
        for fd in state.get("raw", ()):
            try:
                os.close(fd)
            except OSError:
                pass


class PosixMq(Transport):
    key = "posix-mq"
    calls = {"blocking": "send/receive", "busy": "non-blocking receive"}
    label = "POSIX message queue (posix_ipc)"
    module = "posix_ipc"
    package = "posix-ipc"
    mpmc = True
    DEPTH = 10  # the kernel's default fs.mqueue.msg_max for unprivileged users

    def size_problem(self, size):
        import posix_ipc

        name = f"/pyivshmem-bench-probe-{os.getpid()}"
        try:
            mq = posix_ipc.MessageQueue(
                name, posix_ipc.O_CREX, max_messages=self.DEPTH, max_message_size=max(size, 16)
            )
        except (ValueError, OSError, posix_ipc.Error) as exc:
            return f"cannot create a queue of {size}-byte messages ({exc}; see fs.mqueue.msgsize_max)"
        mq.close()
        mq.unlink()
        return None

    def setup(self, ctx, run_id, sizes, workdir):
        import posix_ipc

        state = super().setup(ctx, run_id, sizes, workdir)
        names = {}
        for size in sizes:
            for chan in ("ab", "ba", "mpmc"):
                name = f"/pyivshmem-bench-{run_id}-{chan}-{size}"
                names[(chan, size)] = name
                mq = posix_ipc.MessageQueue(
                    name, posix_ipc.O_CREX, max_messages=self.DEPTH, max_message_size=max(size, 16)
                )
                mq.close()
        state["names"] = names
        return state

    def open(self, state, role, size, mode):
        import posix_ipc

        out, inc = _direction(role)
        mq_out = posix_ipc.MessageQueue(state["names"][(out, size)])
        mq_in = mq_out if inc == out else posix_ipc.MessageQueue(state["names"][(inc, size)])
        receive = mq_in.receive
        # receive(timeout=0) goes through a timed wait (tens of microseconds when empty); a second
        # descriptor opened O_NONBLOCK fails at once instead.
        mq_poll = posix_ipc.MessageQueue(mq_in.name)
        mq_poll.block = False
        poll = mq_poll.receive

        def recv() -> bytes:
            return receive()[0]

        def try_recv() -> Optional[bytes]:
            try:
                return poll()[0]
            except posix_ipc.BusyError:
                return None

        ep = Endpoint(send=mq_out.send, recv=recv, try_recv=try_recv)
        for mq in {id(q): q for q in (mq_out, mq_in, mq_poll)}.values():
            ep.on_close(mq.close)
        return ep

    def teardown(self, state):
        import posix_ipc

        for name in state.get("names", {}).values():
            try:
                posix_ipc.unlink_message_queue(name)
            except posix_ipc.ExistentialError:
                pass


def _identity(data: Any) -> Any:
    return data


class FasterFifo(Transport):
    key = "faster-fifo"
    calls = {"blocking": "put/get", "busy": "get_nowait", "batch": "put_many/get_many"}
    label = "faster_fifo.Queue"
    module = "faster_fifo"
    package = "faster-fifo"
    mpmc = True
    batch = True

    @staticmethod
    def _buffer(size: int) -> int:
        # The library's default unless a few dozen messages would not fit.
        return max(1_000_000, 48 * (size + 64))

    def setup(self, ctx, run_id, sizes, workdir):
        import faster_fifo

        state = super().setup(ctx, run_id, sizes, workdir)
        state["queues"] = {
            (chan, size): faster_fifo.Queue(self._buffer(size), dumps=_identity, loads=bytes)
            for size in sizes
            for chan in ("ab", "ba", "mpmc")
        }
        return state

    def open(self, state, role, size, mode):
        out, inc = _direction(role)
        qo, qi = state["queues"][(out, size)], state["queues"][(inc, size)]
        forever = 1e9
        put_many = qo.put_many
        fits = max(1, (self._buffer(size) // 2) // (size + 64))  # a batch must fit the buffer

        def send_many(msgs: List[bytes]) -> None:
            for i in range(0, len(msgs), fits):
                put_many(msgs[i:i + fits] if len(msgs) > fits else msgs, True, forever)

        return Endpoint(
            send=functools.partial(qo.put, block=True, timeout=forever),
            recv=functools.partial(qi.get, True, forever),
            try_recv=_nowait(qi.get_nowait, _queue.Empty),
            send_many=send_many,
            recv_many=lambda n: qi.get_many(True, forever, n),
        )

    def teardown(self, state):
        for q in state.get("queues", {}).values():
            q.close()


class ZmqPair(Transport):
    key = "zmq-pair"
    calls = {"blocking": "send/recv", "busy": "recv(NOBLOCK)"}
    label = "pyzmq PAIR ipc://"
    module = "zmq"
    package = "pyzmq"

    def open(self, state, role, size, mode):
        import zmq

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.PAIR)
        hwm = max(8, min(1000, (64 << 20) // max(size, 1)))  # bound the queued bytes
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        addr = "ipc://" + os.path.join(state["workdir"], f"zmq-{size}-{mode}.sock")
        (sock.bind if role == "a" else sock.connect)(addr)
        ep = Endpoint(
            send=sock.send,
            recv=sock.recv,
            try_recv=_nowait(functools.partial(sock.recv, zmq.NOBLOCK), zmq.Again),
        )
        ep.on_close(sock.close)
        return ep

    def worker_exit(self, state):
        import zmq

        zmq.Context.instance().term()


class Iceoryx2(Transport):
    key = "iceoryx2"
    calls = {"blocking": "send+notify/receive+wait", "busy": "receive"}
    label = "iceoryx2 publish-subscribe"
    module = "iceoryx2"
    package = "iceoryx2"
    DEPTH = 64

    def setup(self, ctx, run_id, sizes, workdir):
        state = super().setup(ctx, run_id, sizes, workdir)
        state["prefix"] = f"pyivshmem-bench/{run_id}"
        return state

    def _node(self, state: Dict[str, Any]) -> Any:
        import iceoryx2 as iox2

        node = state.get("_node")
        if node is None:
            iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
            node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
            state["_node"] = node
        return node

    def _ports(self, state: Dict[str, Any], chan: str, size: int, publish: bool) -> tuple:
        """(publisher, notifier) or (subscriber, listener) of one channel, made once per process
        (the services allow one publisher and one subscriber)."""
        cache = state.setdefault("_ports", {})
        key = (chan, size, publish)
        if key not in cache:
            deadline = time.monotonic() + 10
            while True:
                try:
                    cache[key] = self._make_ports(state, chan, size, publish)
                    break
                except Exception:  # noqa: BLE001 - the other process may be creating it right now
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
        return cache[key]

    def _make_ports(self, state: Dict[str, Any], chan: str, size: int, publish: bool) -> tuple:
        import iceoryx2 as iox2

        node = self._node(state)
        name = f"{state['prefix']}/{chan}/{size}"
        svc = (
            node.service_builder(iox2.ServiceName.new(name))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .enable_safe_overflow(False)  # lossless: a full subscriber makes the publisher retry
            .subscriber_max_buffer_size(self.DEPTH)
            .history_size(0)
            .max_publishers(1)
            .max_subscribers(1)
            .open_or_create()
        )
        event = node.service_builder(iox2.ServiceName.new(name + "/event")).event().open_or_create()
        if publish:
            port = (
                svc.publisher_builder()
                .initial_max_slice_len(max(size, 16))
                .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
                .create()
            )
            return port, event.notifier_builder().create()
        return svc.subscriber_builder().buffer_size(self.DEPTH).create(), event.listener_builder().create()

    def open(self, state, role, size, mode):
        blocking = mode != "busy-poll"
        out, inc = _direction(role)
        pub, notifier = self._ports(state, out, size, True)
        sub, listener = self._ports(state, inc, size, False)
        loan, memmove, string_at = pub.loan_slice_uninit, ctypes.memmove, ctypes.string_at
        notify, receive, wait = notifier.notify, sub.receive, listener.blocking_wait

        def send(data: bytes) -> None:
            sample = loan(len(data))
            memmove(sample.payload_ptr, data, len(data))
            sample.assume_init().send()
            if blocking:
                notify()

        def take(sample: Any) -> bytes:
            data = string_at(sample.payload_ptr, sample.header.number_of_elements)
            sample.delete()
            return data

        def try_recv() -> Optional[bytes]:
            sample = receive()
            return None if sample is None else take(sample)

        def recv() -> bytes:
            while True:
                sample = receive()
                if sample is not None:
                    return take(sample)
                wait()

        return Endpoint(send=send, recv=recv if blocking else _spin(try_recv), try_recv=try_recv)

    def worker_exit(self, state):
        for ports in state.pop("_ports", {}).values():
            for port in reversed(ports):
                port.delete()
        state.pop("_node", None)


def _spin(try_recv: Callable[[], Any]) -> Callable[[], Any]:
    def recv() -> Any:
        while True:
            msg = try_recv()
            if msg is not None:
                return msg

    return recv


class CEventfd(Transport):
    """A bare eventfd ping-pong in C: what a blocking wake-up costs with nothing around it.

    It carries no messages, so it takes part only in the blocking round trip and the wake-up
    (the loops run in C, csrc/ivshm_bench_ref.c, with the GIL released)."""

    key = "c-eventfd"
    label = "C: bare eventfd ping-pong"
    calls = {"blocking": "write/read on blocking eventfds"}

    def setup(self, ctx, run_id, sizes, workdir):
        state = super().setup(ctx, run_id, sizes, workdir)
        raw = {d: _doorbell.eventfd(nonblock=False) for d in ("ab", "ba")}  # blocking reads
        state["raw"] = list(raw.values())
        state["fds"] = {d: InheritedFd(fd) for d, fd in raw.items()}
        return state

    def open(self, state, role, size, mode):
        out, inc = _direction(role)
        fds = state["fds"]
        return Endpoint(tx=fds[out], rx=fds[inc], send=None, recv=None, try_recv=None)

    def roundtrip_variants(self):
        return [{"mode": "blocking", "variant": self.calls["blocking"], "busy": False,
                 "group_mode": "blocking", "client": "ref-rtt-lead", "echo": "ref-rtt-echo"}]

    def throughput_variants(self, size, batch):
        return []

    def wakeup_variants(self):
        return [{"mode": "blocking", "variant": self.calls["blocking"],
                 "send": "ref-wake-send", "recv": "ref-wake-recv"}]

    def teardown(self, state):
        for fd in state.get("raw", ()):
            os.close(fd)


class PyEventfd(CEventfd):
    """The bare eventfd ping-pong of ``c-eventfd``, from Python: the sender sleeps, reads the
    clock and writes the eventfd (``os.write`` of 8 bytes), the receiver reads the clock when
    its blocking ``os.read`` returns, exactly as pyivshmem's wake-up is timed.  What a Python process pays to sleep and
    wake by itself, so that a wake-up figure shows which part is the transport's."""

    key = "py-eventfd"
    label = "Python: bare eventfd ping-pong"
    calls = {"blocking": "os.write/os.read on blocking eventfds"}

    def roundtrip_variants(self):
        return []

    def wakeup_variants(self):
        return [{"mode": "blocking", "variant": self.calls["blocking"],
                 "send": "py-wake-send", "recv": "py-wake-recv"}]


PEERS: List[Transport] = [
    MpQueue(),
    MpPipe(),
    UnixSeqpacket(),
    OsPipe(),
    PosixMq(),
    FasterFifo(),
    ZmqPair(),
    Iceoryx2(),
    CEventfd(),
    PyEventfd(),
]


def peer_by_key(key: str) -> Transport:
    for t in PEERS:
        if t.key == key:
            return t
    raise KeyError(f"unknown peer {key!r}; known: {', '.join(t.key for t in PEERS)}")


def workdir(run_id: str) -> str:
    """A private temporary directory for one run's socket files."""
    return tempfile.mkdtemp(prefix=f"pyivshmem-bench-{run_id}-")
