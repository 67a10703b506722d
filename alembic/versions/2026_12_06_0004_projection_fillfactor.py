"""leave room in the pages of the tables every batch updates in place (fillfactor 50)

Revision ID: 20261206_0004
Revises: 20261122_0003
Create Date: 2026-12-06 21:00:00+00:00

Every consumer batch updates the projection rows its events touch: a key's daily and
monthly spend, the usage rollup per key, model and day, account and package balances,
ingest counters and offsets. In a full page an updated row's new version goes to another
page, and every index of the table gets an entry for it. With room left in the page the
new version stays beside the old one, no index changes (a heap-only tuple update), and the
old version is pruned when the page is next read. In the ingest benchmark this cut the
rollup's upsert from about 14–16 µs of PostgreSQL time per row to about 6, and the spend
upsert from about 7 to about 4.

Only pages written from now on keep the room; existing pages fill as before until the
table is rewritten (VACUUM FULL or pg_repack, if wanted). No lock beyond a brief one per
table is taken.
"""

from __future__ import annotations

from alembic import op


revision = "20261206_0004"
down_revision = "20261122_0003"
branch_labels = None
depends_on = None

UPDATED_IN_PLACE = (
    "usage_daily", "key_spend", "account_balances", "package_balances",
    "ingest_stats", "ingest_stats_daily", "consumer_offsets",
)
FILLFACTOR = 50


def upgrade() -> None:
    for table in UPDATED_IN_PLACE:
        op.execute(f"ALTER TABLE {table} SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    for table in UPDATED_IN_PLACE:
        op.execute(f"ALTER TABLE {table} RESET (fillfactor)")
