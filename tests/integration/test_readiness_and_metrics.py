"""Readiness, metrics and logs of ``tollhouse metering`` as an operator sees them: the real
program in a child process, a real broker and PostgreSQL, probed over HTTP."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timedelta, timezone

import httpx

from services.contracts.events import build_usage_event, encode_event
from services.local_services import LocalBroker, free_port
from services.settings import load_settings
from tests.support import seed
from tests.support.kafka import create_topics, produce
from tests.support.processes import tollhouse_process, wait_for_http

GATEWAY = {"Authorization": "Bearer gateway-token"}


def process_settings(database_url: str, bootstrap: str, topic_names: dict[str, str], **extra) -> dict[str, object]:
    return {
        "database_url": database_url,
        "kafka_bootstrap_servers": bootstrap,
        "admin_token": "admin-token",
        "gateway_token": "gateway-token",
        "billing_token": "billing-token",
        "topic_partitions": 2,
        "log_format": "json",
        **topic_names,
        **extra,
    }


async def readiness(url: str, scope: str = "all") -> tuple[int, dict]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        r = await client.get(f"{url}/readyz", params={"scope": scope})
    return r.status_code, r.json()


async def until_readiness(url: str, status: int, timeout: float) -> dict:
    """Poll ``/readyz`` until it answers ``status``; the last body."""
    deadline = time.monotonic() + timeout
    seen: tuple[int, dict] = (0, {})
    while time.monotonic() < deadline:
        seen = await readiness(url)
        if seen[0] == status:
            return seen[1]
        await asyncio.sleep(0.25)
    raise AssertionError(f"{url}/readyz did not answer {status} within {timeout:.0f} s; last: {seen}")


async def test_readyz_follows_the_broker_and_the_consumer_group(database_url, topic_names, tmp_path) -> None:
    broker = LocalBroker(port=free_port(), log_path=tmp_path / "broker.log").start()
    try:
        settings = process_settings(database_url, broker.bootstrap_servers, topic_names)
        consuming_port, api_port = free_port(), free_port()
        consuming, api_only = f"http://127.0.0.1:{consuming_port}", f"http://127.0.0.1:{api_port}"
        with tollhouse_process(["metering", "--port", str(consuming_port)], settings, tmp_path, "consuming") as proc, \
                tollhouse_process(["metering", "--no-consumer", "--port", str(api_port)], settings, tmp_path,
                                  "api-only") as api_proc:
            wait_for_http(f"{consuming}/healthz", proc)
            wait_for_http(f"{api_only}/healthz", api_proc)

            # Ready once the cluster answers and the consumer has joined its group.
            body = await until_readiness(consuming, 200, timeout=60)
            assert body == {"status": "ok", "database": "ok", "broker": "ok", "consumer": "ok", "partitions": [0, 1]}
            assert (await readiness(api_only)) == (200, {"status": "ok", "database": "ok", "broker": "not used",
                                                         "consumer": "off"})

            # Broker stopped: the consuming process is not ready and says why; the API-only
            # process never uses Kafka and stays ready.
            broker.stop()
            body = await until_readiness(consuming, 503, timeout=15)
            assert body["code"] == 14 and body["error"]["code"] == "unavailable"
            assert body["msg"].startswith("not ready: broker: "), body
            assert broker.bootstrap_servers in body["msg"] and "database" not in body["msg"]
            assert (await readiness(api_only))[0] == 200
            # What the gateway asks: the consuming process's API still serves authorize.
            assert (await readiness(consuming, "api")) == (200, {"status": "ok", "database": "ok",
                                                                 "broker": "not checked", "consumer": "not checked"})

            # Broker back on its port (it kept its topics in memory: create them again).
            broker = LocalBroker(port=broker.port, log_path=tmp_path / "broker.log").start()
            await create_topics(load_settings(**settings))
            body = await until_readiness(consuming, 200, timeout=90)
            assert body["broker"] == "ok" and body["consumer"] == "ok"

            assert proc.stop() == 0 and api_proc.stop() == 0
        for p in (proc, api_proc):
            p.json_log()  # every line the programs wrote, libraries' included, is a JSON line
    finally:
        broker.stop()


async def test_metrics_cover_ingest_authorize_and_breaches(database_url, broker, topic_names, tmp_path) -> None:
    account, payg, model = "acc_metrics", "key_metrics", "chat-s"
    seed.create_account(database_url, account)
    seed.topup(database_url, account, 10 * 10**9, "t-1")
    seed.create_key(database_url, payg, account, "payg", daily_cap=1_000)  # 0.000001 CNY: the first call reaches it
    seed.add_price(database_url, model, input_price=2_000, output_price=8_000)
    day = timedelta(days=1)
    seed.create_account(database_url, "acc_expired")  # its package's expiry is booked by the sweeper
    seed.create_package(database_url, "acc_expired", "pkg_expired", 100, datetime.now(timezone.utc) - 2 * day,
                        datetime.now(timezone.utc) - day)
    settings = process_settings(database_url, broker.bootstrap_servers, topic_names, log_level="debug",
                                package_expiry_grace_seconds=0)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tollhouse_process(["metering", "--port", str(port)], settings, tmp_path, "metering") as proc:
        wait_for_http(f"{url}/healthz", proc)
        await until_readiness(url, 200, timeout=60)

        async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
            allowed = await client.post("/v1/authorize", headers={**GATEWAY, "X-Request-ID": "probe-42"},
                                        json={"api_key": payg, "model": model})
            assert allowed.json()["allowed"] and allowed.headers["x-request-id"] == "probe-42"
            refused = await client.post("/v1/authorize", headers=GATEWAY, json={"api_key": "sk-nobody", "model": model})
            assert refused.json()["reason"] == "invalid_api_key"
            assert re.fullmatch(r"[0-9a-f]{24}", refused.headers["x-request-id"])

            now = datetime.now(timezone.utc) - timedelta(seconds=1)
            events = [build_usage_event(account_id=account, key_id=payg, model=model, prompt_tokens=10,
                                        completion_tokens=5, request_id=f"req-{i}", time=now) for i in range(3)]
            messages = [(account.encode(), encode_event(e)) for e in events]
            messages.append((account.encode(), encode_event(events[0])))  # a redelivery
            messages.append((account.encode(), b"{not json"))  # poison
            await produce(broker.bootstrap_servers, topic_names["usage_topic"], messages)

            deadline = time.monotonic() + 60
            while True:
                text = (await client.get("/metrics")).text
                if sample(text, "tollhouse_events_consumed_total") >= 5 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
            await asyncio.sleep(1.5)  # one more lag report
            text = (await client.get("/metrics")).text
        assert proc.stop() == 0

    assert sample(text, "tollhouse_events_consumed_total") == 5
    assert sample(text, "tollhouse_events_accepted_total") == 3
    assert sample(text, "tollhouse_events_duplicate_total") == 1
    assert sample(text, 'tollhouse_events_dead_lettered_total{reason="invalid_json"}') == 1
    assert sample(text, 'tollhouse_breaches_total{type="daily_cap"}') == 1
    assert sample(text, 'tollhouse_breaches_total{type="package_expired"}') == 1
    assert sample(text, "tollhouse_consumer_partitions") == 2
    lags = {p: sample(text, f'tollhouse_consumer_lag{{partition="{p}"}}') for p in ("0", "1")}
    assert set(lags.values()) == {0}, lags
    assert sample(text, "tollhouse_batch_commit_seconds_count") >= 1
    assert sample(text, "tollhouse_produce_to_commit_seconds_count") >= 1
    assert sample(text, "tollhouse_event_to_commit_seconds_count") >= 1
    assert sample(text, 'tollhouse_authorize_decisions_total{reason="ok"}') == 1
    assert sample(text, 'tollhouse_authorize_decisions_total{reason="invalid_api_key"}') == 1
    assert sample(text, "tollhouse_authorize_seconds_count") == 2

    # The consumer's log lines about a batch carry its id and offsets.
    committed = [r for r in proc.json_log() if r["event"] == "batch_committed"]
    assert committed and all(re.fullmatch(r"bat_[0-9A-Z]{26}", r["batch_id"]) for r in committed)
    assert sum(last - first + 1 for r in committed for first, last in r["offsets"].values()) == 5


def sample(text: str, series: str) -> float:
    """The value of one series in Prometheus text format (``name`` or ``name{labels}``)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no series {series} in /metrics")
