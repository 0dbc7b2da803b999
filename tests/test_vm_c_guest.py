"""The C core inside a guest, with no Python involved on the guest's data path: examples/c/ring_echo.c,
built on the host against csrc/, maps BAR2 of an ivshmem-plain device (sysfs resource2) and echoes
what a host Python process sends through SPSC rings. Needs qemu-system-x86_64 and a C compiler, and
the source tree (skips otherwise)."""
from __future__ import annotations

import time

import pytest

from _csrc import build_example
from vm import harness

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.timeout(240)]

SHM_SIZE = 1 << 20


@pytest.fixture
def ring_echo(tmp_path):
    with open(build_example("ring_echo", tmp_path, static=True), "rb") as f:
        return f.read()


C_GUEST = r"""
import os, subprocess
import vmguest

(bdf,) = vmguest.find_devices()
os.chmod("/test/ring_echo", 0o755)
p = subprocess.run(["/test/ring_echo", f"/sys/bus/pci/devices/{bdf}/resource2", "in", "out"],
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
vmguest.result(rc=p.returncode, output=p.stdout)
"""


def test_c_ring_echo_in_guest(image, ring_echo, tmp_path):
    from pyivshmem import Region

    shm = harness.unique_shm()
    try:
        with Region.create(shm, SHM_SIZE) as region:
            with harness.Vm(C_GUEST, harness.ivshmem_plain(shm, SHM_SIZE), workdir=tmp_path, iommu=False,
                            image=image, files={"ring_echo": ring_echo}) as vm:
                deadline = time.monotonic() + harness.BOOT_TIMEOUT
                while True:  # the C program creates the rings once it runs
                    try:
                        ring_in, ring_out = region.ring("in"), region.ring("out")
                        break
                    except KeyError:
                        if time.monotonic() > deadline or (vm.proc and vm.proc.poll() is not None):
                            raise vm.fail("ring_echo never created its rings") from None
                        time.sleep(0.05)
                msgs = [i.to_bytes(4, "little") + bytes([i % 251]) * (i % 60) for i in range(1000)]
                got = []
                sent = 0
                deadline = time.monotonic() + 120
                while len(got) < len(msgs):
                    if time.monotonic() > deadline:
                        raise vm.fail(f"only {len(got)} echoes")
                    while sent < len(msgs) and ring_in.try_send(msgs[sent]):
                        sent += 1
                    m = ring_out.try_recv()
                    if m is None:
                        time.sleep(0.0005)
                    else:
                        got.append(m)
                while not ring_in.try_send(b"quit"):
                    time.sleep(0.001)
                res = vm.result(timeout=120)
    finally:
        shm.unlink(missing_ok=True)
    assert got == [m[::-1] for m in msgs]
    assert res["rc"] == 0, res["output"]
    assert "ready" in res["output"] and "answered 1000" in res["output"]
