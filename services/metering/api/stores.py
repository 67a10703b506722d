"""What routers take from the app ``create_app`` built: its stores and its clock.

A store holds nothing but the engine, so each kind is built once per app, on first use,
over ``app.state.engine``; the admin store (built by ``create_app``) carries the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncEngine

S = TypeVar("S")


def app_store(request: Request, store_class: Callable[[AsyncEngine], S]) -> S:
    """The app's one ``store_class`` store over its engine."""
    state = request.app.state
    stores: dict[Callable[[AsyncEngine], object], object] | None = getattr(state, "stores", None)
    if stores is None:
        stores = state.stores = {}
    store = stores.get(store_class)
    if store is None:
        store = stores[store_class] = store_class(state.engine)
    return store  # type: ignore[return-value]


def app_now(request: Request) -> datetime:
    """Now, by the app's clock (tests move it)."""
    return request.app.state.admin_store.now()
