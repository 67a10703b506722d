"""Exactly-once under faults: the consumer runs as a real process (``tollhouse metering
--no-api``) and is killed with SIGKILL at several points of a run of tens of thousands of
events; the whole topic is redelivered from offset 0; two consumers share a group and one
leaves mid-run. After each, the ledger equals what was produced, to the nano-yuan.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY

from services.contracts.events import build_usage_event, encode_event
from services.metering.consumer.worker import GAP_REREADS, UsageConsumer
from services.metering.store.ingest import IngestBatch, Fenced, connect, stored_offset
from services.metering.store.projections import rebuild_projections, snapshot_projections
from tests.support import seed
from tests.support.kafka import consume_until, create_topics, metering_settings, produce

NANO = 10**9
START = datetime(2026, 10, 1, tzinfo=timezone.utc)
INPUT_PRICE, OUTPUT_PRICE = 500, 1500  # nano-CNY per token (0.5 / 1.5 CNY per 1M tokens)


def seed_world(url: str, accounts: int, keys_per_account: int) -> list[tuple[str, str]]:
    seed.add_price(url, "m1", input_price=INPUT_PRICE, output_price=OUTPUT_PRICE)
    keys = []
    for a in range(accounts):
        acc = f"acc_{a:03d}"
        seed.create_account(url, acc, "Asia/Shanghai" if a % 2 else "Europe/Berlin")
        seed.topup(url, acc, 5 * NANO, "initial")
        for k in range(keys_per_account):
            key = f"key_{a:03d}_{k:02d}"
            seed.create_key(url, key, acc, "payg", daily_cap=NANO // 2 if k == 0 else 0)
            keys.append((acc, key))
    return keys


def make_events(keys: list[tuple[str, str]], count: int, seed_value: int, prefix: str) -> tuple[list, int, int]:
    rng = random.Random(seed_value)
    messages, charge, tokens = [], 0, 0
    for i in range(count):
        acc, key = rng.choice(keys)
        prompt, completion = rng.randint(1, 3000), rng.randint(0, 800)
        event = build_usage_event(
            account_id=acc, key_id=key, model="m1", prompt_tokens=prompt, completion_tokens=completion,
            request_id=f"{prefix}-{i}", time=START + timedelta(seconds=30 * i), source="gateway/gw-1",
        )
        messages.append((acc.encode(), encode_event(event)))
        charge += prompt * INPUT_PRICE + completion * OUTPUT_PRICE
        tokens += prompt + completion
    return messages, charge, tokens


async def produced_run(url: str, broker, topic_names: dict[str, str], *, accounts: int, keys_per_account: int,
                       partitions: int, total: int, seed_value: int, prefix: str):
    """Accounts, keys and topics, and ``total`` events produced to the usage topic; returns
    the settings and the charge and tokens the events add up to."""
    keys = seed_world(url, accounts=accounts, keys_per_account=keys_per_account)
    settings = metering_settings(url, broker.bootstrap_servers, topic_names, topic_partitions=partitions)
    await create_topics(settings)
    messages, charge, tokens = make_events(keys, total, seed_value, prefix)
    await produce(broker.bootstrap_servers, settings.usage_topic, messages)
    return settings, charge, tokens


def consumer_process(settings, url: str, log_path, *, members: int = 1) -> subprocess.Popen:
    """``tollhouse metering --no-api`` running ``members`` consumer group members."""
    env = {
        **os.environ,
        "TOLLHOUSE_DATABASE_URL": url,
        "TOLLHOUSE_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "TOLLHOUSE_USAGE_TOPIC": settings.usage_topic,
        "TOLLHOUSE_DLQ_TOPIC": settings.dlq_topic,
        "TOLLHOUSE_BREACH_TOPIC": settings.breach_topic,
        "TOLLHOUSE_CONSUMER_GROUP": settings.consumer_group,
        "TOLLHOUSE_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "TOLLHOUSE_CONSUMER_BATCH_MAX": "700",
        "TOLLHOUSE_CONSUMER_MEMBERS": str(members),
        "TOLLHOUSE_LOG_FORMAT": "json",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "metering", "--no-api"],
        env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
    )


def ledger_count(url: str) -> int:
    return seed.scalar(url, "SELECT count(*) FROM ledger_entries WHERE entry_type = 'usage'")


def rebooked_batches() -> float:
    return REGISTRY.get_sample_value("tollhouse_batches_rebooked_total") or 0.0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_ledger(url: str, count: int, charge: int, tokens: int) -> None:
    assert seed.rows(
        url,
        "SELECT count(*), count(DISTINCT event_id), coalesce(sum(charge), 0), coalesce(sum(total_tokens), 0)"
        " FROM ledger_entries WHERE entry_type = 'usage'",
    )[0] == (count, count, charge, tokens)
    assert seed.scalar(url, "SELECT count(*) FROM usage_events") == count
    assert seed.scalar(url, "SELECT sum(charges_total) FROM account_balances") == charge
    assert seed.scalar(url, "SELECT sum(charge) FROM usage_daily") == charge
    live = snapshot_projections(url)
    rebuild_projections(url)
    assert snapshot_projections(url) == live


@pytest.mark.slow
async def test_kill_9_at_several_points_then_redelivery_from_zero(database_url, broker, topic_names, tmp_path) -> None:
    url = database_url
    # Room after the last kill point (24,000): with 30,000 events, the 6,000 after it were once
    # all booked before the kill landed.
    total = 40_000
    settings, charge, tokens = await produced_run(url, broker, topic_names, accounts=40, keys_per_account=5,
                                                  partitions=4, total=total, seed_value=7, prefix="kill")

    log = tmp_path / "consumer.log"
    kills = 0
    # A process of one member, and of two (each its own batches and transactions), both killed.
    for threshold, members in ((2_000, 2), (9_000, 1), (17_000, 2), (24_000, 1)):
        proc = consumer_process(settings, url, log, members=members)
        try:
            wait_for(lambda: ledger_count(url) >= threshold or proc.poll() is not None, 120, f"{threshold} entries")
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(random.Random(threshold).uniform(0, 0.3))  # land the kill anywhere in a batch
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        kills += 1
        assert ledger_count(url) < total, "the run finished before the kill; raise the event count"
    proc = consumer_process(settings, url, log, members=2)
    try:
        wait_for(lambda: ledger_count(url) >= total, 180, "the whole topic")
        time.sleep(0.5)  # anything further would be a double booking
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    assert kills == 4
    assert {"tollhouse-metering", "tollhouse-metering-1", "tollhouse-metering-2"} <= set(assignments(log))
    assert_ledger(url, total, charge, tokens)
    stored = seed.scalar(url, "SELECT sum(next_offset) FROM consumer_offsets WHERE group_id = %s", settings.consumer_group)
    assert stored == total

    # Redeliver the whole topic from offset 0 (a new group has no stored offsets).
    replay = metering_settings(url, broker.bootstrap_servers, {**topic_names, "consumer_group": "replay-group"},
                               topic_partitions=4)
    rebooked = rebooked_batches()
    consumer = await consume_until(replay, url, lambda c: c.totals.received >= total)
    # The first batch is booked as new, meets the primary key, and is booked again with its
    # ids looked up; every later batch finds booked events, so ids stay looked up in advance.
    assert rebooked_batches() - rebooked == 1
    assert consumer.totals.duplicates == total
    assert consumer.totals.accepted == 0
    assert_ledger(url, total, charge, tokens)
    assert seed.scalar(url, "SELECT sum(duplicates) FROM ingest_stats") == total


@pytest.mark.slow
async def test_two_consumers_in_one_group_one_leaves_mid_run(database_url, broker, topic_names, tmp_path) -> None:
    url = database_url
    total = 20_000
    settings, charge, tokens = await produced_run(url, broker, topic_names, accounts=30, keys_per_account=3,
                                                  partitions=4, total=total, seed_value=11, prefix="pair")

    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = consumer_process(settings, url, log_a, members=2)  # three members in all, two in a
    b = consumer_process(settings, url, log_b)
    try:
        wait_for(lambda: ledger_count(url) >= 6_000, 120, "progress with two consumers")
        b.send_signal(signal.SIGTERM)  # b leaves the group; a takes over its partitions
        assert b.wait(30) == 0, log_b.read_text()[-3000:]
        # Even when b had booked all of its partitions' events already, the group hands them to a.
        wait_for(lambda: held_now(log_a) == [0, 1, 2, 3], 60, "a's two members to hold every partition")
        wait_for(lambda: ledger_count(url) >= total, 180, "the whole topic")
        time.sleep(0.5)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    assert ledger_count(url) == total
    assert_ledger(url, total, charge, tokens)
    assert assignments(log_b)  # b really took part
    assert set(assignments(log_a)) == {"tollhouse-metering-1", "tollhouse-metering-2"}  # and both of a's members


def held_now(log_path) -> list[int]:
    """The partitions a process's members hold, by the last assignment each logged."""
    return sorted(p for member in assignments(log_path).values() for p in member[-1])


