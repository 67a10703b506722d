"""GET /v1/keys/{key_id}/quota on PostgreSQL, with usage booked by the real consumer through the
real broker: spend per local day and month in the account's zone (Asia/Shanghai, and
America/New_York across the start of daylight saving time), when each period resets, package
tokens, unlimited caps, and who may ask.

The API's clock is fixed (the app's ``admin_store`` clock), so "today" does not depend on when
the test runs; the events are in the past, so the consumer takes them whatever the real time.
"""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from services.contracts.events import build_usage_event, encode_event
from services.metering.store.admin import AdminStore
from tests.support.app import ADMIN, BILLING, GATEWAY, metering_client
from tests.support.kafka import consume_until, create_topics, metering_settings, produce

UTC = timezone.utc
MODEL = "gpt-4o"
# 10 and 20 CNY per 1M tokens: 1,000 prompt + 1,000 completion tokens cost 0.03 CNY.
PROMPT = COMPLETION = 1_000


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def settings(database_url, broker, topic_names):
    return metering_settings(database_url, broker.bootstrap_servers, topic_names, topic_partitions=1)


def fix_clock(client, now: datetime) -> None:
    """The API's notion of now (the clock create_app hands to its stores)."""
    client.app.state.admin_store = AdminStore(client.app.state.engine, lambda: now)


async def setup_account(client, tz: str, balance: str = "10") -> str:
    r = await client.put(f"/v1/prices/{MODEL}", headers=ADMIN, json={
        "input_price": "10", "output_price": "20", "effective_from": "2020-01-01T00:00:00Z"})
    assert r.status_code == 201, r.text
    r = await client.post("/v1/accounts", headers=ADMIN, json={"name": "acme", "tier": "developer", "timezone": tz})
    assert r.status_code == 201, r.text
    account_id = r.json()["account_id"]
    r = await client.post(f"/v1/accounts/{account_id}/topups", headers=ADMIN,
                          json={"amount": balance, "reference": "t0"})
    assert r.status_code == 201, r.text
    return account_id


async def create_key(client, account_id: str, **body) -> dict:
    r = await client.post(f"/v1/accounts/{account_id}/keys", headers=ADMIN, json={"name": "k", **body})
    assert r.status_code == 201, r.text
    return r.json()


async def book(settings, database_url: str, key: dict, times: list[datetime], *,
               tokens: tuple[int, int] = (PROMPT, COMPLETION)) -> None:
    """Usage events for ``key`` at ``times``, produced to the broker and booked by the consumer."""
    await create_topics(settings)
    events = [
        build_usage_event(account_id=key["account_id"], key_id=key["key_id"], model=MODEL, prompt_tokens=tokens[0],
                          completion_tokens=tokens[1], request_id=f"req-{i}", time=when)
        for i, when in enumerate(times)
    ]
    await produce(settings.kafka_bootstrap_servers, settings.usage_topic,
                  [(key["account_id"].encode(), encode_event(e)) for e in events])
    consumer = await consume_until(settings, database_url, lambda c: c.totals.received >= len(events))
    assert consumer.totals.accepted == len(events)


