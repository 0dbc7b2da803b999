"""One size grammar (pyivshmem/_size.py): the region and ring API (parse_size, Region.create) and the
server (Server(size=), pyivshmem-server -l via parse_qemu_size) accept and refuse the same strings."""
from __future__ import annotations

import os

import pytest

from pyivshmem import ConfigError, Region, Server, parse_size
from pyivshmem.server import parse_qemu_size

GOOD = [
    (4096, 4096), ("4096", 4096), ("64K", 64 << 10), ("64k", 64 << 10), ("16M", 16 << 20),
    ("1G", 1 << 30), ("2T", 2 << 40), ("1.5M", 3 << 19), ("0.5k", 512), (".5M", 1 << 19),
    ("1.M", 1 << 20), ("64KiB", 64 << 10), ("16MB", 16 << 20), ("10B", 10), (" 8 M ", 8 << 20),
    ("2.25K", 2304), ("1.0009765625K", 1025),
]
BAD = ["", " ", "abc", "-1", "0", "0K", "0.0001K", "1.5", "1.0", "M", "K1", "4Q", "1.5.5M",
       "1 024", "16 MiB B", "iB", "1iB", "0x10", "1e3", 0, -4, True, 1.0, None, b"16M"]


@pytest.mark.parametrize("text,value", GOOD)
def test_both_parsers_accept_the_same(text, value):
    assert parse_size(text) == value
    assert parse_qemu_size(text) == value


@pytest.mark.parametrize("bad", BAD)
def test_both_parsers_refuse_the_same(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)
    with pytest.raises(ConfigError):
        parse_qemu_size(bad)


def test_region_create_and_server_take_a_fractional_size(tmp_path, shm_path):
    """The case that used to differ: Server(size="1.5M") worked, Region.create(p, "1.5M") raised
    a parse error.  Now a region takes fractions too; 1.5M itself is refused only because a region
    must be a power of two (the server rounds it up instead, as QEMU's does)."""
    with Region.create(shm_path, "0.5M") as r:
        assert r.size == 1 << 19
    with pytest.raises(ConfigError, match="power of two"):
        Region.create(shm_path + "x", "1.5M")
    with Server(str(tmp_path / "s.sock"), size="1.5M", vectors=0) as srv:
        assert srv  # started: the size parsed (rounded up to 2 MiB for the device's BAR)
    for bad in ("1.5", "4Q"):
        with pytest.raises(ConfigError):
            Region.create(shm_path + "x", bad)
        with pytest.raises(ConfigError):
            Server(str(tmp_path / "t.sock"), size=bad)
    assert not os.path.exists(shm_path + "x")


def test_the_server_keeps_its_upper_bound():
    with pytest.raises(ConfigError, match="larger than"):
        parse_qemu_size("1E")
    assert parse_size("1E") == 1 << 60     # the grammar itself has no bound; users of it do