def assignments(log_path) -> dict[str, list[list[int]]]:
    """Each consumer member's partition assignments, in order, from a process's JSON log."""
    held: dict[str, list[list[int]]] = {}
    for line in log_path.read_text().splitlines():
        if '"partitions_assigned"' in line:
            entry = json.loads(line)
            held.setdefault(entry["consumer"], []).append(entry["partitions"])
    return held


class _FetcherJumpsAhead(UsageConsumer):
    """Each time the consumer seeks a partition to offset 0, its fetcher lands ``hole``
    messages further on, behind the consumer's back: what a broker that shows later
    messages before earlier ones (``times=1``), or a log that no longer holds its first
    offsets (every time), does to a fetch."""

    def __init__(self, *args, hole: int, times: int) -> None:
        super().__init__(*args)
        self.hole, self.jumps_left, self.seeks_to_zero = hole, times, 0

    def _seek(self, tp, offset: int) -> None:
        super()._seek(tp, offset)
        if offset == 0:
            self.seeks_to_zero += 1
            if self.jumps_left > 0:
                self.jumps_left -= 1
                self._consumer.seek(tp, self.hole)


async def test_events_sent_again_at_new_offsets_are_skipped_or_quarantined(database_url, broker, topic_names) -> None:
    """A producer's retry puts a booked event at a new offset, which the stored offsets do
    not catch: the event id does, whether the consumer looked ids up in advance or not."""
    url = database_url
    keys = seed_world(url, accounts=1, keys_per_account=2)
    settings = metering_settings(url, broker.bootstrap_servers, topic_names, topic_partitions=1)
    await create_topics(settings)
    messages, charge, tokens = make_events(keys, 9, seed_value=11, prefix="retry")
    conflicting = json.loads(messages[1][1])
    conflicting["data"]["prompt_tokens"] += 1
    conflicting["data"]["total_tokens"] += 1
    consumer = UsageConsumer(settings, url)
    rebooked = rebooked_batches()

    async def deliver(batch: list[tuple[bytes, bytes]], received: int) -> None:
        await produce(broker.bootstrap_servers, settings.usage_topic, batch)
        await consume_until(settings, url, lambda c: c.totals.received >= received, timeout=60, consumer=consumer)

    await deliver(messages[:5], 5)
    assert rebooked_batches() - rebooked == 0  # all new: booked as new, nothing looked up
    # Two new events, then event 0 sent again and event 1's id with another payload.
    await deliver([*messages[5:7], messages[0], (messages[1][0], json.dumps(conflicting).encode())], 9)
    assert rebooked_batches() - rebooked == 1
    assert (consumer.totals.accepted, consumer.totals.duplicates, consumer.totals.conflicts) == (7, 1, 1)
    await deliver(messages[7:9], 11)  # looked up in advance, none booked before: that stops
    await deliver([messages[2]], 12)  # booked as new again, so the primary key finds it
    assert rebooked_batches() - rebooked == 2
    assert (consumer.totals.accepted, consumer.totals.duplicates, consumer.totals.conflicts) == (9, 2, 1)
    assert_ledger(url, 9, charge, tokens)
    reasons = seed.rows(url, "SELECT reason, event_id FROM dead_letters")
    assert reasons == [("id_conflict", conflicting["id"])]


