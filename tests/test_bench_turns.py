"""The turns that wake-up senders of different transports take (pyivshmem.bench.workers), with
real FIFOs and threads but no timing: the order of their sends is checked, not their speed."""
from __future__ import annotations

import os
import threading

import pytest

from pyivshmem.bench import workers
from pyivshmem.bench.peers import Endpoint
from pyivshmem.bench.workers import STOP, WAKE_ANSWER, wake_send


def _ring_of_fifos(tmp_path, n, started=True):
    paths = [str(tmp_path / f"turn{k}") for k in range(n)]
    for p in paths:
        os.mkfifo(p, 0o600)
    # held open by "the runner" for the whole trial, as Runner._in_turns does
    fds = [os.open(p, os.O_RDWR) for p in paths]
    if started:  # every sender started (Runner._in_turns marks it before the first turn)
        (tmp_path / workers.TURNS_STARTED).touch()
    return paths, fds


def _senders(paths, names, count, sent, lock, start=None):
    n = len(paths)
    threads, results = [], {}

    def run(k, name):
        def send(m):
            with lock:
                sent.append((name, m))

        def answer():  # the receiver's answer to a message
            with lock:
                sent.append((name, WAKE_ANSWER))
            return WAKE_ANSWER

        task = {"size": 64, "gap": 0, "count": count}
        if paths:
            task.update(turn_in=paths[k], turn_out=paths[(k + 1) % n])
        r = wake_send(Endpoint(send=send, recv=answer, try_recv=None), task)
        times = r.pop("sent_ns")  # one send time per message, in order (paired by the runner)
        if len(times) == count and times == sorted(times):
            results[name] = r

    for k, name in enumerate(names):
        if start is not None and name not in start:
            continue
        th = threading.Thread(target=run, args=(k, name), daemon=True)
        th.start()
        threads.append(th)
    return threads, results


def _run_ring(tmp_path, names, count, start=None):
    """Senders ``names`` in a ring of FIFOs (only those in ``start`` run), the first turn put
    in; what they sent, in order, and their results."""
    paths, fds = _ring_of_fifos(tmp_path, len(names))
    sent, lock = [], threading.Lock()
    try:
        threads, results = _senders(paths, names, count, sent, lock, start=start)
        os.write(fds[0], b".")  # the first turn
        for th in threads:
            th.join(30)
            assert not th.is_alive()
    finally:
        for fd in fds:
            os.close(fd)
    return sent, results


@pytest.mark.timeout(60)
def test_senders_in_a_ring_of_fifos_alternate_one_by_one(tmp_path):
    sent, results = _run_ring(tmp_path, "ABC", 50)
    order = [name for name, m in sent if m not in (STOP, WAKE_ANSWER)]
    assert order == list("ABC" * 50)
    assert all(len(m) == 64 for _name, m in sent if m not in (STOP, WAKE_ANSWER))
    # each sender waits for its receiver's answer before the next one sends (the next sender
    # must not run while this receiver wakes up)
    events = [(name, m == WAKE_ANSWER) for name, m in sent if m != STOP]
    assert events == [(name, answered) for name in "ABC" * 50 for answered in (False, True)]
    assert sorted(name for name, m in sent if m == STOP) == list("ABC")
    assert results == {"A": {}, "B": {}, "C": {}}


@pytest.mark.timeout(60)
def test_a_sender_whose_turn_never_comes_goes_on_alone_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "TURN_TIMEOUT", 0.2)
    # B never started (its transport failed): A's turns go into B's FIFO and stay there
    sent, results = _run_ring(tmp_path, "ABC", 5, start="AC")
    order = [name for name, m in sent if m not in (STOP, WAKE_ANSWER)]
    assert sorted(order) == list("AAAAACCCCC")
    assert order[0] == "A"
    # A had its first turn only; C never had one: both went on alone after the timeout
    assert results == {"A": {"turns_lost": True}, "C": {"turns_lost": True}}


def test_without_fifos_a_sender_sends_alone(tmp_path):
    sent, lock = [], threading.Lock()
    threads, results = _senders([], "A", 4, sent, lock)
    for th in threads:
        th.join(30)
    assert [m for _n, m in sent][-1] == STOP and len(sent) == 9  # 4 messages, 4 answers
    assert results == {"A": {}}


@pytest.mark.timeout(60)
def test_the_first_turn_waits_for_every_sender_to_start(tmp_path, monkeypatch):
    """The runner starts the senders one after another (a transport's workers may have to be
    spawned first, which can take longer than TURN_TIMEOUT on a loaded machine) and puts the
    first turn in only once all have started, which it marks with the file ``started`` beside
    the FIFOs.  A sender that started early must not count that time against its turn."""
    monkeypatch.setattr(workers, "TURN_TIMEOUT", 0.2)
    paths, fds = _ring_of_fifos(tmp_path, 2, started=False)
    sent, lock = [], threading.Lock()
    try:
        threads, results = _senders(paths, "AB", 5, sent, lock, start="A")
        # B's transport takes a while to start: several TURN_TIMEOUTs, measured on a clock,
        # which is the point of this test (not a synchronisation)
        threads[0].join(1.0)
        assert threads[0].is_alive(), "A went on before the first turn"
        more, results_b = _senders(paths, "AB", 5, sent, lock, start="B")
        (tmp_path / workers.TURNS_STARTED).touch()
        os.write(fds[0], b".")  # the first turn
        for th in threads + more:
            th.join(30)
            assert not th.is_alive()
    finally:
        for fd in fds:
            os.close(fd)
    assert [name for name, m in sent if m not in (STOP, WAKE_ANSWER)] == list("AB" * 5)
    assert results == {"A": {}} and results_b == {"B": {}}
