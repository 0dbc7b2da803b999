"""A host publisher with a guest subscriber: examples/c/pubsub_fanout.c, built on the host against
csrc/, subscribes inside a QEMU guest through BAR2 of an ivshmem-plain device (sysfs resource2),
beside a subscriber process on the host; the host's Python publisher streams to both.  The guest
lives in another pid namespace (another boot), so the publisher can only judge it by its progress.
Needs qemu-system-x86_64 and a C compiler, and the source tree (skips otherwise)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from _csrc import build_example
from vm import harness

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.timeout(300)]

SHM_SIZE = 1 << 20
TOTAL = 20_000
SLOW = 120  # seconds: a guest under software emulation can be descheduled for long


@pytest.fixture
def fanout(tmp_path):
    with open(build_example("pubsub_fanout", tmp_path, static=True), "rb") as f:
        return f.read()


GUEST = r"""
import os, subprocess
import vmguest

(bdf,) = vmguest.find_devices()
os.chmod("/test/pubsub_fanout", 0o755)
p = subprocess.run(["/test/pubsub_fanout", f"/sys/bus/pci/devices/{bdf}/resource2", "fan", "sub",
                    "%d", "%d"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                   timeout=240)
vmguest.result(rc=p.returncode, output=p.stdout)
""" % (TOTAL, SLOW)


def test_host_publisher_guest_subscriber(image, fanout, tmp_path):
    from pyivshmem import Region

    shm = harness.unique_shm()
    host_sub = None
    try:
        with Region.create(shm, SHM_SIZE) as region:
            ring = region.create_ring("fan", kind="pubsub", slot_size=8, capacity=4096,
                                      slow="block", slow_timeout=SLOW)
            host_sub = subprocess.Popen(
                [sys.executable, os.path.join(os.path.dirname(__file__), "test_pubsub_stream.py"),
                 str(shm), "fan", "all", str(TOTAL)], stdout=subprocess.PIPE, text=True)
            assert host_sub.stdout.readline().split() == ["ready", "0"]
            with harness.Vm(GUEST, harness.ivshmem_plain(shm, SHM_SIZE), workdir=tmp_path,
                            iommu=False, image=image, files={"pubsub_fanout": fanout}) as vm:
                deadline = time.monotonic() + harness.BOOT_TIMEOUT
                while len(ring.subscribers()) < 2:  # the guest's subscriber joins once it runs
                    if time.monotonic() > deadline or (vm.proc and vm.proc.poll() is not None):
                        raise vm.fail("the guest's subscriber never joined")
                    time.sleep(0.05)
                guest = [s for s in ring.subscribers() if not s["same_host"]]
                assert len(guest) == 1 and guest[0]["joined_at"] == 0
                for lo in range(0, TOTAL, 1000):
                    msgs = [i.to_bytes(8, "little") for i in range(lo, lo + 1000)]
                    assert ring.send_many(msgs, timeout=200) == len(msgs), ring.subscribers()
                res = vm.result(timeout=200)
            host = json.loads(host_sub.stdout.readline())
            assert host_sub.wait(30) == 0
            assert ring.stats["cuts"] == 0
            ring.close()
    finally:
        if host_sub is not None:
            if host_sub.poll() is None:
                host_sub.kill()
                host_sub.wait()
            host_sub.stdout.close()
        shm.unlink(missing_ok=True)
    assert res["rc"] == 0, res["output"]
    assert "ready 0" in res["output"] and f"received {TOTAL} in order" in res["output"]
    assert "error" not in host and host["received"] == TOTAL
