"""ledger index on (account_id, event_time) for time windows of one account

Revision ID: 20261122_0003
Revises: 20261122_0002
Create Date: 2026-11-22 18:00:00+00:00

The billing reads ask for one account's entries in an event-time window, in entry_id
order: ``GET /v1/ledger`` and the ledger export. With only (account_id, entry_id) the
database walked the account's whole history from its first entry to reach the window
(seconds for a busy account of a 10-million-entry ledger). This index finds the window's
count and first and last entry_id from the index alone (an index-only scan, ``entry_id``
is included), and the entry_id range scan then starts at the window.

Built CONCURRENTLY, outside the migration's transaction, so a live ledger keeps taking
writes while it is built.
"""

from __future__ import annotations

from alembic import op


revision = "20261122_0003"
down_revision = "20261122_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_ledger_entries_account_event_time",
            "ledger_entries",
            ["account_id", "event_time"],
            unique=False,
            postgresql_include=["entry_id"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_ledger_entries_account_event_time",
            table_name="ledger_entries",
            postgresql_concurrently=True,
            if_exists=True,
        )
