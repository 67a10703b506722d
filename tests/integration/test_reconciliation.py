"""GET /v1/reconciliation and POST /v1/reconciliation/diff on PostgreSQL, after one run of the
real consumer through the real broker: events from two gateways, redelivered duplicates, an
id conflict and poison messages.

The counters are per UTC day of processing; the ledger totals are by event time in
[from, to). The run books its events on a day 30 days back, so the two are told apart: a
window around today holds the counters and no ledger figures, a window on the events' day
holds the ledger figures and no counters.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

import msgspec
import psycopg
import pytest
from alembic import command

from services.contracts.events import build_usage_event, encode_event
from services.metering.store.migrate import alembic_config
from services.settings import Settings
from tests.conftest import migrated_database
from tests.support import seed
from tests.support.app import ADMIN, BILLING, GATEWAY, metering_client
from tests.support.kafka import consume_until, create_topics, metering_settings, produce

UTC = timezone.utc
MODEL = "gpt-4o"
INPUT_PRICE, OUTPUT_PRICE = 2_500, 10_000  # nano-CNY per token: 2.5 and 10 CNY per 1M tokens
GW0, GW1 = "gateway/gw-0", "gateway/gw-1"
CSV = {"Content-Type": "text/csv"}
JSONL = {"Content-Type": "application/x-ndjson"}


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@dataclass
class Booked:
    request_id: str
    source: str
    prompt: int
    completion: int
    package_tokens: int
    charge: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


@dataclass
class Scenario:
    url: str
    settings: Settings
    day: datetime  # midnight UTC of the day the in-window events happened
    processed_on: date  # UTC day the consumer ran
    in_window: dict[str, Booked]  # request_id → what the ledger booked, event time on ``day``
    early: Booked  # one millisecond before ``day``
    late: Booked  # exactly the end of ``day``: outside [day, day + 1)


@pytest.fixture(scope="module")
def scenario_database(pg_server_url: str, template_database: str) -> Iterator[str]:
    with migrated_database(pg_server_url, template_database, "tollhouse_recon") as url:
        yield url


@pytest.fixture(scope="module")
async def scenario(scenario_database: str, broker) -> Scenario:
    url = scenario_database
    day = midnight(datetime.now(UTC).date() - timedelta(days=30))
    seed.add_price(url, MODEL, input_price=INPUT_PRICE, output_price=OUTPUT_PRICE)
    seed.create_account(url, "acc_a")
    seed.topup(url, "acc_a", 100 * 10**9, "t0")
    seed.create_package(url, "acc_a", "pkg_a", 10_000_000, day - timedelta(days=5), day + timedelta(days=60))
    seed.create_key(url, "key_payg", "acc_a", "payg")
    seed.create_key(url, "key_pkg", "acc_a", "package", package_id="pkg_a")

    def event(request_id: str, key_id: str, source: str, when: datetime, prompt: int, completion: int):
        e = build_usage_event(account_id="acc_a", key_id=key_id, model=MODEL, prompt_tokens=prompt,
                              completion_tokens=completion, request_id=request_id, time=when, source=source)
        payg = key_id == "key_payg"
        booked = Booked(request_id, source, prompt, completion, 0 if payg else prompt + completion,
                        prompt * INPUT_PRICE + completion * OUTPUT_PRICE if payg else 0)
        return e, booked

    valid = [
        event(f"req-{i}", "key_payg" if i % 4 < 2 else "key_pkg", GW0 if i % 2 == 0 else GW1,
              day + timedelta(minutes=30 * i), 100 + 7 * i, 50 + 3 * i)
        for i in range(20)
    ]
    early = event("req-early", "key_payg", GW0, day - timedelta(milliseconds=1), 11, 22)
    late = event("req-late", "key_pkg", GW1, day + timedelta(days=1), 33, 44)
    ghost, _ = event("req-ghost", "key_payg", GW1, day, 1, 1)
    ghost_doc = msgspec.json.decode(encode_event(ghost))
    ghost_doc["subject"] = ghost_doc["data"]["key_id"] = "key_ghost"
    conflict_doc = msgspec.json.decode(encode_event(valid[5][0]))  # same id, other tokens: after it on the partition
    conflict_doc["data"]["completion_tokens"] += 1
    conflict_doc["data"]["total_tokens"] += 1

    messages = [encode_event(e) for e, _ in valid] + [encode_event(early[0]), encode_event(late[0])]
    messages += [encode_event(e) for e, _ in valid[:5]]  # redelivered: duplicates
    messages += [b"this is not json {", json.dumps(ghost_doc).encode(), json.dumps(conflict_doc).encode()]

    suffix = uuid.uuid4().hex[:10]
    topic_names = {"usage_topic": f"usage-{suffix}", "dlq_topic": f"usage-{suffix}.dlq",
                   "breach_topic": f"breaches-{suffix}", "consumer_group": f"metering-{suffix}"}
    settings = metering_settings(url, broker.bootstrap_servers, topic_names, topic_partitions=1)
    await create_topics(settings)
    await produce(broker.bootstrap_servers, settings.usage_topic, [(b"acc_a", m) for m in messages])
    consumer = await consume_until(settings, url, lambda c: c.totals.received >= len(messages))
    t = consumer.totals
    assert (t.received, t.accepted, t.duplicates, t.conflicts, t.dead_lettered) == (30, 22, 5, 1, 2)
    return Scenario(url, settings, day, datetime.now(UTC).date(), {b.request_id: b for _, b in valid},
                    early[1], late[1])


def ledger_sums(booked: list[Booked]) -> dict[str, Any]:
    return {
        "requests": len(booked),
        "total_tokens": sum(b.total for b in booked),
        "package_tokens": sum(b.package_tokens for b in booked),
        "charge": f"{sum(b.charge for b in booked) // 10**9}.{sum(b.charge for b in booked) % 10**9:09d}",
    }


NO_LEDGER = {"requests": 0, "total_tokens": 0, "package_tokens": 0, "charge": "0.000000000"}
NO_COUNTERS = {"received": 0, "accepted": 0, "duplicates": 0, "conflicts": 0, "dead_lettered": 0}


async def get_reconciliation(scenario: Scenario, start: datetime, end: datetime, headers=BILLING) -> dict:
    async with metering_client(scenario.settings, scenario.url) as client:
        r = await client.get("/v1/reconciliation", params={"from": iso(start), "to": iso(end)}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


# --- GET /v1/reconciliation -------------------------------------------------------------------


async def test_counters_of_the_processing_days_count_every_message_by_source(scenario: Scenario) -> None:
    today = scenario.processed_on
    body = await get_reconciliation(scenario, midnight(today - timedelta(days=1)), midnight(today + timedelta(days=2)))
    assert {k: body[k] for k in NO_COUNTERS} == {
        "received": 30, "accepted": 22, "duplicates": 5, "conflicts": 1, "dead_lettered": 2}
    assert {k: body[k] for k in NO_LEDGER} == NO_LEDGER  # the events happened 30 days earlier
    by_source = {s["source"]: s for s in body["sources"]}
    assert [s["source"] for s in body["sources"]] == sorted(by_source)
    assert {k: by_source[GW0][k] for k in NO_COUNTERS} == {
        "received": 14, "accepted": 11, "duplicates": 3, "conflicts": 0, "dead_lettered": 0}
    assert {k: by_source[GW1][k] for k in NO_COUNTERS} == {
        "received": 15, "accepted": 11, "duplicates": 2, "conflicts": 1, "dead_lettered": 1}
    assert {k: by_source["unknown"][k] for k in NO_COUNTERS} == {  # the message that was not JSON
        "received": 1, "accepted": 0, "duplicates": 0, "conflicts": 0, "dead_lettered": 1}


async def test_ledger_totals_cover_event_times_in_the_half_open_window(scenario: Scenario) -> None:
    body = await get_reconciliation(scenario, scenario.day, scenario.day + timedelta(days=1))
    booked = list(scenario.in_window.values())  # not req-early (1 ms before) nor req-late (at the end)
    assert {k: body[k] for k in NO_LEDGER} == ledger_sums(booked)
    assert {k: body[k] for k in NO_COUNTERS} == NO_COUNTERS  # nothing was processed on that day
    by_source = {s["source"]: s for s in body["sources"]}
    assert set(by_source) == {GW0, GW1}
    for source in (GW0, GW1):
        assert {k: by_source[source][k] for k in NO_LEDGER} == ledger_sums([b for b in booked if b.source == source])
    assert body["from"] == iso(scenario.day)
    assert body["to"] == iso(scenario.day + timedelta(days=1))


async def test_window_edges_include_from_and_exclude_to(scenario: Scenario) -> None:
    body = await get_reconciliation(scenario, scenario.day - timedelta(milliseconds=1), scenario.day)
    assert {k: body[k] for k in NO_LEDGER} == ledger_sums([scenario.early])
    body = await get_reconciliation(scenario, scenario.day + timedelta(days=1), scenario.day + timedelta(days=2))
    assert {k: body[k] for k in NO_LEDGER} == ledger_sums([scenario.late])


async def test_counters_cover_whole_utc_days_and_say_which(scenario: Scenario) -> None:
    today = scenario.processed_on
    start = midnight(today) + timedelta(hours=5, minutes=30)
    body = await get_reconciliation(scenario, start, start + timedelta(hours=1))
    assert body["counters_from"] == iso(midnight(today))
    assert body["counters_to"] == iso(midnight(today + timedelta(days=1)))
    assert body["received"] == 30


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"to": "2026-11-02T00:00:00Z"}, "query.from: is required"),
        ({"from": "2026-11-01T00:00:00Z"}, "query.to: is required"),
        ({"from": "2026-11-01", "to": "2026-11-02T00:00:00Z"}, "query.from:"),
        ({"from": "2026-11-01T00:00:00", "to": "2026-11-02T00:00:00Z"}, "query.from:"),
        ({"from": "2026-11-02T00:00:00Z", "to": "2026-11-02T00:00:00Z"}, "query.to:"),
        ({"from": "2026-11-02T00:00:00Z", "to": "2026-11-01T00:00:00Z"}, "must be after"),
        ({"from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "longer than 366 days"),
        ({"from": "2026-11-01T00:00:00Z", "to": "2026-11-02T00:00:00Z", "source": "x"}, "query.source:"),
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(scenario: Scenario, params, fragment) -> None:
    async with metering_client(scenario.settings, scenario.url) as client:
        r = await client.get("/v1/reconciliation", params=params, headers=BILLING)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["msg"]
    assert r.json()["code"] == 3


@pytest.mark.parametrize(("headers", "status"), [(BILLING, 200), (ADMIN, 200), (GATEWAY, 403), ({}, 401)])
async def test_who_may_reconcile(scenario: Scenario, headers, status) -> None:
    params = {"from": iso(scenario.day), "to": iso(scenario.day + timedelta(days=1))}
    async with metering_client(scenario.settings, scenario.url) as client:
        got = await client.get("/v1/reconciliation", params=params, headers=headers)
        posted = await client.post("/v1/reconciliation/diff", params=params, headers={**headers, **CSV},
                                   content=b"request_id,total_tokens\n")
    assert (got.status_code, posted.status_code) == (status, status), (got.text, posted.text)


# --- POST /v1/reconciliation/diff -------------------------------------------------------------


def upstream_rows(scenario: Scenario) -> list[dict[str, Any]]:
    """What the upstream says: req-0…11 agree, req-12 and req-13 differ, req-14…19 are absent
    (extra in the ledger), req-upstream-only and req-early (outside the window) are missing."""
    rows: list[dict[str, Any]] = []
    for i in range(12):
        b = scenario.in_window[f"req-{i}"]
        rows.append({"request_id": b.request_id, "prompt_tokens": b.prompt, "completion_tokens": b.completion,
                     "total_tokens": b.total})
    b12 = scenario.in_window["req-12"]
    rows.append({"request_id": "req-12", "total_tokens": b12.total + 10})  # only the total is given
    b13 = scenario.in_window["req-13"]
    rows.append({"request_id": "req-13", "prompt_tokens": b13.prompt + 1, "completion_tokens": b13.completion - 1,
                 "total_tokens": b13.total})  # same total, another split
    rows.append({"request_id": "req-upstream-only", "prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150})
    e = scenario.early
    rows.append({"request_id": e.request_id, "prompt_tokens": e.prompt, "completion_tokens": e.completion,
                 "total_tokens": e.total})
    return rows


def as_csv(rows: list[dict[str, Any]]) -> bytes:
    lines = ["request_id,prompt_tokens,completion_tokens,total_tokens"]
    for r in rows:
        lines.append(",".join(str(r.get(c, "")) for c in ("request_id", "prompt_tokens", "completion_tokens",
                                                           "total_tokens")))
    return ("\r\n".join(lines) + "\r\n").encode()


def as_jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


async def post_diff(scenario: Scenario, body: bytes, headers: dict, settings: Settings | None = None, **params):
    query = {"from": iso(scenario.day), "to": iso(scenario.day + timedelta(days=1)), **params}
    async with metering_client(settings or scenario.settings, scenario.url) as client:
        return await client.post("/v1/reconciliation/diff", params=query, headers={**BILLING, **headers}, content=body)


def check_diff(scenario: Scenario, body: dict) -> None:
    booked = scenario.in_window
    extra = [booked[f"req-{i}"] for i in range(14, 20)]
    b12, b13, e = booked["req-12"], booked["req-13"], scenario.early
    assert body["upstream"] == {"records": 16, "total_tokens": sum(r["total_tokens"] for r in upstream_rows(scenario))}
    assert body["ledger"] == {"records": 20, "entries": 20, "total_tokens": sum(b.total for b in booked.values())}
    assert body["matched"] == 12

    assert body["missing"]["count"] == 2
    assert body["missing"]["upstream_total_tokens"] == 150 + e.total
    assert [(i["request_id"], i["line"]) for i in body["missing"]["items"]] == [("req-upstream-only", 16),
                                                                                   ("req-early", 17)]
    assert body["missing"]["items"][0]["upstream"] == {"prompt_tokens": 100, "completion_tokens": 50,
                                                       "total_tokens": 150}

    assert body["extra"]["count"] == 6
    assert body["extra"]["ledger_total_tokens"] == sum(b.total for b in extra)
    assert [i["request_id"] for i in body["extra"]["items"]] == [b.request_id for b in extra]  # by event time
    assert body["extra"]["items"][0]["ledger"] == {"prompt_tokens": extra[0].prompt,
                                                   "completion_tokens": extra[0].completion,
                                                   "total_tokens": extra[0].total}
    assert body["extra"]["items"][0]["entries"] == 1

    different = body["different"]
    assert different["count"] == 2
    assert different["upstream_total_tokens"] == b12.total + 10 + b13.total
    assert different["ledger_total_tokens"] == b12.total + b13.total
    first, second = different["items"]
    assert (first["request_id"], first["line"], first["fields"]) == ("req-12", 14, ["total_tokens"])
    assert first["upstream"] == {"prompt_tokens": None, "completion_tokens": None, "total_tokens": b12.total + 10}
    assert first["ledger"] == {"prompt_tokens": b12.prompt, "completion_tokens": b12.completion,
                               "total_tokens": b12.total}
    assert (second["request_id"], second["fields"]) == ("req-13", ["prompt_tokens", "completion_tokens"])
    assert second["upstream"]["total_tokens"] == second["ledger"]["total_tokens"] == b13.total
    for section in ("missing", "extra", "different"):
        assert body[section]["truncated"] is False


async def test_csv_diff_finds_missing_extra_and_different(scenario: Scenario) -> None:
    r = await post_diff(scenario, as_csv(upstream_rows(scenario)), {"Content-Type": "text/csv; charset=utf-8"})
    assert r.status_code == 200, r.text
    check_diff(scenario, r.json())


async def test_json_lines_diff_gives_the_same_answer(scenario: Scenario) -> None:
    rows = upstream_rows(scenario)
    r = await post_diff(scenario, b"\n" + as_jsonl(rows), {"Content-Type": "application/jsonl"})  # line 1 blank
    assert r.status_code == 200, r.text
    check_diff(scenario, r.json())


async def test_csv_columns_may_come_in_any_order_and_only_total_is_needed(scenario: Scenario) -> None:
    b = scenario.in_window["req-3"]
    body = f"\ufefftotal_tokens,request_id\n{b.total},{b.request_id}\n".encode()  # with a byte-order mark
    r = await post_diff(scenario, body, CSV)
    assert r.status_code == 200, r.text
    assert (r.json()["matched"], r.json()["missing"]["count"], r.json()["extra"]["count"]) == (1, 0, 19)


async def test_limit_cuts_the_lists_not_the_counts(scenario: Scenario) -> None:
    r = await post_diff(scenario, as_jsonl(upstream_rows(scenario)), JSONL, limit=1)
    assert r.status_code == 200, r.text
    extra = r.json()["extra"]
    assert (extra["count"], len(extra["items"]), extra["truncated"]) == (6, 1, True)


async def test_an_upload_of_many_batches_is_compared_whole(scenario: Scenario) -> None:
    lines = ["request_id,total_tokens"] + [f"up-{i:05d},{i}" for i in range(12_000)]
    r = await post_diff(scenario, ("\n".join(lines) + "\n").encode(), CSV)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["upstream"] == {"records": 12_000, "total_tokens": sum(range(12_000))}
    assert (body["missing"]["count"], body["missing"]["upstream_total_tokens"]) == (12_000, sum(range(12_000)))
    assert (len(body["missing"]["items"]), body["missing"]["truncated"]) == (100, True)
    assert body["missing"]["items"][0] == {"request_id": "up-00000", "line": 2,
                                           "upstream": {"prompt_tokens": None, "completion_tokens": None,
                                                        "total_tokens": 0}}
    assert body["extra"]["count"] == 20


@pytest.mark.parametrize(
    ("body", "headers", "fragment"),
    [
        (b"request_id,total_tokens\nreq-1,28\nreq-2,abc\n", CSV, "line 3: total_tokens: 'abc' is not a whole number"),
        (b"request_id,total_tokens\nreq-1,-5\n", CSV, "line 2: total_tokens: '-5' is not a whole number"),
        (b"request_id,total_tokens\nreq-1,28,9\n", CSV, "line 2: has 3 fields"),
        (b"request_id,total_tokens\n,28\n", CSV, "line 2: request_id: is required"),
        (b"request_id,total_tokens\nreq-1,\n", CSV, "line 2: total_tokens: is required"),
        (b"request_id,prompt_tokens,completion_tokens,total_tokens\nr,1,2,4\n", CSV,
         "line 2: total_tokens: 4 is not prompt_tokens + completion_tokens (3)"),
        (b"request_id,tokens\nreq-1,28\n", CSV, "line 1: header: column 'tokens' is not known"),
        (b"request_id,prompt_tokens\nreq-1,28\n", CSV, "line 1: header: column total_tokens is required"),
        (b"request_id,total_tokens\nreq-1,1\nreq-2,2\nreq-1,3\n", CSV, "line 4: request_id 'req-1' repeats line 2"),
        (b"request_id,total_tokens\n\"req-1,28\n", CSV, "line 2: not a CSV line"),
        (b"request_id,total_tokens\nr\xe9q,28\n", CSV, "line 2: not UTF-8 text"),
        (b"", CSV, "body: empty"),
        (b'{"request_id": "a", "total_tokens": 1}\n{"request_id": "b", "total_tokens": 1.5}\n', JSONL,
         "line 2: total_tokens: must be a JSON integer"),
        (b'{"request_id": "a", "total_tokens": 1}\n\n{"request_id": "b", "total_tokens": true}\n', JSONL,
         "line 3: total_tokens: must be a JSON integer"),
        (b'{"request_id": "a", "total_tokens": 1}\nnot json\n', JSONL, "line 2: not a JSON object"),
        (b'["a", 1]\n', JSONL, "line 1: must be a JSON object"),
        (b'{"request_id": 7, "total_tokens": 1}\n', JSONL, "line 1: request_id: must be a string"),
        (b'{"request_id": "a"}\n', JSONL, "line 1: total_tokens: is required"),
        (b'{"request_id": "a", "total_tokens": 1, "model": "m"}\n', JSONL, "line 1: model: is not a known field"),
        (b'{"request_id": "a\\u0000b", "total_tokens": 1}\n', JSONL, "line 1: request_id: must not contain control"),
        (b'{"request_id": "a\\ud800", "total_tokens": 1}\n', JSONL, "line 1: request_id: must be valid Unicode"),
        (b"[" * 100_000 + b"\n", JSONL, "line 1: not a JSON object"),
        (b'{"request_id": "a", "total_tokens": NaN}\n', JSONL, "line 1: not a JSON object"),
        (b'{"request_id": "a", "total_tokens": 10000000000000}\n', JSONL,
         "line 1: total_tokens: 10000000000000 is above"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
async def test_a_bad_upload_is_400_naming_the_line_and_field(scenario: Scenario, body, headers, fragment) -> None:
    r = await post_diff(scenario, body, headers)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["msg"], r.json()["msg"]
    assert set(r.json()) == {"code", "msg", "error"}


async def test_a_repeat_in_a_later_batch_names_both_lines(scenario: Scenario) -> None:
    lines = ["request_id,total_tokens"] + [f"up-{i:05d},1" for i in range(11_000)] + ["up-00000,1"]
    r = await post_diff(scenario, ("\n".join(lines) + "\n").encode(), CSV)
    assert r.status_code == 400, r.text
    assert "line 11002: request_id 'up-00000' repeats line 2" in r.json()["msg"]


async def test_an_oversize_upload_is_413(scenario: Scenario) -> None:
    small = metering_settings(scenario.url, scenario.settings.kafka_bootstrap_servers,
                              {"usage_topic": scenario.settings.usage_topic}, max_request_bytes=2048)
    body = as_csv([{"request_id": f"req-{i:06d}", "total_tokens": i} for i in range(200)])
    assert len(body) > 2048
    r = await post_diff(scenario, body, CSV, settings=small)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    assert "2048 bytes" in r.json()["msg"]


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain", "text/csv; charset=latin-1"])
async def test_an_upload_in_another_format_is_415(scenario: Scenario, content_type) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = await post_diff(scenario, b"request_id,total_tokens\n", headers)
    assert r.status_code == 415, r.text
    assert "text/csv" in r.json()["msg"]


async def test_the_diff_validates_its_window_and_limit(scenario: Scenario) -> None:
    r = await post_diff(scenario, b"request_id,total_tokens\n", CSV, limit=0)
    assert r.status_code == 400 and "query.limit" in r.json()["msg"]
    r = await post_diff(scenario, b"request_id,total_tokens\n", CSV, limit=10**6)
    assert r.status_code == 400 and "query.limit" in r.json()["msg"]
    r = await post_diff(scenario, b"request_id,total_tokens\n", CSV, to="yesterday")
    assert r.status_code == 400 and "query.to" in r.json()["msg"]


# --- the migration ---------------------------------------------------------------------------


def test_migration_0002_downgrades_and_upgrades_again(database_url: str) -> None:
    def tables() -> set[str]:
        return {r[0] for r in seed.rows(database_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}

    def dead_letter_columns() -> set[str]:
        return {r[0] for r in seed.rows(
            database_url, "SELECT column_name FROM information_schema.columns WHERE table_name = 'dead_letters'")}

    assert {"ingest_stats_daily", "dead_letter_replays"} <= tables()
    config = alembic_config(database_url)
    command.downgrade(config, "20261122_0001")
    assert not {"ingest_stats_daily", "dead_letter_replays"} & tables()
    assert "message_key" not in dead_letter_columns()
    command.upgrade(config, "head")
    assert {"ingest_stats_daily", "dead_letter_replays"} <= tables()
    assert "message_key" in dead_letter_columns()


def test_replay_records_are_append_only(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO dead_letters (dead_letter_id, reason, detail, topic, topic_partition, kafka_offset, payload)"
            " VALUES ('dlq_1', 'unknown_key', 'd', 't', 0, 0, 'x')"
        )
        conn.execute("INSERT INTO dead_letter_replays (dead_letter_id, topic) VALUES ('dlq_1', 't')")
        with pytest.raises(psycopg.errors.RestrictViolation, match="append-only"):
            conn.execute("DELETE FROM dead_letter_replays")
