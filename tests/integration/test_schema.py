"""The schema as Alembic builds it: append-only tables refuse changes."""

from __future__ import annotations

import psycopg
import pytest


@pytest.mark.parametrize("statement", ["UPDATE ledger_entries SET charge = 0", "DELETE FROM ledger_entries"])
def test_ledger_refuses_update_and_delete(database_url: str, statement: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO accounts (account_id, name, tier, timezone) VALUES ('acc_1', 'a', 'free', 'UTC')")
        conn.execute(
            "INSERT INTO ledger_entries (entry_type, account_id, event_time, local_day, balance_delta)"
            " VALUES ('topup', 'acc_1', now(), current_date, 100)"
        )
        with pytest.raises(psycopg.errors.RestrictViolation, match="append-only"):
            conn.execute(statement)


def test_breaches_refuse_delete(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO breaches (breach_id, type, account_id, unit, cap, spend, overshoot, occurred_at)"
            " VALUES ('brk_1', 'balance_depleted', 'acc_1', 'cny', 0, 1, 1, now())"
        )
        with pytest.raises(psycopg.errors.RestrictViolation):
            conn.execute("DELETE FROM breaches")


def test_migrations_build_the_schema_the_models_describe(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from services.metering.store.db import driver_url
    from services.metering.store.tables import Base

    engine = create_engine(driver_url(database_url, "psycopg"))
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            # autogenerate does not compare INCLUDE columns: check the ledger's covering index.
            definition = conn.exec_driver_sql(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_ledger_entries_account_event_time'").scalar()
            # Nor storage parameters: the tables updated in place leave room in their pages.
            roomy = {name for (name,) in conn.exec_driver_sql(
                "SELECT relname FROM pg_class WHERE relkind = 'r' AND 'fillfactor=50' = ANY(reloptions)")}
    finally:
        engine.dispose()
    assert definition is not None and definition.endswith("(account_id, event_time) INCLUDE (entry_id)")
    described = {t.name for t in Base.metadata.tables.values() if t.dialect_options["postgresql"]["with"]}
    assert roomy == described
    assert {"usage_daily", "key_spend", "account_balances"} <= described


def test_migration_0004_downgrades_and_upgrades_again(database_url: str) -> None:
    from alembic import command

    from services.metering.store.migrate import alembic_config

    def roomy() -> set[str]:
        with psycopg.connect(database_url) as conn:
            return {name for (name,) in conn.execute(
                "SELECT relname FROM pg_class WHERE relkind = 'r' AND 'fillfactor=50' = ANY(reloptions)")}

    assert "usage_daily" in roomy()
    config = alembic_config(database_url)
    command.downgrade(config, "20261122_0003")
    assert roomy() == set()
    command.upgrade(config, "head")
    assert "usage_daily" in roomy()
