"""Poison messages through the real broker (DESIGN §3): every message that breaks the usage
event contract, or that the database cannot place (unknown key, key of another account,
unknown model, no price, id conflict), is dead-lettered with its reason and the partition
moves on, while the valid events produced between them are all booked exactly once.

All poison kinds go through ONE topic run (module-scoped scenario); each kind is then
checked by its own parametrized test so a failure names the case. The redelivery test
re-reads the same topic with a new consumer group over the same database.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from services.contracts.events import DEAD_LETTER_EVENT_TYPE, Reason, build_usage_event, encode_event, format_time
from services.metering.consumer.relay import OutboxRelay
from services.settings import Settings
from tests.conftest import migrated_database
from tests.support import seed
from tests.support.kafka import consume_until, create_topics, metering_settings, read_topic

NANO = 10**9
PARTITIONS = 2
MAX_EVENT_BYTES = 8 * 1024

# Prices in nano-CNY per token (= CNY per 1M tokens × 1000): 2.5 / 10 / 1.25 CNY per 1M,
# a 0.0001 CNY per-request fee and half off for batches.
PRICE = dict(input=2_500, output=10_000, cached=1_250, fee=100_000, discount=Fraction(1, 2))
MODEL = "gpt-4o"
FUTURE_PRICED_MODEL = "gpt-next"  # its only price row starts 30 days from now

ACCOUNTS = {"acc_a": "key_a", "acc_b": "key_b"}
TOPUP = 1_000 * NANO

# --- the events ---------------------------------------------------------------------------


def reference_charge(prompt: int, completion: int, cached: int, batch: bool) -> int:
    """DESIGN §4 computed here with plain integers and a Fraction, not the rating module."""
    gross = (prompt - cached) * PRICE["input"] + cached * PRICE["cached"] + completion * PRICE["output"]
    gross += PRICE["fee"]
    if batch:
        return round(Fraction(gross) * (1 - PRICE["discount"]))  # half-to-even
    return gross


def event_doc(account_id: str, key_id: str, *, when: datetime, request_id: str, model: str = MODEL,
              prompt: int = 100, completion: int = 50, cached: int = 0, reasoning: int = 0, inputs: int = 1,
              kind: str = "request", source: str = "gateway/gw-1") -> dict[str, Any]:
    event = build_usage_event(
        account_id=account_id, key_id=key_id, model=model, prompt_tokens=prompt, completion_tokens=completion,
        cached_tokens=cached, reasoning_tokens=reasoning, inputs=inputs, kind=kind, request_id=request_id,
        time=when, source=source, event_id=str(uuid.uuid4()),
    )
    return msgspec.json.decode(encode_event(event))


def to_bytes(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode()


@dataclass(frozen=True)
class Poison:
    name: str
    reason: str
    build: Callable[["Ctx"], tuple[bytes | None, bytes | None]]  # → (kafka key, value)
    from_database: bool = False  # judged after decoding: the dead letter carries the event id


@dataclass
class Ctx:
    """What a poison builder may use: a fresh, otherwise valid event and the first valid event."""

    when: datetime
    now: datetime
    first_valid: dict[str, Any]
    seq: int = 0

    def good(self, **overrides: Any) -> dict[str, Any]:
        """A valid event, alternately of acc_a/key_a and acc_b/key_b (so poison lands on both partitions)."""
        self.seq += 1
        account_id = "acc_a" if self.seq % 2 else "acc_b"
        return event_doc(account_id, ACCOUNTS[account_id], when=self.when, request_id=f"poison-{self.seq}",
                         **overrides)


def kafka_key(doc: dict[str, Any]) -> bytes:
    """The gateway keys messages by data.account_id; poison without one goes under acc_b."""
    data = doc.get("data")
    account_id = data.get("account_id") if isinstance(data, dict) else None
    return (account_id if isinstance(account_id, str) else "acc_b").encode()


def _mutated(change: Callable[[dict[str, Any]], None]):
    def build(ctx: Ctx) -> tuple[bytes | None, bytes | None]:
        doc = ctx.good()
        change(doc)
        return kafka_key(doc), to_bytes(doc)
    return build


def _data(**changes: Any):
    return _mutated(lambda d: d["data"].update(changes))


def _envelope(**changes: Any):
    return _mutated(lambda d: d.update(changes))


def _drop(field: str, *, in_data: bool):
    return _mutated(lambda d: (d["data"] if in_data else d).pop(field))


def _raw(value: bytes | None, key: bytes | None = b"acc_a"):
    return lambda ctx: (key, value)


def _not_utf8_inside_a_string(ctx: Ctx) -> tuple[bytes, bytes]:
    doc = ctx.good()
    doc["data"]["request_id"] = "@@BAD@@"
    return kafka_key(doc), to_bytes(doc).replace(b"@@BAD@@", b"req-\xff\xfe-latin1-\xe9t\xe9")


def _truncated(ctx: Ctx) -> tuple[bytes, bytes]:
    doc = ctx.good()
    payload = to_bytes(doc)
    return kafka_key(doc), payload[: len(payload) // 2]


def _oversize(ctx: Ctx) -> tuple[bytes, bytes]:
    # Otherwise a valid event: only its size is wrong (an unknown field pads it).
    doc = ctx.good()
    doc["data"]["padding"] = "x" * (MAX_EVENT_BYTES + 100)
    return kafka_key(doc), to_bytes(doc)


def _tokens_mismatch(d: dict[str, Any]) -> None:
    d["data"]["total_tokens"] = d["data"]["prompt_tokens"] + d["data"]["completion_tokens"] + 1


def _negative(d: dict[str, Any]) -> None:
    d["data"].update(completion_tokens=-5, total_tokens=d["data"]["prompt_tokens"] - 5)


def _too_large(d: dict[str, Any]) -> None:
    d["data"].update(prompt_tokens=10**13, total_tokens=10**13 + d["data"]["completion_tokens"])


def _time_in_future(ctx: Ctx) -> tuple[bytes, bytes]:
    doc = ctx.good()
    doc["time"] = format_time(ctx.now + timedelta(days=1))
    return kafka_key(doc), to_bytes(doc)


def _unknown_key(d: dict[str, Any]) -> None:
    d["subject"] = d["data"]["key_id"] = "key_ghost"


def _key_of_another_account(d: dict[str, Any]) -> None:
    # Both accounts exist; the key is of the other one.
    d["data"]["account_id"] = "acc_b" if d["data"]["account_id"] == "acc_a" else "acc_a"


def _id_conflict(ctx: Ctx) -> tuple[bytes, bytes]:
    # The id of the first valid event, with other tokens: same Kafka key, so same partition, after it.
    doc = copy.deepcopy(ctx.first_valid)
    doc["data"]["completion_tokens"] += 1
    doc["data"]["total_tokens"] += 1
    return doc["data"]["account_id"].encode(), to_bytes(doc)


POISONS: list[Poison] = [
    Poison("not_json", Reason.INVALID_JSON, _raw(b"this is not json {")),
    Poison("empty_value", Reason.INVALID_JSON, _raw(b"", key=b"acc_b")),
    Poison("null_value", Reason.INVALID_JSON, _raw(None)),
    Poison("nan_literal", Reason.INVALID_JSON, _raw(b'{"specversion": NaN}', key=None)),
    Poison("not_utf8_bytes", Reason.INVALID_JSON, _raw(b"\xff\xfe\x00\x81 binary junk \xc3\x28", key=None)),
    Poison("not_utf8_inside_a_string", Reason.INVALID_JSON, _not_utf8_inside_a_string),
    Poison("truncated_json", Reason.INVALID_JSON, _truncated),
    Poison("json_array", Reason.INVALID_FIELD, _raw(b'[{"specversion": "1.0"}]', key=b"acc_b")),
    Poison("json_number", Reason.INVALID_FIELD, _raw(b"42", key=b"acc_b")),
    Poison("token_as_string", Reason.INVALID_FIELD, _data(prompt_tokens="100")),
    Poison("token_as_float", Reason.INVALID_FIELD, _data(prompt_tokens=100.5)),
    Poison("token_as_bool", Reason.INVALID_FIELD, _data(completion_tokens=True)),
    Poison("bad_kind", Reason.INVALID_FIELD, _data(kind="stream")),
    Poison("bad_status", Reason.INVALID_FIELD, _data(status="failed")),
    Poison("data_not_an_object", Reason.INVALID_FIELD, _envelope(data="usage")),
    Poison("empty_id", Reason.INVALID_FIELD, _envelope(id="")),
    Poison("nul_in_a_string", Reason.INVALID_FIELD, _data(request_id="req-\u0000-nul")),
    Poison("missing_data_field", Reason.MISSING_FIELD, _drop("key_id", in_data=True)),
    Poison("missing_envelope_field", Reason.MISSING_FIELD, _drop("id", in_data=False)),
    Poison("negative_tokens", Reason.NEGATIVE_TOKENS, _mutated(_negative)),
    Poison("tokens_too_large", Reason.TOKENS_TOO_LARGE, _mutated(_too_large)),
    Poison("total_not_prompt_plus_completion", Reason.TOKENS_MISMATCH, _mutated(_tokens_mismatch)),
    Poison("cached_exceeds_prompt", Reason.CACHED_EXCEEDS_PROMPT, _data(cached_tokens=101)),
    Poison("reasoning_exceeds_completion", Reason.REASONING_EXCEEDS_COMPLETION, _data(reasoning_tokens=51)),
    Poison("inputs_zero", Reason.INVALID_INPUTS, _data(inputs=0)),
    Poison("time_without_offset", Reason.INVALID_TIME, _envelope(time="2026-11-21T10:00:00")),
    Poison("time_garbage", Reason.INVALID_TIME, _envelope(time="yesterday at noon")),
    Poison("time_out_of_range", Reason.INVALID_TIME, _envelope(time="0001-01-01T00:00:00+14:00")),
    Poison("time_in_future", Reason.TIME_IN_FUTURE, _time_in_future),
    Poison("oversize", Reason.OVERSIZE, _oversize),
    Poison("wrong_specversion", Reason.UNSUPPORTED_SPECVERSION, _envelope(specversion="0.3")),
    Poison("wrong_type", Reason.UNSUPPORTED_TYPE, _envelope(type="com.example.usage")),
    Poison("subject_not_key_id", Reason.SUBJECT_MISMATCH, _envelope(subject="key_other")),
    Poison("unknown_key", Reason.UNKNOWN_KEY, _mutated(_unknown_key), from_database=True),
    Poison("key_of_another_account", Reason.KEY_ACCOUNT_MISMATCH, _mutated(_key_of_another_account),
           from_database=True),
    Poison("unknown_model", Reason.UNKNOWN_MODEL, _data(model="no-such-model"), from_database=True),
    Poison("no_price_at_event_time", Reason.NO_PRICE, _data(model=FUTURE_PRICED_MODEL), from_database=True),
    Poison("id_conflict", Reason.ID_CONFLICT, _id_conflict, from_database=True),
]
assert len({p.name for p in POISONS}) == len(POISONS)


# --- the scenario -------------------------------------------------------------------------


@dataclass(frozen=True)
class Produced:
    key: bytes | None
    value: bytes | None
    partition: int
    offset: int


@dataclass
class Scenario:
    url: str
    settings: Settings
    produced: list[Produced]  # in production order
    poison_at: dict[str, Produced]  # poison name → its message
    poison_event_id: dict[str, str | None]
    valid: list[dict[str, Any]]  # the valid event documents
    totals: Any  # the consumer's BatchOutcome
    end_offsets: dict[int, int]
    stored_offsets: dict[int, int]
    dead_letters: dict[tuple[int, int], dict[str, Any]]  # (partition, offset) → row
    outbox_before_relay: int
    outbox_after_relay: int
    dlq_messages: list[Any]
    db: dict[str, Any]  # query results taken right after the first run (before any redelivery)



async def produce_recorded(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> list:
    """Send in order with acks=all; return each message's RecordMetadata (partition, offset)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=5,
                                max_request_size=16 * 1024 * 1024)
    await producer.start()
    try:
        pending = [await producer.send(topic, value, key=key) for key, value in messages]
        return list(await asyncio.gather(*pending))
    finally:
        await producer.stop()


