"""The CLI dispatcher and `pyivshmem info`."""
import json
import subprocess
import sys

from pyivshmem import Region
from pyivshmem.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "pyivshmem", *args], capture_output=True,
                          text=True, timeout=60)


def test_usage_and_unknown_command(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["--version"]) == 0


def test_info_table_and_json(shm_path):
    with Region.create(shm_path, "1M") as r:
        ring = r.create_ring("jobs", slot_size=64, capacity=8)
        r.create_ring("events", "mpmc", slot_size=32, capacity=16)
        ring.send_many([b"a", b"b", b"c"])
        out = run("info", shm_path)
        assert out.returncode == 0, out.stderr
        assert "jobs" in out.stdout and "events" in out.stdout and "38%" in out.stdout
        out = run("info", "--json", shm_path)
        d = json.loads(out.stdout)
        rings = {x["name"]: x for x in d["rings"]}
        assert rings["jobs"]["count"] == 3 and rings["events"]["kind"] == "mpmc"
        assert d["header"]["generation"] == r.generation


def test_info_errors(tmp_path):
    out = run("info", str(tmp_path / "missing"))
    assert out.returncode == 1 and "no region file" in out.stderr
    bad = tmp_path / "bad"
    bad.write_bytes(b"x" * 8192)
    out = run("info", str(bad))
    assert out.returncode == 1 and "not a pyivshmem region" in out.stderr
