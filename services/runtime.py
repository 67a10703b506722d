"""Resolving where PostgreSQL and Kafka are: configured servers, or the embedded ones."""

from __future__ import annotations

import asyncio
import gc
import signal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from services.local_services import start_embedded_postgres
from services.settings import Settings

EMBEDDED_DATABASE = "tollhouse"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def ensure_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server if it is missing; return its URL."""
    with psycopg.connect(with_database(server_url, "postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(server_url, name)


def database_url(settings: Settings) -> str:
    """``TOLLHOUSE_DATABASE_URL``, or the embedded server under ``data_dir`` (started if needed)."""
    if settings.database_url:
        return settings.database_url
    server = start_embedded_postgres(Path(settings.data_dir) / "pg")
    return ensure_database(server, EMBEDDED_DATABASE)


# A metering or gateway process allocates many short-lived objects per batch or request
# (decoded events, rows, responses) on top of a large, permanent heap (modules, the app,
# caches). With the default thresholds the collector keeps re-walking that permanent heap:
# in the consumer that cost as much CPU as rating itself.
GC_YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Call once start-up is done: what is alive now stays alive, so the collector can skip it."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop``. Where the event loop cannot take signal handlers (no
    support on the platform, or a loop outside the main thread, as in tests) the caller's
    own ``stop`` is the only way to end."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
