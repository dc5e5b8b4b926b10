"""Sensor-rate machinery: the node's latest-wins hand-over between workers and the soak arithmetic."""
from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_node():
    spec = importlib.util.spec_from_file_location('bench_node', ROOT / 'bench' / 'bench_node.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_slot_worker_keeps_only_the_latest_item_and_reports_replacements():
    """While the worker is busy, a newer item replaces the waiting one: at most one waits."""
    pytest.importorskip('rclpy')
    from zeroflow_ros.node import _SlotWorker
    gate, seen, stop = threading.Event(), [], threading.Event()

    def work(item):
        gate.wait(5)
        seen.append(item)

    w = _SlotWorker('test_slot', work, stop)
    w.start()
    try:
        assert w.put(1) is False
        deadline = time.monotonic() + 5
        while w._item is not None and time.monotonic() < deadline:
            time.sleep(0.001)  # until the worker took item 1 (it then blocks on the gate)
        assert not w.idle()
        assert w.put(2) is False      # waits
        assert w.put(3) is True       # replaces 2
        assert w.put(4) is True       # replaces 3
        gate.set()
        deadline = time.monotonic() + 5
        while not w.idle() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert seen == [1, 4] and w.idle()
    finally:
        stop.set()
        w.stop()
        w.thread.join(5)
    assert not w.thread.is_alive()


def test_soak_drift_compares_first_and_last_third():
    bn = _bench_node()
    rows = [{'v': x} for x in (10.0, 10.0, 11.0, 12.0, 12.0, 13.0)]
    assert bn.drift(rows, 'v') == pytest.approx((12.5 - 10.0) / 10.0 * 100, abs=0.05)
    assert bn.drift(rows[:2], 'v') == 0.0
    assert bn.drift(rows[:1], 'v') != bn.drift(rows[:1], 'v')  # NaN: one minute says nothing
