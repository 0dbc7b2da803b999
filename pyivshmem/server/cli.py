"""``pyivshmem-server`` (also ``pyivshmem server``): QEMU ivshmem-server's flags and defaults,
daemon mode with a pidfile, syslog, and a clean shutdown on SIGTERM/SIGINT/SIGHUP."""
from __future__ import annotations

import getopt
import logging
import os
import re
import signal
import sys
from typing import Dict, List, Optional, Sequence

from ..errors import ConfigError
from .core import (
    DEFAULT_MAX_QUEUE,
    DEFAULT_MODE,
    DEFAULT_PIDFILE,
    DEFAULT_SHM_NAME,
    DEFAULT_SIZE,
    DEFAULT_SOCKET,
    DEFAULT_VECTORS,
    MAX_VECTORS,
    Server,
    install_stop_handlers,
    restore_handlers,
)
from .memory import parse_qemu_size, round_up_pow2

__all__ = ["main"]

log = logging.getLogger("pyivshmem.server")

_PROG = "pyivshmem-server"
_USAGE = (
    f"usage: {_PROG} [-h] [-v] [-F] [-p pidfile] [-S socket] [-M shm-name | -m dir] "
    "[-l size] [-n vectors] [--mode octal] [--max-queue n] [--keep-shm]"
)
_HELP = f"""{_USAGE}

ivshmem server: hands shared memory and doorbell eventfds to QEMU ivshmem-doorbell devices
and pyivshmem peers (QEMU ivshmem-server compatible).

  -h, --help      show this help and exit
  -v              verbose (debug) logging; needs -F
  -F              stay in the foreground (default: daemonize and write the pidfile)
  -p pidfile      pidfile in daemon mode (default {DEFAULT_PIDFILE})
  -S socket       UNIX socket path (default {DEFAULT_SOCKET})
  -M shm-name     POSIX shared memory name, /dev/shm/<name>, unlinked on exit
                  (default {DEFAULT_SHM_NAME})
  -m dir          an unnamed temporary file in dir instead (e.g. a hugetlbfs mount)
  -l size         shared memory size, bytes or K/M/G/T suffix, rounded up to a power of two
                  (default 4M)
  -n vectors      interrupt vectors per peer, 0..{MAX_VECTORS} (default {DEFAULT_VECTORS})
  --mode octal    permissions of the socket and created files (default {DEFAULT_MODE:04o})
  --max-queue n   messages a client may leave unread before it is disconnected
                  (default {DEFAULT_MAX_QUEUE}, on top of its own start-up messages)
  --keep-shm      leave the -M shared memory in place on exit (a restarted server then
                  invalidates the pyivshmem region left in it)
"""


class _UsageError(Exception):
    pass


def _parse_int(text: str, what: str) -> int:
    t = text.strip()
    try:
        if re.fullmatch(r"0[0-7]+", t):
            return int(t, 8)
        return int(t, 0)
    except ValueError:
        raise _UsageError(f"cannot parse {what} {text!r}: expected an integer") from None


def _parse_args(argv: Sequence[str]) -> dict:
    try:
        opts, rest = getopt.getopt(list(argv), "hvFp:S:m:M:l:n:", ["help", "mode=", "max-queue=", "keep-shm"])
    except getopt.GetoptError as exc:
        raise _UsageError(str(exc)) from None
    if rest:
        raise _UsageError(f"unexpected argument {rest[0]!r}")
    args = {
        "help": False, "verbose": False, "foreground": False, "pidfile": DEFAULT_PIDFILE,
        "socket": DEFAULT_SOCKET, "shm_name": DEFAULT_SHM_NAME, "shm_dir": None,
        "size": DEFAULT_SIZE, "vectors": DEFAULT_VECTORS, "mode": DEFAULT_MODE,
        "max_queue": DEFAULT_MAX_QUEUE, "keep_shm": False,
    }
    for opt, val in opts:
        if opt in ("-h", "--help"):
            args["help"] = True
        elif opt == "-v":
            args["verbose"] = True
        elif opt == "-F":
            args["foreground"] = True
        elif opt == "-p":
            args["pidfile"] = val
        elif opt == "-S":
            args["socket"] = val
        elif opt == "-M":       # the last of -M/-m wins, as in QEMU
            args["shm_name"], args["shm_dir"] = val, None
        elif opt == "-m":
            args["shm_name"], args["shm_dir"] = None, val
        elif opt == "-l":
            try:
                args["size"] = round_up_pow2(parse_qemu_size(val))
            except ConfigError as exc:
                raise _UsageError(str(exc)) from None
        elif opt == "-n":
            n = _parse_int(val, "the number of vectors")
            if n < 0:
                raise _UsageError(f"invalid number of vectors {n}: give 0..{MAX_VECTORS}")
            if n > MAX_VECTORS:
                raise _UsageError(f"too many requested vectors {n} (max is {MAX_VECTORS})")
            args["vectors"] = n
        elif opt == "--mode":
            t = val.strip()
            try:
                m = int(t, 16) if t.lower().startswith("0x") else int(t, 8)
            except ValueError:
                m = -1
            if m < 0 or m & ~0o7777:
                raise _UsageError(
                    f"invalid mode {val!r}: expected octal permissions such as 600 or 0660"
                )
            args["mode"] = m
        elif opt == "--keep-shm":
            args["keep_shm"] = True
        elif opt == "--max-queue":
            q = _parse_int(val, "the queue limit")
            if q < 1:
                raise _UsageError("--max-queue must be at least 1")
            args["max_queue"] = q
    if args["verbose"] and not args["foreground"] and not args["help"]:
        raise _UsageError("cannot use verbose in daemon mode: add -F")
    return args


