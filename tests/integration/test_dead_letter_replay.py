"""Dead letters through the API, and their replay, end to end on the real broker: an event for
a key that does not exist yet is dead-lettered; the key is created; the replay writes an outbox
row in the same transaction as its replay record; the outbox relay publishes it to the usage
topic; the consumer books it exactly once. A second replay sends nothing and returns the
first one's record. Replays that cannot help (id conflicts, payloads that are not JSON) are
refused, and only the admin token may replay.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import msgspec
import pytest

from services.contracts.events import build_usage_event, encode_event
from services.contracts.ids import new_id
from services.metering.consumer.relay import OutboxRelay
from services.metering.consumer.worker import UsageConsumer
from tests.support import seed
from tests.support.app import ADMIN, BILLING, GATEWAY, metering_client
from tests.support.kafka import create_topics, metering_settings, produce, read_topic

NANO = 10**9
MODEL = "gpt-4o"
UTC = timezone.utc


@pytest.fixture
def settings(database_url, broker, topic_names):
    return metering_settings(database_url, broker.bootstrap_servers, topic_names, topic_partitions=1)


def seed_account(url: str) -> None:
    seed.add_price(url, MODEL, input_price=2_500, output_price=10_000)
    seed.create_account(url, "acc_1")
    seed.topup(url, "acc_1", 10 * NANO, "t0")


def usage(key_id: str = "key_late", request_id: str = "req-1", completion: int = 500):
    return build_usage_event(account_id="acc_1", key_id=key_id, model=MODEL, prompt_tokens=1_000,
                             completion_tokens=completion, request_id=request_id,
                             time=datetime.now(UTC) - timedelta(minutes=5), source="gateway/gw-1")


class Consumer:
    """One consumer running for the whole test (a consumer group member joins once)."""

    def __init__(self, consumer: UsageConsumer, task: asyncio.Task) -> None:
        self.consumer = consumer
        self.task = task
        self.expected = 0

    async def read(self, messages: int, timeout: float = 60.0) -> None:
        """Wait until the consumer has committed ``messages`` more messages."""
        self.expected += messages
        deadline = time.monotonic() + timeout
        while self.consumer.totals.received < self.expected:
            if self.task.done():
                self.task.result()
                raise AssertionError("consumer stopped early")
            assert time.monotonic() < deadline, f"consumer did not read {self.expected}: {self.consumer.totals}"
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_consumer(settings, url: str) -> AsyncIterator[Consumer]:
    await create_topics(settings)
    consumer = UsageConsumer(settings, url)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield Consumer(consumer, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def relay_outbox(settings, url: str) -> None:
    """Run the outbox relay until the outbox is empty (as the metering service does after each batch)."""
    relay = OutboxRelay(settings, url, idle_seconds=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        deadline = time.monotonic() + 20
        while seed.scalar(url, "SELECT count(*) FROM outbox"):
            assert time.monotonic() < deadline, "the relay did not empty the outbox"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def dead_letter_for_unknown_key(settings, url: str, consumer: Consumer) -> tuple[bytes, str]:
    """Produce one event for the not-yet-existing key_late; return its bytes and its dead letter's id."""
    payload = encode_event(usage())
    await produce(settings.kafka_bootstrap_servers, settings.usage_topic, [(b"acc_1", payload)])
    await consumer.read(1)
    (dead_letter_id, reason), = seed.rows(url, "SELECT dead_letter_id, reason FROM dead_letters")
    assert reason == "unknown_key"
    return payload, dead_letter_id


def usage_entries(url: str) -> list[tuple]:
    return seed.rows(url, "SELECT event_id, request_id, charge FROM ledger_entries WHERE entry_type = 'usage'")


def insert_dead_letter(url: str, payload: bytes, reason: str, *, key: bytes | None = b"acc_1", offset: int = 0,
                       received_at: datetime | None = None) -> str:
    """A dead letter as the consumer records it, written directly (for tests of the API alone)."""
    dead_letter_id = new_id("dlq")
    event_id = None
    try:
        event_id = json.loads(payload).get("id")
    except (ValueError, AttributeError):
        pass
    seed.rows(
        url,
        "INSERT INTO dead_letters (dead_letter_id, reason, detail, event_id, source, topic, topic_partition,"
        " kafka_offset, payload, received_at, message_key) VALUES (%s, %s, %s, %s, %s, %s, 0, %s, %s, %s, %s)"
        " RETURNING dead_letter_id",
        dead_letter_id, reason, f"{reason} (test)", event_id, "gateway/gw-1", "usage-test", offset, payload,
        received_at or datetime.now(UTC), key,
    )
    return dead_letter_id


