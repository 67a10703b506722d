"""Query-string parameters shared by the billing-side routers: times, windows, page limits,
cursors and a guard against misspelt parameters.

Each helper turns bad input into a 400 in the documented error shape that names the
parameter (``query.from: …``), never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from fastapi import Request

from services.contracts.errors import INVALID_REQUEST, TollhouseError
from services.metering.api.schemas import parse_rfc3339

MAX_CURSOR_CHARS = 1_000


def time_param(value: str | None, name: str) -> datetime | None:
    """An RFC 3339 query parameter with an offset → aware UTC datetime (None when absent)."""
    if value is None:
        return None
    try:
        return parse_rfc3339(value)
    except ValueError as exc:  # PydanticCustomError is a ValueError
        raise TollhouseError(INVALID_REQUEST, f"query.{name}: {exc}") from None


def required_window(start: str | None, end: str | None, *, max_days: int) -> tuple[datetime, datetime]:
    """``from`` and ``to``, both required: the half-open window [from, to), at most ``max_days`` long."""
    missing = [name for name, value in (("from", start), ("to", end)) if value is None]
    if missing:
        raise TollhouseError(
            INVALID_REQUEST,
            "; ".join(f"query.{name}: is required (RFC 3339 with an offset, e.g. 2026-11-22T00:00:00+08:00)"
                      for name in missing),
        )
    lower, upper = time_param(start, "from"), time_param(end, "to")
    assert lower is not None and upper is not None
    check_window(lower, upper, max_days=max_days)
    return lower, upper


def check_window(lower: datetime | None, upper: datetime | None, *, max_days: int | None = None) -> None:
    if lower is not None and upper is not None:
        if upper <= lower:
            raise TollhouseError(
                INVALID_REQUEST,
                f"query.to: {upper.isoformat()} must be after query.from {lower.isoformat()} "
                "(the window is [from, to))",
            )
        if max_days is not None and upper - lower > timedelta(days=max_days):
            raise TollhouseError(
                INVALID_REQUEST,
                f"query.to: the window from {lower.isoformat()} to {upper.isoformat()} is longer than "
                f"{max_days} days (setting TOLLHOUSE_RECONCILIATION_MAX_WINDOW_DAYS); ask for shorter windows",
            )


def page_limit(limit: int | None, *, default: int, maximum: int) -> int:
    """The page size asked for, or ``default``; above ``maximum`` is a 400 (never silently cut)."""
    if limit is None:
        return min(default, maximum)
    if limit < 1:
        raise TollhouseError(INVALID_REQUEST, f"query.limit: must be at least 1, got {limit}")
    if limit > maximum:
        raise TollhouseError(
            INVALID_REQUEST,
            f"query.limit: {limit} is above the maximum of {maximum} (setting TOLLHOUSE_PAGE_LIMIT_MAX)",
        )
    return limit


def refuse_unknown_params(request: Request, allowed: Iterable[str]) -> None:
    """A misspelt filter (``?reson=…``) must not silently widen the answer: refuse it."""
    known = set(allowed)
    unknown = sorted({name for name in request.query_params.keys() if name not in known})
    if unknown:
        raise TollhouseError(
            INVALID_REQUEST,
            f"query.{unknown[0][:80]}: is not a parameter of this route; it takes {', '.join(sorted(known)) or 'none'}",
        )


def encode_cursor(values: list[Any]) -> str:
    """An opaque cursor: URL-safe base64 of a JSON array."""
    raw = json.dumps(values, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> list[Any]:
    """The JSON array behind ``cursor``; anything else is a 400 (the caller checks the items)."""
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
        if not isinstance(values, list):
            raise ValueError("not a list")
        return values
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise bad_cursor() from None


def bad_cursor() -> TollhouseError:
    return TollhouseError(
        INVALID_REQUEST, "query.cursor: not a cursor from this API; pass next_cursor from the previous page"
    )
