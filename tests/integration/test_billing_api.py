"""The billing and finance read API (DESIGN §6.4): usage, breaches, ledger, statements.

Events are booked as in production (real broker, real consumer) and every number the API
answers is checked against values computed here from the events themselves (plain integers
and zoneinfo; see tests/support/booking.py), never against the code under test.
"""

from __future__ import annotations

import base64
import json
import random
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta, timezone
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.contracts.breaches import breach_view
from services.contracts.events import build_usage_event
from services.metering.api.app import create_app
from services.metering.consumer.expiry import sweep_package_expiries
from services.metering.store.db import make_engine
from tests.support import seed
from tests.support.booking import NANO, Booked, book, charge_of, cny, fen, local_day, package_deduction, seed_prices
from tests.support.kafka import metering_settings

UTC = timezone.utc
SH, NY = "Asia/Shanghai", "America/New_York"
BILLING = {"Authorization": "Bearer billing-token"}
ADMIN = {"Authorization": "Bearer admin-token"}
GATEWAY = {"Authorization": "Bearer gateway-token"}
SUMS = ("requests", "inputs", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
        "total_tokens", "package_tokens", "charge")


class Clock:
    """The control plane's clock, so top-ups and packages can be booked in the past."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def settings(database_url: str, broker, topic_names: dict[str, str]):
    return metering_settings(database_url, broker.bootstrap_servers, topic_names, topic_partitions=1)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(database_url, pool_size=4)
    yield eng
    await eng.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime.now(UTC))


@pytest.fixture
async def client(settings, engine: AsyncEngine, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, engine, clock=clock)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


async def get_ok(client: httpx.AsyncClient, url: str, **params: Any) -> dict[str, Any]:
    r = await client.get(url, params=params, headers=BILLING)
    assert r.status_code == 200, r.text
    return r.json()


async def all_pages(client: httpx.AsyncClient, url: str, **params: Any) -> tuple[list[dict], list[dict]]:
    """Every row of a paginated list, and each page's body."""
    rows, pages, cursor = [], [], None
    while True:
        body = await get_ok(client, url, **params, **({"cursor": cursor} if cursor else {}))
        pages.append(body)
        rows.extend(body["data"])
        cursor = body["next_cursor"]
        if cursor is None:
            return rows, pages
        assert len(pages) < 1000


def assert_error(r: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "msg", "error"}, body
    assert body["error"]["message"] == body["msg"]
    for needle in needles:
        assert needle in body["msg"], body["msg"]
    return body


# A month end in two zones: PAYG keys of a Shanghai and a New York account.

START = datetime(2026, 10, 29, tzinfo=UTC)
ZONES = {"acc_sh": SH, "acc_ny": NY}
KEYS = {"key_a": "acc_sh", "key_b": "acc_sh", "key_ny": "acc_ny"}
KEY_A_DAILY_CAP = NANO // 20  # 0.05 CNY
SH_MIDNIGHT = datetime(2026, 10, 31, 16, 0, tzinfo=UTC)  # 2026-11-01 00:00 in Shanghai


def seed_month_end(url: str) -> list[Booked]:
    """Accounts, keys and ~100 events from 29 Oct to 4 Nov (UTC); returns the reference."""
    seed_prices(url)
    for account, tz in ZONES.items():
        seed.create_account(url, account, tz)
    seed.topup(url, "acc_sh", 1 * NANO, "t1")  # spent during the run: balance_depleted
    seed.topup(url, "acc_ny", 50 * NANO, "t1")
    seed.create_key(url, "key_a", "acc_sh", "payg", daily_cap=KEY_A_DAILY_CAP)
    seed.create_key(url, "key_b", "acc_sh", "payg")
    seed.create_key(url, "key_ny", "acc_ny", "payg")
    rng = random.Random(20261122)
    plan = []
    for i in range(96):
        key = list(KEYS)[i % 3]
        plan.append((key, rng.choice(["chat-s", "chat-l"]), START + timedelta(minutes=89 * i)))
    # Either side of Shanghai's midnight that starts November.
    plan += [("key_b", "chat-s", SH_MIDNIGHT - timedelta(seconds=1)), ("key_b", "chat-s", SH_MIDNIGHT)]
    booked = []
    for i, (key, model, when) in enumerate(plan):
        account = KEYS[key]
        prompt, completion = rng.randint(10, 3000), rng.randint(0, 1500)
        cached, reasoning = rng.randint(0, prompt), rng.randint(0, completion)
        event = build_usage_event(
            account_id=account, key_id=key, model=model, prompt_tokens=prompt, completion_tokens=completion,
            cached_tokens=cached, reasoning_tokens=reasoning, request_id=f"req-{i}", time=when,
            inputs=rng.randint(1, 3), source=f"gateway/gw-{i % 2}",
        )
        booked.append(Booked(event, account, key, model, when, local_day(when, ZONES[account]),
                             charge=charge_of(model, prompt, completion, cached)))
    return booked


