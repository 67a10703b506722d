"""The ledger export: its columns, in a stable order, and the CSV, JSONL and Parquet encoders.

One implementation for ``GET /v1/exports/ledger`` and ``tollhouse export``: both iterate
``export_ledger``. PostgreSQL formats every value and streams the rows with COPY
(``services.metering.store.exports``); this module only adapts those bytes to the
documented formats (CRLF line ends for CSV, COPY's backslash escaping undone for JSONL,
Parquet row groups parsed from the CSV by pyarrow), chunk by chunk, so memory stays
constant however many rows there are and no Python object is built per row. The columns
are documented in docs/exports.md; new columns are only ever added at the end.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from services.metering.domain.periods import zone
from services.metering.store.billing import LedgerQuery
from services.metering.store.exports import EXPORT_SQL, ledger_export_snapshot

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


if tuple(EXPORT_SQL) != EXPORT_COLUMN_NAMES:  # the store's SQL and the documented columns must agree
    raise RuntimeError("services.metering.store.exports.EXPORT_SQL does not list the export's columns in order")

# Parquet: rows per row group (and per progress step), and how much CSV is parsed at once.
# Together they bound an export's memory: one block of CSV being parsed, one being read,
# and at most one row group of Arrow data waiting to be written.
PARQUET_ROW_GROUP_ROWS = 65_536
PARQUET_BLOCK_BYTES = 8 << 20


class CsvRecords:
    """PostgreSQL's CSV → the export's: LF record ends become CRLF, and records are counted.

    A line feed ends a record only outside quotes (a quoted field keeps its own line breaks
    as they are), so the quote state is carried from chunk to chunk. Quotes are rare in the
    ledger (a field is quoted only for a comma, quote or line break), so most chunks take
    the fast path.
    """

    def __init__(self) -> None:
        self._quoted = False

    def convert(self, chunk: bytes) -> tuple[bytes, int]:
        """The chunk with CRLF record ends, and how many records ended in it."""
        if not self._quoted and b'"' not in chunk:
            return chunk.replace(b"\n", b"\r\n"), chunk.count(b"\n")
        parts = chunk.split(b'"')
        records = 0
        for i in range(1 if self._quoted else 0, len(parts), 2):  # the parts outside quotes
            records += parts[i].count(b"\n")
            parts[i] = parts[i].replace(b"\n", b"\r\n")
        if len(parts) % 2 == 0:  # an odd number of quotes: the state flips
            self._quoted = not self._quoted
        return b'"'.join(parts), records

    def track(self, chunk: bytes) -> None:
        """Only follow the quote state (what ``convert`` does, without converting)."""
        if chunk.count(b'"') % 2:
            self._quoted = not self._quoted

    @property
    def at_record_end(self) -> bool:
        """Outside quotes: a line feed here ended a record."""
        return not self._quoted


class TextCopyLines:
    """COPY's text format → the lines themselves: every backslash was doubled; undo that.

    The lines are JSON, which has no raw tab, CR or LF, so a doubled backslash is the only
    escape COPY wrote. A chunk that ends inside a pair keeps its last byte for the next.
    """

    def __init__(self) -> None:
        self._carry = b""

    def convert(self, chunk: bytes) -> tuple[bytes, int]:
        data = self._carry + chunk if self._carry else chunk
        trailing = len(data) - len(data.rstrip(b"\\"))
        if trailing % 2:
            data, self._carry = data[:-1], data[-1:]
        else:
            self._carry = b""
        return data.replace(b"\\\\", b"\\"), data.count(b"\n")


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


class ParquetEncoder:
    """Apache Parquet (snappy) from blocks of the export's CSV, parsed by pyarrow into the
    documented types; row groups of ``row_group_rows``, written as they fill.

    ``encode`` and ``finish`` do the CPU work and release the GIL: call them in a thread.
    """

    def __init__(self, row_group_rows: int = PARQUET_ROW_GROUP_ROWS) -> None:
        import pyarrow as pa  # imported here: only Parquet exports need it
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq

        if row_group_rows <= 0:
            raise ValueError("row_group_rows must be positive")
        self._pa, self._csv = pa, pa_csv
        types = {
            "int64": pa.int64(),
            "string": pa.string(),
            "timestamp": pa.timestamp("us", tz="UTC"),
            "date": pa.date32(),
            "bool": pa.bool_(),
        }
        self.schema = pa.schema([pa.field(c.name, types[c.kind]) for c in EXPORT_COLUMNS])
        self._read = pa_csv.ReadOptions(column_names=list(EXPORT_COLUMN_NAMES), block_size=PARQUET_BLOCK_BYTES)
        self._parse = pa_csv.ParseOptions(newlines_in_values=True)
        # An unquoted empty field is NULL; "" is an empty string (COPY writes them so).
        self._convert = pa_csv.ConvertOptions(
            column_types={f.name: f.type for f in self.schema},
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            true_values=["true"],
            false_values=["false"],
        )
        self._rows_per_group = row_group_rows
        self._pending: list[Any] = []  # tables of fewer than a row group's rows in all
        self._pending_rows = 0
        self._sink = _Drain()
        self._writer = pq.ParquetWriter(pa.PythonFile(self._sink, mode="w"), self.schema, compression="snappy")

    def encode(self, csv_block: bytes) -> tuple[bytes, list[int]]:
        """Parse whole CSV records; write every full row group. → (bytes, rows per group)."""
        table = self._csv.read_csv(
            self._pa.py_buffer(csv_block), read_options=self._read, parse_options=self._parse,
            convert_options=self._convert,
        )
        self._pending.append(table)
        self._pending_rows += table.num_rows
        groups = []
        if self._pending_rows >= self._rows_per_group:
            rows = self._pa.concat_tables(self._pending)
            start = 0
            while rows.num_rows - start >= self._rows_per_group:
                self._writer.write_table(rows.slice(start, self._rows_per_group), row_group_size=self._rows_per_group)
                groups.append(self._rows_per_group)
                start += self._rows_per_group
            rest = rows.slice(start)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        return self._sink.take(), groups

    def finish(self) -> tuple[bytes, list[int]]:
        groups = []
        if self._pending_rows:
            self._writer.write_table(self._pa.concat_tables(self._pending), row_group_size=self._rows_per_group)
            groups.append(self._pending_rows)
            self._pending, self._pending_rows = [], 0
        self._writer.close()
        return self._sink.take(), groups


CSV_HEADER = (",".join(EXPORT_COLUMN_NAMES) + "\r\n").encode()


async def export_ledger(
    engine: AsyncEngine,
    query: LedgerQuery,
    fmt: str,
    *,
    row_group_rows: int = PARQUET_ROW_GROUP_ROWS,
    on_start: Callable[[int], None] | None = None,
    on_rows: Callable[[int], None] | None = None,
) -> AsyncIterator[bytes]:
    """The export as byte chunks. ``on_start(total_rows)`` is called once the snapshot is
    taken, ``on_rows(n)`` as rows are written (progress bars): per chunk for CSV and JSONL,
    per row group for Parquet."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}")
    progress = on_rows or (lambda rows: None)
    async with ledger_export_snapshot(engine, query) as snapshot:
        if on_start is not None:
            on_start(snapshot.rows)
        # aclosing: an export left early (the client went away) closes its COPY at once.
        if fmt == "csv":
            yield CSV_HEADER
            records = CsvRecords()
            async with aclosing(snapshot.csv()) as chunks:
                async for chunk in chunks:
                    data, rows = records.convert(chunk)
                    yield data
                    progress(rows)
        elif fmt == "jsonl":
            lines = TextCopyLines()
            async with aclosing(snapshot.jsonl()) as chunks:
                async for chunk in chunks:
                    data, rows = lines.convert(chunk)
                    yield data
                    progress(rows)
        else:
            async with aclosing(_parquet(snapshot.csv(), ParquetEncoder(row_group_rows), progress)) as chunks:
                async for data in chunks:
                    yield data


async def _parquet(
    csv: AsyncIterator[bytes], encoder: ParquetEncoder, progress: Callable[[int], None]
) -> AsyncIterator[bytes]:
    """Blocks of whole CSV records are parsed and written in a thread while the next block
    is read from the database (one block at a time: they share the writer)."""
    records = CsvRecords()  # only to know where records end
    block: list[bytes] = []
    size = 0
    encoding: asyncio.Future | None = None

    async def written(work: Callable[..., tuple[bytes, list[int]]], *args: Any) -> bytes:
        data, groups = await asyncio.to_thread(work, *args)
        for rows in groups:
            progress(rows)
        return data

    async with aclosing(csv) as chunks:
        async for chunk in chunks:
            records.track(chunk)
            block.append(chunk)
            size += len(chunk)
            if size >= PARQUET_BLOCK_BYTES and records.at_record_end and chunk.endswith(b"\n"):
                if encoding is not None and (data := await encoding):
                    yield data
                encoding = asyncio.ensure_future(written(encoder.encode, b"".join(block)))
                block, size = [], 0
    if encoding is not None and (data := await encoding):
        yield data
    if block and (data := await written(encoder.encode, b"".join(block))):
        yield data
    yield await written(encoder.finish)
