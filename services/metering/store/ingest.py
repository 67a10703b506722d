"""SQL for the consumer: one unit of work per Kafka batch.

A batch's accepted events, ledger entries, projections, breaches, dead letters, outbox
messages and the partition offsets are written in ONE transaction: together or not at all.
The offsets are fenced on their expected old value, so a consumer that lost a partition
during a rebalance cannot commit over the new owner. Bulk rows go in with COPY
(asyncpg's binary copy) or ``unnest`` arrays, never row by row.

Locking: every writer of an account's projections (this consumer, top-ups, package
purchases, the expiry sweeper) first locks the account's ``account_balances`` row, in
account-id order, so concurrent writers serialise per account and never deadlock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import asyncpg

from services.metering.domain.pricing import PriceBook, PriceRow
from services.metering.domain.rating import AccountState, PackageState, SpendState


class Fenced(Exception):
    """Another consumer moved this partition's offset: this batch must not commit."""

    def __init__(self, partition: int, expected: int) -> None:
        super().__init__(f"partition {partition}: stored offset is no longer {expected}")
        self.partition = partition
        self.expected = expected


@dataclass(frozen=True, slots=True)
class KeyRow:
    key_id: str
    account_id: str
    billing_mode: str
    package_id: str | None
    daily_cap: int
    monthly_cap: int
    status: str


LEDGER_COLUMNS = (
    "entry_type", "account_id", "key_id", "package_id", "event_id", "source", "request_id",
    "endpoint", "model", "kind", "status", "usage_estimated", "event_time", "local_day",
    "inputs", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
    "reasoning_tokens", "package_tokens", "overage_tokens", "charge", "overage_charge",
    "balance_delta", "price_id", "reservation_id",
)
_LEDGER_ZEROS = frozenset({
    "inputs", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens",
    "package_tokens", "overage_tokens", "charge", "overage_charge", "balance_delta",
})


def ledger_row(**values: object) -> tuple:
    """A ledger row in ``LEDGER_COLUMNS`` order; unnamed counts are 0, other fields NULL."""
    unknown = set(values) - set(LEDGER_COLUMNS)
    assert not unknown, f"not ledger columns: {unknown}"
    return tuple(
        values.get(c, 0 if c in _LEDGER_ZEROS else (False if c == "usage_estimated" else None))
        for c in LEDGER_COLUMNS
    )


USAGE_EVENT_COLUMNS = ("event_id", "digest", "account_id", "source", "event_time", "topic_partition", "kafka_offset")
BREACH_COLUMNS = (
    "breach_id", "type", "account_id", "key_id", "package_id", "period", "unit", "cap", "spend",
    "overshoot", "event_id", "occurred_at",
)


# Session-local staging tables: bulk upserts COPY their rows here, then merge with one
# INSERT … SELECT … ON CONFLICT (COPY's binary rows are far cheaper to send than arrays).
_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS stage_key_spend (LIKE key_spend) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS stage_usage_daily (LIKE usage_daily) ON COMMIT DELETE ROWS",
)
SPEND_COLUMNS = ("key_id", "period_type", "period_start", "account_id", "spend", "breached")
USAGE_DAILY_COLUMNS = (
    "key_id", "model", "day", "account_id", "requests", "inputs", "prompt_tokens", "completion_tokens",
    "cached_tokens", "reasoning_tokens", "total_tokens", "package_tokens", "overage_tokens", "charge",
)


# timestamptz as PostgreSQL holds it: microseconds since 2000-01-01 UTC, ±infinity at the
# int64 limits. asyncpg's own encoder spends about 0.55 µs on each value (it compares the
# value with its infinity and converts it to UTC first); a batch sends two per event, so
# the consumer's connections subtract the epoch themselves (about 0.27 µs).
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
_PG_INFINITY = 2**63 - 1
_AWARE_MAX, _AWARE_MIN = datetime.max.replace(tzinfo=timezone.utc), datetime.min.replace(tzinfo=timezone.utc)


