"""Peer and doorbell helpers take timeouts and vector numbers as the rings do
(docs/api-rules.md): None or math.inf wait forever, NaN, negative numbers, bools and
non-numbers raise ConfigError naming the argument."""
import math
import os

import pytest
from _fds import fd_count

from pyivshmem import ConfigError, Peer, Server
from pyivshmem import doorbell


@pytest.fixture
def peer(tmp_path):
    path = os.path.join(tmp_path, "srv")
    with Server(path, size="1M", vectors=2):
        p = Peer.connect(path)
        yield p
        p.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("forever", [math.inf, pytest.param(10**400, id="10**400"), 1e300])
def test_peer_wait_takes_an_infinite_timeout_as_forever(peer, forever):
    # (OverflowError: the deadline was turned into milliseconds, or the int into a float)
    peer.notify(peer.id, 1)
    assert peer.wait(forever) == [1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("forever", [math.inf, pytest.param(10**400, id="10**400")])
def test_doorbell_waits_take_an_infinite_timeout_as_forever(forever):
    fd = doorbell.eventfd()
    try:
        doorbell.ring(fd)
        assert doorbell.wait_readable(fd, forever) is True
        with doorbell.WaitSet() as ws:
            ws.add(fd, 7)
            assert ws.wait(forever) == [(7, 1)]
    finally:
        os.close(fd)


@pytest.mark.parametrize("bad", [True, "1", float("nan"), -1, [1]])
def test_peer_wait_refuses_a_bad_timeout_with_a_config_error(peer, bad):
    # (True waited one second; "1" and [1] raised TypeError)
    with pytest.raises(ConfigError, match="timeout"):
        peer.wait(bad)


@pytest.mark.timeout(60)
def test_peer_connect_takes_an_infinite_timeout_and_refuses_bad_arguments(peer):
    path = peer.socket_path
    with Peer.connect(path, timeout=math.inf) as other:  # (OverflowError from the socket)
        assert other.id != peer.id
    before = fd_count()
    for kwargs in ({"timeout": "5"}, {"timeout": True}, {"vectors": 1.5}, {"vectors": "2"},
                   {"vectors": True}):
        with pytest.raises(ConfigError):
            Peer.connect(path, **kwargs)
    with pytest.raises(ConfigError, match="socket_path"):
        Peer.connect(None)
    assert fd_count() == before


@pytest.mark.parametrize("bad", [1.0, "0", True, None])
def test_peer_vector_numbers_must_be_ints(peer, bad):
    # (1.0 and "0" raised TypeError from indexing a list; True rang vector 1)
    with pytest.raises(ConfigError, match="vector"):
        peer.notify(peer.id, bad)
    with pytest.raises(ConfigError, match="vector"):
        peer.vector_fd(bad)
    assert peer.notify_target(peer.id, bad) is None
