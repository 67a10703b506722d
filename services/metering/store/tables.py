"""The metering schema: SQLAlchemy 2 table models. Alembic migrations are the source of truth
for the database; these models mirror them for queries and for the migration's autogenerate check.

Append-only by design: ``ledger_entries``, ``breaches``, ``usage_events``, ``dead_letters``,
``prices`` and ``dead_letter_replays`` refuse UPDATE and DELETE in the database (triggers in
the migrations).
Projections (``account_balances``, ``package_balances``, ``key_spend``, ``usage_daily``) are
derived from the ledger and can be rebuilt from it.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TS = DateTime(timezone=True)

# Tables whose rows every consumer batch updates in place keep half of each page free, so an
# updated row's new version stays in its page and no index changes (migration 0004).
UPDATED_IN_PLACE = {"postgresql_with": {"fillfactor": 50}}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Account(Base):
    __tablename__ = "accounts"
    account_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    tier: Mapped[str] = mapped_column(String(16))
    timezone: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())


class AccountBalance(Base):
    """Projection: the account's balance and whether depletion was already recorded."""

    __tablename__ = "account_balances"
    __table_args__ = UPDATED_IN_PLACE
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"), primary_key=True)
    balance: Mapped[int] = mapped_column(BigInteger, server_default="0")
    balance_depleted: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    topups_total: Mapped[int] = mapped_column(BigInteger, server_default="0")
    charges_total: Mapped[int] = mapped_column(BigInteger, server_default="0")


class Package(Base):
    __tablename__ = "packages"
    package_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"), index=True)
    tokens_total: Mapped[int] = mapped_column(BigInteger)
    price: Mapped[int] = mapped_column(BigInteger)
    valid_from: Mapped[datetime] = mapped_column(TS)
    valid_until: Mapped[datetime] = mapped_column(TS)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())


class PackageBalance(Base):
    """Projection: tokens used and expired, and which package breaches were recorded."""

    __tablename__ = "package_balances"
    __table_args__ = UPDATED_IN_PLACE
    package_id: Mapped[str] = mapped_column(ForeignKey("packages.package_id"), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    tokens_used: Mapped[int] = mapped_column(BigInteger, server_default="0")
    tokens_expired: Mapped[int] = mapped_column(BigInteger, server_default="0")
    expiry_booked: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    exhausted_recorded: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    expired_recorded: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class ApiKey(Base):
    __tablename__ = "api_keys"
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.account_id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    secret_hint: Mapped[str] = mapped_column(String(16))
    billing_mode: Mapped[str] = mapped_column(String(16))
    package_id: Mapped[str | None] = mapped_column(ForeignKey("packages.package_id"))
    daily_cap: Mapped[int] = mapped_column(BigInteger, server_default="0")
    monthly_cap: Mapped[int] = mapped_column(BigInteger, server_default="0")
    status: Mapped[str] = mapped_column(String(16), server_default="active")
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(TS)


class Price(Base):
    """A version of a model's price; new versions are added, rows are never edited."""

    __tablename__ = "prices"
    __table_args__ = (UniqueConstraint("model", "effective_from", name="uq_prices_model_effective_from"),)
    price_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(256))
    effective_from: Mapped[datetime] = mapped_column(TS)
    input_price: Mapped[int] = mapped_column(BigInteger)
    output_price: Mapped[int] = mapped_column(BigInteger)
    cached_input_price: Mapped[int] = mapped_column(BigInteger)
    per_request_fee: Mapped[int] = mapped_column(BigInteger, server_default="0")
    batch_discount_ppm: Mapped[int] = mapped_column(Integer, server_default="0")
    package_weight_ppm: Mapped[int] = mapped_column(Integer, server_default="1000000")
    min_tier: Mapped[str] = mapped_column(String(16), server_default="free")
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())


