"""One batch of usage messages: validate, deduplicate, rate, and book them in one transaction.

Order of judgement for each message: the contract (``decode_usage_event``), then the
idempotency key (same id + same payload = duplicate, skipped and counted; same id + other
payload = ``id_conflict``, quarantined), then what only the database knows (key, account,
model, price), then rating in partition order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import asyncpg
import msgspec

from services.contracts.breaches import breach_message, breach_view, dead_letter_message
from services.contracts.events import AcceptedEvent, InvalidEvent, Reason, decode_usage_event
from services.contracts.ids import new_id
from services.metering.domain.periods import local_day, month_of
from services.metering.domain.rating import (
    PACKAGE,
    Breach,
    KeyState,
    Usage,
    rate_usage,
)
from services.metering.domain.pricing import PriceRow
from services.metering.store.ingest import IngestBatch, KeyRow, PriceCache
from services.metering.store.quota import notify_quota, quota_notices

UNKNOWN_SOURCE = "unknown"


class Record(msgspec.Struct, gc=False):
    """One Kafka message as the consumer hands it over, what the contract says of it, and,
    once it is found valid, its key and price.

    A batch holds tens of thousands of these for its whole length, so they are kept out of
    the garbage collector's sight (``gc=False``): nothing they hold refers back to them
    (an ``invalid`` exception is stored without its traceback, whose frame would)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None = None  # the Kafka message's, in ms
    accepted: AcceptedEvent | None = None
    invalid: InvalidEvent | None = None
    api_key: KeyRow | None = None
    price: PriceRow | None = None


@dataclass(slots=True)
class BatchOutcome:
    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    dead_lettered: int = 0
    breaches: int = 0
    booked_before: int = 0  # events the ledger already held (counted only when ids were looked up)
    dead_letter_reasons: Counter = field(default_factory=Counter)
    breach_types: Counter = field(default_factory=Counter)
    event_times: list[datetime] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BatchConfig:
    group: str
    topic: str
    dlq_topic: str
    breach_topic: str
    max_event_bytes: int
    max_future: timedelta
    source_name: str = "metering"


@dataclass(slots=True)
class _DeadLetter:
    record: Record
    reason: str
    detail: str
    event_id: str | None
    source: str


class _Stats:
    """Per-source counters, written to ``ingest_stats`` and ``ingest_stats_daily`` (under the
    batch's UTC day of processing) with the batch."""

    def __init__(self) -> None:
        self.by_source: dict[str, list[int]] = {}

    def add(self, source: str, column: int) -> None:
        row = self.by_source.get(source)
        if row is None:
            row = self.by_source[source] = [0, 0, 0, 0, 0]
        row[0] += 1
        if column:
            row[column] += 1

    def rows(self) -> list[tuple]:
        # In source order: consumer members writing the same sources' rows at once lock
        # them in one order, so they wait for each other but never deadlock.
        return [(s, *self.by_source[s]) for s in sorted(self.by_source)]


ACCEPTED, DUPLICATE, CONFLICT, DEAD = 1, 2, 3, 4


def judge_contract(records: list[Record], config: BatchConfig, now: datetime) -> None:
    """Decode each record not judged yet against the contract. Pure CPU and no database:
    the consumer runs it on the next batch while the current one's SQL is in flight."""
    for record in records:
        if record.accepted is None and record.invalid is None:
            try:
                record.accepted = decode_usage_event(
                    record.value, max_bytes=config.max_event_bytes, now=now, max_future=config.max_future
                )
            except InvalidEvent as exc:
                record.invalid = exc.with_traceback(None)