def partition_ends(produced: list[Produced]) -> dict[int, int]:
    """The end of each partition of the (fresh) usage topic: one past the last offset the broker
    acknowledged. (The local test broker's ListOffsets(latest) answer is not usable for this: it
    reports the last record batch, not the last record.)"""
    ends = {p: 0 for p in range(PARTITIONS)}
    for message in produced:
        ends[message.partition] = max(ends[message.partition], message.offset + 1)
    return ends


INGEST_STATS_SQL = ("SELECT sum(received), sum(accepted), sum(duplicates), sum(conflicts), sum(dead_lettered)"
                    " FROM ingest_stats")


def snapshot(url: str) -> dict[str, Any]:
    return {
        "booked": seed.rows(url, "SELECT event_id, count(*), min(account_id), sum(total_tokens), sum(charge)"
                                 " FROM ledger_entries WHERE entry_type = 'usage' GROUP BY event_id"),
        "ledger_totals": seed.rows(url, "SELECT count(*), sum(total_tokens), sum(charge) FROM ledger_entries"
                                        " WHERE entry_type = 'usage'")[0],
        "usage_daily_totals": seed.rows(url, "SELECT sum(requests), sum(total_tokens), sum(charge) FROM usage_daily")[0],
        "usage_events": seed.scalar(url, "SELECT count(*) FROM usage_events"),
        "balances": dict((a, (b, c)) for a, b, c in seed.rows(
            url, "SELECT account_id, balance, charges_total FROM account_balances")),
        "completion_by_event": dict(seed.rows(url, "SELECT event_id, completion_tokens FROM ledger_entries"
                                                   " WHERE entry_type = 'usage'")),
        "ingest_stats": seed.rows(url, INGEST_STATS_SQL)[0],
    }


