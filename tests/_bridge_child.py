"""Child processes for the bridge tests: a producer that writes numbered messages of mixed
sizes into a ring (python -m ... produce REGION RING START COUNT)."""
import sys


def size_of(i, slot):
    """Mixed sizes: 8 bytes (the index) up to a full slot, spread by a multiplicative hash."""
    return 8 + (i * 2654435761) % (slot - 7)


def make(i, slot):
    n = size_of(i, slot)
    return i.to_bytes(8, "little") + bytes((i & 255,)) * (n - 8)


def check(msg, expect, slot):
    """None if ``msg`` is message ``expect``, else what is wrong."""
    if len(msg) < 8:
        return f"message of {len(msg)} bytes where #{expect} was due"
    i = int.from_bytes(msg[:8], "little")
    if i != expect:
        return f"message #{i} where #{expect} was due"
    if len(msg) != size_of(i, slot) or (len(msg) > 8 and msg[-1] != i & 255):
        return f"message #{i} has the wrong size or content ({len(msg)} bytes)"
    return None


def produce(path, ring_name, start, count, slot):
    from pyivshmem import Channel, Region

    region = Region.open(path)
    ch = Channel(region.ring(ring_name))
    i = start
    end = start + count
    while i < end:
        batch = [make(k, slot) for k in range(i, min(end, i + 512))]
        sent = 0
        while sent < len(batch):
            sent += ch.send_many(batch[sent:] if sent else batch, timeout=120)
        i += len(batch)
    ch.close()
    region.close()


def produce_fixed(path, ring_name, count, size):
    """``count`` messages of ``size`` bytes, numbered (backpressure test)."""
    from pyivshmem import Channel, Region

    region = Region.open(path)
    ch = Channel(region.ring(ring_name))
    pad = b"x" * (size - 8)
    for i in range(0, count, 64):
        batch = [k.to_bytes(8, "little") + pad for k in range(i, min(count, i + 64))]
        sent = 0
        while sent < len(batch):
            sent += ch.send_many(batch[sent:] if sent else batch, timeout=120)
    ch.close()
    region.close()


def consume_to_file(path, ring_name, out_path, pause):
    """Another consumer of an MPMC ring, beside the bridge: appends the index of every message it
    takes to ``out_path`` (8 bytes each, flushed per batch) until SIGTERM."""
    import signal
    import time

    from pyivshmem import Channel, Region

    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    region = Region.open(path)
    ch = Channel(region.ring(ring_name))
    with open(out_path, "ab") as f:
        while not stop:
            msgs = ch.recv_many(8, timeout=0.05)
            if msgs:
                f.write(b"".join(m[:8] for m in msgs))
                f.flush()
                time.sleep(pause)
    ch.close()
    region.close()


if __name__ == "__main__":
    if sys.argv[1] == "produce":
        produce(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif sys.argv[1] == "consume-to-file":
        consume_to_file(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
