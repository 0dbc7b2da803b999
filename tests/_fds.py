"""Counting this process's open file descriptors, for the tests that check nothing leaks."""
import gc
import os


def fd_count() -> int:
    """Open fds now, after collecting garbage: objects that earlier tests left in reference cycles
    (a coroutine's frame holding a Channel, a traceback holding a Peer) close their fds when
    collected, and must not count for or against the test that happens to collect them."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))