async def process_batch(
    conn: asyncpg.Connection,
    records: list[Record],
    offsets: dict[int, tuple[int, int]],
    config: BatchConfig,
    prices: PriceCache,
    *,
    look_up_ids: bool = True,
) -> BatchOutcome:
    """Book ``records`` and move ``offsets`` ({partition: (expected, new)}) atomically.

    ``look_up_ids=False`` skips asking the database which event ids it already holds and
    lets the primary key of ``usage_events`` find out: a batch holding an event booked
    before then fails with ``asyncpg.UniqueViolationError`` (see ``is_booked_before``) and
    rolls back whole, and the caller books it again looking the ids up."""
    now = datetime.now(timezone.utc)
    outcome = BatchOutcome(received=len(records))
    dead: list[_DeadLetter] = []
    candidates: list[Record] = []
    first_seen: dict[str, bytes] = {}
    duplicate_sources: list[str] = []

    judge_contract(records, config, now)
    for record in records:
        accepted = record.accepted
        if accepted is None:
            exc = record.invalid
            dead.append(_DeadLetter(record, exc.reason, exc.detail, None, UNKNOWN_SOURCE))
            continue
        event = accepted.event
        seen = first_seen.get(event.id)
        if seen is None:
            first_seen[event.id] = accepted.digest
            candidates.append(record)
        elif seen == accepted.digest:
            duplicate_sources.append(event.source)
        else:
            dead.append(_conflict(record, accepted))

    async with IngestBatch(conn) as uow:
        await uow.advance_offsets(config.group, config.topic, offsets)
        book = await prices.refresh(conn)
        if not look_up_ids:
            fresh = candidates
        else:
            fresh = []
            known = await uow.known_events([r.accepted.event.id for r in candidates])
            outcome.booked_before = len(known)
            for record in candidates:
                accepted = record.accepted
                digest = known.get(accepted.event.id)
                if digest is None:
                    fresh.append(record)
                elif digest == accepted.digest:
                    duplicate_sources.append(accepted.event.source)
                else:
                    dead.append(_conflict(record, accepted))

        keys = await uow.keys({r.accepted.event.data.key_id for r in fresh})
        valid: list[Record] = []  # each with its api_key and price
        for record in fresh:
            accepted = record.accepted
            data = accepted.event.data
            key = keys.get(data.key_id)
            reason = detail = None
            if key is None:
                reason, detail = Reason.UNKNOWN_KEY, f"data.key_id {data.key_id!r} is not a key Tollhouse knows"
            elif key.account_id != data.account_id:
                reason = Reason.KEY_ACCOUNT_MISMATCH
                detail = f"key {data.key_id!r} belongs to another account than data.account_id {data.account_id!r}"
            elif not book.knows(data.model):
                reason, detail = Reason.UNKNOWN_MODEL, f"data.model {data.model!r} has no price list"
            else:
                price = book.at(data.model, accepted.event_time)
                if price is None:
                    reason = Reason.NO_PRICE
                    detail = f"model {data.model!r} has no price effective at {accepted.event.time}"
                else:
                    record.api_key, record.price = key, price
                    valid.append(record)
            if reason is not None:
                dead.append(_DeadLetter(record, reason, detail, accepted.event.id, accepted.event.source))

        accounts = await uow.lock_accounts({r.api_key.account_id for r in valid})
        packages = await uow.packages(
            {r.api_key.package_id for r in valid if r.api_key.billing_mode == PACKAGE and r.api_key.package_id}
        )
        key_states: dict[str, KeyState] = {}
        wanted_spend = set()
        for record in valid:
            accepted, key = record.accepted, record.api_key
            if key.key_id not in key_states:
                key_states[key.key_id] = KeyState(
                    key.key_id, key.account_id, key.billing_mode, key.package_id, key.daily_cap, key.monthly_cap
                )
            if key.billing_mode != PACKAGE:
                day = local_day(accepted.event_time, accounts[key.account_id].timezone)
                wanted_spend.add((key.key_id, "day", day))
                wanted_spend.add((key.key_id, "month", month_of(day)))
        for (key_id, period_type, start), state in (await uow.spend(wanted_spend)).items():
            state_map = key_states[key_id].daily if period_type == "day" else key_states[key_id].monthly
            state_map[start] = state

        breaches: list[Breach] = []
        rollup: dict[tuple, list[int]] = {}
        charges: dict[str, int] = {}
        usage_rows = []
        for record in valid:
            a = record.accepted
            usage_rows.append((a.event.id, a.digest, a.event.data.account_id, a.event.source, a.event_time,
                               record.partition, record.offset))
        await uow.insert_usage_events(usage_rows)

        def rated() -> Iterator[tuple]:
            """The ledger rows, rated in partition order as the COPY takes them: PostgreSQL
            writes the rows already sent while the next ones are rated."""
            for record in valid:
                accepted, key, price = record.accepted, record.api_key, record.price
                event, data, when = accepted.event, accepted.event.data, accepted.event_time
                rating = rate_usage(
                    Usage(event.id, when, data.kind == "batch", data.prompt_tokens, data.completion_tokens,
                          data.total_tokens, data.cached_tokens),
                    account=accounts[key.account_id],
                    key=key_states[key.key_id],
                    package=packages.get(key.package_id) if key.billing_mode == PACKAGE and key.package_id else None,
                    price=price,
                    breaches=breaches,
                )
                if rating.charge:
                    charges[data.account_id] = charges.get(data.account_id, 0) + rating.charge
                sums = rollup.get((data.key_id, data.model, rating.local_day))
                if sums is None:
                    sums = rollup[(data.key_id, data.model, rating.local_day)] = [data.account_id] + [0] * 10
                sums[1] += 1
                sums[2] += data.inputs
                sums[3] += data.prompt_tokens
                sums[4] += data.completion_tokens
                sums[5] += data.cached_tokens
                sums[6] += data.reasoning_tokens
                sums[7] += data.total_tokens
                sums[8] += rating.package_tokens
                sums[9] += rating.overage_tokens
                sums[10] += rating.charge
                outcome.event_times.append(when)
                yield (
                    "usage", data.account_id, data.key_id, rating.package_id, event.id, event.source,
                    data.request_id, data.endpoint, data.model, data.kind, data.status, data.usage_estimated,
                    when, rating.local_day, data.inputs, data.prompt_tokens, data.completion_tokens,
                    data.total_tokens, data.cached_tokens, data.reasoning_tokens, rating.package_tokens,
                    rating.overage_tokens, rating.charge, rating.overage_charge, -rating.charge,
                    rating.price_id, data.reservation_id,
                )

        if valid:
            await uow.insert_ledger(rated())
        await uow.save_accounts(accounts.values(), charges)
        await uow.save_packages(packages.values())
        await uow.save_spend([
            (k.key_id, period_type, start, k.account_id, s.spend, s.breached)
            for k in key_states.values()
            for period_type, spends in (("day", k.daily), ("month", k.monthly))
            for start, s in spends.items()
        ])
        await uow.add_usage_daily([(k[0], k[1], k[2], *v) for k, v in rollup.items()])

        rows, outbox = book_breaches(breaches, config.breach_topic, config.source_name)
        await uow.insert_breaches(rows)
        outcome.breaches = len(breaches)
        outcome.breach_types.update(b.type for b in breaches)

        stats = _Stats()
        dead_rows = []
        for d in dead:
            d_id = new_id("dlq")
            dead_rows.append((d_id, d.reason, d.detail, d.event_id, d.source, config.topic, d.record.partition,
                              d.record.offset, d.record.value or b"", now, d.record.key))
        inserted = await uow.insert_dead_letters(dead_rows)
        for d, row in zip(dead, dead_rows):
            if row[0] not in inserted:  # this very message was dead-lettered before: a redelivery
                stats.add(d.source, DUPLICATE)
                outcome.duplicates += 1
                continue
            is_conflict = d.reason == Reason.ID_CONFLICT
            stats.add(d.source, CONFLICT if is_conflict else DEAD)
            if is_conflict:
                outcome.conflicts += 1
            else:
                outcome.dead_lettered += 1
            outcome.dead_letter_reasons[d.reason] += 1
            outbox.append((
                config.dlq_topic,
                d.record.key,
                dead_letter_message(
                    dead_letter_id=row[0], reason=d.reason, detail=d.detail, topic=config.topic,
                    partition=d.record.partition, offset=d.record.offset, event_id=d.event_id,
                    payload=d.record.value or b"", received_at=now, source=config.source_name,
                ),
            ))
        await uow.insert_outbox(outbox)
        for source in duplicate_sources:
            stats.add(source, DUPLICATE)
        for record in valid:
            stats.add(record.accepted.event.source, ACCEPTED)
        outcome.duplicates += len(duplicate_sources)
        outcome.accepted = len(valid)
        await uow.add_ingest_stats(stats.rows(), now.date())
        # Authorizers reload these accounts and release the reservations these events settle.
        if valid:
            await notify_quota(conn, quota_notices(
                accounts, (r.accepted.event.data.reservation_id for r in valid)))
    return outcome


