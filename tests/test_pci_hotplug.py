"""Hot-unplug seen by a guest PciDevice opened through sysfs, on a fake sysfs tree (no VM):
``present`` turns False when the device's directory disappears, calls then raise DeviceGoneError,
rings on its region raise ClosedError, and ``PciDevice.wait_for`` finds a device or times out.
The real thing, with QEMU's device_del/device_add, is tests/test_vm_hotplug.py."""
from __future__ import annotations

import errno
import os
import shutil
import threading

import pytest

from pyivshmem import (Channel, ClosedError, DeviceError, DeviceGoneError, PciDevice, Region,
                       WaitTimeout)

from _procwait import is_open, thread_native_id, wait_until_in_wait
from test_documented_options import _fake_device, needs_root


@pytest.fixture
def sysfs(tmp_path):
    root = tmp_path / "sys"
    (root / "bus" / "pci" / "devices").mkdir(parents=True)
    return root


@needs_root
def test_removed_device_raises_device_gone_and_releases_its_region(sysfs):
    d = _fake_device(sysfs, doorbell=True)
    dev = PciDevice.open(vfio=False, sysfs=str(sysfs))
    ring = dev.region.create_ring("r", slot_size=64, capacity=8)
    assert dev.present
    dev.check()
    shutil.rmtree(d)                          # what the kernel does on hot-unplug
    assert dev.present is False
    with pytest.raises(DeviceGoneError) as ei:
        dev.read_register(8)
    assert isinstance(ei.value, DeviceError) and ei.value.errno == errno.ENODEV
    assert "is gone" in str(ei.value) and "PciDevice.wait_for" in str(ei.value)
    for call in (lambda: dev.notify(1, 0), lambda: dev.wait(0), dev.check, lambda: dev.region):
        with pytest.raises(DeviceGoneError):
            call()
    with pytest.raises(ClosedError):          # the region over BAR2 was released
        ring.try_send(b"x")
    dev.close()
    assert dev.closed
    with pytest.raises(ClosedError):
        dev.read_register(8)


@needs_root
def test_wait_polls_and_notices_the_removal(sysfs):
    d = _fake_device(sysfs, doorbell=True)
    with PciDevice.open(vfio=False, sysfs=str(sysfs), poll_interval=0.01) as dev:
        assert dev.wait(0.01) == []
        shutil.rmtree(d)
        with pytest.raises(DeviceGoneError):
            dev.wait(0.01)


@needs_root
@pytest.mark.timeout(60)
def test_closing_a_polled_device_ends_a_wait_in_another_thread_with_closed_error(sysfs):
    # The wait read the timer fd that close() had closed meanwhile: OSError EBADF (or a read of
    # whatever file reused the number) instead of ClosedError.
    _fake_device(sysfs, doorbell=True)
    dev = PciDevice.open(vfio=False, sysfs=str(sysfs), poll_interval=0.05)
    out = []
    started = threading.Event()

    def waits():
        started.set()
        try:
            while True:
                dev.wait(None)
        except BaseException as e:  # noqa: B902 - checked below
            out.append(e)

    t = threading.Thread(target=waits, daemon=True)
    t.start()
    started.wait(10)
    dev.close()
    t.join(30)
    assert not t.is_alive() and len(out) == 1 and isinstance(out[0], ClosedError), out


def test_wait_for_finds_a_device_or_times_out(sysfs):
    with pytest.raises(WaitTimeout, match="no ivshmem device 0000:00:05.0 appeared within 0.05 s"):
        PciDevice.wait_for("00:05.0", 0.05, sysfs=str(sysfs))
    _fake_device(sysfs, doorbell=False)
    assert PciDevice.wait_for("00:05.0", 5, sysfs=str(sysfs)).bdf == "0000:00:05.0"
    assert PciDevice.wait_for(None, 5, sysfs=str(sysfs)).bdf == "0000:00:05.0"
    with pytest.raises(WaitTimeout):
        PciDevice.wait_for("00:06.0", 0, sysfs=str(sysfs))



@needs_root
@pytest.mark.timeout(60)
def test_closing_the_device_ends_a_channel_wait_on_a_ring_elsewhere(sysfs, shm_path):
    """A Channel whose doorbell is the device and whose ring lives in another region: closing
    the device wakes the call asleep on it (ClosedError naming the device), as closing a Peer
    does, instead of leaving it asleep until its timeout on vectors that fire no more."""
    _fake_device(sysfs, doorbell=True)
    dev = PciDevice.open(vfio=False, sysfs=str(sysfs), poll_interval=0.01)
    with Region.create(shm_path, "1M") as r:
        ring = r.create_ring("elsewhere", slot_size=64, capacity=8)
        rx = Channel(ring, dev, vector=0, spin=0)
        got = []

        def receive():
            try:
                got.append(rx.recv(timeout=30))
            except BaseException as exc:  # noqa: BLE001 - what the call raised is the result
                got.append(exc)

        t = threading.Thread(target=receive)
        t.start()
        try:
            wait_until_in_wait(os.getpid(), thread_native_id(t), what="the channel's sleep")
            dev.close()
            t.join(30)
            assert not t.is_alive(), "the receive slept on after the device was closed"
            assert len(got) == 1 and isinstance(got[0], ClosedError), got
            assert "PciDevice" in str(got[0])
            with pytest.raises(ClosedError):  # and later waits refuse
                rx.recv(timeout=0.01)
            ring.send(b"no wait needed")      # the ring itself goes on
            assert ring.recv(timeout=0) == b"no wait needed"
        finally:
            dev.close()
            t.join(30)
            rx.close()


