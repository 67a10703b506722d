"""The ledger export (``GET /v1/exports/ledger`` and ``tollhouse export``): the same rows as
``GET /v1/ledger`` in every format, the documented columns in their stable order, streamed
in pages, and the same bytes from the command line as over HTTP.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import random
import re
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services import cli
from services.contracts.events import build_usage_event
from services.contracts.money import format_cny, format_fen
from services.metering.api.app import create_app
from services.metering.consumer.expiry import sweep_package_expiries
from services.metering.ledger_export import EXPORT_COLUMN_NAMES, EXPORT_FORMATS, export_ledger
from services.metering.store import exports as store_exports
from services.metering.store.billing import LedgerQuery
from services.metering.store.db import make_engine
from tests.support import seed
from tests.support.booking import NANO, book, fen, seed_prices
from tests.support.kafka import metering_settings

UTC = timezone.utc
REPO = Path(__file__).resolve().parents[2]
BILLING = {"Authorization": "Bearer billing-token"}
ADMIN = {"Authorization": "Bearer admin-token"}
GATEWAY = {"Authorization": "Bearer gateway-token"}

# The columns the brief fixed, in this order; later columns may only be appended.
FIRST_COLUMNS = (
    "entry_id", "entry_type", "account_id", "key_id", "model", "event_time_utc", "event_time_local", "local_day",
    "request_id", "event_id", "kind", "status", "inputs", "prompt_tokens", "completion_tokens", "cached_tokens",
    "reasoning_tokens", "total_tokens", "package_tokens", "overage_tokens", "charge_nano", "charge_cny",
    "price_id", "source",
)
INT_COLUMNS = {
    "entry_id", "inputs", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
    "total_tokens", "package_tokens", "overage_tokens", "charge_nano", "price_id", "overage_charge_nano",
    "balance_delta_nano", "reverses_entry_id",
}
NOVEMBER = {"from": "2026-11-01T00:00:00+08:00", "to": "2026-12-01T00:00:00+08:00"}


@pytest.fixture
def settings(database_url: str, broker, topic_names: dict[str, str]):
    return metering_settings(database_url, broker.bootstrap_servers, topic_names, topic_partitions=1)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(database_url, pool_size=4)
    yield eng
    await eng.dispose()


@pytest.fixture
async def client(settings, engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


async def book_ledger(settings, url: str) -> None:
    """Every entry type: top-ups, a package grant, PAYG and package usage, a package expiry."""
    seed_prices(url)
    seed.create_account(url, "acc_sh", "Asia/Shanghai")
    seed.create_account(url, "acc_ny", "America/New_York")
    seed.topup(url, "acc_sh", 3 * NANO, "inv-1")
    seed.topup(url, "acc_ny", NANO, "inv-1")
    seed.create_package(url, "acc_sh", "pkg_sh", 20_000, datetime(2026, 11, 1, tzinfo=UTC),
                        datetime(2026, 11, 10, tzinfo=UTC))
    seed.create_key(url, "key_sh", "acc_sh", "payg")
    seed.create_key(url, "key_pkg", "acc_sh", "package", package_id="pkg_sh")
    seed.create_key(url, "key_ny", "acc_ny", "payg")
    rng = random.Random(5)
    events = []
    for i in range(60):
        key = ("key_sh", "key_pkg", "key_ny")[i % 3]
        prompt, completion = rng.randint(1, 4000), rng.randint(0, 2000)
        events.append(build_usage_event(
            account_id="acc_ny" if key == "key_ny" else "acc_sh", key_id=key, model=rng.choice(["chat-s", "chat-l"]),
            prompt_tokens=prompt, completion_tokens=completion, cached_tokens=rng.randint(0, prompt),
            reasoning_tokens=rng.randint(0, completion), request_id=f"req,\"{i}\"\n", inputs=rng.randint(1, 4),
            time=datetime(2026, 10, 31, 12, tzinfo=UTC) + timedelta(hours=7 * i), kind=rng.choice(["request", "batch"]),
            status=rng.choice(["ok", "ok", "error", "cancelled"]), usage_estimated=rng.random() < 0.2,
            source=f"gateway/gw-{i % 2}",
        ))
    await book(settings, url, events)
    conn = await asyncpg.connect(url)
    try:
        assert await sweep_package_expiries(conn, datetime.now(UTC), timedelta(hours=1), "unused") == 1
    finally:
        await conn.close()


async def ledger_rows(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    rows, cursor = [], None
    while True:
        r = await client.get("/v1/ledger", params={**params, "limit": 17, **({"cursor": cursor} if cursor else {})},
                             headers=BILLING)
        assert r.status_code == 200, r.text
        rows += r.json()["data"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return rows


def as_export(row: dict[str, Any]) -> dict[str, Any]:
    """What the export must say for one ``GET /v1/ledger`` row."""
    charge = int(Decimal(row["charge"]) * NANO)
    return {
        "entry_id": row["entry_id"], "entry_type": row["entry_type"], "account_id": row["account_id"],
        "key_id": row["key_id"], "model": row["model"], "event_time_utc": row["event_time"],
        "event_time_local": row["event_time_local"], "local_day": row["local_day"],
        "request_id": row["request_id"], "event_id": row["event_id"], "kind": row["kind"], "status": row["status"],
        "inputs": row["inputs"], "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"], "cached_tokens": row["cached_tokens"],
        "reasoning_tokens": row["reasoning_tokens"], "total_tokens": row["total_tokens"],
        "package_tokens": row["package_tokens"], "overage_tokens": row["overage_tokens"],
        "charge_nano": charge, "charge_cny": row["charge"], "price_id": row["price_id"], "source": row["source"],
        "charge_fen": fen(charge), "overage_charge_nano": int(Decimal(row["overage_charge"]) * NANO),
        "balance_delta_nano": int(Decimal(row["balance_delta"]) * NANO), "balance_delta_cny": row["balance_delta"],
        "package_id": row["package_id"], "reference": row["reference"], "usage_estimated": row["usage_estimated"],
        "reverses_entry_id": row["reverses_entry_id"],
    }


def parse_csv(body: bytes) -> list[dict[str, Any]]:
    reader = csv.reader(io.StringIO(body.decode("utf-8"), newline=""))
    header = next(reader)
    assert tuple(header) == EXPORT_COLUMN_NAMES
    out = []
    for values in reader:
        row: dict[str, Any] = {}
        for name, text in zip(header, values, strict=True):
            if text == "":
                row[name] = None
            elif name in INT_COLUMNS:
                row[name] = int(text)
            elif name == "usage_estimated":
                row[name] = {"true": True, "false": False}[text]
            else:
                row[name] = text
        out.append(row)
    return out


def parse_jsonl(body: bytes) -> list[dict[str, Any]]:
    lines = body.decode("utf-8").split("\n")  # not splitlines(): U+2028 and U+0085 may be in a value
    assert lines.pop() == ""
    rows = [json.loads(line) for line in lines]
    assert all(tuple(r) == EXPORT_COLUMN_NAMES for r in rows)
    return rows


def parse_parquet(body: bytes) -> list[dict[str, Any]]:
    table = pq.read_table(io.BytesIO(body))
    assert tuple(table.column_names) == EXPORT_COLUMN_NAMES
    rows = table.to_pylist()
    for row in rows:
        row["event_time_utc"] = row["event_time_utc"].astimezone(UTC).isoformat(timespec="microseconds").replace(
            "+00:00", "Z")
        row["local_day"] = row["local_day"].isoformat()
    return rows


PARSERS = {"csv": parse_csv, "jsonl": parse_jsonl, "parquet": parse_parquet}


async def export(client: httpx.AsyncClient, fmt: str, **params: Any) -> httpx.Response:
    r = await client.get("/v1/exports/ledger", params={**params, "format": fmt}, headers=BILLING)
    assert r.status_code == 200, r.text
    return r


# Rows


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
async def test_export_rows_equal_the_ledger_api_rows_for_the_same_filter(settings, database_url, client, fmt):
    await book_ledger(settings, database_url)
    window = {"account_id": "acc_sh", "from": "2026-11-03T00:00:00+08:00", "to": "2026-11-12T00:00:00Z"}
    expected = [as_export(r) for r in await ledger_rows(client, **window)]
    everything = await ledger_rows(client, account_id="acc_sh")
    # The window leaves entries out at both ends (top-ups and the grant were booked today).
    assert any(r["event_time"] < "2026-11-02T16:00:00Z" for r in everything)
    assert any(r["event_time"] >= "2026-11-12T00:00:00Z" and r["entry_type"] == "usage" for r in everything)
    assert all("2026-11-02T16:00:00Z" <= r["event_time_utc"] < "2026-11-12T00:00:00Z" for r in expected)
    assert {r["entry_type"] for r in expected} == {"usage", "package_expiry"}
    r = await export(client, fmt, **window)
    assert r.headers["content-type"].startswith({"csv": "text/csv", "jsonl": "application/x-ndjson",
                                                 "parquet": "application/vnd.apache.parquet"}[fmt])
    assert f'.{fmt}"' in r.headers["content-disposition"]
    assert PARSERS[fmt](r.content) == expected


async def test_export_without_an_account_has_every_accounts_entries_in_entry_order(settings, database_url, client):
    await book_ledger(settings, database_url)
    expected = [as_export(r) for a in ("acc_sh", "acc_ny") for r in await ledger_rows(client, account_id=a, **NOVEMBER)]
    expected.sort(key=lambda r: r["entry_id"])
    rows = parse_jsonl((await export(client, "jsonl", **NOVEMBER)).content)
    assert rows == expected
    assert {r["account_id"] for r in rows} == {"acc_sh", "acc_ny"}
    ny = [r for r in rows if r["account_id"] == "acc_ny"]
    assert all(r["event_time_local"][-6:] in ("-04:00", "-05:00") for r in ny)  # DST ends on 1 Nov in New York
    assert {r["event_time_local"][-6:] for r in ny} == {"-04:00", "-05:00"}


async def test_empty_export_is_a_valid_file_in_every_format(database_url, client):
    seed.create_account(database_url, "acc_sh", "Asia/Shanghai")
    params = {"account_id": "acc_sh", **NOVEMBER}
    assert (await export(client, "csv", **params)).content == (",".join(EXPORT_COLUMN_NAMES) + "\r\n").encode()
    assert (await export(client, "jsonl", **params)).content == b""
    table = pq.read_table(io.BytesIO((await export(client, "parquet", **params)).content))
    assert table.num_rows == 0 and tuple(table.column_names) == EXPORT_COLUMN_NAMES


# Columns


def documented_columns() -> list[tuple[str, str]]:
    """(name, parquet type) of each row of the column table in docs/exports.md."""
    text = (REPO / "docs" / "exports.md").read_text()
    return re.findall(r"^\| *\d+ *\| *`([a-z_]+)` *\| *`([^`]+)` *\|", text, re.MULTILINE)


def test_columns_are_in_the_documented_stable_order():
    assert EXPORT_COLUMN_NAMES[: len(FIRST_COLUMNS)] == FIRST_COLUMNS
    assert tuple(name for name, _ in documented_columns()) == EXPORT_COLUMN_NAMES


async def test_parquet_columns_have_the_documented_types(settings, database_url, client):
    await book_ledger(settings, database_url)
    schema = pq.read_schema(io.BytesIO((await export(client, "parquet", **NOVEMBER)).content))
    assert [(f.name, str(f.type)) for f in schema] == documented_columns()
    assert schema.field("event_time_utc").type == pa.timestamp("us", tz="UTC")
    assert schema.field("local_day").type == pa.date32()
    assert schema.field("charge_nano").type == pa.int64()


# Values: PostgreSQL formats them; they must read exactly as Tollhouse's Python formatting.

# Awkward values for every text column the database formats: signs, half-fen ties, zones
# with half- and quarter-hour offsets and one in seconds (Monrovia until 1972), DST edges,
# whole seconds, the ends of the queryable years, and strings that CSV must quote or JSON
# must escape.
EDGE_CHARGES = (0, 1, 4_999_999, 5_000_000, 5_000_001, 15_000_000, 25_000_000, 999_999_999, 10**9,
                12_345_678_901_234, 9_223_372_036_854_775_807, -1, -5_000_000, -15_000_000, -25_000_001)
EDGE_ZONES = ("Asia/Shanghai", "America/St_Johns", "Asia/Kathmandu", "Pacific/Chatham", "UTC", "America/Caracas",
              "Europe/Dublin", "Africa/Monrovia", "America/Sao_Paulo")
EDGE_TIMES = (datetime(2026, 11, 22, 10, 0, tzinfo=UTC), datetime(2026, 3, 8, 6, 59, 59, 999999, tzinfo=UTC),
              datetime(2026, 3, 8, 7, 0, 0, 1, tzinfo=UTC), datetime(1971, 6, 1, 0, 0, 0, 500000, tzinfo=UTC),
              datetime(1970, 1, 1, tzinfo=UTC), datetime(1972, 5, 1, 0, 44, 29, tzinfo=UTC),
              datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC), datetime(2998, 12, 31, 23, 59, 59, 999999, tzinfo=UTC))
EDGE_TEXTS = ("plain", "comma,inside", 'quote"inside', "line\nbreak", "cr\rreturn", "tab\there", "back\\slash",
              "ctl\x01\x1f\x7f", "é ✓ 中文 \u2028 😀", '\\"\\n', " leading space", "trailing space ")


def insert_edge_entries(url: str) -> None:
    """Ledger rows written directly (the ledger takes inserts), one per combination."""
    rows = []
    for i, charge in enumerate(EDGE_CHARGES):
        for j, tz in enumerate(EDGE_ZONES):
            moment = EDGE_TIMES[(i + j) % len(EDGE_TIMES)]
            text = EDGE_TEXTS[(i * 3 + j) % len(EDGE_TEXTS)]
            rows.append((f"acc_{j}", "usage" if charge >= 0 else "reversal", f"key_{j}", text, text, moment,
                         moment.astimezone(ZoneInfo(tz)).date(), charge, -charge if charge < 2**62 else 0,
                         (i + j) % 2 == 0, None if i % 3 else 7, text if j % 2 else None))
    with psycopg.connect(url) as conn:
        for j, tz in enumerate(EDGE_ZONES):
            conn.execute("INSERT INTO accounts (account_id, name, tier, timezone) VALUES (%s, 'edge', 'free', %s)",
                         (f"acc_{j}", tz))
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO ledger_entries (account_id, entry_type, key_id, request_id, source, event_time, local_day,"
                " charge, balance_delta, usage_estimated, price_id, reference) VALUES"
                " (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [(r[0], *r[1:]) for r in rows])


EVERYTHING = {"from": "1970-01-01T00:00:00Z", "to": "2999-01-01T00:00:00Z"}


async def test_database_formatting_reads_exactly_as_the_python_formatting(database_url, client):
    insert_edge_entries(database_url)
    expected = [as_export(r) for j in range(len(EDGE_ZONES)) for r in await ledger_rows(client, account_id=f"acc_{j}")]
    expected.sort(key=lambda r: r["entry_id"])
    assert len(expected) == len(EDGE_CHARGES) * len(EDGE_ZONES)
    for fmt in EXPORT_FORMATS:
        assert PARSERS[fmt]((await export(client, fmt, **EVERYTHING)).content) == expected, fmt
    # The money columns are Tollhouse's own strings, to the character.
    rows = parse_jsonl((await export(client, "jsonl", **EVERYTHING)).content)
    for row in rows:
        assert row["charge_cny"] == format_cny(row["charge_nano"])
        assert row["charge_fen"] == format_fen(row["charge_nano"])
        assert row["balance_delta_cny"] == format_cny(row["balance_delta_nano"])
    assert "-00:44:30" in {r["event_time_local"][-9:] for r in rows}  # Monrovia's offset until 1972


def python_csv(rows: list[dict[str, Any]]) -> bytes:
    """What the export wrote before the database formatted it: Python's csv module."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(EXPORT_COLUMN_NAMES)
    for row in rows:
        writer.writerow([{True: "true", False: "false"}.get(v, v) if isinstance(v, bool) else v for v in row.values()])
    return out.getvalue().encode()


