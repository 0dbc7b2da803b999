"""The VM tests' view of pyivshmem's VM harness (pyivshmem/vm/harness.py, which the benchmark uses too).

Everything is re-exported from there; this module adds what only tests need: ``HERE`` (this folder,
where the helper scripts copied into guests live) and :func:`require_image`, which turns "cannot
boot a VM here" into a pytest skip (a failure with ``PYIVSHMEM_REQUIRE_VM=1``).

``python -m vm.harness build|smoke`` (from tests/) builds the cache and boots a trivial guest.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pyivshmem.vm import harness as vmh
from pyivshmem.vm.harness import (  # noqa: F401  (re-exported for the tests)
    BOOT_TIMEOUT, GUEST_HELPER, KERNEL_ARGS, MARK, VFIO_MODULES, Cpio, Image, Kernel, Message, Vm,
    VmError, VmUnavailable, cache_dir, ensure_image, ensure_kernel, ensure_python, ivshmem_doorbell,
    ivshmem_plain, kernel_package, main, package_cpio, package_dir, python_key, qemu_binary,
    script_cpio, unique_shm,
)

HERE = Path(__file__).resolve().parent


def require_image() -> vmh.Image:
    """For tests: the image, or pytest.skip with the reason (a failure if PYIVSHMEM_REQUIRE_VM=1)."""
    import pytest

    try:
        return ensure_image()
    except VmUnavailable as e:
        if os.environ.get("PYIVSHMEM_REQUIRE_VM") == "1":
            pytest.fail(f"PYIVSHMEM_REQUIRE_VM=1 but no VM can run here: {e}")
        pytest.skip(f"cannot boot a test VM: {e}")


if __name__ == "__main__":
    sys.exit(main())