def seed_reference_data(url: str, now: datetime) -> None:
    seed.add_price(url, MODEL, input_price=PRICE["input"], output_price=PRICE["output"],
                   cached_input_price=PRICE["cached"], per_request_fee=PRICE["fee"],
                   batch_discount_ppm=int(PRICE["discount"] * 10**6))
    seed.add_price(url, FUTURE_PRICED_MODEL, input_price=1_000, output_price=2_000,
                   effective_from=now + timedelta(days=30))
    for account_id, key_id in ACCOUNTS.items():
        seed.create_account(url, account_id)
        seed.topup(url, account_id, TOPUP, "initial")
        seed.create_key(url, key_id, account_id, "payg")


def build_messages(now: datetime) -> tuple[list[tuple[bytes | None, bytes | None]], list[tuple[str, int]], list[dict]]:
    """valid, poison, valid, poison, …, valid. Returns the messages, which index is which poison,
    and the valid event documents."""
    rng = random.Random(20261122)
    base = now - timedelta(hours=2)
    valid: list[dict[str, Any]] = []

    def next_valid() -> dict[str, Any]:
        i = len(valid)
        account_id = "acc_a" if i % 2 == 0 else "acc_b"
        prompt = rng.randint(1, 5_000)
        completion = rng.randint(1, 2_000)
        doc = event_doc(account_id, ACCOUNTS[account_id], when=base + timedelta(seconds=30 * i),
                        request_id=f"valid-{i}", prompt=prompt, completion=completion,
                        cached=rng.randint(0, prompt), reasoning=rng.randint(0, completion),
                        inputs=rng.randint(1, 4), kind=rng.choice(["request", "request", "batch"]),
                        source=f"gateway/gw-{i % 2}")
        valid.append(doc)
        return doc

    messages: list[tuple[bytes | None, bytes | None]] = []
    poison_index: list[tuple[str, int]] = []
    first = next_valid()
    messages.append((first["data"]["account_id"].encode(), to_bytes(first)))
    ctx = Ctx(when=base + timedelta(minutes=1), now=now, first_valid=first)
    for poison in POISONS:
        poison_index.append((poison.name, len(messages)))
        messages.append(poison.build(ctx))
        doc = next_valid()
        messages.append((doc["data"]["account_id"].encode(), to_bytes(doc)))
    return messages, poison_index, valid


