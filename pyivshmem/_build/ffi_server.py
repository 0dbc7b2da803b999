"""cffi (API mode, out-of-line) build of pyivshmem._ffi_server: the server's send side, and the
protocol and layout constants the server needs (from csrc/ivshm_peer.h and csrc/ivshm_layout.h)."""
import os
import runpy
import types

from cffi import FFI


# pyivshmem/_build/__init__.py run by path: importing the pyivshmem package would need the
# extension modules this build is about to produce
_helpers = types.SimpleNamespace(**runpy.run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "__init__.py")))
CSRC = _helpers.CSRC
compile_flags = _helpers.compile_flags

ffibuilder = FFI()
# from the headers themselves, never a copy
ffibuilder.cdef(_helpers.cdef_from_header("ivshm_server.h")
                + _helpers.cdef_from_header("ivshm_peer.h", defines=[
                    "IVSHM_PROTO_VERSION", "IVSHM_PROTO_MAX_ID", "IVSHM_PROTO_MAX_VECTORS"])
                + _helpers.cdef_from_header("ivshm_layout.h", defines=[
                    "IVSHM_MAGIC", "IVSHM_MAGIC_FORMATTING", "IVSHM_HDR_SIZE"]))
_cflags, _ldflags = compile_flags()
ffibuilder.set_source(
    "pyivshmem._ffi_server",
    # the protocol's and the layout's constants come from the headers, not from copies
    '#include "ivshm_server.h"\n#include "ivshm_peer.h"\n#include "ivshm_layout.h"\n',
    # relative: setuptools refuses absolute source paths (cffi runs this from setup.py's dir)
    sources=[os.path.relpath(os.path.join(CSRC, "ivshm_server.c"))],
    include_dirs=[CSRC],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
