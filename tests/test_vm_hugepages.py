"""Regions, server memory and a guest's ivshmem-plain memory on hugetlbfs.

Each test mounts its own hugetlbfs and reserves huge pages as root (``/proc/sys/vm/nr_hugepages``),
putting the pool back as it was afterwards; it skips with the kernel's own answer only where the
kernel refuses (not root, no hugetlbfs, no pages to give). Tests that touch the pool hold a lock
file, so two of them never fight over it. Only the last test boots a guest.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyivshmem import ConfigError, IvshmemError, Peer, Region, SystemCallError

NR = Path("/proc/sys/vm/nr_hugepages")
LOCK = Path("/tmp/pyivshmem-hugepages.lock")
PAGES = 64


def _huge_page_size() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture
def hugetlbfs(tmp_path):
    """(mount point, huge page size) of a fresh hugetlbfs with at least PAGES free huge pages."""
    if os.geteuid() != 0:
        pytest.skip("needs root: reserving huge pages and mounting hugetlbfs are root's")
    huge = _huge_page_size()
    if not huge or not NR.exists():
        pytest.skip("this kernel has no hugetlbfs support (no Hugepagesize in /proc/meminfo)")
    free_path = Path(f"/sys/kernel/mm/hugepages/hugepages-{huge >> 10}kB/free_hugepages")
    LOCK.touch(exist_ok=True)
    with open(LOCK) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = int(NR.read_text())
        free = int(free_path.read_text())
        want = old + max(0, PAGES - free)
        mnt = tmp_path / "huge"
        mnt.mkdir()
        mounted = False
        try:
            if want != old:
                try:
                    NR.write_text(f"{want}\n")
                except OSError as e:
                    pytest.skip(f"the kernel refused to reserve huge pages: {e.strerror}")
            free = int(free_path.read_text())
            if free < PAGES:
                pytest.skip(f"the kernel reserved only {free} free huge pages of the {PAGES} asked "
                            f"(nr_hugepages {int(NR.read_text())}): not enough contiguous memory")
            r = subprocess.run(["mount", "-t", "hugetlbfs", "none", str(mnt)],
                               capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                pytest.skip(f"the kernel refused to mount hugetlbfs: {r.stderr.strip()}")
            mounted = True
            yield mnt, huge
        finally:
            if mounted:
                subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
            if int(NR.read_text()) != old:
                NR.write_text(f"{old}\n")


@pytest.mark.timeout(60)
def test_region_on_hugetlbfs_rings_work_and_sizes_follow_the_page_size(hugetlbfs):
    mnt, huge = hugetlbfs
    # smaller than a huge page: refused before anything is created, with the size to use
    with pytest.raises(ConfigError, match=f"multiple of the huge page size.*size={huge}"):
        Region.create(mnt / "small", huge // 2)
    assert not (mnt / "small").exists()
    size = 2 * huge
    with Region.create(mnt / "r", size) as region:
        assert region.size == size
        # the mapping really is huge pages
        assert os.fstatvfs(region.fileno()).f_bsize == huge
        ring = region.create_ring("q", "spsc", slot_size=128, capacity=64)
        msgs = [os.urandom(1 + i % 100) for i in range(200)]
        got = []
        for m in msgs:
            ring.send(m, timeout=5)
            got.append(ring.recv(timeout=5))
        assert got == msgs
        # a second process-view of the same file sees the same region
        with Region.open(mnt / "r") as again:
            assert again.generation == region.generation
            assert again.ring("q").try_recv() is None


@pytest.mark.timeout(60)
def test_region_on_hugetlbfs_without_enough_pages_says_how_to_reserve_them(hugetlbfs):
    mnt, huge = hugetlbfs
    free = int(Path(f"/sys/kernel/mm/hugepages/hugepages-{huge >> 10}kB/free_hugepages").read_text())
    size = huge
    while size <= free * huge:
        size <<= 1
    with pytest.raises(SystemCallError) as ei:
        Region.create(mnt / "big", size)
    assert ei.value.errno in (errno.ENOMEM, errno.ENOSPC)
    text = str(ei.value)
    assert "not enough free huge pages" in text and "/proc/sys/vm/nr_hugepages" in text
    assert isinstance(ei.value, IvshmemError)
    # the half-made file is removed
    assert not (mnt / "big").exists()


def _server_exe() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "pyivshmem-server")
    if not os.path.exists(exe):
        pytest.skip(f"pyivshmem-server is not installed next to {sys.executable}")
    return exe


@pytest.mark.timeout(90)
def test_server_serves_memory_from_a_hugetlbfs_mount(hugetlbfs, tmp_path):
    mnt, huge = hugetlbfs
    sock = str(tmp_path / "s.sock")
    # 1M asked: hugetlbfs only takes whole huge pages, so the server grows it to one
    proc = subprocess.Popen([_server_exe(), "-F", "-S", sock, "-m", str(mnt), "-l", "1M", "-n", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server made no socket within 30 s"
            time.sleep(0.05)
        with Peer.connect(sock, vectors=1, timeout=10) as a, Peer.connect(sock, vectors=1, timeout=10) as b:
            assert a.region.size == huge
            assert os.fstatvfs(a.region.fileno()).f_bsize == huge
            # the served file is unnamed: nothing is left in the mount
            assert os.listdir(mnt) == []
            ra = a.region.create_ring("x", "spsc", slot_size=64, capacity=16)
            rb = b.region.ring("x")
            ra.send(b"over huge pages", timeout=5)
            assert rb.recv(timeout=5) == b"over huge pages"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stderr.close()


GUEST = r"""
import hashlib, os
import vmguest
from pyivshmem import PciDevice

