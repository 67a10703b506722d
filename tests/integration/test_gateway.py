"""The gateway end to end on real servers: the official ``openai`` SDK (and plain httpx) →
gateway → metering authorize + upstream simulator, usage events on the real broker, and
(for the quota tests) the metering consumer booking them into the PostgreSQL ledger."""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import openai
import orjson
import psycopg
import pytest

from services.gateway.usage import CHAT, estimate_prompt_tokens
from services.local_services import free_port
from services.settings import Settings
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

NANO = 10**9
HOUR = timedelta(hours=1)
MESSAGES = [{"role": "user", "content": "Say hello to the metering tests, please."}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# Seeded keys: the API key of a seeded key is its key id (tests/support/seed.py).
PAYG = "key_payg"
OTHER_ACCOUNT = "key_other"


@dataclass
class Stack:
    settings: Settings
    database_url: str
    metering_url: str
    upstream_url: str
    gateway_url: str

    @property
    def base_url(self) -> str:
        return f"{self.gateway_url}/v1"

    def sync_client(self, key: str = PAYG) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=30)

    def async_client(self, key: str = PAYG) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=30)


def seed_reference_data(url: str) -> None:
    # 1 CNY per 1M tokens = 1,000 nano-CNY per token.
    for model in ("gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small"):
        seed.add_price(url, model, input_price=1_000, output_price=2_000)
    seed.add_price(url, "gpt-4", input_price=30_000, output_price=60_000, min_tier="developer")
    now = datetime.now(timezone.utc)
    today = now.astimezone(ZoneInfo("Asia/Shanghai")).date()

    seed.create_account(url, "acc_dev", tier="developer")
    seed.topup(url, "acc_dev", 100 * NANO, "t0")
    seed.create_key(url, PAYG, "acc_dev", "payg")
    seed.create_key(url, "key_revoked", "acc_dev", "payg")
    seed.create_key(url, "key_daily", "acc_dev", "payg", daily_cap=1_000)
    seed.create_key(url, "key_monthly", "acc_dev", "payg", monthly_cap=1_000)
    seed.create_account(url, "acc_free", tier="free")
    seed.topup(url, "acc_free", 100 * NANO, "t0")
    seed.create_key(url, OTHER_ACCOUNT, "acc_free", "payg")
    seed.create_account(url, "acc_poor", tier="developer")
    seed.create_key(url, "key_poor", "acc_poor", "payg")
    seed.create_account(url, "acc_used", tier="developer")
    seed.create_package(url, "acc_used", "pkg_used", 100, now - HOUR, now + 24 * HOUR)
    seed.create_key(url, "key_pkg_used", "acc_used", "package", package_id="pkg_used")
    seed.create_account(url, "acc_old", tier="developer")
    seed.create_package(url, "acc_old", "pkg_old", 100, now - 48 * HOUR, now - 24 * HOUR)
    seed.create_key(url, "key_pkg_old", "acc_old", "package", package_id="pkg_old")
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE key_id = 'key_revoked'")
        conn.execute("UPDATE package_balances SET tokens_used = 100 WHERE package_id = 'pkg_used'")
        conn.execute("INSERT INTO key_spend (key_id, period_type, period_start, account_id, spend)"
                     " VALUES ('key_daily', 'day', %s, 'acc_dev', 1000)", (today,))
        conn.execute("INSERT INTO key_spend (key_id, period_type, period_start, account_id, spend)"
                     " VALUES ('key_monthly', 'month', %s, 'acc_dev', 1000)", (today.replace(day=1),))


@contextlib.asynccontextmanager
async def stack_of(database_url: str, broker, topic_names: dict, data_dir: Path, *, metering_url: str | None = None,
                   upstream_url: str | None = None, **settings_extra):
    base = gateway_settings(database_url, broker.bootstrap_servers, topic_names, data_dir,
                            metering_url="http://127.0.0.1:1", upstream_url="http://127.0.0.1:1")
    await create_topics(base)
    async with contextlib.AsyncExitStack() as stack:
        if metering_url is None:
            metering_url = await stack.enter_async_context(metering_server(base, database_url))
        if upstream_url is None:
            upstream_url = await stack.enter_async_context(upstream_server())
        settings = gateway_settings(database_url, broker.bootstrap_servers, topic_names, data_dir,
                                    metering_url=metering_url, upstream_url=upstream_url, **settings_extra)
        gateway_url = await stack.enter_async_context(gateway_server(settings))
        yield Stack(settings, database_url, metering_url, upstream_url, gateway_url)


