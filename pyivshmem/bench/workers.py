"""Worker processes and the measuring loops they run.

The parent starts one spawned process per role (``a``/``b`` for a pair, ``p<i>``/``c<i>`` for MPMC),
each pinned to one CPU with ``os.sched_setaffinity``, and drives them over a private control pipe:

    parent -> worker   ("task", {...})     worker opens its endpoint for the task, answers ("opened",)
    parent -> worker   ("go",)             once every worker has opened: run the loop, answer
                                           ("ok", result) or ("error", traceback)
    parent -> worker   ("exit",)           close endpoints and leave

Waiting for every worker to open before anyone sends means no message is sent before its receiver
exists (pub/sub transports drop those).  A worker that fails or a task that overruns its deadline
makes the parent kill the whole group (only processes it started, by their handles); the caller
records the failure and carries on with a fresh group.

The loops below use the endpoint's callables directly (see peers.Endpoint) and time with
``time.perf_counter_ns`` inside one process, ``time.monotonic_ns`` across processes (both are
CLOCK_MONOTONIC on Linux, a system-wide clock).  Counts are given by the parent; the loops do no
per-message work beyond the calls being measured.
"""
from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from array import array
from itertools import repeat
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .peers import Endpoint, Transport, payload
from .stats import Histogram

__all__ = [
    "WorkerGroup",
    "WorkerFailed",
    "PATTERNS",
    "usable_cpus",
    "STOP",
]

STOP = b"\x00"  # one byte: ends a loop (real messages are at least 8 bytes)
WAKE_ANSWER = b"answered"  # a wake-up receiver's answer to each message (wake_recv)


class WorkerFailed(RuntimeError):
    """A worker raised, died, or a task ran past its deadline; the message says which and why.

    ``detail`` holds the worker's traceback when there is one.
    """

    def __init__(self, message: str, detail: Optional[str] = None) -> None:
        super().__init__(message)
        self.detail = detail


