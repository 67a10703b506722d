"""SQL behind reconciliation: ingest counters and ledger totals for a window, and the diff of an
upstream's per-request usage against the ledger.

Counters come from ``ingest_stats_daily`` (per source and UTC day of processing); ledger
totals from ``ledger_entries`` of type ``usage`` with ``event_time`` in [from, to). The diff
streams the upstream's records into a temporary table in batches, aggregates the ledger's
entries of the window per ``request_id`` into another, and lets PostgreSQL join them: the
API process holds one batch at a time, whatever the size of either side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.contracts.errors import INVALID_REQUEST, TollhouseError

COUNTER_FIELDS = ("received", "accepted", "duplicates", "conflicts", "dead_lettered")
LEDGER_FIELDS = ("requests", "total_tokens", "package_tokens", "charge")


@dataclass(slots=True)
class SourceTotals:
    """Counters and ledger totals of one event source (``charge`` in nano-CNY)."""

    source: str
    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    dead_lettered: int = 0
    requests: int = 0
    total_tokens: int = 0
    package_tokens: int = 0
    charge: int = 0


@dataclass(frozen=True, slots=True)
class UpstreamRecord:
    """One line of an upstream's usage file; ``line`` is its line number in the upload."""

    request_id: str
    line: int
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int


@dataclass(frozen=True, slots=True)
class TokenCounts:
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int


@dataclass(frozen=True, slots=True)
class MissingItem:
    """In the upstream's records, not in the ledger's window."""

    request_id: str
    line: int
    upstream: TokenCounts


@dataclass(frozen=True, slots=True)
class ExtraItem:
    """In the ledger's window, not in the upstream's records."""

    request_id: str
    entries: int
    first_event_time: datetime
    ledger: TokenCounts


@dataclass(frozen=True, slots=True)
class DifferentItem:
    request_id: str
    line: int
    entries: int
    upstream: TokenCounts
    ledger: TokenCounts
    fields: list[str]


@dataclass(slots=True)
class DiffResult:
    upstream_records: int = 0
    upstream_total_tokens: int = 0
    ledger_records: int = 0
    ledger_entries: int = 0
    ledger_total_tokens: int = 0
    matched: int = 0
    missing: int = 0
    missing_total_tokens: int = 0
    extra: int = 0
    extra_total_tokens: int = 0
    different: int = 0
    different_upstream_total_tokens: int = 0
    different_ledger_total_tokens: int = 0
    missing_items: list[MissingItem] = field(default_factory=list)
    extra_items: list[ExtraItem] = field(default_factory=list)
    different_items: list[DifferentItem] = field(default_factory=list)


_INGEST_TOTALS = text(
    "SELECT source, sum(received) AS received, sum(accepted) AS accepted, sum(duplicates) AS duplicates,"
    " sum(conflicts) AS conflicts, sum(dead_lettered) AS dead_lettered"
    " FROM ingest_stats_daily WHERE day >= :first_day AND day < :end_day GROUP BY source"
)
_LEDGER_TOTALS = text(
    "SELECT source, count(*) AS requests, sum(total_tokens) AS total_tokens,"
    " sum(package_tokens) AS package_tokens, sum(charge) AS charge"
    " FROM ledger_entries WHERE entry_type = 'usage' AND event_time >= :lower AND event_time < :upper"
    " GROUP BY source"
)

