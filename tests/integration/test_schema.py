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
