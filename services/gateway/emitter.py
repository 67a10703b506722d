"""Usage events out of the gateway: spool first, then Kafka.

A call's event goes through the spool's hold (see ``Spool``): ``hold`` starts spooling
the call's fallback event as the call goes upstream, ``settle`` puts the call's event in
its place when it ends (``settle_soon``: as the reply is written, once the fallback is
durable), ``release`` forgets it when the call never reached upstream.
``emit`` spools an event with nothing held before (a Batch API job's) and returns once it
is durable. A sender task drains the spool in order to ``USAGE_TOPIC`` (message key = ``account_id``, ``acks=all``) and deletes
rows only after the broker acknowledged them. While Kafka is unreachable the sender
retries with backoff and events wait in the spool; a restart sends what the spool holds.
A row may reach Kafka twice (an ack lost in a broker crash); metering counts an event id
once, so that is harmless. A row is never deleted unacknowledged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer

from services.contracts.events import UsageEvent, encode_event
from services.gateway import metrics
from services.gateway.spool import Spool, SpooledEvent, SpoolError
from services.settings import Settings

log = structlog.get_logger("tollhouse.gateway.emitter")

BACKOFF_MIN_SECONDS = 0.2
BACKOFF_MAX_SECONDS = 5.0
IDLE_POLL_SECONDS = 1.0
# After sending all it had, the sender waits this long before reading the spool again, so
# a busy gateway sends (and deletes) many events per round rather than a few. A round's
# work (the spool read, the producer, the broker's reply, the delete) competes with calls
# for the same cores: at 500 calls/s, rounds every 100 ms instead of 20 ms gave the calls a
# lower p99 in three alternating pairs of benchmark runs (README, Performance). Events reach
# Kafka up to this much later; the spool holds them durably meanwhile.
SEND_GATHER_SECONDS = 0.1
PRODUCER_STOP_SECONDS = 5.0


class Emitter:
    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        *,
        producer_factory: Callable[[], AIOKafkaProducer] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.topic = settings.usage_topic
        self.batch_max = settings.spool_send_batch_max
        self.send_timeout = settings.kafka_send_timeout_seconds
        self._producer_factory = producer_factory or self._default_producer
        self._producer: AIOKafkaProducer | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._detached: set[asyncio.Task] = set()
        self.connected = False
        self.last_error: str | None = None
        self.sent = 0

    def _default_producer(self) -> AIOKafkaProducer:
        s = self.settings
        timeout_ms = int(s.kafka_send_timeout_seconds * 1000)
        return AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap_servers,
            client_id=f"tollhouse-gateway-{s.gateway_id}",
            acks="all",
            enable_idempotence=s.kafka_idempotent_producer,
            linger_ms=5,
            request_timeout_ms=timeout_ms,
            retry_backoff_ms=250,
            max_request_size=max(1024 * 1024, s.max_event_bytes * 2),
        )

    # Emitting

    async def emit(self, event: UsageEvent) -> None:
        """Spool one usage event; return when it is durable (then Kafka gets it soon)."""
        await self.spool.append(event.data.account_id.encode(), encode_event(event))
        self._spooled(event)

    def hold(self, fallback: UsageEvent, *, streamed: bool = False) -> "Held":
        """Start spooling a call's fallback event (what the call is billed as if this
        process dies before it ends); the call goes on meanwhile. A ``streamed`` call's
        fsync never blocks the loop: its first bytes are passed on as they come."""
        value = encode_event(fallback)
        return Held(fallback, self.spool.hold(fallback.data.account_id.encode(), value, off_loop=streamed))

    async def settle(self, held: "Held", event: UsageEvent) -> None:
        """Spool the call's event in place of its fallback. If the fallback could not be
        spooled, the event is spooled on its own, durably (``SpoolError`` if that fails
        too: the call cannot be metered). If only the replacement fails, the fallback
        stays held and is billed when the gateway next starts."""
        assert not held.finished, "a call's event is settled once"
        held.finished = True
        await self._settle(held, event)

    async def settle_soon(self, held: "Held", event: Callable[[], UsageEvent]) -> None:
        """Return once the call is metered durably, so its reply may go, and leave the rest
        of ``settle`` to a task of its own (shutdown waits for it): with the fallback on
        disk, the call's event (``event()``, built there) replaces it as the reply is
        written; if the process dies first, the fallback is billed. If the fallback could
        not be spooled, the event is spooled durably before this returns (``SpoolError``
        if that fails too)."""
        assert not held.finished, "a call's event is settled once"
        held.finished = True
        try:
            await asyncio.shield(held.row)
        except SpoolError:
            await self.emit(event())
            return
        except asyncio.CancelledError:  # the call is being cancelled (shutdown): its event is spooled even so
            self.detached(self._settle_built(held, event))
            raise
        self.detached(self._settle_built(held, event))

    async def _settle_built(self, held: "Held", event: Callable[[], UsageEvent]) -> None:
        await self._settle(held, event())

    async def _settle(self, held: "Held", event: UsageEvent) -> None:
        try:
            seq = await asyncio.shield(held.row)
        except SpoolError:
            await self.emit(event)
            return
        try:
            await self.spool.settle(seq, event.data.account_id.encode(), encode_event(event))
        except SpoolError as exc:
            log.error("usage_event_left_as_fallback", error=str(exc), event_id=held.fallback.id,
                      account_id=event.data.account_id)
            return
        self._spooled(event)

    async def release(self, held: "Held") -> None:
        """Forget a call's fallback: the call never reached upstream, nothing is billed."""
        held.finished = True
        try:
            seq = await asyncio.shield(held.row)
        except SpoolError:
            return
        await self.spool.drop(seq)

    def detached(self, spooling: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run ``emit`` or ``settle`` in a task of its own, for paths that are being
        cancelled (a client that went away): the event is spooled even so, and shutdown
        waits for it."""
        task = asyncio.get_running_loop().create_task(spooling, name="emit-detached")
        self._detached.add(task)
        task.add_done_callback(self._detached_done)
        return task

    def _detached_done(self, task: asyncio.Task) -> None:
        self._detached.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("usage_event_not_spooled", error=repr(task.exception()))

    async def emit_batch(self, batch_id: str, event: UsageEvent) -> bool:
        """Spool a Batch API job's event unless it was spooled before (see Spool)."""
        added = await self.spool.append_batch_event(
            batch_id, event.id, event.data.account_id.encode(), encode_event(event))
        if added:
            self._spooled(event)
        return added

    def _spooled(self, event: UsageEvent) -> None:
        metrics.events_spooled_of(event.data.status, event.data.usage_estimated).inc()
        self._wake.set()

    # The sender

    async def start(self) -> "Emitter":
        if self.spool.released_on_open:
            log.warning("held_calls_billed_as_fallback", events=self.spool.released_on_open)
        self._task = asyncio.create_task(self._run(), name="usage-sender")
        return self

    async def stop(self, drain_seconds: float = 5.0) -> None:
        """Finish detached emits, give the sender ``drain_seconds`` to empty the spool, stop.
        Whatever is left stays in the spool for the next start."""
        if self._detached:
            await asyncio.gather(*list(self._detached), return_exceptions=True)
        deadline = time.monotonic() + drain_seconds
        while self.spool.sendable and self.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.send_timeout + PRODUCER_STOP_SECONDS)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
        await self._close_producer()

    async def _run(self) -> None:
        backoff = BACKOFF_MIN_SECONDS
        while not self._stopping.is_set():
            try:
                rows = await self.spool.read(self.batch_max)
            except Exception as exc:
                log.error("spool_read_failed", error=repr(exc))
                await self._pause(backoff)
                continue
            if not rows:
                self._wake.clear()
                if self.spool.sendable:  # stored between the read and the clear
                    continue
                try:
                    await asyncio.wait_for(self._wake.wait(), IDLE_POLL_SECONDS)
                except asyncio.TimeoutError:
                    pass
                continue
            acked = await self._send(rows)
            if acked:
                try:
                    await self.spool.delete(acked)
                except Exception as exc:  # the rows are sent again later; metering dedupes them
                    log.error("spool_delete_failed", error=repr(exc))
                metrics.EVENTS_SENT.inc(len(acked))
                self.sent += len(acked)
            if len(acked) == len(rows):
                backoff = BACKOFF_MIN_SECONDS
                if len(rows) < self.batch_max:  # caught up: let events gather for the next round
                    await self._pause(SEND_GATHER_SECONDS)
                continue
            metrics.SEND_FAILURES.inc()
            await self._close_producer()
            await self._pause(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)

    async def _send(self, rows: list[SpooledEvent]) -> list[SpooledEvent]:
        """Send rows in order; return those the broker acknowledged."""
        try:
            producer = await self._ready_producer()
            pending = await asyncio.wait_for(self._enqueue(producer, rows), self.send_timeout)
            results = await asyncio.wait_for(
                asyncio.gather(*pending, return_exceptions=True), self.send_timeout * 2)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc, len(rows))
            return []
        acked = [row for row, result in zip(rows, results) if not isinstance(result, BaseException)]
        if len(acked) < len(rows):
            first = next(r for r in results if isinstance(r, BaseException))
            self._failed(first, len(rows) - len(acked))
        else:
            if not self.connected:
                log.info("kafka_connected", spooled=self.spool.events)
            self.connected = True
            self.last_error = None
            metrics.KAFKA_CONNECTED.labels(self.settings.gateway_id).set(1)
        return acked

    async def _enqueue(self, producer: AIOKafkaProducer, rows: list[SpooledEvent]) -> list[asyncio.Future]:
        """Hand the rows to the producer in order (one timeout for them all: a timeout
        per row costs a task per event); the futures resolve on the broker's ack."""
        return [await producer.send(self.topic, row.value, key=row.key) for row in rows]

    def _failed(self, exc: BaseException, count: int) -> None:
        if self.connected or self.last_error is None:
            log.warning("kafka_send_failed", error=repr(exc), unsent=count, spooled=self.spool.events)
        self.connected = False
        self.last_error = repr(exc)
        metrics.KAFKA_CONNECTED.labels(self.settings.gateway_id).set(0)

    async def _ready_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = self._producer_factory()
            try:
                await asyncio.wait_for(producer.start(), self.send_timeout)
            except BaseException:
                await _stop_quietly(producer)
                raise
            self._producer = producer
        return self._producer

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _stop_quietly(producer)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass


@dataclass(slots=True)
class Held:
    """A call's fallback event, being spooled or spooled and held (see ``Emitter.hold``)."""

    fallback: UsageEvent
    row: asyncio.Future[int]  # the spool row, once on disk
    finished: bool = False  # settled or released


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    try:
        await asyncio.wait_for(producer.stop(), PRODUCER_STOP_SECONDS)
    except BaseException as exc:  # a producer that never connected may fail to stop; it is dropped
        if isinstance(exc, asyncio.CancelledError):
            raise
