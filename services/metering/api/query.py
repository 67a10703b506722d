"""Query parameters of the read APIs (billing, exports): parsed strictly, refused with a 400
that names the parameter. Ranges are half-open everywhere: ``from`` inclusive, ``to``
exclusive, so consecutive ranges never count anything twice.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from datetime import date, datetime
from typing import Any, TypeVar

from fastapi import Request

from services.contracts.errors import INVALID_REQUEST, TollhouseError
from services.metering.api.auth import settings_of
from services.metering.api.schemas import MAX_YEAR, MIN_YEAR, OBJECT_ID, check_model_name, parse_rfc3339

DEFAULT_PAGE_LIMIT = 100
MAX_CURSOR_CHARS = 1_000

_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_MONTH = re.compile(r"^([0-9]{4})-([0-9]{2})$")

T = TypeVar("T")


def bad(where: str, msg: str) -> TollhouseError:
    return TollhouseError(INVALID_REQUEST, f"{where}: {msg}")


def only_params(*names: str) -> Callable[[Request], None]:
    """A dependency refusing unknown and repeated query parameters.

    A misspelt filter (``acount_id``) must not silently widen a finance query to every
    account, and ``?account_id=a&account_id=b`` has no single meaning.
    """
    known = frozenset(names)

    def check(request: Request) -> None:
        seen: set[str] = set()
        for name, _ in request.query_params.multi_items():
            if name not in known:
                raise bad(f"query.{name[:40]}", f"is not a parameter of this route; known: {', '.join(names)}")
            if name in seen:
                raise bad(f"query.{name[:40]}", "is given more than once")
            seen.add(name)

    return check


def query_id(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    if not OBJECT_ID.match(value):
        raise bad(f"query.{name}", f"{value[:80]!r} is not an id such as 'acc_01JD8ZJ9…'")
    return value


def query_model(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return check_model_name(value)
    except ValueError as exc:  # PydanticCustomError is a ValueError
        raise bad("query.model", str(exc)) from None


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


def path_month(value: str) -> date:
    """``YYYY-MM`` → the first day of that month."""
    m = _MONTH.match(value)
    if m is None or not 1 <= int(m.group(2)) <= 12:
        raise bad("path.month", f"{value[:80]!r} is not a month such as '2026-11' (YYYY-MM)")
    year = int(m.group(1))
    if not MIN_YEAR <= year <= MAX_YEAR:
        raise bad("path.month", f"{value!r} is outside the years {MIN_YEAR} to {MAX_YEAR}")
    return date(year, int(m.group(2)), 1)


def check_range(low: T | None, high: T | None) -> None:
    if low is not None and high is not None and low > high:  # type: ignore[operator]
        raise bad("query.from", f"must not be after query.to ({_text(low)} > {_text(high)})")


def _text(value: Any) -> str:
    return value.isoformat() if isinstance(value, (date, datetime)) else str(value)


def page_limit(request: Request, limit: int | None) -> int:
    """The page size: ``DEFAULT_PAGE_LIMIT`` when not given; above the maximum is a 400."""
    maximum = settings_of(request).page_limit_max
    if limit is None:
        return min(DEFAULT_PAGE_LIMIT, maximum)
    if limit > maximum:
        raise bad(
            "query.limit", f"{limit} is above the maximum of {maximum} (setting TOLLHOUSE_PAGE_LIMIT_MAX)"
        )
    return limit


# Cursors: opaque to clients (base64url of a small JSON array), tagged with what they page.


def encode_cursor(kind: str, values: list[Any]) -> str:
    raw = json.dumps([kind, *values], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, kind: str, parse: Callable[[list[Any]], T]) -> T:
    """The values of a cursor made by ``encode_cursor(kind, …)``; anything else is a 400."""
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
        if not isinstance(values, list) or not values or values[0] != kind:
            raise ValueError("another kind of cursor")
        return parse(values[1:])
    except (ValueError, TypeError, IndexError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise bad(
            "query.cursor", "not a cursor of this query; pass next_cursor from the previous page unchanged"
        ) from None


def strict_int(value: Any, low: int = 1, high: int = 2**63 - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError("not an id")
    return value
