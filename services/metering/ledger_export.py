"""The ledger export: its columns, in a stable order, and the CSV, JSONL and Parquet encoders.

One implementation for ``GET /v1/exports/ledger`` and ``tollhouse export``: both iterate
``export_ledger``, which reads keyset pages of one database snapshot and turns each page
into bytes, so memory stays constant however many rows there are. The columns are
documented in docs/exports.md; new columns are only ever added at the end.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncEngine

from services.contracts.money import format_cny, format_fen
from services.metering.domain.periods import zone
from services.metering.store.billing import LedgerQuery, LedgerRecord
from services.metering.store.exports import EXPORT_PAGE_ROWS, ledger_export_snapshot

EXPORT_FORMATS = ("csv", "jsonl", "parquet")
MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}


def format_instant(moment: datetime, tz: str | None = None) -> str:
    """RFC 3339 with microseconds: ``…Z`` in UTC, or with the offset of zone ``tz``."""
    if tz is None:
        return moment.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return moment.astimezone(zone(tz)).isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: str  # int64 | string | timestamp | date | bool: the Parquet type (timestamp is us, UTC)


EXPORT_COLUMNS: tuple[Column, ...] = tuple(
    Column(name, kind)
    for name, kind in (
        ("entry_id", "int64"),
        ("entry_type", "string"),
        ("account_id", "string"),
        ("key_id", "string"),
        ("model", "string"),
        ("event_time_utc", "timestamp"),
        ("event_time_local", "string"),
        ("local_day", "date"),
        ("request_id", "string"),
        ("event_id", "string"),
        ("kind", "string"),
        ("status", "string"),
        ("inputs", "int64"),
        ("prompt_tokens", "int64"),
        ("completion_tokens", "int64"),
        ("cached_tokens", "int64"),
        ("reasoning_tokens", "int64"),
        ("total_tokens", "int64"),
        ("package_tokens", "int64"),
        ("overage_tokens", "int64"),
        ("charge_nano", "int64"),
        ("charge_cny", "string"),
        ("price_id", "int64"),
        ("source", "string"),
        # Added after the first 24, for finance: the rounded charge, and what moves the balance.
        ("charge_fen", "string"),
        ("overage_charge_nano", "int64"),
        ("balance_delta_nano", "int64"),
        ("balance_delta_cny", "string"),
        ("package_id", "string"),
        ("reference", "string"),
        ("usage_estimated", "bool"),
        ("reverses_entry_id", "int64"),
    )
)
EXPORT_COLUMN_NAMES = tuple(c.name for c in EXPORT_COLUMNS)


def export_values(r: LedgerRecord) -> tuple[Any, ...]:
    """One row's typed values (int, str, datetime, date, bool or None), in EXPORT_COLUMNS order.

    Written out rather than generated from the column list: it runs once per exported row.
    """
    return (
        r.entry_id, r.entry_type, r.account_id, r.key_id, r.model,
        r.event_time, format_instant(r.event_time, r.timezone), r.local_day,
        r.request_id, r.event_id, r.kind, r.status,
        r.inputs, r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.reasoning_tokens, r.total_tokens,
        r.package_tokens, r.overage_tokens,
        r.charge, format_cny(r.charge), r.price_id, r.source,
        format_fen(r.charge), r.overage_charge, r.balance_delta, format_cny(r.balance_delta),
        r.package_id, r.reference, r.usage_estimated, r.reverses_entry_id,
    )  # fmt: skip


_BOOL_TEXT = {True: "true", False: "false"}
# The columns CSV and JSON cannot carry as they are; everything else is written unchanged.
_TEXT_CONVERSIONS = {"timestamp": format_instant, "date": date.isoformat}


def _conversions(kinds: dict[str, Callable[[Any], Any]]) -> tuple[tuple[int, Callable[[Any], Any]], ...]:
    return tuple((i, kinds[c.kind]) for i, c in enumerate(EXPORT_COLUMNS) if c.kind in kinds)


_CSV_CONVERSIONS = _conversions({**_TEXT_CONVERSIONS, "bool": _BOOL_TEXT.__getitem__})
_JSON_CONVERSIONS = _conversions(_TEXT_CONVERSIONS)


def _converted(records: list[LedgerRecord], conversions: tuple[tuple[int, Callable[[Any], Any]], ...]) -> list:
    rows = []
    for record in records:
        row = list(export_values(record))
        for i, convert in conversions:
            if row[i] is not None:
                row[i] = convert(row[i])
        rows.append(row)
    return rows


class _Encoder:
    def start(self) -> bytes:
        return b""

    def page(self, records: list[LedgerRecord]) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""


class CsvEncoder(_Encoder):
    """RFC 4180: UTF-8, CRLF, a header row; NULL is an empty field, booleans true/false."""

    def _lines(self, rows: list) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\r\n").writerows(rows)  # None is written as an empty field
        return buffer.getvalue().encode("utf-8")

    def start(self) -> bytes:
        return self._lines([EXPORT_COLUMN_NAMES])

    def page(self, records: list[LedgerRecord]) -> bytes:
        return self._lines(_converted(records, _CSV_CONVERSIONS))


class JsonlEncoder(_Encoder):
    """One JSON object per line, keys in column order; NULL is null, integers are numbers."""

    def __init__(self) -> None:
        self._encode = msgspec.json.Encoder().encode

    def page(self, records: list[LedgerRecord]) -> bytes:
        names = EXPORT_COLUMN_NAMES
        return b"".join(
            self._encode(dict(zip(names, row))) + b"\n" for row in _converted(records, _JSON_CONVERSIONS)
        )


class _Drain:
    """A write-only file for ParquetWriter whose bytes are taken out after each row group."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._position = 0
        self.closed = False

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._chunks.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


