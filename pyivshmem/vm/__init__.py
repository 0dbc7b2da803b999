"""Throw-away QEMU guests for the VM tests and the host-guest benchmarks (not a stable API).

:mod:`.harness` runs on the host: builds the cached guest image, boots guests with ivshmem devices,
and reads their results (errors: :class:`~.harness.VmError`, an IvshmemError).  :mod:`.guest` runs
inside the guest, importable there as ``vmguest``.  Nothing imports this package at run time except
``pyivshmem bench --topology host-guest|guest-guest``.

``python -m pyivshmem.vm build|smoke|probe`` builds the cache, boots one trivial guest, or says
which accelerator guests would run under.
"""
