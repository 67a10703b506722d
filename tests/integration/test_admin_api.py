"""The control-plane API (DESIGN §6.2) against a real, migrated PostgreSQL.

Each test drives the FastAPI app in process over HTTP and checks what the database holds:
ledger rows, projections, key hashes, price versions.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.metering.api.app import create_app
from services.metering.store.db import make_engine
from services.metering.store.projections import rebuild_projections, snapshot_projections
from services.settings import load_settings

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
GATEWAY_TOKEN = "gateway-token-for-tests-0123456789"
BILLING_TOKEN = "billing-token-for-tests-0123456789"
NANO = 1_000_000_000


class Clock:
    """A clock the test moves; starts at the real now."""

    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(database_url)
    yield eng
    await eng.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(database_url: str, engine: AsyncEngine, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings(
        database_url=database_url, admin_token=ADMIN_TOKEN, gateway_token=GATEWAY_TOKEN, billing_token=BILLING_TOKEN
    )
    app = create_app(settings, engine, clock=clock)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://t",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as c:
        yield c


async def fetch(engine: AsyncEngine, sql: str, **params: Any) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return [dict(r._mapping) for r in (await conn.execute(text(sql), params)).all()]


async def execute(engine: AsyncEngine, sql: str, **params: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(sql), params)


async def new_account(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await client.post("/v1/accounts", json={"name": "acme", **body})
    assert r.status_code == 201, r.text
    return r.json()


async def new_package(client: httpx.AsyncClient, account_id: str, **body: Any) -> httpx.Response:
    until = (datetime.now(timezone.utc) + timedelta(days=30)).isoformat()
    return await client.post(
        f"/v1/accounts/{account_id}/packages", json={"tokens": 1000, "price": "9.90", "valid_until": until, **body}
    )


def assert_error_shape(r: httpx.Response, status: int, code: int, *needles: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "msg", "error"}, body
    assert body["code"] == code
    assert isinstance(body["msg"], str) and body["msg"]
    assert body["error"]["message"] == body["msg"]
    assert isinstance(body["error"]["type"], str) and isinstance(body["error"]["code"], str)
    for needle in needles:
        assert needle in body["msg"], body["msg"]
    return body


# Accounts


async def test_create_account_stores_it_with_a_zero_balance(client, engine):
    r = await client.post("/v1/accounts", json={"name": "acme", "tier": "developer", "timezone": "Europe/Berlin"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert re.fullmatch(r"acc_[0-9A-Z]{26}", body["account_id"])
    assert (body["name"], body["tier"], body["timezone"]) == ("acme", "developer", "Europe/Berlin")
    assert body["balance"] == "0.000000000"
    assert body["package"] is None
    rows = await fetch(engine, "SELECT a.tier, a.timezone, b.balance, b.balance_depleted FROM accounts a"
                               " JOIN account_balances b USING (account_id) WHERE account_id = :a",
                       a=body["account_id"])
    assert rows == [{"tier": "developer", "timezone": "Europe/Berlin", "balance": 0, "balance_depleted": False}]


async def test_account_defaults_to_free_tier_and_shanghai_time(client):
    body = await new_account(client)
    assert (body["tier"], body["timezone"]) == ("free", "Asia/Shanghai")


async def test_get_account_shows_balance_as_decimal_string(client):
    account = await new_account(client)
    await client.post(f"/v1/accounts/{account['account_id']}/topups", json={"amount": "12.5", "reference": "r1"})
    r = await client.get(f"/v1/accounts/{account['account_id']}")
    assert r.status_code == 200
    assert r.json()["balance"] == "12.500000000"
    assert r.json()["topups_total"] == "12.500000000"


@pytest.mark.parametrize("account_id", ["acc_01JD8ZJ9000000000000000000", "nope", "acc_%00x"])
async def test_unknown_account_is_404(client, account_id):
    assert_error_shape(await client.get(f"/v1/accounts/{account_id}"), 404, 5, "not found")


# Top-ups


async def test_top_ups_credit_the_balance_and_book_ledger_entries(client, engine):
    account = await new_account(client, timezone="America/New_York")
    aid = account["account_id"]
    r1 = await client.post(f"/v1/accounts/{aid}/topups", json={"amount": "100", "reference": "inv-1"})
    r2 = await client.post(f"/v1/accounts/{aid}/topups", json={"amount": "0.000000001", "reference": "inv-2"})
    assert (r1.status_code, r2.status_code) == (201, 201)
    assert r1.json()["amount"] == "100.000000000"
    assert r2.json()["balance"] == "100.000000001"
    balance = await fetch(engine, "SELECT balance, topups_total FROM account_balances WHERE account_id = :a", a=aid)
    assert balance == [{"balance": 100 * NANO + 1, "topups_total": 100 * NANO + 1}]
    entries = await fetch(
        engine,
        "SELECT entry_type, reference, balance_delta, local_day, event_time FROM ledger_entries"
        " WHERE account_id = :a ORDER BY entry_id",
        a=aid,
    )
    assert [(e["entry_type"], e["reference"], e["balance_delta"]) for e in entries] == [
        ("topup", "inv-1", 100 * NANO),
        ("topup", "inv-2", 1),
    ]
    for entry in entries:  # the account's local date, not UTC's
        assert entry["local_day"] == entry["event_time"].astimezone(_zone("America/New_York")).date()


def _zone(name: str):
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


async def test_top_up_clears_depletion_only_once_the_balance_is_positive(client, engine):
    aid = (await new_account(client))["account_id"]
    await execute(engine, "UPDATE account_balances SET balance = -5000000000, balance_depleted = true"
                          " WHERE account_id = :a", a=aid)
    await client.post(f"/v1/accounts/{aid}/topups", json={"amount": "2", "reference": "a"})
    assert await fetch(engine, "SELECT balance, balance_depleted FROM account_balances WHERE account_id = :a",
                       a=aid) == [{"balance": -3 * NANO, "balance_depleted": True}]
    await client.post(f"/v1/accounts/{aid}/topups", json={"amount": "10", "reference": "b"})
    assert await fetch(engine, "SELECT balance, balance_depleted FROM account_balances WHERE account_id = :a",
                       a=aid) == [{"balance": 7 * NANO, "balance_depleted": False}]


async def test_same_reference_and_amount_returns_the_original_top_up(client, engine):
    aid = (await new_account(client))["account_id"]
    first = await client.post(f"/v1/accounts/{aid}/topups", json={"amount": "50.00", "reference": "pay-7"})
    again = await client.post(f"/v1/accounts/{aid}/topups", json={"amount": "50", "reference": "pay-7"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["entry_id"] == first.json()["entry_id"]
    assert again.json()["created_at"] == first.json()["created_at"]
    assert await fetch(engine, "SELECT count(*) AS n FROM ledger_entries WHERE account_id = :a", a=aid) == [{"n": 1}]
    assert (await client.get(f"/v1/accounts/{aid}")).json()["balance"] == "50.000000000"


async def test_same_reference_with_another_amount_is_a_conflict(client, engine):
    aid = (await new_account(client))["account_id"]
    await client.post(f"/v1/accounts/{aid}/topups", json={"amount": "50", "reference": "pay-7"})
    r = await client.post(f"/v1/accounts/{aid}/topups", json={"amount": "60", "reference": "pay-7"})
    assert_error_shape(r, 409, 6, "pay-7", "50.000000000")
    assert (await client.get(f"/v1/accounts/{aid}")).json()["balance"] == "50.000000000"


async def test_concurrent_identical_top_ups_credit_once(client, engine):
    aid = (await new_account(client))["account_id"]
    replies = await asyncio.gather(
        *(client.post(f"/v1/accounts/{aid}/topups", json={"amount": "10", "reference": "race"}) for _ in range(20))
    )
    assert sorted(r.status_code for r in replies) == [200] * 19 + [201]
    assert len({r.json()["entry_id"] for r in replies}) == 1
    assert await fetch(engine, "SELECT count(*) AS n FROM ledger_entries WHERE account_id = :a", a=aid) == [{"n": 1}]
    balance = await fetch(engine, "SELECT balance, topups_total FROM account_balances WHERE account_id = :a", a=aid)
    assert balance == [{"balance": 10 * NANO, "topups_total": 10 * NANO}]


async def test_concurrent_distinct_top_ups_all_count(client, engine):
    aid = (await new_account(client))["account_id"]
    replies = await asyncio.gather(
        *(client.post(f"/v1/accounts/{aid}/topups", json={"amount": "1.5", "reference": f"r{i}"}) for i in range(15))
    )
    assert all(r.status_code == 201 for r in replies)
    assert (await client.get(f"/v1/accounts/{aid}")).json()["balance"] == "22.500000000"


async def test_a_reference_is_per_account(client):
    a = (await new_account(client))["account_id"]
    b = (await new_account(client))["account_id"]
    ra = await client.post(f"/v1/accounts/{a}/topups", json={"amount": "1", "reference": "same"})
    rb = await client.post(f"/v1/accounts/{b}/topups", json={"amount": "2", "reference": "same"})
    assert (ra.status_code, rb.status_code) == (201, 201)


async def test_top_up_of_unknown_account_is_404(client, engine):
    r = await client.post("/v1/accounts/acc_01JD8ZJ9000000000000000000/topups", json={"amount": "1", "reference": "x"})
    assert_error_shape(r, 404, 5, "acc_01JD8ZJ9000000000000000000")
    assert await fetch(engine, "SELECT count(*) AS n FROM ledger_entries") == [{"n": 0}]


# Packages


async def test_create_package_books_grant_and_balance_row(client, engine):
    aid = (await new_account(client))["account_id"]
    until = datetime(2099, 1, 1, tzinfo=timezone.utc)
    r = await client.post(
        f"/v1/accounts/{aid}/packages",
        json={"tokens": 5000, "price": "19.99", "valid_from": "2026-01-01T00:00:00+08:00",
              "valid_until": "2099-01-01T00:00:00Z"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert re.fullmatch(r"pkg_[0-9A-Z]{26}", body["package_id"])
    assert (body["tokens_total"], body["tokens_remaining"], body["price"]) == (5000, 5000, "19.990000000")
    pid = body["package_id"]
    stored = await fetch(engine, "SELECT account_id, tokens_total, price, valid_from, valid_until FROM packages"
                                 " WHERE package_id = :p", p=pid)
    assert stored == [{"account_id": aid, "tokens_total": 5000, "price": 19_990_000_000,
                       "valid_from": datetime(2025, 12, 31, 16, tzinfo=timezone.utc), "valid_until": until}]
    assert await fetch(engine, "SELECT tokens_used FROM package_balances WHERE package_id = :p", p=pid) == [
        {"tokens_used": 0}
    ]
    grants = await fetch(engine, "SELECT entry_type, package_id, package_tokens, balance_delta FROM ledger_entries"
                                 " WHERE account_id = :a", a=aid)
    assert grants == [{"entry_type": "package_grant", "package_id": pid, "package_tokens": 5000, "balance_delta": 0}]
    account = (await client.get(f"/v1/accounts/{aid}")).json()
    assert account["package"]["package_id"] == pid
    assert account["balance"] == "0.000000000"  # a grant moves tokens, not money


async def test_valid_from_defaults_to_now(client, clock):
    aid = (await new_account(client))["account_id"]
    r = await new_package(client, aid)
    assert r.status_code == 201
    assert datetime.fromisoformat(r.json()["valid_from"]) == clock.now


async def test_second_package_while_one_is_active_is_a_conflict(client, engine):
    aid = (await new_account(client))["account_id"]
    first = await new_package(client, aid)
    r = await new_package(client, aid)
    assert_error_shape(r, 409, 6, first.json()["package_id"], "active package")
    assert await fetch(engine, "SELECT count(*) AS n FROM packages WHERE account_id = :a", a=aid) == [{"n": 1}]


async def test_a_package_starting_later_still_blocks_another(client):
    aid = (await new_account(client))["account_id"]
    later = (datetime.now(timezone.utc) + timedelta(days=10)).isoformat()
    assert (await new_package(client, aid, valid_from=later)).json()["status"] == "pending"
    assert (await new_package(client, aid)).status_code == 409


async def test_new_package_allowed_once_the_previous_expired(client, clock):
    aid = (await new_account(client))["account_id"]
    until = (clock.now + timedelta(hours=1)).isoformat()
    first = await new_package(client, aid, valid_until=until)
    assert first.status_code == 201
    clock.advance(timedelta(hours=2))
    second = await new_package(client, aid, valid_until=(clock.now + timedelta(days=1)).isoformat())
    assert second.status_code == 201, second.text
    account = (await client.get(f"/v1/accounts/{aid}")).json()
    assert account["package"]["package_id"] == second.json()["package_id"]


async def test_new_package_allowed_once_the_previous_is_used_up(client, engine):
    aid = (await new_account(client))["account_id"]
    first = (await new_package(client, aid)).json()
    await execute(engine, "UPDATE package_balances SET tokens_used = tokens_used + 1000 WHERE package_id = :p",
                  p=first["package_id"])
    assert (await new_package(client, aid)).status_code == 201


async def test_concurrent_package_purchases_let_one_through(client, engine):
    aid = (await new_account(client))["account_id"]
    replies = await asyncio.gather(*(new_package(client, aid) for _ in range(8)))
    assert sorted(r.status_code for r in replies) == [201] + [409] * 7
    assert await fetch(engine, "SELECT count(*) AS n FROM packages WHERE account_id = :a", a=aid) == [{"n": 1}]


# Keys


async def test_key_secret_is_returned_once_and_only_its_hash_is_stored(client, engine):
    aid = (await new_account(client))["account_id"]
    r = await client.post(f"/v1/accounts/{aid}/keys", json={"name": "prod-chat", "billing_mode": "payg"})
    assert r.status_code == 201, r.text
    created = r.json()
    secret = created["api_key"]
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{40,}", secret)
    assert set(created) >= {"key_id", "api_key", "account_id", "name", "billing_mode", "package_id", "daily_cap",
                            "monthly_cap", "status", "created_at"}
    assert (created["status"], created["billing_mode"], created["package_id"]) == ("active", "payg", None)
    assert re.fullmatch(r"key_[0-9A-Z]{26}", created["key_id"])

    got = await client.get(f"/v1/keys/{created['key_id']}")
    assert got.status_code == 200
    assert "api_key" not in got.json() and secret not in got.text
    assert {k: v for k, v in created.items() if k != "api_key"} == got.json()

    stored = await fetch(engine, "SELECT secret_hash, row_to_json(k)::text AS everything FROM api_keys k"
                                 " WHERE key_id = :k", k=created["key_id"])
    assert stored[0]["secret_hash"] == hashlib.sha256(secret.encode()).digest()
    assert secret not in stored[0]["everything"]
    assert secret[3:] not in stored[0]["everything"]


async def test_two_keys_get_different_secrets(client):
    aid = (await new_account(client))["account_id"]
    one = (await client.post(f"/v1/accounts/{aid}/keys", json={"name": "a", "billing_mode": "payg"})).json()
    two = (await client.post(f"/v1/accounts/{aid}/keys", json={"name": "a", "billing_mode": "payg"})).json()
    assert one["api_key"] != two["api_key"] and one["key_id"] != two["key_id"]


async def test_payg_key_stores_caps(client, engine):
    aid = (await new_account(client))["account_id"]
    r = await client.post(f"/v1/accounts/{aid}/keys",
                          json={"name": "k", "billing_mode": "payg", "daily_cap": "5", "monthly_cap": "100.25"})
    assert (r.json()["daily_cap"], r.json()["monthly_cap"]) == ("5.000000000", "100.250000000")
    assert await fetch(engine, "SELECT daily_cap, monthly_cap FROM api_keys WHERE key_id = :k",
                       k=r.json()["key_id"]) == [{"daily_cap": 5 * NANO, "monthly_cap": 100_250_000_000}]


async def test_package_key_binds_the_active_package(client):
    aid = (await new_account(client))["account_id"]
    pid = (await new_package(client, aid)).json()["package_id"]
    r = await client.post(f"/v1/accounts/{aid}/keys", json={"name": "k", "billing_mode": "package"})
    assert r.status_code == 201, r.text
    assert r.json()["package_id"] == pid


async def test_package_key_without_an_active_package_is_refused(client, engine):
    aid = (await new_account(client))["account_id"]
    r = await client.post(f"/v1/accounts/{aid}/keys", json={"name": "k", "billing_mode": "package"})
    assert_error_shape(r, 409, 6, "no active package")
    assert await fetch(engine, "SELECT count(*) AS n FROM api_keys") == [{"n": 0}]


async def test_package_of_another_account_cannot_be_bound(client):
    a = (await new_account(client))["account_id"]
    b = (await new_account(client))["account_id"]
    other = (await new_package(client, b)).json()["package_id"]
    r = await client.post(f"/v1/accounts/{a}/keys", json={"name": "k", "billing_mode": "package", "package_id": other})
    assert_error_shape(r, 400, 3, "body.package_id", other)


async def test_payg_key_takes_no_package(client):
    aid = (await new_account(client))["account_id"]
    pid = (await new_package(client, aid)).json()["package_id"]
    r = await client.post(f"/v1/accounts/{aid}/keys", json={"name": "k", "billing_mode": "payg", "package_id": pid})
    assert_error_shape(r, 400, 3, "body.package_id")


async def test_package_key_takes_no_spend_cap(client):
    aid = (await new_account(client))["account_id"]
    await new_package(client, aid)
    r = await client.post(f"/v1/accounts/{aid}/keys", json={"name": "k", "billing_mode": "package", "daily_cap": "1"})
    assert_error_shape(r, 400, 3, "body.daily_cap")


async def test_key_for_unknown_account_is_404(client):
    r = await client.post("/v1/accounts/acc_01JD8ZJ9000000000000000000/keys",
                          json={"name": "k", "billing_mode": "payg"})
    assert_error_shape(r, 404, 5)


async def test_unknown_key_is_404(client):
    for r in (
        await client.get("/v1/keys/key_01JD8ZK3000000000000000000"),
        await client.patch("/v1/keys/key_01JD8ZK3000000000000000000", json={"name": "x"}),
        await client.post("/v1/keys/key_01JD8ZK3000000000000000000/revoke"),
    ):
        assert_error_shape(r, 404, 5, "key_01JD8ZK3000000000000000000")


async def test_patch_changes_caps_and_name_only(client, engine):
    aid = (await new_account(client))["account_id"]
    key = (await client.post(f"/v1/accounts/{aid}/keys",
                             json={"name": "k", "billing_mode": "payg", "monthly_cap": "300"})).json()
    r = await client.patch(f"/v1/keys/{key['key_id']}", json={"daily_cap": "12.345", "name": "renamed"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["name"], body["daily_cap"], body["monthly_cap"]) == ("renamed", "12.345000000", "300.000000000")
    stored = await fetch(engine, "SELECT name, daily_cap, monthly_cap FROM api_keys WHERE key_id = :k",
                         k=key["key_id"])
    assert stored == [{"name": "renamed", "daily_cap": 12_345_000_000, "monthly_cap": 300 * NANO}]
    r = await client.patch(f"/v1/keys/{key['key_id']}", json={"monthly_cap": "0"})
    assert r.json()["monthly_cap"] == "0.000000000"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"daily_cap": 5}, "body.daily_cap"),
        ({"daily_cap": None}, "body.daily_cap"),
        ({"monthly_cap": "-1"}, "body.monthly_cap"),
        ({"name": ""}, "body.name"),
        ({"billing_mode": "package"}, "body.billing_mode"),
    ],
)
async def test_patch_refuses_bad_values(client, engine, patch, field):
    aid = (await new_account(client))["account_id"]
    key = (await client.post(f"/v1/accounts/{aid}/keys", json={"name": "k", "billing_mode": "payg"})).json()
    assert_error_shape(await client.patch(f"/v1/keys/{key['key_id']}", json=patch), 400, 3, field)
    assert (await client.get(f"/v1/keys/{key['key_id']}")).json() == {k: v for k, v in key.items() if k != "api_key"}


async def test_patch_rebinds_a_package_key_to_the_new_package(client, engine):
    aid = (await new_account(client))["account_id"]
    old = (await new_package(client, aid)).json()["package_id"]
    key = (await client.post(f"/v1/accounts/{aid}/keys", json={"name": "k", "billing_mode": "package"})).json()
    await execute(engine, "UPDATE package_balances SET tokens_used = 1000 WHERE package_id = :p", p=old)
    new = (await new_package(client, aid)).json()["package_id"]
    r = await client.patch(f"/v1/keys/{key['key_id']}", json={"package_id": new})
    assert r.status_code == 200, r.text
    assert r.json()["package_id"] == new
    # the used-up package cannot be bound again
    r = await client.patch(f"/v1/keys/{key['key_id']}", json={"package_id": old})
    assert_error_shape(r, 409, 6, old, "exhausted")


async def test_revoke_is_final_and_idempotent(client, engine):
    aid = (await new_account(client))["account_id"]
    key = (await client.post(f"/v1/accounts/{aid}/keys", json={"name": "k", "billing_mode": "payg"})).json()
    first = await client.post(f"/v1/keys/{key['key_id']}/revoke")
    assert first.status_code == 200
    assert first.json()["status"] == "revoked" and first.json()["revoked_at"]
    again = await client.post(f"/v1/keys/{key['key_id']}/revoke")
    assert again.json() == first.json()
    assert (await client.get(f"/v1/keys/{key['key_id']}")).json()["status"] == "revoked"
    stored = await fetch(engine, "SELECT status, revoked_at FROM api_keys WHERE key_id = :k", k=key["key_id"])
    assert stored[0]["status"] == "revoked" and stored[0]["revoked_at"] is not None
    assert_error_shape(await client.patch(f"/v1/keys/{key['key_id']}", json={"name": "x"}), 409, 6, "revoked")


# Prices


async def test_each_price_put_adds_a_version(client, engine):
    r1 = await client.put("/v1/prices/gpt-4o", json={
        "input_price": "2.5", "output_price": "10", "effective_from": "2026-01-01T00:00:00Z"})
    r2 = await client.put("/v1/prices/gpt-4o", json={
        "input_price": "2", "output_price": "8", "cached_input_price": "0.5", "per_request_fee": "0.001",
        "batch_discount": "0.5", "package_weight": "1.5", "min_tier": "developer",
        "effective_from": "2026-06-01T00:00:00+08:00"})
    assert (r1.status_code, r2.status_code) == (201, 201), (r1.text, r2.text)
    assert r1.json()["cached_input_price"] == "2.500"  # defaults to input_price
    rows = await fetch(engine, "SELECT input_price, output_price, cached_input_price, per_request_fee,"
                               " batch_discount_ppm, package_weight_ppm, min_tier FROM prices"
                               " WHERE model = 'gpt-4o' ORDER BY effective_from")
    assert rows == [
        {"input_price": 2500, "output_price": 10000, "cached_input_price": 2500, "per_request_fee": 0,
         "batch_discount_ppm": 0, "package_weight_ppm": 1_000_000, "min_tier": "free"},
        {"input_price": 2000, "output_price": 8000, "cached_input_price": 500, "per_request_fee": 1_000_000,
         "batch_discount_ppm": 500_000, "package_weight_ppm": 1_500_000, "min_tier": "developer"},
    ]
    listed = (await client.get("/v1/prices")).json()
    assert listed["next_cursor"] is None
    assert [p["effective_from"] for p in listed["data"]] == ["2026-01-01T00:00:00Z", "2026-05-31T16:00:00Z"]
    assert listed["data"][1] == {
        "price_id": r2.json()["price_id"], "model": "gpt-4o", "input_price": "2.000", "output_price": "8.000",
        "cached_input_price": "0.500", "per_request_fee": "0.001000000", "batch_discount": "0.5",
        "package_weight": "1.5", "min_tier": "developer", "effective_from": "2026-05-31T16:00:00Z",
    }
    for row in listed["data"]:
        for field in ("input_price", "output_price", "cached_input_price", "per_request_fee", "batch_discount",
                      "package_weight"):
            assert isinstance(row[field], str)


async def test_same_model_and_start_twice_is_a_conflict(client, engine):
    body = {"input_price": "1", "output_price": "2", "effective_from": "2026-01-01T00:00:00Z"}
    assert (await client.put("/v1/prices/m", json=body)).status_code == 201
    r = await client.put("/v1/prices/m", json={**body, "input_price": "3"})
    assert_error_shape(r, 409, 6, "'m'", "effective from")
    assert await fetch(engine, "SELECT input_price FROM prices") == [{"input_price": 1000}]


async def test_effective_from_defaults_to_now(client, clock):
    r = await client.put("/v1/prices/m", json={"input_price": "1", "output_price": "2"})
    assert datetime.fromisoformat(r.json()["effective_from"]) == clock.now


async def test_model_names_are_exact_and_may_contain_slashes(client):
    for model in ("org/Model-1.5:beta", "ORG/model-1.5:beta"):
        r = await client.put(f"/v1/prices/{model}", json={"input_price": "1", "output_price": "1"})
        assert r.status_code == 201, r.text
        assert r.json()["model"] == model
    listed = (await client.get("/v1/prices", params={"model": "org/Model-1.5:beta"})).json()["data"]
    assert [p["model"] for p in listed] == ["org/Model-1.5:beta"]


async def test_price_list_pages_with_a_cursor(client):
    for i in range(5):
        await client.put("/v1/prices/m", json={"input_price": str(i), "output_price": "1",
                                               "effective_from": f"2026-0{i + 1}-01T00:00:00Z"})
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/prices", params=params)).json()
        seen += [p["input_price"] for p in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["0.000", "1.000", "2.000", "3.000", "4.000"]


@pytest.mark.parametrize(
    ("params", "field"),
    [({"limit": "0"}, "query.limit"), ({"limit": "100000000"}, "query.limit"), ({"limit": "x"}, "query.limit"),
     ({"cursor": "not-a-cursor"}, "query.cursor"), ({"model": "bad model"}, "query.model")],
)
async def test_price_list_refuses_bad_query(client, params, field):
    assert_error_shape(await client.get("/v1/prices", params=params), 400, 3, field)


# The ledger is the truth: what the API booked rebuilds to the same projections.


async def test_projections_rebuild_to_what_the_api_wrote(client, engine, database_url):
    a = (await new_account(client))["account_id"]
    b = (await new_account(client))["account_id"]
    await client.post(f"/v1/accounts/{a}/topups", json={"amount": "10", "reference": "1"})
    await client.post(f"/v1/accounts/{a}/topups", json={"amount": "0.5", "reference": "2"})
    await client.post(f"/v1/accounts/{a}/topups", json={"amount": "0.5", "reference": "2"})
    await new_package(client, b)
    live = await asyncio.to_thread(snapshot_projections, database_url)
    await asyncio.to_thread(rebuild_projections, database_url)
    assert await asyncio.to_thread(snapshot_projections, database_url) == live


# Authentication: every control-plane route needs the admin token.

ADMIN_ROUTES = [
    ("POST", "/v1/accounts", {"name": "x"}),
    ("GET", "/v1/accounts/acc_01JD8ZJ9000000000000000000", None),
    ("POST", "/v1/accounts/acc_01JD8ZJ9000000000000000000/topups", {"amount": "1", "reference": "r"}),
    ("POST", "/v1/accounts/acc_01JD8ZJ9000000000000000000/packages", {"tokens": 1, "price": "1",
                                                                      "valid_until": "2099-01-01T00:00:00Z"}),
    ("POST", "/v1/accounts/acc_01JD8ZJ9000000000000000000/keys", {"name": "k", "billing_mode": "payg"}),
    ("GET", "/v1/keys/key_01JD8ZK3000000000000000000", None),
    ("PATCH", "/v1/keys/key_01JD8ZK3000000000000000000", {"name": "k"}),
    ("POST", "/v1/keys/key_01JD8ZK3000000000000000000/revoke", None),
    ("PUT", "/v1/prices/gpt-4o", {"input_price": "1", "output_price": "1"}),
    ("PUT", "/v1/prices/org/model", {"input_price": "1", "output_price": "1"}),
    ("GET", "/v1/prices", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", f"Basic {ADMIN_TOKEN}", f"Bearer {ADMIN_TOKEN}x", "Bearer", "Bearer  "],
)
async def test_admin_routes_refuse_missing_or_unknown_token(client, engine, method, path, body, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    client.headers.pop("Authorization")
    r = await client.request(method, path, json=body, headers=headers)
    assert_error_shape(r, 401, 16, "token")
    assert r.json()["error"]["code"] == "unauthenticated"
    assert r.headers["www-authenticate"] == "Bearer"
    assert await fetch(engine, "SELECT (SELECT count(*) FROM accounts) + (SELECT count(*) FROM prices) AS n") == [
        {"n": 0}
    ]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
@pytest.mark.parametrize("token", [GATEWAY_TOKEN, BILLING_TOKEN])
async def test_admin_routes_forbid_gateway_and_billing_tokens(client, engine, method, path, body, token):
    r = await client.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"})
    assert_error_shape(r, 403, 7, "admin token")
    assert r.json()["error"]["code"] == "forbidden"
    assert await fetch(engine, "SELECT (SELECT count(*) FROM accounts) + (SELECT count(*) FROM prices) AS n") == [
        {"n": 0}
    ]


@pytest.mark.parametrize("token", [None, GATEWAY_TOKEN])
async def test_token_is_checked_before_the_body_is_read(client, token):
    client.headers.pop("Authorization")
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    r = await client.post("/v1/accounts", content=b"{not json", headers=headers)
    assert r.status_code == (403 if token else 401), r.text


async def test_empty_configured_tokens_never_match(database_url, engine):
    settings = load_settings(database_url=database_url, admin_token="", gateway_token="", billing_token="")
    app = create_app(settings, engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for authorization in ("Bearer ", "Bearer", "Bearer \"\"", None):
            headers = {"Authorization": authorization} if authorization is not None else {}
            assert_error_shape(await c.get("/v1/prices", headers=headers), 401, 16)


async def test_token_with_non_ascii_bytes_is_401_not_500(client):
    client.headers.pop("Authorization")
    r = await client.get("/v1/prices", headers={"Authorization": "Bearer \u00e9t\u00e9".encode()})
    assert_error_shape(r, 401, 16)


# Bad input: always a 4xx in the documented shape that names the field, never a 5xx.

FUTURE = "2099-01-01T00:00:00Z"

BAD_INPUTS: list[tuple[str, str, Any, str]] = [
    # (route, what, body (dict, or bytes sent as-is), field named in msg)
    ("topup", "money as JSON number", {"amount": 10, "reference": "r"}, "body.amount"),
    ("topup", "money as JSON float", {"amount": 10.5, "reference": "r"}, "body.amount"),
    ("topup", "money as boolean", {"amount": True, "reference": "r"}, "body.amount"),
    ("topup", "too many decimals", {"amount": "1.0000000001", "reference": "r"}, "body.amount"),
    ("topup", "negative amount", {"amount": "-5", "reference": "r"}, "body.amount"),
    ("topup", "zero amount", {"amount": "0", "reference": "r"}, "body.amount"),
    ("topup", "exponent notation", {"amount": "1e3", "reference": "r"}, "body.amount"),
    ("topup", "amount beyond any column", {"amount": "999999999999999", "reference": "r"}, "body.amount"),
    ("topup", "missing reference", {"amount": "1"}, "body.reference"),
    ("topup", "empty reference", {"amount": "1", "reference": "  "}, "body.reference"),
    ("topup", "reference with NUL", {"amount": "1", "reference": "a\u0000b"}, "body.reference"),
    ("topup", "reference too long", {"amount": "1", "reference": "r" * 201}, "body.reference"),
    ("topup", "reference lone surrogate", b'{"amount": "1", "reference": "\\ud800"}', "body.reference"),
    ("account", "unknown tier", {"name": "a", "tier": "gold"}, "body.tier"),
    ("account", "bad timezone", {"name": "a", "timezone": "Mars/Olympus"}, "body.timezone"),
    ("account", "timezone as number", {"name": "a", "timezone": 8}, "body.timezone"),
    ("account", "missing name", {"tier": "free"}, "body.name"),
    ("account", "name not a string", {"name": ["a"]}, "body.name"),
    ("account", "unknown field", {"name": "a", "teir": "free"}, "body.teir"),
    ("account", "JSON array body", [{"name": "a"}], "body"),
    ("package", "valid_until before valid_from",
     {"tokens": 10, "price": "1", "valid_from": "2099-02-01T00:00:00Z", "valid_until": FUTURE}, "body.valid_until"),
    ("package", "valid_until in the past", {"tokens": 10, "price": "1", "valid_until": "2020-01-01T00:00:00Z"},
     "body.valid_until"),
    ("package", "tokens 0", {"tokens": 0, "price": "1", "valid_until": FUTURE}, "body.tokens"),
    ("package", "tokens negative", {"tokens": -1, "price": "1", "valid_until": FUTURE}, "body.tokens"),
    ("package", "tokens as string", {"tokens": "10", "price": "1", "valid_until": FUTURE}, "body.tokens"),
    ("package", "tokens as float", {"tokens": 10.0, "price": "1", "valid_until": FUTURE}, "body.tokens"),
    ("package", "tokens huge", {"tokens": 10**20, "price": "1", "valid_until": FUTURE}, "body.tokens"),
    ("package", "price as number", {"tokens": 10, "price": 1, "valid_until": FUTURE}, "body.price"),
    ("package", "time without offset", {"tokens": 10, "price": "1", "valid_until": "2099-01-01T00:00:00"},
     "body.valid_until"),
    ("package", "time as number", {"tokens": 10, "price": "1", "valid_until": 4070908800}, "body.valid_until"),
    ("package", "time nonsense", {"tokens": 10, "price": "1", "valid_until": "2099-13-45T99:00:00Z"},
     "body.valid_until"),
    ("package", "time at the end of time", {"tokens": 10, "price": "1", "valid_until": "9999-12-31T23:59:59-23:59"},
     "body.valid_until"),
    ("key", "unknown billing_mode", {"name": "k", "billing_mode": "prepaid"}, "body.billing_mode"),
    ("key", "missing billing_mode", {"name": "k"}, "body.billing_mode"),
    ("key", "cap as number", {"name": "k", "billing_mode": "payg", "daily_cap": 5}, "body.daily_cap"),
    ("key", "cap with too many decimals", {"name": "k", "billing_mode": "payg", "monthly_cap": "0.0000000001"},
     "body.monthly_cap"),
    ("key", "package_id not an id", {"name": "k", "billing_mode": "package", "package_id": "x\u0000"},
     "body.package_id"),
    ("price", "price as number", {"input_price": 1.5, "output_price": "1"}, "body.input_price"),
    ("price", "price with 4 decimals", {"input_price": "1.0001", "output_price": "1"}, "body.input_price"),
    ("price", "negative price", {"input_price": "1", "output_price": "-1"}, "body.output_price"),
    ("price", "discount above 1", {"input_price": "1", "output_price": "1", "batch_discount": "1.5"},
     "body.batch_discount"),
    ("price", "discount as number", {"input_price": "1", "output_price": "1", "batch_discount": 0.5},
     "body.batch_discount"),
    ("price", "package weight 0", {"input_price": "1", "output_price": "1", "package_weight": "0"},
     "body.package_weight"),
    ("price", "unknown min_tier", {"input_price": "1", "output_price": "1", "min_tier": "platinum"}, "body.min_tier"),
    ("price", "per-request fee as number", {"input_price": "1", "output_price": "1", "per_request_fee": 0},
     "body.per_request_fee"),
    ("price", "missing output_price", {"input_price": "1"}, "body.output_price"),
    ("price", "effective_from garbage", {"input_price": "1", "output_price": "1", "effective_from": "yesterday"},
     "body.effective_from"),
    ("account", "malformed JSON", b'{"name": "a",', "body"),
    ("topup", "malformed JSON", b"{amount: 1}", "body"),
    ("account", "empty body", b"", "body"),
    ("account", "JSON null body", b"null", "body"),
]


@pytest.fixture
async def targets(client) -> dict[str, str]:
    aid = (await new_account(client))["account_id"]
    return {
        "account": "POST /v1/accounts",
        "topup": f"POST /v1/accounts/{aid}/topups",
        "package": f"POST /v1/accounts/{aid}/packages",
        "key": f"POST /v1/accounts/{aid}/keys",
        "price": "PUT /v1/prices/gpt-4o",
    }


@pytest.mark.parametrize(("route", "what", "body", "field"), BAD_INPUTS, ids=[b[1] for b in BAD_INPUTS])
async def test_bad_input_is_400_naming_the_field(client, engine, targets, route, what, body, field):
    method, path = targets[route].split(" ", 1)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = await client.request(method, path, content=content, headers={"Content-Type": "application/json"})
    error = assert_error_shape(r, 400, 3)
    assert error["msg"].startswith(field) or f"; {field}" in error["msg"], error["msg"]
    assert error["error"]["code"] == "invalid_request"
    assert await fetch(engine, "SELECT (SELECT count(*) FROM ledger_entries) + (SELECT count(*) FROM prices)"
                               " + (SELECT count(*) FROM api_keys) + (SELECT count(*) FROM packages) AS n") == [
        {"n": 0}
    ]


@pytest.mark.parametrize(
    ("content_type", "content"),
    [("text/plain", b'{"name": "a"}'), ("application/x-www-form-urlencoded", b"name=a"), (None, b'{"name": "a"}')],
)
async def test_body_that_is_not_json_is_400(client, content_type, content):
    headers = {"Content-Type": content_type} if content_type else {}
    r = await client.post("/v1/accounts", content=content, headers=headers)
    assert_error_shape(r, 400, 3, "body", "JSON")


async def test_oversize_body_is_413(client, engine):
    huge = json.dumps({"name": "a" * 2_000_000}).encode()
    r = await client.post("/v1/accounts", content=huge, headers={"Content-Type": "application/json"})
    assert_error_shape(r, 413, 3, "body", "1048576")
    assert r.json()["error"]["code"] == "payload_too_large"
    assert await fetch(engine, "SELECT count(*) AS n FROM accounts") == [{"n": 0}]


async def test_oversize_streamed_body_without_length_is_413(client):
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'

    r = await client.post("/v1/accounts", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error_shape(r, 413, 3, "body")


@pytest.mark.parametrize("path", ["/v1/prices/bad%20name", "/v1/prices/a//b", "/v1/prices/" + "m" * 257,
                                  "/v1/prices/m%00"])
async def test_bad_model_in_path_is_400(client, path):
    r = await client.put(path, json={"input_price": "1", "output_price": "1"})
    assert_error_shape(r, 400, 3, "path.model")


async def test_patch_unbinding_a_package_key_is_refused(client):
    aid = (await new_account(client))["account_id"]
    await new_package(client, aid)
    key = (await client.post(f"/v1/accounts/{aid}/keys", json={"name": "k", "billing_mode": "package"})).json()
    assert_error_shape(await client.patch(f"/v1/keys/{key['key_id']}", json={"package_id": None}), 400, 3,
                       "body.package_id")

