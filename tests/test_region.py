"""Region: sizes, create/open/from_fd, the ring directory, races, lifetime."""
import gc
import multiprocessing as mp
import os
import stat

import pytest

import pyivshmem
from pyivshmem import ClosedError, ConfigError, Region, RegionFormatError, parse_size


@pytest.mark.parametrize(
    "text,value",
    [(4096, 4096), ("4096", 4096), ("64K", 65536), ("16M", 16 << 20), ("1G", 1 << 30),
     ("2g", 2 << 30), ("64KiB", 65536), (" 8 M ", 8 << 20)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "abc", "-1", "1.5", "0", 0, -4, True, 1.0, None])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


@pytest.mark.parametrize("size", [3000, "3M", 4096, 12288])
def test_non_power_of_two_rejected(shm_path, size):
    with pytest.raises(ConfigError, match="power of two"):
        Region.create(shm_path, size)
    assert not os.path.exists(shm_path)


def test_create_open_and_header(shm_path):
    with Region.create(shm_path, "1M") as r:
        assert r.size == 1 << 20 and r.path == shm_path and not r.closed
        assert r.generation != 0
        assert stat.S_IMODE(os.stat(shm_path).st_mode) == 0o600
        info = r.info()
        assert info["version"] == 3 and info["rings"] == 0  # layout version, docs/layout.md
        with Region.open(shm_path) as r2:
            assert r2.generation == r.generation and r2.size == r.size
    assert r.closed


def test_create_existing_refused_then_exist_ok(shm_path):
    r = Region.create(shm_path, "64K")
    r.create_ring("q", slot_size=64, capacity=16)
    with pytest.raises(FileExistsError, match="Region.open"):
        Region.create(shm_path, "64K", exist_ok=False)
    # exist_ok=True is the default, as for create_ring
    with Region.create(shm_path, "64K") as r2:
        assert r2.generation == r.generation and [x["name"] for x in r2.rings()] == ["q"]
    with pytest.raises(ConfigError, match="exists with size"):
        Region.create(shm_path, "128K", exist_ok=True)
    r.close()


def test_create_does_not_follow_symlinks(tmp_path):
    target = tmp_path / "target"
    link = tmp_path / "link"
    os.symlink(target, link)
    with pytest.raises(OSError):
        Region.create(link, "64K")
    assert not target.exists()


