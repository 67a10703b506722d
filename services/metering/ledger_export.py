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
import contextlib
import io
import queue
from concurrent.futures import ThreadPoolExecutor
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

# Parquet: rows per row group (and per progress step). An export holds at most one row
# group of Arrow data waiting to be written.
PARQUET_ROW_GROUP_ROWS = 32_768
# Dictionary-encoded: the columns with few distinct values. Ids, times and amounts are
# nearly unique per row, where a dictionary only costs memory and time.
PARQUET_DICTIONARY_COLUMNS = ["entry_type", "account_id", "key_id", "model", "local_day", "kind", "status",
                              "source", "package_id", "price_id", "usage_estimated"]


class CsvRecords:
    """PostgreSQL's CSV → the export's: LF record ends become CRLF, and records are counted.

    A line feed ends a record only outside quotes (a quoted field keeps its own line breaks
    as they are), so the quote state is carried from chunk to chunk. Quotes are rare in the
    ledger (a field is quoted only for a comma, quote or line break), so most chunks take
    the fast path.
    """

    def __init__(self) -> None:
        self._quoted = False

    def convert(self, chunk: bytes, *, count: bool = True) -> tuple[bytes, int]:
        """The chunk with CRLF record ends, and how many records ended in it. Without
        ``count`` that number may be 0: only quoted chunks, which need the scan anyway, count."""
        if not self._quoted and b'"' not in chunk:
            return chunk.replace(b"\n", b"\r\n"), chunk.count(b"\n") if count else 0
        parts = chunk.split(b'"')
        records = 0
        for i in range(1 if self._quoted else 0, len(parts), 2):  # the parts outside quotes
            records += parts[i].count(b"\n")
            parts[i] = parts[i].replace(b"\n", b"\r\n")
        if len(parts) % 2 == 0:  # an odd number of quotes: the state flips
            self._quoted = not self._quoted
        return b'"'.join(parts), records


class TextCopyLines:
    """COPY's text format → the lines themselves: every backslash was doubled; undo that.

    The lines are JSON, which has no raw tab, CR or LF, so a doubled backslash is the only
    escape COPY wrote. A chunk that ends inside a pair keeps its last byte for the next.
    """

    def __init__(self) -> None:
        self._carry = b""

    def convert(self, chunk: bytes, *, count: bool = True) -> tuple[bytes, int]:
        """The lines as they were, and how many ended in the chunk (0 unless ``count``)."""
        data = self._carry + chunk if self._carry else chunk
        trailing = len(data) - len(data.rstrip(b"\\"))
        if trailing % 2:
            data, self._carry = data[:-1], data[-1:]
        else:
            self._carry = b""
        return data.replace(b"\\\\", b"\\"), data.count(b"\n") if count else 0


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


