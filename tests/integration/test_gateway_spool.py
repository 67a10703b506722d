"""The gateway never loses a usage event: Kafka down, a gateway restart with a non-empty
spool, a full spool. Real broker (stopped and restarted on its port), real PostgreSQL,
the metering consumer booking into the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys

import httpx
import openai

from services.gateway.app import spool_path
from services.gateway.spool import FileRecord, Spool
from services.local_services import LocalBroker, free_port
from tests.integration.test_gateway import MESSAGES, PAYG, batch_file, seed_reference_data
from tests.support import seed
from tests.support.gateway import (
    eventually,
    gateway_server,
    gateway_settings,
    metering_server,
    running_consumer,
    sim_usage,
    upstream_server,
    usage_events,
)
from tests.support.kafka import create_topics


async def readiness(gateway_url: str) -> dict:
    async with httpx.AsyncClient(base_url=gateway_url) as client:
        return (await client.get("/readyz")).json()


async def make_calls(gateway_url: str, count: int) -> list[str]:
    """``count`` calls, alternating plain and streamed; the upstream response ids."""
    ids = []
    async with openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=PAYG, max_retries=0) as client:
        for i in range(count):
            if i % 2:
                stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
                ids.append([chunk async for chunk in stream][0].id)
            else:
                ids.append((await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)).id)
    return ids


def ledger_request_ids(database_url: str) -> list[str]:
    return [r for (r,) in seed.rows(database_url, "SELECT request_id FROM ledger_entries WHERE entry_type = 'usage'")]


async def test_events_spooled_while_the_broker_is_down_reach_the_ledger_exactly_once(
        database_url, topic_names, tmp_path) -> None:
    broker = LocalBroker(port=free_port(), log_path=tmp_path / "broker.log").start()
    try:
        seed_reference_data(database_url)
        async with contextlib.AsyncExitStack() as stack:
            upstream_url = await stack.enter_async_context(upstream_server())
            settings = gateway_settings(database_url, broker.bootstrap_servers, topic_names, tmp_path,
                                        metering_url="http://127.0.0.1:1", upstream_url=upstream_url)
            await create_topics(settings)
            metering_url = await stack.enter_async_context(metering_server(settings, database_url))
            settings = settings.model_copy(update={"metering_url": metering_url})
            gateway_url = await stack.enter_async_context(gateway_server(settings))

            # Broker up: calls are booked as they come.
            async with running_consumer(settings, database_url):
                before = await make_calls(gateway_url, 4)
                await eventually(lambda: len(ledger_request_ids(database_url)) == 4, timeout=30)

            # Broker down: calls are still served, and their events wait in the spool.
            broker.stop()
            during = await make_calls(gateway_url, 10)
            assert (await readiness(gateway_url))["spool_events"] == 10
            await eventually(lambda: _kafka_is(gateway_url, "disconnected"), timeout=30)

            # Broker back on the same port (its topics were in memory: create them again).
            broker = LocalBroker(port=broker.port, log_path=tmp_path / "broker.log").start()
            await create_topics(settings)
            await eventually(lambda: _spool_empty(gateway_url), timeout=60, interval=0.2)
            assert await _kafka_is(gateway_url, "connected")

            # A consumer of the new log (its offsets are a new group's) books what the spool held.
            after_restart = settings.model_copy(update={"consumer_group": topic_names["consumer_group"] + "-2"})
            async with running_consumer(after_restart, database_url):
                await eventually(lambda: len(ledger_request_ids(database_url)) >= 14, timeout=60)
                await asyncio.sleep(1.0)  # time for a duplicate to show up, if there were one

        booked = ledger_request_ids(database_url)
        assert len(set(before + during)) == 14
        assert sorted(booked) == sorted(before + during)  # every call once: none lost, none twice
        assert seed.scalar(database_url, "SELECT count(DISTINCT event_id) FROM ledger_entries"
                                         " WHERE entry_type = 'usage'") == 14
    finally:
        broker.stop()


async def _kafka_is(gateway_url: str, state: str) -> bool:
    return (await readiness(gateway_url)).get("kafka") == state


async def _spool_empty(gateway_url: str) -> bool:
    return (await readiness(gateway_url)).get("spool_events") == 0


async def test_a_gateway_restarted_with_a_non_empty_spool_loses_nothing(
        database_url, broker, topic_names, tmp_path) -> None:
    seed_reference_data(database_url)
    dead_kafka = f"127.0.0.1:{free_port()}"
    async with contextlib.AsyncExitStack() as stack:
        upstream_url = await stack.enter_async_context(upstream_server())
        settings = gateway_settings(database_url, broker.bootstrap_servers, topic_names, tmp_path,
                                    metering_url="http://127.0.0.1:1", upstream_url=upstream_url)
        await create_topics(settings)
        metering_url = await stack.enter_async_context(metering_server(settings, database_url))
        settings = settings.model_copy(update={"metering_url": metering_url})

        # First life: Kafka unreachable, so every event stays in the spool file.
        unreachable = settings.model_copy(update={"kafka_bootstrap_servers": dead_kafka})
        async with gateway_server(unreachable) as gateway_url:
            served = await make_calls(gateway_url, 6)
            async with openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=PAYG, max_retries=0) as client:
                uploaded = await client.files.create(file=("in.jsonl", batch_file(2), "application/jsonl"),
                                                     purpose="batch")
                job = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                  completion_window="24h",
                                                  extra_headers={"X-Sim-Batch-Delay-Ms": "3000"})
            assert (await readiness(gateway_url))["spool_events"] == 6
        with contextlib.closing(sqlite3.connect(spool_path(settings))) as db:
            assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 6
            assert db.execute("SELECT emitted_event_id FROM batches").fetchall() == [(None,)]

        # Second life, same GATEWAY_ID and DATA_DIR, Kafka reachable: the spool drains, and the
        # batch created in the first life is billed by this one's poller.
        async with gateway_server(settings) as gateway_url:
            events = await usage_events(settings, 7, settle=1.0, timeout=60)
            await eventually(lambda: _spool_empty(gateway_url), timeout=30)

    by_request = {e["data"]["request_id"]: e for e in events}
    assert set(by_request) == set(served) | {job.id}
    assert by_request[job.id]["data"]["kind"] == "batch"
    async with running_consumer(settings, database_url):
        await eventually(lambda: len(ledger_request_ids(database_url)) == 7, timeout=30)
    assert sorted(ledger_request_ids(database_url)) == sorted(served + [job.id])


async def test_a_full_spool_refuses_new_calls_rather_than_serve_them_unmetered(
        database_url, broker, topic_names, tmp_path) -> None:
    seed_reference_data(database_url)
    async with contextlib.AsyncExitStack() as stack:
        upstream_url = await stack.enter_async_context(upstream_server())
        settings = gateway_settings(database_url, f"127.0.0.1:{free_port()}", topic_names, tmp_path,
                                    metering_url="http://127.0.0.1:1", upstream_url=upstream_url,
                                    spool_max_events=3)
        metering_url = await stack.enter_async_context(metering_server(settings, database_url))
        settings = settings.model_copy(update={"metering_url": metering_url})
        gateway_url = await stack.enter_async_context(gateway_server(settings))

        await make_calls(gateway_url, 3)
        async with openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=PAYG, max_retries=0) as client:
            try:
                await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            except openai.APIStatusError as refused:
                assert refused.status_code == 503 and refused.code == "unavailable"
                assert "TOLLHOUSE_SPOOL_MAX_EVENTS" in refused.response.json()["msg"]
            else:
                raise AssertionError("a call was served with the spool full")
        async with httpx.AsyncClient(base_url=gateway_url) as client:
            assert (await client.get("/readyz")).status_code == 503
        assert len(await sim_usage(upstream_url)) == 3  # the refused call never reached upstream


async def test_the_gateway_command_serves_then_stops_on_sigterm_with_its_events_sent(
        database_url, broker, topic_names, tmp_path) -> None:
    seed_reference_data(database_url)
    port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        upstream_url = await stack.enter_async_context(upstream_server())
        settings = gateway_settings(database_url, broker.bootstrap_servers, topic_names, tmp_path,
                                    metering_url="http://127.0.0.1:1", upstream_url=upstream_url)
        await create_topics(settings)
        metering_url = await stack.enter_async_context(metering_server(settings, database_url))
        env = {**os.environ, "TOLLHOUSE_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
               "TOLLHOUSE_GATEWAY_TOKEN": settings.gateway_token, "TOLLHOUSE_METERING_URL": metering_url,
               "TOLLHOUSE_UPSTREAM_BASE_URL": f"{upstream_url}/v1", "TOLLHOUSE_USAGE_TOPIC": settings.usage_topic,
               "TOLLHOUSE_DATA_DIR": str(tmp_path / "cli"), "TOLLHOUSE_GATEWAY_ID": "gw-cli",
               "TOLLHOUSE_LOG_FORMAT": "json"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "gateway", "--port", str(port), env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            gateway_url = f"http://127.0.0.1:{port}"

            async def up() -> bool:
                try:
                    async with httpx.AsyncClient() as client:
                        return (await client.get(f"{gateway_url}/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await eventually(up, timeout=30, interval=0.2)
            served = await make_calls(gateway_url, 2)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        events = await usage_events(settings, 2, settle=0.5)
    assert sorted(e["data"]["request_id"] for e in events) == sorted(served)
    assert {e["source"] for e in events} == {"gateway/gw-cli"}


async def test_a_spool_file_from_before_file_deletion_opens_with_its_file_records(tmp_path) -> None:
    path = tmp_path / "gateway-spool-old.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE files (file_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, key_id TEXT NOT NULL,"
                     " purpose TEXT NOT NULL, model TEXT, lines INTEGER NOT NULL DEFAULT 0, prompt_estimate INTEGER"
                     " NOT NULL DEFAULT 0, reserve_estimate INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL)")
        conn.execute("INSERT INTO files VALUES ('file-a', 'acc_dev', 'key_payg', 'batch', 'gpt-4o', 2, 20, 50, 1.0)")
        conn.execute("INSERT INTO files VALUES ('file-b', 'acc_dev', 'key_payg', 'batch', 'gpt-4o', 1, 10, 25, 2.0)")
    spool = await Spool(path, max_events=10, max_bytes=10**6).open()
    try:
        assert (await spool.file("file-a")).model == "gpt-4o"
        await spool.forget_file("file-a")
        assert await spool.file("file-a") is None
        await spool.record_file(FileRecord("file-a", "acc_dev", "key_payg", "batch", None, 0, 0, 0))  # not revived
        listed = await spool.account_files("acc_dev", after=None, limit=10, newest_first=True)
        assert [f.file_id for f in listed] == ["file-b"]
    finally:
        await spool.close()
