"""End to end through the real broker: events for package and PAYG keys are produced, the
consumer books them, and every ledger total and projection is checked against values
computed here independently (plain Fractions and zoneinfo, not the rating module).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from zoneinfo import ZoneInfo

import msgspec

from services.contracts.events import build_usage_event, encode_event
from services.metering.store.projections import rebuild_projections, snapshot_projections
from tests.support import seed
from tests.support.kafka import consume_until, create_topics, metering_settings, produce, read_topic

NANO = 10**9
START = datetime(2026, 10, 28, 12, 0, tzinfo=timezone.utc)  # the run crosses a month end

# Prices in CNY per 1M tokens, as a person would write them.
PRICES = {
    "gpt-4o": dict(input=Fraction("2.5"), output=Fraction("10"), cached=Fraction("1.25"), fee=Fraction("0.0001"),
                   discount=Fraction("0.5"), weight=Fraction(3, 2)),
    "gpt-3.5-turbo": dict(input=Fraction("0.5"), output=Fraction("1.5"), cached=Fraction("0.5"), fee=Fraction(0),
                          discount=Fraction(0), weight=Fraction(1)),
}


def reference_charge(model: str, prompt: int, completion: int, cached: int, batch: bool) -> int:
    p = PRICES[model]
    per_token = Fraction(NANO, 10**6)  # CNY per 1M tokens → nano-CNY per token
    gross = ((prompt - cached) * p["input"] + cached * p["cached"] + completion * p["output"]) * per_token
    gross += p["fee"] * NANO
    assert gross.denominator == 1
    if batch:
        gross = gross * (1 - p["discount"])
        return round(gross)  # Python's round() on a Fraction is half-to-even
    return int(gross)


def seed_prices(url: str) -> None:
    for model, p in PRICES.items():
        seed.add_price(
            url, model,
            input_price=int(p["input"] * 1000), output_price=int(p["output"] * 1000),
            cached_input_price=int(p["cached"] * 1000), per_request_fee=int(p["fee"] * NANO),
            batch_discount_ppm=int(p["discount"] * 10**6), package_weight_ppm=int(p["weight"] * 10**6),
        )


async def test_events_are_booked_and_projections_match_an_independent_reference(
    database_url: str, broker, topic_names: dict[str, str]
) -> None:
    url = database_url
    seed_prices(url)
    accounts = {"acc_sh": "Asia/Shanghai", "acc_ny": "America/New_York"}
    for acc, tz in accounts.items():
        seed.create_account(url, acc, tz)
    seed.topup(url, "acc_sh", 3 * NANO, "t1")
    seed.topup(url, "acc_ny", 2 * NANO, "t1")
    payg = {"key_sh_1": ("acc_sh", int(0.05 * NANO)), "key_sh_2": ("acc_sh", 0), "key_ny_1": ("acc_ny", int(0.08 * NANO))}
    for key, (acc, cap) in payg.items():
        seed.create_key(url, key, acc, "payg", daily_cap=cap)
    seed.create_package(url, "acc_sh", "pkg_sh", 400_000, START - timedelta(days=1), START + timedelta(days=30))
    seed.create_key(url, "key_sh_pkg", "acc_sh", "package", package_id="pkg_sh")

    rng = random.Random(20261122)
    key_names = list(payg) + ["key_sh_pkg"]
    events = []
    for i in range(3000):
        key = rng.choice(key_names)
        acc = "acc_sh" if key.startswith("key_sh") else "acc_ny"
        prompt = rng.randint(0, 4000)
        completion = rng.randint(0, 1500)
        events.append(build_usage_event(
            account_id=acc, key_id=key, model=rng.choice(list(PRICES)), prompt_tokens=prompt,
            completion_tokens=completion, cached_tokens=rng.randint(0, prompt), request_id=f"req-{i}",
            time=START + timedelta(minutes=3 * i), kind=rng.choice(["request", "request", "batch"]),
            inputs=rng.randint(1, 4), source=f"gateway/gw-{i % 2}",
        ))

    # Independent reference.
    balance = {"acc_sh": 3 * NANO, "acc_ny": 2 * NANO}
    charges_by_acc: dict[str, int] = defaultdict(int)
    daily: dict[tuple[str, str], int] = defaultdict(int)
    monthly: dict[tuple[str, str], int] = defaultdict(int)
    daily_breaches = set()
    package_used = 0
    package_overage = 0
    depleted_breaches = 0
    for e in events:
        d = e.data
        when = datetime.fromisoformat(e.time)
        if d.key_id == "key_sh_pkg":
            deduction = math.ceil(d.total_tokens * PRICES[d.model]["weight"])
            take = min(400_000 - package_used, deduction)
            package_used += take
            package_overage += deduction - take
            continue
        charge = reference_charge(d.model, d.prompt_tokens, d.completion_tokens, d.cached_tokens, d.kind == "batch")
        before = balance[d.account_id]
        balance[d.account_id] -= charge
        if charge > 0 and before > 0 >= balance[d.account_id]:
            depleted_breaches += 1
        charges_by_acc[d.account_id] += charge
        local = when.astimezone(ZoneInfo(accounts[d.account_id]))
        daily[(d.key_id, local.date().isoformat())] += charge
        monthly[(d.key_id, local.strftime("%Y-%m"))] += charge
        cap = payg[d.key_id][1]
        if cap and daily[(d.key_id, local.date().isoformat())] >= cap:
            daily_breaches.add((d.key_id, local.date().isoformat()))

    settings = metering_settings(url, broker.bootstrap_servers, topic_names, topic_partitions=3)
    await create_topics(settings)
    # Every event is produced twice: the second copy must be counted as a duplicate, not booked.
    payloads = [(e.data.account_id.encode(), encode_event(e)) for e in events]
    await produce(broker.bootstrap_servers, settings.usage_topic, payloads + payloads[:500])
    consumer = await consume_until(settings, url, lambda c: c.totals.received >= 3500)

    assert consumer.totals.accepted == 3000
    assert consumer.totals.duplicates == 500
    assert consumer.totals.dead_lettered == 0
    assert seed.scalar(url, "SELECT count(*) FROM ledger_entries WHERE entry_type = 'usage'") == 3000
    for acc in accounts:
        got_balance, got_charges = seed.rows(
            url, "SELECT balance, charges_total FROM account_balances WHERE account_id = %s", acc)[0]
        assert got_charges == charges_by_acc[acc]
        assert got_balance == balance[acc]
        assert seed.scalar(url, "SELECT sum(balance_delta) FROM ledger_entries WHERE account_id = %s", acc) == balance[acc]
    assert seed.rows(url, "SELECT tokens_used, exhausted_recorded FROM package_balances")[0] == (
        package_used, package_used == 400_000)
    assert seed.scalar(url, "SELECT sum(overage_tokens) FROM ledger_entries") == package_overage
    got_daily = dict(((k, d.isoformat()), s) for k, d, s in seed.rows(
        url, "SELECT key_id, period_start, spend FROM key_spend WHERE period_type = 'day'"))
    assert got_daily == dict(daily)
    got_monthly = dict(((k, d.strftime("%Y-%m")), s) for k, d, s in seed.rows(
        url, "SELECT key_id, period_start, spend FROM key_spend WHERE period_type = 'month'"))
    assert got_monthly == dict(monthly)
    got_breaches = set(seed.rows(url, "SELECT key_id, period FROM breaches WHERE type = 'daily_cap'"))
    assert got_breaches == daily_breaches
    assert seed.scalar(url, "SELECT count(*) FROM breaches WHERE type = 'balance_depleted'") == depleted_breaches
    usage_totals = seed.rows(url, "SELECT sum(requests), sum(inputs), sum(total_tokens), sum(charge) FROM usage_daily")[0]
    assert usage_totals == (3000, sum(e.data.inputs for e in events), sum(e.data.total_tokens for e in events),
                            sum(charges_by_acc.values()))
    assert seed.rows(url, "SELECT source, received, accepted, duplicates FROM ingest_stats ORDER BY source") == [
        ("gateway/gw-0", 1750, 1500, 250), ("gateway/gw-1", 1750, 1500, 250)]

    # Projections rebuilt from the ledger alone are identical to the live ones.
    live = snapshot_projections(url)
    rebuild_projections(url)
    assert snapshot_projections(url) == live


async def test_breaches_are_relayed_to_the_breach_topic(database_url: str, broker, topic_names: dict[str, str]) -> None:
    from services.metering.consumer.relay import OutboxRelay
    import asyncio

    url = database_url
    seed_prices(url)
    seed.create_account(url, "acc_1")
    seed.topup(url, "acc_1", NANO, "t")
    seed.create_key(url, "key_1", "acc_1", "payg", daily_cap=NANO // 100)
    settings = metering_settings(url, broker.bootstrap_servers, topic_names, topic_partitions=1)
    await create_topics(settings)
    events = [build_usage_event(account_id="acc_1", key_id="key_1", model="gpt-4o", prompt_tokens=1000,
                                completion_tokens=1000, request_id=f"r{i}", time=START) for i in range(5)]
    await produce(broker.bootstrap_servers, settings.usage_topic, [(b"acc_1", encode_event(e)) for e in events])
    await consume_until(settings, url, lambda c: c.totals.received >= 5)
    assert seed.scalar(url, "SELECT count(*) FROM outbox") == 1

    relay = OutboxRelay(settings, url, idle_seconds=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    messages = await read_topic(broker.bootstrap_servers, settings.breach_topic, 1)
    stop.set()
    await task
    assert len(messages) == 1
    body = msgspec.json.decode(messages[0].value)
    assert body["type"] == "tollhouse.breach.v1"
    assert body["data"]["type"] == "daily_cap"
    assert body["data"]["key_id"] == "key_1"
    assert body["data"]["cap"] == "0.010000000"
    assert body["id"] == seed.scalar(url, "SELECT breach_id FROM breaches")
    assert seed.scalar(url, "SELECT count(*) FROM outbox") == 0


async def test_partitions_whose_offsets_could_not_be_read_at_assignment_are_taken_up_later(
    database_url: str, broker, topic_names: dict[str, str], monkeypatch
) -> None:
    from services.metering.consumer import worker

    url = database_url
    seed_prices(url)
    seed.create_account(url, "acc_1")
    seed.topup(url, "acc_1", NANO, "t")
    seed.create_key(url, "key_1", "acc_1", "payg")
    settings = metering_settings(url, broker.bootstrap_servers, topic_names, topic_partitions=2)
    await create_topics(settings)
    events = [build_usage_event(account_id="acc_1", key_id="key_1", model="gpt-4o", prompt_tokens=100,
                                completion_tokens=10, request_id=f"r{i}", time=START) for i in range(20)]
    await produce(broker.bootstrap_servers, settings.usage_topic, [(b"acc_1", encode_event(e)) for e in events])

    # The database is away while the assignment arrives, and for the first retry after it.
    real = worker.stored_offset
    failures = []

    async def flaky(*args, **kwargs):
        if len(failures) < 2:
            failures.append(args[3])
            raise ConnectionError("database unreachable")
        return await real(*args, **kwargs)

    monkeypatch.setattr(worker, "stored_offset", flaky)
    consumer = await consume_until(settings, url, lambda c: c.totals.received >= 20)
    assert len(failures) == 2
    assert consumer.membership.error is None
    expected = sum(reference_charge("gpt-4o", 100, 10, 0, False) for _ in events)
    assert seed.scalar(url, "SELECT count(*) FROM ledger_entries WHERE entry_type = 'usage'") == 20
    assert seed.scalar(url, "SELECT sum(charge) FROM ledger_entries WHERE entry_type = 'usage'") == expected
