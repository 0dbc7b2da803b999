"""Live migration of a guest that receives a stream through a ring in ivshmem-plain memory.

Source and destination QEMU run on this machine, each with its own ``memory-backend-file``
(share=on) and ``ivshmem-plain,master=on`` (without master=on QEMU refuses to migrate an ivshmem
device): QEMU copies the shared memory to the destination with the guest's RAM. QEMU's dirty
tracking sees only the guest's writes, so the host process stops writing when the migration starts
(a write after its page was sent would be lost) and goes on in the destination's memory once it
has completed. The guest keeps receiving throughout (from what the ring held) and its program
never notices: every message arrives exactly once, in order. One boot (and one incoming QEMU).

Not used: one file for both QEMUs. The destination writes the copied pages into its memory while
the source guest still runs, so a shared file would roll the source's ring positions back
(duplicates), and ``x-ignore-shared`` (do not copy shared memory) fails in QEMU 7.2 for an ivshmem
BAR ("Mismatched GPAs for block ...": the BAR is not mapped yet on the destination).
"""
from __future__ import annotations

import contextlib
import os
import socket
import time

import pytest

from pyivshmem import Region

from vm import harness

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.timeout(420)]

SIZE = 1 << 20

GUEST = r"""
import os
import vmguest
from pyivshmem import PciDevice

N, AT = int(os.environ["N"]), int(os.environ["AT"])
got = []
with PciDevice.open(vfio=False) as dev:
    ring = dev.region.ring("h2g")
    vmguest.stage("open")
    while len(got) < N:
        m = ring.recv(timeout=240)
        got.append(int.from_bytes(m[:4], "little"))
        if len(got) == AT:
            vmguest.stage("midway", received=len(got))
    extra = ring.try_recv()
    del ring
vmguest.result(n=len(got), in_order=got == list(range(N)), extra=extra is not None)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_migration_master_on_during_a_stream(tmp_path):
    image = harness.require_image()
    shm, shm_dst = harness.unique_shm(), harness.unique_shm()
    n, at = 4000, 300
    msgs = [i.to_bytes(4, "little") + os.urandom(1 + i % 60) for i in range(n)]
    devices = harness.ivshmem_plain(shm, SIZE, extra=",master=on")
    with open(shm_dst, "wb") as f:
        f.truncate(SIZE)    # the destination's memory: QEMU fills it with the source's
    port = _free_port()
    try:
        with contextlib.ExitStack() as stack, Region.create(shm, SIZE) as region:
            ring = region.create_ring("h2g", "spsc", slot_size=128, capacity=64)
            sent = 0

            def pump(until, what, timeout, vm, limit=n):
                nonlocal sent
                end = time.monotonic() + timeout
                while True:
                    r = until()
                    if r:
                        return r
                    if time.monotonic() > end:
                        raise vm.fail(f"no {what} within {timeout:.0f}s (sent {sent})")
                    moved = False
                    while sent < limit and ring.try_send(msgs[sent]):
                        sent += 1
                        moved = True
                    if not moved:
                        time.sleep(0.001)

            def staged(vm, name):
                return lambda: any(m.tag == "stage" and m.json()["name"] == name for m in vm.messages())

            env = {"N": str(n), "AT": str(at)}
            with harness.Vm(GUEST, devices, workdir=tmp_path, image=image, iommu=False, qmp=True,
                            env=env, name="src") as src, \
                    harness.Vm(GUEST, harness.ivshmem_plain(shm_dst, SIZE, extra=",master=on"), workdir=tmp_path, image=image, iommu=False,
                               qmp=True, env=env, name="dst", accel=src.accel,
                               extra_args=["-incoming", f"tcp:127.0.0.1:{port}"]) as dst:
                pump(staged(src, "midway"), "midway", harness.BOOT_TIMEOUT, src)
                dst.qmp("query-status")      # the destination is listening
                src.qmp("migrate", uri=f"tcp:127.0.0.1:{port}")
                sent_at_start = sent

                def done():
                    st = src.qmp("query-migrate").get("status")
                    if st in ("failed", "cancelled"):
                        raise src.fail(f"migration {st}: {src.qmp('query-migrate')}")
                    return st == "completed"

                # the host writes nothing while QEMU copies the memory
                pump(done, "the end of the migration", 240, src, limit=sent)
                sent_at_switch = sent
                received_by_src = [m.json()["received"] for m in src.messages()
                                   if m.tag == "stage" and m.json()["name"] == "midway"]
                # the destination runs the guest now; the source stays paused
                assert dst.qmp("query-status")["status"] == "running"
                assert src.qmp("query-status")["status"] == "postmigrate"
                src.kill()
                # go on in the destination's copy, where the ring's positions came along
                ring = None
                region.close()
                dregion = stack.enter_context(Region.open(shm_dst))
                ring = dregion.ring("h2g")
                pump(lambda: sent >= n, "the end of the stream", 240, dst)
                res = dst.result(timeout=240)
        # the stream really ran during the migration, and went on after it
        assert sent_at_start == sent_at_switch < n and received_by_src == [at]
        assert res == {"n": n, "in_order": True, "extra": False}
    finally:
        for p in (shm, shm_dst):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
