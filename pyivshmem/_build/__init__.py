"""cffi build scripts (API mode, out-of-line).  Each ffi_*.py defines `ffibuilder`."""
import os

# relative to the working directory (the project root during a build): setuptools refuses
# absolute source paths when it builds a wheel
CSRC = os.path.relpath(
    os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc"))


def compile_flags():
    """The same debug/sanitizer switches as setup.py, for cffi modules."""
    cflags = ["-std=gnu11", "-Wall", "-Wno-unused-parameter", "-Wno-unused-function"]
    ldflags = []
    cflags += ["-O0", "-g"] if os.environ.get("PYIVSHMEM_DEBUG") else ["-O2"]
    san = os.environ.get("PYIVSHMEM_SANITIZE")
    if san:
        cflags += ["-fsanitize=" + san, "-fno-omit-frame-pointer", "-g"]
        ldflags += ["-fsanitize=" + san]
    return cflags, ldflags