_CREATE_UPSTREAM = text(
    "CREATE TEMPORARY TABLE recon_upstream (request_id text PRIMARY KEY, line bigint NOT NULL,"
    " prompt_tokens bigint, completion_tokens bigint, total_tokens bigint NOT NULL) ON COMMIT DROP"
)
_INSERT_UPSTREAM = text(
    "INSERT INTO recon_upstream (request_id, line, prompt_tokens, completion_tokens, total_tokens)"
    " SELECT * FROM unnest(CAST(:request_ids AS text[]), CAST(:lines AS bigint[]), CAST(:prompt AS bigint[]),"
    " CAST(:completion AS bigint[]), CAST(:total AS bigint[]))"
    " ON CONFLICT (request_id) DO NOTHING RETURNING request_id"
)
_FIRST_LINES = text("SELECT request_id, line FROM recon_upstream WHERE request_id = ANY(CAST(:request_ids AS text[]))")
_CREATE_LEDGER = text(
    "CREATE TEMPORARY TABLE recon_ledger (request_id text PRIMARY KEY, entries bigint NOT NULL,"
    " first_event_time timestamptz NOT NULL, prompt_tokens bigint NOT NULL, completion_tokens bigint NOT NULL,"
    " total_tokens bigint NOT NULL) ON COMMIT DROP"
)
# Several usage entries with one request_id (the gateway sent two events for one call) count
# as one record whose tokens are their sum.
_FILL_LEDGER = text(
    "INSERT INTO recon_ledger (request_id, entries, first_event_time, prompt_tokens, completion_tokens, total_tokens)"
    " SELECT request_id, count(*), min(event_time), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens)"
    " FROM ledger_entries"
    " WHERE entry_type = 'usage' AND request_id IS NOT NULL AND event_time >= :lower AND event_time < :upper"
    " GROUP BY request_id"
)
# Upstream fields that were not given (NULL) are not compared.
_DIFFERS = (
    "(u.total_tokens <> l.total_tokens OR coalesce(u.prompt_tokens <> l.prompt_tokens, false)"
    " OR coalesce(u.completion_tokens <> l.completion_tokens, false))"
)
_SUMMARY = text(
    "SELECT count(u.request_id) AS upstream_records, coalesce(sum(u.total_tokens), 0) AS upstream_total_tokens,"
    " count(l.request_id) AS ledger_records, coalesce(sum(l.entries), 0) AS ledger_entries,"
    " coalesce(sum(l.total_tokens), 0) AS ledger_total_tokens,"
    " count(*) FILTER (WHERE l.request_id IS NULL) AS missing,"
    " coalesce(sum(u.total_tokens) FILTER (WHERE l.request_id IS NULL), 0) AS missing_total_tokens,"
    " count(*) FILTER (WHERE u.request_id IS NULL) AS extra,"
    " coalesce(sum(l.total_tokens) FILTER (WHERE u.request_id IS NULL), 0) AS extra_total_tokens,"
    f" count(*) FILTER (WHERE {_DIFFERS}) AS different,"
    f" coalesce(sum(u.total_tokens) FILTER (WHERE {_DIFFERS}), 0) AS different_upstream_total_tokens,"
    f" coalesce(sum(l.total_tokens) FILTER (WHERE {_DIFFERS}), 0) AS different_ledger_total_tokens,"
    f" count(*) FILTER (WHERE u.request_id IS NOT NULL AND l.request_id IS NOT NULL AND NOT {_DIFFERS}) AS matched"
    " FROM recon_upstream u FULL JOIN recon_ledger l ON l.request_id = u.request_id"
)
_MISSING = text(
    "SELECT u.request_id, u.line, u.prompt_tokens, u.completion_tokens, u.total_tokens FROM recon_upstream u"
    " WHERE NOT EXISTS (SELECT 1 FROM recon_ledger l WHERE l.request_id = u.request_id)"
    " ORDER BY u.line LIMIT :limit"
)
_EXTRA = text(
    "SELECT l.request_id, l.entries, l.first_event_time, l.prompt_tokens, l.completion_tokens, l.total_tokens"
    " FROM recon_ledger l WHERE NOT EXISTS (SELECT 1 FROM recon_upstream u WHERE u.request_id = l.request_id)"
    " ORDER BY l.first_event_time, l.request_id LIMIT :limit"
)
_DIFFERENT = text(
    "SELECT u.request_id, u.line, l.entries, u.prompt_tokens AS u_prompt, u.completion_tokens AS u_completion,"
    " u.total_tokens AS u_total, l.prompt_tokens AS l_prompt, l.completion_tokens AS l_completion,"
    " l.total_tokens AS l_total"
    f" FROM recon_upstream u JOIN recon_ledger l ON l.request_id = u.request_id WHERE {_DIFFERS}"
    " ORDER BY u.line LIMIT :limit"
)


def _int(value: Any) -> int:
    """PostgreSQL's sum() of bigint is numeric: back to an exact int."""
    return 0 if value is None else int(value)


