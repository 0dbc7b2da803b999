"""The VM harness itself: failures inside a guest surface as clear test failures, and every wait
is bounded. Needs qemu-system-x86_64 (skips otherwise)."""
from __future__ import annotations

import pytest

from vm import harness

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.timeout(180)]


@pytest.fixture
def image():
    return harness.require_image()


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
    script = "import time, vmguest\nvmguest.stage('sleeping')\ntime.sleep(3600)\n"
    with harness.Vm(script, workdir=tmp_path, iommu=False, image=image, guest_timeout=5) as vm:
        vm.wait_for("stage", timeout=harness.BOOT_TIMEOUT)
        with pytest.raises(harness.VmError, match=r"no 'result' within 2s"):
            vm.wait_for("result", timeout=2)
        # the guest's own bound kills the script (SIGKILL: 137) and powers off
        assert vm.wait_for("exit", timeout=120).text.strip() == "137"
        assert vm.wait_exit(timeout=60) == 0
