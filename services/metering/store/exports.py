"""SQL of the ledger export: PostgreSQL formats the rows and streams them with COPY.

Every exported value is computed in SQL, text included (times in UTC and in the account's
zone, decimal CNY, the fen-rounded charge), so the database writes the file's bytes and
Python only passes them on: no Python object per row. The export reads one snapshot
(REPEATABLE READ, READ ONLY), so entries booked while it runs are not in it, and its row
count and bounds agree with its rows. Entry ids come from a sequence, so across accounts a
lower id can commit after a higher one; a single statement in one snapshot never skips it.

The scan is bounded by the first and last matching entry_id (found once, from an index
when an account is named), so it is one ordered index range scan: the database never sorts
or holds the whole result.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.metering.store.billing import LedgerQuery, ledger_bounds, read_snapshot

# The export runs EXPORT_STREAMS COPY statements at once, each on its own connection in the
# same snapshot, over consecutive slices of about EXPORT_SLICE_ROWS rows: PostgreSQL formats
# rows on several cores while they are read back in order. Each stream holds at most
# STREAM_BUFFER_BYTES of output ahead of the reader (a slice is about 6 MB of CSV), so a
# slow client holds the database back and memory stays bounded.
EXPORT_STREAMS = 2
EXPORT_SLICE_ROWS = 20_000
STREAM_BUFFER_BYTES = 8 << 20
COPY_CHUNK_BYTES = 1 << 20  # passed on at once, at most (asyncpg hands over a few kB at a time)

# The expressions below assume these session settings (set for the export's transaction):
# UTC makes to_char(timestamptz) and timestamptz::timestamp read in UTC; ISO writes dates
# as YYYY-MM-DD.
_SESSION = ("SET LOCAL TIME ZONE 'UTC'", "SET LOCAL DateStyle = 'ISO, YMD'")

_NANO = "0.000000001"  # numeric(…, 9): bigint × this is exact and prints with 9 places
_UTC_TEXT = """to_char(l.event_time, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
# RFC 3339 offset as Python's isoformat writes it: ±HH:MM, and :SS only when not zero
# (zones' local mean time before standard time). to_char of a negative interval prints
# every field negative, hence the sign handled apart.
_OFFSET_TEXT = """(CASE WHEN z.utc_offset >= interval '0' THEN '+' || to_char(z.utc_offset, 'HH24:MI')
        ELSE '-' || to_char(-z.utc_offset, 'HH24:MI') END
   || CASE WHEN date_part('second', z.utc_offset) = 0 THEN ''
        WHEN z.utc_offset > interval '0' THEN to_char(z.utc_offset, ':SS')
        ELSE to_char(-z.utc_offset, ':SS') END)"""
_LOCAL_TEXT = f"""to_char(z.local_time, 'YYYY-MM-DD"T"HH24:MI:SS.US') || {_OFFSET_TEXT}"""
# Half-to-even to whole fen (10^7 nano-CNY), any sign: r is the floored remainder.
_FEN = """((l.charge - f.r) / 10000000
    + CASE WHEN f.r > 5000000 OR (f.r = 5000000 AND ((l.charge - f.r) / 10000000) % 2 <> 0) THEN 1 ELSE 0 END)
   * 0.01"""

# Column name → SQL, in the export's order (docs/exports.md). ``services.metering.ledger_export``
# checks that the names are its columns.
EXPORT_SQL: dict[str, str] = {
    "entry_id": "l.entry_id",
    "entry_type": "l.entry_type",
    "account_id": "l.account_id",
    "key_id": "l.key_id",
    "model": "l.model",
    "event_time_utc": _UTC_TEXT,
    "event_time_local": _LOCAL_TEXT,
    "local_day": "l.local_day",
    "request_id": "l.request_id",
    "event_id": "l.event_id",
    "kind": "l.kind",
    "status": "l.status",
    "inputs": "l.inputs",
    "prompt_tokens": "l.prompt_tokens",
    "completion_tokens": "l.completion_tokens",
    "cached_tokens": "l.cached_tokens",
    "reasoning_tokens": "l.reasoning_tokens",
    "total_tokens": "l.total_tokens",
    "package_tokens": "l.package_tokens",
    "overage_tokens": "l.overage_tokens",
    "charge_nano": "l.charge",
    "charge_cny": f"l.charge * {_NANO}",
    "price_id": "l.price_id",
    "source": "l.source",
    "charge_fen": _FEN,
    "overage_charge_nano": "l.overage_charge",
    "balance_delta_nano": "l.balance_delta",
    "balance_delta_cny": f"l.balance_delta * {_NANO}",
    "package_id": "l.package_id",
    "reference": "l.reference",
    "usage_estimated": "l.usage_estimated",
    "reverses_entry_id": "l.reverses_entry_id",
}

# The local time is computed once per row (OFFSET 0 keeps the planner from copying the
# expression into each use), and so is the floored fen remainder.
_FROM = """ledger_entries l
JOIN accounts a ON a.account_id = l.account_id
CROSS JOIN LATERAL (
    SELECT t.local_time, t.local_time - l.event_time::timestamp AS utc_offset
    FROM (VALUES (l.event_time AT TIME ZONE a.timezone)) t (local_time) OFFSET 0
) z
CROSS JOIN LATERAL (VALUES (((l.charge % 10000000) + 10000000) % 10000000)) f (r)"""


# Numeric columns that are decimal strings: CSV writes a numeric as exactly that text, JSON
# would write a number. Booleans: CSV would write t/f, JSON writes true/false.
_STRING_IN_JSON = frozenset({"charge_cny", "charge_fen", "balance_delta_cny"})
_TEXT_IN_CSV = frozenset({"usage_estimated"})


def _select(query: LedgerQuery, first: int, last: int, *, csv: bool) -> tuple[str, list[Any]]:
    """The export's SELECT and its arguments, for COPY's CSV (``csv``) or for row_to_json."""
    cast = _TEXT_IN_CSV if csv else _STRING_IN_JSON
    columns = ",\n    ".join(
        f"({sql})::text AS {name}" if name in cast else f"{sql} AS {name}" for name, sql in EXPORT_SQL.items()
    )
    args: list[Any] = [first, last]
    where = ["l.entry_id BETWEEN $1 AND $2"]
    if query.account_id is not None:
        args.append(query.account_id)
        where.append(f"l.account_id = ${len(args)}")
    if query.time_from is not None:
        args.append(query.time_from)
        where.append(f"l.event_time >= ${len(args)}")
    if query.time_to is not None:
        args.append(query.time_to)
        where.append(f"l.event_time < ${len(args)}")
    sql = f"SELECT\n    {columns}\nFROM {_FROM}\nWHERE {' AND '.join(where)}\nORDER BY l.entry_id"
    return sql, args


class _Buffer:
    """One stream's COPY output waiting for the reader, bounded in bytes: when it is full
    the stream waits, asyncpg stops reading its socket, and the database waits too.
    (One writer and one reader; events rather than a lock: this runs per few kB.)"""

    def __init__(self, limit: int) -> None:
        self._items: deque[Any] = deque()
        self._bytes = 0
        self._limit = limit
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._discarding = False

    async def put(self, item: Any) -> None:
        while self._bytes >= self._limit and not self._discarding:
            self._room.clear()
            await self._room.wait()
        if self._discarding:
            return
        self._items.append(item)
        self._bytes += 0 if _is_marker(item) else len(item)
        self._arrived.set()

    async def take(self, most: int) -> tuple[list[bytearray], Any]:
        """What has arrived, up to about ``most`` bytes, and the marker that ended it (or None)."""
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        chunks: list[bytearray] = []
        size = 0
        end = None
        while self._items and size < most:
            item = self._items.popleft()
            if _is_marker(item):
                end = item
                break
            chunks.append(item)
            size += len(item)
        self._bytes -= size
        if self._bytes < self._limit:
            self._room.set()
        return chunks, end

    def discard(self) -> None:
        """The reader is gone: drop what is here and what comes, and let a waiting put return."""
        self._discarding = True
        self._items.clear()
        self._bytes = 0
        self._room.set()


_SLICE_END = object()  # a slice's COPY ended; an exception in its place: the stream failed


def _is_marker(item: Any) -> bool:
    return item is _SLICE_END or isinstance(item, BaseException)


class LedgerSnapshot:
    """The entries matching a query, as of the moment the snapshot was taken."""

    def __init__(self, engine: AsyncEngine, conn: AsyncConnection, snapshot_id: str, query: LedgerQuery,
                 rows: int, first: int | None, last: int | None) -> None:
        self._engine = engine
        self._conn = conn
        self._snapshot_id = snapshot_id
        self._query = query
        self.rows = rows
        self._first = first
        self._last = last

    def csv(self) -> AsyncIterator[bytes]:
        """The rows as PostgreSQL's CSV, without a header: comma, ``"`` quoting only where
        needed, LF line ends, NULL an unquoted empty field, an empty string ``""``."""
        return self._stream(csv=True)

    def jsonl(self) -> AsyncIterator[bytes]:
        """One compact JSON object per row (``row_to_json``), keys in column order, as
        COPY's text format writes it: a backslash is doubled, nothing else is escaped
        (JSON text has no raw tab, CR or LF)."""
        return self._stream(csv=False)

    def _slices(self) -> list[tuple[int, int]]:
        """entry_id ranges of about EXPORT_SLICE_ROWS matching rows each, in order."""
        if self._first is None or self._last is None or self.rows == 0:
            return []
        span = self._last - self._first + 1
        width = max(1, -(-span * EXPORT_SLICE_ROWS // self.rows))
        return [(lo, min(lo + width - 1, self._last)) for lo in range(self._first, self._last + 1, width)]

    async def _stream(self, *, csv: bool) -> AsyncIterator[bytes]:
        """The slices COPY'd by up to EXPORT_STREAMS connections at once (slice i on stream
        i mod n), read back in slice order: the output is one ordered COPY's, made on
        several cores.

        If the reader stops early (the client went away) or a stream fails, the streams
        still copying have their connections dropped: that ends their COPY in the database
        at once, and the pool opens new connections later. (Cancelling a COPY OUT from its
        output callback leaves asyncpg's connection unusable.)
        """
        slices = self._slices()
        if not slices:
            return
        async with AsyncExitStack() as helpers:
            conns = [self._conn]
            for _ in range(min(EXPORT_STREAMS, len(slices)) - 1):
                conns.append(await helpers.enter_async_context(_joined_snapshot(self._engine, self._snapshot_id)))
            buffers = [_Buffer(STREAM_BUFFER_BYTES) for _ in conns]
            tasks = [
                asyncio.create_task(self._copy_slices(conn, buffer, slices[k :: len(conns)], csv))
                for k, (conn, buffer) in enumerate(zip(conns, buffers))
            ]
            try:
                for i in range(len(slices)):
                    buffer = buffers[i % len(conns)]
                    while True:
                        chunks, end = await buffer.take(COPY_CHUNK_BYTES)
                        if chunks:
                            yield b"".join(chunks)
                        if end is _SLICE_END:
                            break
                        if end is not None:
                            raise end
            finally:
                for conn, buffer, task in zip(conns, buffers, tasks):
                    if not task.done():
                        (await conn.get_raw_connection()).driver_connection.terminate()
                        await conn.invalidate()
                    buffer.discard()
                for task in tasks:
                    with contextlib.suppress(Exception):
                        await task

    async def _copy_slices(self, conn: AsyncConnection, buffer: _Buffer, slices: list[tuple[int, int]],
                           csv: bool) -> None:
        raw = (await conn.get_raw_connection()).driver_connection
        try:
            for first, last in slices:
                sql, args = _select(self._query, first, last, csv=csv)
                if csv:
                    await raw.copy_from_query(sql, *args, output=buffer.put, format="csv")
                else:
                    await raw.copy_from_query(f"SELECT row_to_json(e)::text FROM ({sql}) e", *args,
                                              output=buffer.put, format="text")
                await buffer.put(_SLICE_END)
        except Exception as exc:  # handed to the reader, which raises it when it gets here
            await buffer.put(exc)


@asynccontextmanager
async def _joined_snapshot(engine: AsyncEngine, snapshot_id: str) -> AsyncIterator[AsyncConnection]:
    """Another connection reading the export's snapshot (pg_export_snapshot)."""
    async with read_snapshot(engine) as conn:
        await conn.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{snapshot_id}'")
        for statement in _SESSION:
            await conn.exec_driver_sql(statement)
        yield conn


@asynccontextmanager
async def ledger_export_snapshot(engine: AsyncEngine, query: LedgerQuery) -> AsyncIterator[LedgerSnapshot]:
    """Take a snapshot, count what matches and find its entry_id bounds (one pass)."""
    async with read_snapshot(engine) as conn:
        for statement in _SESSION:
            await conn.exec_driver_sql(statement)
        snapshot_id = (await conn.exec_driver_sql("SELECT pg_export_snapshot()")).scalar_one()
        rows, first, last = await ledger_bounds(conn, query)
        yield LedgerSnapshot(engine, conn, snapshot_id, query, rows, first, last)
