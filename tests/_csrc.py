"""The C core's source list for tests that compile C programs: csrc/core.mk holds it once."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def c_core_sources():
    """File names of the C core's sources (relative to csrc/)."""
    with open(os.path.join(ROOT, "csrc", "core.mk")) as f:
        for line in f:
            if line.startswith("CORE_SRCS"):
                return line.split(":=", 1)[1].split()
    raise RuntimeError("csrc/core.mk has no CORE_SRCS line")


def c_lib_sources():
    """File names (relative to csrc/) of everything libivshm.a holds: the core plus the extras
    for C programs (LIB_EXTRA_SRCS: doorbells, the server protocol, the host peer)."""
    out = list(c_core_sources())
    with open(os.path.join(ROOT, "csrc", "core.mk")) as f:
        for line in f:
            if line.startswith("LIB_EXTRA_SRCS"):
                return out + line.split(":=", 1)[1].split()
    raise RuntimeError("csrc/core.mk has no LIB_EXTRA_SRCS line")
