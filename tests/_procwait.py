"""Observe, from outside, that a thread is blocked in its wait: tests that send a signal "during a
blocked wait" or free room "while the sender sleeps" synchronise on this instead of on sleeps.

Linux only: /proc/<pid>/task/<tid>/stat gives the scheduler state ('S': sleeping interruptibly)
and /proc/<pid>/task/<tid>/syscall the system call the thread is blocked in ("running" when it is
not in one).  A thread counts as waiting when it sleeps inside one of the poll family's calls,
which is where every doorbell wait of pyivshmem blocks (poll, epoll_wait and their variants).
"""
import platform
import re
import time

# the poll family's system call numbers, by architecture
_WAIT_SYSCALLS = {
    # poll, select, epoll_wait, pselect6, ppoll, epoll_pwait, epoll_pwait2
    "x86_64": {7, 23, 232, 270, 271, 281, 441},
    # pselect6, ppoll, epoll_pwait, epoll_pwait2 (the only ones arm64 has)
    "aarch64": {72, 73, 22, 441},
}
_WCHAN = re.compile(r"poll|select|ep_poll")
# nanosleep, clock_nanosleep: where the rings' own blocking calls back off
_SLEEP_SYSCALLS = {"x86_64": {35, 230}, "aarch64": {101, 115}}
_SLEEP_WCHAN = re.compile(r"nanosleep|hrtimer")


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def in_wait(pid, tid=None, sleep=False):
    """True when thread ``tid`` of ``pid`` (its main thread by default) sleeps in a poll-family
    system call now (with ``sleep``: in nanosleep, where a ring's blocking call backs off); None
    when the process is gone."""
    base = f"/proc/{pid}/task/{tid or pid}"
    stat = _read(f"{base}/stat")
    if stat is None:
        return None
    if stat.rsplit(")", 1)[1].split()[0] != "S":
        return False
    syscall = _read(f"{base}/syscall")
    if syscall is None:
        return None
    if syscall == "running" or syscall.startswith("-1"):
        return False
    numbers = (_SLEEP_SYSCALLS if sleep else _WAIT_SYSCALLS).get(platform.machine())
    if numbers is not None:
        return int(syscall.split()[0]) in numbers
    return bool((_SLEEP_WCHAN if sleep else _WCHAN).search(_read(f"{base}/wchan") or ""))


def wait_until_in_wait(pid, tid=None, timeout=30.0, what="the wait", sleep=False, also=None):
    """Return once the thread is observed asleep in its wait (see in_wait) and ``also()``, if
    given, is true at that moment; AssertionError after ``timeout`` seconds or when the process
    ended first."""
    deadline = time.monotonic() + timeout
    while True:
        state = in_wait(pid, tid, sleep)
        if state and also is not None and not also():
            state = False
        if state:
            return
        assert state is not None, f"process {pid} ended before it reached {what}"
        assert time.monotonic() < deadline, f"thread {tid or pid} never reached {what}"
        time.sleep(0.001)  # polling an observable state, not a guess at how long it takes


def signal_pending(pid, sig):
    """True while ``sig`` sent to ``pid`` is not yet delivered (thread or process queue)."""
    status = _read(f"/proc/{pid}/status")
    if status is None:
        return False
    bit = 1 << (sig - 1)
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & bit:
            return True
    return False


def wait_until_delivered(pid, sig, timeout=30.0):
    """Return once ``sig`` is no longer pending: the thread has left the system call the signal
    interrupted (delivery happens on the way back to user space)."""
    deadline = time.monotonic() + timeout
    while signal_pending(pid, sig):
        assert time.monotonic() < deadline, f"signal {sig} was never delivered to {pid}"
        time.sleep(0.001)


def thread_native_id(thread, timeout=30.0):
    """The kernel thread id of a started threading.Thread."""
    deadline = time.monotonic() + timeout
    while thread.native_id is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return thread.native_id


def read_until(stream, text, timeout=60.0):
    """Read a child's output pipe (``stream``, not read from before) until ``text`` appears;
    returns everything read.  AssertionError when the pipe closes or ``timeout`` passes first."""
    import os
    import select

    fd = stream.fileno()
    got = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} never appeared in the output: {got.decode(errors='replace')}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"the output ended without {text!r}: {got.decode(errors='replace')}"
            got += chunk
    return got.decode(errors="replace")


def call_when_waiting(fn, *args, tid=None, what="the wait"):
    """Start a thread that calls ``fn(*args)`` once thread ``tid`` of this process (default: the
    calling thread) is seen blocked in its wait; returns the thread, to join.  For tests of "a
    blocked wait wakes when rung": a ring that came before the wait would prove nothing."""
    import os
    import threading

    tid = tid or threading.get_native_id()

    def run():
        wait_until_in_wait(os.getpid(), tid, what=what)
        fn(*args)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def stop(proc, timeout=15.0):
    """Terminate a child process if it still runs; kill it if it does not end within timeout."""
    import subprocess

    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


# ---- processes a test started, and theirs (Linux /proc) ----
def children(pid):
    """The pids of ``pid``'s children (its main thread's), [] once it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def descendants(pid):
    """Children, grandchildren and so on of ``pid``."""
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def cmdline(pid):
    """``pid``'s command line, arguments separated by spaces; "" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def running(pid):
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(cond, what="the condition", timeout=60.0):
    """Return once ``cond()`` is true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling an observable state


def is_open(fd):
    """True while ``fd`` is an open file descriptor of this process (EBADF: False)."""
    import errno
    import os

    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True