async def test_a_replayed_dead_letter_is_booked_exactly_once(settings, database_url) -> None:
    url = database_url
    seed_account(url)
    async with running_consumer(settings, url) as consumer, metering_client(settings, url) as client:
        payload, dead_letter_id = await dead_letter_for_unknown_key(settings, url, consumer)
        event_id = json.loads(payload)["id"]
        assert usage_entries(url) == []
        seed.create_key(url, "key_late", "acc_1", "payg")  # the cause is fixed

        listed = (await client.get("/v1/dead-letters", headers=BILLING)).json()["data"]
        assert [(d["dead_letter_id"], d["replayed"], d["replay"]) for d in listed] == [(dead_letter_id, False, None)]

        first = await client.post(f"/v1/dead-letters/{dead_letter_id}/replay", headers=ADMIN)
        assert first.status_code == 201, first.text
        replay = first.json()
        assert (replay["dead_letter_id"], replay["event_id"], replay["topic"]) == (
            dead_letter_id, event_id, settings.usage_topic)
        # The replay record and the outbox row were written together: the stored bytes, under the original key.
        assert seed.rows(url, "SELECT message_key, payload FROM outbox WHERE topic = %s", settings.usage_topic) == [
            (b"acc_1", payload)]

        second = await client.post(f"/v1/dead-letters/{dead_letter_id}/replay", headers=ADMIN)
        assert second.status_code == 200, second.text
        assert second.json() == replay  # the first replay's record, same replayed_at
        assert seed.scalar(url, "SELECT count(*) FROM outbox WHERE topic = %s", settings.usage_topic) == 1

        await relay_outbox(settings, url)
        await consumer.read(1)

        third = await client.post(f"/v1/dead-letters/{dead_letter_id}/replay", headers=ADMIN)
        assert (third.status_code, third.json()) == (200, replay)  # after booking too: nothing sent
        shown = (await client.get(f"/v1/dead-letters/{dead_letter_id}", headers=BILLING)).json()
        assert (shown["replayed"], shown["replay"]) == (True, replay)
        assert consumer.consumer.totals.accepted == 1

    charge = 1_000 * 2_500 + 500 * 10_000
    assert usage_entries(url) == [(event_id, "req-1", charge)]
    assert seed.scalar(url, "SELECT balance FROM account_balances WHERE account_id = 'acc_1'") == 10 * NANO - charge
    assert seed.scalar(url, "SELECT count(*) FROM dead_letters") == 1  # booked, not dead-lettered again
    assert seed.scalar(url, "SELECT count(*) FROM outbox WHERE topic = %s", settings.usage_topic) == 0
    # On the usage topic: the original and ONE replay (three asked for, to see a repeat).
    on_topic = await read_topic(settings.kafka_bootstrap_servers, settings.usage_topic, 3, timeout=3)
    assert [(m.key, m.value) for m in on_topic] == [(b"acc_1", payload), (b"acc_1", payload)]


async def test_a_redelivered_replay_is_a_duplicate_not_a_second_booking(settings, database_url) -> None:
    """Should the relay publish a replay twice (a crash between Kafka's ack and the outbox delete),
    the event id still books it once."""
    url = database_url
    seed_account(url)
    async with running_consumer(settings, url) as consumer, metering_client(settings, url) as client:
        payload, dead_letter_id = await dead_letter_for_unknown_key(settings, url, consumer)
        seed.create_key(url, "key_late", "acc_1", "payg")
        assert (await client.post(f"/v1/dead-letters/{dead_letter_id}/replay", headers=ADMIN)).status_code == 201
        seed.rows(url, "INSERT INTO outbox (topic, message_key, payload) SELECT topic, message_key, payload"
                       " FROM outbox WHERE topic = %s RETURNING outbox_id", settings.usage_topic)
        await relay_outbox(settings, url)
        await consumer.read(2)
        totals = consumer.consumer.totals
    assert (totals.accepted, totals.duplicates) == (1, 1)
    assert len(usage_entries(url)) == 1


