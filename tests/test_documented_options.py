"""Documented options that had no test of their own: Region.create(mode=), Region.from_fd(offset=),
Peer.connect(format_region=), PciDevice's registers, its polling fallback and unbind_vfio (on a
fake sysfs tree: no VM needed), `pyivshmem info`'s waiting flags, and `pyivshmem bench` flags."""
from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from _procwait import wait_until_in_wait
from test_vm_pci_sysfs import _config, _device

from pyivshmem import (
    Channel,
    ConfigError,
    PciDevice,
    Peer,
    Region,
    RegionFormatError,
    Server,
    WaitTimeout,
)

MiB = 1 << 20


# ------------------------------------------------------------------ Region.create(mode=)
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o660, 0o604])
def test_region_create_mode_sets_the_files_permissions(shm_path, mode):
    old = os.umask(0)  # the mode goes to open(2), so the umask applies as it would to any file
    try:
        with Region.create(shm_path, "64K", mode=mode):
            assert os.stat(shm_path).st_mode & 0o777 == mode
    finally:
        os.umask(old)


def test_region_create_mode_is_subject_to_the_umask(shm_path):
    old = os.umask(0o027)
    try:
        with Region.create(shm_path, "64K", mode=0o666):
            assert os.stat(shm_path).st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_region_create_mode_applies_to_new_files_only(shm_path):
    with Region.create(shm_path, "64K", mode=0o600):
        pass
    with Region.create(shm_path, "64K", exist_ok=True, mode=0o644) as r:  # opens what is there
        assert r.size == 64 << 10
    assert os.stat(shm_path).st_mode & 0o777 == 0o600


