"""Build of pyivshmem: one Cython extension (the ring hot path) and cffi API-mode modules.

Environment switches:
  PYIVSHMEM_DEBUG=1      -O0 -g, assertions on
  PYIVSHMEM_SANITIZE=address,undefined | thread   compile and link with those sanitizers
Each cffi module is described by a script pyivshmem/_build/ffi_*.py defining `ffibuilder`, which
names its own csrc/*.c files.  The C core (region, rings, channel) goes into the Cython extension;
its sources are listed once, in csrc/core.mk, which the Makefiles and tests read too.
What the sdist carries is MANIFEST.in's business (docs/release.md).
"""
import glob
import os
import shutil

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _flags():
    cflags = ["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unused-function"]
    ldflags = []
    if os.environ.get("PYIVSHMEM_DEBUG"):
        cflags += ["-O0", "-g", "-UNDEBUG"]
    else:
        cflags += ["-O2"]
    san = os.environ.get("PYIVSHMEM_SANITIZE")
    if san:
        cflags += ["-fsanitize=" + san, "-fno-omit-frame-pointer", "-g"]
        ldflags += ["-fsanitize=" + san]
    return cflags, ldflags


CFLAGS, LDFLAGS = _flags()
FFI_SCRIPTS = sorted(glob.glob("pyivshmem/_build/ffi_*.py"))


def _core_sources():
    """The C core's sources, from the one list in csrc/core.mk."""
    with open(os.path.join(HERE, CSRC, "core.mk")) as f:
        for line in f:
            if line.startswith("CORE_SRCS"):
                return [os.path.join(CSRC, name) for name in line.split(":=", 1)[1].split()]
    raise RuntimeError("csrc/core.mk has no CORE_SRCS line")


CORE_SOURCES = _core_sources()


class BuildPy(build_py):
    """Ship the C core's headers inside the package (pyivshmem/include) for C programs."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "pyivshmem", "include")
        os.makedirs(dest, exist_ok=True)
        for h in glob.glob(os.path.join(HERE, CSRC, "*.h")):
            shutil.copy(h, dest)


ring_ext = Extension(
    "pyivshmem._ring",
    sources=["pyivshmem/_ring.pyx"] + CORE_SOURCES,
    include_dirs=[CSRC],
    extra_compile_args=CFLAGS,
    extra_link_args=LDFLAGS,
)


class BuildExt(build_ext):
    """Cythonize when extensions are built, not when setup.py is loaded: building the sdist (or
    the metadata) then neither runs Cython nor picks up a stale generated _ring.c."""

    def run(self):
        from Cython.Build import cythonize

        for ext in self.extensions:
            if any(src.endswith(".pyx") for src in ext.sources):
                # keep setuptools' own (finalized) Extension object; take only the C sources
                ext.sources = cythonize(
                    [ext],
                    compiler_directives={"language_level": "3", "boundscheck": False},
                )[0].sources
        super().run()


setup(
    ext_modules=[ring_ext],
    cffi_modules=[f"{p}:ffibuilder" for p in FFI_SCRIPTS],
    cmdclass={"build_py": BuildPy, "build_ext": BuildExt},
)