def expected_usage(booked: list[Booked], group_by: list[str], *, account: str | None = None,
                   key: str | None = None, model: str | None = None, day_from: date | None = None,
                   day_to: date | None = None) -> tuple[list[dict], dict]:
    """Rows and totals the API should answer, from the events alone."""
    groups: dict[tuple, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SUMS, 0))
    totals = dict.fromkeys(SUMS, 0)
    fields = {"day": "day", "month": "month", "model": "model", "key": "key_id"}
    for b in booked:
        if (account and b.account_id != account) or (key and b.key_id != key) or (model and b.model != model):
            continue
        if (day_from and b.day < day_from) or (day_to and b.day >= day_to):
            continue
        values = {"day": b.day.isoformat(), "month": b.day.strftime("%Y-%m"), "model": b.model, "key": b.key_id}
        d = b.event.data
        add = dict(requests=1, inputs=d.inputs, prompt_tokens=d.prompt_tokens,
                   completion_tokens=d.completion_tokens, cached_tokens=d.cached_tokens,
                   reasoning_tokens=d.reasoning_tokens, total_tokens=d.total_tokens,
                   package_tokens=b.package_tokens, charge=b.charge)
        for target in (groups[tuple(values[g] for g in group_by)], totals):
            for name, value in add.items():
                target[name] += value
    rows = []
    for group_values, sums in sorted(groups.items()):
        row: dict[str, Any] = {fields[g]: v for g, v in zip(group_by, group_values)}
        row.update(sums, charge=cny(sums["charge"]))
        rows.append(row)
    return rows, {**totals, "charge": cny(totals["charge"])}


# Usage


async def test_usage_rows_and_totals_match_the_booked_events_for_every_grouping(settings, database_url, client):
    booked = seed_month_end(database_url)
    await book(settings, database_url, [b.event for b in booked])
    for group_by in ("day", "month", "model", "key", "day,model", "model,key", "month,key,model"):
        groups = group_by.split(",")
        for account in ZONES:
            body = await get_ok(client, "/v1/usage", account_id=account, group_by=group_by, limit=1000)
            rows, totals = expected_usage(booked, groups, account=account)
            assert body["group_by"] == groups
            assert body["data"] == rows, group_by
            assert body["totals"] == totals
            assert body["next_cursor"] is None
            assert list(body["data"][0]) == [{"key": "key_id"}.get(g, g) for g in groups] + list(SUMS)


async def test_usage_without_group_by_is_per_local_day(settings, database_url, client):
    booked = seed_month_end(database_url)
    await book(settings, database_url, [b.event for b in booked])
    body = await get_ok(client, "/v1/usage", account_id="acc_ny")
    assert body["group_by"] == ["day"]
    assert body["data"] == expected_usage(booked, ["day"], account="acc_ny")[0]


async def test_usage_days_are_the_accounts_local_days_with_to_exclusive(settings, database_url, client):
    booked = seed_month_end(database_url)
    await book(settings, database_url, [b.event for b in booked])
    body = await get_ok(client, "/v1/usage", account_id="acc_sh", **{"from": "2026-10-31", "to": "2026-11-01"})
    rows, totals = expected_usage(booked, ["day"], account="acc_sh", day_from=date(2026, 10, 31),
                                  day_to=date(2026, 11, 1))
    assert [r["day"] for r in body["data"]] == ["2026-10-31"]
    assert body["data"] == rows and body["totals"] == totals
    # The event one second before Shanghai's midnight is October's; the one at midnight is November's,
    # although both happened on 31 October in UTC.
    last_second = [b for b in booked if b.time == SH_MIDNIGHT - timedelta(seconds=1)][0]
    at_midnight = [b for b in booked if b.time == SH_MIDNIGHT][0]
    assert (last_second.day, at_midnight.day) == (date(2026, 10, 31), date(2026, 11, 1))
    november = await get_ok(client, "/v1/usage", account_id="acc_sh", group_by="month",
                            **{"from": "2026-11-01", "to": "2026-12-01"})
    assert november["data"] == expected_usage(booked, ["month"], account="acc_sh", day_from=date(2026, 11, 1),
                                              day_to=date(2026, 12, 1))[0]
    assert november["totals"]["requests"] == sum(1 for b in booked if b.account_id == "acc_sh"
                                                 and b.day >= date(2026, 11, 1))