@pytest.fixture
async def stack(database_url, broker, topic_names, tmp_path):
    seed_reference_data(database_url)
    async with stack_of(database_url, broker, topic_names, tmp_path) as s:
        yield s


def assert_event_for(event: dict, *, key_id: str = PAYG, account_id: str = "acc_dev", model: str,
                     endpoint: str, usage: dict | None = None, status: str = "ok", estimated: bool = False,
                     inputs: int = 1, kind: str = "request") -> None:
    data = event["data"]
    assert event["specversion"] == "1.0" and event["type"] == "tollhouse.usage.v1"
    assert event["source"] == "gateway/gw-test"
    assert event["subject"] == key_id and data["key_id"] == key_id
    assert event["_key"] == account_id.encode() and data["account_id"] == account_id
    assert (data["model"], data["endpoint"], data["kind"], data["inputs"]) == (model, endpoint, kind, inputs)
    assert (data["status"], data["usage_estimated"]) == (status, estimated)
    assert data["total_tokens"] == data["prompt_tokens"] + data["completion_tokens"]
    if usage is not None:
        for field in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"):
            assert data[field] == usage[field], (field, data, usage)


# The OpenAI SDK, non-streaming and streaming


async def test_sync_and_async_sdk_calls_are_metered_with_upstream_usage(stack: Stack) -> None:
    sync = stack.sync_client()
    first = await asyncio.to_thread(sync.chat.completions.create, model="gpt-4o", messages=MESSAGES)
    async with stack.async_client() as client:
        second = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5)
    assert first.choices[0].message.content and second.usage.completion_tokens <= 5

    events = {e["data"]["request_id"]: e for e in await usage_events(stack.settings, 2)}
    assert set(events) == {first.id, second.id}
    for reply in (first, second):
        event = events[reply.id]
        assert_event_for(event, model="gpt-4o", endpoint="/v1/chat/completions", usage={
            "prompt_tokens": reply.usage.prompt_tokens, "completion_tokens": reply.usage.completion_tokens,
            "cached_tokens": 0, "reasoning_tokens": 0})
        assert event["data"]["reservation_id"].startswith("res_")
    assert len({e["id"] for e in events.values()}) == 2


async def test_stream_without_include_usage_hides_the_usage_chunk_but_bills_it(stack: Stack) -> None:
    async with stack.async_client() as client:
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
    assert chunks and all(chunk.choices for chunk in chunks)  # no usage-only chunk
    assert all(chunk.usage is None for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text

    [event] = await usage_events(stack.settings, 1)
    served = (await sim_usage(stack.upstream_url))[chunks[0].id]
    assert_event_for(event, model="gpt-4o", endpoint="/v1/chat/completions", usage=served)
    assert event["data"]["request_id"] == chunks[0].id


async def test_stream_with_include_usage_keeps_the_usage_chunk(stack: Stack) -> None:
    sync = stack.sync_client()

    def run() -> list:
        stream = sync.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                              stream_options={"include_usage": True})
        return list(stream)

    chunks = await asyncio.to_thread(run)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    [event] = await usage_events(stack.settings, 1)
    assert_event_for(event, model="gpt-4o", endpoint="/v1/chat/completions", usage={
        "prompt_tokens": chunks[-1].usage.prompt_tokens, "completion_tokens": chunks[-1].usage.completion_tokens,
        "cached_tokens": 0, "reasoning_tokens": 0})