def python_jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for r in rows)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
async def test_text_formats_are_byte_for_byte_what_python_writes(database_url, client, fmt):
    insert_edge_entries(database_url)
    body = (await export(client, fmt, **EVERYTHING)).content
    expected = (python_csv if fmt == "csv" else python_jsonl)(PARSERS[fmt](body))
    assert body == expected
    if fmt == "csv":  # a line break inside a quoted field is kept as it is; records end in CRLF
        assert b'"line\nbreak"' in body and b'"cr\rreturn"' in body
        assert body.count(b"\r\n") == len(EDGE_CHARGES) * len(EDGE_ZONES) + 1


# Streaming


async def test_export_reads_one_snapshot_taken_before_the_first_row(settings, database_url, engine):
    await book_ledger(settings, database_url)
    query = LedgerQuery(None, datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    for fmt in EXPORT_FORMATS:
        totals: list[int] = []

        def started(total: int) -> None:
            totals.append(total)
            # Booked once the export has begun and before it read a row: not in it.
            seed.topup(database_url, "acc_sh", NANO, f"mid-export-{fmt}")

        written: list[int] = []
        body = b"".join([c async for c in export_ledger(engine, query, fmt, on_start=started, on_rows=written.append)])
        rows = PARSERS[fmt](body)
        assert totals[0] == len(rows) == sum(written) > 60
        assert f"mid-export-{fmt}" not in {r["reference"] for r in rows}
        assert [r["entry_id"] for r in rows] == sorted(r["entry_id"] for r in rows)
    assert seed.scalar(database_url, "SELECT count(*) FROM ledger_entries WHERE reference LIKE 'mid-export%%'") == 3


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
async def test_an_export_made_of_many_slices_on_several_streams_is_the_same(database_url, client, monkeypatch, fmt):
    insert_edge_entries(database_url)
    whole = (await export(client, fmt, **EVERYTHING)).content
    # Slices of a few rows, copied on three connections at once, read back in order.
    monkeypatch.setattr(store_exports, "EXPORT_SLICE_ROWS", 4)
    monkeypatch.setattr(store_exports, "EXPORT_STREAMS", 3)
    sliced = (await export(client, fmt, **EVERYTHING)).content
    rows = PARSERS[fmt](sliced)
    assert rows == PARSERS[fmt](whole) and len(rows) == len(EDGE_CHARGES) * len(EDGE_ZONES)
    if fmt != "parquet":
        assert sliced == whole


async def test_parquet_is_written_in_row_groups_of_the_set_size(settings, database_url, engine):
    await book_ledger(settings, database_url)
    query = LedgerQuery(None, datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    groups: list[int] = []
    body = b"".join([c async for c in export_ledger(engine, query, "parquet", row_group_rows=7,
                                                    on_rows=groups.append)])
    parquet = pq.ParquetFile(io.BytesIO(body))
    total = parquet.metadata.num_rows
    assert groups == [7] * (total // 7) + ([total % 7] if total % 7 else [])
    assert [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)] == groups


async def test_an_export_left_early_ends_its_copy_and_the_next_export_works(database_url, engine):
    seed.create_account(database_url, "acc_big", "Asia/Shanghai")
    with psycopg.connect(database_url) as conn:  # enough rows that the COPY is still running
        conn.execute(
            "INSERT INTO ledger_entries (entry_type, account_id, request_id, event_time, local_day, charge)"
            " SELECT 'usage', 'acc_big', 'req-' || i, timestamptz '2026-11-02T00:00:00Z' + i * interval '1 ms',"
            " date '2026-11-02', i FROM generate_series(1, 200000) i")
    query = LedgerQuery("acc_big", datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    for fmt in EXPORT_FORMATS:
        chunks = aclosing(export_ledger(engine, query, fmt))
        async with chunks as stream:
            async for _ in stream:
                break  # the client went away after the first chunk
        copying = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY%%' AND datname = current_database()"
        for _ in range(50):
            if seed.scalar(database_url, copying) == 0:
                break
            await asyncio.sleep(0.1)
        assert seed.scalar(database_url, copying) == 0, fmt
    rows = parse_jsonl(b"".join([c async for c in export_ledger(engine, query, "jsonl")]))
    assert len(rows) == 200000 and rows[-1]["request_id"] == "req-200000"


# The command line: the same rows, from the same code.


async def run_cli(database_url: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "TOLLHOUSE_DATABASE_URL": database_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "export", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
async def test_cli_export_writes_what_the_http_export_streams(settings, database_url, client, tmp_path, fmt):
    await book_ledger(settings, database_url)
    target = tmp_path / f"ledger.{fmt}"
    code, out, err = await run_cli(database_url, "--from", NOVEMBER["from"], "--to", NOVEMBER["to"],
                                   "--account-id", "acc_sh", "--format", fmt, "--output", str(target))
    assert code == 0, err
    http = (await export(client, fmt, account_id="acc_sh", **NOVEMBER)).content
    rows = PARSERS[fmt](target.read_bytes())
    assert rows == PARSERS[fmt](http)
    if fmt != "parquet":
        assert target.read_bytes() == http
    assert f"exported {len(rows)} ledger entries to {target}" in out
    assert not (tmp_path / f"ledger.{fmt}.partial").exists()


async def test_cli_export_of_an_unknown_account_fails_and_writes_nothing(database_url, tmp_path):
    target = tmp_path / "x.csv"
    code, _, err = await run_cli(database_url, "--from", NOVEMBER["from"], "--to", NOVEMBER["to"],
                                 "--account-id", "acc_missing", "--output", str(target))
    assert code == 1 and "account acc_missing not found" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,needle", [
    (["--from", "yesterday", "--to", "2026-12-01T00:00:00Z"], "--from"),
    (["--from", "2026-11-01T00:00:00Z", "--to", "2026-12-01"], "--to"),
    (["--from", "2026-12-01T00:00:00Z", "--to", "2026-11-01T00:00:00Z"], "is after --to"),
    (["--from", "2026-11-01T00:00:00Z", "--to", "2026-12-01T00:00:00Z", "--account-id", "a b"], "--account-id"),
])
def test_cli_export_refuses_bad_arguments(tmp_path, capsys, args, needle):
    # The subcommand itself, not main(): main() configures process-wide logging.
    parsed = cli.build_parser().parse_args(["export", *args, "--output", str(tmp_path / "x.csv")])
    assert parsed.func(parsed) == 2
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_offers_exactly_the_export_formats(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["export", "--from", "a", "--to", "b", "--output", "x", "--format", "xml"])
    assert exc.value.code == 2
    assert "choose from " + ", ".join(f"'{f}'" for f in EXPORT_FORMATS) in capsys.readouterr().err


# Roles and bad input


@pytest.mark.parametrize("headers,status", [
    (BILLING, 200), (ADMIN, 200), (GATEWAY, 403), ({}, 401), ({"Authorization": "Bearer nope"}, 401),
], ids=["billing", "admin", "gateway", "none", "wrong"])
async def test_export_role_matrix(client, headers, status):
    r = await client.get("/v1/exports/ledger", params=NOVEMBER, headers=headers)
    assert r.status_code == status, r.text
    if status != 200:
        assert set(r.json()) == {"code", "msg", "error"}


@pytest.mark.parametrize("params,status,needle", [
    ({"to": NOVEMBER["to"]}, 400, "query.from: is required"),
    ({"from": NOVEMBER["from"]}, 400, "query.to: is required"),
    ({**NOVEMBER, "from": "2026-11-01"}, 400, "query.from"),
    ({**NOVEMBER, "to": "next week"}, 400, "query.to"),
    ({"from": NOVEMBER["to"], "to": NOVEMBER["from"]}, 400, "query.from: must not be after query.to"),
    ({**NOVEMBER, "format": "xlsx"}, 400, "query.format: 'xlsx'"),
    ({**NOVEMBER, "format": "CSV"}, 400, "query.format"),
    ({**NOVEMBER, "account": "acc_sh"}, 400, "query.account: is not a parameter"),
    ({**NOVEMBER, "account_id": "acc sh"}, 400, "query.account_id"),
    ({**NOVEMBER, "account_id": "acc_missing"}, 404, "account acc_missing not found"),
])
async def test_export_bad_input_is_refused_before_streaming(client, params, status, needle):
    r = await client.get("/v1/exports/ledger", params=params, headers=BILLING)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert needle in r.json()["msg"]



async def test_the_openapi_description_says_from_and_to_are_required(client) -> None:
    operation = (await client.get("/openapi.json")).json()["paths"]["/v1/exports/ledger"]["get"]
    required = {p["name"]: p.get("required", False) for p in operation["parameters"]}
    assert required == {"from": True, "to": True, "account_id": False, "format": False}