# ------------------------------------------------------------------ Region.from_fd(offset=)
def test_region_from_fd_offset_maps_from_that_offset():
    fd = os.memfd_create("pyivshmem-offset-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 2 * MiB)
        with Region.from_fd(fd, size=MiB, offset=MiB) as r:  # the second MiB only
            assert r.size == MiB
            r.create_ring("hi", slot_size=64, capacity=8).try_send(b"at offset 1 MiB")
        with mmap.mmap(fd, 2 * MiB) as mm:
            assert mm[:MiB] == bytes(MiB)  # the first MiB was never written
            assert mm[MiB:MiB + 8] != bytes(8)  # the header is at the offset
        with Region.from_fd(fd, size=MiB, offset=MiB, format_if_empty=False) as again:
            assert again.ring("hi").try_recv() == b"at offset 1 MiB"
        with pytest.raises(RegionFormatError):  # nothing at offset 0
            Region.from_fd(fd, size=MiB, offset=0, format_if_empty=False)
    finally:
        os.close(fd)


def test_region_from_fd_offset_must_be_page_aligned():
    fd = os.memfd_create("pyivshmem-offset-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 2 * MiB)
        with pytest.raises(ConfigError, match="page size"):
            Region.from_fd(fd, size=MiB, offset=100)
    finally:
        os.close(fd)


_PAST_THE_END = """
import os, sys
from pyivshmem import Region, IvshmemError
fd = os.memfd_create("t")
os.ftruncate(fd, 1 << 20)
try:
    r = Region.from_fd(fd, offset=1 << 20)  # size defaults to the file's: all of it past its end
    r.create_ring("x").try_send(b"x")
except IvshmemError as e:
    print("refused:", e)
    sys.exit(0)
sys.exit(3)
"""


def test_region_from_fd_refuses_a_range_past_the_end_of_the_file():
    """It used to map past the end of a regular file, and the process died of SIGBUS on first
    access instead of getting an error."""
    out = subprocess.run([sys.executable, "-c", _PAST_THE_END], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    assert "refused" in out.stdout


# ------------------------------------------------------------------ Peer.connect(format_region=)
@pytest.mark.timeout(60)
def test_peer_connect_format_region(tmp_path):
    sock = str(tmp_path / "s.sock")
    with Server(sock, size="1M", vectors=1) as server:
        server.start()
        # a fresh server's memory is all zeros: without format_region it is not a region
        with pytest.raises(RegionFormatError, match="not a pyivshmem region"):
            Peer.connect(sock, timeout=10, format_region=False)
        with Peer.connect(sock, timeout=10) as first:  # the default formats it
            assert first.region.info()["rings"] == 0
            first.region.create_ring("kept", slot_size=64, capacity=8).try_send(b"still here")
        # formatted memory is attached as it is, either way: nothing is lost
        with Peer.connect(sock, timeout=10, format_region=False) as p:
            assert p.region.ring("kept").try_recv() == b"still here"
        with Peer.connect(sock, timeout=10, format_region=True) as p:
            assert [r["name"] for r in p.region.rings()] == ["kept"]


# ------------------------------------------------------------------ PciDevice on a fake sysfs
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="PciDevice maps BARs only as root")


def _fake_device(root: Path, *, doorbell: bool, ivposition: int = 7, shm: int = 64 << 10) -> Path:
    bars = (256, 4096, shm) if doorbell else (256, 0, shm)
    d = _device(root, "0000:00:05.0", bars=bars,
                cfg=_config(msix_table_size=2 if doorbell else None))
    with open(d / "resource0", "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", ivposition))
    os.truncate(d / "resource2", shm)  # the fake BAR2 as large as the resource file says
    return d


@pytest.fixture
def sysfs(tmp_path):
    root = tmp_path / "sys"
    (root / "bus" / "pci" / "devices").mkdir(parents=True)
    return root


def _bar0(d: Path) -> bytes:
    return (d / "resource0").read_bytes()[:256]


@needs_root
def test_pci_read_and_write_register(sysfs):
    d = _fake_device(sysfs, doorbell=True, ivposition=7)
    with PciDevice.open(vfio=False, sysfs=str(sysfs)) as dev:
        assert dev.id == 7 and dev.read_register(0x08) == 7  # IVPosition
        dev.write_register(0x00, 0xFFFFFFFF)  # IntrMask
        dev.write_register(0x04, 0x12345678)
        assert dev.read_register(0x00) == 0xFFFFFFFF and dev.read_register(0x04) == 0x12345678
        assert struct.unpack_from("<II", _bar0(d), 0) == (0xFFFFFFFF, 0x12345678)
        # notify is one store of (peer << 16) | vector to the Doorbell register
        dev.notify(3, 1)
        assert struct.unpack_from("<I", _bar0(d), 0x0C)[0] == (3 << 16) | 1
        kind, addr, value = dev.notify_target(0x1234, 5)
        assert kind == 2 and value == (0x1234 << 16) | 5
        for bad in (2, 0x0D, 256, -4, 1.0):
            with pytest.raises(ConfigError, match="multiple of 4"):
                dev.read_register(bad)
            with pytest.raises(ConfigError, match="multiple of 4"):
                dev.write_register(bad, 1)
        with pytest.raises(ConfigError, match="32 bits"):
            dev.write_register(0x00, 1 << 32)
        with pytest.raises(ConfigError, match="32 bits"):
            dev.write_register(0x00, -1)
        assert struct.unpack_from("<I", _bar0(d), 0)[0] == 0xFFFFFFFF  # refused: unchanged


@needs_root
def test_pci_plain_device_notify_writes_nothing(sysfs):
    d = _fake_device(sysfs, doorbell=False)
    with PciDevice.open(vfio=False, sysfs=str(sysfs)) as dev:
        assert dev.flavour == "plain"
        dev.notify(3, 1)
        assert dev.notify_target(3, 1) is None
        assert struct.unpack_from("<I", _bar0(d), 0x0C)[0] == 0


@needs_root
@pytest.mark.timeout(60)
def test_pci_polling_fallback_without_interrupts(sysfs):
    """A doorbell device opened without VFIO has no interrupts: wait() returns [] after at most
    poll_interval, fileno() is a timer firing every poll_interval, vector_fd() is None, and a
    Channel over it polls shared memory instead of sleeping on a doorbell."""
    import select

    _fake_device(sysfs, doorbell=True)
    with pytest.warns(RuntimeWarning, match="no interrupts without VFIO.*polling every 20 ms"):
        dev = PciDevice.open(sysfs=str(sysfs), poll_interval=0.02)  # vfio="auto", no IOMMU
    with dev:
        assert not dev.uses_vfio and not dev.interrupts
        assert dev.vector_fd(0) is None
        assert dev.wait(0) == [] and dev.wait(30) == []  # bounded by poll_interval, not 30 s
        assert select.select([dev.fileno()], [], [], 30)[0], "the polling timer never fired"
        region = dev.region  # BAR2, formatted on first use
        rx = Channel(region.create_ring("poll", slot_size=64, capacity=8), dev, spin=0,
                     recheck=0.02)
        assert rx.fileno() == -1  # nothing to sleep on: it polls
        with pytest.raises(WaitTimeout):
            rx.recv(timeout=0.05)
        me = threading.get_native_id()
        producer = region.ring("poll")

        def send_once_receiver_waits():
            # a polling Channel sleeps its back-off in ppoll, on its cancel fds (close wakes it)
            wait_until_in_wait(os.getpid(), me, what="the polling receiver's sleep")
            producer.try_send(b"found by polling")

        t = threading.Thread(target=send_once_receiver_waits, daemon=True)
        t.start()
        assert rx.recv(timeout=30) == b"found by polling"
        t.join(30)
        region.close()


@needs_root
def test_pci_unbind_vfio(sysfs):
    d = _fake_device(sysfs, doorbell=True)
    drivers = sysfs / "bus" / "pci" / "drivers"
    (drivers / "vfio-pci").mkdir(parents=True)
    (drivers / "vfio-pci" / "unbind").write_text("")
    os.symlink(drivers / "vfio-pci", d / "driver")
    (d / "driver_override").write_text("vfio-pci")
    PciDevice.unbind_vfio("00:05.0", sysfs=str(sysfs))  # short address form accepted
    assert (drivers / "vfio-pci" / "unbind").read_text() == "0000:00:05.0"
    assert (d / "driver_override").read_text() == "\n"
    # bound to another driver: that driver is left alone, only the override is cleared
    os.unlink(d / "driver")
    (drivers / "ivshmem").mkdir()
    (drivers / "ivshmem" / "unbind").write_text("")
    os.symlink(drivers / "ivshmem", d / "driver")
    (d / "driver_override").write_text("vfio-pci")
    PciDevice.unbind_vfio("0000:00:05.0", sysfs=str(sysfs))
    assert (drivers / "ivshmem" / "unbind").read_text() == ""
    assert (d / "driver_override").read_text() == "\n"


# ------------------------------------------------------------------ pyivshmem info: waiting flags
def _info(path):
    out = subprocess.run([sys.executable, "-m", "pyivshmem", "info", "--json", path],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {r["name"]: r for r in json.loads(out.stdout)["rings"]}


def _table_row(path, name):
    out = subprocess.run([sys.executable, "-m", "pyivshmem", "info", path],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (row,) = [line.split() for line in out.stdout.splitlines() if line.split()[:1] == [name]]
    return row  # name kind slots slot-size queued fill prod-wait cons-wait


@pytest.mark.timeout(120)
def test_info_shows_who_is_waiting(shm_path):
    from _fdbell import FdBell, close_fds, make_fds

    fds = make_fds([0, 1])
    try:
        with Region.create(shm_path, "1M") as region:
            ring = region.create_ring("w", slot_size=16, capacity=2)
            rx = Channel(ring, FdBell(0, fds), spin=0, recheck=60)
            tx = Channel(region.ring("w"), FdBell(1, fds), spin=0, recheck=60)
            assert (_info(shm_path)["w"]["producers_waiting"],
                    _info(shm_path)["w"]["consumers_waiting"]) == (0, 0)
            # a consumer asleep on the empty ring
            got = []
            t = threading.Thread(target=lambda: got.append(rx.recv(timeout=60)), daemon=True)
            t.start()
            wait_until_in_wait(os.getpid(), t.native_id, what="the consumer's sleep")
            w = _info(shm_path)["w"]
            assert (w["producers_waiting"], w["consumers_waiting"]) == (0, 1)
            assert _table_row(shm_path, "w")[-2:] == ["0", "1"]
            tx.send(b"wake", timeout=10)
            t.join(30)
            assert got == [b"wake"]
            assert _info(shm_path)["w"]["consumers_waiting"] == 0
            # a producer asleep on the full ring
            assert tx.try_send(b"1") and tx.try_send(b"2")
            t = threading.Thread(target=tx.send, args=(b"3",), kwargs={"timeout": 60},
                                 daemon=True)
            t.start()
            wait_until_in_wait(os.getpid(), t.native_id, what="the producer's sleep")
            w = _info(shm_path)["w"]
            assert (w["producers_waiting"], w["consumers_waiting"]) == (1, 0)
            assert w["count"] == 2
            assert _table_row(shm_path, "w")[-4:] == ["2", "100%", "1", "0"]
            assert rx.recv(timeout=10) == b"1"
            t.join(30)
            assert not t.is_alive()
            w = _info(shm_path)["w"]
            assert (w["producers_waiting"], w["consumers_waiting"]) == (0, 0)
    finally:
        close_fds(fds)


# ------------------------------------------------------------------ pyivshmem bench flags
@pytest.mark.timeout(240)
def test_bench_flags_are_applied(tmp_path, capsys):
    """--rtt-size, --repeat, --batch, --duration, --placement and --cpus (the flags no other test
    passes) reach the run: checked on what it records, never on how fast it was."""
    from pyivshmem import bench
    from pyivshmem.bench import report
    from pyivshmem.bench.workers import usable_cpus

    cpu = usable_cpus()[0]
    out = tmp_path / "r.json"
    argv = ["--quick", "--scenarios", "roundtrip,throughput", "--sizes", "64", "--peers", "none",
            "--rtt-size", "128", "--rtt-samples", "50", "--rtt-seconds", "0.1", "--repeat", "2",
            "--batch", "8", "--duration", "0.05", "--placement", "same", "--cpus", str(cpu),
            "--json", str(out), "--quiet"]
    assert bench.main(argv) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    report.validate(doc)
    s = doc["settings"]
    assert (s["rtt_size"], s["repeat"], s["batch"], s["duration"], s["placement"], s["cpus"]) == \
        (128, 2, 8, 0.05, "same", [cpu])
    assert s["count"] is None  # trials are sized from --duration
    recs = doc["records"]
    rtt = [r for r in recs if r["scenario"] == "roundtrip"]
    assert rtt and all(r["size"] == 128 for r in rtt)  # --rtt-size
    assert all(r["placement"] == "same" and r["cpus"] == [cpu, cpu] for r in recs)
    ran = [r for r in recs if r["scenario"] == "throughput" and r["status"] == "ok"]
    assert ran and all(len(r["throughput"]["trials"]) == 2 for r in ran)  # --repeat
    assert all(r["throughput"]["messages_per_trial"] > 0 for r in ran)
    batch = [r for r in recs if r["method"] == "batch"]
    assert batch and all(r["batch"] == 8 and "x8" in r["variant"] for r in batch)  # --batch
    # one CPU: busy-polling variants are skipped with the reason, never run
    busy = [r for r in recs if r["mode"] == "busy-poll"]
    assert busy and all(r["status"] == "skipped" and "different CPUs" in r["note"] for r in busy)


@pytest.mark.parametrize("argv, message", [
    (["--cpus", "0,1,2"], "one or two CPU numbers"),
    (["--cpus", "x"], "use A,B"),
    (["--placement", "far"], "invalid choice"),
    (["--repeat", "0"], ""),
    (["--duration", "-1"], ""),
    (["--batch", "0"], ""),
])
def test_bench_flag_errors(argv, message, capsys):
    from pyivshmem import bench

    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert argv[0] in err and message in err
