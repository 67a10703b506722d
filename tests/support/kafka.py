"""Producing and reading test traffic on the real broker, and running the consumer in-process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.metering.consumer.topics import ensure_topics
from services.metering.consumer.worker import UsageConsumer
from services.settings import Settings, load_settings


def metering_settings(database_url: str, bootstrap: str, topic_names: dict[str, str], **extra) -> Settings:
    return load_settings(
        database_url=database_url,
        kafka_bootstrap_servers=bootstrap,
        admin_token="admin-token",
        gateway_token="gateway-token",
        billing_token="billing-token",
        **topic_names,
        **extra,
    )


async def create_topics(settings: Settings) -> None:
    await ensure_topics(
        settings.kafka_bootstrap_servers,
        [settings.usage_topic, settings.dlq_topic, settings.breach_topic],
        settings.topic_partitions,
    )


async def produce(bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]]) -> int:
    """Send (key, value) pairs with acks=all; return how many were sent."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=5,
                                max_request_size=16 * 1024 * 1024)
    await producer.start()
    try:
        pending = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*pending)
        return len(pending)
    finally:
        await producer.stop()


async def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list:
    """Read ``expected`` messages from the start of ``topic`` (fails on timeout)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                out.extend(messages)
    finally:
        await consumer.stop()
    return out


async def consume_until(settings: Settings, database_url: str, predicate, timeout: float = 120.0, *,
                        consumer: UsageConsumer | None = None) -> UsageConsumer:
    """Run one consumer in-process until ``predicate(consumer)`` holds, then stop it cleanly."""
    consumer = consumer or UsageConsumer(settings, database_url)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    deadline = time.monotonic() + timeout
    try:
        while not predicate(consumer):
            if task.done():
                task.result()
                raise AssertionError("consumer stopped early")
            if time.monotonic() > deadline:
                raise AssertionError(f"consumer did not finish in {timeout} s: {consumer.totals}")
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    return consumer
