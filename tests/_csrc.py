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