async def quota(client, key_id: str, headers=BILLING) -> dict:
    r = await client.get(f"/v1/keys/{key_id}/quota", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_payg_spend_counts_the_shanghai_local_day_and_month(settings, database_url) -> None:
    now = utc(2026, 3, 31, 17, 0)  # 01:00 on 1 April in Shanghai (UTC+8), still 31 March in UTC
    async with metering_client(settings, database_url) as client:
        fix_clock(client, now)
        account = await setup_account(client, "Asia/Shanghai")
        key = await create_key(client, account, billing_mode="payg", daily_cap="0.05", monthly_cap="1")
        await book(settings, database_url, key, [
            utc(2026, 3, 31, 15, 30),  # 23:30 on 31 March local: yesterday, and last month
            utc(2026, 3, 31, 16, 10),  # 00:10 on 1 April local
            utc(2026, 3, 31, 16, 50),  # 00:50 on 1 April local
        ])
        body = await quota(client, key["key_id"])

    assert (body["key_id"], body["account_id"], body["billing_mode"], body["status"]) == (
        key["key_id"], account, "payg", "active")
    assert body["package"] is None
    assert body["balance"] == "9.910000000"  # all three events are charged to the balance
    assert body["timezone"] == "Asia/Shanghai"
    assert body["day"] == "2026-04-01"
    # Today and this month hold the two events after local midnight; the cap was overshot, remaining stops at 0.
    assert body["daily"]["cap"] == "0.050000000"
    assert body["daily"]["spent"] == "0.060000000"
    assert body["daily"]["remaining"] == "0.000000000"
    assert body["monthly"] == {
        "cap": "1.000000000", "spent": "0.060000000", "remaining": "0.940000000",
        "resets_at": body["monthly"]["resets_at"]}
    # Local midnights: 2 April 00:00 and 1 May 00:00 in Shanghai, written with the account's offset.
    assert body["daily"]["resets_at"] == "2026-04-02T00:00:00+08:00"
    assert instant(body["daily"]["resets_at"]) == utc(2026, 4, 1, 16)
    assert instant(body["monthly"]["resets_at"]) == utc(2026, 4, 30, 16)


async def test_payg_spend_follows_new_york_time_across_the_start_of_daylight_saving(settings, database_url) -> None:
    now = utc(2026, 3, 8, 12, 0)  # 08:00 EDT on 8 March: clocks went forward at 02:00 local (07:00Z)
    async with metering_client(settings, database_url) as client:
        fix_clock(client, now)
        account = await setup_account(client, "America/New_York")
        key = await create_key(client, account, billing_mode="payg", daily_cap="0.1")  # monthly: unlimited
        await book(settings, database_url, key, [
            utc(2026, 3, 8, 4, 30),  # 23:30 EST on 7 March: yesterday, same month
            utc(2026, 3, 8, 5, 30),  # 00:30 EST on 8 March
            utc(2026, 3, 8, 11, 0),  # 07:00 EDT on 8 March
        ])
        body = await quota(client, key["key_id"], headers=ADMIN)  # the admin token reads too

    assert body["day"] == "2026-03-08"
    assert body["daily"]["spent"] == "0.060000000"
    assert body["daily"]["remaining"] == "0.040000000"
    # 8 March is 23 hours long in New York: the day resets at midnight EDT (04:00Z), not 05:00Z.
    assert body["daily"]["resets_at"] == "2026-03-09T00:00:00-04:00"
    assert instant(body["daily"]["resets_at"]) == utc(2026, 3, 9, 4)
    assert body["monthly"]["cap"] == "0.000000000"  # unlimited
    assert body["monthly"]["spent"] == "0.090000000"
    assert body["monthly"]["remaining"] is None
    assert instant(body["monthly"]["resets_at"]) == utc(2026, 4, 1, 4)


async def test_package_key_shows_tokens_left_and_validity(settings, database_url) -> None:
    now = utc(2026, 11, 10, 12, 0)
    async with metering_client(settings, database_url) as client:
        fix_clock(client, now)
        account = await setup_account(client, "Asia/Shanghai")
        r = await client.post(f"/v1/accounts/{account}/packages", headers=ADMIN, json={
            "tokens": 10_000, "price": "50", "valid_from": "2026-11-01T00:00:00+08:00",
            "valid_until": "2026-12-01T00:00:00+08:00"})
        assert r.status_code == 201, r.text
        package_id = r.json()["package_id"]
        key = await create_key(client, account, billing_mode="package")
        await book(settings, database_url, key, [utc(2026, 11, 10, 1, 0), utc(2026, 11, 10, 2, 0)],
                   tokens=(1_000, 500))
        body = await quota(client, key["key_id"])

    assert body["billing_mode"] == "package"
    assert body["package"] == {
        "package_id": package_id, "tokens_total": 10_000, "tokens_used": 3_000, "tokens_expired": 0,
        "tokens_remaining": 7_000, "valid_from": "2026-10-31T16:00:00Z", "valid_until": "2026-11-30T16:00:00Z",
        "status": "active"}
    assert body["balance"] == "10.000000000"  # package keys are charged tokens, never money
    for period in ("daily", "monthly"):
        assert body[period]["cap"] == "0.000000000"
        assert body[period]["spent"] == "0.000000000"
        assert body[period]["remaining"] is None


async def test_package_status_is_exhausted_then_expired(settings, database_url) -> None:
    async with metering_client(settings, database_url) as client:
        fix_clock(client, utc(2026, 11, 10, 12, 0))
        account = await setup_account(client, "Asia/Shanghai")
        r = await client.post(f"/v1/accounts/{account}/packages", headers=ADMIN, json={
            "tokens": 2_000, "price": "5", "valid_from": "2026-11-01T00:00:00Z", "valid_until": "2026-11-20T00:00:00Z"})
        assert r.status_code == 201, r.text
        key = await create_key(client, account, billing_mode="package")
        await book(settings, database_url, key, [utc(2026, 11, 10, 1, 0), utc(2026, 11, 10, 2, 0)],
                   tokens=(1_000, 500))
        body = await quota(client, key["key_id"])
        assert body["package"]["tokens_used"] == 2_000  # 3,000 asked, 2,000 there: the rest was overage
        assert body["package"]["tokens_remaining"] == 0
        assert body["package"]["status"] == "exhausted"
        fix_clock(client, utc(2026, 11, 20, 0, 0))  # valid_until is exclusive
        assert (await quota(client, key["key_id"]))["package"]["status"] == "expired"


async def test_a_key_without_usage_has_spent_nothing_and_its_whole_cap_left(settings, database_url) -> None:
    async with metering_client(settings, database_url) as client:
        fix_clock(client, utc(2026, 11, 22, 3, 0))
        account = await setup_account(client, "Asia/Shanghai", balance="2.5")
        key = await create_key(client, account, billing_mode="payg", daily_cap="0.5", monthly_cap="3")
        body = await quota(client, key["key_id"])
    assert body["balance"] == "2.500000000"
    assert body["daily"] == {"cap": "0.500000000", "spent": "0.000000000", "remaining": "0.500000000",
                             "resets_at": "2026-11-23T00:00:00+08:00"}
    assert body["monthly"] == {"cap": "3.000000000", "spent": "0.000000000", "remaining": "3.000000000",
                               "resets_at": "2026-12-01T00:00:00+08:00"}


async def test_a_revoked_key_still_shows_its_quota(settings, database_url) -> None:
    async with metering_client(settings, database_url) as client:
        account = await setup_account(client, "Asia/Shanghai")
        key = await create_key(client, account, billing_mode="payg")
        r = await client.post(f"/v1/keys/{key['key_id']}/revoke", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert (await quota(client, key["key_id"]))["status"] == "revoked"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (BILLING, 200),
        (ADMIN, 200),
        (GATEWAY, 403),
        ({}, 401),
        ({"Authorization": "Bearer not-a-token"}, 401),
        ({"Authorization": "Basic YWRtaW46YWRtaW4="}, 401),
    ],
    ids=["billing", "admin", "gateway", "none", "wrong", "not-bearer"],
)
async def test_who_may_read_a_quota(settings, database_url, headers, status) -> None:
    async with metering_client(settings, database_url) as client:
        account = await setup_account(client, "Asia/Shanghai")
        key = await create_key(client, account, billing_mode="payg")
        r = await client.get(f"/v1/keys/{key['key_id']}/quota", headers=headers)
    assert r.status_code == status, r.text
    if status != 200:
        body = r.json()
        assert set(body) == {"code", "msg", "error"}
        assert body["code"] == (7 if status == 403 else 16)


@pytest.mark.parametrize("key_id", ["key_01NOSUCHKEY000000000000000", "key%20with%20space", "k" * 65])
async def test_unknown_key_is_404_in_the_error_shape(settings, database_url, key_id) -> None:
    async with metering_client(settings, database_url) as client:
        r = await client.get(f"/v1/keys/{key_id}/quota", headers=BILLING)
    assert r.status_code == 404, r.text
    assert r.json()["code"] == 5
    assert r.json()["error"]["code"] == "not_found"
    assert "not found" in r.json()["msg"]


async def test_an_unknown_query_parameter_is_refused(settings, database_url) -> None:
    async with metering_client(settings, database_url) as client:
        account = await setup_account(client, "Asia/Shanghai")
        key = await create_key(client, account, billing_mode="payg")
        r = await client.get(f"/v1/keys/{key['key_id']}/quota?day=2026-11-01", headers=BILLING)
    assert r.status_code == 400, r.text
    assert r.json()["msg"].startswith("query.day:")
