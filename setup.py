"""Build of pyivshmem: one Cython extension (the ring hot path) and cffi API-mode modules.

Environment switches:
  PYIVSHMEM_DEBUG=1      -O0 -g, assertions on
  PYIVSHMEM_SANITIZE=address,undefined | thread   compile and link with those sanitizers
Each cffi module is described by a script pyivshmem/_build/ffi_*.py defining `ffibuilder`; the
csrc/*.c files those scripts name are compiled into their cffi modules, and every other csrc/*.c
(the C core: region, rings, ...) into the Cython extension, so a new core file needs no change here.
What the sdist carries is MANIFEST.in's business (docs/release.md).
"""
import glob
import os
import re
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


def _cffi_sources():
    """The csrc/*.c file names that some cffi build script compiles (each names its sources as
    string literals, e.g. "ivshm_doorbell.c")."""
    names = set()
    for script in FFI_SCRIPTS:
        with open(script, encoding="utf-8") as f:
            names.update(re.findall(r"""["']([\w.-]+\.c)["']""", f.read()))
    missing = sorted(n for n in names if not os.path.exists(os.path.join(CSRC, n)))
    if not FFI_SCRIPTS or not names or missing:
        raise SystemExit(
            f"setup.py: cannot tell the cffi modules' C sources from the core's (build scripts "
            f"{FFI_SCRIPTS}, sources named {sorted(names)}, missing from {CSRC}/: {missing}); "
            f"is this a complete source tree or sdist?")
    return names


CFFI_SOURCES = _cffi_sources()
CORE_SOURCES = sorted(
    f for f in glob.glob(os.path.join(CSRC, "*.c")) if os.path.basename(f) not in CFFI_SOURCES
)


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
