"""The event loop's health. Every call a service answers waits for its loop, so a loop that
is held up (a long computation, a blocking system call, the process not being run) adds
that wait to every call in flight at once. A timer due every LOOP_TICK_SECONDS measures
it: how late it fires is the wait any call would have had.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator

import structlog
from prometheus_client import Histogram

log = structlog.get_logger("tollhouse.event_loop")

LOOP_TICK_SECONDS = 0.1
LOOP_STALL_SECONDS = 0.05  # later than this: logged, with what the loop's thread did meanwhile

_RUSAGE = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)  # the thread's own, where there is such

LOOP_LAG = Histogram(
    "tollhouse_event_loop_lag_seconds", "How late the event loop ran a timer due every 0.1 s", ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


@contextlib.asynccontextmanager
async def watching_event_loop(service: str) -> AsyncIterator[None]:
    """While inside: observe the loop's lag into ``tollhouse_event_loop_lag_seconds`` and log
    ``event_loop_stalled`` for each stall, with what the loop's thread did over the tick that
    stalled (``window_ms``): ``cpu_ms`` it computed (close to ``window_ms``: code ran too long
    without yielding), ``waited`` times it slept or blocked in a system call, ``preempted``
    times the kernel took its CPU away, ``page_faults`` reads from disk to fill memory."""
    task = asyncio.create_task(_watch_loop(service), name="event-loop-watch")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _watch_loop(service: str) -> None:
    lag = LOOP_LAG.labels(service)
    while True:
        due = time.monotonic() + LOOP_TICK_SECONDS
        cpu, usage = time.thread_time(), resource.getrusage(_RUSAGE)
        await asyncio.sleep(LOOP_TICK_SECONDS)
        late = max(0.0, time.monotonic() - due)
        lag.observe(late)
        if late > LOOP_STALL_SECONDS:
            now = resource.getrusage(_RUSAGE)
            log.warning("event_loop_stalled", service=service, late_ms=round(late * 1000, 1),
                        window_ms=round((LOOP_TICK_SECONDS + late) * 1000, 1),
                        cpu_ms=round((time.thread_time() - cpu) * 1000, 1),
                        preempted=now.ru_nivcsw - usage.ru_nivcsw, waited=now.ru_nvcsw - usage.ru_nvcsw,
                        page_faults=now.ru_majflt - usage.ru_majflt)
