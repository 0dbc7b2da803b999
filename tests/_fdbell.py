"""A minimal doorbell provider over plain eventfds, for tests that need no server."""
import os


class FdBell:
    """Peer ``my_id`` among peers whose eventfds (one per vector) are known: {peer: [fd, ...]}."""

    def __init__(self, my_id, fds):
        self.id = my_id
        self.fds = fds
        self.notified = 0

    def vector_fd(self, vector):
        return self.fds[self.id][vector]

    def notify_target(self, peer, vector):
        fds = self.fds.get(peer)
        if fds is None or vector >= len(fds):
            return None
        return (1, fds[vector], 0)

    def notify(self, peer, vector=0):
        self.notified += 1
        os.eventfd_write(self.fds[peer][vector], 1)


def make_fds(peers, vectors=1):
    return {p: [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(vectors)]
            for p in peers}


def close_fds(fds):
    for lst in fds.values():
        for fd in lst:
            os.close(fd)