class ParquetEncoder(_Encoder):
    """Apache Parquet (snappy), one row group per page, written as it streams."""

    def __init__(self) -> None:
        import pyarrow as pa  # imported here: only Parquet exports need it
        import pyarrow.parquet as pq

        self._pa = pa
        types = {
            "int64": pa.int64(),
            "string": pa.string(),
            "timestamp": pa.timestamp("us", tz="UTC"),
            "date": pa.date32(),
            "bool": pa.bool_(),
        }
        self._schema = pa.schema([pa.field(c.name, types[c.kind]) for c in EXPORT_COLUMNS])
        self._sink = _Drain()
        self._writer = pq.ParquetWriter(pa.PythonFile(self._sink, mode="w"), self._schema, compression="snappy")

    def page(self, records: list[LedgerRecord]) -> bytes:
        columns = zip(*map(export_values, records))  # rows → columns, in C
        batch = self._pa.record_batch(
            [self._pa.array(values, type=field.type) for values, field in zip(columns, self._schema)],
            schema=self._schema,
        )
        self._writer.write_batch(batch)
        return self._sink.take()

    def finish(self) -> bytes:
        self._writer.close()
        return self._sink.take()


ENCODERS: dict[str, Callable[[], _Encoder]] = {
    "csv": CsvEncoder,
    "jsonl": JsonlEncoder,
    "parquet": ParquetEncoder,
}


async def export_ledger(
    engine: AsyncEngine,
    query: LedgerQuery,
    fmt: str,
    *,
    page_rows: int = EXPORT_PAGE_ROWS,
    on_start: Callable[[int], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> AsyncIterator[bytes]:
    """The export as byte chunks, page by page. ``on_start(total_rows)`` is called once the
    snapshot is taken, ``on_rows(n)`` after each page (progress bars)."""
    encoder = ENCODERS[fmt]()
    async with ledger_export_snapshot(engine, query) as snapshot:
        if on_start is not None:
            on_start(snapshot.rows)
        head = encoder.start()
        if head:
            yield head
        async for records in snapshot.pages(page_rows):
            yield encoder.page(records)
            if on_rows is not None:
                on_rows(len(records))
    tail = encoder.finish()
    if tail:
        yield tail