class UsageEvent(Base):
    """Accepted usage events: the event id is the idempotency key."""

    __tablename__ = "usage_events"
    event_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    digest: Mapped[bytes] = mapped_column(LargeBinary(16))
    account_id: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(256))
    event_time: Mapped[datetime] = mapped_column(TS)
    topic_partition: Mapped[int] = mapped_column(Integer)
    kafka_offset: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())


class LedgerEntry(Base):
    """The append-only ledger. ``entry_type``: usage, topup, package_grant, package_expiry, reversal."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        Index("ix_ledger_entries_account_entry", "account_id", "entry_id"),
        # An account's time window: its count and entry_id bounds from the index alone (0003).
        Index("ix_ledger_entries_account_event_time", "account_id", "event_time", postgresql_include=["entry_id"]),
        Index("ix_ledger_entries_event_time_brin", "event_time", postgresql_using="brin"),
        Index(
            "uq_ledger_entries_topup_reference",
            "account_id",
            "reference",
            unique=True,
            postgresql_where=text("entry_type = 'topup'"),
        ),
    )
    entry_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    entry_type: Mapped[str] = mapped_column(String(16))
    account_id: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(64))
    package_id: Mapped[str | None] = mapped_column(String(64))
    event_id: Mapped[str | None] = mapped_column(String(128))
    reference: Mapped[str | None] = mapped_column(String(200))
    source: Mapped[str | None] = mapped_column(String(256))
    request_id: Mapped[str | None] = mapped_column(String(256))
    endpoint: Mapped[str | None] = mapped_column(String(256))
    model: Mapped[str | None] = mapped_column(String(256))
    kind: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str | None] = mapped_column(String(16))
    usage_estimated: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    event_time: Mapped[datetime] = mapped_column(TS)
    local_day: Mapped[date] = mapped_column(Date)
    inputs: Mapped[int] = mapped_column(Integer, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    total_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cached_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    package_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    overage_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    charge: Mapped[int] = mapped_column(BigInteger, server_default="0")
    overage_charge: Mapped[int] = mapped_column(BigInteger, server_default="0")
    balance_delta: Mapped[int] = mapped_column(BigInteger, server_default="0")
    price_id: Mapped[int | None] = mapped_column(BigInteger)
    reservation_id: Mapped[str | None] = mapped_column(String(128))
    reverses_entry_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())


class Breach(Base):
    __tablename__ = "breaches"
    __table_args__ = (
        Index(
            "uq_breaches_key_cap_period",
            "key_id",
            "type",
            "period",
            unique=True,
            postgresql_where=text("type IN ('daily_cap', 'monthly_cap')"),
        ),
        Index(
            "uq_breaches_package_type",
            "package_id",
            "type",
            unique=True,
            postgresql_where=text("type IN ('package_exhausted', 'package_expired')"),
        ),
        Index("ix_breaches_account_occurred", "account_id", "occurred_at"),
    )
    breach_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    account_id: Mapped[str] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(64))
    package_id: Mapped[str | None] = mapped_column(String(64))
    period: Mapped[str | None] = mapped_column(String(16))
    unit: Mapped[str] = mapped_column(String(8))
    cap: Mapped[int] = mapped_column(BigInteger)
    spend: Mapped[int] = mapped_column(BigInteger)
    overshoot: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str | None] = mapped_column(String(128))
    occurred_at: Mapped[datetime] = mapped_column(TS)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())


class KeySpend(Base):
    """Projection: a key's PAYG spend per local day ('day') and month ('month')."""

    __tablename__ = "key_spend"
    __table_args__ = UPDATED_IN_PLACE
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    period_type: Mapped[str] = mapped_column(String(8), primary_key=True)
    period_start: Mapped[date] = mapped_column(Date, primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    spend: Mapped[int] = mapped_column(BigInteger, server_default="0")
    breached: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class UsageDaily(Base):
    """Projection: usage rollup per key, model and local day."""

    __tablename__ = "usage_daily"
    __table_args__ = (Index("ix_usage_daily_account_day", "account_id", "day"), UPDATED_IN_PLACE)
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    account_id: Mapped[str] = mapped_column(String(64))
    requests: Mapped[int] = mapped_column(BigInteger, server_default="0")
    inputs: Mapped[int] = mapped_column(BigInteger, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cached_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    total_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    package_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    overage_tokens: Mapped[int] = mapped_column(BigInteger, server_default="0")
    charge: Mapped[int] = mapped_column(BigInteger, server_default="0")


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    __table_args__ = (
        Index("ix_dead_letters_reason", "reason"),
        # One dead letter per Kafka message, however often it is redelivered.
        Index("uq_dead_letters_message", "topic", "topic_partition", "kafka_offset", unique=True),
        Index("ix_dead_letters_received", "received_at", "topic", "topic_partition", "kafka_offset"),
    )
    dead_letter_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)
    event_id: Mapped[str | None] = mapped_column(String(128))
    source: Mapped[str | None] = mapped_column(String(256))
    topic: Mapped[str] = mapped_column(String(256))
    topic_partition: Mapped[int] = mapped_column(Integer)
    kafka_offset: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())
    # The Kafka key the message came with (a replay is published under it); NULL before 0002.
    message_key: Mapped[bytes | None] = mapped_column(LargeBinary)


