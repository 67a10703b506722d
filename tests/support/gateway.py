"""Real servers for gateway tests, each on a free port in this process: the metering API
(real authorizer on the test database), the upstream simulator, the gateway itself, and
the usage consumer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import uvicorn

from services.gateway.app import create_app as create_gateway_app
from services.local_services import free_port
from services.metering.api import authorize, models
from services.metering.api.app import create_app as create_metering_app
from services.metering.authorizer import Authorizer
from services.metering.consumer.worker import UsageConsumer
from services.metering.store.db import make_engine
from services.settings import Settings
from services.upstream_sim.app import create_app as create_sim_app
from services.upstream_sim.config import SimConfig
from tests.support.kafka import metering_settings, read_topic

GATEWAY_TOKEN = "gateway-token"


def gateway_settings(database_url: str, bootstrap: str, topic_names: dict[str, str], data_dir: Path, *,
                     metering_url: str, upstream_url: str, **extra) -> Settings:
    options = dict(
        metering_url=metering_url,
        upstream_base_url=f"{upstream_url}/v1",
        upstream_api_key="sk-upstream-test",
        data_dir=data_dir,
        gateway_id="gw-test",
        batch_poll_seconds=0.5,
        kafka_send_timeout_seconds=3.0,
        metering_timeout_seconds=2.0,
        upstream_timeout_seconds=30.0,
    )
    options.update(extra)
    return metering_settings(database_url, bootstrap, topic_names, **options)


@contextlib.asynccontextmanager
async def serve(app, port: int | None = None) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1:``port`` (a free one by default) until the block ends."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                          access_log=False, lifespan="on", http="httptools",
                                          timeout_graceful_shutdown=10))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise AssertionError(f"server on port {port} did not start")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def metering_server(settings: Settings, database_url: str, port: int | None = None,
                          **authorizer_options) -> AsyncIterator[str]:
    engine = make_engine(database_url, pool_size=4)
    authorizer = await Authorizer(database_url, **authorizer_options).start()
    app = create_metering_app(settings, engine, routers=[authorize.router, models.router])
    app.state.authorizer = authorizer
    try:
        async with serve(app, port) as url:
            yield url
    finally:
        await authorizer.stop()
        await engine.dispose()


@contextlib.asynccontextmanager
async def upstream_server(**config) -> AsyncIterator[str]:
    async with serve(create_sim_app(SimConfig(**config))) as url:
        yield url


@contextlib.asynccontextmanager
async def gateway_server(settings: Settings, port: int | None = None, **app_options) -> AsyncIterator[str]:
    async with serve(create_gateway_app(settings, **app_options), port) as url:
        yield url


@contextlib.asynccontextmanager
async def running_consumer(settings: Settings, database_url: str) -> AsyncIterator[UsageConsumer]:
    consumer = UsageConsumer(settings, database_url)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield consumer
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def usage_events(settings: Settings, expected: int, *, settle: float = 1.0, timeout: float = 30.0) -> list[dict]:
    """The usage events on the test's topic: waits for ``expected``, then ``settle`` more
    seconds for any extra one (so a test can assert there are exactly ``expected``)."""
    messages = await read_topic(settings.kafka_bootstrap_servers, settings.usage_topic, expected, timeout)
    if settle:
        messages = await read_topic(settings.kafka_bootstrap_servers, settings.usage_topic, expected + 1, settle)
    out = []
    for m in messages:
        event = msgspec.json.decode(m.value)
        event["_key"] = m.key
        out.append(event)
    return out


async def eventually(check, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


async def sim_usage(upstream_url: str) -> dict[str, dict]:
    """What the simulator served, by request id (its side of a reconciliation)."""
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{upstream_url}/sim/usage", params={"limit": 10_000})
    return {row["request_id"]: row for row in r.json()["data"]}
