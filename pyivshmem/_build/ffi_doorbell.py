"""cffi build script for pyivshmem._ffi_doorbell: doorbells (eventfds, the epoll wait loop, the bell
table), and the client side of the ivshmem server protocol (csrc/ivshm_doorbell.c,
csrc/ivshm_peer.c)."""
import os
import runpy
import types

from cffi import FFI


# pyivshmem/_build/__init__.py run by path: importing the pyivshmem package would need the
# extension modules this build is about to produce
_helpers = types.SimpleNamespace(**runpy.run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "__init__.py")))
CSRC, compile_flags = _helpers.CSRC, _helpers.compile_flags

ffibuilder = FFI()
# the declarations come from the headers themselves (never a copy): the constants' values and the
# structs' layouts are the compiled ones
ffibuilder.cdef(_helpers.cdef_from_header("ivshm_doorbell.h")
                + _helpers.cdef_from_header("ivshm_peer.h")
                + _helpers.cdef_from_header("ivshm_bench_ref.h"))

_cflags, _ldflags = compile_flags()
ffibuilder.set_source(
    "pyivshmem._ffi_doorbell",
    '#include "ivshm_doorbell.h"\n#include "ivshm_peer.h"\n#include "ivshm_bench_ref.h"\n',
    # relative paths: setuptools refuses absolute ones when building a wheel
    sources=[os.path.relpath(os.path.join(CSRC, f))
             for f in ("ivshm_doorbell.c", "ivshm_peer.c", "ivshm_bench_ref.c")],
    include_dirs=[CSRC],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
