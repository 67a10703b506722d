"""Query and path parameters of the metering API: parsed strictly, and refused with a 400 (or a
404 for a path id that cannot exist) that names the parameter, never a 500.

Ranges are half-open everywhere: ``from`` inclusive, ``to`` exclusive, so consecutive
ranges never count anything twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Annotated, Any, TypeVar

from fastapi import Query, Request

from services.contracts.errors import INVALID_REQUEST, NOT_FOUND, TollhouseError
from services.metering.api.auth import settings_of
from services.metering.api.schemas import MAX_YEAR, MIN_YEAR, OBJECT_ID, check_model_name, parse_rfc3339

DEFAULT_PAGE_LIMIT = 100

_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_MONTH = re.compile(r"^([0-9]{4})-([0-9]{2})$")

T = TypeVar("T")

# What parameters accept, for the OpenAPI schema; the parsers below are what checks them.
ID_FORMAT = {"pattern": OBJECT_ID.pattern}
MODEL_FORMAT = {"pattern": r"^[A-Za-z0-9._:/-]{1,256}$"}
INSTANT_FORMAT = {"format": "date-time"}
DAY_FORMAT = {"format": "date"}
MONTH_FORMAT = {"pattern": r"^[0-9]{4}-(0[1-9]|1[0-2])$"}


def id_query(description: str) -> Any:
    return Query(description=description, json_schema_extra=ID_FORMAT)


def model_query(description: str) -> Any:
    return Query(description=description, json_schema_extra=MODEL_FORMAT)


def instant_query(description: str, alias: str | None = None) -> Any:
    return Query(alias=alias, description=description, json_schema_extra=INSTANT_FORMAT)


def day_query(description: str, alias: str | None = None) -> Any:
    return Query(alias=alias, description=description, json_schema_extra=DAY_FORMAT)


Cursor = Annotated[str | None, Query(description="next_cursor of the previous page, unchanged")]
Limit = Annotated[
    int | None,
    Query(ge=1, description=f"Rows per page: default {DEFAULT_PAGE_LIMIT}, at most the setting "
                            "TOLLHOUSE_PAGE_LIMIT_MAX (1000); more is a 400"),
]


def bad(where: str, msg: str) -> TollhouseError:
    return TollhouseError(INVALID_REQUEST, f"{where}: {msg}")


def only_params(*names: str) -> Callable[[Request], None]:
    """A dependency refusing unknown and repeated query parameters.

    A misspelt filter (``acount_id``) must not silently widen a finance query to every
    account, and ``?account_id=a&account_id=b`` has no single meaning.
    """
    known = frozenset(names)
    listed = ", ".join(names) or "none"

    def check(request: Request) -> None:
        seen: set[str] = set()
        for name, _ in request.query_params.multi_items():
            if name not in known:
                raise bad(f"query.{name[:40]}", f"is not a parameter of this route; known: {listed}")
            if name in seen:
                raise bad(f"query.{name[:40]}", "is given more than once")
            seen.add(name)

    return check


# Path parameters


def path_id(value: str, kind: str) -> str:
    """A path id that cannot exist is simply not found (and never reaches the database)."""
    if not OBJECT_ID.match(value):
        raise TollhouseError(NOT_FOUND, f"{kind} {value[:80]!r} not found")
    return value


def path_month(value: str) -> date:
    """``YYYY-MM`` → the first day of that month."""
    m = _MONTH.match(value)
    if m is None or not 1 <= int(m.group(2)) <= 12:
        raise bad("path.month", f"{value[:80]!r} is not a month such as '2026-11' (YYYY-MM)")
    year = int(m.group(1))
    if not MIN_YEAR <= year <= MAX_YEAR:
        raise bad("path.month", f"{value!r} is outside the years {MIN_YEAR} to {MAX_YEAR}")
    return date(year, int(m.group(2)), 1)


def model_name(value: str, where: str) -> str:
    """An exact model id (``where`` is ``path.model`` or ``query.model``)."""
    try:
        return check_model_name(value)
    except ValueError as exc:  # PydanticCustomError is a ValueError
        raise bad(where, str(exc)) from None


# Query parameters


def query_id(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    if not OBJECT_ID.match(value):
        raise bad(f"query.{name}", f"{value[:80]!r} is not an id such as 'acc_01JD8ZJ9…'")
    return value


def query_model(value: str | None) -> str | None:
    return None if value is None else model_name(value, "query.model")


def query_day(value: str | None, name: str) -> date | None:
    """``YYYY-MM-DD`` → date (a local day of the account)."""
    if value is None:
        return None
    try:
        if not _DATE.match(value):
            raise ValueError
        day = date.fromisoformat(value)
    except ValueError:
        raise bad(f"query.{name}", f"{value[:80]!r} is not a date such as '2026-11-22' (YYYY-MM-DD)") from None
    if not MIN_YEAR <= day.year <= MAX_YEAR:
        raise bad(f"query.{name}", f"{value!r} is outside the years {MIN_YEAR} to {MAX_YEAR}")
    return day


def query_instant(value: str | None, name: str) -> datetime | None:
    """RFC 3339 with an offset → aware UTC datetime."""
    if value is None:
        return None
    try:
        return parse_rfc3339(value)
    except ValueError as exc:
        raise bad(f"query.{name}", str(exc)) from None


def page_limit(request: Request, limit: int | None, default: int = DEFAULT_PAGE_LIMIT) -> int:
    """The page size asked for, or ``default``; above the maximum is a 400 (never silently cut)."""
    maximum = settings_of(request).page_limit_max
    if limit is None:
        return min(default, maximum)
    if limit < 1:
        raise bad("query.limit", f"must be at least 1, got {limit}")
    if limit > maximum:
        raise bad(
            "query.limit", f"{limit} is above the maximum of {maximum} (setting TOLLHOUSE_PAGE_LIMIT_MAX)"
        )
    return limit


# Ranges. A filter range may be empty (``from == to``); a reporting window may not.


def check_range(low: T | None, high: T | None) -> None:
    if low is not None and high is not None and low > high:  # type: ignore[operator]
        raise bad("query.from", f"must not be after query.to ({_text(low)} > {_text(high)})")


def _text(value: Any) -> str:
    return value.isoformat() if isinstance(value, (date, datetime)) else str(value)


def check_window(lower: datetime | None, upper: datetime | None, *, max_days: int | None = None) -> None:
    """A window [from, to) must not be empty, nor longer than ``max_days`` when that is given."""
    if lower is None or upper is None:
        return
    if upper <= lower:
        raise bad(
            "query.to", f"{upper.isoformat()} must be after query.from {lower.isoformat()} (the window is [from, to))"
        )
    if max_days is not None and upper - lower > timedelta(days=max_days):
        raise bad(
            "query.to",
            f"the window from {lower.isoformat()} to {upper.isoformat()} is longer than {max_days} days "
            "(setting TOLLHOUSE_RECONCILIATION_MAX_WINDOW_DAYS); ask for shorter windows",
        )


def required_window(start: str | None, end: str | None, *, max_days: int) -> tuple[datetime, datetime]:
    """``from`` and ``to``, both required: the half-open window [from, to), at most ``max_days`` long."""
    missing = [name for name, value in (("from", start), ("to", end)) if value is None]
    if missing:
        raise TollhouseError(
            INVALID_REQUEST,
            "; ".join(f"query.{name}: is required (RFC 3339 with an offset, e.g. 2026-11-22T00:00:00+08:00)"
                      for name in missing),
        )
    lower, upper = query_instant(start, "from"), query_instant(end, "to")
    assert lower is not None and upper is not None
    check_window(lower, upper, max_days=max_days)
    return lower, upper
