"""KVM or TCG for QEMU guests: the decision, and a KVM probe that hangs or dies.

No QEMU is needed: the decision is tested with fake probes, and the probe itself with a fake
``qemu-system-x86_64`` (a shell script) that hangs like QEMU under KVM does on hosts where a KVM
guest never prints its first line, or dies like QEMU does when KVM refuses it.  The real probe on
this host is in test_vm_harness.py.
"""
from __future__ import annotations

import os
import time

import pytest

from pyivshmem import IvshmemError
from pyivshmem.vm import harness as vmh
from pyivshmem.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def fresh_verdict(monkeypatch):
    """Every test starts without a cached verdict (and leaves the process's own alone)."""
    monkeypatch.setattr(vmh, "_kvm_verdict", None)
    monkeypatch.delenv("PYIVSHMEM_VM_ACCEL", raising=False)


class FakeProbe:
    def __init__(self, ok, why):
        self.result = (ok, why)
        self.calls = []

    def __call__(self, image=None, timeout=None):
        self.calls.append(timeout)
        return self.result


def test_auto_uses_kvm_when_the_probe_boots_and_asks_once_per_process():
    probe = FakeProbe(True, "a probe boot under KVM reached the guest's init in 0.4 s")
    said = []
    c = vmh.choose_accel("auto", probe=probe, timeout=3, report=said.append)
    assert (c.accel, c.requested) == ("kvm", "auto")
    assert c.reason == "a probe boot under KVM reached the guest's init in 0.4 s"
    assert said == ["QEMU guests run under KVM: a probe boot under KVM reached the guest's init "
                    "in 0.4 s"]
    assert probe.calls == [3]
    # the verdict is cached: a second choice (even with another probe) does not boot again
    other = FakeProbe(False, "never asked")
    assert vmh.choose_accel(None, probe=other).accel == "kvm"
    assert probe.calls == [3] and other.calls == []


def test_auto_uses_tcg_when_the_probe_fails_and_says_why():
    probe = FakeProbe(False, "a probe boot under KVM did not reach the guest's init within 2 s")
    said = []
    c = vmh.choose_accel("auto", probe=probe, report=said.append)
    assert c.accel == "tcg" and "within 2 s" in c.reason
    assert said == ["QEMU guests run under TCG (software emulation): a probe boot under KVM did "
                    "not reach the guest's init within 2 s"]
    assert probe.calls == [vmh.KVM_PROBE_TIMEOUT]


def test_forced_accelerators_do_not_probe(monkeypatch):
    probe = FakeProbe(True, "unused")
    c = vmh.choose_accel("tcg", probe=probe)
    assert c.accel == "tcg" and "KVM not probed" in c.reason
    monkeypatch.setattr(vmh, "kvm_device_problem", lambda path="/dev/kvm": None)
    c = vmh.choose_accel("KVM", probe=probe)
    assert c.accel == "kvm" and "not probed" in c.reason
    monkeypatch.setenv("PYIVSHMEM_VM_ACCEL", "tcg")
    assert vmh.choose_accel(None, probe=probe).accel == "tcg"
    assert probe.calls == []
    assert vmh._kvm_verdict is None  # nothing was cached by forced choices


def test_forced_kvm_without_a_usable_device_says_so(monkeypatch):
    monkeypatch.setattr(vmh, "kvm_device_problem",
                        lambda path="/dev/kvm": "/dev/kvm does not exist (no KVM on this host)")
    with pytest.raises(vmh.VmUnavailable, match="KVM was asked for, but /dev/kvm does not exist"):
        vmh.choose_accel("kvm")


def test_unknown_accelerator_is_a_config_error():
    with pytest.raises(ConfigError, match="use one of auto, kvm, tcg"):
        vmh.choose_accel("hvf")


def test_missing_device_means_tcg_without_booting(monkeypatch, tmp_path):
    monkeypatch.setattr(vmh, "qemu_binary", lambda: pytest.fail("QEMU must not be started"))
    monkeypatch.setattr(vmh, "kvm_device_problem",
                        lambda path="/dev/kvm": "/dev/kvm does not exist (no KVM on this host)")
    ok, why = vmh.probe_kvm(image=_fake_image(tmp_path), timeout=1)
    assert not ok and "/dev/kvm does not exist" in why


def test_vm_errors_are_ivshmem_errors_not_assertions():
    for cls in (vmh.VmError, vmh.VmTimeout, vmh.VmUnavailable):
        assert issubclass(cls, IvshmemError) and issubclass(cls, RuntimeError)
        assert not issubclass(cls, AssertionError)
    assert issubclass(vmh.VmTimeout, vmh.VmError)


# ------------------------------------------------------------------------------------------------
# the probe against a fake QEMU
def _fake_image(tmp_path):
    d = tmp_path / "image"
    d.mkdir(exist_ok=True)
    for name in ("vmlinuz", "base.cpio.gz", "python.cpio.gz"):
        (d / name).write_bytes(b"\0" * 64)
    return vmh.Image(vmh.Kernel("0-fake", d / "vmlinuz", d / "base.cpio.gz"), d / "python.cpio.gz")


