"""Seed inputs of the fuzz harnesses, and the packed corpora the C test run replays.

    PYTHONPATH=../.. python make_seeds.py         write corpus/region/seed-* and corpus/rings/seed-*
    python make_seeds.py pack DIR OUT.pack        pack every file of DIR into one file
    python make_seeds.py unpack IN.pack DIR       the reverse (`make fuzz` starts from it)

Region seeds are real region images made through the Python API (so the C harness also reads
what Python wrote) in raw mode, plus patch-mode scripts; ring seeds are short operation scripts.
A pack is records of {u32 little-endian length, bytes}: `make corpus-pack` writes
corpus/<harness>.pack from a minimised fuzzing corpus, so the inputs fuzzing found interesting are
replayed by every C test run without committing thousands of files.  Crash reproducers go into
corpus/<harness>/ as single files (see docs/hardening.md).
"""
import os
import random
import struct
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def region_image(size, rings):
    from pyivshmem import Region

    fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="pyivshmem-seed-")
    os.close(fd)
    os.unlink(path)
    try:
        with Region.create(path, size) as r:
            for name, kind, slot, cap, msgs, take in rings:
                q = r.create_ring(name, kind, slot_size=slot, capacity=cap)
                for m in msgs:
                    assert q.try_send(m)
                for _ in range(take):
                    q.try_recv()
                q.close()
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def ctrl_size():
    """The control block's size, measured on a ring whose slots fill whole 128-byte lines."""
    img = region_image(8192, [("p", "spsc", 8, 16, [], 0)])
    e = 128
    off, size = struct.unpack_from("<QQ", img, e + 40)
    return size - 16 * 16


def write(sub, name, data):
    d = os.path.join(HERE, "corpus", sub)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    rnd = random.Random(1234)
    # raw mode (bit 0), 8 KiB (bits 1-2 = 0): a region with one ring of each kind
    img = region_image(8192, [
        ("a", "spsc", 16, 8, [b"x" * n for n in (3, 40, 0, 16)], 1),
        ("b", "mpmc", 24, 4, [b"m1", b"m2" * 5], 0),
    ])
    write("region", "seed-raw-8k-two-rings", bytes([0x01]) + img.rstrip(b"\0"))
    img = region_image(16384, [
        ("s%d" % i, "spsc" if i % 2 else "mpmc", 8 + 8 * i, 2 << (i % 3), [b"q" * i], 0) for i in range(6)
    ])
    write("region", "seed-raw-16k-six-rings", bytes([0x03]) + img.rstrip(b"\0"))
    write("region", "seed-raw-empty-format", bytes([0x09]))
    # patch mode: the harness's own fixture with a few patches on header, directory and rings
    write("region", "seed-patch-none", bytes([0x00]))
    write("region", "seed-patch-64k", bytes([0x06]))
    # fuzz_region.c's fixture: ring s (SPSC, 24 x 8: stride 32) at 4096, then ring m (MPMC)
    c = ctrl_size()
    s_size = (c + 32 * 8 + 127) // 128 * 128
    for i, (off, data) in enumerate([
        (128 + 40, struct.pack("<Q", 1 << 40)),           # directory entry 0 offset
        (4096 + 128, struct.pack("<Q", 1000)),            # ring s head
        (4096 + 256, struct.pack("<Q", 7)),               # ring s tail
        (4096 + c + 4, struct.pack("<I", 1)),             # ring s slot 0 stamp
        (4096 + s_size + c, struct.pack("<I", 99)),       # ring m slot 0 seq
        (8, struct.pack("<I", 3)),                        # version
    ]):
        write("region", "seed-patch-%d" % i, bytes([0x00]) + struct.pack("<HB", off, len(data)) + data)
    # ring scripts: shape byte, then operations (see fuzz_rings.c: op % 20)
    for i in range(12):
        ops = bytes(rnd.randrange(256) for _ in range(rnd.randrange(20, 200)))
        write("rings", "seed-script-%02d" % i, bytes([rnd.randrange(256)]) + ops)
    # clean traffic only: sends and receives on both rings, no pokes
    clean = bytearray([0x55])
    for _ in range(100):
        clean += bytes([rnd.choice([0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 18]), rnd.randrange(256),
                        rnd.randrange(256), rnd.randrange(256)])
    write("rings", "seed-clean-traffic", bytes(clean))


def pack(src, out):
    names = sorted(os.listdir(src))
    with open(out, "wb") as f:
        for n in names:
            with open(os.path.join(src, n), "rb") as g:
                data = g.read()
            f.write(struct.pack("<I", len(data)) + data)
    print(f"packed {len(names)} inputs into {out}")


def unpack(src, out):
    os.makedirs(out, exist_ok=True)
    with open(src, "rb") as f:
        data = f.read()
    off = k = 0
    while off + 4 <= len(data):
        (n,) = struct.unpack_from("<I", data, off)
        off += 4
        with open(os.path.join(out, "pack-%05d" % k), "wb") as g:
            g.write(data[off:off + n])
        off += n
        k += 1
    print(f"unpacked {k} inputs from {src} into {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["pack"]:
        pack(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["unpack"]:
        unpack(sys.argv[2], sys.argv[3])
    else:
        main()
