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

from services.gateway import app as gateway_app
from services.gateway.app import run_gateway, spool_path
from services.gateway.spool import FileRecord, Spool, SpoolError
from services.local_services import LocalBroker, free_port, port_in_use
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


async def around_a_gateway(stack: contextlib.AsyncExitStack, database_url: str, bootstrap: str,
                           topic_names: dict[str, str], tmp_path, *, topics: bool = True, **extra):
    """upstream-sim and metering serving (in ``stack``), the topics created: the gateway's
    settings (``metering_url`` set) and upstream's URL."""
    upstream_url = await stack.enter_async_context(upstream_server())
    settings = gateway_settings(database_url, bootstrap, topic_names, tmp_path,
                                metering_url="http://127.0.0.1:1", upstream_url=upstream_url, **extra)
    if topics:
        await create_topics(settings)
    metering_url = await stack.enter_async_context(metering_server(settings, database_url))
    return settings.model_copy(update={"metering_url": metering_url}), upstream_url


async def test_events_spooled_while_the_broker_is_down_reach_the_ledger_exactly_once(
        database_url, topic_names, tmp_path) -> None:
    broker = LocalBroker(port=free_port(), log_path=tmp_path / "broker.log").start()
    try:
        seed_reference_data(database_url)
        async with contextlib.AsyncExitStack() as stack:
            settings, upstream_url = await around_a_gateway(stack, database_url, broker.bootstrap_servers,
                                                            topic_names, tmp_path)
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
        settings, upstream_url = await around_a_gateway(stack, database_url, broker.bootstrap_servers,
                                                        topic_names, tmp_path)

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
        settings, upstream_url = await around_a_gateway(stack, database_url, f"127.0.0.1:{free_port()}",
                                                        topic_names, tmp_path, topics=False, spool_max_events=3)
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