N = int(os.environ["N"])
with PciDevice.open(vfio=False) as dev:
    region = dev.region
    h2g, g2h = region.ring("h2g"), region.ring("g2h")
    vmguest.stage("attached", size=region.size, generation=region.generation)
    digest = hashlib.sha256()
    for i in range(N):
        msg = h2g.recv(timeout=60)
        if int.from_bytes(msg[:4], "little") != i:
            raise AssertionError(f"message {i} carried {int.from_bytes(msg[:4], 'little')}")
        digest.update(msg)
        g2h.send(msg[::-1], timeout=60)
    vmguest.result(received=N, digest=digest.hexdigest(), extra=h2g.try_recv() is not None)
"""


@pytest.mark.vm
@pytest.mark.qemu
@pytest.mark.timeout(300)
def test_guest_ivshmem_plain_memory_on_hugetlbfs(hugetlbfs, tmp_path):
    """A guest whose ivshmem-plain memory is a memory-backend-file on hugetlbfs exchanges
    messages with a host process through rings in it."""
    from vm import harness

    image = harness.require_image()
    mnt, huge = hugetlbfs
    size = 2 * huge
    path = mnt / "guest-mem"
    n = 500
    msgs = [i.to_bytes(4, "little") + os.urandom(1 + i % 120) for i in range(n)]
    with Region.create(path, size) as region:
        h2g = region.create_ring("h2g", "spsc", slot_size=256, capacity=64)
        g2h = region.create_ring("g2h", "spsc", slot_size=256, capacity=64)
        with harness.Vm(GUEST, harness.ivshmem_plain(path, size), workdir=tmp_path, iommu=False,
                        image=image, env={"N": str(n)}) as vm:
            att = vm.wait_for("stage", timeout=harness.BOOT_TIMEOUT).json()
            assert att["size"] == size and att["generation"] == region.generation
            got, sent = [], 0
            deadline = time.monotonic() + 180
            while len(got) < n:
                if time.monotonic() > deadline:
                    raise vm.fail(f"only {len(got)}/{n} replies (sent {sent})")
                progressed = False
                while sent < n and h2g.try_send(msgs[sent]):
                    sent += 1
                    progressed = True
                m = g2h.try_recv()
                while m is not None:
                    got.append(m)
                    progressed = True
                    m = g2h.try_recv()
                if not progressed:
                    if vm.proc and vm.proc.poll() is not None:
                        raise vm.fail("QEMU ended early")
                    time.sleep(0.0005)
            res = vm.result(timeout=60)
    assert res["received"] == n and res["extra"] is False
    assert res["digest"] == hashlib.sha256(b"".join(msgs)).hexdigest()
    assert got == [m[::-1] for m in msgs]
