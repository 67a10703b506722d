"""Page cursors of the list routes: opaque to clients (URL-safe base64 of a small JSON array),
tagged with the listing they page, so a cursor of one listing is refused by another.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any, TypeVar

from services.metering.api.query import bad

MAX_CURSOR_CHARS = 1_000

T = TypeVar("T")


def encode_cursor(kind: str, values: list[Any]) -> str:
    """The cursor of the listing ``kind`` resuming after ``values`` (JSON-serialisable)."""
    raw = json.dumps([kind, *values], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, kind: str, parse: Callable[[list[Any]], T]) -> T:
    """``parse`` of the values of a cursor made by ``encode_cursor(kind, …)``; anything else is a 400.

    ``parse`` raises ValueError, TypeError or IndexError for values it does not accept.
    """
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
    """A JSON integer in [low, high] (not a bool), for ids and positions in cursors."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError("not an integer in range")
    return value