@contextlib.asynccontextmanager
async def gateway_process(settings, upstream_url: str, data_dir, port: int):
    """``tollhouse gateway`` as a process of its own (GATEWAY_ID gw-cli), ready to serve."""
    env = {**os.environ, "TOLLHOUSE_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
           "TOLLHOUSE_GATEWAY_TOKEN": settings.gateway_token, "TOLLHOUSE_METERING_URL": settings.metering_url,
           "TOLLHOUSE_UPSTREAM_BASE_URL": f"{upstream_url}/v1", "TOLLHOUSE_USAGE_TOPIC": settings.usage_topic,
           "TOLLHOUSE_DATA_DIR": str(data_dir), "TOLLHOUSE_GATEWAY_ID": "gw-cli", "TOLLHOUSE_LOG_FORMAT": "json"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "gateway", "--port", str(port), env=env, cwd=data_dir.parent,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        async def up() -> bool:
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(up, timeout=30, interval=0.2)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_gateway_command_serves_then_stops_on_sigterm_with_its_events_sent(
        database_url, broker, topic_names, tmp_path) -> None:
    seed_reference_data(database_url)
    port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        settings, upstream_url = await around_a_gateway(stack, database_url, broker.bootstrap_servers,
                                                        topic_names, tmp_path)
        async with gateway_process(settings, upstream_url, tmp_path / "cli", port) as process:
            served = await make_calls(f"http://127.0.0.1:{port}", 2)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0
        events = await usage_events(settings, 2, settle=0.5)
    assert sorted(e["data"]["request_id"] for e in events) == sorted(served)
    assert {e["source"] for e in events} == {"gateway/gw-cli"}


def held_rows(path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT count(*) FROM events WHERE held = 1").fetchone()[0]


async def test_a_gateway_killed_during_a_call_bills_the_call_as_its_fallback_when_it_starts_again(
        database_url, broker, topic_names, tmp_path) -> None:
    seed_reference_data(database_url)
    port = free_port()
    data_dir = tmp_path / "cli"
    async with contextlib.AsyncExitStack() as stack:
        settings, upstream_url = await around_a_gateway(stack, database_url, broker.bootstrap_servers,
                                                        topic_names, tmp_path)
        gateway_url = f"http://127.0.0.1:{port}"
        spool_file = spool_path(settings.model_copy(update={"data_dir": data_dir, "gateway_id": "gw-cli"}))

        async with gateway_process(settings, upstream_url, data_dir, port) as process:
            served = await make_calls(gateway_url, 1)
            async with openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=PAYG, max_retries=0) as client:
                slow = asyncio.create_task(client.chat.completions.create(
                    model="gpt-4o", messages=MESSAGES, max_tokens=40,
                    extra_headers={"X-Sim-Latency-Ms": "30000"}))
                await eventually(lambda: held_rows(spool_file) == 1, timeout=20)
                process.kill()  # SIGKILL while the call waits for upstream
                await process.wait()
                try:
                    await slow
                except openai.APIConnectionError:
                    pass
                else:
                    raise AssertionError("the call was answered by a killed gateway")
        assert held_rows(spool_file) == 1

        # Second life: the held call is billed as its fallback event, the first call as itself.
        async with gateway_process(settings, upstream_url, data_dir, port):
            events = await usage_events(settings, 2, settle=1.0)
            await eventually(lambda: _spool_empty(gateway_url), timeout=30)
        assert held_rows(spool_file) == 0

    by_status = {e["data"]["status"]: e["data"] for e in events}
    assert set(by_status) == {"ok", "cancelled"}
    assert by_status["ok"]["request_id"] == served[0]
    fallback = by_status["cancelled"]
    assert fallback["usage_estimated"] is True
    assert fallback["completion_tokens"] == 0 and fallback["prompt_tokens"] > 0
    assert fallback["total_tokens"] == fallback["prompt_tokens"]
    assert fallback["reservation_id"], "the fallback settles the call's reservation"
    async with running_consumer(settings, database_url):
        await eventually(lambda: len(ledger_request_ids(database_url)) == 2, timeout=30)
    assert fallback["request_id"] in ledger_request_ids(database_url)


@contextlib.asynccontextmanager
async def opened_spool(path):
    spool = await Spool(path, max_events=10, max_bytes=10**6).open()
    try:
        yield spool
    finally:
        await spool.close()


def spool_file_of_old(tmp_path, *statements: str):
    """A spool file as an older gateway left it: ``statements`` run on a new SQLite file."""
    path = tmp_path / "gateway-spool-old.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        for statement in statements:
            conn.execute(statement)
    return path


async def test_held_rows_are_not_sent_until_settled_and_a_reopened_spool_releases_them(tmp_path) -> None:
    path = tmp_path / "spool.sqlite"
    async with opened_spool(path) as spool:
        settled = await spool.hold(b"acc", b"fallback-1")
        dropped = await spool.hold(b"acc", b"fallback-2")
        left = await spool.hold(b"acc", b"fallback-3")
        await spool.append(b"acc", b"batch-event")
        assert (spool.events, spool.held, spool.sendable) == (4, 3, 1)
        assert [e.value for e in await spool.read(10)] == [b"batch-event"]

        await spool.settle(settled, b"acc", b"the-call-s-event")
        await spool.drop(dropped)
        assert (spool.events, spool.held, spool.sendable) == (3, 1, 2)
        assert spool.bytes == sum(len(b"acc") + len(v) for v in (b"the-call-s-event", b"fallback-3", b"batch-event"))
        assert [e.value for e in await spool.read(10)] == [b"the-call-s-event", b"batch-event"]
        try:
            await spool.settle(dropped, b"acc", b"late")
        except SpoolError as exc:
            assert "not held" in str(exc)
        else:
            raise AssertionError("a dropped row was settled")
        assert spool.held == 1 and left

    async with opened_spool(path) as reopened:
        assert reopened.released_on_open == 1
        assert (reopened.events, reopened.held, reopened.sendable) == (3, 0, 3)
        assert [e.value for e in await reopened.read(10)] == [b"the-call-s-event", b"fallback-3", b"batch-event"]


async def test_a_spool_file_from_before_held_rows_opens_with_its_events_to_send(tmp_path) -> None:
    path = spool_file_of_old(
        tmp_path,
        "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, key BLOB NOT NULL, value BLOB NOT NULL)",
        "INSERT INTO events (key, value) VALUES (x'61', x'62')")
    async with opened_spool(path) as spool:
        assert (spool.events, spool.sendable, spool.released_on_open) == (1, 1, 0)
        assert [(e.key, e.value) for e in await spool.read(10)] == [(b"a", b"b")]


async def test_a_spool_file_from_before_file_deletion_opens_with_its_file_records(tmp_path) -> None:
    path = spool_file_of_old(
        tmp_path,
        "CREATE TABLE files (file_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, key_id TEXT NOT NULL,"
        " purpose TEXT NOT NULL, model TEXT, lines INTEGER NOT NULL DEFAULT 0, prompt_estimate INTEGER"
        " NOT NULL DEFAULT 0, reserve_estimate INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL)",
        "INSERT INTO files VALUES ('file-a', 'acc_dev', 'key_payg', 'batch', 'gpt-4o', 2, 20, 50, 1.0)",
        "INSERT INTO files VALUES ('file-b', 'acc_dev', 'key_payg', 'batch', 'gpt-4o', 1, 10, 25, 2.0)")
    async with opened_spool(path) as spool:
        assert (await spool.file("file-a")).model == "gpt-4o"
        await spool.forget_file("file-a")
        assert await spool.file("file-a") is None
        await spool.record_file(FileRecord("file-a", "acc_dev", "key_payg", "batch", None, 0, 0, 0))  # not revived
        listed = await spool.account_files("acc_dev", after=None, limit=10, newest_first=True)
        assert [f.file_id for f in listed] == ["file-b"]


async def test_the_gateway_settles_its_heap_once_it_listens(database_url, broker, topic_names, tmp_path,
                                                             monkeypatch) -> None:
    """What start-up made (the app, its clients, the spool) lives as long as the process, so
    it is set aside from the garbage collector once the server listens, as metering does:
    collections while serving do not walk it (a full collection of the gateway's start-up
    heap paused the event loop for ~45 ms)."""
    port = free_port()
    settled: list[bool] = []
    monkeypatch.setattr(gateway_app, "settle_heap", lambda: settled.append(port_in_use(port)))
    async with contextlib.AsyncExitStack() as stack:
        settings, _ = await around_a_gateway(stack, database_url, broker.bootstrap_servers, topic_names, tmp_path)
        stop = asyncio.Event()
        serving = asyncio.create_task(run_gateway(settings, port=port, stop=stop))
        try:
            await eventually(lambda: bool(settled), timeout=30)
            assert settled == [True]  # once, with the port already listening
        finally:
            stop.set()
            await asyncio.wait_for(serving, 30)
