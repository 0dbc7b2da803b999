"""Use an installed pyivshmem the way a new user would, from outside the source tree.

    python .ci/smoke.py            (run by .ci/packaging.sh from an empty directory)

Checks that the package imported is the installed one (not a source checkout), that every
compiled module and every shipped file (typing stub, py.typed, the C headers) is there, then:
a Region on /dev/shm with an SPSC and an MPMC ring; an embedded Server, two Peers connected to
it and a Channel between them that sleeps on the server's doorbells; the command line
(`pyivshmem --help`, `--version`, `pyivshmem info`, `pyivshmem-server --help`, a tiny
`pyivshmem bench`).  Prints one line per check; exits non-zero on the first failure.
"""
import importlib
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import uuid

TIMEOUT = 60


def check(what, ok, detail=""):
    if not ok:
        print(f"smoke: FAIL: {what}{': ' + detail if detail else ''}", file=sys.stderr)
        sys.exit(1)
    print(f"smoke: ok: {what}")


def installed_package():
    import pyivshmem

    here = os.path.dirname(os.path.abspath(pyivshmem.__file__))
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    platsite = os.path.realpath(sysconfig.get_paths()["platlib"])
    from importlib.metadata import version

    check(f"pyivshmem.__version__ is the installed distribution's ({version('pyivshmem')})",
          version("pyivshmem") == pyivshmem.__version__, pyivshmem.__version__)
    check(f"pyivshmem {pyivshmem.__version__} imported from the environment ({here})",
          os.path.realpath(here).startswith((site, platsite)),
          f"expected it under {site}; is the source tree on sys.path?")
    for mod in ("_ring", "_ffi_doorbell", "_ffi_server", "_ffi_vfio"):
        m = importlib.import_module(f"pyivshmem.{mod}")
        check(f"compiled module pyivshmem.{mod}", m.__file__.endswith(".so"), m.__file__)
    for rel in ("py.typed", "_ring.pyi", "include/ivshm_layout.h", "include/ivshm_spsc.h",
                "include/ivshm_mpmc.h", "include/ivshm_region.h"):
        check(f"shipped file pyivshmem/{rel}", os.path.isfile(os.path.join(here, rel)))
    return here


def rings():
    from pyivshmem import MpmcRing, Region, SpscRing, WaitTimeout

    path = f"/dev/shm/pyivshmem-smoke-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with Region.create(path, "1M") as region:
            spsc = region.create_ring("jobs", kind="spsc", slot_size=64, capacity=16)
            mpmc = region.create_ring("events", kind="mpmc", slot_size=64, capacity=16)
            check("Region.create and create_ring (spsc, mpmc)",
                  isinstance(spsc, SpscRing) and isinstance(mpmc, MpmcRing))
            spsc.send(b"hello", timeout=5)
            check("spsc try_send", spsc.try_send(b"world"))
            big = bytes(range(256)) * 3  # longer than a slot: split and reassembled
            spsc.send(big, timeout=5)
            with Region.open(path) as other:
                consumer = other.ring("jobs")  # the consumer side, as another process would
                check("spsc recv in order", consumer.recv(timeout=5) == b"hello"
                      and consumer.recv_many(8) == [b"world", big])
                try:
                    consumer.recv(timeout=0.01)
                except WaitTimeout:
                    check("recv on an empty ring raises WaitTimeout", True)
                else:
                    check("recv on an empty ring raises WaitTimeout", False, "it returned")
            check("mpmc send_many/recv_many",
                  mpmc.send_many([b"a", b"b", b"c"]) == 3
                  and mpmc.recv_many(8) == [b"a", b"b", b"c"])
            out = run_cli("pyivshmem", "info", path)
            check("pyivshmem info PATH", out.returncode == 0 and "jobs" in out.stdout,
                  out.stderr or out.stdout)
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def channel_over_server(tmp):
    from pyivshmem import Channel, Peer, Server

    sock = os.path.join(tmp, "ivshmem.sock")
    with Server(sock, size="1M", vectors=1) as server:
        server.start()
        with Peer.connect(sock, timeout=TIMEOUT) as a, Peer.connect(sock, timeout=TIMEOUT) as b:
            check(f"two Peers connected to an embedded Server (ids {a.id}, {b.id})",
                  a.id != b.id and a.region.size == b.region.size == 1 << 20)
            tx = Channel(a.region.create_ring("smoke", slot_size=64, capacity=8), a, vector=0,
                         spin=0)
            rx = Channel(b.region.ring("smoke"), b, vector=0, spin=0)
            got = []
            receiver = threading.Thread(target=lambda: got.append(rx.recv(timeout=TIMEOUT)))
            receiver.start()
            # spin=0: the receiver sleeps on its doorbell; the send must ring it
            tx.send(b"over the server's memory", timeout=TIMEOUT)
            receiver.join(TIMEOUT)
            check("Channel send/recv between the two Peers",
                  got == [b"over the server's memory"], repr(got))
            tx.close()
            rx.close()
            a.region.close()
            b.region.close()


def run_cli(*args):
    exe = os.path.join(os.path.dirname(sys.executable), args[0])
    return subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=TIMEOUT)


def cli():
    import pyivshmem

    out = run_cli("pyivshmem", "--help")
    check("pyivshmem --help", out.returncode == 0 and "commands:" in out.stdout, out.stderr)
    out = run_cli("pyivshmem", "--version")
    check("pyivshmem --version", out.stdout.strip() == pyivshmem.__version__, out.stdout)
    out = run_cli("pyivshmem-server", "--help")
    check("pyivshmem-server --help", out.returncode == 0 and "-S" in out.stdout, out.stderr)
    out = run_cli("pyivshmem", "bench", "--scenarios", "roundtrip,throughput", "--peers", "none",
                  "--sizes", "64", "--duration", "0.05", "--repeat", "1", "--rtt-samples", "200",
                  "--rtt-seconds", "0.2")
    check("pyivshmem bench (a tiny run)",
          out.returncode == 0 and "pyivshmem" in out.stdout and "Round trip" in out.stdout,
          (out.stderr or out.stdout)[-2000:])


def main():
    for p in sys.path:
        root = p or os.getcwd()
        if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(
                os.path.join(root, "pyivshmem")):
            check("no source tree on sys.path", False, p or os.getcwd())
    installed_package()
    rings()
    with tempfile.TemporaryDirectory(prefix="pyivshmem-smoke-") as tmp:
        channel_over_server(tmp)
    cli()
    print(f"smoke: all checks passed (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