class ReconciliationStore:
    def __init__(self, engine: AsyncEngine) -> None:
        # One snapshot for counters and ledger totals, so they describe the same moment.
        self._engine = engine.execution_options(isolation_level="REPEATABLE READ")

    async def totals(
        self, lower: datetime, upper: datetime, first_day: date, end_day: date
    ) -> dict[str, SourceTotals]:
        """Per source: counters of the UTC days [first_day, end_day), ledger totals of [lower, upper)."""
        by_source: dict[str, SourceTotals] = {}
        async with self._engine.begin() as conn:
            for row in await conn.execute(_INGEST_TOTALS, {"first_day": first_day, "end_day": end_day}):
                totals = by_source.setdefault(row.source, SourceTotals(row.source))
                for name in COUNTER_FIELDS:
                    setattr(totals, name, _int(getattr(row, name)))
            for row in await conn.execute(_LEDGER_TOTALS, {"lower": lower, "upper": upper}):
                source = row.source or "unknown"
                totals = by_source.setdefault(source, SourceTotals(source))
                for name in LEDGER_FIELDS:
                    setattr(totals, name, getattr(totals, name) + _int(getattr(row, name)))
        return by_source

    async def diff(
        self,
        lower: datetime,
        upper: datetime,
        upstream: AsyncIterator[list[UpstreamRecord]],
        *,
        item_limit: int,
    ) -> DiffResult:
        """Compare the upstream's records with the ledger's usage entries of [lower, upper).

        ``upstream`` yields batches as the upload is parsed; a request_id given twice is a
        400 naming both lines. Up to ``item_limit`` items of each kind are listed; the
        counts and token totals always cover everything.
        """
        async with self._engine.begin() as conn:
            await conn.execute(_CREATE_UPSTREAM)
            async for batch in upstream:
                await _insert_upstream(conn, batch)
            await conn.execute(_CREATE_LEDGER)
            await conn.execute(_FILL_LEDGER, {"lower": lower, "upper": upper})
            await conn.execute(text("ANALYZE recon_upstream"))
            await conn.execute(text("ANALYZE recon_ledger"))
            summary = (await conn.execute(_SUMMARY)).one()
            result = DiffResult(**{name: _int(value) for name, value in summary._mapping.items()})
            if result.missing:
                result.missing_items = [
                    MissingItem(r.request_id, r.line, TokenCounts(r.prompt_tokens, r.completion_tokens, r.total_tokens))
                    for r in await conn.execute(_MISSING, {"limit": item_limit})
                ]
            if result.extra:
                result.extra_items = [
                    ExtraItem(r.request_id, r.entries, r.first_event_time,
                              TokenCounts(r.prompt_tokens, r.completion_tokens, r.total_tokens))
                    for r in await conn.execute(_EXTRA, {"limit": item_limit})
                ]
            if result.different:
                result.different_items = [_different(r) for r in await conn.execute(_DIFFERENT, {"limit": item_limit})]
        return result


async def _insert_upstream(conn: AsyncConnection, batch: list[UpstreamRecord]) -> None:
    if not batch:
        return
    first_line: dict[str, int] = {}
    for record in batch:
        earlier = first_line.setdefault(record.request_id, record.line)
        if earlier != record.line:
            raise _repeated(record, earlier)
    inserted = {
        row.request_id
        for row in await conn.execute(
            _INSERT_UPSTREAM,
            {
                "request_ids": [r.request_id for r in batch],
                "lines": [r.line for r in batch],
                "prompt": [r.prompt_tokens for r in batch],
                "completion": [r.completion_tokens for r in batch],
                "total": [r.total_tokens for r in batch],
            },
        )
    }
    if len(inserted) < len(batch):  # some ids were in an earlier batch
        repeated = [r for r in batch if r.request_id not in inserted]
        lines = dict(
            (row.request_id, row.line)
            for row in await conn.execute(_FIRST_LINES, {"request_ids": [r.request_id for r in repeated]})
        )
        record = repeated[0]
        raise _repeated(record, lines.get(record.request_id, 0))


def _repeated(record: UpstreamRecord, earlier_line: int) -> TollhouseError:
    return TollhouseError(
        INVALID_REQUEST,
        f"line {record.line}: request_id {record.request_id[:120]!r} repeats line {earlier_line}; "
        "give each request once (with its total tokens)",
    )


def _different(r: Any) -> DifferentItem:
    upstream = TokenCounts(r.u_prompt, r.u_completion, r.u_total)
    ledger = TokenCounts(r.l_prompt, r.l_completion, r.l_total)
    fields = [
        name
        for name in ("prompt_tokens", "completion_tokens", "total_tokens")
        if getattr(upstream, name) is not None and getattr(upstream, name) != getattr(ledger, name)
    ]
    return DifferentItem(r.request_id, r.line, r.entries, upstream, ledger, fields)
