"""Test harness that boots QEMU guests running pyivshmem (see harness.py)."""
