"""`pyivshmem bridge` and `Bridge` configured as a careless user would: one ring named twice,
a log level that does not exist."""
import re
import subprocess
import sys

import pytest

pytest.importorskip("zmq")


def _bridge(*args):
    return subprocess.run([sys.executable, "-m", "pyivshmem", "bridge", *args],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def _refused(region, match, **kw):
    from pyivshmem import Bridge, ConfigError

    try:
        b = Bridge(region, **kw)
    except ConfigError as e:
        assert re.search(match, str(e)), e
        return
    b.close()
    pytest.fail(f"Bridge({kw}) was accepted")


def test_a_ring_both_forwarded_and_delivered_is_refused(tmp_path, region):
    """The bridge consumes an out ring and produces into an in ring: one ring as both would make
    it a second consumer (or producer) beside the application's, and send its own deliveries
    back."""
    region.create_ring("s", slot_size=64, capacity=8)
    _refused(region, "'s'.*both", connect="tcp://127.0.0.1:1", out={"s": "s"}, in_rings=["s"],
             state_dir=str(tmp_path))


def test_a_ring_delivered_twice_is_refused(tmp_path, region):
    region.create_ring("s", slot_size=64, capacity=8)
    _refused(region, "'s'.*twice", connect="tcp://127.0.0.1:1", in_rings=["s", "s"],
             state_dir=str(tmp_path))


def test_cli_refuses_one_local_ring_forwarded_twice(tmp_path, region):
    """`--out up --out up=down` used to keep only the last, silently."""
    region.create_ring("up", slot_size=64, capacity=8)
    out = _bridge("--region", region.path, "--connect", "tcp://127.0.0.1:1", "--out", "up",
                  "--out", "up=down", "--state-dir", str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert "'up'" in out.stderr and "twice" in out.stderr and "Traceback" not in out.stderr


def test_cli_unknown_log_level_is_a_usage_error(tmp_path, region):
    region.create_ring("up", slot_size=64, capacity=8)
    out = _bridge("--region", region.path, "--connect", "tcp://127.0.0.1:1", "--out", "up",
                  "--state-dir", str(tmp_path), "--log-level", "LOUD")
    assert out.returncode == 2, out.stderr
    assert "--log-level" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["-1", "nan"])
def test_cli_refuses_a_negative_or_nan_stats_interval_before_opening_anything(tmp_path, region,
                                                                              value):
    region.create_ring("up", slot_size=64, capacity=8)
    state = tmp_path / "state"
    out = _bridge("--region", region.path, "--connect", "tcp://127.0.0.1:1", "--out", "up",
                  "--state-dir", str(state), "--stats-interval", value)
    assert out.returncode == 2, out.stderr
    assert "--stats-interval" in out.stderr and ">= 0" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not state.exists()  # refused before the bridge made its state directory


@pytest.mark.timeout(30)  # an accepted interval runs the bridge until the timeout
@pytest.mark.parametrize("value", [-1, float("nan"), "10", True])
def test_run_forever_refuses_a_bad_stats_interval_before_starting(tmp_path, region, value):
    from pyivshmem import Bridge, ConfigError

    region.create_ring("up", slot_size=64, capacity=8)
    b = Bridge(region, connect="tcp://127.0.0.1:1", out={"up": "up"}, state_dir=str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="stats_interval"):
            b.run_forever(value)
        assert not b._threads  # nothing was started
    finally:
        b.close()
