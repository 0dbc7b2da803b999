"""Guest side of the VM test harness (importable inside a test VM as ``vmguest``).

Prints ``@@PYIVSHMEM:<tag> <text>`` lines on the serial console, which the host side parses. Any
uncaught exception in the test script is reported as an ``error`` message with its traceback.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

MARK = "@@PYIVSHMEM:"


def emit(tag: str, text: str = "") -> None:
    # one write per line, so kernel messages cannot split a marker
    sys.stdout.write(f"\n{MARK}{tag} {text}\n")
    sys.stdout.flush()


def result(**data) -> None:
    """The script's result (the host reads the last one)."""
    emit("result", json.dumps(data, sort_keys=True))


def stage(name: str, **data) -> None:
    """A progress point the host may wait for (``vm.wait_for('stage', ...)`` then read the text)."""
    emit("stage", json.dumps({"name": name, **data}, sort_keys=True))


def log(text: str) -> None:
    emit("log", text.replace("\n", " | "))


def _excepthook(et, ev, tb) -> None:
    text = "".join(traceback.format_exception(et, ev, tb))
    sys.stderr.write(text)
    sys.stderr.flush()
    emit("error", text.replace("\n", " | "))


sys.excepthook = _excepthook


def find_devices(vendor: str = "0x1af4", device: str = "0x1110") -> list:
    """ivshmem BDFs, straight from sysfs (no pyivshmem), for raw tests."""
    out = []
    base = "/sys/bus/pci/devices"
    for bdf in sorted(os.listdir(base)):
        try:
            with open(f"{base}/{bdf}/vendor") as f:
                v = f.read().strip()
            with open(f"{base}/{bdf}/device") as f:
                d = f.read().strip()
        except OSError:
            continue
        if v == vendor and d == device:
            out.append(bdf)
    return out


def poll_until(pred, timeout: float, interval: float = 0.001):
    """Return pred()'s first truthy value; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)