async def test_usage_filters_by_key_and_model(settings, database_url, client):
    booked = seed_month_end(database_url)
    await book(settings, database_url, [b.event for b in booked])
    by_key = await get_ok(client, "/v1/usage", key_id="key_a", group_by="day,model")
    assert by_key["data"] == expected_usage(booked, ["day", "model"], key="key_a")[0]
    both = await get_ok(client, "/v1/usage", account_id="acc_sh", key_id="key_b", model="chat-l", group_by="key")
    rows, totals = expected_usage(booked, ["key"], key="key_b", model="chat-l")
    assert both["data"] == rows and both["totals"] == totals
    assert both["totals"]["requests"] > 0


async def test_usage_pages_walk_every_group_once_and_totals_cover_all_pages(settings, database_url, client):
    booked = seed_month_end(database_url)
    await book(settings, database_url, [b.event for b in booked])
    rows, pages = await all_pages(client, "/v1/usage", account_id="acc_sh", group_by="day,model", limit=3)
    expected_rows, expected_totals = expected_usage(booked, ["day", "model"], account="acc_sh")
    assert rows == expected_rows
    assert len(pages) == -(-len(expected_rows) // 3)
    assert all(p["totals"] == expected_totals for p in pages)


async def test_usage_is_read_from_the_daily_rollup_not_the_ledger(database_url, client):
    seed.create_account(database_url, "acc_sh", SH)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO usage_daily (key_id, model, day, account_id, requests, inputs, prompt_tokens,"
            " completion_tokens, cached_tokens, reasoning_tokens, total_tokens, package_tokens, charge)"
            " VALUES ('key_x', 'chat-s', '2026-01-02', 'acc_sh', 7, 9, 100, 50, 10, 5, 150, 0, 1234567)"
        )
    body = await get_ok(client, "/v1/usage", account_id="acc_sh", group_by="month")
    assert body["data"] == [{"month": "2026-01", "requests": 7, "inputs": 9, "prompt_tokens": 100,
                             "completion_tokens": 50, "cached_tokens": 10, "reasoning_tokens": 5,
                             "total_tokens": 150, "package_tokens": 0, "charge": "0.001234567"}]
    assert seed.scalar(database_url, "SELECT count(*) FROM ledger_entries WHERE entry_type = 'usage'") == 0


# Breaches


async def test_breaches_list_what_the_consumer_recorded_in_occurrence_order(settings, database_url, client):
    booked = seed_month_end(database_url)
    await book(settings, database_url, [b.event for b in booked])
    stored = seed.rows(database_url, "SELECT breach_id, type, account_id, key_id, package_id, period, unit, cap,"
                                     " spend, overshoot, event_id, occurred_at FROM breaches"
                                     " ORDER BY occurred_at, breach_id")
    names = ("breach_id", "type", "account_id", "key_id", "package_id", "period", "unit", "cap", "spend",
             "overshoot", "event_id", "occurred_at")
    views = [breach_view(**dict(zip(names, row))) for row in stored]
    # key_a's daily cap is reached on several local days; acc_sh runs out of its 2 CNY.
    assert {v["type"] for v in views} == {"daily_cap", "balance_depleted"}
    rows, pages = await all_pages(client, "/v1/breaches", account_id="acc_sh", limit=2)
    assert rows == [v for v in views if v["account_id"] == "acc_sh"]
    assert len(pages) >= 2
    # The reference: key_a's local days whose PAYG spend reached the cap.
    spend: dict[date, int] = defaultdict(int)
    for b in booked:
        if b.key_id == "key_a":
            spend[b.day] += b.charge
    capped = sorted(d.isoformat() for d, s in spend.items() if s >= KEY_A_DAILY_CAP)
    daily = (await get_ok(client, "/v1/breaches", key_id="key_a", type="daily_cap"))["data"]
    assert [r["period"] for r in daily] == capped
    assert all(r["cap"] == "0.050000000" and r["unit"] == "cny" for r in daily)


async def test_breaches_from_is_inclusive_and_to_exclusive_on_occurred_at(settings, database_url, client):
    booked = seed_month_end(database_url)
    await book(settings, database_url, [b.event for b in booked])
    everything = (await get_ok(client, "/v1/breaches", account_id="acc_sh", limit=1000))["data"]
    assert len(everything) >= 3
    first, last = everything[1]["occurred_at"], everything[-1]["occurred_at"]
    window = (await get_ok(client, "/v1/breaches", account_id="acc_sh", **{"from": first, "to": last}))["data"]
    assert window == [b for b in everything if first <= b["occurred_at"] < last]
    assert window[0] == everything[1] and everything[-1] not in window


# Ledger


async def test_ledger_lists_the_accounts_entries_in_entry_order_with_money_as_strings(settings, database_url, client):
    booked = seed_month_end(database_url)
    await book(settings, database_url, [b.event for b in booked])
    rows, pages = await all_pages(client, "/v1/ledger", account_id="acc_sh", limit=25)
    assert len(pages) > 1
    stored = seed.rows(database_url, "SELECT entry_id, entry_type, event_id, charge, balance_delta, event_time,"
                                     " local_day, price_id FROM ledger_entries WHERE account_id = 'acc_sh'"
                                     " ORDER BY entry_id")
    assert [r["entry_id"] for r in rows] == [s[0] for s in stored]
    by_event = {b.event.id: b for b in booked}
    for row, (entry_id, entry_type, event_id, charge, delta, event_time, day, price_id) in zip(rows, stored):
        assert (row["entry_type"], row["event_id"], row["price_id"]) == (entry_type, event_id, price_id)
        assert (row["charge"], row["balance_delta"]) == (cny(charge), cny(delta))
        assert row["local_day"] == day.isoformat() == local_day(event_time, SH).isoformat()
        assert datetime.fromisoformat(row["event_time"]) == event_time
        assert row["event_time"].endswith("Z") and row["event_time_local"].endswith("+08:00")
        if entry_type == "usage":
            b = by_event[event_id]
            assert row["charge"] == cny(b.charge) and row["balance_delta"] == cny(-b.charge)
            assert (row["key_id"], row["model"], row["request_id"]) == (b.key_id, b.model, b.event.data.request_id)
            assert row["total_tokens"] == b.event.data.total_tokens
    assert {r["entry_type"] for r in rows} == {"topup", "usage"}


async def test_ledger_from_is_inclusive_and_to_exclusive_on_event_time(settings, database_url, client):
    booked = seed_month_end(database_url)
    await book(settings, database_url, [b.event for b in booked])
    low, high = "2026-10-31T15:59:59+00:00", "2026-10-31T16:00:00Z"  # the two events around SH midnight
    rows = (await get_ok(client, "/v1/ledger", account_id="acc_sh", **{"from": low, "to": high}))["data"]
    assert [r["event_time"] for r in rows] == ["2026-10-31T15:59:59.000000Z"]
    rows = (await get_ok(client, "/v1/ledger", account_id="acc_sh",
                         **{"from": "2026-11-01T00:00:00+08:00", "to": "2026-11-01T00:00:01+08:00"}))["data"]
    assert [r["event_time_local"] for r in rows] == ["2026-11-01T00:00:00.000000+08:00"]
    assert rows[0]["local_day"] == "2026-11-01"


# Statements

OCTOBER_FIRST = datetime(2026, 9, 30, 16, 0, tzinfo=UTC)  # 2026-10-01 00:00 in Shanghai
NOVEMBER_FIRST = datetime(2026, 10, 31, 16, 0, tzinfo=UTC)
PACKAGE_TOKENS = 50_000


async def seed_statement_month(client: httpx.AsyncClient, clock: Clock, url: str) -> dict[str, Any]:
    """A Shanghai account through the control plane, its PAYG and package events around October."""
    seed_prices(url)
    clock.now = datetime(2026, 9, 20, 2, 0, tzinfo=UTC)
    r = await client.post("/v1/accounts", json={"name": "acme", "timezone": SH}, headers=ADMIN)
    account = r.json()["account_id"]
    topups = {"sep": ("5", 5 * NANO, datetime(2026, 9, 20, 2, 0, tzinfo=UTC)),
              "oct": ("2.5", 2_500_000_000, datetime(2026, 10, 10, 3, 0, tzinfo=UTC)),
              "nov": ("1", 1 * NANO, datetime(2026, 11, 5, 3, 0, tzinfo=UTC))}
    r = await client.post(f"/v1/accounts/{account}/keys", json={"name": "payg", "billing_mode": "payg"},
                          headers=ADMIN)
    payg = r.json()["key_id"]
    clock.now = datetime(2026, 10, 3, 2, 0, tzinfo=UTC)
    r = await client.post(f"/v1/accounts/{account}/packages", headers=ADMIN, json={
        "tokens": PACKAGE_TOKENS, "price": "99", "valid_from": "2026-10-05T00:00:00+08:00",
        "valid_until": "2026-10-20T00:00:00+08:00"})
    assert r.status_code == 201, r.text
    r = await client.post(f"/v1/accounts/{account}/keys", json={"name": "pkg", "billing_mode": "package"},
                          headers=ADMIN)
    package_key = r.json()["key_id"]
    for reference, (amount, _, when) in topups.items():
        clock.now = when
        r = await client.post(f"/v1/accounts/{account}/topups", json={"amount": amount, "reference": reference},
                              headers=ADMIN)
        assert r.status_code == 201, r.text
    plan = [
        (payg, "chat-l", datetime(2026, 9, 25, 4, 0, tzinfo=UTC)),  # September
        (payg, "chat-s", OCTOBER_FIRST - timedelta(minutes=30)),  # 30 Sep 23:30 local: September
        (payg, "chat-s", OCTOBER_FIRST + timedelta(minutes=30)),  # 1 Oct 00:30 local (UTC: 30 Sep)
    ]
    plan += [(payg, ["chat-l", "chat-s"][i % 2], datetime(2026, 10, 2 + 2 * i, 6, tzinfo=UTC)) for i in range(12)]
    plan += [(package_key, "chat-s", datetime(2026, 10, 6 + i, 8, tzinfo=UTC)) for i in range(10)]
    plan += [
        (package_key, "chat-l", datetime(2026, 10, 25, 8, tzinfo=UTC)),  # after the package: all overage
        (payg, "chat-l", NOVEMBER_FIRST - timedelta(minutes=30)),  # 31 Oct 23:30 local: the last local day
        (payg, "chat-s", NOVEMBER_FIRST + timedelta(minutes=30)),  # 1 Nov 00:30 local (UTC: 31 Oct)
        (payg, "chat-l", datetime(2026, 11, 10, 1, tzinfo=UTC)),
    ]
    rng = random.Random(42)
    booked = []
    balance = sum(nano for _, nano, _ in topups.values())  # every top-up is booked before consuming
    used = 0
    for i, (key, model, when) in enumerate(plan):
        if key == payg:  # about 1 to 4 CNY a call with chat-l: the 8.5 CNY of top-ups run out
            prompt, completion = rng.randint(20_000, 60_000), rng.randint(5_000, 30_000)
        else:  # at most 3,000 tokens a call: the package is not used up before it expires
            prompt, completion = rng.randint(500, 2_000), rng.randint(100, 1_000)
        cached = rng.randint(0, prompt // 2)
        event = build_usage_event(account_id=account, key_id=key, model=model, prompt_tokens=prompt,
                                  completion_tokens=completion, cached_tokens=cached, request_id=f"s-{i}",
                                  time=when)
        b = Booked(event, account, key, model, when, local_day(when, SH))
        if key == payg:
            b.charge = charge_of(model, prompt, completion, cached)
            b.overage_charge = b.charge - max(0, min(b.charge, balance))
            balance -= b.charge
        else:
            deduction = package_deduction(prompt + completion)
            if datetime(2026, 10, 4, 16, tzinfo=UTC) <= when < datetime(2026, 10, 19, 16, tzinfo=UTC):
                b.package_tokens = min(PACKAGE_TOKENS - used, deduction)
                used += b.package_tokens
            b.overage_tokens = deduction - b.package_tokens
        booked.append(b)
    assert 0 < used < PACKAGE_TOKENS and balance < 0  # tokens left to expire; the balance overdrawn
    return {"account": account, "booked": booked, "topups": topups, "package_used": used}


async def book_statement_month(settings, client, clock, url) -> dict[str, Any]:
    month = await seed_statement_month(client, clock, url)
    await book(settings, url, [b.event for b in month["booked"]])
    conn = await asyncpg.connect(url)
    try:  # the expiry sweeper books what the package had left, on the local day it ended
        assert await sweep_package_expiries(conn, datetime.now(UTC), timedelta(hours=1), "unused-topic") == 1
    finally:
        await conn.close()
    return month


def month_of_day(day: date) -> str:
    return day.strftime("%Y-%m")


async def test_statement_ties_out_for_a_local_month_with_booked_events(settings, database_url, client, clock):
    month = await book_statement_month(settings, client, clock, database_url)
    booked: list[Booked] = month["booked"]
    september = [b for b in booked if month_of_day(b.day) == "2026-09"]
    october = [b for b in booked if month_of_day(b.day) == "2026-10"]
    opening = 5 * NANO - sum(b.charge for b in september)
    charges = sum(b.charge for b in october)
    closing = opening + 2_500_000_000 - charges

    s = await get_ok(client, f"/v1/statements/{month['account']}/2026-10")
    assert (s["month"], s["timezone"], s["first_day"], s["last_day"]) == ("2026-10", SH, "2026-10-01", "2026-10-31")
    assert (s["starts_at"], s["ends_at"]) == ("2026-10-01T00:00:00.000000+08:00", "2026-11-01T00:00:00.000000+08:00")
    assert s["opening_balance"] == {"amount": cny(opening), "fen": fen(opening)}
    assert s["topups"] == {"count": 1, "amount": {"amount": "2.500000000", "fen": "2.50"}}
    assert s["charges"]["amount"] == {"amount": cny(charges), "fen": fen(charges)}
    assert s["charges"]["requests"] == len(october)
    assert s["closing_balance"] == {"amount": cny(closing), "fen": fen(closing)}
    assert s["adjustments"]["amount"] == "0.000000000"
    # The identity, in exact decimal strings.
    assert cny(opening + 2_500_000_000 - charges) == s["closing_balance"]["amount"]

    by_model = {m["model"]: m for m in s["charges"]["by_model"]}
    assert sorted(by_model) == ["chat-l", "chat-s"]
    for model, row in by_model.items():
        mine = [b for b in october if b.model == model]
        assert row["requests"] == len(mine)
        assert row["total_tokens"] == sum(b.event.data.total_tokens for b in mine)
        assert row["charge"]["amount"] == cny(sum(b.charge for b in mine))
        assert row["package_tokens"] == sum(b.package_tokens for b in mine)
    assert s["packages"] == {"tokens_granted": PACKAGE_TOKENS, "tokens_used": month["package_used"],
                             "tokens_expired": PACKAGE_TOKENS - month["package_used"]}
    overage_charge = sum(b.overage_charge for b in october)
    assert overage_charge > 0
    assert s["overage"] == {"tokens": sum(b.overage_tokens for b in october),
                            "charge": {"amount": cny(overage_charge), "fen": fen(overage_charge)}}
    assert s["overage"]["tokens"] > 0
    # The boundary events: 1 Oct 00:30 local counts (UTC says September), 1 Nov 00:30 local does not.
    assert OCTOBER_FIRST + timedelta(minutes=30) in [b.time for b in october]
    assert NOVEMBER_FIRST - timedelta(minutes=30) in [b.time for b in october]
    assert NOVEMBER_FIRST + timedelta(minutes=30) not in [b.time for b in october]


async def test_statements_chain_and_the_last_closes_at_the_account_balance(settings, database_url, client, clock):
    month = await book_statement_month(settings, client, clock, database_url)
    account = month["account"]
    statements = {m: await get_ok(client, f"/v1/statements/{account}/{m}")
                  for m in ("2026-08", "2026-09", "2026-10", "2026-11", "2026-12")}
    assert statements["2026-08"]["opening_balance"]["amount"] == statements["2026-08"]["closing_balance"]["amount"]
    assert statements["2026-08"]["closing_balance"]["amount"] == "0.000000000"
    for earlier, later in (("2026-08", "2026-09"), ("2026-09", "2026-10"), ("2026-10", "2026-11"),
                           ("2026-11", "2026-12")):
        assert statements[later]["opening_balance"] == statements[earlier]["closing_balance"]
    balance = seed.scalar(database_url, "SELECT balance FROM account_balances WHERE account_id = %s", account)
    assert statements["2026-12"]["closing_balance"]["amount"] == cny(balance)
    total_charges = sum(b.charge for b in month["booked"])
    assert balance == 8_500_000_000 - total_charges
    for name, s in statements.items():
        opening, closing = (int(s[f]["amount"].replace(".", "")) for f in ("opening_balance", "closing_balance"))
        topups, charges = (int(s[f]["amount"]["amount"].replace(".", "")) for f in ("topups", "charges"))
        assert opening + topups - charges == closing, name


# Roles: billing and admin read; gateway is forbidden; no or a wrong token is unauthenticated.

ROUTES = [
    "/v1/usage?account_id=acc_sh",
    "/v1/breaches?account_id=acc_sh",
    "/v1/ledger?account_id=acc_sh",
    "/v1/statements/acc_sh/2026-10",
]


@pytest.mark.parametrize("url", ROUTES)
@pytest.mark.parametrize(
    "headers,status",
    [
        (BILLING, 200),
        (ADMIN, 200),
        (GATEWAY, 403),
        ({}, 401),
        ({"Authorization": "Bearer wrong-token"}, 401),
        ({"Authorization": "Basic YmlsbGluZy10b2tlbg=="}, 401),
    ],
    ids=["billing", "admin", "gateway", "none", "wrong", "basic"],
)
async def test_role_matrix(database_url, client, url, headers, status):
    seed.create_account(database_url, "acc_sh", SH)
    r = await client.get(url, headers=headers)
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        assert_error(r, status)
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"


async def test_role_is_checked_before_the_query(client):
    assert_error(await client.get("/v1/usage?group_by=week", headers=GATEWAY), 403)
    assert_error(await client.get("/v1/statements/nope/2026-13"), 401)


# Bad input: 400 naming the parameter, in the error shape; never a 500.


def _cursor(values: list) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


BAD_INPUTS = [
    ("/v1/usage", "query: account_id or key_id is required"),
    ("/v1/usage?account_id=acc_sh&group_by=week", "query.group_by: 'week'"),
    ("/v1/usage?account_id=acc_sh&group_by=day,", "query.group_by: ''"),
    ("/v1/usage?account_id=acc_sh&group_by=day,day", "query.group_by"),
    ("/v1/usage?account_id=acc_sh&from=2026-13-01", "query.from"),
    ("/v1/usage?account_id=acc_sh&from=2026-11-01T00:00:00Z", "query.from"),
    ("/v1/usage?account_id=acc_sh&to=20261101", "query.to"),
    ("/v1/usage?account_id=acc_sh&from=2026-11-02&to=2026-11-01", "query.from: must not be after query.to"),
    ("/v1/usage?account_id=acc_sh&model=a%20b", "query.model"),
    ("/v1/usage?account_id=acc%00", "query.account_id"),
    ("/v1/usage?account_id=acc_sh&limit=0", "query.limit"),
    ("/v1/usage?account_id=acc_sh&limit=-5", "query.limit"),
    ("/v1/usage?account_id=acc_sh&limit=1001", "query.limit: 1001 is above the maximum of 1000"),
    ("/v1/usage?account_id=acc_sh&limit=ten", "query.limit"),
    ("/v1/usage?account_id=acc_sh&cursor=garbage", "query.cursor"),
    ("/v1/usage?account_id=acc_sh&acount_id=acc_sh", "query.acount_id: is not a parameter"),
    ("/v1/usage?account_id=acc_sh&account_id=acc_ny", "query.account_id: is given more than once"),
    ("/v1/breaches?type=overdraft", "query.type: 'overdraft'"),
    ("/v1/breaches?from=yesterday", "query.from"),
    ("/v1/breaches?from=2026-11-01", "query.from"),
    ("/v1/breaches?from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z", "query.from: must not be after query.to"),
    ("/v1/breaches?limit=100000", "query.limit"),
    ("/v1/ledger", "query.account_id: is required"),
    ("/v1/ledger?account_id=acc_sh&from=2026-11-01T25:00:00Z", "query.from"),
    ("/v1/ledger?account_id=acc_sh&to=2026-11-01T00:00:00", "query.to"),
    ("/v1/ledger?account_id=acc_sh&from=0001-01-01T00:00:00Z", "query.from"),
    ("/v1/ledger?account_id=acc_sh&from=2026-11-02T00:00:00%2B08:00&to=2026-11-01T00:00:00Z", "query.from"),
    (f"/v1/ledger?account_id=acc_sh&cursor={_cursor(['usage', 'day', '2026-01-01'])}", "query.cursor"),
    (f"/v1/ledger?account_id=acc_sh&cursor={_cursor(['ledger', -1])}", "query.cursor"),
    (f"/v1/ledger?account_id=acc_sh&cursor={_cursor(['ledger', True])}", "query.cursor"),
    (f"/v1/ledger?account_id=acc_sh&cursor={_cursor(['ledger', 1, 2])}", "query.cursor"),
    (f"/v1/breaches?cursor={_cursor(['breaches', 'noon', 'brk_1'])}", "query.cursor"),
    (f"/v1/usage?account_id=acc_sh&cursor={_cursor(['usage', 'day', '2026-02-30'])}", "query.cursor"),
    ("/v1/statements/acc_sh/2026-13", "path.month: '2026-13'"),
    ("/v1/statements/acc_sh/2026-1", "path.month"),
    ("/v1/statements/acc_sh/10000-01", "path.month"),
    ("/v1/statements/acc_sh/0999-01", "path.month"),
]


@pytest.mark.parametrize("url,needle", BAD_INPUTS, ids=[u for u, _ in BAD_INPUTS])
async def test_bad_input_is_a_400_naming_the_parameter(database_url, client, url, needle):
    seed.create_account(database_url, "acc_sh", SH)
    assert_error(await client.get(url, headers=BILLING), 400, needle)


async def test_a_cursor_of_another_grouping_is_refused(settings, database_url, client):
    seed.create_account(database_url, "acc_sh", SH)
    with psycopg.connect(database_url) as conn:
        for day in ("2026-01-01", "2026-01-02"):
            conn.execute("INSERT INTO usage_daily (key_id, model, day, account_id, requests) VALUES"
                         " ('key_x', 'chat-s', %s, 'acc_sh', 1)", (day,))
    page = await get_ok(client, "/v1/usage", account_id="acc_sh", group_by="day", limit=1)
    assert page["next_cursor"]
    r = await client.get("/v1/usage", params={"account_id": "acc_sh", "group_by": "model",
                                               "cursor": page["next_cursor"]}, headers=BILLING)
    assert_error(r, 400, "query.cursor")
    second = await get_ok(client, "/v1/usage", account_id="acc_sh", group_by="day", limit=1,
                          cursor=page["next_cursor"])
    assert [r["day"] for r in page["data"] + second["data"]] == ["2026-01-01", "2026-01-02"]


@pytest.mark.parametrize("url,what", [
    ("/v1/usage?account_id=acc_none", "account acc_none"),
    ("/v1/usage?key_id=key_none", "key key_none"),
    ("/v1/usage?account_id=acc_sh&key_id=key_ny", "key key_ny not found in account acc_sh"),
    ("/v1/breaches?account_id=acc_none", "account acc_none"),
    ("/v1/breaches?key_id=key_none", "key key_none"),
    ("/v1/ledger?account_id=acc_none", "account acc_none"),
    ("/v1/statements/acc_none/2026-10", "account acc_none"),
    ("/v1/statements/acc%20x/2026-10", "not found"),
])
async def test_unknown_account_or_key_is_404(database_url, client, url, what):
    for account, tz in ZONES.items():
        seed.create_account(database_url, account, tz)
    seed.create_key(database_url, "key_ny", "acc_ny", "payg")
    assert_error(await client.get(url, headers=BILLING), 404, what, "not found")


async def test_an_account_without_activity_has_empty_answers(database_url, client):
    seed.create_account(database_url, "acc_sh", SH)
    usage = await get_ok(client, "/v1/usage", account_id="acc_sh")
    assert usage["data"] == [] and usage["totals"] == {**dict.fromkeys(SUMS, 0), "charge": "0.000000000"}
    assert (await get_ok(client, "/v1/breaches", account_id="acc_sh")) == {"data": [], "next_cursor": None}
    assert (await get_ok(client, "/v1/ledger", account_id="acc_sh")) == {"data": [], "next_cursor": None}
    s = await get_ok(client, "/v1/statements/acc_sh/2026-10")
    assert s["opening_balance"] == s["closing_balance"] == {"amount": "0.000000000", "fen": "0.00"}
    assert s["charges"] == {"requests": 0, "amount": {"amount": "0.000000000", "fen": "0.00"}, "by_model": []}


async def test_openapi_documents_the_half_open_ranges(client):
    spec = (await client.get("/openapi.json")).json()
    usage = {p["name"]: p for p in spec["paths"]["/v1/usage"]["get"]["parameters"]}
    assert "EXCLUSIVE" in usage["to"]["description"] and "inclusive" in usage["from"]["description"]
    for path in ("/v1/usage", "/v1/breaches", "/v1/ledger", "/v1/statements/{account_id}/{month}"):
        assert "400" in spec["paths"][path]["get"]["responses"] and "422" not in spec["paths"][path]["get"]["responses"]