def test_open_errors(shm_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="Region.create"):
        Region.open(shm_path)
    with open(shm_path, "wb") as f:
        f.truncate(65536)
    with pytest.raises(RegionFormatError, match="not a pyivshmem region"):
        Region.open(shm_path)
    with open(shm_path, "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(RegionFormatError):
        Region.open(shm_path, format_if_empty=True)
    odd = tmp_path / "odd"
    odd.write_bytes(b"\0" * 10000)
    with pytest.raises(ConfigError, match="power of two"):
        Region.open(odd)


def test_open_formats_empty_file_when_asked(shm_path):
    with open(shm_path, "wb") as f:
        f.truncate(65536)
    with Region.open(shm_path, format_if_empty=True) as r:
        r.create_ring("x", slot_size=64, capacity=32)
    with Region.open(shm_path) as r:
        assert r.ring("x").capacity == 32


def test_from_fd_memfd():
    fd = os.memfd_create("pyivshmem-test")
    os.ftruncate(fd, 1 << 16)
    try:
        with Region.from_fd(fd) as r:
            ring = r.create_ring("m", slot_size=16, capacity=4)
            ring.try_send(b"via memfd")
            with Region.from_fd(fd, format_if_empty=False) as r2:
                assert r2.ring("m").try_recv() == b"via memfd"
        os.fstat(fd)  # the caller's fd is untouched
    finally:
        os.close(fd)


def test_directory_create_find_list(region):
    a = region.create_ring("alpha", slot_size=100, capacity=8)
    b = region.create_ring("beta", "mpmc", slot_size=32, capacity=16)
    assert isinstance(a, pyivshmem.SpscRing) and isinstance(b, pyivshmem.MpmcRing)
    assert a.slot_size == 100 and a.capacity == 8 and a.kind == "spsc" and b.kind == "mpmc"
    again = region.create_ring("alpha", slot_size=100, capacity=8)
    assert again.name == "alpha"
    with pytest.raises(FileExistsError):
        region.create_ring("alpha", slot_size=100, capacity=8, exist_ok=False)
    with pytest.raises(ConfigError, match="exists as spsc"):
        region.create_ring("alpha", slot_size=64, capacity=8)
    with pytest.raises(KeyError, match="no ring named 'gamma'"):
        region.ring("gamma")
    a.try_send(b"1")
    a.try_send(b"2")
    listing = {r["name"]: r for r in region.rings()}
    assert listing["alpha"]["count"] == 2 and listing["beta"]["kind"] == "mpmc"
    assert listing["alpha"]["offset"] % 128 == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(capacity=3), "power of two"), (dict(capacity=1), "power of two"),
     (dict(slot_size=0), "slot size"), (dict(kind="ring"), "unknown ring kind")],
)
def test_bad_ring_shapes(region, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        region.create_ring("bad", **kwargs)


@pytest.mark.parametrize("name", ["", "x" * 32, 5, "a\0b"])
def test_bad_ring_names(region, name):
    with pytest.raises(ConfigError):
        region.create_ring(name)


def test_region_full_and_directory_full(shm_path):
    with Region.create(shm_path, "64K") as r:
        with pytest.raises(ConfigError, match="larger region"):
            r.create_ring("huge", slot_size=4096, capacity=64)
        for i in range(62):
            r.create_ring(f"r{i}", slot_size=8, capacity=2)
        with pytest.raises(ConfigError, match="directory is full"):
            r.create_ring("one-more", slot_size=8, capacity=2)


def _race_create(path, barrier, q):
    r = Region.open(path)
    barrier.wait()
    ring = r.create_ring("shared", "mpmc", slot_size=64, capacity=64)
    ring.try_send(str(os.getpid()).encode())
    q.put(r.rings()[0]["offset"])
    r.close()


def test_create_race_between_processes(shm_path):
    Region.create(shm_path, "1M").close()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    q = ctx.Queue()
    procs = [ctx.Process(target=_race_create, args=(shm_path, barrier, q)) for _ in range(4)]
    for p in procs:
        p.start()
    offsets = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(set(offsets)) == 1
    with Region.open(shm_path) as r:
        assert [x["name"] for x in r.rings()] == ["shared"]
        assert len(r.ring("shared").recv_many(10)) == 4


def test_use_after_close_raises(shm_path):
    r = Region.create(shm_path, "64K")
    ring = r.create_ring("q", slot_size=8, capacity=4)
    r.close()
    r.close()  # idempotent
    for call in (lambda: ring.try_send(b"x"), ring.try_recv, lambda: len(ring),
                 lambda: r.create_ring("z"), r.rings, r.fileno):
        with pytest.raises(ClosedError):
            call()


def test_close_with_view_held_keeps_the_memory_until_the_view_goes(region):
    ring = region.create_ring("v", slot_size=16, capacity=4)
    ring.try_send(b"abc")
    view = ring.peek()
    raw = memoryview(view)  # a raw buffer export: it keeps the mapping alive
    region.close()  # never refused
    assert region.closed
    assert bytes(raw) == b"abc"  # still mapped: readable, no crash
    with pytest.raises(ClosedError):
        ring.release()
    raw.release()
    del view
    gc.collect()


def test_forgotten_region_warns_and_releases(shm_path):
    r = Region.create(shm_path, "64K")
    fd = r.fileno()
    with pytest.warns(ResourceWarning):
        del r
        gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_stale_generation_detected(shm_path):
    r1 = Region.create(shm_path, "64K")
    r1.check()
    os.unlink(shm_path)
    with open(shm_path, "wb"):
        pass
    # re-format the same memory through another mapping of the same inode: simulate a restart
    fd = r1.fileno()
    os.ftruncate(fd, 65536)
    view = open(f"/proc/self/fd/{fd}", "r+b")
    view.seek(24)
    view.write((12345).to_bytes(8, "little"))
    view.close()
    with pytest.raises(pyivshmem.StaleRegionError):
        r1.check()
    r1.close()