class _ChunkFile(io.RawIOBase):
    """A readable file over the CSV chunks the event loop hands in, for pyarrow's streaming
    CSV reader in the encoder's thread. At most ``limit`` chunks wait: ``feed`` blocks
    beyond that, which holds the database back."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._chunks: queue.Queue[bytes | None] = queue.Queue(limit)
        self._current = memoryview(b"")
        self._ended = False
        self.aborted = False

    def readable(self) -> bool:
        return True

    def feed(self, chunk: bytes | None) -> None:
        """A chunk, or None for the end (called from a thread: it may wait)."""
        while not self.aborted:
            try:
                self._chunks.put(chunk, timeout=0.1)
                return
            except queue.Full:
                continue

    def abort(self) -> None:
        self.aborted = True
        with contextlib.suppress(queue.Full):
            self._chunks.put_nowait(None)

    def read(self, size: int = -1) -> bytes:
        # pyarrow asks for a block at a time: hand over whole chunks without copying them.
        while not self._current and not self._ended:
            chunk = self._chunks.get()
            if self.aborted:
                raise OSError("the export was abandoned")
            if chunk is None:
                self._ended = True
            else:
                self._current = memoryview(chunk)
        if size < 0 or size >= len(self._current):
            out, self._current = self._current, memoryview(b"")
        else:
            out, self._current = self._current[:size], self._current[size:]
        return out.obj if len(out) == len(out.obj) else bytes(out)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class ParquetEncoder:
    """Apache Parquet (snappy) from the export's CSV, parsed by pyarrow's streaming reader
    into the documented types; row groups of ``row_group_rows``, written as they fill.

    ``run`` does all the work, in one thread (Arrow's own thread pool made the allocator
    hold on to far more memory, per thread, than the parse ever used).
    """

    def __init__(self, row_group_rows: int = PARQUET_ROW_GROUP_ROWS) -> None:
        import pyarrow as pa  # imported here: only Parquet exports need it
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq

        if row_group_rows <= 0:
            raise ValueError("row_group_rows must be positive")
        self._pa, self._csv, self._pq = pa, pa_csv, pq
        types = {
            "int64": pa.int64(),
            "string": pa.string(),
            "timestamp": pa.timestamp("us", tz="UTC"),
            "date": pa.date32(),
            "bool": pa.bool_(),
        }
        self.schema = pa.schema([pa.field(c.name, types[c.kind]) for c in EXPORT_COLUMNS])
        self._read = pa_csv.ReadOptions(column_names=list(EXPORT_COLUMN_NAMES), block_size=1 << 20, use_threads=False)
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

    def run(self, csv: _ChunkFile | None, emit: Callable[[bytes, int], None]) -> None:
        """Read the CSV to its end, calling ``emit(bytes, rows)`` after each row group
        (``rows`` 0 for the file's last bytes). ``csv`` None: no rows."""
        sink = _Drain()
        writer = self._pq.ParquetWriter(self._pa.PythonFile(sink, mode="w"), self.schema, compression="snappy",
                                        use_dictionary=PARQUET_DICTIONARY_COLUMNS)
        pending: list[Any] = []  # batches of fewer than a row group's rows in all
        pending_rows = 0

        def write(batches: list[Any]) -> None:
            table = self._pa.Table.from_batches(batches, schema=self.schema)
            writer.write_table(table, row_group_size=table.num_rows)
            emit(sink.take(), table.num_rows)

        if csv is not None:
            try:
                reader = self._csv.open_csv(csv, read_options=self._read, parse_options=self._parse,
                                            convert_options=self._convert)
                for batch in reader:
                    while batch.num_rows:
                        take = min(batch.num_rows, self._rows_per_group - pending_rows)
                        pending.append(batch.slice(0, take))
                        pending_rows += take
                        batch = batch.slice(take)
                        if pending_rows == self._rows_per_group:
                            write(pending)
                            pending, pending_rows = [], 0
            finally:
                csv.abort()  # done reading, or failed: a feed still waiting returns
        if pending_rows:
            write(pending)
        writer.close()
        emit(sink.take(), 0)


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
    count = on_rows is not None  # counting costs a pass over the bytes: only for progress bars
    async with ledger_export_snapshot(engine, query) as snapshot:
        if on_start is not None:
            on_start(snapshot.rows)
        # aclosing: an export left early (the client went away) closes its COPY at once.
        if fmt == "csv":
            yield CSV_HEADER
            records = CsvRecords()
            async with aclosing(snapshot.csv()) as chunks:
                async for chunk in chunks:
                    data, rows = records.convert(chunk, count=count)
                    yield data
                    progress(rows)
        elif fmt == "jsonl":
            lines = TextCopyLines()
            async with aclosing(snapshot.jsonl()) as chunks:
                async for chunk in chunks:
                    data, rows = lines.convert(chunk, count=count)
                    yield data
                    progress(rows)
        else:
            async with aclosing(_parquet(snapshot.csv(), ParquetEncoder(row_group_rows), progress)) as chunks:
                async for data in chunks:
                    yield data


PARQUET_CHUNKS_AHEAD = 4  # CSV chunks (up to 1 MB each) waiting for the encoder


async def _parquet(
    csv: AsyncIterator[bytes], encoder: ParquetEncoder, progress: Callable[[int], None]
) -> AsyncIterator[bytes]:
    """The encoder runs in its own thread, reading the CSV as it is handed in; what it
    writes comes back here through a queue."""
    loop = asyncio.get_running_loop()
    threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="parquet-export")  # encoder, feeder
    written: asyncio.Queue[tuple[bytes, int]] = asyncio.Queue()
    file: _ChunkFile | None = None
    encoding: asyncio.Future | None = None

    def emit(data: bytes, rows: int) -> None:
        loop.call_soon_threadsafe(written.put_nowait, (data, rows))

    def start(csv_file: _ChunkFile | None) -> asyncio.Future:
        return asyncio.ensure_future(loop.run_in_executor(threads, encoder.run, csv_file, emit))

    async def drain() -> AsyncIterator[bytes]:
        while not written.empty():
            data, rows = written.get_nowait()
            if rows:
                progress(rows)
            if data:
                yield data

    try:
        async with aclosing(csv) as chunks:
            async for chunk in chunks:
                if encoding is None:
                    file = _ChunkFile(PARQUET_CHUNKS_AHEAD)
                    encoding = start(file)
                await loop.run_in_executor(threads, file.feed, chunk)
                if encoding.done():  # it failed: say why
                    await encoding
                async for data in drain():
                    yield data
        if encoding is None:
            encoding = start(None)
        else:
            await loop.run_in_executor(threads, file.feed, None)
        await encoding
        async for data in drain():
            yield data
    finally:
        if file is not None and encoding is not None and not encoding.done():
            file.abort()
            with contextlib.suppress(Exception):
                await encoding
        threads.shutdown(wait=False)
