"""The VM harness itself: failures inside a guest surface as clear test failures, and every wait
is bounded. Needs qemu-system-x86_64 (skips otherwise)."""
from __future__ import annotations

import os
import time

import pytest

from vm import harness

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.timeout(180)]


def test_guest_exception_is_reported_with_traceback(image, tmp_path):
    script = "import vmguest\nvmguest.stage('one')\nraise ValueError('broken on purpose')\n"
    with harness.Vm(script, workdir=tmp_path, iommu=False, image=image) as vm:
        with pytest.raises(harness.VmError) as e:
            vm.result(timeout=120)
    text = str(e.value)
    assert "guest reported an error" in text and "ValueError: broken on purpose" in text
    assert "serial log of" in text and "@@PYIVSHMEM:booted" in text
    assert vm.proc is not None and vm.proc.poll() is not None  # QEMU is gone
    assert vm.log_path.read_text().count("broken on purpose") >= 1  # the log file is kept


def test_waits_are_bounded_and_a_hung_guest_powers_off(image, tmp_path):
    from pyivshmem.vm.harness import VmTimeout

    script = "import time, vmguest\nvmguest.stage('sleeping')\ntime.sleep(3600)\n"
    with harness.Vm(script, workdir=tmp_path, iommu=False, image=image, guest_timeout=5) as vm:
        # the guest's 5 s bound starts when its init launches the script, after "booted": a 2 s
        # wait from there ends first, however long the interpreter takes to start on a busy host
        vm.wait_for("booted", timeout=harness.BOOT_TIMEOUT)
        with pytest.raises(VmTimeout, match=r"no 'result' within 2s"):
            vm.wait_for("result", timeout=2)
        # the guest's own bound kills the script (SIGKILL: 137) and powers off
        assert vm.wait_for("exit", timeout=120).text.strip() == "137"
        assert vm.wait_exit(timeout=60) == 0


def _our_qemus():
    """QEMU processes that are children of this process (none should outlive a probe)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and comm.startswith("qemu"):
            out.append(int(pid))
    return out


def test_kvm_probe_on_this_host_decides_within_its_timeout(image, tmp_path, monkeypatch):
    """On hosts where /dev/kvm opens but a KVM guest hangs (or QEMU aborts), the probe falls back
    to TCG and says why; where KVM works, a real guest boots under it."""
    from pyivshmem.vm import harness as vmh

    monkeypatch.setattr(vmh, "_kvm_verdict", None)  # this test's verdict is not the process's
    said = []
    t0 = time.monotonic()
    choice = vmh.choose_accel("auto", image=image, timeout=3, report=said.append)
    took = time.monotonic() - t0
    assert said == [choice.describe()]
    assert not _our_qemus()  # the probe's QEMU was killed and reaped
    # the probe's timeout is honoured (a generous margin for a loaded machine: not a speed check)
    assert took < 3 + 60
    if choice.accel == "tcg":
        assert ("did not reach the guest's init within 3 s" in choice.reason
                or "could not boot a guest under KVM" in choice.reason
                or "/dev/kvm" in choice.reason), choice.reason
    else:
        assert "reached the guest's init" in choice.reason
        script = "import vmguest\nvmguest.result(ok=True)\n"
        with harness.Vm(script, workdir=tmp_path, iommu=False, image=image, accel="kvm") as vm:
            assert vm.result(timeout=120) == {"ok": True}
