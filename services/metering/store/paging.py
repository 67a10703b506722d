"""Keyset pagination for the list queries: a page is the rows after the last one the client
saw, in a stable order; one row more than the page is read to know whether another follows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, literal, tuple_

R = TypeVar("R")
K = TypeVar("K")


def keyset_page(
    stmt: Select, order: Sequence[ColumnElement[Any]], after: Sequence[Any] | None, limit: int,
    *, descending: bool = False,
) -> Select:
    """``stmt`` ordered by ``order``, from the row after ``after`` (its values of ``order``), for
    ``limit + 1`` rows (see ``page_of``)."""
    if after is not None:
        position = tuple_(*order)
        bound = tuple_(*(literal(value, column.type) for value, column in zip(after, order, strict=True)))
        stmt = stmt.where(position < bound if descending else position > bound)
    return stmt.order_by(*(column.desc() if descending else column for column in order)).limit(limit + 1)


def page_of(rows: list[R], limit: int, key: Callable[[R], K]) -> tuple[list[R], K | None]:
    """The first ``limit`` of ``rows`` and, when more follow, the ``key`` of the last one to resume after."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, key(rows[-1])