def _fake_qemu(tmp_path, monkeypatch, body):
    script = tmp_path / "qemu-system-x86_64"
    script.write_text("#!/bin/sh\n"
                      f"echo $$ > {tmp_path}/qemu.pid\n"
                      f"echo \"$@\" > {tmp_path}/qemu.args\n" + body)
    script.chmod(0o755)
    monkeypatch.setattr(vmh, "qemu_binary", lambda: str(script))
    monkeypatch.setattr(vmh, "kvm_device_problem", lambda path="/dev/kvm": None)


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_hanging_kvm_probe_falls_back_to_tcg_within_its_timeout(tmp_path, monkeypatch):
    # like QEMU under KVM on hosts where the guest never prints its first line
    _fake_qemu(tmp_path, monkeypatch, "exec sleep 300\n")
    said = []
    t0 = time.monotonic()
    c = vmh.choose_accel("auto", image=_fake_image(tmp_path), timeout=1.0, report=said.append)
    took = time.monotonic() - t0
    assert c.accel == "tcg"
    assert "did not reach the guest's init within 1 s" in c.reason and "hang" in c.reason
    assert said and said[0].startswith("QEMU guests run under TCG (software emulation): a probe "
                                       "boot under KVM did not reach")
    args = (tmp_path / "qemu.args").read_text()
    # the probe boots the machine the guests get: q35 with intel-iommu (irqchip split under KVM)
    assert "-accel kvm" in args and "-kernel" in args and "-device intel-iommu" in args
    assert "q35,kernel-irqchip=split" in args
    # the hung QEMU was killed (by its pid) and reaped
    assert _gone(int((tmp_path / "qemu.pid").read_text()))
    # bounded by the probe's timeout, not by the fake's 300 s (a generous margin for a loaded
    # machine: this checks that the timeout is honoured, not how fast anything is)
    assert took < 1.0 + 30
    # the verdict is kept for the process: asking again does not start QEMU again
    (tmp_path / "qemu.pid").unlink()
    assert vmh.choose_accel("auto", image=_fake_image(tmp_path)).accel == "tcg"
    assert not (tmp_path / "qemu.pid").exists()


def test_a_qemu_that_dies_under_kvm_falls_back_with_its_message(tmp_path, monkeypatch):
    _fake_qemu(tmp_path, monkeypatch,
               "echo 'qemu-system-x86_64: kvm_init_vcpu: failed: Invalid argument'\nexit 1\n")
    ok, why = vmh.probe_kvm(image=_fake_image(tmp_path), timeout=20)
    assert not ok
    assert why == ("QEMU could not boot a guest under KVM: qemu-system-x86_64: kvm_init_vcpu: "
                   "failed: Invalid argument")


def test_a_probe_boot_that_reaches_init_means_kvm(tmp_path, monkeypatch):
    # a fake QEMU that behaves like a guest under working KVM: init says it booted
    _fake_qemu(tmp_path, monkeypatch, "echo '@@PYIVSHMEM:booted 0-fake'\nexec sleep 300\n")
    ok, why = vmh.probe_kvm(image=_fake_image(tmp_path), timeout=20)
    assert ok and why.startswith("a probe boot under KVM reached the guest's init in ")
    assert _gone(int((tmp_path / "qemu.pid").read_text()))


def test_vm_command_line_follows_the_choice(tmp_path, monkeypatch):
    img = _fake_image(tmp_path)
    tcg = vmh.Vm("", workdir=tmp_path, image=img, accel="tcg").command()
    assert tcg[1:5] == ["-accel", "tcg", "-M", "q35"]
    assert vmh.Vm("", workdir=tmp_path, image=img, accel="kvm").command()[1:3] == ["-accel", "kvm"]
    monkeypatch.setenv("PYIVSHMEM_VM_ACCEL", "tcg")
    assert vmh.Vm("", workdir=tmp_path, image=img).accel == "tcg"
    monkeypatch.delenv("PYIVSHMEM_VM_ACCEL")
    monkeypatch.setattr(vmh, "_kvm_verdict", (True, "fake"))
    assert vmh.Vm("", workdir=tmp_path, image=img).accel == "kvm"
    monkeypatch.setenv("PYIVSHMEM_VM_CPU", "host")
    cmd = vmh.Vm("", workdir=tmp_path, image=img, accel="kvm").command()
    assert cmd[cmd.index("-cpu") + 1] == "host"


def test_python_m_pyivshmem_vm_is_the_harness_command():
    """`python -m pyivshmem.vm build|smoke|probe` (formerly `python -m pyivshmem._vm`)."""
    import subprocess
    import sys

    from test_server import _env

    r = subprocess.run([sys.executable, "-m", "pyivshmem.vm", "--help"], capture_output=True,
                       text=True, timeout=60, env=_env())
    assert r.returncode == 0, r.stderr
    assert "python -m pyivshmem.vm" in r.stdout
    assert "probe" in r.stdout and "smoke" in r.stdout