async def run_relay_and_read_dlq(settings: Settings, url: str, expected: int) -> list:
    """Run the outbox relay until the outbox is empty, then read the whole DLQ topic. One more
    message than expected is asked for, so a repeat or an extra message would be seen."""
    relay = OutboxRelay(settings, url, idle_seconds=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        deadline = time.monotonic() + 20
        while seed.scalar(url, "SELECT count(*) FROM outbox") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    return await read_topic(settings.kafka_bootstrap_servers, settings.dlq_topic, expected + 1, timeout=3)


@pytest.fixture(scope="module")
def scenario_database(pg_server_url: str, template_database: str) -> Iterator[str]:
    with migrated_database(pg_server_url, template_database, "tollhouse_poison") as url:
        yield url


@pytest.fixture(scope="module")
async def scenario(scenario_database: str, broker) -> Scenario:
    url = scenario_database
    now = datetime.now(timezone.utc)
    seed_reference_data(url, now)
    suffix = uuid.uuid4().hex[:10]
    topic_names = {"usage_topic": f"usage-{suffix}", "dlq_topic": f"usage-{suffix}.dlq",
                   "breach_topic": f"breaches-{suffix}", "consumer_group": f"metering-{suffix}"}
    settings = metering_settings(url, broker.bootstrap_servers, topic_names, topic_partitions=PARTITIONS,
                                 max_event_bytes=MAX_EVENT_BYTES)
    await create_topics(settings)

    messages, poison_index, valid = build_messages(now)
    metadata = await produce_recorded(broker.bootstrap_servers, settings.usage_topic, messages)
    produced = [Produced(k, v, m.partition, m.offset) for (k, v), m in zip(messages, metadata)]
    poison_at = {name: produced[i] for name, i in poison_index}
    poison_event_id: dict[str, str | None] = {}
    for poison in POISONS:
        value = poison_at[poison.name].value
        poison_event_id[poison.name] = json.loads(value)["id"] if poison.from_database else None

    consumer = await consume_until(settings, url, lambda c: c.totals.received >= len(produced), timeout=40)

    columns = ("dead_letter_id", "reason", "detail", "event_id", "source", "topic", "topic_partition",
               "kafka_offset", "payload")
    dead_rows = [dict(zip(columns, r)) for r in seed.rows(url, f"SELECT {', '.join(columns)} FROM dead_letters")]
    dead_letters = {(r["topic_partition"], r["kafka_offset"]): r for r in dead_rows}
    assert len(dead_letters) == len(dead_rows)
    outbox_before = seed.scalar(url, "SELECT count(*) FROM outbox")
    db = snapshot(url)
    dlq = await run_relay_and_read_dlq(settings, url, len(POISONS))
    return Scenario(
        url=url, settings=settings, produced=produced, poison_at=poison_at, poison_event_id=poison_event_id,
        valid=valid, totals=consumer.totals,
        end_offsets=partition_ends(produced),
        stored_offsets=seed.stored_offsets(url, settings.consumer_group, settings.usage_topic),
        dead_letters=dead_letters,
        outbox_before_relay=outbox_before, outbox_after_relay=seed.scalar(url, "SELECT count(*) FROM outbox"),
        dlq_messages=dlq,
        db=db,
    )


def dlq_body_for(scenario: Scenario, produced: Produced) -> tuple[Any, dict[str, Any]]:
    found = []
    for message in scenario.dlq_messages:
        body = msgspec.json.decode(message.value)
        if (body["data"]["partition"], body["data"]["offset"]) == (produced.partition, produced.offset):
            found.append((message, body))
    assert len(found) == 1, f"{len(found)} DLQ messages for partition {produced.partition} offset {produced.offset}"
    return found[0]


# --- one test per poison kind -------------------------------------------------------------


@pytest.mark.parametrize("poison", POISONS, ids=[p.name for p in POISONS])
async def test_poison_is_dead_lettered_with_its_reason(scenario: Scenario, poison: Poison) -> None:
    produced = scenario.poison_at[poison.name]
    original = produced.value if produced.value is not None else b""

    row = scenario.dead_letters.get((produced.partition, produced.offset))
    assert row is not None, f"no dead letter for {poison.name} at partition {produced.partition} offset {produced.offset}"
    assert row["reason"] == poison.reason, row["detail"]
    assert row["detail"].strip()
    assert row["topic"] == scenario.settings.usage_topic
    assert bytes(row["payload"]) == original
    assert row["event_id"] == scenario.poison_event_id[poison.name]
    if poison.from_database:
        assert row["source"] == json.loads(produced.value)["source"]
    else:
        assert row["source"] == "unknown"

    message, body = dlq_body_for(scenario, produced)
    assert message.key == produced.key
    assert body["type"] == DEAD_LETTER_EVENT_TYPE
    assert body["specversion"] == "1.0"
    assert body["id"] == row["dead_letter_id"]
    data = body["data"]
    assert data["dead_letter_id"] == row["dead_letter_id"]
    assert data["reason"] == poison.reason
    assert data["detail"] == row["detail"]
    assert data["topic"] == scenario.settings.usage_topic
    assert data["event_id"] == row["event_id"]
    try:
        original.decode("utf-8")
        is_text = True
    except UnicodeDecodeError:
        is_text = False
    if is_text:
        assert data["payload_encoding"] == "utf-8"
        assert data["payload"].encode("utf-8") == original
    else:
        assert data["payload_encoding"] == "base64"
        assert base64.b64decode(data["payload"], validate=True) == original


# --- the run as a whole -------------------------------------------------------------------


async def test_valid_events_around_the_poison_are_all_booked_once(scenario: Scenario) -> None:
    db = scenario.db
    expected = {}
    for doc in scenario.valid:
        d = doc["data"]
        charge = reference_charge(d["prompt_tokens"], d["completion_tokens"], d["cached_tokens"], d["kind"] == "batch")
        expected[doc["id"]] = (1, d["account_id"], d["total_tokens"], charge)
    booked = {event_id: (n, account_id, tokens, charge) for event_id, n, account_id, tokens, charge in db["booked"]}
    assert booked == expected  # one entry per valid event, none for any poison message
    assert db["usage_events"] == len(scenario.valid)

    total_tokens = sum(v[2] for v in expected.values())
    total_charge = sum(v[3] for v in expected.values())
    assert db["ledger_totals"] == (len(scenario.valid), total_tokens, total_charge)
    assert db["usage_daily_totals"] == (len(scenario.valid), total_tokens, total_charge)
    for account_id in ACCOUNTS:
        charges = sum(v[3] for v in expected.values() if v[1] == account_id)
        assert db["balances"][account_id] == (TOPUP - charges, charges)
    # The conflicting copy did not replace the first delivery of its id.
    first = scenario.valid[0]
    assert db["completion_by_event"][first["id"]] == first["data"]["completion_tokens"]


async def test_dead_letter_table_holds_exactly_one_row_per_poison_message(scenario: Scenario) -> None:
    assert {p.partition for p in scenario.poison_at.values()} == set(range(PARTITIONS))  # poison on each
    poison_positions = {(p.partition, p.offset) for p in scenario.poison_at.values()}
    assert len(poison_positions) == len(POISONS)
    assert set(scenario.dead_letters) == poison_positions
    assert Counter(r["reason"] for r in scenario.dead_letters.values()) == Counter(p.reason for p in POISONS)


async def test_consumer_totals_and_ingest_stats_match(scenario: Scenario) -> None:
    conflicts = sum(1 for p in POISONS if p.reason == Reason.ID_CONFLICT)
    t = scenario.totals
    assert t.received == len(scenario.produced)
    assert t.accepted == len(scenario.valid)
    assert t.dead_lettered == len(POISONS) - conflicts
    assert t.conflicts == conflicts
    assert t.duplicates == 0
    assert t.dead_letter_reasons == Counter(p.reason for p in POISONS)
    assert scenario.db["ingest_stats"] == (
        len(scenario.produced), len(scenario.valid), 0, conflicts, len(POISONS) - conflicts)


async def test_every_partition_moved_on_to_its_end(scenario: Scenario) -> None:
    # Both partitions carried messages, and each stored offset is one past its last message.
    by_partition = Counter(p.partition for p in scenario.produced)
    assert set(by_partition) == set(range(PARTITIONS))
    assert scenario.end_offsets == dict(by_partition)  # a fresh topic: offsets 0 … n-1, no gaps
    assert scenario.stored_offsets == scenario.end_offsets


async def test_relay_publishes_one_dlq_message_per_dead_letter(scenario: Scenario) -> None:
    assert scenario.outbox_before_relay == len(POISONS)
    assert scenario.outbox_after_relay == 0
    assert len(scenario.dlq_messages) == len(POISONS)
    ids = [msgspec.json.decode(m.value)["id"] for m in scenario.dlq_messages]
    assert sorted(ids) == sorted(r["dead_letter_id"] for r in scenario.dead_letters.values())


# --- redelivery ---------------------------------------------------------------------------


async def test_redelivered_poison_is_counted_as_duplicate_not_dead_lettered_again(scenario: Scenario) -> None:
    """A new consumer group re-reads the whole topic from the start over the same database:
    no second dead letter, no second ledger entry, no second DLQ message; all duplicates."""
    url = scenario.url
    dead_before = seed.rows(url, "SELECT dead_letter_id, topic_partition, kafka_offset FROM dead_letters ORDER BY 1")
    ledger_before = seed.rows(url, "SELECT entry_id, event_id, charge FROM ledger_entries ORDER BY 1")
    balances_before = seed.rows(url, "SELECT account_id, balance, charges_total FROM account_balances ORDER BY 1")
    stats_before = seed.rows(url, INGEST_STATS_SQL)[0]

    topic_names = {"usage_topic": scenario.settings.usage_topic, "dlq_topic": scenario.settings.dlq_topic,
                   "breach_topic": scenario.settings.breach_topic,
                   "consumer_group": f"{scenario.settings.consumer_group}-again"}
    settings = metering_settings(url, scenario.settings.kafka_bootstrap_servers, topic_names,
                                 topic_partitions=PARTITIONS, max_event_bytes=MAX_EVENT_BYTES)
    total = len(scenario.produced)
    started = time.monotonic()
    again = await consume_until(settings, url, lambda c: c.totals.received >= total, timeout=40)
    assert time.monotonic() - started < 40

    t = again.totals
    assert (t.received, t.accepted, t.dead_lettered, t.conflicts) == (total, 0, 0, 0)
    assert t.duplicates == total  # valid events and poison messages alike
    assert seed.rows(url, "SELECT dead_letter_id, topic_partition, kafka_offset FROM dead_letters ORDER BY 1") == dead_before
    assert seed.rows(url, "SELECT entry_id, event_id, charge FROM ledger_entries ORDER BY 1") == ledger_before
    assert seed.rows(url, "SELECT account_id, balance, charges_total FROM account_balances ORDER BY 1") == balances_before
    assert seed.scalar(url, "SELECT count(*) FROM outbox") == 0  # nothing new to publish on the DLQ
    stats = seed.rows(url, INGEST_STATS_SQL)[0]
    assert stats == (stats_before[0] + total, stats_before[1], stats_before[2] + total, stats_before[3],
                     stats_before[4])
    # The new group's offsets moved to the end of every partition too.
    assert seed.stored_offsets(url, settings.consumer_group, settings.usage_topic) == scenario.end_offsets