async def test_concurrent_replays_send_once(settings, database_url) -> None:
    url = database_url
    seed_account(url)
    dead_letter_id = insert_dead_letter(url, encode_event(usage()), "unknown_key")
    async with metering_client(settings, url) as client:
        answers = await asyncio.gather(*(
            client.post(f"/v1/dead-letters/{dead_letter_id}/replay", headers=ADMIN) for _ in range(8)))
    assert sorted(a.status_code for a in answers) == [200] * 7 + [201]
    assert len({a.text for a in answers}) == 1
    assert seed.scalar(url, "SELECT count(*) FROM outbox WHERE topic = %s", settings.usage_topic) == 1
    assert seed.scalar(url, "SELECT count(*) FROM dead_letter_replays") == 1


async def test_a_replay_before_the_fix_is_dead_lettered_again_as_a_new_dead_letter(settings, database_url) -> None:
    url = database_url
    seed_account(url)
    async with running_consumer(settings, url) as consumer, metering_client(settings, url) as client:
        payload, dead_letter_id = await dead_letter_for_unknown_key(settings, url, consumer)
        r = await client.post(f"/v1/dead-letters/{dead_letter_id}/replay", headers=ADMIN)
        assert r.status_code == 201, r.text
        await relay_outbox(settings, url)
        await consumer.read(1)
        listed = (await client.get("/v1/dead-letters", headers=BILLING)).json()["data"]
    assert usage_entries(url) == []
    newest, oldest = listed  # newest first
    assert oldest["dead_letter_id"] == dead_letter_id and oldest["replayed"] is True
    assert (newest["reason"], newest["event_id"], newest["replayed"]) == ("unknown_key", oldest["event_id"], False)
    assert (newest["partition"], newest["offset"]) == (0, 1)  # the replayed message, at its own offset
    assert newest["payload"].encode() == payload


async def test_an_id_conflict_is_not_replayed(settings, database_url) -> None:
    url = database_url
    seed_account(url)
    seed.create_key(url, "key_1", "acc_1", "payg")
    original = usage("key_1")
    conflicting = msgspec.json.decode(encode_event(original))
    conflicting["data"]["completion_tokens"] += 1
    conflicting["data"]["total_tokens"] += 1
    async with running_consumer(settings, url) as consumer:
        await produce(settings.kafka_bootstrap_servers, settings.usage_topic,
                      [(b"acc_1", encode_event(original)), (b"acc_1", json.dumps(conflicting).encode())])
        await consumer.read(2)
    (dead_letter_id, reason), = seed.rows(url, "SELECT dead_letter_id, reason FROM dead_letters")
    assert reason == "id_conflict"
    async with metering_client(settings, url) as client:
        r = await client.post(f"/v1/dead-letters/{dead_letter_id}/replay", headers=ADMIN)
    assert r.status_code == 409, r.text
    assert r.json()["code"] == 6 and r.json()["error"]["code"] == "conflict"
    assert "id_conflict" in r.json()["msg"]
    assert seed.scalar(url, "SELECT count(*) FROM dead_letter_replays") == 0
    assert seed.scalar(url, "SELECT count(*) FROM outbox WHERE topic = %s", settings.usage_topic) == 0


@pytest.mark.parametrize(
    ("value", "reason", "fragment"),
    [
        (b"this is not json {", "invalid_json", "not valid JSON"),
        (b"\xff\xfe binary", "invalid_json", "not valid JSON"),
        (b'{"specversion": "1.0"}', "missing_field", "breaks the usage event contract"),
    ],
)
async def test_a_payload_that_cannot_be_booked_is_not_replayed(settings, database_url, value, reason, fragment) -> None:
    url = database_url
    dead_letter_id = insert_dead_letter(url, value, reason)
    async with metering_client(settings, url) as client:
        r = await client.post(f"/v1/dead-letters/{dead_letter_id}/replay", headers=ADMIN)
    assert r.status_code == 409, r.text
    assert fragment in r.json()["msg"]
    assert seed.scalar(url, "SELECT count(*) FROM dead_letter_replays") == 0


