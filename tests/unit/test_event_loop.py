"""The event-loop watch: a loop held up by blocking code is measured and logged as a stall,
with the loop's thread's own CPU time telling computation from waiting."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from services import event_loop
from services.event_loop import watching_event_loop


def _lag_count() -> float:
    return REGISTRY.get_sample_value("tollhouse_event_loop_lag_seconds_count", {"service": "test"}) or 0.0


def _stalls_above(seconds: str) -> float:
    below = REGISTRY.get_sample_value("tollhouse_event_loop_lag_seconds_bucket", {"service": "test", "le": seconds})
    return _lag_count() - (below or 0.0)


async def _hold_loop(monkeypatch, hold) -> list[dict]:
    monkeypatch.setattr(event_loop, "LOOP_TICK_SECONDS", 0.02)
    monkeypatch.setattr(event_loop, "LOOP_STALL_SECONDS", 0.15)  # well above what a shared machine adds
    with capture_logs() as logs:
        async with watching_event_loop("test"):
            await asyncio.sleep(0.05)  # the watch is ticking
            hold()
            await asyncio.sleep(0.05)  # the late tick fires, and the next on time
    return [entry for entry in logs if entry["event"] == "event_loop_stalled"]


async def test_a_busy_loop_is_a_stall_with_its_cpu_time(monkeypatch):
    ticks, above = _lag_count(), _stalls_above("0.1")

    def compute():
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass

    [stall] = await _hold_loop(monkeypatch, compute)
    assert stall["service"] == "test"
    assert stall["late_ms"] >= 280
    assert stall["cpu_ms"] >= 300  # the loop's thread itself computed through it
    assert _lag_count() - ticks >= 3
    assert _stalls_above("0.1") - above == 1


async def test_a_blocking_call_is_a_stall_without_cpu_time(monkeypatch):
    [stall] = await _hold_loop(monkeypatch, lambda: time.sleep(0.3))
    assert stall["late_ms"] >= 280
    assert stall["cpu_ms"] < 100  # it waited instead
    assert stall["waited"] >= 1


async def test_a_loop_that_keeps_up_logs_nothing(monkeypatch):
    assert await _hold_loop(monkeypatch, lambda: None) == []
