"""The ivshmem server: a drop-in for QEMU's ``ivshmem-server``, also embeddable in a Python program.

Embedded use::

    with Server("/run/myapp/ivshmem.sock", size="16M", vectors=2) as server:
        ...                 # the loop runs in a background thread
        print(server.peers)

Command line (``pyivshmem-server`` or ``pyivshmem server``): QEMU's flags, see :func:`main`.

One module per concern: :mod:`.core` (the protocol: clients, queues, announcements),
:mod:`.memory` (the shared memory back-ends and QEMU's size grammar), :mod:`.cli` (flags, daemon
mode, syslog).
"""
from __future__ import annotations

from .cli import main
from .core import (
    COALESCE_AFTER,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MODE,
    DEFAULT_PIDFILE,
    DEFAULT_SHM_NAME,
    DEFAULT_SIZE,
    DEFAULT_SOCKET,
    DEFAULT_VECTORS,
    MAX_PEER_ID,
    MAX_VECTORS,
    PROTOCOL_VERSION,
    Server,
)
from .memory import MAX_SIZE, REGION_MAGIC as _REGION_MAGIC, parse_qemu_size, round_up_pow2

__all__ = [
    "Server",
    "main",
    "parse_qemu_size",
    "round_up_pow2",
    "DEFAULT_SOCKET",
    "DEFAULT_SHM_NAME",
    "DEFAULT_SIZE",
    "DEFAULT_VECTORS",
    "MAX_VECTORS",
    "MAX_PEER_ID",
    "MAX_SIZE",
    "PROTOCOL_VERSION",
    "DEFAULT_PIDFILE",
    "DEFAULT_MODE",
    "DEFAULT_MAX_QUEUE",
    "COALESCE_AFTER",
]
