"""A wake-up trial's latencies: the sender reads the clock just before each send call, the
receiver just after each receive returns, and the runner pairs the two lists in order
(pyivshmem.bench.workers.wake_send, wake_recv, wake_latencies).  No timing: the clock is fake."""
from __future__ import annotations

import collections
import itertools

import pytest

from pyivshmem.bench import workers
from pyivshmem.bench.peers import Endpoint
from pyivshmem.bench.workers import STOP, WAKE_ANSWER, wake_latencies, wake_recv, wake_send


def test_latencies_pair_the_ith_arrival_with_the_ith_send():
    hist = wake_latencies([100, 5_000, 9_000], [1_100, 7_000, 9_500])
    assert hist.count == 3
    assert hist.min == 500
    assert hist.value_at_percentile(50) == pytest.approx(1_000, rel=0.01)
    assert hist.value_at_percentile(100) == pytest.approx(2_000, rel=0.01)


def test_a_message_lost_or_gained_is_an_error_not_a_figure():
    with pytest.raises(ValueError, match="3 messages sent but 2 received"):
        wake_latencies([1, 2, 3], [4, 5])


def test_an_arrival_before_its_send_is_a_mispairing_not_a_zero():
    with pytest.raises(ValueError, match="message 1 arrived 50 ns before it was sent"):
        wake_latencies([100, 200, 300], [150, 150, 400])


def test_the_clock_is_read_just_before_the_send_and_just_after_the_receive(monkeypatch):
    ticks = itertools.count(1_000, 1_000)  # every read of the clock moves it 1 us on
    monkeypatch.setattr(workers.time, "monotonic_ns", lambda: next(ticks))
    monkeypatch.setattr(workers.time, "sleep", lambda s: None)
    wire = collections.deque()
    clock_at_send = []
    answers = []

    def send(m):
        clock_at_send.append(next(ticks))  # what the transport sees: the clock moved once since
        wire.append(m)

    def answer():  # the receiver's answer, which the sender waits for after each message
        answers.append(len(wire))
        return WAKE_ANSWER

    out = wake_send(Endpoint(send=send, recv=answer, try_recv=None),
                    {"size": 64, "gap": 0.001, "count": 4})
    assert len(out["sent_ns"]) == 4
    # nothing between the clock and the call: the transport's time starts at the clock read
    assert [b - a for a, b in zip(out["sent_ns"], clock_at_send)] == [1_000] * 4
    assert len(wire) == 5 and wire[-1] == STOP
    assert all(len(m) == 64 for m in list(wire)[:4])
    assert answers == [1, 2, 3, 4]  # an answer awaited after each message, none after STOP
    back = []
    got = wake_recv(Endpoint(send=back.append, recv=wire.popleft, try_recv=None), {"size": 64})
    assert len(got["arrived_ns"]) == 4
    assert back == [WAKE_ANSWER] * 4  # each message answered, STOP not
    assert wake_latencies(out["sent_ns"], got["arrived_ns"]).count == 4
