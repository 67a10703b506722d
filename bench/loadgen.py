"""The benchmarks' HTTP load generator: raw HTTP/1.1 on keep-alive connections, in a
process of its own so that its CPU is not the server's.

Open loop (``rate`` > 0): request i is due at ``start + i / rate`` and its latency counts
from that moment, so a server stall also delays, in the figures, every request queued
behind it (no coordinated omission). Closed loop (``rate`` 0): every connection sends its
next request as soon as the reply before has ended; that measures the most calls/s.

The generator keeps its own errors out of what it measures:

* The event loop's timers fire to the millisecond. A request sent from a timer leaves up
  to about 1 ms late, and that delay would be counted as the server's. The dispatcher
  waits on a Linux timerfd instead, armed for each request's due moment to the
  nanosecond (with the process's timer slack set to 1 ns), and the loop reads replies
  meanwhile. Polling the clock until each due moment would be as punctual but would keep
  most of a core busy, taken from the servers measured on the same machine. How late
  each request left is recorded (``dispatch_late``) and printed with the figures: it is
  the instrument's own error.
* Its garbage collector is off while a phase runs (a full collection of the growing
  result lists stalled it for ~30 ms, which looked like a server stall) and runs between
  phases instead.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass, field

# Wake this long before a request is due, then poll the clock to the due moment: waking a
# sleeping process takes ~0.05 ms here (at p99 ~0.17 ms), polling all the time would keep
# most of a core busy.
WAKE_AHEAD_SECONDS = 0.0002
START_DELAY_SECONDS = 0.2  # for the connections to open before the first request is due


@dataclass
class Phase:
    name: str
    port: int
    requests: list[bytes]  # whole HTTP requests, sent in turn
    seconds: float
    rate: int = 0  # requests/s, open loop; 0: closed loop, every connection busy
    connections: int = 64
    stream: bool = False  # also record the time to the first byte of the body


@dataclass
class Outcome:
    name: str
    requests: int = 0
    errors: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, to the last byte
    first_bytes: list[float] = field(default_factory=list)  # seconds, to the first body byte (stream phases)
    dispatch_late: list[float] = field(default_factory=list)  # seconds each request left after it was due


def http_request(path: str, token: str, body: bytes | None) -> bytes:
    """A keep-alive HTTP/1.1 request with a bearer token: POST with a JSON body, or GET."""
    method = b"POST" if body is not None else b"GET"
    body = body or b""
    return (method + b" " + path.encode() + b" HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer " + token.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
            + body)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[bool, float]:
    """Send one request, read the whole reply (content-length or chunked); return (status
    was 200, the perf_counter time the first body byte arrived)."""
    writer.write(request)
    status = await reader.readline()
    length, chunked = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    first = 0.0
    if not chunked:
        await reader.readexactly(length)
        first = time.perf_counter()
    else:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size and not first:
                first = time.perf_counter()
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return b" 200 " in status, first


async def run_phase(phase: Phase) -> Outcome:
    outcome = Outcome(phase.name)
    requests = phase.requests
    queue: asyncio.Queue[int] = asyncio.Queue()
    start = time.perf_counter() + START_DELAY_SECONDS
    stop_at = start + phase.seconds

    async def worker(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", phase.port)
        i = n
        try:
            while True:
                if phase.rate:
                    i = await queue.get()
                    if i < 0:
                        return
                    due = start + i / phase.rate
                else:
                    due = time.perf_counter()
                    if due >= stop_at:
                        return
                ok, first = await exchange(reader, writer, requests[i % len(requests)])
                done = time.perf_counter()
                if not phase.rate and done > stop_at:
                    return  # finished after the window closed: not counted
                outcome.requests += 1
                outcome.errors += not ok
                outcome.latencies.append(done - due)
                if phase.stream:
                    outcome.first_bytes.append(first - due)
                i += phase.connections
        finally:
            writer.close()

    if phase.rate:
        workers = [asyncio.create_task(worker(n)) for n in range(phase.connections)]
        with DueTimer() as timer:
            for i in range(int(phase.rate * phase.seconds)):
                due = start + i / phase.rate
                await timer.wait_until(due - WAKE_AHEAD_SECONDS)
                while time.perf_counter() < due:
                    await asyncio.sleep(0)  # replies are read meanwhile
                outcome.dispatch_late.append(time.perf_counter() - due)
                queue.put_nowait(i)
        for _ in workers:
            queue.put_nowait(-1)
    else:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        workers = [asyncio.create_task(worker(n)) for n in range(phase.connections)]
    await asyncio.gather(*workers)
    outcome.elapsed = (time.perf_counter() - start) if phase.rate else phase.seconds
    return outcome


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class DueTimer:
    """Wake the event loop at a ``time.perf_counter()`` moment, to the nanosecond: a
    timerfd on CLOCK_MONOTONIC (the clock ``perf_counter`` reads on Linux), armed at an
    absolute time and watched by the loop like a socket."""

    CLOCK_MONOTONIC, TFD_TIMER_ABSTIME, PR_SET_TIMERSLACK = 1, 1, 29
    TFD_NONBLOCK, TFD_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC

    def __enter__(self) -> "DueTimer":
        if "CLOCK_MONOTONIC" not in time.get_clock_info("perf_counter").implementation:
            raise SystemExit("the load generator needs Linux (timerfd on the clock of time.perf_counter)")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.prctl(self.PR_SET_TIMERSLACK, 1, 0, 0, 0)  # wake within ns, not the default 50 µs
        self._fd = self._check(self._libc.timerfd_create(self.CLOCK_MONOTONIC, self.TFD_NONBLOCK | self.TFD_CLOEXEC))
        self._loop = asyncio.get_running_loop()
        self._fired: asyncio.Future[None] | None = None
        self._loop.add_reader(self._fd, self._on_fire)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)

    async def wait_until(self, moment: float) -> None:
        if moment <= time.perf_counter():
            return
        ns = round(moment * 1e9)
        spec = _Itimerspec(it_value=_Timespec(ns // 10**9, ns % 10**9))
        self._check(self._libc.timerfd_settime(self._fd, self.TFD_TIMER_ABSTIME, ctypes.byref(spec), None))
        self._fired = self._loop.create_future()
        await self._fired

    def _on_fire(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return
        if self._fired is not None and not self._fired.done():
            self._fired.set_result(None)

    def _check(self, result: int) -> int:
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return result


class LoadGenerator:
    """The generator's process: ``with LoadGenerator() as load: outcome = load.run(phase)``.
    Phases run one at a time, when asked, so the caller can read counters around each."""

    def __enter__(self) -> "LoadGenerator":
        ctx = multiprocessing.get_context("spawn")
        self._phases, self._outcomes = ctx.Queue(), ctx.Queue()
        self._process = ctx.Process(target=_serve, args=(self._phases, self._outcomes), daemon=True)
        self._process.start()
        return self

    def run(self, phase: Phase) -> Outcome:
        self._phases.put(phase)
        return self._outcomes.get()

    def __exit__(self, *exc: object) -> None:
        self._phases.put(None)
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()


def _serve(phases, outcomes) -> None:
    import uvloop

    async def go() -> None:
        loop = asyncio.get_running_loop()
        while (phase := await loop.run_in_executor(None, phases.get)) is not None:
            gc.collect()
            gc.disable()
            try:
                outcome = await run_phase(phase)
            finally:
                gc.enable()
            outcomes.put(outcome)

    uvloop.run(go())


def percentile_ms(values: list[float], permille: int) -> float:
    """The ``permille``-th of 1000 quantiles of ``values`` (seconds), in milliseconds."""
    if len(values) < 2:
        return float("nan")
    return statistics.quantiles(values, n=1000)[permille - 1] * 1000


def summary(outcomes: list[Outcome]) -> dict:
    """Latency figures of one or more runs of a phase (ms), with the generator's own lateness."""
    latencies = sorted(x for o in outcomes for x in o.latencies)
    first = [x for o in outcomes for x in o.first_bytes]
    late = [x for o in outcomes for x in o.dispatch_late]
    requests = sum(o.requests for o in outcomes)
    elapsed = sum(o.elapsed for o in outcomes)
    out = {"requests": requests, "errors": sum(o.errors for o in outcomes), "achieved_rps": requests / elapsed,
           "p50_ms": percentile_ms(latencies, 500), "p99_ms": percentile_ms(latencies, 990),
           "max_ms": latencies[-1] * 1000 if latencies else float("nan")}
    if first:
        out.update(ttfb_p50_ms=percentile_ms(first, 500), ttfb_p99_ms=percentile_ms(first, 990))
    if late:
        out.update(dispatch_late_p50_ms=percentile_ms(late, 500), dispatch_late_p99_ms=percentile_ms(late, 990))
    return out
