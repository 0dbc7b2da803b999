"""pyivshmem: lock-free messaging over shared memory between QEMU VMs and host processes."""
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from ._ring import (  # noqa: F401
    Channel, MpmcRing, PubSubRing, Region, SpscRing, Subscriber, parse_size,
)
from .peer import Peer  # noqa: F401
from .server import Server  # noqa: F401
from .pci import PciDevice, PciDeviceInfo  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name: str):
    """``pyivshmem.Bridge`` is loaded on first use (its transport is an optional extra); it is not
    in ``__all__``, whose names the API reference reads from the module's namespace."""
    if name == "Bridge":
        from .bridge import Bridge

        return Bridge
    raise AttributeError(f"module 'pyivshmem' has no attribute {name!r}")


__all__ = [
    "Region", "SpscRing", "MpmcRing", "PubSubRing", "Subscriber", "Channel", "Peer", "Server",
    "PciDevice", "PciDeviceInfo",
    "parse_size",
] + list(_errors_all)
