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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.metering.store.billing import LedgerQuery, ledger_bounds, read_snapshot

# COPY chunks held between the database and the encoder: bounds memory and lets a slow
# client hold the database back (asyncpg stops reading the socket while its sink waits).
COPY_QUEUE_CHUNKS = 64
COPY_CHUNK_BYTES = 1 << 20  # what is passed on at once, at most (one more piece may exceed it)

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
_FEN_TEXT = """(((l.charge - f.r) / 10000000
    + CASE WHEN f.r > 5000000 OR (f.r = 5000000 AND ((l.charge - f.r) / 10000000) % 2 <> 0) THEN 1 ELSE 0 END)
   * 0.01)::text"""

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
    "charge_cny": f"(l.charge * {_NANO})::text",
    "price_id": "l.price_id",
    "source": "l.source",
    "charge_fen": _FEN_TEXT,
    "overage_charge_nano": "l.overage_charge",
    "balance_delta_nano": "l.balance_delta",
    "balance_delta_cny": f"(l.balance_delta * {_NANO})::text",
    "package_id": "l.package_id",
    "reference": "l.reference",
    "usage_estimated": "l.usage_estimated",  # CSV writes it as text: see _select
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


def _select(query: LedgerQuery, first: int, last: int, *, csv: bool) -> tuple[str, list[Any]]:
    """The export's SELECT and its arguments; ``csv`` writes booleans as ``true``/``false``
    (COPY's CSV would write ``t``/``f``), JSON keeps them booleans."""
    columns = ",\n    ".join(
        f"{sql}::text AS {name}" if csv and name == "usage_estimated" else f"{sql} AS {name}"
        for name, sql in EXPORT_SQL.items()
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


_DONE = object()


class LedgerSnapshot:
    """The entries matching a query, as of the moment the snapshot was taken."""

    def __init__(self, conn: AsyncConnection, query: LedgerQuery, rows: int, first: int | None, last: int | None):
        self._conn = conn
        self._query = query
        self.rows = rows
        self._first = first
        self._last = last

    def csv(self) -> AsyncIterator[bytes]:
        """The rows as PostgreSQL's CSV, without a header: comma, ``"`` quoting only where
        needed, LF line ends, NULL an unquoted empty field, an empty string ``""``."""
        if self._first is None or self._last is None:
            return _nothing()
        sql, args = _select(self._query, self._first, self._last, csv=True)
        return self._copy(sql, args, format="csv")

    def jsonl(self) -> AsyncIterator[bytes]:
        """One compact JSON object per row (``row_to_json``), keys in column order, as
        COPY's text format writes it: a backslash is doubled, nothing else is escaped
        (JSON text has no raw tab, CR or LF)."""
        if self._first is None or self._last is None:
            return _nothing()
        sql, args = _select(self._query, self._first, self._last, csv=False)
        return self._copy(f"SELECT row_to_json(e)::text FROM ({sql}) e", args, format="text")

    async def _copy(self, sql: str, args: list[Any], **options: Any) -> AsyncIterator[bytes]:
        """COPY (sql) TO STDOUT, passed on as it arrives through a bounded queue.

        If the reader stops early (the client went away), the connection is dropped: that
        ends the COPY in the database at once, and the pool opens a new connection later.
        (Cancelling a COPY OUT from its output callback leaves asyncpg's connection unusable.)
        """
        raw = (await self._conn.get_raw_connection()).driver_connection
        queue: asyncio.Queue[Any] = asyncio.Queue(COPY_QUEUE_CHUNKS)
        stopped = False

        async def sink(chunk: bytearray) -> None:
            if not stopped:
                await queue.put(chunk)

        async def run() -> None:
            try:
                await raw.copy_from_query(sql, *args, output=sink, **options)
            except Exception as exc:  # handed to the reader, which raises it
                if not stopped:
                    await queue.put(exc)
            else:
                await queue.put(_DONE)

        task = asyncio.create_task(run())
        try:
            while True:
                # Take what has arrived (asyncpg hands over a few kB at a time) as one chunk.
                items = [await queue.get()]
                size = len(items[0]) if isinstance(items[0], bytearray) else 0
                while size < COPY_CHUNK_BYTES and not queue.empty() and isinstance(items[-1], bytearray):
                    items.append(queue.get_nowait())
                    size += len(items[-1]) if isinstance(items[-1], bytearray) else 0
                end = None if isinstance(items[-1], bytearray) else items.pop()
                if items:
                    yield b"".join(items)
                if end is _DONE:
                    break
                if end is not None:
                    raise end
        finally:
            if not task.done():
                stopped = True
                raw.terminate()  # closes the socket at once: the server ends the COPY
                await self._conn.invalidate()  # and the pool forgets the connection
                while not queue.empty():  # lets a waiting sink return
                    queue.get_nowait()
            with contextlib.suppress(Exception):
                await task


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield


@asynccontextmanager
async def ledger_export_snapshot(engine: AsyncEngine, query: LedgerQuery) -> AsyncIterator[LedgerSnapshot]:
    """Take a snapshot, count what matches and find its entry_id bounds (one pass)."""
    async with read_snapshot(engine) as conn:
        for statement in _SESSION:
            await conn.exec_driver_sql(statement)
        rows, first, last = await ledger_bounds(conn, query)
        yield LedgerSnapshot(conn, query, rows, first, last)