async def test_a_dead_letter_without_a_recorded_key_is_replayed_under_its_account_id(settings, database_url) -> None:
    url = database_url
    dead_letter_id = insert_dead_letter(url, encode_event(usage()), "unknown_key", key=None)  # as before 0002
    async with metering_client(settings, url) as client:
        r = await client.post(f"/v1/dead-letters/{dead_letter_id}/replay", headers=ADMIN)
    assert r.status_code == 201, r.text
    assert seed.scalar(url, "SELECT message_key FROM outbox") == b"acc_1"


@pytest.mark.parametrize(("headers", "status"), [(BILLING, 403), (GATEWAY, 403), ({}, 401),
                                                 ({"Authorization": "Bearer nope"}, 401)])
async def test_only_the_admin_token_may_replay(settings, database_url, headers, status) -> None:
    url = database_url
    dead_letter_id = insert_dead_letter(url, encode_event(usage()), "unknown_key")
    async with metering_client(settings, url) as client:
        r = await client.post(f"/v1/dead-letters/{dead_letter_id}/replay", headers=headers)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"code", "msg", "error"}
    assert seed.scalar(url, "SELECT count(*) FROM dead_letter_replays") == 0
    assert seed.scalar(url, "SELECT count(*) FROM outbox") == 0


async def test_replaying_an_unknown_dead_letter_is_404(settings, database_url) -> None:
    async with metering_client(settings, database_url) as client:
        for dead_letter_id in ("dlq_01NOSUCH0000000000000000", "not%20an%20id"):
            r = await client.post(f"/v1/dead-letters/{dead_letter_id}/replay", headers=ADMIN)
            assert r.status_code == 404, r.text
            assert r.json()["error"]["code"] == "not_found"
        r = await client.get("/v1/dead-letters/dlq_01NOSUCH0000000000000000", headers=BILLING)
        assert r.status_code == 404


# --- listing ------------------------------------------------------------------------------------


async def poison_run(settings, url: str) -> list[bytes]:
    """Five dead letters over three consumer batches (so received_at differs between them)."""
    batches = [
        [b"not json 1", b"\xff\xfe\x00 binary"],
        [encode_event(usage("key_ghost", "req-g1")), encode_event(usage("key_ghost", "req-g2"))],
        [b"not json 2"],
    ]
    async with running_consumer(settings, url) as consumer:
        for batch in batches:
            await produce(settings.kafka_bootstrap_servers, settings.usage_topic, [(b"acc_1", v) for v in batch])
            await consumer.read(len(batch))
    return [v for batch in batches for v in batch]


async def test_dead_letters_are_listed_newest_first_with_their_payload(settings, database_url) -> None:
    url = database_url
    seed_account(url)
    values = await poison_run(settings, url)
    async with metering_client(settings, url) as client:
        r = await client.get("/v1/dead-letters", headers=ADMIN)
        assert r.status_code == 200, r.text
        rows = r.json()["data"]
    assert r.json()["next_cursor"] is None
    assert [row["offset"] for row in rows] == [4, 3, 2, 1, 0]
    received = [datetime.fromisoformat(row["received_at"].replace("Z", "+00:00")) for row in rows]
    assert received == sorted(received, reverse=True)
    by_offset = {row["offset"]: row for row in rows}
    assert by_offset[0]["payload"] == "not json 1" and by_offset[0]["payload_encoding"] == "utf-8"
    assert by_offset[1]["payload_encoding"] == "base64"
    assert base64.b64decode(by_offset[1]["payload"]) == values[1]
    ghost = by_offset[2]
    assert (ghost["reason"], ghost["source"], ghost["topic"], ghost["partition"]) == (
        "unknown_key", "gateway/gw-1", settings.usage_topic, 0)
    assert ghost["event_id"] == json.loads(values[2])["id"]
    assert "key_ghost" in ghost["detail"]
    assert (ghost["payload_bytes"], ghost["payload_truncated"]) == (len(values[2]), False)
    assert by_offset[0]["event_id"] is None and by_offset[0]["source"] == "unknown"


