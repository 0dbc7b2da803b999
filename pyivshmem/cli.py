"""Command line: `pyivshmem {server,client,info,bench,bridge}` and `pyivshmem-server` (QEMU's flags).

Each subcommand lives in its own module and exposes ``main(argv) -> int``; this module only
dispatches, so importing it is cheap.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

_SUBCOMMANDS = {
    "server": ("pyivshmem.server", "main", "run an ivshmem server (QEMU ivshmem-server flags)"),
    "client": ("pyivshmem.client", "main", "interactive client: dump, int <peer> <vector|all>"),
    "info": ("pyivshmem.info", "main", "inspect a region: header, rings, fill levels, waiters"),
    "bench": ("pyivshmem.bench", "main", "benchmark pyivshmem against the alternatives"),
    "bridge": ("pyivshmem.bridge", "main", "forward rings to another host, exactly once (ZeroMQ)"),
}


def _load(name: str) -> Callable[[Sequence[str]], int]:
    import importlib

    module, func, _ = _SUBCOMMANDS[name]
    return getattr(importlib.import_module(module), func)


def _usage() -> str:
    lines = ["usage: pyivshmem <command> [options]", "", "commands:"]
    for name, (_, _, text) in _SUBCOMMANDS.items():
        lines.append(f"  {name:8s} {text}")
    lines.append("")
    lines.append("`pyivshmem <command> --help` describes each command's options.")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    name = args[0]
    if name not in _SUBCOMMANDS:
        print(f"pyivshmem: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(_load(name)(args[1:]) or 0)


def server_main(argv: Optional[Sequence[str]] = None) -> int:
    """`pyivshmem-server`: the same flags and defaults as QEMU's ivshmem-server."""
    return int(_load("server")(list(sys.argv[1:] if argv is None else argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
