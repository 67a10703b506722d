"""SQL of the ledger export: keyset pages over entry_id inside one read-only snapshot.

The snapshot (REPEATABLE READ) makes an export of many accounts consistent even while
consumers keep booking: entry ids come from a sequence, so across accounts a lower id can
commit after a higher one, and pages read in separate transactions could skip it. Pages
are bounded by the first and last matching entry_id, found once, so each page is a short
index range scan and the database never sorts or holds the whole result.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.metering.store.billing import (
    LedgerQuery,
    LedgerRecord,
    ledger_entries,
    ledger_record,
    ledger_select,
    ledger_where,
    read_snapshot,
)

EXPORT_PAGE_ROWS = 5_000  # rows per page and per Parquet row group: bounds memory per export


class LedgerSnapshot:
    """The entries matching a query, as of the moment the snapshot was taken."""

    def __init__(self, conn: AsyncConnection, query: LedgerQuery, rows: int, first: int | None, last: int | None):
        self._conn = conn
        self._query = query
        self.rows = rows
        self._first = first
        self._last = last

    async def pages(self, page_rows: int = EXPORT_PAGE_ROWS) -> AsyncIterator[list[LedgerRecord]]:
        if page_rows <= 0:
            raise ValueError("page_rows must be positive")
        if self._first is None or self._last is None:
            return
        after = self._first - 1
        base = ledger_select(self._query).where(ledger_entries.c.entry_id <= self._last)
        while after < self._last:
            page = [
                ledger_record(r)
                for r in (
                    await self._conn.execute(base.where(ledger_entries.c.entry_id > after).limit(page_rows))
                ).all()
            ]
            if not page:
                return
            yield page
            after = page[-1].entry_id


@asynccontextmanager
async def ledger_export_snapshot(engine: AsyncEngine, query: LedgerQuery) -> AsyncIterator[LedgerSnapshot]:
    """Take a snapshot, count what matches and find its entry_id bounds (one pass)."""
    async with read_snapshot(engine) as conn:
        bounds = select(func.count(), func.min(ledger_entries.c.entry_id), func.max(ledger_entries.c.entry_id))
        rows, first, last = (await conn.execute(ledger_where(bounds, query))).one()
        yield LedgerSnapshot(conn, query, rows, first, last)
