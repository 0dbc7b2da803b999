"""`pyivshmem client`: an interactive ivshmem client, like QEMU's ``ivshmem-client``.

It connects to a server as a host peer, prints its id, the peers joining and leaving, and the
interrupts it receives, and reads commands from standard input (a terminal or a pipe): dump,
int <peer> <vector|all>, int all, help, quit (listed once, in COMMANDS).
"""
from __future__ import annotations

import getopt
import os
import selectors
import sys
from typing import List, Optional, Sequence, TextIO

from .errors import ConfigError, IvshmemError, PeerDisconnected, ProtocolError
from .peer import DEFAULT_SOCKET, DISCONNECTED, JOINED, LEFT, Peer

#: The commands, listed once for the usage text and the 'help' command.
COMMANDS = """  dump                   show my id and vectors, and every connected peer
  int <peer> <vector>    ring one vector of a peer
  int <peer> all         ring every vector of a peer
  int all                ring every vector of every other peer
  help                   list the commands
  quit                   leave (so does end of input)
"""

USAGE = f"""usage: pyivshmem client [-h] [-v] [-S SOCKET] [-t SECONDS]

An interactive ivshmem client: connects to an ivshmem server, prints peers joining and
leaving and the interrupts received, and reads commands from standard input.

  -h          show this help and exit
  -v          verbose: also print every command's result
  -S SOCKET   the server's UNIX socket (default {DEFAULT_SOCKET})
  -t SECONDS  how long to wait for the server during set-up (default 5)

Commands (type 'help' once connected):
{COMMANDS}"""

HELP = "commands:\n" + COMMANDS.rstrip("\n")


class _Client:
    def __init__(self, peer: Peer, out: TextIO, verbose: bool):
        self.peer = peer
        self.out = out
        self.verbose = verbose

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def dump(self) -> None:
        p = self.peer
        fds = ", ".join(str(p.vector_fd(v)) for v in range(p.vectors))
        self.say(f"my id: {p.id}, {p.vectors} vector(s) (eventfds {fds or '-'}), "
                 f"shared memory: {p.region.size} bytes")
        peers = p.peers
        if not peers:
            self.say("no other peers")
        for pid, n in peers.items():
            self.say(f"peer {pid}: {n} vector(s)")

    def ring(self, peer_id: int, vectors: Sequence[int]) -> None:
        for v in vectors:
            self.peer.notify(peer_id, v)
            if self.verbose:
                self.say(f"notified peer {peer_id} vector {v}")

    def command(self, line: str) -> bool:
        """Run one command line; False when the client should leave."""
        words = line.split()
        if not words:
            return True
        cmd, args = words[0].lower(), words[1:]
        try:
            if cmd == "dump" and not args:
                self.dump()
            elif cmd == "help" or cmd == "?":
                self.say(HELP)
            elif cmd in ("quit", "exit") and not args:
                return False
            elif cmd == "int" and args == ["all"]:
                peers = self.peer.peers
                for pid, n in peers.items():
                    self.ring(pid, range(n))
                if not peers:
                    self.say("int all: no other peers to notify")
            elif cmd == "int" and len(args) == 2:
                pid = _number(args[0], "peer id")
                known = self.peer.peers
                if pid == self.peer.id:
                    known[pid] = self.peer.vectors
                if args[1] == "all":
                    if pid not in known:
                        raise ConfigError(f"peer {pid} is not connected "
                                          f"(connected: {sorted(known) or 'none'})")
                    self.ring(pid, range(known[pid]))
                else:
                    self.ring(pid, [_number(args[1], "vector")])
            else:
                self.say(f"invalid command {line.strip()!r}; type 'help' for the list")
        except (ConfigError, ValueError) as e:
            self.say(f"error: {e}")
        return True

    def server_activity(self) -> bool:
        """Report interrupts and peer events; False when the server went away or broke the
        protocol (said on standard error; the connection is dropped then, as by QEMU's
        client)."""
        try:
            for v in self.peer.wait(0):
                self.say(f"interrupt on vector {v}")
            events = self.peer.events()
        except PeerDisconnected:
            return False
        except ProtocolError as e:
            print(f"pyivshmem client: {e}", file=sys.stderr)
            return False
        for ev in events:
            if ev.kind == JOINED:
                self.say(f"peer {ev.peer} joined ({ev.vectors} vector(s))")
            elif ev.kind == LEFT:
                self.say(f"peer {ev.peer} left")
            elif ev.kind == DISCONNECTED:
                self.say("the server closed the connection")
                return False
        return True


def _number(text: str, what: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError(f"{what} must be a number or 'all', not {text!r}") from None
    if value < 0:
        raise ValueError(f"{what} must not be negative, not {value}")
    return value


def main(argv: Optional[Sequence[str]] = None, *, stdin_fd: int = 0,
         out: Optional[TextIO] = None) -> int:
    out = out if out is not None else sys.stdout
    try:
        opts, rest = getopt.getopt(list(sys.argv[1:] if argv is None else argv), "hvS:t:")
    except getopt.GetoptError as e:
        print(f"pyivshmem client: {e}\n\n{USAGE}", file=sys.stderr)
        return 2
    path, verbose, timeout = DEFAULT_SOCKET, False, 5.0
    for opt, val in opts:
        if opt == "-h":
            out.write(USAGE)
            return 0
        if opt == "-v":
            verbose = True
        elif opt == "-S":
            path = val
        elif opt == "-t":
            try:
                timeout = float(val)
            except ValueError:
                print(f"pyivshmem client: -t needs a number of seconds, not {val!r}",
                      file=sys.stderr)
                return 2
    if rest:
        print(f"pyivshmem client: unexpected argument {rest[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2

    try:
        peer = Peer.connect(path, timeout=timeout)
    except (OSError, IvshmemError) as e:
        print(f"pyivshmem client: {e}", file=sys.stderr)
        return 1

    interactive = os.isatty(stdin_fd)
    with peer:
        client = _Client(peer, out, verbose)
        client.say(f"connected to {path}: my id is {peer.id}, {peer.vectors} vector(s)")
        for pid, n in peer.peers.items():
            client.say(f"peer {pid} is connected ({n} vector(s))")
        sel = selectors.DefaultSelector()
        sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
        sel.register(peer.fileno(), selectors.EVENT_READ, "peer")
        pending = b""
        status = 0
        try:
            while True:
                if interactive:
                    out.write("cmd> ")
                    out.flush()
                keys = sel.select()
                leave = False
                for key, _ in keys:
                    if key.data == "peer":
                        if not client.server_activity():
                            status, leave = 1, True
                        continue
                    chunk = os.read(stdin_fd, 65536)
                    if not chunk:
                        leave = True
                        if pending:
                            client.command(pending.decode(errors="replace"))
                        continue
                    pending += chunk
                    lines: List[bytes] = pending.split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        if not client.command(line.decode(errors="replace")):
                            leave = True
                            break
                    if leave:
                        break
                if leave:
                    break
        except KeyboardInterrupt:
            status = 130
        finally:
            sel.close()
        return status


if __name__ == "__main__":
    sys.exit(main())
