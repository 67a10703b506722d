"""Repositories of the billing and finance read API (DESIGN §6.4): usage, breaches, ledger
entries and monthly statements. Read-only: nothing here writes.

Usage comes from the ``usage_daily`` projection only, so it stays fast however long the
ledger grows; ledger pages and statements read ``ledger_entries``. A method that runs more
than one query reads one snapshot (REPEATABLE READ, READ ONLY), so a page and its totals,
or a statement's parts, always agree.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Date, Select, cast, exists, func, select
from sqlalchemy.dialects.postgresql import TIMESTAMP
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.contracts.errors import NOT_FOUND, TollhouseError
from services.metering.store.admin import account_not_found, key_not_found
from services.metering.store.paging import keyset_page, page_of
from services.metering.store.tables import Account, ApiKey, Breach, LedgerEntry, UsageDaily

accounts = Account.__table__
api_keys = ApiKey.__table__
breaches = Breach.__table__
ledger_entries = LedgerEntry.__table__
usage_daily = UsageDaily.__table__

# The sums a usage row carries (DESIGN §6.5), in reply order.
USAGE_SUMS = (
    "requests",
    "inputs",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
    "package_tokens",
    "charge",
)

# group_by name → (field in the row, SQL expression over usage_daily).
USAGE_GROUPS: dict[str, tuple[str, ColumnElement[Any]]] = {
    "day": ("day", usage_daily.c.day),
    "month": ("month", cast(func.date_trunc("month", cast(usage_daily.c.day, TIMESTAMP)), Date)),
    "model": ("model", usage_daily.c.model),
    "key": ("key_id", usage_daily.c.key_id),
}

BREACH_TYPES = ("daily_cap", "monthly_cap", "package_exhausted", "package_expired", "balance_depleted")


@asynccontextmanager
async def read_snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A read-only transaction that sees one snapshot of the database throughout."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            await conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            yield conn


# Usage


@dataclass(frozen=True, slots=True)
class UsageFilter:
    account_id: str | None
    key_id: str | None
    model: str | None
    from_day: date | None  # inclusive
    to_day: date | None  # exclusive


@dataclass(frozen=True, slots=True)
class UsagePage:
    group_by: tuple[str, ...]
    rows: list[dict[str, Any]]  # group fields (date or str) and the sums (int; charge in nano-CNY)
    totals: dict[str, int]
    next_after: tuple[Any, ...] | None  # the last row's group values, when more rows follow


# Breaches


@dataclass(frozen=True, slots=True)
class BreachFilter:
    account_id: str | None
    key_id: str | None
    type: str | None
    occurred_from: datetime | None  # inclusive
    occurred_to: datetime | None  # exclusive


BreachKey = tuple[datetime, str]  # (occurred_at, breach_id): the listing order


@dataclass(frozen=True, slots=True)
class BreachRecord:
    breach_id: str
    type: str
    account_id: str
    key_id: str | None
    package_id: str | None
    period: str | None
    unit: str
    cap: int
    spend: int
    overshoot: int
    event_id: str | None
    occurred_at: datetime


@dataclass(frozen=True, slots=True)
class BreachPage:
    rows: list[BreachRecord]
    next_after: BreachKey | None


# Ledger entries


@dataclass(frozen=True, slots=True)
class LedgerQuery:
    """Which ledger entries: event_time in [time_from, time_to), optionally of one account."""

    account_id: str | None
    time_from: datetime | None
    time_to: datetime | None


class LedgerRecord(NamedTuple):
    """One ledger entry as read for people and exports; money in nano-CNY.

    A NamedTuple, not a dataclass: exports build millions of these, straight from row tuples.
    """

    entry_id: int
    entry_type: str
    account_id: str
    timezone: str  # the account's zone, for local times
    key_id: str | None
    package_id: str | None
    model: str | None
    event_time: datetime
    local_day: date
    request_id: str | None
    event_id: str | None
    reference: str | None
    source: str | None
    endpoint: str | None
    kind: str | None
    status: str | None
    usage_estimated: bool
    inputs: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    total_tokens: int
    package_tokens: int
    overage_tokens: int
    charge: int
    overage_charge: int
    balance_delta: int
    price_id: int | None
    reservation_id: str | None
    reverses_entry_id: int | None
    created_at: datetime


_LEDGER_COLUMNS = tuple(
    accounts.c.timezone if name == "timezone" else ledger_entries.c[name] for name in LedgerRecord._fields
)
_LEDGER_JOINED = ledger_entries.join(accounts, accounts.c.account_id == ledger_entries.c.account_id)


def ledger_select(query: LedgerQuery) -> Select:
    """Entries matching ``query`` in entry_id order (callers add the keyset bound and limit)."""
    stmt = select(*_LEDGER_COLUMNS).select_from(_LEDGER_JOINED)
    return ledger_where(stmt, query).order_by(ledger_entries.c.entry_id)


def ledger_where(stmt: Select, query: LedgerQuery) -> Select:
    if query.account_id is not None:
        stmt = stmt.where(ledger_entries.c.account_id == query.account_id)
    if query.time_from is not None:
        stmt = stmt.where(ledger_entries.c.event_time >= query.time_from)
    if query.time_to is not None:
        stmt = stmt.where(ledger_entries.c.event_time < query.time_to)
    return stmt


class LedgerBounds(NamedTuple):
    rows: int
    first: int | None  # the lowest and highest matching entry_id (None when nothing matches)
    last: int | None


async def ledger_bounds(conn: AsyncConnection, query: LedgerQuery) -> LedgerBounds:
    """How many entries match, and their entry_id range, in one pass.

    For one account's time window this is an index-only scan of (account_id, event_time)
    INCLUDE (entry_id). A lone min(entry_id) would not do: the planner turns it into a walk
    of the primary key in entry_id order, which reads the ledger's history up to the window.
    """
    bounds = select(func.count(), func.min(ledger_entries.c.entry_id), func.max(ledger_entries.c.entry_id))
    return LedgerBounds(*(await conn.execute(ledger_where(bounds, query))).one())


def ledger_record(row: Any) -> LedgerRecord:
    """A row of ``ledger_select`` (its columns are LedgerRecord's fields, in order)."""
    return LedgerRecord._make(row)


@dataclass(frozen=True, slots=True)
class LedgerPage:
    rows: list[LedgerRecord]
    next_after: int | None  # the last entry_id, when more entries follow


# Statements


@dataclass(frozen=True, slots=True)
class ModelCharges:
    model: str
    requests: int
    inputs: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    total_tokens: int
    package_tokens: int
    overage_tokens: int
    charge: int
    overage_charge: int


@dataclass(frozen=True, slots=True)
class StatementRecord:
    """One local month of an account, all from the ledger; money in nano-CNY."""

    account_id: str
    timezone: str
    first_day: date
    next_first_day: date
    opening_balance: int
    topups: int
    topup_count: int
    charges: int
    requests: int
    by_model: list[ModelCharges]
    package_tokens_granted: int
    package_tokens_used: int
    package_tokens_expired: int
    overage_tokens: int
    overage_charge: int
    adjustments: int  # balance changes of other entry types (reversals); 0 until those exist
    closing_balance: int


class LedgerInvariantError(AssertionError):
    """The ledger does not add up: a bug, never bad input."""


def _sum(column: ColumnElement[Any], *conditions: ColumnElement[bool]) -> ColumnElement[Any]:
    """``coalesce(sum(column) FILTER (…), 0)``: numeric in SQL, so sums never overflow."""
    total = func.sum(column)
    if conditions:
        total = total.filter(*conditions)
    return func.coalesce(total, 0)


def _count(*conditions: ColumnElement[bool]) -> ColumnElement[Any]:
    return func.count().filter(*conditions) if conditions else func.count()


class BillingStore:
    """All SQL of the billing and finance read API."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    # Lookups

    async def check_scope(self, *, account_id: str | None, key_id: str | None) -> None:
        """404 unless the account and key exist (and the key is the account's, when both are named)."""
        async with self._engine.connect() as conn:
            if account_id is not None:
                if not await conn.scalar(select(exists().where(accounts.c.account_id == account_id))):
                    raise account_not_found(account_id)
            if key_id is not None:
                owner = await conn.scalar(select(api_keys.c.account_id).where(api_keys.c.key_id == key_id))
                if owner is None:
                    raise key_not_found(key_id)
                if account_id is not None and owner != account_id:
                    raise TollhouseError(NOT_FOUND, f"key {key_id} not found in account {account_id}")

    # Usage (usage_daily only: never the ledger)

    async def usage(
        self, where: UsageFilter, group_by: Sequence[str], *, after: tuple[Any, ...] | None, limit: int
    ) -> UsagePage:
        """Sums per group, keyset-paginated in group order, and the totals of the whole filter."""
        fields = [USAGE_GROUPS[g][0] for g in group_by]
        exprs = [USAGE_GROUPS[g][1] for g in group_by]
        conditions = _usage_conditions(where)
        sums = [_sum(usage_daily.c[name]).label(name) for name in USAGE_SUMS]
        groups = select(*(e.label(f) for e, f in zip(exprs, fields)), *sums).where(*conditions).group_by(*exprs)
        totals_query = select(*sums).where(*conditions)
        async with read_snapshot(self._engine) as conn:
            rows = (await conn.execute(keyset_page(groups, exprs, after, limit))).all()
            totals_row = (await conn.execute(totals_query)).one()
        rows, next_after = page_of(rows, limit, lambda row: tuple(row._mapping[f] for f in fields))
        out = []
        for row in rows:
            values = row._mapping
            out.append({**{f: values[f] for f in fields}, **{s: int(values[s]) for s in USAGE_SUMS}})
        totals = {s: int(totals_row._mapping[s]) for s in USAGE_SUMS}
        return UsagePage(tuple(group_by), out, totals, next_after)

    # Breaches

    async def breaches(self, where: BreachFilter, *, after: BreachKey | None, limit: int) -> BreachPage:
        """Breaches by occurred_at, then breach_id; keyset-paginated."""
        query = select(*(breaches.c[name] for name in BreachRecord.__slots__))
        if where.account_id is not None:
            query = query.where(breaches.c.account_id == where.account_id)
        if where.key_id is not None:
            query = query.where(breaches.c.key_id == where.key_id)
        if where.type is not None:
            query = query.where(breaches.c.type == where.type)
        if where.occurred_from is not None:
            query = query.where(breaches.c.occurred_at >= where.occurred_from)
        if where.occurred_to is not None:
            query = query.where(breaches.c.occurred_at < where.occurred_to)
        query = keyset_page(query, (breaches.c.occurred_at, breaches.c.breach_id), after, limit)
        async with self._engine.connect() as conn:
            rows = [BreachRecord(**r._mapping) for r in (await conn.execute(query)).all()]
        return BreachPage(*page_of(rows, limit, lambda b: (b.occurred_at, b.breach_id)))

    # Ledger entries

    async def ledger(self, query: LedgerQuery, *, after: int | None, limit: int) -> LedgerPage:
        """One page of entries in entry_id order.

        An account's entries are inserted under its balance-row lock (consumer, top-ups,
        packages, expiry), so within one account entry_id order is commit order: paging by
        entry_id across requests never skips an entry that commits later.
        """
        stmt = ledger_select(query)
        async with self._engine.connect() as conn:
            # Plan each page for its own values: the best path depends on how many entries the
            # account has in the window, which a generic plan (what a prepared statement gets
            # after a few runs) guesses, and for a busy account guesses badly.
            await conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_custom_plan")
            if after is None and (query.time_from is not None or query.time_to is not None):
                # Start at the window's first entry: left to itself, the planner reads the
                # account's entries from its very first one until it reaches the window.
                first = (await ledger_bounds(conn, query)).first
                if first is None:
                    return LedgerPage([], None)
                after = first - 1
            if after is not None:
                stmt = stmt.where(ledger_entries.c.entry_id > after)
            rows = [ledger_record(r) for r in (await conn.execute(stmt.limit(limit + 1))).all()]
        return LedgerPage(*page_of(rows, limit, lambda r: r.entry_id))

    # Statements

    async def statement(self, account_id: str, first_day: date, next_first_day: date) -> StatementRecord:
        """The local month [first_day, next_first_day) of an account, read from the ledger."""
        l = ledger_entries.c
        in_month = (l.local_day >= first_day) & (l.local_day < next_first_day)
        is_usage, is_topup = l.entry_type == "usage", l.entry_type == "topup"
        summary = select(
            _sum(l.balance_delta, l.local_day < first_day).label("opening"),
            _sum(l.balance_delta, in_month).label("month_delta"),
            _sum(l.balance_delta, in_month, is_topup).label("topups"),
            _count(in_month, is_topup).label("topup_count"),
            _sum(l.charge, in_month, is_usage).label("charges"),
            _sum(l.balance_delta, in_month, l.entry_type.not_in(("usage", "topup"))).label("adjustments"),
            # A usage entry moves the balance by exactly -charge; anything else is a broken ledger.
            _sum(l.balance_delta + l.charge, in_month, is_usage).label("usage_mismatch"),
            _sum(l.package_tokens, in_month, l.entry_type == "package_grant").label("granted"),
            _sum(l.package_tokens, in_month, l.entry_type == "package_expiry").label("expired"),
        ).where(l.account_id == account_id, l.local_day < next_first_day)
        by_model = (
            select(
                l.model,
                _count().label("requests"),
                *(
                    _sum(l[name]).label(name)
                    for name in ModelCharges.__slots__
                    if name not in ("model", "requests")
                ),
            )
            .where(l.account_id == account_id, is_usage, in_month)
            .group_by(l.model)
            .order_by(l.model)
        )
        async with read_snapshot(self._engine) as conn:
            zone = await conn.scalar(select(accounts.c.timezone).where(accounts.c.account_id == account_id))
            if zone is None:
                raise account_not_found(account_id)
            totals = (await conn.execute(summary)).one()._mapping
            models = [
                ModelCharges(**{k: (v if k == "model" else int(v)) for k, v in r._mapping.items()})
                for r in (await conn.execute(by_model)).all()
            ]
        opening, month_delta = int(totals["opening"]), int(totals["month_delta"])
        topups, charges, adjustments = int(totals["topups"]), int(totals["charges"]), int(totals["adjustments"])
        closing = opening + month_delta
        if int(totals["usage_mismatch"]) != 0 or closing != opening + topups - charges + adjustments:
            raise LedgerInvariantError(
                f"statement of {account_id} for {first_day:%Y-%m} does not tie out: opening {opening}, "
                f"month delta {month_delta}, top-ups {topups}, charges {charges}, adjustments {adjustments}"
            )
        return StatementRecord(
            account_id=account_id,
            timezone=zone,
            first_day=first_day,
            next_first_day=next_first_day,
            opening_balance=opening,
            topups=topups,
            topup_count=int(totals["topup_count"]),
            charges=charges,
            requests=sum(m.requests for m in models),
            by_model=models,
            package_tokens_granted=int(totals["granted"]),
            package_tokens_used=sum(m.package_tokens for m in models),
            package_tokens_expired=int(totals["expired"]),
            overage_tokens=sum(m.overage_tokens for m in models),
            overage_charge=sum(m.overage_charge for m in models),
            adjustments=adjustments,
            closing_balance=closing,
        )


def _usage_conditions(where: UsageFilter) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if where.account_id is not None:
        conditions.append(usage_daily.c.account_id == where.account_id)
    if where.key_id is not None:
        conditions.append(usage_daily.c.key_id == where.key_id)
    if where.model is not None:
        conditions.append(usage_daily.c.model == where.model)
    if where.from_day is not None:
        conditions.append(usage_daily.c.day >= where.from_day)
    if where.to_day is not None:
        conditions.append(usage_daily.c.day < where.to_day)
    return conditions

