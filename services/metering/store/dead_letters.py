"""SQL behind the dead-letter API: listing with keyset pagination, one dead letter, and replays.

A replay is exactly-once by construction: the ``dead_letter_replays`` row (primary key
``dead_letter_id``) and the ``outbox`` row that re-publishes the stored payload to the
usage topic are inserted in ONE transaction, and the replay row is inserted with
``ON CONFLICT DO NOTHING``: of any number of concurrent or repeated replays of one dead
letter, exactly one inserts and sends; the others find its record. The outbox relay
publishes the message, and the consumer books it once (its event id is the idempotency
key) or dead-letters it again under a new offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, insert, literal, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.metering.store.paging import keyset_page, page_of
from services.metering.store.tables import DeadLetter, DeadLetterReplay, Outbox

dead_letters = DeadLetter.__table__
replays = DeadLetterReplay.__table__
outbox = Outbox.__table__

# (received_at, topic, partition, offset): the listing order, newest first. The Kafka position
# is unique (one dead letter per message) and, unlike the random part of an id, meaningful.
DeadLetterKey = tuple[datetime, str, int, int]


@dataclass(frozen=True, slots=True)
class ReplayRecord:
    dead_letter_id: str
    event_id: str | None
    topic: str
    message_key: bytes | None
    replayed_at: datetime


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    dead_letter_id: str
    reason: str
    detail: str
    event_id: str | None
    source: str | None
    topic: str
    partition: int
    offset: int
    received_at: datetime
    message_key: bytes | None
    payload: bytes  # whole, or its first bytes when ``payload_bytes`` is larger
    payload_bytes: int
    replay: ReplayRecord | None

    @property
    def payload_truncated(self) -> bool:
        return len(self.payload) < self.payload_bytes


@dataclass(frozen=True, slots=True)
class DeadLetterPage:
    rows: list[DeadLetterRecord]
    next_after: DeadLetterKey | None


def _columns(payload_preview_bytes: int | None) -> tuple:
    payload = dead_letters.c.payload
    if payload_preview_bytes is not None:
        payload = func.substring(dead_letters.c.payload, 1, payload_preview_bytes)
    return (
        dead_letters.c.dead_letter_id,
        dead_letters.c.reason,
        dead_letters.c.detail,
        dead_letters.c.event_id,
        dead_letters.c.source,
        dead_letters.c.topic,
        dead_letters.c.topic_partition,
        dead_letters.c.kafka_offset,
        dead_letters.c.received_at,
        dead_letters.c.message_key,
        payload.label("payload"),
        func.octet_length(dead_letters.c.payload).label("payload_bytes"),
        replays.c.dead_letter_id.label("replayed_id"),
        replays.c.event_id.label("replay_event_id"),
        replays.c.topic.label("replay_topic"),
        replays.c.message_key.label("replay_message_key"),
        replays.c.replayed_at,
    )


_ORDER = (dead_letters.c.received_at, dead_letters.c.topic, dead_letters.c.topic_partition,
          dead_letters.c.kafka_offset)
_JOINED = dead_letters.outerjoin(replays, replays.c.dead_letter_id == dead_letters.c.dead_letter_id)


def _record(row) -> DeadLetterRecord:
    replay = None
    if row.replayed_id is not None:
        replay = ReplayRecord(row.replayed_id, row.replay_event_id, row.replay_topic,
                              _bytes(row.replay_message_key), row.replayed_at)
    return DeadLetterRecord(
        dead_letter_id=row.dead_letter_id,
        reason=row.reason,
        detail=row.detail,
        event_id=row.event_id,
        source=row.source,
        topic=row.topic,
        partition=row.topic_partition,
        offset=row.kafka_offset,
        received_at=row.received_at,
        message_key=_bytes(row.message_key),
        payload=bytes(row.payload),
        payload_bytes=row.payload_bytes,
        replay=replay,
    )


def _bytes(value: bytes | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)


class DeadLetterStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def list(
        self,
        *,
        reason: str | None,
        received_from: datetime | None,
        received_to: datetime | None,
        after: DeadLetterKey | None,
        limit: int,
        payload_preview_bytes: int,
    ) -> DeadLetterPage:
        """Newest first by (received_at, topic, partition, offset); ``received_at`` in [from, to)."""
        query = select(*_columns(payload_preview_bytes)).select_from(_JOINED)
        if reason is not None:
            query = query.where(dead_letters.c.reason == reason)
        if received_from is not None:
            query = query.where(dead_letters.c.received_at >= received_from)
        if received_to is not None:
            query = query.where(dead_letters.c.received_at < received_to)
        query = keyset_page(query, _ORDER, after, limit, descending=True)
        async with self._engine.begin() as conn:
            rows = [_record(r) for r in (await conn.execute(query)).all()]
        return DeadLetterPage(*page_of(rows, limit, lambda d: (d.received_at, d.topic, d.partition, d.offset)))

    async def get(self, dead_letter_id: str) -> DeadLetterRecord | None:
        """One dead letter with its whole payload."""
        async with self._engine.begin() as conn:
            return await _get(conn, dead_letter_id)

    async def replay(
        self, dead_letter_id: str, *, topic: str, message_key: bytes | None, event_id: str | None
    ) -> tuple[ReplayRecord, bool]:
        """Record the replay and queue the stored payload on ``topic``, once; (record, newly made).

        A repeat (or the loser of a race) sends nothing and gets the first replay's record.
        """
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    pg_insert(replays)
                    .values(dead_letter_id=dead_letter_id, event_id=event_id, topic=topic, message_key=message_key)
                    .on_conflict_do_nothing(index_elements=[replays.c.dead_letter_id])
                    .returning(replays.c.dead_letter_id, replays.c.event_id, replays.c.topic,
                               replays.c.message_key, replays.c.replayed_at)
                )
            ).first()
            if row is not None:
                # The payload goes from row to row inside PostgreSQL, byte for byte: the
                # replayed message has the digest of the original, so the consumer's
                # idempotency check recognises it.
                queued = await conn.execute(
                    insert(outbox).from_select(
                        ["topic", "message_key", "payload"],
                        select(literal(topic), literal(message_key, outbox.c.message_key.type), dead_letters.c.payload)
                        .where(dead_letters.c.dead_letter_id == dead_letter_id),
                    )
                )
                assert queued.rowcount == 1, "the dead letter a replay row points at exists"
                return ReplayRecord(row.dead_letter_id, row.event_id, row.topic, _bytes(row.message_key),
                                    row.replayed_at), True
        existing = await self.get(dead_letter_id)
        assert existing is not None and existing.replay is not None, "a replay row exists for this dead letter"
        return existing.replay, False


async def _get(conn: AsyncConnection, dead_letter_id: str) -> DeadLetterRecord | None:
    row = (
        await conn.execute(
            select(*_columns(None)).select_from(_JOINED).where(dead_letters.c.dead_letter_id == dead_letter_id)
        )
    ).first()
    return None if row is None else _record(row)