def _daemonize(pidfile: str) -> Optional[int]:
    """Fork into the background. Returns None in the daemon; in the original process, the exit
    status to leave with (0 once the daemon wrote its pidfile)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid > 0:
        os.close(w)
        chunks = []
        while True:
            data = os.read(r, 4096)
            if not data:
                break
            chunks.append(data)
        os.close(r)
        os.waitpid(pid, 0)
        report = b"".join(chunks).decode(errors="replace")
        if report.startswith("ok"):
            return 0
        print(f"{_PROG}: {report or 'the daemon exited during start-up'}", file=sys.stderr)
        return 1
    # first child
    os.close(r)
    try:
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        # the daemon
        try:
            fd = os.open(
                pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
            )
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as exc:
            os.write(w, (f"cannot write pid file {pidfile}: {exc.strerror}; choose a writable "
                         "path with -p, or stay in the foreground with -F").encode())
            os._exit(1)
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        os.close(null)
        os.write(w, b"ok")
        os.close(w)
        return None
    except BaseException:
        os._exit(1)


def _remove_pidfile(pidfile: str) -> None:
    try:
        with open(pidfile) as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(pidfile)
    except OSError:
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`pyivshmem-server` / `pyivshmem server`: QEMU ivshmem-server's flags and defaults.

    Exit status: 0 after a clean shutdown (SIGTERM/SIGINT/SIGHUP), 1 when the server could not
    start, 2 for bad flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse_args(argv)
    except _UsageError as exc:
        print(f"{_PROG}: {exc}\n{_USAGE}\n(-h for help)", file=sys.stderr)
        return 2
    if args["help"]:
        print(_HELP)
        return 0
    handler: logging.Handler
    if args["foreground"]:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{_PROG}: %(levelname)s: %(message)s"))
    else:
        handler = logging.NullHandler()
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args["verbose"] else logging.WARNING)
    log.propagate = False
    old_handlers: Dict[int, object] = {}
    try:
        try:
            server = Server(
                args["socket"],
                shm_name=args["shm_name"],
                shm_dir=args["shm_dir"],
                size=args["size"],
                vectors=args["vectors"],
                mode=args["mode"],
                max_queue=args["max_queue"],
                raise_fd_limit=True,     # a server process: as many peers as the host allows
                keep_shm=args["keep_shm"],
            )
            # Constructing the server made nothing on disk; listen() makes the socket and the
            # memory. From then on SIGTERM/SIGINT/SIGHUP must shut down cleanly, also before the
            # loop runs (a script may signal as soon as the socket appears, or the pidfile does in
            # daemon mode): until serve_forever() takes over, they only ask the server to stop,
            # and it does so as soon as it serves.
            early: List[int] = []

            def on_signal(signum, frame):
                early.append(signum)
                server._request_stop()

            old_handlers = install_stop_handlers(on_signal)
            server.listen()
        except (OSError, ValueError) as exc:
            print(f"{_PROG}: {exc}", file=sys.stderr)
            return 1
        if not args["foreground"]:
            server._memory.lock_survives_fork = True    # the daemon keeps the memory locked
            try:
                status = _daemonize(args["pidfile"])
            except OSError as exc:
                server._abandon()
                print(f"{_PROG}: cannot start the daemon: {exc.strerror}", file=sys.stderr)
                return 1
            if status is not None:
                if status != 0:
                    # the daemon never served (it could not write its pidfile, or died): its
                    # socket and memory are this process's to remove, as after any failed start
                    server._abandon()
                os._exit(status)    # the original process: leave the server to the daemon
            handler = _use_syslog(handler)
        if early:
            log.info("received %s while starting, shutting down", signal.Signals(early[0]).name)
        try:
            server.serve_forever(handle_signals=True)
        finally:
            if not args["foreground"]:
                _remove_pidfile(args["pidfile"])
        return 0
    finally:
        restore_handlers(old_handlers)
        log.removeHandler(handler)
        log.propagate = True


def _use_syslog(old: logging.Handler) -> logging.Handler:
    """In daemon mode, warnings go to syslog when there is one."""
    if not os.path.exists("/dev/log"):
        return old
    import logging.handlers

    try:
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    except OSError:
        return old
    handler.setFormatter(logging.Formatter(f"{_PROG}[%(process)d]: %(message)s"))
    log.removeHandler(old)
    log.addHandler(handler)
    return handler

