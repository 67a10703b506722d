"""The outbox relay: publishes breaches and dead letters after their batch committed.

Rows are locked with SKIP LOCKED while they are sent, so several metering replicas can
relay side by side; a row is deleted only after Kafka acknowledged it (acks=all). A crash
between the ack and the delete sends it again: messages carry stable ids for consumers
to drop repeats.
"""

from __future__ import annotations

import asyncio

import structlog
from aiokafka import AIOKafkaProducer

from services.metering import metrics
from services.metering.store.ingest import claim_outbox, connect, delete_outbox
from services.settings import Settings

log = structlog.get_logger("tollhouse.relay")


class OutboxRelay:
    def __init__(self, settings: Settings, database_url: str, *, idle_seconds: float = 1.0) -> None:
        self.settings = settings
        self.database_url = database_url
        self.idle_seconds = idle_seconds
        self.wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            acks="all",
            enable_idempotence=self.settings.kafka_idempotent_producer,
            linger_ms=5,
        )
        await producer.start()
        conn = None
        try:
            while not stop.is_set():
                try:
                    if conn is None or conn.is_closed():
                        conn = await connect(self.database_url)
                    sent = await self._relay_once(conn, producer)
                except Exception as exc:
                    log.error("relay_failed", error=repr(exc))
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    sent = 0
                if sent < self.settings.outbox_batch_max:
                    self.wake.clear()
                    try:
                        await asyncio.wait_for(self.wake.wait(), timeout=self.idle_seconds)
                    except asyncio.TimeoutError:
                        pass
        finally:
            await producer.stop()
            if conn is not None and not conn.is_closed():
                await conn.close()

    async def _relay_once(self, conn, producer: AIOKafkaProducer) -> int:
        async with conn.transaction():
            rows = await claim_outbox(conn, self.settings.outbox_batch_max)
            if not rows:
                return 0
            pending = [await producer.send(r["topic"], r["payload"], key=r["message_key"]) for r in rows]
            await asyncio.gather(*pending)
            await delete_outbox(conn, [r["outbox_id"] for r in rows])
        for r in rows:
            metrics.OUTBOX_PUBLISHED.labels(r["topic"]).inc()
        return len(rows)
