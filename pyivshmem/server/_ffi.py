"""The server's cffi module (pyivshmem._ffi_server), with a message that says how to build it."""
from __future__ import annotations

try:
    from .._ffi_server import ffi, lib  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "pyivshmem._ffi_server is not built: run `python setup.py build_ext --inplace` "
        "in the source tree, or install the package"
    ) from exc

__all__ = ["ffi", "lib"]