def _timestamptz_to_pg(moment: datetime) -> tuple[int]:
    """``moment`` must be aware: a naive one cannot be placed in time and raises TypeError."""
    return ((moment - _PG_EPOCH) // _MICROSECOND,)


def _timestamptz_from_pg(value: tuple[int]) -> datetime:
    (micros,) = value
    if micros == _PG_INFINITY:
        return _AWARE_MAX
    if micros == -_PG_INFINITY - 1:
        return _AWARE_MIN
    return _PG_EPOCH + timedelta(microseconds=micros)


async def connect(database_url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(
        database_url, server_settings={"application_name": "tollhouse-consumer", "timezone": "UTC"}
    )
    await conn.set_type_codec(
        "timestamptz", schema="pg_catalog", encoder=_timestamptz_to_pg, decoder=_timestamptz_from_pg, format="tuple"
    )
    for statement in _STAGING:
        await conn.execute(statement)
    return conn


async def stored_offset(conn: asyncpg.Connection, group: str, topic: str, partition: int, default: int) -> int:
    """The next offset to read for a partition; records ``default`` when none is stored yet."""
    await conn.execute(
        "INSERT INTO consumer_offsets (group_id, topic, topic_partition, next_offset) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT DO NOTHING",
        group, topic, partition, default,
    )
    return await conn.fetchval(
        "SELECT next_offset FROM consumer_offsets WHERE group_id = $1 AND topic = $2 AND topic_partition = $3",
        group, topic, partition,
    )


async def reset_offset(conn: asyncpg.Connection, group: str, topic: str, partition: int, offset: int) -> None:
    """Overwrite a partition's stored offset (only for a log that was recreated behind it)."""
    await conn.execute(
        "UPDATE consumer_offsets SET next_offset = $4, updated_at = now()"
        " WHERE group_id = $1 AND topic = $2 AND topic_partition = $3",
        group, topic, partition, offset,
    )


class PriceCache:
    """Prices are append-only, so the highest price_id is a perfect version stamp."""

    def __init__(self) -> None:
        self._version: int | None = None
        self.book = PriceBook([])

    async def refresh(self, conn: asyncpg.Connection) -> PriceBook:
        version = await conn.fetchval("SELECT coalesce(max(price_id), 0) FROM prices")
        if version != self._version:
            rows = await conn.fetch(
                "SELECT price_id, model, effective_from, input_price, output_price, cached_input_price,"
                " per_request_fee, batch_discount_ppm, package_weight_ppm, min_tier FROM prices"
            )
            self.book = PriceBook([PriceRow(**dict(r)) for r in rows])
            self._version = version
        return self.book


class IngestBatch:
    """One transaction over accounts' ledger and projections: ``async with IngestBatch(conn)``.

    Lookups by many ids join ``unnest($1)`` rather than test ``= ANY($1)``: while a table's
    statistics lag behind its growth the planner may choose a scan, and a scan tests every
    row against the whole array.
    """

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self._tx: asyncpg.transaction.Transaction | None = None

    async def __aenter__(self) -> "IngestBatch":
        self._tx = self.conn.transaction()
        await self._tx.start()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        assert self._tx is not None
        if exc_type is None:
            await self._tx.commit()
        else:
            await self._tx.rollback()

    async def advance_offsets(self, group: str, topic: str, moves: dict[int, tuple[int, int]]) -> None:
        """Move each partition from its expected offset to the new one, or raise ``Fenced``."""
        for partition in sorted(moves):
            expected, new = moves[partition]
            assert new >= expected, "offsets only move forward"
            status = await self.conn.execute(
                "UPDATE consumer_offsets SET next_offset = $4, updated_at = now()"
                " WHERE group_id = $1 AND topic = $2 AND topic_partition = $3 AND next_offset = $5",
                group, topic, partition, new, expected,
            )
            if status != "UPDATE 1":
                raise Fenced(partition, expected)

    async def known_events(self, event_ids: Sequence[str]) -> dict[str, bytes]:
        """Digests of the events among ``event_ids`` that were already accepted."""
        if not event_ids:
            return {}
        rows = await self.conn.fetch(
            "SELECT e.event_id, e.digest FROM unnest($1::text[]) AS w(event_id)"
            " JOIN usage_events e ON e.event_id = w.event_id",
            list(event_ids),
        )
        return {r["event_id"]: bytes(r["digest"]) for r in rows}

    async def keys(self, key_ids: Iterable[str]) -> dict[str, KeyRow]:
        rows = await self.conn.fetch(
            "SELECT k.key_id, k.account_id, k.billing_mode, k.package_id, k.daily_cap, k.monthly_cap, k.status"
            " FROM unnest($1::text[]) AS w(key_id) JOIN api_keys k ON k.key_id = w.key_id",
            list(key_ids),
        )
        return {r[0]: KeyRow(*r) for r in rows}  # columns in KeyRow's field order

    async def lock_accounts(self, account_ids: Iterable[str]) -> dict[str, AccountState]:
        rows = await self.conn.fetch(
            "SELECT b.account_id, a.timezone, b.balance, b.balance_depleted"
            " FROM unnest($1::text[]) AS w(account_id)"
            " JOIN account_balances b ON b.account_id = w.account_id JOIN accounts a ON a.account_id = w.account_id"
            " ORDER BY b.account_id FOR UPDATE OF b",
            sorted(set(account_ids)),
        )
        return {
            r["account_id"]: AccountState(r["account_id"], r["timezone"], r["balance"], r["balance_depleted"])
            for r in rows
        }

    async def packages(self, package_ids: Iterable[str]) -> dict[str, PackageState]:
        rows = await self.conn.fetch(
            "SELECT p.package_id, p.account_id, p.tokens_total, pb.tokens_used, p.valid_from, p.valid_until,"
            " pb.tokens_expired, pb.expiry_booked, pb.exhausted_recorded, pb.expired_recorded"
            " FROM unnest($1::text[]) AS w(package_id)"
            " JOIN packages p ON p.package_id = w.package_id JOIN package_balances pb ON pb.package_id = w.package_id",
            list(package_ids),
        )
        return {r["package_id"]: PackageState(**dict(r)) for r in rows}

    async def spend(self, periods: Iterable[tuple[str, str, date]]) -> dict[tuple[str, str, date], SpendState]:
        """Spend rows for (key_id, 'day'|'month', period_start); missing ones are zero."""
        wanted = list(periods)
        if not wanted:
            return {}
        rows = await self.conn.fetch(
            "SELECT s.key_id, s.period_type, s.period_start, s.spend, s.breached FROM key_spend s"
            " JOIN unnest($1::text[], $2::text[], $3::date[]) AS w(key_id, period_type, period_start)"
            " USING (key_id, period_type, period_start)",
            [w[0] for w in wanted], [w[1] for w in wanted], [w[2] for w in wanted],
        )
        return {(r[0], r[1], r[2]): SpendState(r[3], r[4]) for r in rows}

    async def insert_usage_events(self, rows: list[tuple]) -> None:
        if rows:
            await self.conn.copy_records_to_table("usage_events", records=rows, columns=USAGE_EVENT_COLUMNS)

    async def insert_ledger(self, rows: Iterable[tuple]) -> None:
        """``rows`` may be a generator: the COPY sends every 512 kB as it fills."""
        if rows:
            await self.conn.copy_records_to_table("ledger_entries", records=rows, columns=LEDGER_COLUMNS)

    async def insert_breaches(self, rows: list[tuple]) -> None:
        if rows:
            await self.conn.copy_records_to_table("breaches", records=rows, columns=BREACH_COLUMNS)

    async def insert_dead_letters(self, rows: list[tuple]) -> set[str]:
        """Insert dead letters once per Kafka message; return the ids actually inserted."""
        if not rows:
            return set()
        cols = list(zip(*rows))
        inserted = await self.conn.fetch(
            "INSERT INTO dead_letters (dead_letter_id, reason, detail, event_id, source, topic, topic_partition,"
            " kafka_offset, payload, received_at, message_key)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],"
            " $7::int[], $8::bigint[], $9::bytea[], $10::timestamptz[], $11::bytea[])"
            " ON CONFLICT (topic, topic_partition, kafka_offset) DO NOTHING RETURNING dead_letter_id",
            *[list(c) for c in cols],
        )
        return {r["dead_letter_id"] for r in inserted}

    async def insert_outbox(self, rows: list[tuple[str, bytes | None, bytes]]) -> None:
        if rows:
            await self.conn.copy_records_to_table("outbox", records=rows, columns=("topic", "message_key", "payload"))

    async def save_accounts(self, accounts: Iterable[AccountState], charges: dict[str, int]) -> None:
        accounts = list(accounts)
        if not accounts:
            return
        await self.conn.execute(
            "UPDATE account_balances b SET balance = u.balance, balance_depleted = u.depleted,"
            " charges_total = b.charges_total + u.charges"
            " FROM unnest($1::text[], $2::bigint[], $3::bool[], $4::bigint[]) AS u(account_id, balance, depleted, charges)"
            " WHERE b.account_id = u.account_id",
            [a.account_id for a in accounts], [a.balance for a in accounts],
            [a.balance_depleted for a in accounts], [charges.get(a.account_id, 0) for a in accounts],
        )

    async def save_packages(self, packages: Iterable[PackageState]) -> None:
        packages = list(packages)
        if not packages:
            return
        await self.conn.execute(
            "UPDATE package_balances pb SET tokens_used = u.used, tokens_expired = u.expired,"
            " expiry_booked = u.booked, exhausted_recorded = u.exhausted, expired_recorded = u.expired_rec"
            " FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bool[], $5::bool[], $6::bool[])"
            " AS u(package_id, used, expired, booked, exhausted, expired_rec)"
            " WHERE pb.package_id = u.package_id",
            [p.package_id for p in packages], [p.tokens_used for p in packages],
            [p.tokens_expired for p in packages], [p.expiry_booked for p in packages],
            [p.exhausted_recorded for p in packages], [p.expired_recorded for p in packages],
        )

    async def save_spend(self, rows: list[tuple[str, str, date, str, int, bool]]) -> None:
        """Absolute spend per (key, period): the account lock makes this writer the only one."""
        if not rows:
            return
        await self.conn.copy_records_to_table("stage_key_spend", records=rows, columns=SPEND_COLUMNS)
        await self.conn.execute(
            "INSERT INTO key_spend (key_id, period_type, period_start, account_id, spend, breached)"
            " SELECT key_id, period_type, period_start, account_id, spend, breached FROM stage_key_spend"
            " ON CONFLICT (key_id, period_type, period_start)"
            " DO UPDATE SET spend = EXCLUDED.spend, breached = EXCLUDED.breached;"
            " TRUNCATE stage_key_spend"
        )

    async def add_usage_daily(self, rows: list[tuple]) -> None:
        """Add per (key, model, day) sums to the rollup."""
        if not rows:
            return
        await self.conn.copy_records_to_table("stage_usage_daily", records=rows, columns=USAGE_DAILY_COLUMNS)
        await self.conn.execute(
            "INSERT INTO usage_daily AS d (" + ", ".join(USAGE_DAILY_COLUMNS) + ")"
            " SELECT " + ", ".join(USAGE_DAILY_COLUMNS) + " FROM stage_usage_daily"
            " ON CONFLICT (key_id, model, day) DO UPDATE SET"
            " requests = d.requests + EXCLUDED.requests, inputs = d.inputs + EXCLUDED.inputs,"
            " prompt_tokens = d.prompt_tokens + EXCLUDED.prompt_tokens,"
            " completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,"
            " cached_tokens = d.cached_tokens + EXCLUDED.cached_tokens,"
            " reasoning_tokens = d.reasoning_tokens + EXCLUDED.reasoning_tokens,"
            " total_tokens = d.total_tokens + EXCLUDED.total_tokens,"
            " package_tokens = d.package_tokens + EXCLUDED.package_tokens,"
            " overage_tokens = d.overage_tokens + EXCLUDED.overage_tokens, charge = d.charge + EXCLUDED.charge;"
            " TRUNCATE stage_usage_daily"
        )

    async def add_ingest_stats(self, rows: list[tuple[str, int, int, int, int, int]], day: date) -> None:
        """Add per-source counters to the all-time totals and to ``day`` (UTC day of processing)."""
        if not rows:
            return
        cols = [list(c) for c in zip(*rows)]
        await self.conn.execute(
            "INSERT INTO ingest_stats AS s (source, received, accepted, duplicates, conflicts, dead_lettered)"
            " SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])"
            " ON CONFLICT (source) DO UPDATE SET received = s.received + EXCLUDED.received,"
            " accepted = s.accepted + EXCLUDED.accepted, duplicates = s.duplicates + EXCLUDED.duplicates,"
            " conflicts = s.conflicts + EXCLUDED.conflicts, dead_lettered = s.dead_lettered + EXCLUDED.dead_lettered",
            *cols,
        )
        await self.conn.execute(
            "INSERT INTO ingest_stats_daily AS s (day, source, received, accepted, duplicates, conflicts,"
            " dead_lettered)"
            " SELECT $7::date, u.* FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],"
            " $6::bigint[]) AS u"
            " ON CONFLICT (day, source) DO UPDATE SET received = s.received + EXCLUDED.received,"
            " accepted = s.accepted + EXCLUDED.accepted, duplicates = s.duplicates + EXCLUDED.duplicates,"
            " conflicts = s.conflicts + EXCLUDED.conflicts, dead_lettered = s.dead_lettered + EXCLUDED.dead_lettered",
            *cols, day,
        )


async def due_package_expiries(conn: asyncpg.Connection, now: datetime, grace_seconds: int) -> list[tuple[str, str]]:
    """(account_id, package_id) of packages whose expiry is due but not booked yet."""
    rows = await conn.fetch(
        "SELECT p.account_id, p.package_id FROM packages p JOIN package_balances pb USING (package_id)"
        " WHERE NOT pb.expiry_booked AND p.valid_until + make_interval(secs => $2) <= $1"
        " ORDER BY p.account_id, p.package_id LIMIT 1000",
        now, grace_seconds,
    )
    return [(r["account_id"], r["package_id"]) for r in rows]


async def claim_outbox(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    """Lock the oldest unsent outbox rows (inside a transaction); other relays skip them."""
    return await conn.fetch(
        "SELECT outbox_id, topic, message_key, payload FROM outbox ORDER BY outbox_id"
        " LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit,
    )


async def delete_outbox(conn: asyncpg.Connection, ids: list[int]) -> None:
    await conn.execute("DELETE FROM outbox WHERE outbox_id = ANY($1::bigint[])", ids)
