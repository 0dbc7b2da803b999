"""cffi build script (API mode, out-of-line) for pyivshmem._ffi_vfio: csrc/ivshm_vfio.c.

The guest side of an ivshmem PCI device: VFIO ioctls, BAR0 register access, the polling timer.
"""
import os
import runpy
import types

from cffi import FFI


# pyivshmem/_build/__init__.py run by path: importing the pyivshmem package would need the
# extension modules this build is about to produce
_b = types.SimpleNamespace(**runpy.run_path(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "__init__.py")))
_cflags, _ldflags = _b.compile_flags()

ffibuilder = FFI()
# from the header itself, never a copy
ffibuilder.cdef(_b.cdef_from_header("ivshm_vfio.h"))
ffibuilder.set_source(
    "pyivshmem._ffi_vfio",
    '#include "ivshm_vfio.h"\n',
    sources=[os.path.join(_b.CSRC, "ivshm_vfio.c")],
    include_dirs=[_b.CSRC],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