class DeadLetterReplay(Base):
    """One per replayed dead letter, written with the outbox row that re-publishes it (append-only)."""

    __tablename__ = "dead_letter_replays"
    dead_letter_id: Mapped[str] = mapped_column(ForeignKey("dead_letters.dead_letter_id"), primary_key=True)
    event_id: Mapped[str | None] = mapped_column(String(128))
    topic: Mapped[str] = mapped_column(String(256))
    message_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    replayed_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())


class IngestStat(Base):
    """Counters per event source: received, accepted, duplicates, conflicts, dead-lettered."""

    __tablename__ = "ingest_stats"
    __table_args__ = UPDATED_IN_PLACE
    source: Mapped[str] = mapped_column(String(256), primary_key=True)
    received: Mapped[int] = mapped_column(BigInteger, server_default="0")
    accepted: Mapped[int] = mapped_column(BigInteger, server_default="0")
    duplicates: Mapped[int] = mapped_column(BigInteger, server_default="0")
    conflicts: Mapped[int] = mapped_column(BigInteger, server_default="0")
    dead_lettered: Mapped[int] = mapped_column(BigInteger, server_default="0")


class IngestStatDaily(Base):
    """The same counters per source and UTC day of processing (reconciliation windows)."""

    __tablename__ = "ingest_stats_daily"
    __table_args__ = (PrimaryKeyConstraint("day", "source"), UPDATED_IN_PLACE)  # day first: windows scan by day
    source: Mapped[str] = mapped_column(String(256))
    day: Mapped[date] = mapped_column(Date)
    received: Mapped[int] = mapped_column(BigInteger, server_default="0")
    accepted: Mapped[int] = mapped_column(BigInteger, server_default="0")
    duplicates: Mapped[int] = mapped_column(BigInteger, server_default="0")
    conflicts: Mapped[int] = mapped_column(BigInteger, server_default="0")
    dead_lettered: Mapped[int] = mapped_column(BigInteger, server_default="0")


class ConsumerOffset(Base):
    """The next offset to read per partition, written in the batch's own transaction."""

    __tablename__ = "consumer_offsets"
    __table_args__ = UPDATED_IN_PLACE
    group_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    topic: Mapped[str] = mapped_column(String(256), primary_key=True)
    topic_partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    next_offset: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())


class Outbox(Base):
    """Messages to publish after commit (breaches, dead letters); the relay deletes what it sent."""

    __tablename__ = "outbox"
    outbox_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(256))
    message_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(TS, server_default=func.now())


APPEND_ONLY_TABLES = (
    "ledger_entries", "breaches", "usage_events", "dead_letters", "prices", "dead_letter_replays",
)