async def test_pages_follow_the_cursor_without_gaps_or_repeats(settings, database_url) -> None:
    url = database_url
    when = datetime(2026, 11, 1, tzinfo=UTC)
    # Three share one received_at (one batch): the Kafka position orders them.
    for offset, received_at in [(0, when), (1, when), (2, when), (3, when + timedelta(seconds=1)),
                                (4, when + timedelta(seconds=2))]:
        insert_dead_letter(url, b"x", "invalid_json", offset=offset, received_at=received_at)
    seen: list[int] = []
    cursor = None
    async with metering_client(settings, url) as client:
        for _ in range(5):
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            r = await client.get("/v1/dead-letters", params=params, headers=BILLING)
            assert r.status_code == 200, r.text
            seen += [row["offset"] for row in r.json()["data"]]
            cursor = r.json()["next_cursor"]
            if cursor is None:
                break
    assert seen == [4, 3, 2, 1, 0]


async def test_filters_by_reason_and_received_time(settings, database_url) -> None:
    url = database_url
    when = datetime(2026, 11, 1, tzinfo=UTC)
    for offset, reason in enumerate(["invalid_json", "unknown_key", "unknown_key", "no_price"]):
        insert_dead_letter(url, b"x", reason, offset=offset, received_at=when + timedelta(minutes=offset))
    async with metering_client(settings, url) as client:
        async def offsets(**params) -> list[int]:
            r = await client.get("/v1/dead-letters", params=params, headers=BILLING)
            assert r.status_code == 200, r.text
            return [row["offset"] for row in r.json()["data"]]

        assert await offsets(reason="unknown_key") == [2, 1]
        assert await offsets(**{"from": "2026-11-01T00:01:00Z"}) == [3, 2, 1]
        assert await offsets(to="2026-11-01T08:01:00+08:00") == [0]  # [from, to): 00:01Z is out
        window = {"from": "2026-11-01T00:02:00Z", "to": "2026-11-02T00:00:00Z"}
        assert await offsets(reason="unknown_key", **window) == [2]


async def test_long_payloads_are_cut_in_the_list_and_whole_alone(settings, database_url) -> None:
    url = database_url
    value = ("é" * 400).encode()  # 800 bytes of two-byte characters
    dead_letter_id = insert_dead_letter(url, value, "invalid_json")
    small = metering_settings(url, settings.kafka_bootstrap_servers, {"usage_topic": settings.usage_topic},
                              dead_letter_payload_preview_bytes=257)
    async with metering_client(small, url) as client:
        row, = (await client.get("/v1/dead-letters", headers=BILLING)).json()["data"]
        whole = (await client.get(f"/v1/dead-letters/{dead_letter_id}", headers=BILLING)).json()
    assert (row["payload_bytes"], row["payload_truncated"], row["payload_encoding"]) == (800, True, "utf-8")
    assert row["payload"] == "é" * 128  # 257 bytes end inside a character: that half is left out
    assert (whole["payload"], whole["payload_truncated"]) == ("é" * 400, False)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"reason": "no_such_reason"}, "query.reason:"),
        ({"cursor": "not-a-cursor"}, "query.cursor:"),
        ({"cursor": base64.urlsafe_b64encode(b'["x", 1]').decode()}, "query.cursor:"),
        ({"cursor": base64.urlsafe_b64encode(b'["2026-11-01T00:00:00Z", "t", -1, 0]').decode()}, "query.cursor:"),
        ({"limit": 0}, "query.limit:"),
        ({"limit": "ten"}, "query.limit:"),
        ({"limit": 1_000_000}, "query.limit:"),
        ({"from": "2026-11-22"}, "query.from:"),
        ({"from": "2026-11-22T00:00:00Z", "to": "2026-11-21T00:00:00Z"}, "query.to:"),
        ({"raeson": "unknown_key"}, "query.raeson:"),
    ],
)
async def test_bad_listing_parameters_are_400(settings, database_url, params, fragment) -> None:
    async with metering_client(settings, database_url) as client:
        r = await client.get("/v1/dead-letters", params=params, headers=BILLING)
    assert r.status_code == 400, r.text
    assert r.json()["msg"].startswith(fragment), r.json()["msg"]


@pytest.mark.parametrize(("headers", "status"), [(BILLING, 200), (ADMIN, 200), (GATEWAY, 403), ({}, 401)])
async def test_who_may_list_dead_letters(settings, database_url, headers, status) -> None:
    async with metering_client(settings, database_url) as client:
        r = await client.get("/v1/dead-letters", headers=headers)
        one = await client.get("/v1/dead-letters/dlq_01NOSUCH0000000000000000", headers=headers)
    assert r.status_code == status, r.text
    assert one.status_code == (404 if status == 200 else status)