def usable_cpus() -> List[int]:
    """The CPUs this process may run on, in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _pin(cpu: Optional[int]) -> Optional[int]:
    if cpu is None:
        return None
    try:
        os.sched_setaffinity(0, {cpu})
        return cpu
    except (AttributeError, OSError):
        return None


# ------------------------------------------------------------------------------------------------
# Measuring loops: fn(endpoint, task) -> result dict.
def _spin_recv(try_recv: Callable[[], Any]) -> Callable[[], Any]:
    def recv() -> Any:
        while True:
            m = try_recv()
            if m is not None:
                return m

    return recv


def _spin_send(try_send: Callable[[Any], bool]) -> Callable[[Any], None]:
    def send(m: Any) -> None:
        while not try_send(m):
            pass

    return send


def _calls(ep: Endpoint, busy: bool) -> Tuple[Callable[[Any], Any], Callable[[], Any]]:
    """(send, recv) for a loop: busy-polling uses the non-blocking calls in a spin."""
    if not busy:
        return ep.send, ep.recv
    send = _spin_send(ep.try_send) if ep.try_send is not None else ep.send
    return send, _spin_recv(ep.try_recv)


def rtt_client(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    """Round trips: time send + receive of the echo; at most ``samples`` or ``seconds``.

    Busy-polling spins on the non-blocking receive; the send is the plain send in both modes (a
    round trip never finds the queue full).
    """
    size, n_max = task["size"], task["samples"]
    msg = payload(size)
    clock = time.perf_counter_ns
    samples = array("q", bytes(8 * n_max))
    send, recv, try_recv = ep.send, ep.recv, ep.try_recv
    busy = task["busy"]
    for _ in range(task["warmup"]):
        send(msg)
        if busy:
            while try_recv() is None:
                pass
        else:
            recv()
    deadline = clock() + int(task["seconds"] * 1e9)
    i = 0
    if busy:
        while i < n_max:
            t0 = clock()
            send(msg)
            while try_recv() is None:
                pass
            t1 = clock()
            samples[i] = t1 - t0
            i += 1
            if not i & 127 and t1 > deadline:
                break
    else:
        while i < n_max:
            t0 = clock()
            send(msg)
            recv()
            t1 = clock()
            samples[i] = t1 - t0
            i += 1
            if not i & 127 and t1 > deadline:
                break
    send(STOP)
    if busy:
        last = try_recv()
        while last is None:
            last = try_recv()
    else:
        last = recv()
    if bytes(last) != STOP:
        raise RuntimeError(f"round trip: expected the stop echo, got {len(last)} bytes")
    hist = Histogram()
    hist.record_many(samples[:i])
    return {"histogram": hist.to_dict()}


def rtt_echo(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    """Send back every message until the stop message (echoed too)."""
    send, recv, try_recv = ep.send, ep.recv, ep.try_recv
    n = 0
    if task["busy"]:
        while True:
            m = try_recv()
            while m is None:
                m = try_recv()
            send(m)
            if len(m) == 1:
                break
            n += 1
    else:
        while True:
            m = recv()
            send(m)
            if len(m) == 1:
                break
            n += 1
    return {"echoed": n}


def tput_send(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    """One-way stream of ``count`` messages (in batches of ``batch`` when ``batch`` > 1)."""
    n, size, batch = task["count"], task["size"], task.get("batch", 1)
    msg = payload(size)
    clock = time.monotonic_ns
    if batch > 1:
        if ep.send_many is None:
            raise RuntimeError("this transport has no batch send")
        send_many = ep.send_many
        full = [msg] * batch
        t0 = clock()
        left = n
        if ep.send_many_partial:
            while left:
                left -= send_many(full if left >= batch else full[:left])
        else:
            while left >= batch:
                send_many(full)
                left -= batch
            if left:
                send_many(full[:left])
        t1 = clock()
    elif task["busy"] and ep.try_send is not None:
        try_send = ep.try_send
        t0 = clock()
        for _ in repeat(None, n):
            while not try_send(msg):
                pass
        t1 = clock()
    else:
        send = ep.send
        t0 = clock()
        for _ in repeat(None, n):
            send(msg)
        t1 = clock()
    return {"start_ns": t0, "end_ns": t1, "messages": n}


def tput_recv(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    """Receive ``count`` messages; the rate is timed from the first message to the last."""
    n, size, batch = task["count"], task["size"], task.get("batch", 1)
    clock = time.monotonic_ns
    if batch > 1:
        if ep.recv_many is None:
            raise RuntimeError("this transport has no batch receive")
        recv_many = ep.recv_many
        head: List[Any] = []
        while not head:
            head = recv_many(batch)
        t0 = clock()
        got, first, tail_len = len(head), len(head), len(head[-1])
        del head
        while got < n:
            more = recv_many(batch)
            if more:
                got += len(more)
                tail_len = len(more[-1])
            # drop the batch (its last message too) before the next call makes the next one, as
            # the single-call loop drops each message: holding one would make the receiver
            # alternate between two buffers, twice the memory to keep in cache at 1 MiB
            del more
        t1 = clock()
        if got != n:
            raise RuntimeError(f"batch receive got {got} messages, expected {n}")
        if tail_len != size:
            raise RuntimeError(f"received a {tail_len}-byte message, expected {size}")
        timed = n - first
        tail = None
    elif task["busy"]:
        try_recv = ep.try_recv
        while try_recv() is None:
            pass
        t0 = clock()
        tail = None
        for _ in repeat(None, n - 2):  # each message dropped at once, as in the loop below
            while try_recv() is None:
                pass
        if n > 1:
            tail = try_recv()
            while tail is None:
                tail = try_recv()
        t1 = clock()
        timed = n - 1
    else:
        recv = ep.recv
        recv()
        t0 = clock()
        tail = None
        for _ in repeat(None, n - 2):
            recv()
        tail = recv() if n > 1 else None
        t1 = clock()
        timed = n - 1
    if tail is not None and len(tail) != size:
        raise RuntimeError(f"received a {len(tail)}-byte message, expected {size}")
    return {"start_ns": t0, "end_ns": t1, "messages": timed}


def mpmc_produce(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    """A producer of an MPMC run: ``count`` messages, then one stop message per consumer."""
    n, size = task["count"], task["size"]
    send, _ = _calls(ep, task["busy"])
    msg = payload(size)
    clock = time.monotonic_ns
    t0 = clock()
    for _ in repeat(None, n):
        send(msg)
    t1 = clock()
    for _ in range(task["consumers"]):
        send(STOP)
    return {"start_ns": t0, "end_ns": t1, "messages": n}


def mpmc_consume(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    """A consumer of an MPMC run: stops after as many stop messages as there are producers.

    Every producer's stop messages follow all of its data in the queue, so when the consumers have
    taken every stop message between them, every data message has been taken too.
    """
    _, recv = _calls(ep, task["busy"])
    clock = time.monotonic_ns
    stops = task["producers"]
    got = 0
    t0 = clock()
    while True:
        m = recv()
        if len(m) == 1:
            stops -= 1
            if not stops:
                break
        else:
            got += 1
    return {"start_ns": t0, "end_ns": clock(), "messages": got}


#: How long a sender waits for its turn before it goes on alone (another transport's sender
#: failed, so the turn will not come back): much longer than one turn of every transport.
TURN_TIMEOUT = 10.0
#: The file the runner makes beside a ring of turn FIFOs once every sender of it has started.
TURNS_STARTED = "started"


class _Turns:
    """Taking turns with the senders of the other transports of one wake-up figure, so that
    their wake-ups alternate one by one (A B C A B C ...) and a change of the machine's speed
    meets them alike: wait for the turn on ``turn_in`` (a FIFO), act, hand it on to
    ``turn_out``.  Without FIFOs in the task (one transport alone), both are no-ops.  When a
    turn does not come within TURN_TIMEOUT, this sender goes on without turns, and says so in
    its result."""

    def __init__(self, task: Dict[str, Any]) -> None:
        self.fd_in = self.fd_out = -1
        self.alone = False
        self.first = True
        self.started = ""
        if task.get("turn_in"):
            # O_RDWR: opening a FIFO so never waits for the other end (Linux)
            self.fd_in = os.open(task["turn_in"], os.O_RDWR | os.O_CLOEXEC)
            self.fd_out = os.open(task["turn_out"], os.O_RDWR | os.O_CLOEXEC)
            # made by the runner beside the FIFOs once every sender has started (TURNS_STARTED)
            self.started = os.path.join(os.path.dirname(task["turn_in"]), TURNS_STARTED)

    def wait(self) -> None:
        if self.fd_in < 0 or self.alone:
            return
        import select

        # The first turn comes only once the runner has started every sender, one after
        # another (spawning a transport's workers may take longer than TURN_TIMEOUT): until it
        # says so, waiting does not count (the group's deadline still bounds it).
        deadline = None
        while True:
            if deadline is None and (not self.first or os.path.exists(self.started)):
                deadline = time.monotonic() + TURN_TIMEOUT
            left = 0.05 if deadline is None else max(0.0, deadline - time.monotonic())
            if select.select([self.fd_in], [], [], left)[0]:
                os.read(self.fd_in, 1)
                self.first = False
                return
            if deadline is not None and time.monotonic() >= deadline:
                self.alone = True
                return

    def done(self) -> None:
        # Alone, this sender no longer waits for its turns: handing turns on would let the next
        # one believe that it alternates with us (and say so in its record) while we send freely.
        if self.fd_out >= 0 and not self.alone:
            os.write(self.fd_out, b".")

    def close(self, result: Dict[str, Any]) -> Dict[str, Any]:
        for fd in (self.fd_in, self.fd_out):
            if fd >= 0:
                os.close(fd)
        self.fd_in = self.fd_out = -1
        if self.alone:
            result["turns_lost"] = True
        return result


def _timed_sends(task: Dict[str, Any], call: Callable[[Any], Any], arg: Any,
                 after: Optional[Callable[[], Any]] = None,
                 last: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
    """The wake-up sender's loop: ``count`` times wait for the turn, sleep ``gap``, read the
    clock and at once ``call(arg)`` (then ``after()``, outside the timed part), hand the turn
    on; ``last()`` at the end.  The send times, for the runner to pair with the arrivals."""
    gap = task["gap"]
    clock = time.monotonic_ns
    turns = _Turns(task)
    sent = []
    try:
        for _ in range(task["count"]):
            turns.wait()
            time.sleep(gap)
            t = clock()
            call(arg)
            sent.append(t)
            if after is not None:
                after()
            turns.done()
        if last is not None:
            last()
    finally:
        result = turns.close({"sent_ns": sent})
    return result


def wake_send(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    """Send a message after sleeping ``gap`` seconds each time (the peer is asleep), in turns
    with the other transports' senders when the task names turn FIFOs.  The message is made
    beforehand and the clock read just before the send call: what is timed is the transport,
    not the making of a timestamped message (the bare eventfd's timestamp is its message).
    After each send, wait for the receiver's answer before handing the turn on, as the bare
    eventfd's sender does: the next transport's sender must not run on this CPU while this
    receiver is still waking up.  Returns the send times, which the runner pairs with the
    receiver's arrival times."""
    send = ep.send
    return _timed_sends(task, send, payload(max(task["size"], 8)), after=ep.recv,
                        last=lambda: send(STOP))


def wake_recv(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    """Blocking receive; records when each call returned (one way, asleep: the runner pairs
    these with the sender's send times, in order), then answers (wake_send waits for it)."""
    recv, send = ep.recv, ep.send
    clock = time.monotonic_ns
    arrived = []
    while True:
        m = recv()
        t = clock()
        if len(m) == 1:
            break
        arrived.append(t)
        send(WAKE_ANSWER)
    return {"arrived_ns": arrived}


def wake_latencies(sent: List[int], arrived: List[int]) -> Histogram:
    """The one-way latencies of a wake-up trial: the i-th arrival minus the i-th send (every
    transport measured delivers in order and loses nothing).  ValueError when the counts
    differ or an arrival comes before its send (a mis-pairing, never a figure)."""
    if len(sent) != len(arrived):
        raise ValueError(f"wake-up trial: {len(sent)} messages sent but {len(arrived)} received")
    lat = [b - a for a, b in zip(sent, arrived)]
    if lat and min(lat) < 0:
        i = min(range(len(lat)), key=lat.__getitem__)
        raise ValueError(f"wake-up trial: message {i} arrived {-lat[i]} ns before it was sent: "
                         "sends and arrivals are not paired right")
    hist = Histogram()
    hist.record_many(lat)
    return hist


def zc_send(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    """Zero-copy producer: reserve a slot, write the message into it in place, commit."""
    n, size = task["count"], task["size"]
    msg = payload(size)
    reserve, commit = ep.reserve, ep.commit  # type: ignore[attr-defined]
    clock = time.monotonic_ns
    t0 = clock()
    for _ in repeat(None, n):
        view = reserve(size)
        while view is None:
            view = reserve(size)
        view[:] = msg
        commit()
    t1 = clock()
    return {"start_ns": t0, "end_ns": t1, "messages": n}


def zc_recv(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    """Zero-copy consumer: peek at the message in place (its length is checked), release it."""
    n, size = task["count"], task["size"]
    peek, release = ep.peek, ep.release  # type: ignore[attr-defined]
    clock = time.monotonic_ns
    view = peek()
    while view is None:
        view = peek()
    release()
    t0 = clock()
    bad = 0
    for _ in repeat(None, n - 1):
        view = peek()
        while view is None:
            view = peek()
        if len(view) != size:
            bad += 1
        release()
    t1 = clock()
    if bad:
        raise RuntimeError(f"{bad} zero-copy messages were not {size} bytes long")
    return {"start_ns": t0, "end_ns": t1, "messages": n - 1}


def _ref_lib() -> Any:
    from .._ffi_doorbell import ffi, lib

    return ffi, lib


def _ref_check(rc: int, what: str) -> None:
    if rc != 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")


def _ref_rtt_count(task: Dict[str, Any]) -> int:
    """Round trips the C ping-pong times: a blocking round trip takes tens of microseconds, so
    about ``seconds`` of them (at least 100), never more than ``samples`` (both sides must
    agree)."""
    return min(task["samples"], max(100, int(task["seconds"] / 20e-6)))


def ref_rtt_lead(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    """C eventfd ping-pong, leading side: as many round trips as ``rtt_client`` would time."""
    ffi, lib = _ref_lib()
    n = _ref_rtt_count(task)
    warm = task["warmup"]
    lat = ffi.new("int64_t[]", n + warm)
    _ref_check(lib.ivshm_ref_eventfd_rtt(ep.rx, ep.tx, 1, n + warm, lat), "eventfd round trips")
    hist = Histogram()
    hist.record_many(ffi.unpack(lat, n + warm)[warm:])
    return {"histogram": hist.to_dict(), "count": n + warm}


def ref_rtt_echo(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    ffi, lib = _ref_lib()
    n = _ref_rtt_count(task) + task["warmup"]
    _ref_check(lib.ivshm_ref_eventfd_rtt(ep.rx, ep.tx, 0, n, ffi.NULL), "eventfd echo")
    return {"echoed": n}


def ref_wake_send(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    ffi, lib = _ref_lib()
    gap_ns = int(task["gap"] * 1e9)
    turns = _Turns(task)
    try:
        if turns.fd_in < 0:
            _ref_check(lib.ivshm_ref_eventfd_wake(ep.rx, ep.tx, 1, task["count"], gap_ns, ffi.NULL),
                       "eventfd wake-ups")
        for _ in range(task["count"] if turns.fd_in >= 0 else 0):
            turns.wait()  # then one wake-up in C: sleep, time, write, wait for the receiver
            _ref_check(lib.ivshm_ref_eventfd_wake(ep.rx, ep.tx, 1, 1, gap_ns, ffi.NULL),
                       "eventfd wake-ups")
            turns.done()
    finally:
        result = turns.close({})
    return result


def ref_wake_recv(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    ffi, lib = _ref_lib()
    n = task["count"]
    lat = ffi.new("int64_t[]", n)
    _ref_check(lib.ivshm_ref_eventfd_wake(ep.rx, ep.tx, 0, n, 0, lat), "eventfd wake-ups")
    hist = Histogram()
    hist.record_many(max(0, v) for v in ffi.unpack(lat, n))
    return {"histogram": hist.to_dict()}


#: An eventfd write of 1 (8 bytes in host order), made once.
_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)


def py_wake_send(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    """wake_send over a bare eventfd from Python: sleep, read the clock, write; then wait for
    the receiver's answer (an eventfd has no messages to queue: two writes would add up)."""
    return _timed_sends(task, functools.partial(os.write, ep.tx), _EVENTFD_ONE,
                        after=functools.partial(os.read, ep.rx, 8))


def py_wake_recv(ep: Endpoint, task: Dict[str, Any]) -> Dict[str, Any]:
    """wake_recv over a bare eventfd from Python: ``count`` blocking reads, each answered."""
    tx, rx = ep.tx, ep.rx
    read, write = os.read, os.write
    clock = time.monotonic_ns
    arrived = []
    for _ in range(task["count"]):
        read(rx, 8)
        arrived.append(clock())
        write(tx, _EVENTFD_ONE)
    return {"arrived_ns": arrived}


PATTERNS: Dict[str, Callable[[Endpoint, Dict[str, Any]], Dict[str, Any]]] = {
    "ref-rtt-lead": ref_rtt_lead,
    "ref-rtt-echo": ref_rtt_echo,
    "ref-wake-send": ref_wake_send,
    "ref-wake-recv": ref_wake_recv,
    "py-wake-send": py_wake_send,
    "py-wake-recv": py_wake_recv,
    "rtt-client": rtt_client,
    "rtt-echo": rtt_echo,
    "tput-send": tput_send,
    "tput-recv": tput_recv,
    "mpmc-produce": mpmc_produce,
    "mpmc-consume": mpmc_consume,
    "wake-send": wake_send,
    "wake-recv": wake_recv,
    "zc-send": zc_send,
    "zc-recv": zc_recv,
}


# ------------------------------------------------------------------------------------------------
# Worker process
def worker_main(role: str, cpu: Optional[int], transport: Transport, state: Dict[str, Any],
                conn: Any) -> None:
    """Entry point of a spawned worker (module-level so the spawn start method can import it)."""
    try:
        pinned = _pin(cpu)
        conn.send(("ready", {"pid": os.getpid(), "cpu": pinned, "role": role}))
        while True:
            msg = conn.recv()
            if msg[0] == "exit":
                break
            task = msg[1]
            try:
                fn = PATTERNS[task["pattern"]]
                ep = transport.endpoint(state, role, task["size"], task.get("mode", "blocking"))
                conn.send(("opened",))
                go = conn.recv()
                if go[0] != "go":
                    break
                stats = ep.stats
                before = stats() if stats is not None else None
                result = fn(ep, task)
                if stats is not None:
                    after = stats()
                    result["counters"] = {k: after[k] - (before or {}).get(k, 0) for k in after}
            except BaseException:  # noqa: BLE001 - reported to the parent, then this worker ends
                conn.send(("error", traceback.format_exc()))
                return
            conn.send(("ok", result))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        try:
            transport.close_all(state)
        finally:
            conn.close()


class WorkerGroup:
    """Spawned workers sharing one transport state; runs one task at a time on all of them."""

    START_TIMEOUT = 60.0

    def __init__(self, transport: Transport, state: Dict[str, Any], roles: Sequence[str],
                 cpus: Sequence[Optional[int]], ctx: Any) -> None:
        self.transport = transport
        self.roles = list(roles)
        self.procs: Dict[str, Any] = {}
        self.conns: Dict[str, Any] = {}
        self.info: Dict[str, Any] = {}
        self.dead = False
        try:
            for role, cpu in zip(self.roles, cpus):
                parent_end, child_end = ctx.Pipe(duplex=True)
                p = ctx.Process(
                    target=worker_main,
                    args=(role, cpu, transport, state, child_end),
                    name=f"pyivshmem-bench-{transport.key}-{role}",
                    daemon=True,
                )
                p.start()
                child_end.close()
                self.procs[role], self.conns[role] = p, parent_end
            for role in self.roles:
                self.info[role] = self._expect(role, "ready", time.monotonic() + self.START_TIMEOUT)
        except BaseException:
            self.kill()
            raise

    def _expect(self, role: str, kind: str, deadline: float) -> Any:
        conn, proc = self.conns[role], self.procs[role]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailed(f"worker {role} ({self.transport.key}) did not answer in time")
            if conn.poll(min(left, 0.5)):
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    raise WorkerFailed(
                        f"worker {role} ({self.transport.key}) exited (code {proc.exitcode})"
                    ) from None
                if msg[0] == "error":
                    raise WorkerFailed(_last_line(msg[1]), msg[1])
                if msg[0] != kind:
                    raise WorkerFailed(f"worker {role}: expected {kind!r}, got {msg[0]!r}")
                return msg[1] if len(msg) > 1 else None
            if not proc.is_alive() and not conn.poll(0):
                raise WorkerFailed(
                    f"worker {role} ({self.transport.key}) exited (code {proc.exitcode})"
                )

    def run(self, tasks: Dict[str, Dict[str, Any]], timeout: float,
            order: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
        """Run one task per role (``order``: who gets "go" first); results by role."""
        self.start(tasks, timeout, order)
        return self.finish()

    def start(self, tasks: Dict[str, Dict[str, Any]], timeout: float,
              order: Optional[Sequence[str]] = None) -> None:
        """The first half of run(): hand out the tasks and say "go" once every worker has
        opened; finish() collects the results.  Several groups can run at once this way."""
        if self.dead:
            raise WorkerFailed("worker group already failed")
        self._order = list(order or self.roles)
        try:
            self._deadline = time.monotonic() + timeout
            for role in self._order:
                self.conns[role].send(("task", tasks[role]))
            for role in self._order:
                self._expect(role, "opened", self._deadline)
            for role in self._order:
                self.conns[role].send(("go",))
        except BaseException:
            self.kill()
            raise

    def finish(self) -> Dict[str, Dict[str, Any]]:
        """The results of the task start() began, by role."""
        try:
            return {role: self._expect(role, "ok", self._deadline) for role in self._order}
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """Stop every worker of this group now (our own child processes, by handle)."""
        self.dead = True
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            p.join(5)
        for c in self.conns.values():
            c.close()

    def close(self) -> None:
        if self.dead:
            return
        self.dead = True
        for c in self.conns.values():
            try:
                c.send(("exit",))
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs.values():
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in self.conns.values():
            c.close()


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "worker failed"
