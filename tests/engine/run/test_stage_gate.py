"""The stages' gate (issue 15): background reads and writes wait for the calling thread to run
the model (``native_section``) or to wait on a stage, at most ``GATE_WAIT`` seconds.

The order and the content of what is read and written never change; these tests check
when the work may happen, and that no wait can stall a run (a caller waiting on a stage opens
the gate itself). Waits are bounded by events, never by sleeping for a result.
"""
from __future__ import annotations

import threading
import time

import pytest

from engine.run import stages
from engine.run.stages import Gate, ReadAhead, WriteBehind, gated, native_section

LONG = 60.0  # GATE_WAIT in the tests: a test never reaches it unless the gate is broken


def test_a_batch_is_read_ahead_only_once_the_gate_opens(monkeypatch):
    monkeypatch.setattr(stages, "GATE_WAIT", LONG)
    gate, calls, read = Gate(), [], threading.Event()

    def reader(idx):
        calls.append(list(idx))
        read.set()
        return [i * 10 for i in idx]

    with ReadAhead(reader, [[0], [1], [2]], gate=gate) as batches:
        assert next(batches) == ([0], [0])  # the caller waited: the gate was open for it
        read.clear()
        assert not read.wait(0.3) and calls == [[0]]  # batch 1 waits for the gate
        with gate.opened():
            assert read.wait(LONG)
        assert calls == [[0], [1]]
        assert list(batches) == [([1], [10]), ([2], [20])]


def test_a_caller_waiting_on_the_stages_is_never_stalled_by_a_closed_gate(monkeypatch):
    monkeypatch.setattr(stages, "GATE_WAIT", LONG)
    gate, out = Gate(), []
    t0 = time.monotonic()
    with ReadAhead(lambda idx: list(idx), [[0], [1], [2], [3]], gate=gate) as batches, \
            WriteBehind(out.append, gate=gate) as w:
        for idx, cases in batches:
            w.submit(cases, n=1)
        w.drain()
    assert out == [[0], [1], [2], [3]] and w.written == 4
    assert time.monotonic() - t0 < LONG / 2


def test_an_item_is_written_once_the_gate_opens_or_the_caller_drains(monkeypatch):
    monkeypatch.setattr(stages, "GATE_WAIT", LONG)
    gate, out, wrote = Gate(), [], threading.Event()

    def write(item):
        out.append(item)
        wrote.set()

    with WriteBehind(write, gate=gate) as w:
        w.submit("a")
        assert not wrote.wait(0.3) and out == []
        with gated(gate), native_section():  # the model runs: the write goes on meanwhile
            assert wrote.wait(LONG)
        w.submit("b")
        w.drain()  # the caller waits: the gate is open for it
        assert out == ["a", "b"]


def test_without_the_gate_opened_the_work_starts_after_gate_wait(monkeypatch):
    monkeypatch.setattr(stages, "GATE_WAIT", 0.01)
    gate, read = Gate(), threading.Event()

    def reader(idx):
        if idx == [1]:
            read.set()
        return list(idx)

    with ReadAhead(reader, [[0], [1]], gate=gate) as batches:
        next(batches)
        assert read.wait(LONG)  # read ahead although nobody opened the gate


def test_native_section_opens_the_gate_of_its_run_only():
    a, b = Gate(), Gate()
    with gated(a):
        with native_section():
            assert a.is_open and not b.is_open
        assert not a.is_open
    with native_section():  # outside a run: nothing
        assert not a.is_open and not b.is_open


def test_a_stop_ends_a_reader_waiting_at_the_gate(monkeypatch):
    monkeypatch.setattr(stages, "GATE_WAIT", LONG)
    calls = []
    r = ReadAhead(lambda idx: calls.append(idx) or list(idx), [[0], [1], [2]], gate=Gate())
    next(r)
    t0 = time.monotonic()
    r.close()  # the thread waits at the gate for batch 1: it stops without reading it
    assert time.monotonic() - t0 < LONG / 2 and calls == [[0]]


@pytest.mark.parametrize("threaded", [True, False])
def test_an_ungated_stage_works_as_before(threaded):
    out = []
    with ReadAhead(lambda idx: list(idx), [[0], [1]], threaded=threaded) as batches, \
            WriteBehind(out.append, threaded=threaded) as w:
        for _, cases in batches:
            w.submit(cases)
        w.drain()
    assert out == [[0], [1]]
