"""POST /v1/authorize on PostgreSQL: decisions, refusal order, freshness through
LISTEN/NOTIFY, and the overshoot bound under 100 concurrent authorize+usage cycles."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from services.contracts.events import build_usage_event, encode_event
from services.metering.consumer.worker import UsageConsumer
from tests.support import seed
from tests.support.app import ADMIN, BILLING, GATEWAY, metering_client
from tests.support.kafka import create_topics, metering_settings, produce

NANO = 10**9


async def eventually(check, timeout: float = 15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def setup_account(client, *, tier: str = "developer", balance: str = "10") -> str:
    r = await client.post("/v1/accounts", json={"name": "acme", "tier": tier, "timezone": "Asia/Shanghai"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    account_id = r.json()["account_id"]
    r = await client.post(f"/v1/accounts/{account_id}/topups", json={"amount": balance, "reference": "t0"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return account_id


async def add_price(client, model: str, min_tier: str = "free", input_price: str = "1000", output_price: str = "1000"):
    r = await client.put(f"/v1/prices/{model}", headers=ADMIN, json={
        "input_price": input_price, "output_price": output_price, "min_tier": min_tier,
        "effective_from": "2020-01-01T00:00:00Z"})
    assert r.status_code == 201, r.text


async def create_key(client, account_id: str, **body) -> dict:
    r = await client.post(f"/v1/accounts/{account_id}/keys", json={"name": "k", **body}, headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


async def authorize(client, api_key: str, model: str, estimated_tokens: int = 0) -> dict:
    r = await client.post("/v1/authorize", headers=GATEWAY,
                          json={"api_key": api_key, "model": model, "estimated_tokens": estimated_tokens})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def settings(database_url, broker, topic_names):
    return metering_settings(database_url, broker.bootstrap_servers, topic_names, topic_partitions=2)


async def test_an_allowed_call_names_the_key_and_what_remains(settings, database_url) -> None:
    async with metering_client(settings, database_url) as client:
        await add_price(client, "gpt-4o")
        account = await setup_account(client)
        key = await create_key(client, account, billing_mode="payg", daily_cap="5")
        body = await authorize(client, key["api_key"], "gpt-4o")
        assert body["allowed"] is True
        assert (body["code"], body["reason"]) == (0, "ok")
        assert (body["key_id"], body["account_id"], body["billing_mode"]) == (key["key_id"], account, "payg")
        assert body["remaining"] == {"balance": "10.000000000", "daily": "5.000000000", "monthly": None}
        assert body["reservation_id"] is None


@pytest.mark.parametrize(
    ("case", "reason", "code"),
    [
        ("unknown_key", "invalid_api_key", 16),
        ("revoked", "key_revoked", 16),
        ("unknown_model", "model_not_found", 5),
        ("tier", "model_not_allowed", 7),
        ("no_balance", "insufficient_balance", 8),
    ],
)
async def test_refusals_carry_the_gateway_error_code(settings, database_url, case, reason, code) -> None:
    async with metering_client(settings, database_url) as client:
        await add_price(client, "gpt-4", min_tier="developer")
        await add_price(client, "gpt-3.5-turbo")
        tier = "free" if case == "tier" else "developer"
        account = await setup_account(client, tier=tier)
        if case == "no_balance":
            r = await client.post("/v1/accounts", json={"name": "poor", "tier": "developer"}, headers=ADMIN)
            account = r.json()["account_id"]
        key = await create_key(client, account, billing_mode="payg")
        secret = key["api_key"]
        model = "gpt-4"
        if case == "unknown_key":
            secret = "sk-" + "x" * 43
        if case == "revoked":
            await authorize(client, secret, model)  # cached first: the revoke must reach the cache
            r = await client.post(f"/v1/keys/{key['key_id']}/revoke", headers=ADMIN)
            assert r.status_code == 200
        if case == "unknown_model":
            model = "GPT-4"  # ids are case-sensitive

        async def refused():
            body = await authorize(client, secret, model)
            return body if not body["allowed"] else None

        body = await eventually(refused)
        assert (body["reason"], body["code"]) == (reason, code)
        assert body["msg"]


async def test_revoked_is_reported_before_any_other_limit(settings, database_url) -> None:
    async with metering_client(settings, database_url) as client:
        await add_price(client, "gpt-4", min_tier="enterprise")
        r = await client.post("/v1/accounts", json={"name": "poor", "tier": "free"}, headers=ADMIN)
        key = await create_key(client, r.json()["account_id"], billing_mode="payg")
        await client.post(f"/v1/keys/{key['key_id']}/revoke", headers=ADMIN)
        body = await authorize(client, key["api_key"], "gpt-4")
        assert body["reason"] == "key_revoked"


async def test_gateway_token_only(settings, database_url) -> None:
    async with metering_client(settings, database_url) as client:
        payload = {"api_key": "sk-x", "model": "m"}
        assert (await client.post("/v1/authorize", json=payload)).status_code == 401
        assert (await client.post("/v1/authorize", json=payload, headers=BILLING)).status_code == 403
        assert (await client.post("/v1/authorize", json=payload, headers=ADMIN)).status_code == 403
        bad = await client.post("/v1/authorize", json={**payload, "estimated_tokens": "10"}, headers=GATEWAY)
        assert bad.status_code == 400
        assert "estimated_tokens" in bad.json()["msg"]


async def test_authorize_answers_errors_in_the_shape_of_every_route(settings, database_url, monkeypatch) -> None:
    """POST /v1/authorize is served outside FastAPI's routing: the same role check, error
    shapes, body limit and request ids as every other route."""
    async with metering_client(settings, database_url) as client:
        payload = {"api_key": "sk-x", "model": "m"}
        unauthenticated = await client.post("/v1/authorize", json=payload, headers={"X-Request-ID": "req-7"})
        assert unauthenticated.status_code == 401
        assert unauthenticated.headers["www-authenticate"] == "Bearer"
        assert unauthenticated.headers["x-request-id"] == "req-7"
        assert unauthenticated.json()["code"] == 16 and "gateway token" in unauthenticated.json()["msg"]
        too_big = await client.post("/v1/authorize", headers=GATEWAY,
                                    content=b'{"api_key": "' + b"x" * settings.max_request_bytes + b'"}')
        assert too_big.status_code == 413 and too_big.json()["code"] == 3
        assert too_big.headers["connection"] == "close"  # the rest of the body is never read
        odd_length = await client.post("/v1/authorize", headers={**GATEWAY, "Content-Length": "ten"}, content=b"{}")
        assert odd_length.status_code == 400 and odd_length.json()["msg"] == "header Content-Length: not a number"
        not_json = await client.post("/v1/authorize", headers=GATEWAY, content=b"{not json")
        assert not_json.status_code == 400 and not_json.json()["msg"] == "body: not a valid JSON object"
        unknown_field = await client.post("/v1/authorize", headers=GATEWAY, json={**payload, "tokens": 1})
        assert unknown_field.status_code == 400 and "tokens" in unknown_field.json()["msg"]
        assert (await client.get("/v1/authorize", headers=GATEWAY)).status_code == 405

        authorizer = client.app.state.authorizer

        async def database_gone(*args, **kwargs):
            raise ConnectionRefusedError("connection refused")

        monkeypatch.setattr(authorizer, "authorize", database_gone)
        unavailable = await client.post("/v1/authorize", headers=GATEWAY, json=payload)
        assert unavailable.status_code == 503 and unavailable.json()["code"] == 14
        assert "unreachable" in unavailable.json()["msg"]

        async def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        monkeypatch.setattr(authorizer, "authorize", broken)
        failed = await client.post("/v1/authorize", headers=GATEWAY, json=payload)
        assert failed.status_code == 500 and failed.json()["code"] == 13
        assert "a bug" not in failed.text


async def test_a_top_up_reaches_the_decision_without_waiting_for_the_cache(settings, database_url) -> None:
    async with metering_client(settings, database_url) as client:
        await add_price(client, "m")
        r = await client.post("/v1/accounts", json={"name": "later", "tier": "free"}, headers=ADMIN)
        account = r.json()["account_id"]
        key = await create_key(client, account, billing_mode="payg")
        assert (await authorize(client, key["api_key"], "m"))["reason"] == "insufficient_balance"
        await client.post(f"/v1/accounts/{account}/topups", json={"amount": "1", "reference": "r"}, headers=ADMIN)

        async def allowed():
            return (await authorize(client, key["api_key"], "m"))["allowed"]

        assert await eventually(allowed, timeout=5)


async def run_cycles(client, settings, key: dict, cycles: int, tokens_per_call: int, model: str) -> int:
    """``cycles`` concurrent authorize → usage cycles; return how many were allowed."""

    async def cycle(i: int) -> bool:
        body = await authorize(client, key["api_key"], model, estimated_tokens=tokens_per_call)
        if not body["allowed"]:
            return False
        event = build_usage_event(
            account_id=key["account_id"], key_id=key["key_id"], model=model, prompt_tokens=tokens_per_call // 2,
            completion_tokens=tokens_per_call - tokens_per_call // 2, request_id=f"race-{i}",
            reservation_id=body["reservation_id"],
        )
        await produce(settings.kafka_bootstrap_servers, settings.usage_topic,
                      [(key["account_id"].encode(), encode_event(event))])
        return True

    results = await asyncio.gather(*(cycle(i) for i in range(cycles)))
    return sum(results)


@pytest.mark.parametrize("mode", ["package", "payg_daily_cap"])
async def test_100_concurrent_cycles_at_room_for_10_overshoot_at_most_one_call(settings, database_url, mode) -> None:
    await create_topics(settings)
    consumer = UsageConsumer(settings, database_url)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    tokens_per_call = 100
    try:
        async with metering_client(settings, database_url) as client:
            # 1 CNY per 1M tokens → 100 tokens cost 0.0001 CNY = 100,000 nano-CNY.
            await add_price(client, "m", input_price="1", output_price="1")
            account = await setup_account(client, balance="100")
            now = datetime.now(timezone.utc)
            if mode == "package":
                r = await client.post(f"/v1/accounts/{account}/packages", headers=ADMIN, json={
                    "tokens": 10 * tokens_per_call, "price": "1",
                    "valid_from": (now - timedelta(hours=1)).isoformat(),
                    "valid_until": (now + timedelta(days=1)).isoformat()})
                assert r.status_code == 201, r.text
                key = await create_key(client, account, billing_mode="package")
                limit = 10 * tokens_per_call
            else:
                key = await create_key(client, account, billing_mode="payg", daily_cap="0.001")
                limit = 10 * 100_000  # nano-CNY: room for exactly 10 calls
            allowed = await run_cycles(client, settings, key, 100, tokens_per_call, "m")

            # Wait until every allowed call is booked.
            await eventually(lambda: asyncio.sleep(0, consumer.totals.accepted >= allowed), timeout=30)
            if mode == "package":
                used = seed.scalar(database_url, "SELECT coalesce(sum(package_tokens + overage_tokens), 0)"
                                   " FROM ledger_entries WHERE entry_type = 'usage'")
            else:
                used = seed.scalar(database_url, "SELECT coalesce(sum(charge), 0) FROM ledger_entries"
                                   " WHERE entry_type = 'usage'")
            per_call = used // allowed
            assert 10 <= allowed <= 11, allowed
            assert used <= limit + per_call, (used, limit)  # overshoot ≤ one call

            # Once booked, the limit refuses every further call.
            async def refused():
                body = await authorize(client, key["api_key"], "m", estimated_tokens=tokens_per_call)
                return body if not body["allowed"] else None

            body = await eventually(refused)
            assert body["reason"] == ("package_exhausted" if mode == "package" else "daily_cap_reached")
            assert (await run_cycles(client, settings, key, 20, tokens_per_call, "m")) == 0
    finally:
        stop.set()
        await task


async def test_reservations_expire_and_free_their_hold(settings, database_url) -> None:
    async with metering_client(settings, database_url, reservation_ttl_seconds=1) as client:
        await add_price(client, "m", input_price="1", output_price="1")
        account = await setup_account(client)
        now = datetime.now(timezone.utc)
        await client.post(f"/v1/accounts/{account}/packages", headers=ADMIN, json={
            "tokens": 100, "price": "1", "valid_from": (now - timedelta(hours=1)).isoformat(),
            "valid_until": (now + timedelta(days=1)).isoformat()})
        key = await create_key(client, account, billing_mode="package")
        first = await authorize(client, key["api_key"], "m", estimated_tokens=100)
        assert first["allowed"] and first["reservation_id"]
        held = await authorize(client, key["api_key"], "m", estimated_tokens=100)
        assert held["reason"] == "package_exhausted"  # the first call holds all 100 tokens

        async def freed():
            return (await authorize(client, key["api_key"], "m"))["allowed"]

        assert await eventually(freed, timeout=5)


async def test_a_due_snapshot_is_reloaded_in_the_background_and_an_old_one_is_not_used(settings, database_url) -> None:
    # No notice reaches the authorizer here (the balance is changed behind its back), so only
    # the snapshot period brings the change in.
    async with metering_client(settings, database_url, snapshot_seconds=0.5) as client:
        await add_price(client, "m")
        account = await setup_account(client, balance="10")
        key = await create_key(client, account, billing_mode="payg")
        assert (await authorize(client, key["api_key"], "m"))["allowed"]
        seed.scalar(database_url, "UPDATE account_balances SET balance = 0 WHERE account_id = %s RETURNING 1", account)
        await asyncio.sleep(0.6)
        # Due: answered at once from the snapshot in hand, which is reloaded meanwhile.
        assert (await authorize(client, key["api_key"], "m"))["allowed"]
        await eventually(lambda: _refused_for_balance(client, key["api_key"]), timeout=5)

        seed.scalar(database_url, "UPDATE account_balances SET balance = 10000000000 WHERE account_id = %s RETURNING 1",
                    account)
        await asyncio.sleep(1.1)
        # Twice the period old: not used; this call waits for the database.
        assert (await authorize(client, key["api_key"], "m"))["allowed"]


async def _refused_for_balance(client, api_key: str) -> bool:
    return (await authorize(client, api_key, "m"))["reason"] == "insufficient_balance"