async def test_tools_and_array_content_pass_through(stack: Stack) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    async with stack.async_client() as client:
        called = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS)
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS, stream=True)
        streamed = [c async for c in stream]
        vision = await client.chat.completions.create(model="gpt-4o", messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in orjson.loads(call.function.arguments)
    deltas = [d for c in streamed for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert vision.usage.prompt_tokens > 85  # the image part reached upstream and was counted (85 tokens there)

    events = {e["data"]["request_id"]: e for e in await usage_events(stack.settings, 3)}
    served = await sim_usage(stack.upstream_url)
    for request_id in (called.id, streamed[0].id, vision.id):
        assert_event_for(events[request_id], model="gpt-4o", endpoint="/v1/chat/completions",
                         usage=served[request_id])


async def test_plain_http_with_x_api_key(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url) as client:
        r = await client.post("/v1/chat/completions", headers={"X-API-Key": PAYG},
                              json={"model": "gpt-4o", "messages": MESSAGES})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["usage"]["total_tokens"] > 0
    [event] = await usage_events(stack.settings, 1)
    assert_event_for(event, model="gpt-4o", endpoint="/v1/chat/completions", usage={
        **body["usage"], "cached_tokens": 0, "reasoning_tokens": 0})


async def test_models_lists_what_the_tier_may_use(stack: Stack) -> None:
    async with stack.async_client() as developer, stack.async_client(OTHER_ACCOUNT) as free:
        developer_models = [m.id async for m in developer.models.list()]
        free_models = [m.id async for m in free.models.list()]
        assert (await developer.models.retrieve("gpt-4")).id == "gpt-4"
        with pytest.raises(openai.NotFoundError):
            await free.models.retrieve("gpt-4")
    assert developer_models == ["gpt-3.5-turbo-instruct", "gpt-4", "gpt-4o", "text-embedding-3-small"]
    assert free_models == ["gpt-3.5-turbo-instruct", "gpt-4o", "text-embedding-3-small"]
    async with httpx.AsyncClient(base_url=stack.gateway_url) as client:
        r = await client.get("/v1/models", headers={"X-API-Key": "key_revoked"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_revoked"


# Inputs: one request, several inputs


async def test_prompt_and_input_arrays_are_one_request_with_n_inputs(stack: Stack) -> None:
    async with stack.async_client() as client:
        completions = await client.completions.create(model="gpt-3.5-turbo-instruct",
                                                      prompt=["one", "two", "three"], max_tokens=4)
        embeddings = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c", "d"])
        single = await client.embeddings.create(model="text-embedding-3-small", input="just one")
    assert len(completions.choices) == 3 and len(embeddings.data) == 4

    events = await usage_events(stack.settings, 3)
    by_endpoint = {}
    for event in events:
        by_endpoint.setdefault(event["data"]["endpoint"], []).append(event)
    [completion_event] = by_endpoint["/v1/completions"]
    assert_event_for(completion_event, model="gpt-3.5-turbo-instruct", endpoint="/v1/completions", inputs=3,
                     usage={"prompt_tokens": completions.usage.prompt_tokens,
                            "completion_tokens": completions.usage.completion_tokens,
                            "cached_tokens": 0, "reasoning_tokens": 0})
    embedding_events = sorted(by_endpoint["/v1/embeddings"], key=lambda e: e["data"]["inputs"])
    assert [e["data"]["inputs"] for e in embedding_events] == [1, 4]
    assert embedding_events[1]["data"]["prompt_tokens"] == embeddings.usage.prompt_tokens
    assert embedding_events[0]["data"]["prompt_tokens"] == single.usage.prompt_tokens
    assert all(e["data"]["completion_tokens"] == 0 for e in embedding_events)


# The DESIGN §6.1 error table


ERROR_TABLE = [
    # (case, api key or None, model, HTTP, code, error.code)
    ("missing key", None, "gpt-4o", 401, 16, "invalid_api_key"),
    ("unknown key", "sk-" + "x" * 43, "gpt-4o", 401, 16, "invalid_api_key"),
    ("revoked key", "key_revoked", "gpt-4o", 401, 16, "key_revoked"),
    ("tier", OTHER_ACCOUNT, "gpt-4", 403, 7, "model_not_allowed"),
    ("unknown model", PAYG, "GPT-4o", 404, 5, "model_not_found"),
    ("package exhausted", "key_pkg_used", "gpt-4o", 429, 8, "package_exhausted"),
    ("package expired", "key_pkg_old", "gpt-4o", 429, 8, "package_expired"),
    ("balance spent", "key_poor", "gpt-4o", 429, 8, "insufficient_balance"),
    ("daily cap", "key_daily", "gpt-4o", 429, 8, "daily_cap_reached"),
    ("monthly cap", "key_monthly", "gpt-4o", 429, 8, "monthly_cap_reached"),
]


def assert_error(r: httpx.Response, status: int, code: int, error_code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and body["error"]["code"] == error_code, body
    assert body["msg"] and body["error"]["message"] == body["msg"] and body["error"]["type"]
    return body


@pytest.mark.parametrize(("case", "key", "model", "status", "code", "error_code"), ERROR_TABLE,
                         ids=[row[0] for row in ERROR_TABLE])
async def test_refusals_follow_the_error_table(stack: Stack, case, key, model, status, code, error_code) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=stack.gateway_url) as client:
        r = await client.post("/v1/chat/completions", headers=headers, json={"model": model, "messages": MESSAGES})
    assert_error(r, status, code, error_code)
    if key:  # the SDK shows the reason
        async with stack.async_client(key) as sdk:
            with pytest.raises(openai.APIStatusError) as raised:
                await sdk.chat.completions.create(model=model, messages=MESSAGES)
        assert raised.value.status_code == status and raised.value.code == error_code
    assert await usage_events(stack.settings, 0, settle=0.5) == []  # a refused call is not metered


async def test_bad_bodies_are_400_and_oversize_bodies_413(database_url, broker, topic_names, tmp_path) -> None:
    seed_reference_data(database_url)
    async with stack_of(database_url, broker, topic_names, tmp_path, max_request_bytes=4096) as stack:
        async with httpx.AsyncClient(base_url=stack.gateway_url, headers={"X-API-Key": PAYG}) as client:
            bad = [
                await client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
                await client.post("/v1/chat/completions", json=["a list"]),
                await client.post("/v1/chat/completions", json={"model": "gpt-4o"}),
                await client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [], "stream": "yes"}),
                await client.post("/v1/embeddings", json={"input": "x"}),
            ]
            large = await client.post("/v1/chat/completions", json={
                "model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 5000}]})
        for r in bad:
            assert_error(r, 400, 3, "invalid_request")
        assert "not valid JSON" in bad[0].json()["msg"] and "body.messages" in bad[2].json()["msg"]
        body = assert_error(large, 413, 3, "payload_too_large")
        assert "TOLLHOUSE_MAX_REQUEST_BYTES" in body["msg"]
        assert await usage_events(stack.settings, 0, settle=0.5) == []


async def test_metering_down_is_503_and_nothing_is_served(database_url, broker, topic_names, tmp_path) -> None:
    seed_reference_data(database_url)
    dead = f"http://127.0.0.1:{free_port()}"
    async with stack_of(database_url, broker, topic_names, tmp_path, metering_url=dead) as stack:
        async with httpx.AsyncClient(base_url=stack.gateway_url, headers={"X-API-Key": PAYG}) as client:
            r = await client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
            models = await client.get("/v1/models")
            ready = await client.get("/readyz")
        assert_error(r, 503, 14, "unavailable")
        assert_error(models, 503, 14, "unavailable")
        assert_error(ready, 503, 14, "unavailable")
        assert await sim_usage(stack.upstream_url) == {}  # fail closed: upstream never saw the call


# Upstream failures


async def test_upstream_error_is_passed_through_and_metered_as_error(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers={"X-API-Key": PAYG}) as client:
        r = await client.post("/v1/chat/completions", headers={"X-Sim-Error": "500"},
                              json={"model": "gpt-4o", "messages": MESSAGES})
        limited = await client.post("/v1/chat/completions", headers={"X-Sim-Error": "429"},
                                    json={"model": "gpt-4o", "messages": MESSAGES, "stream": True})
        refused = await client.post("/v1/chat/completions", headers={"X-Sim-Error": "401"},
                                    json={"model": "gpt-4o", "messages": MESSAGES})
    assert r.status_code == 500 and r.json()["error"]["code"] == "server_error"  # upstream's own body
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    # Upstream refusing the gateway's own credentials is not the caller's key being bad.
    assert_error(refused, 503, 14, "unavailable")
    events = await usage_events(stack.settings, 3)
    for event in events:
        assert_event_for(event, model="gpt-4o", endpoint="/v1/chat/completions", status="error",
                         usage={"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "reasoning_tokens": 0})


async def test_upstream_unreachable_is_503_and_not_billed(database_url, broker, topic_names, tmp_path) -> None:
    seed_reference_data(database_url)
    dead = f"http://127.0.0.1:{free_port()}"
    async with stack_of(database_url, broker, topic_names, tmp_path, upstream_url=dead) as stack:
        async with stack.async_client() as client:
            with pytest.raises(openai.APIStatusError) as raised:
                await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert raised.value.status_code == 503 and raised.value.code == "unavailable"
        assert await usage_events(stack.settings, 0, settle=0.5) == []


async def test_a_stream_cut_off_midway_is_billed_as_an_estimate(stack: Stack) -> None:
    async with stack.async_client() as client:
        stream = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_headers={"X-Sim-Break-After": "3"})
        chunks = []
        with pytest.raises(openai.APIError) as raised:
            async for chunk in stream:
                chunks.append(chunk)
    assert "broke off" in str(raised.value)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed

    [event] = await usage_events(stack.settings, 1)
    expected = {"prompt_tokens": estimate_prompt_tokens(CHAT, {"messages": MESSAGES}),
                "completion_tokens": math.ceil(len(streamed.encode()) / 4), "cached_tokens": 0, "reasoning_tokens": 0}
    assert_event_for(event, model="gpt-4o", endpoint="/v1/chat/completions", status="cancelled", estimated=True,
                     usage=expected)
    assert event["data"]["request_id"] == chunks[0].id


async def test_a_client_that_goes_away_midstream_is_billed_for_what_was_streamed(stack: Stack) -> None:
    received = b""
    async with httpx.AsyncClient(base_url=stack.gateway_url) as client:
        async with client.stream("POST", "/v1/chat/completions",
                                 headers={"X-API-Key": PAYG, "X-Sim-Chunk-Delay-Ms": "50", "X-Sim-Reply-Tokens": "200"},
                                 json={"model": "gpt-4o", "messages": MESSAGES, "stream": True}) as r:
            assert r.status_code == 200
            async for piece in r.aiter_bytes():
                received += piece
                if received.count(b"\n\n") >= 5:
                    break  # leaving the block closes the connection mid-stream
    [event] = await usage_events(stack.settings, 1)
    assert_event_for(event, model="gpt-4o", endpoint="/v1/chat/completions", status="cancelled", estimated=True)
    assert 0 < event["data"]["completion_tokens"] < 200
    assert event["data"]["prompt_tokens"] == estimate_prompt_tokens(CHAT, {"messages": MESSAGES})


# Batch API jobs


def batch_file(lines: int, model: str = "gpt-4o") -> bytes:
    return b"\n".join(orjson.dumps({
        "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"Question number {i}"}], "max_tokens": 8},
    }) for i in range(lines)) + b"\n"


async def test_a_batch_job_is_one_event_billed_once_when_it_completes(stack: Stack) -> None:
    async with stack.async_client() as client, stack.async_client(OTHER_ACCOUNT) as stranger:
        uploaded = await client.files.create(file=("in.jsonl", batch_file(5), "application/jsonl"), purpose="batch")
        job = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")

        async def completed():
            current = await client.batches.retrieve(job.id)
            return current if current.status == "completed" else None

        done = await eventually(completed)
        for _ in range(3):  # seen again and again: still billed once
            await client.batches.retrieve(job.id)
        output = await client.files.content(done.output_file_id)
        assert len(output.content.splitlines()) == 5
        with pytest.raises(openai.NotFoundError):
            await stranger.batches.retrieve(job.id)
        with pytest.raises(openai.NotFoundError):
            await stranger.files.content(done.output_file_id)

    await asyncio.sleep(2 * stack.settings.batch_poll_seconds)  # the poller does not bill it again either
    [event] = await usage_events(stack.settings, 1, settle=1.0)
    assert event["data"]["request_id"] == job.id
    assert_event_for(event, model="gpt-4o", endpoint="/v1/batches", kind="batch",
                     inputs=done.request_counts.total, usage={
                         "prompt_tokens": done.usage.input_tokens, "completion_tokens": done.usage.output_tokens,
                         "cached_tokens": 0, "reasoning_tokens": 0})
    assert done.request_counts.total == 5


async def test_the_poller_bills_a_batch_nobody_asks_about(stack: Stack) -> None:
    async with stack.async_client() as client:
        uploaded = await client.files.create(file=("in.jsonl", batch_file(3), "application/jsonl"), purpose="batch")
        job = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
    [event] = await usage_events(stack.settings, 1, settle=1.0)
    assert (event["data"]["request_id"], event["data"]["kind"], event["data"]["inputs"]) == (job.id, "batch", 3)
    assert event["data"]["total_tokens"] > 0


async def test_a_batch_needs_an_input_file_of_the_same_account(stack: Stack) -> None:
    async with stack.async_client() as client, stack.async_client(OTHER_ACCOUNT) as stranger:
        uploaded = await client.files.create(file=("in.jsonl", batch_file(2), "application/jsonl"), purpose="batch")
        with pytest.raises(openai.NotFoundError):
            await stranger.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
        with pytest.raises(openai.BadRequestError):
            await client.files.create(file=("mixed.jsonl", batch_file(1) + batch_file(1, "gpt-4"),
                                             "application/jsonl"), purpose="batch")
    assert await usage_events(stack.settings, 0, settle=0.5) == []


async def test_files_are_listed_retrieved_and_deleted_only_by_their_account(stack: Stack) -> None:
    async with stack.async_client() as client, stack.async_client(OTHER_ACCOUNT) as stranger:
        mine = [await client.files.create(file=(f"in{i}.jsonl", batch_file(1), "application/jsonl"), purpose="batch")
                for i in range(3)]
        notes = await client.files.create(file=("notes.txt", b"hello", "text/plain"), purpose="user_data")
        theirs = await stranger.files.create(file=("x.jsonl", batch_file(1, "gpt-3.5-turbo-instruct"),
                                                   "application/jsonl"), purpose="batch")

        newest_first = [notes.id] + [f.id for f in reversed(mine)]
        assert [f.id async for f in client.files.list(limit=2)] == newest_first  # paged by two
        first = await client.files.list(limit=2)
        assert [f.id for f in first.data] == newest_first[:2] and first.has_more
        assert [f.id for f in (await client.files.list(order="asc")).data] == newest_first[::-1]
        assert [f.id for f in (await client.files.list(purpose="batch")).data] == newest_first[1:]
        assert [f.id for f in (await stranger.files.list()).data] == [theirs.id]

        retrieved = await client.files.retrieve(mine[0].id)
        assert (retrieved.id, retrieved.filename, retrieved.purpose) == (mine[0].id, "in0.jsonl", "batch")
        for call in (stranger.files.retrieve, stranger.files.delete, stranger.files.content):
            with pytest.raises(openai.NotFoundError):
                await call(mine[0].id)

        deleted = await client.files.delete(mine[0].id)
        assert deleted.deleted and deleted.id == mine[0].id
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(mine[0].id)
        with pytest.raises(openai.NotFoundError):  # nor can a batch use it any more
            await client.batches.create(input_file_id=mine[0].id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        assert [f.id for f in (await client.files.list()).data] == newest_first[:-1]
    assert await usage_events(stack.settings, 0, settle=0.5) == []  # files are not billed


async def test_batches_are_listed_newest_first_for_their_account_only(stack: Stack) -> None:
    async with stack.async_client() as client, stack.async_client(OTHER_ACCOUNT) as stranger:
        jobs = []
        for lines in (2, 3):
            uploaded = await client.files.create(file=("in.jsonl", batch_file(lines), "application/jsonl"),
                                                 purpose="batch")
            jobs.append(await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                    completion_window="24h"))
        assert [b.id async for b in client.batches.list(limit=1)] == [jobs[1].id, jobs[0].id]
        assert (await stranger.batches.list()).data == []

        async def all_completed():
            listed = (await client.batches.list()).data
            return listed if {b.status for b in listed} == {"completed"} else None

        listed = await eventually(all_completed)
        assert [b.request_counts.total for b in listed] == [3, 2]
        outputs = {f.id for f in (await client.files.list(purpose="batch_output")).data}
        assert outputs == {b.output_file_id for b in listed}
    events = {e["data"]["request_id"]: e for e in await usage_events(stack.settings, 2)}
    assert set(events) == {j.id for j in jobs}  # each job billed once, however often it was listed
    for job in listed:
        assert_event_for(events[job.id], model="gpt-4o", endpoint="/v1/batches", kind="batch", inputs=job.request_counts.total,
                         usage={"prompt_tokens": job.usage.input_tokens, "completion_tokens": job.usage.output_tokens,
                                "cached_tokens": 0, "reasoning_tokens": 0})


async def test_a_batch_cancelled_midway_bills_the_lines_it_ran(stack: Stack) -> None:
    async with stack.async_client() as client, stack.async_client(OTHER_ACCOUNT) as stranger:
        uploaded = await client.files.create(file=("in.jsonl", batch_file(40), "application/jsonl"), purpose="batch")
        job = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                          completion_window="24h", extra_headers={"X-Sim-Batch-Line-Delay-Ms": "50"})
        await eventually(lambda: _completed_at_least(client, job.id, 2))
        with pytest.raises(openai.NotFoundError):
            await stranger.batches.cancel(job.id)
        cancelling = await client.batches.cancel(job.id)
        assert cancelling.status in ("cancelling", "cancelled")

        async def cancelled():
            current = await client.batches.retrieve(job.id)
            return current if current.status == "cancelled" else None

        done = await eventually(cancelled)
        ran = done.request_counts.completed
        assert 2 <= ran < 40
        output = await client.files.content(done.output_file_id)
        assert len(output.content.splitlines()) == ran
        await client.batches.cancel(job.id)  # again: still one event
    [event] = await usage_events(stack.settings, 1, settle=1.0)
    assert_event_for(event, model="gpt-4o", endpoint="/v1/batches", kind="batch", status="cancelled", inputs=40,
                     usage={"prompt_tokens": done.usage.input_tokens, "completion_tokens": done.usage.output_tokens,
                            "cached_tokens": 0, "reasoning_tokens": 0})
    assert event["data"]["request_id"] == job.id and event["data"]["prompt_tokens"] > 0
    record = (await sim_usage(stack.upstream_url))[job.id]
    assert (record["status"], record["prompt_tokens"], record["completion_tokens"]) == (
        "cancelled", event["data"]["prompt_tokens"], event["data"]["completion_tokens"])


async def test_a_batch_cancelled_before_it_ran_is_still_one_cancelled_event(stack: Stack) -> None:
    async with stack.async_client() as client:
        uploaded = await client.files.create(file=("in.jsonl", batch_file(3), "application/jsonl"), purpose="batch")
        job = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                          completion_window="24h", extra_headers={"X-Sim-Batch-Delay-Ms": "10000"})
        await client.batches.cancel(job.id)
    [event] = await usage_events(stack.settings, 1, settle=1.0)  # billed by the poller
    assert_event_for(event, model="gpt-4o", endpoint="/v1/batches", kind="batch", status="cancelled", inputs=3,
                     usage={"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0, "reasoning_tokens": 0})


async def _completed_at_least(client: openai.AsyncOpenAI, batch_id: str, lines: int) -> bool:
    return (await client.batches.retrieve(batch_id)).request_counts.completed >= lines


# Operations


async def test_health_readiness_and_metrics(stack: Stack) -> None:
    async with stack.async_client() as client:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    async with httpx.AsyncClient(base_url=stack.gateway_url) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = (await client.get("/readyz")).json()
        unknown = await client.get("/v1/nothing")
        await client.post("/v1/batches/batch_x/cancel")  # no key
        metrics = (await client.get("/metrics")).text
    assert ready["metering"] == "ok" and ready["spool"] == "ok"
    assert 'tollhouse_gateway_requests_total{endpoint="/v1/chat/completions",model="gpt-4o",status="200"}' in metrics
    assert 'tollhouse_gateway_requests_total{endpoint="/v1/batches/{id}/cancel",model="",status="401"}' in metrics
    assert 'tollhouse_gateway_requests_total{endpoint="other",model="",status="404"}' in metrics
    assert 'tollhouse_gateway_spool_events{gateway_id="gw-test"}' in metrics
    assert "tollhouse_gateway_upstream_seconds_bucket" in metrics
    assert_error(unknown, 404, 5, "not_found")


async def test_calls_in_flight_count_a_stream_until_its_end(stack: Stack) -> None:
    """The count the spool asks before an fsync on the event loop (docs/gateway.md, The spool)."""
    gauge = 'tollhouse_gateway_calls_in_flight{gateway_id="gw-test"}'
    async with httpx.AsyncClient(base_url=stack.gateway_url) as client:
        async with client.stream("POST", "/v1/chat/completions",
                                 headers={"X-API-Key": PAYG, "X-Sim-Chunk-Delay-Ms": "20", "X-Sim-Reply-Tokens": "20"},
                                 json={"model": "gpt-4o", "messages": MESSAGES, "stream": True}) as r:
            assert r.status_code == 200
            during = (await client.get("/metrics")).text
            body = b"".join([piece async for piece in r.aiter_bytes()])
        after = (await client.get("/metrics")).text
    assert body.endswith(b"data: [DONE]\n\n")
    assert f"{gauge} 1.0" in during
    assert f"{gauge} 0.0" in after


# The whole path: gateway → broker → consumer → ledger → the next authorize


async def booked(database_url: str) -> int:
    return seed.scalar(database_url, "SELECT count(*) FROM ledger_entries WHERE entry_type = 'usage'")


async def call_until_refused(stack: Stack, key: str, limit: int = 40) -> tuple[int, openai.APIStatusError]:
    """Calls one at a time, each booked before the next; the count allowed and the refusal."""
    allowed = 0
    async with stack.async_client(key) as client:
        for _ in range(limit):
            try:
                await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=8)
            except openai.APIStatusError as refused:
                return allowed, refused
            allowed += 1
            await eventually(lambda: _booked_at_least(stack, allowed))
    raise AssertionError(f"{limit} calls were allowed")


async def _booked_at_least(stack: Stack, n: int) -> bool:
    return await booked(stack.database_url) >= n


async def test_a_daily_cap_used_up_through_the_gateway_refuses_the_next_call(
        database_url, broker, topic_names, tmp_path) -> None:
    seed.add_price(database_url, "gpt-4o", input_price=1_000, output_price=2_000)
    seed.create_account(database_url, "acc_capped", tier="developer")
    seed.topup(database_url, "acc_capped", 10 * NANO, "t0")
    cap = 150_000  # nano-CNY: a call here costs about 30–60 thousand
    seed.create_key(database_url, "key_capped", "acc_capped", "payg", daily_cap=cap)
    async with stack_of(database_url, broker, topic_names, tmp_path) as stack, \
            running_consumer(stack.settings, database_url):
        allowed, refused = await call_until_refused(stack, "key_capped")
        assert refused.status_code == 429 and refused.code == "daily_cap_reached"
        body = refused.response.json()
        assert body["code"] == 8 and "daily spend cap" in body["msg"]
        spend = seed.scalar(database_url, "SELECT sum(charge) FROM ledger_entries WHERE entry_type = 'usage'")
        charges = seed.rows(database_url, "SELECT charge FROM ledger_entries WHERE entry_type = 'usage'")
        assert allowed >= 2 and len(charges) == allowed
        assert cap <= spend <= cap + max(c for (c,) in charges)  # overshoot at most one call
        assert seed.scalar(database_url, "SELECT count(*) FROM breaches WHERE type = 'daily_cap'") == 1


async def test_a_package_used_up_through_the_gateway_refuses_the_next_call(
        database_url, broker, topic_names, tmp_path) -> None:
    now = datetime.now(timezone.utc)
    seed.add_price(database_url, "gpt-4o", input_price=1_000, output_price=2_000)
    seed.create_account(database_url, "acc_pkg", tier="developer")
    seed.create_package(database_url, "acc_pkg", "pkg_small", 120, now - HOUR, now + 24 * HOUR)
    seed.create_key(database_url, "key_pkg", "acc_pkg", "package", package_id="pkg_small")
    async with stack_of(database_url, broker, topic_names, tmp_path) as stack, \
            running_consumer(stack.settings, database_url):
        allowed, refused = await call_until_refused(stack, "key_pkg")
        assert refused.status_code == 429 and refused.code == "package_exhausted"
        used, overage, total = seed.rows(database_url, "SELECT sum(package_tokens), sum(overage_tokens),"
                                         " sum(total_tokens) FROM ledger_entries WHERE entry_type = 'usage'")[0]
        assert used == 120 and used + overage == total
        assert allowed >= 2
        assert seed.scalar(database_url, "SELECT count(*) FROM breaches WHERE type = 'package_exhausted'") == 1
