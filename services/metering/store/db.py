"""Engines: the project picks its own drivers from a plain libpq ``postgresql://`` URL."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def driver_url(url: str, driver: str) -> str:
    """``postgresql://u@h/db?host=/dir`` → ``postgresql+<driver>://…`` (keeps the rest)."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: scheme {parts.scheme!r}")
    return urlunsplit((f"postgresql+{driver}",) + tuple(parts[1:]))


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        driver_url(url, "asyncpg"),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        connect_args={"server_settings": {"timezone": "UTC", "application_name": "tollhouse"}},
    )