@needs_root
@pytest.mark.timeout(60)
def test_a_device_closed_while_a_channel_is_made_on_it_still_ends_its_waits(sysfs, shm_path):
    """close() tells the Channels the device knows; one being made took its vector fd before the
    close and registered after it, so it was never told and slept on a closed eventfd."""
    _fake_device(sysfs, doorbell=True)

    class ClosedMeanwhile(PciDevice):
        # another thread's close(), landing after the Channel took its fd, before it registered
        @property
        def _bell_table(self):
            table = PciDevice._bell_table.fget(self)
            self.close()
            return table

    dev = ClosedMeanwhile.open(vfio=False, sysfs=str(sysfs), poll_interval=0.01)
    with Region.create(shm_path, "1M") as r:
        rx = Channel(r.create_ring("elsewhere", slot_size=64, capacity=8), dev, vector=0, spin=0)
        try:
            assert dev.closed
            with pytest.raises(ClosedError):
                rx.recv(timeout=30)  # not a WaitTimeout after 30 s, nor EBADF
        finally:
            dev.close()
            rx.close()


@needs_root
@pytest.mark.timeout(60)
def test_two_threads_closing_a_device_close_its_fds_once(sysfs):
    # Both close() calls got past the "already closed?" look (the first one lets the GIL go in
    # the mmap's close, before it marks the device closed), and both closed resource2's fd:
    # the second os.close() hit whatever file had taken the number in between.  The profile
    # hooks hold the second close() just before its os.close(), while the first one finishes.
    import mmap
    import sys

    _fake_device(sysfs, doorbell=True)
    dev = PciDevice.open(vfio=False, sysfs=str(sysfs))
    dev.memory.release()  # maps BAR2 (an mmap that close() closes first, a C call)
    at_close, go = threading.Event(), threading.Event()
    second = []

    def second_hook(frame, event, arg):
        if event == "c_call" and arg is os.close and frame.f_code.co_filename.endswith("pci.py"):
            sys.setprofile(None)
            at_close.set()
            go.wait(30)

    def second_close():
        sys.setprofile(second_hook)
        try:
            dev.close()
        finally:
            sys.setprofile(None)

    def first_hook(frame, event, arg):
        if event == "c_call" and isinstance(getattr(arg, "__self__", None), mmap.mmap) and \
                frame.f_code.co_filename.endswith("pci.py") and not second:
            sys.setprofile(None)
            t = threading.Thread(target=second_close, daemon=True)
            second.append(t)
            t.start()
            while t.is_alive() and not at_close.is_set() and not _waits_for_a_close(dev):
                t.join(0.001)  # observing: at its os.close(), waiting for this close, or done

    decoy = -1
    try:
        sys.setprofile(first_hook)
        try:
            dev.close()
        finally:
            sys.setprofile(None)
        assert second, "close() made no call"
        decoy = os.open(os.devnull, os.O_RDONLY)  # may take the number close() freed
        go.set()
        second[0].join(30)
        assert not second[0].is_alive()
        os.fstat(decoy)  # EBADF: closed by the second close() of the same number
    finally:
        go.set()
        if decoy >= 0:
            try:
                os.close(decoy)
            except OSError:
                pass


@needs_root
def test_a_close_racing_another_threads_close_returns_once_the_device_is_released(sysfs):
    # The second close() (another thread) found the first one under way and returned at once:
    # after it returned the device was not closed yet (closed False, BAR2's fd still open), so
    # a caller that closes and then unbinds the driver, or checks `closed`, raced the first one.
    # The profile hook holds the first close() at its mmap's close (before anything is released)
    # while the second one runs.
    import mmap
    import sys

    _fake_device(sysfs, doorbell=True)
    dev = PciDevice.open(vfio=False, sysfs=str(sysfs))
    dev.memory.release()  # maps BAR2 (an mmap that close() closes first, a C call)
    mem_fd = dev._mem_fd
    seen = []
    second = []

    def second_close():
        dev.close()
        seen.append((dev.closed, mem_fd >= 0 and is_open(mem_fd)))

    def first_hook(frame, event, arg):
        if event == "c_call" and isinstance(getattr(arg, "__self__", None), mmap.mmap) and \
                frame.f_code.co_filename.endswith("pci.py") and not second:
            sys.setprofile(None)
            t = threading.Thread(target=second_close, daemon=True)
            second.append(t)
            t.start()
            # observe the second close() while the first is held here: it returned (the
            # defect) or waits for this one
            while t.is_alive() and not _waits_for_a_close(dev):
                t.join(0.001)

    try:
        sys.setprofile(first_hook)
        try:
            dev.close()
        finally:
            sys.setprofile(None)
        assert second, "close() made no call"
        second[0].join(30)
        assert not second[0].is_alive(), "the second close() never returned"
        assert seen == [(True, False)], \
            f"after the second close() returned: (closed, BAR2 fd open) = {seen}"
    finally:
        dev.close()


def _waits_for_a_close(dev) -> bool:
    """A close() of ``dev`` waits for another thread's close() to finish."""
    done = getattr(dev, "_close_done", None)
    return done is not None and bool(done._waiters)
