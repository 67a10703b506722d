"""reconciliation counters per day, dead-letter Kafka keys and replays

Revision ID: 20261122_0002
Revises: 20261122_0001
Create Date: 2026-11-22 12:00:00+00:00

* ``ingest_stats_daily``: the consumer's counters per event source and UTC day of
  processing, so reconciliation can answer for a time window (``ingest_stats`` keeps its
  all-time totals).
* ``dead_letters.message_key``: the Kafka key the message came with, so a replay is
  published under the same key (and lands on the same partition as the account's other
  events). NULL for dead letters recorded before this migration.
* ``dead_letter_replays``: one row per replayed dead letter, written in the same
  transaction as the outbox row that re-publishes it; append-only, like the ledger.
* An index on ``dead_letters (received_at, topic, topic_partition, kafka_offset)`` for the
  listing's order (newest first, then by Kafka position), keyset pagination and time filter.
"""

from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = "20261122_0002"
down_revision = "20261122_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_stats_daily",
        sa.Column("source", sa.String(length=256), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("received", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("accepted", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("duplicates", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("conflicts", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("dead_lettered", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("day", "source", name=op.f("pk_ingest_stats_daily")),
    )
    # Updated in place by every batch, like the projections: keep the updates HOT.
    op.execute("ALTER TABLE ingest_stats_daily SET (fillfactor = 70)")

    op.add_column("dead_letters", sa.Column("message_key", sa.LargeBinary(), nullable=True))
    op.create_index(
        "ix_dead_letters_received",
        "dead_letters",
        ["received_at", "topic", "topic_partition", "kafka_offset"],
        unique=False,
    )

    op.create_table(
        "dead_letter_replays",
        sa.Column("dead_letter_id", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=128), nullable=True),
        sa.Column("topic", sa.String(length=256), nullable=False),
        sa.Column("message_key", sa.LargeBinary(), nullable=True),
        sa.Column("replayed_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["dead_letter_id"],
            ["dead_letters.dead_letter_id"],
            name=op.f("fk_dead_letter_replays_dead_letter_id_dead_letters"),
        ),
        sa.PrimaryKeyConstraint("dead_letter_id", name=op.f("pk_dead_letter_replays")),
    )
    # A replay is an audit record: insert only (the function comes from the first migration).
    op.execute(
        "CREATE TRIGGER dead_letter_replays_append_only BEFORE UPDATE OR DELETE ON dead_letter_replays "
        "FOR EACH ROW EXECUTE FUNCTION tollhouse_refuse_change()"
    )
    op.execute(
        "CREATE TRIGGER dead_letter_replays_no_truncate BEFORE TRUNCATE ON dead_letter_replays "
        "FOR EACH STATEMENT EXECUTE FUNCTION tollhouse_refuse_change()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS dead_letter_replays_no_truncate ON dead_letter_replays")
    op.execute("DROP TRIGGER IF EXISTS dead_letter_replays_append_only ON dead_letter_replays")
    op.drop_table("dead_letter_replays")
    op.drop_index("ix_dead_letters_received", table_name="dead_letters")
    op.drop_column("dead_letters", "message_key")
    op.drop_table("ingest_stats_daily")
