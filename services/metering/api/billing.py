"""Billing and finance read API (DESIGN §6.4): usage, breaches, ledger entries, statements.

Read-only; the billing token or the admin token. Routers parse and check the query, then
call ``services.metering.store.billing``; money leaves as decimal CNY strings, with a
fen-rounded twin (``…_fen``) where people read it (statements).
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.contracts.breaches import breach_view
from services.contracts.money import format_cny, format_fen
from services.metering.api.auth import ADMIN, BILLING, require_billing_read, role_checked_route
from services.metering.api.cursors import decode_cursor, encode_cursor, strict_int
from services.metering.api.query import (
    MONTH_FORMAT,
    Cursor,
    Limit,
    bad,
    check_range,
    day_query,
    id_query,
    instant_query,
    model_query,
    only_params,
    page_limit,
    path_id,
    path_month,
    query_day,
    query_id,
    query_instant,
    query_model,
)
from services.metering.api.schemas import OBJECT_ID, ErrorBody, check_model_name, parse_rfc3339
from services.metering.api.stores import app_store
from services.metering.domain.periods import local_midnight, next_month
from services.metering.ledger_export import format_instant
from services.metering.store.billing import (
    BREACH_TYPES,
    USAGE_GROUPS,
    USAGE_SUMS,
    BillingStore,
    BreachFilter,
    BreachKey,
    LedgerQuery,
    LedgerRecord,
    StatementRecord,
    UsageFilter,
)

router = APIRouter(
    tags=["billing"],
    dependencies=[Depends(require_billing_read)],
    route_class=role_checked_route(BILLING, ADMIN),
    responses={status: {"model": ErrorBody} for status in (400, 401, 403, 404)},
)


def billing_store(request: Request) -> BillingStore:
    return app_store(request, BillingStore)


Store = Annotated[BillingStore, Depends(billing_store)]


# Responses


class UsageSums(BaseModel):
    requests: int
    inputs: int
    prompt_tokens: int = Field(description="Includes cached_tokens")
    completion_tokens: int = Field(description="Includes reasoning_tokens")
    cached_tokens: int
    reasoning_tokens: int
    total_tokens: int
    package_tokens: int = Field(description="Tokens deducted from packages")
    charge: str = Field(description="PAYG charges, decimal CNY")


class UsageRow(UsageSums):
    day: str | None = Field(None, description="Local day (YYYY-MM-DD); only when grouped by day")
    month: str | None = Field(None, description="Local month (YYYY-MM); only when grouped by month")
    model: str | None = Field(None, description="Only when grouped by model")
    key_id: str | None = Field(None, description="Only when grouped by key")


class UsageReport(BaseModel):
    group_by: list[str]
    data: list[UsageRow] = Field(description="Rows carry only the group fields asked for, then the sums")
    totals: UsageSums = Field(description="Sums over everything the filter matches (all pages)")
    next_cursor: str | None


class BreachOut(BaseModel):
    breach_id: str
    account_id: str
    key_id: str | None
    package_id: str | None
    type: str
    period: str | None
    unit: str = Field(description='"cny": cap, spend, overshoot are decimal CNY; "tokens": integers')
    cap: str
    spend: str
    overshoot: str
    event_id: str | None
    occurred_at: str = Field(json_schema_extra={"format": "date-time"})


class BreachList(BaseModel):
    data: list[BreachOut]
    next_cursor: str | None


class LedgerEntryOut(BaseModel):
    entry_id: int
    entry_type: str = Field(description="usage, topup, package_grant, package_expiry or reversal")
    account_id: str
    key_id: str | None
    package_id: str | None
    model: str | None
    event_time: str = Field(description="UTC, RFC 3339", json_schema_extra={"format": "date-time"})
    event_time_local: str = Field(description="In the account's zone, RFC 3339 with offset")
    local_day: str
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
    charge: str
    overage_charge: str
    balance_delta: str
    price_id: int | None = Field(description="The price version the entry was rated with")
    reservation_id: str | None
    reverses_entry_id: int | None
    created_at: str = Field(json_schema_extra={"format": "date-time"})


class LedgerList(BaseModel):
    data: list[LedgerEntryOut]
    next_cursor: str | None


class Money(BaseModel):
    amount: str = Field(description="Decimal CNY, exact")
    fen: str = Field(description="Rounded half-to-even to the fen, for people")


class ModelChargesOut(BaseModel):
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
    charge: Money
    overage_charge: Money


class TopupsOut(BaseModel):
    count: int
    amount: Money


class ChargesOut(BaseModel):
    requests: int
    amount: Money
    by_model: list[ModelChargesOut]


class PackagesOut(BaseModel):
    tokens_granted: int
    tokens_used: int
    tokens_expired: int = Field(description="Left in packages that expired in the month (breakage)")


class OverageOut(BaseModel):
    tokens: int = Field(description="Package-key tokens beyond what the package had")
    charge: Money = Field(description="The part of PAYG charges that took the balance below zero")


class StatementOut(BaseModel):
    account_id: str
    month: str
    timezone: str
    first_day: str
    last_day: str
    starts_at: str = Field(description="Local midnight starting the month, RFC 3339 with offset")
    ends_at: str = Field(description="Local midnight ending the month (exclusive)")
    opening_balance: Money
    topups: TopupsOut
    charges: ChargesOut
    packages: PackagesOut
    overage: OverageOut
    adjustments: Money = Field(description="Balance changes by other entries (reversals); 0 when none")
    closing_balance: Money = Field(description="opening_balance + topups - charges + adjustments, exactly")


def _money(nano: int) -> Money:
    return Money(amount=format_cny(nano), fen=format_fen(nano))


def ledger_entry_out(r: LedgerRecord) -> LedgerEntryOut:
    return LedgerEntryOut(
        entry_id=r.entry_id,
        entry_type=r.entry_type,
        account_id=r.account_id,
        key_id=r.key_id,
        package_id=r.package_id,
        model=r.model,
        event_time=format_instant(r.event_time),
        event_time_local=format_instant(r.event_time, r.timezone),
        local_day=r.local_day.isoformat(),
        request_id=r.request_id,
        event_id=r.event_id,
        reference=r.reference,
        source=r.source,
        endpoint=r.endpoint,
        kind=r.kind,
        status=r.status,
        usage_estimated=r.usage_estimated,
        inputs=r.inputs,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        cached_tokens=r.cached_tokens,
        reasoning_tokens=r.reasoning_tokens,
        total_tokens=r.total_tokens,
        package_tokens=r.package_tokens,
        overage_tokens=r.overage_tokens,
        charge=format_cny(r.charge),
        overage_charge=format_cny(r.overage_charge),
        balance_delta=format_cny(r.balance_delta),
        price_id=r.price_id,
        reservation_id=r.reservation_id,
        reverses_entry_id=r.reverses_entry_id,
        created_at=format_instant(r.created_at),
    )


def statement_out(s: StatementRecord) -> StatementOut:
    return StatementOut(
        account_id=s.account_id,
        month=s.first_day.strftime("%Y-%m"),
        timezone=s.timezone,
        first_day=s.first_day.isoformat(),
        last_day=date.fromordinal(s.next_first_day.toordinal() - 1).isoformat(),
        starts_at=format_instant(local_midnight(s.first_day, s.timezone), s.timezone),
        ends_at=format_instant(local_midnight(s.next_first_day, s.timezone), s.timezone),
        opening_balance=_money(s.opening_balance),
        topups=TopupsOut(count=s.topup_count, amount=_money(s.topups)),
        charges=ChargesOut(
            requests=s.requests,
            amount=_money(s.charges),
            by_model=[
                ModelChargesOut(
                    model=m.model,
                    requests=m.requests,
                    inputs=m.inputs,
                    prompt_tokens=m.prompt_tokens,
                    completion_tokens=m.completion_tokens,
                    cached_tokens=m.cached_tokens,
                    reasoning_tokens=m.reasoning_tokens,
                    total_tokens=m.total_tokens,
                    package_tokens=m.package_tokens,
                    overage_tokens=m.overage_tokens,
                    charge=_money(m.charge),
                    overage_charge=_money(m.overage_charge),
                )
                for m in s.by_model
            ],
        ),
        packages=PackagesOut(
            tokens_granted=s.package_tokens_granted,
            tokens_used=s.package_tokens_used,
            tokens_expired=s.package_tokens_expired,
        ),
        overage=OverageOut(tokens=s.overage_tokens, charge=_money(s.overage_charge)),
        adjustments=_money(s.adjustments),
        closing_balance=_money(s.closing_balance),
    )


# Usage


def _group_by(value: str | None) -> list[str]:
    if value is None:
        return ["day"]
    names = [part.strip() for part in value.split(",")]
    for name in names:
        if name not in USAGE_GROUPS:
            raise bad(
                "query.group_by",
                f"{name[:40]!r} is not a grouping; use day, month, model or key, or a comma list such as 'day,model'",
            )
    if len(set(names)) != len(names):
        raise bad("query.group_by", f"{value[:80]!r} names a grouping more than once")
    return names


def _usage_value(group: str, value: Any) -> Any:
    if group == "day":
        return value.isoformat()
    if group == "month":
        return value.strftime("%Y-%m")
    return value


def _parse_usage_cursor(group_by: list[str]) -> Any:
    def parse(values: list[Any]) -> tuple[Any, ...]:
        if len(values) != len(group_by) + 1 or values[0] != ",".join(group_by):
            raise ValueError("another grouping")
        out: list[Any] = []
        for group, value in zip(group_by, values[1:]):
            if not isinstance(value, str):
                raise ValueError("not a string")
            if group == "day":
                out.append(date.fromisoformat(value))
            elif group == "month":
                out.append(date.fromisoformat(value + "-01"))
            elif group == "model":
                out.append(check_model_name(value))
            elif OBJECT_ID.match(value):
                out.append(value)
            else:
                raise ValueError("not a key id")
        return tuple(out)

    return parse


@router.get(
    "/v1/usage",
    response_model=None,
    responses={200: {"model": UsageReport, "description": "Usage rows, their totals, and the next page"}},
    dependencies=[Depends(only_params("account_id", "key_id", "model", "from", "to", "group_by", "cursor", "limit"))],
)
async def usage(
    request: Request,
    store: Store,
    account_id: Annotated[str | None, id_query("The account (this or key_id is required)")] = None,
    key_id: Annotated[str | None, id_query("Only this key (this or account_id is required)")] = None,
    model: Annotated[str | None, model_query("Only this model (exact, case-sensitive)")] = None,
    from_: Annotated[
        str | None, day_query("First local day, inclusive (YYYY-MM-DD, the account's zone)", alias="from")
    ] = None,
    to: Annotated[str | None, day_query("Local day the range ends before: EXCLUSIVE (YYYY-MM-DD)")] = None,
    group_by: Annotated[
        str | None, Query(description="day (default), month, model, key, or a comma list such as 'day,model'")
    ] = None,
    cursor: Cursor = None,
    limit: Limit = None,
) -> JSONResponse:
    """Requests, inputs, tokens, package tokens and charges per group, from the daily rollup.

    Days are the account's local days; ``from`` is inclusive and ``to`` exclusive
    (``from=2026-11-01&to=2026-12-01`` is November). Rows are ordered by the group fields in
    the order given in ``group_by``; ``totals`` cover the whole filter, not just the page.
    """
    account_id, key_id = query_id(account_id, "account_id"), query_id(key_id, "key_id")
    if account_id is None and key_id is None:
        raise bad("query", "account_id or key_id is required")
    where = UsageFilter(account_id, key_id, query_model(model), query_day(from_, "from"), query_day(to, "to"))
    check_range(where.from_day, where.to_day)
    groups = _group_by(group_by)
    limit = page_limit(request, limit)
    after = None if cursor is None else decode_cursor(cursor, "usage", _parse_usage_cursor(groups))
    await store.check_scope(account_id=account_id, key_id=key_id)
    page = await store.usage(where, groups, after=after, limit=limit)
    fields = [USAGE_GROUPS[g][0] for g in groups]
    rows = []
    for row in page.rows:
        out = {f: _usage_value(g, row[f]) for g, f in zip(groups, fields)}
        out.update({s: row[s] for s in USAGE_SUMS})
        out["charge"] = format_cny(row["charge"])
        rows.append(out)
    totals: dict[str, Any] = dict(page.totals)
    totals["charge"] = format_cny(page.totals["charge"])
    next_cursor = None
    if page.next_after is not None:
        values = [_usage_value(g, v) for g, v in zip(groups, page.next_after)]
        next_cursor = encode_cursor("usage", [",".join(groups), *values])
    return JSONResponse({"group_by": groups, "data": rows, "totals": totals, "next_cursor": next_cursor})


# Breaches


def _parse_breach_cursor(values: list[Any]) -> BreachKey:
    occurred_at, breach_id = values
    if not isinstance(breach_id, str) or not OBJECT_ID.match(breach_id):
        raise ValueError("not a breach id")
    return parse_rfc3339(occurred_at), breach_id


@router.get(
    "/v1/breaches",
    response_model=BreachList,
    dependencies=[Depends(only_params("account_id", "key_id", "type", "from", "to", "cursor", "limit"))],
)
async def list_breaches(
    request: Request,
    store: Store,
    account_id: Annotated[str | None, id_query("Only this account")] = None,
    key_id: Annotated[str | None, id_query("Only this key")] = None,
    type: Annotated[
        str | None,
        Query(description=f"Only this type: {', '.join(BREACH_TYPES)}", json_schema_extra={"enum": list(BREACH_TYPES)}),
    ] = None,
    from_: Annotated[str | None, instant_query("occurred_at ≥ this RFC 3339 instant", alias="from")] = None,
    to: Annotated[str | None, instant_query("occurred_at < this RFC 3339 instant (exclusive)")] = None,
    cursor: Cursor = None,
    limit: Limit = None,
) -> BreachList:
    """Recorded breaches, oldest first (by occurred_at, then breach_id)."""
    account_id, key_id = query_id(account_id, "account_id"), query_id(key_id, "key_id")
    if type is not None and type not in BREACH_TYPES:
        raise bad("query.type", f"{type[:40]!r} is not a breach type; use one of {', '.join(BREACH_TYPES)}")
    where = BreachFilter(account_id, key_id, type, query_instant(from_, "from"), query_instant(to, "to"))
    check_range(where.occurred_from, where.occurred_to)
    limit = page_limit(request, limit)
    after = None if cursor is None else decode_cursor(cursor, "breaches", _parse_breach_cursor)
    await store.check_scope(account_id=account_id, key_id=key_id)
    page = await store.breaches(where, after=after, limit=limit)
    data = [BreachOut(**breach_view(**{name: getattr(b, name) for name in b.__slots__})) for b in page.rows]
    next_cursor = None
    if page.next_after is not None:
        next_cursor = encode_cursor("breaches", [format_instant(page.next_after[0]), page.next_after[1]])
    return BreachList(data=data, next_cursor=next_cursor)


# Ledger entries


def _parse_ledger_cursor(values: list[Any]) -> int:
    (entry_id,) = values
    return strict_int(entry_id)


@router.get(
    "/v1/ledger",
    response_model=LedgerList,
    dependencies=[Depends(only_params("account_id", "from", "to", "cursor", "limit"))],
)
async def list_ledger(
    request: Request,
    store: Store,
    account_id: Annotated[str | None, id_query("The account (required)")] = None,
    from_: Annotated[str | None, instant_query("event_time ≥ this RFC 3339 instant", alias="from")] = None,
    to: Annotated[str | None, instant_query("event_time < this RFC 3339 instant (exclusive)")] = None,
    cursor: Cursor = None,
    limit: Limit = None,
) -> LedgerList:
    """The account's raw ledger entries in entry_id order; money as decimal CNY strings."""
    account_id = query_id(account_id, "account_id")
    if account_id is None:
        raise bad("query.account_id", "is required")
    query = LedgerQuery(account_id, query_instant(from_, "from"), query_instant(to, "to"))
    check_range(query.time_from, query.time_to)
    limit = page_limit(request, limit)
    after = None if cursor is None else decode_cursor(cursor, "ledger", _parse_ledger_cursor)
    await store.check_scope(account_id=account_id, key_id=None)
    page = await store.ledger(query, after=after, limit=limit)
    return LedgerList(
        data=[ledger_entry_out(r) for r in page.rows],
        next_cursor=None if page.next_after is None else encode_cursor("ledger", [page.next_after]),
    )


# Statements


@router.get("/v1/statements/{account_id}/{month}", response_model=StatementOut)
async def statement(
    account_id: str,
    month: Annotated[str, Path(description="A local month, YYYY-MM", json_schema_extra=MONTH_FORMAT)],
    store: Store,
) -> StatementOut:
    """The account's statement for a local month (``YYYY-MM``, in the account's zone).

    ``closing_balance = opening_balance + topups - charges + adjustments`` holds exactly in
    the decimal ``amount`` strings; the ``fen`` strings are each rounded for people.
    """
    account_id = path_id(account_id, "account")
    first = path_month(month)
    return statement_out(await store.statement(account_id, first, next_month(first)))