@pytest.mark.parametrize(("times", "booked_from"), [(1, 0), (1_000, 7)], ids=["transient", "persistent"])
async def test_a_fetch_that_starts_past_the_stored_offset_is_read_again(
    database_url, broker, topic_names, times, booked_from
) -> None:
    url = database_url
    total = 40
    settings, charge, tokens = await produced_run(url, broker, topic_names, accounts=2, keys_per_account=2,
                                                  partitions=1, total=total, seed_value=5, prefix="gap")

    consumer = _FetcherJumpsAhead(settings, url, hole=7, times=times)
    await consume_until(settings, url, lambda c: c.totals.received >= total - booked_from, timeout=60,
                        consumer=consumer)
    assert consumer.totals.received == consumer.totals.accepted == total - booked_from
    assert seed.stored_offsets(url, settings.consumer_group, settings.usage_topic) == {0: total}
    if booked_from == 0:  # read again from offset 0: every event booked once
        assert consumer.seeks_to_zero == 2
        assert_ledger(url, total, charge, tokens)
    else:  # the hole never fills: stepped over after the rereads, and only it
        assert consumer.seeks_to_zero == 1 + GAP_REREADS
        booked = seed.rows(url, "SELECT request_id FROM ledger_entries WHERE entry_type = 'usage'")
        assert sorted(r[0] for r in booked) == sorted(f"gap-{i}" for i in range(booked_from, total))


