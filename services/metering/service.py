"""Wires the metering service: topics, consumer, outbox relay, expiry sweeper and the API.

Everything is built here once and handed down (settings, database URL, engine), so tests
can run any part with their own servers.
"""

from __future__ import annotations

import asyncio

import structlog

from services.event_loop import watching_event_loop
from services.metering.consumer.expiry import run_expiry_sweeper
from services.metering.consumer.relay import OutboxRelay
from services.metering.consumer.topics import ensure_topics
from services.metering.consumer.worker import UsageConsumer, consumer_members
from services.metering.readiness import BrokerProbe, Readiness
from services.runtime import settle_heap, stop_on_signals
from services.settings import Settings

log = structlog.get_logger("tollhouse.metering")


async def run_metering(
    settings: Settings,
    database_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8081,
    serve_api: bool = True,
    consume: bool = True,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop``): the batch in flight finishes, then all stops."""
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    tasks: list[asyncio.Task] = []
    consumers: list[UsageConsumer] = []
    if consume:
        if not settings.kafka_bootstrap_servers:
            raise SystemExit("setting TOLLHOUSE_KAFKA_BOOTSTRAP_SERVERS: required to run the metering consumer")
        created = await ensure_topics(
            settings.kafka_bootstrap_servers,
            [settings.usage_topic, settings.dlq_topic, settings.breach_topic],
            settings.topic_partitions,
            replication_factor=settings.topic_replication_factor,
        )
        if created:
            log.info("topics_created", topics=created, partitions=settings.topic_partitions)
        consumers = consumer_members(settings, database_url)
        relay = OutboxRelay(settings, database_url)
        for consumer in consumers:
            consumer.on_commit.append(lambda outcome: relay.wake.set())
        tasks += [asyncio.create_task(c.run(stop), name=c.client_id) for c in consumers]
        tasks += [
            asyncio.create_task(relay.run(stop), name="outbox-relay"),
            asyncio.create_task(run_expiry_sweeper(settings, database_url, stop), name="expiry-sweeper"),
        ]
    server = None
    authorizer = None
    broker_probe = None
    if serve_api:
        import uvicorn

        from services.metering.api import authorize, dead_letters, models, quota, reconciliation
        from services.metering.api.app import create_app
        from services.metering.authorizer import Authorizer
        from services.metering.store.admin import database_ready
        from services.metering.store.db import make_engine

        engine = make_engine(database_url, pool_size=settings.db_pool_size)
        authorizer = await Authorizer(
            database_url,
            reservation_ttl_seconds=settings.reservation_ttl_seconds,
            snapshot_seconds=settings.quota_snapshot_seconds,
        ).start()
        app = create_app(
            settings,
            engine,
            routers=[authorize.router, models.router, quota.router, reconciliation.router, dead_letters.router],
        )
        app.state.authorizer = authorizer
        if consumers:  # only a consuming process uses Kafka (docs/operations.md)
            broker_probe = BrokerProbe(settings.kafka_bootstrap_servers)
            app.state.readiness = Readiness(lambda: database_ready(engine), broker=broker_probe,
                                            members=[c.membership for c in consumers])
        server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                           # Nothing here reads the client's address: no X-Forwarded-For rewriting per call.
                           proxy_headers=False, server_header=False)
        )
        server.install_signal_handlers = lambda: None  # signals are ours
        tasks.append(asyncio.create_task(server.serve(), name="api"))
    settle_heap()
    log.info("metering_started", api=f"http://{host}:{port}" if serve_api else None)
    async with watching_event_loop("metering"):
        done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task.get_name() != "api" and task.exception() is not None and task in tasks:
            log.error("task_failed", task=task.get_name(), error=repr(task.exception()))
    stop.set()
    if server is not None:
        server.should_exit = True
    results = await asyncio.gather(*tasks, return_exceptions=True)
    if authorizer is not None:
        await authorizer.stop()
    if broker_probe is not None:
        await broker_probe.close()
    for task, result in zip(tasks, results):
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            log.error("task_failed", task=task.get_name(), error=repr(result))
