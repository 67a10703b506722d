"""Real servers for the tests: an embedded PostgreSQL (or TOLLHOUSE_TEST_DATABASE_URL) and a
Kafka-protocol broker on a free port. Nothing is mocked and nothing is skipped: a server
that cannot start fails the run.

Each test that asks for ``database_url`` gets a fresh database cloned from a template
that Alembic migrated once per session.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from services.local_services import LocalBroker, start_embedded_postgres, stop_embedded_postgres
from services.metering.store.migrate import upgrade_to_head
from services.runtime import with_database


def _admin_execute(url: str, *statements: str) -> None:
    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("TOLLHOUSE_TEST_DATABASE_URL")
    if external:
        yield external
        return
    pgdata = tmp_path_factory.mktemp("pg") / "data"
    url = start_embedded_postgres(pgdata)
    yield url
    stop_embedded_postgres(pgdata)


@pytest.fixture(scope="session")
def template_database(pg_server_url: str) -> str:
    name = f"tollhouse_tpl_{uuid.uuid4().hex[:8]}"
    _admin_execute(pg_server_url, f'CREATE DATABASE "{name}"')
    upgrade_to_head(with_database(pg_server_url, name))
    return name


@contextlib.contextmanager
def migrated_database(pg_server_url: str, template_database: str, prefix: str = "tollhouse_t") -> Iterator[str]:
    """A fresh database copied from the migrated template, dropped afterwards: its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _admin_execute(pg_server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    try:
        yield with_database(pg_server_url, name)
    finally:
        _admin_execute(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(pg_server_url: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    with migrated_database(pg_server_url, template_database) as url:
        yield url


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    local = LocalBroker(log_path=log).start()
    yield local
    local.stop()


@pytest.fixture
def topic_names() -> dict[str, str]:
    """Unique topic names per test so tests never read each other's events."""
    suffix = uuid.uuid4().hex[:10]
    return {
        "usage_topic": f"usage-{suffix}",
        "dlq_topic": f"usage-{suffix}.dlq",
        "breach_topic": f"breaches-{suffix}",
        "consumer_group": f"metering-{suffix}",
    }