async def test_a_new_group_reads_from_offset_0_whatever_log_start_the_broker_reports(
    database_url, broker, topic_names, monkeypatch
) -> None:
    url = database_url
    total = 30
    settings, charge, tokens = await produced_run(url, broker, topic_names, accounts=2, keys_per_account=2,
                                                  partitions=2, total=total, seed_value=9, prefix="start")

    async def ahead(self, partitions, timeout_ms=None):  # a broker whose report runs ahead of its log
        return {tp: 3 for tp in partitions}

    monkeypatch.setattr(AIOKafkaConsumer, "beginning_offsets", ahead)
    consumer = await consume_until(settings, url, lambda c: c.totals.received >= total, timeout=60)
    assert consumer.totals.accepted == total
    assert_ledger(url, total, charge, tokens)


async def test_a_consumer_that_lost_its_partition_cannot_commit_over_the_new_owner(database_url) -> None:
    old_owner, new_owner = await connect(database_url), await connect(database_url)
    try:
        assert await stored_offset(old_owner, "g", "t", 0, 0) == 0
        async with IngestBatch(new_owner) as uow:  # the new owner books 0..50 first
            await uow.advance_offsets("g", "t", {0: (0, 50)})
        with pytest.raises(Fenced):
            async with IngestBatch(old_owner) as uow:  # the old owner still believes in offset 0
                await uow.advance_offsets("g", "t", {0: (0, 100)})
        assert await stored_offset(old_owner, "g", "t", 0, 0) == 50
    finally:
        await old_owner.close()
        await new_owner.close()


async def test_concurrent_commits_on_one_partition_let_exactly_one_through(database_url) -> None:
    conns = [await connect(database_url) for _ in range(2)]
    await stored_offset(conns[0], "g", "t", 0, 0)

    async def commit(conn, new: int) -> bool:
        try:
            async with IngestBatch(conn) as uow:
                await uow.advance_offsets("g", "t", {0: (0, new)})
                await asyncio.sleep(0.05)  # hold the row while the other one tries
            return True
        except Fenced:
            return False

    results = await asyncio.gather(commit(conns[0], 10), commit(conns[1], 20))
    assert sorted(results) == [False, True]
    winner = 10 if results[0] else 20
    assert await stored_offset(conns[0], "g", "t", 0, 0) == winner
    for conn in conns:
        await conn.close()


def test_offsets_table_only_moves_forward_in_the_consumer(database_url) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO consumer_offsets (group_id, topic, topic_partition, next_offset) VALUES ('g','t',0,5)")

    async def go() -> None:
        conn = await connect(database_url)
        try:
            with pytest.raises(AssertionError, match="forward"):
                async with IngestBatch(conn) as uow:
                    await uow.advance_offsets("g", "t", {0: (5, 4)})
        finally:
            await conn.close()

    asyncio.run(go())