def is_booked_before(exc: asyncpg.UniqueViolationError) -> bool:
    """The violation is of ``usage_events``' primary key: the batch holds an event id the
    ledger already has."""
    return exc.constraint_name == "pk_usage_events"


def book_breaches(breaches: list[Breach], topic: str, source: str) -> tuple[list[tuple], list[tuple]]:
    """Breach table rows and their outbox messages, under fresh breach ids."""
    rows, messages = [], []
    for b in breaches:
        breach_id = new_id("brk")
        rows.append((breach_id, b.type, b.account_id, b.key_id, b.package_id, b.period, b.unit,
                     b.cap, b.spend, b.overshoot, b.event_id, b.occurred_at))
        view = breach_view(
            breach_id=breach_id, type=b.type, account_id=b.account_id, key_id=b.key_id,
            package_id=b.package_id, period=b.period, unit=b.unit, cap=b.cap, spend=b.spend,
            overshoot=b.overshoot, event_id=b.event_id, occurred_at=b.occurred_at,
        )
        messages.append((topic, b.account_id.encode(), breach_message(view, source)))
    return rows, messages


def _conflict(record: Record, accepted: AcceptedEvent) -> _DeadLetter:
    return _DeadLetter(
        record,
        Reason.ID_CONFLICT,
        f"event id {accepted.event.id!r} was already accepted with a different payload",
        accepted.event.id,
        accepted.event.source,
    )
