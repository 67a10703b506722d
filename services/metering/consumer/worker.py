"""The metering consumer: a Kafka consumer group member on the usage topic.

Exactly-once into PostgreSQL: offsets live in the database and move in the same
transaction as the batch's ledger entries. On assignment the consumer seeks to the
stored offsets; a batch that fails (or is fenced because a rebalance gave its partition
to someone else) rolls back and the consumer seeks back to what the database says.
Offsets are also committed to Kafka after the database commit, only so lag dashboards
work; Kafka's copy is never read back.

The next batch is fetched and decoded while the current one's SQL runs (decoding is pure
CPU and needs no database), and keeps growing, up to the batch size, until the booking loop
takes it: under a steady load a message waits for at most the batch before it, not for a
batch that was cut while that one was booked. Each seek of a partition bumps that partition's seek count;
the messages of a partition read ahead under an older count are dropped (the seek has
already pointed the fetcher back at them), so nothing is skipped or booked twice.

A batch is booked assuming its events are new: the primary key of the accepted events
catches one that was booked before, and the batch is rolled back and booked again with its
event ids looked up first (duplicates skipped, id conflicts quarantined). Offsets held in
the same transaction mean a booked message is never read twice, so only a producer's
retries or a replay bring booked events back; while batches keep finding them, ids are
looked up in advance.

Positions move under one lock: booking a batch, seeking to the stored offsets on
assignment, and rewinding after a rollback never interleave, so a seek always reads what
the last batch committed. A fetch that starts past the stored offset (a broker that made
later messages visible before earlier ones), or that skips an offset, is not booked past
the hole: the partition is read again from there, and only a hole that persists across
rereads (offsets the log no longer holds) is stepped over, counted and logged.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from services.contracts.ids import new_id
from services.metering import metrics
from services.metering.consumer.batch import (
    BatchConfig,
    BatchOutcome,
    Record,
    is_booked_before,
    judge_contract,
    process_batch,
)
from services.metering.consumer.membership import GroupMembership
from services.metering.store.ingest import Fenced, PriceCache, connect, stored_offset
from services.settings import Settings

log = structlog.get_logger("tollhouse.consumer")

RETRY_MIN_SECONDS = 0.2
RETRY_MAX_SECONDS = 10.0
LAG_REPORT_SECONDS = 1.0
DECODE_SLICE = 500
GAP_REREADS = 3  # times a partition is read again before a gap in its offsets is accepted


class _OffsetListener(ConsumerRebalanceListener):
    def __init__(self, worker: "UsageConsumer") -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.worker.membership.rebalancing()
        # Let the batch in flight finish (its commit is fenced anyway), then forget them.
        async with self.worker.offsets_lock:
            for tp in revoked:
                self.worker.positions.pop(tp.partition, None)
        self.worker.membership.released(tp.partition for tp in revoked)
        if revoked:
            self.worker.log.info("partitions_revoked", partitions=sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        try:
            await self.worker.seek_to_stored(assigned)
        except Exception as exc:  # the consumer's loop tries again (_take_up_missed)
            self.worker._drop_connection()
            self.worker.membership.failed(exc)
            self.worker.missed = True
            self.worker.log.error("partitions_not_taken_up", partitions=sorted(tp.partition for tp in assigned),
                                  error=repr(exc))
            return
        self.worker.membership.joined(tp.partition for tp in assigned)
        if assigned:
            self.worker.log.info("partitions_assigned", partitions=sorted(tp.partition for tp in assigned))


class UsageConsumer:
    def __init__(self, settings: Settings, database_url: str, *, client_id: str = "tollhouse-metering") -> None:
        self.settings = settings
        self.database_url = database_url
        self.client_id = client_id
        self.log = log.bind(consumer=client_id)  # a process may run several members
        self.config = BatchConfig(
            group=settings.consumer_group,
            topic=settings.usage_topic,
            dlq_topic=settings.dlq_topic,
            breach_topic=settings.breach_topic,
            max_event_bytes=settings.max_event_bytes,
            max_future=timedelta(seconds=settings.max_event_future_seconds),
        )
        self.prices = PriceCache()
        self.positions: dict[int, int] = {}  # partition → next offset the database holds
        # Held while positions move: booking a batch, seeking to stored offsets, rewinding.
        self.offsets_lock = asyncio.Lock()
        self.assigned = asyncio.Event()
        self.missed = False  # the rebalance listener could not take up its partitions
        self.membership = GroupMembership(settings.consumer_group)
        # partition → how often it was sought: messages read ahead before a seek of their
        # partition may not follow on from the new position; the seek brings them again.
        self._seeks: dict[int, int] = {}
        self._gaps: dict[int, tuple[int, int]] = {}  # partition → (stored offset, rereads) of a gap
        self._look_up_ids = False  # ask the database for booked event ids before booking a batch
        self._lag_reported_at = 0.0
        self._take_up_at = 0.0  # when to try again to take up partitions whose offsets were not read
        self._take_up_delay = RETRY_MIN_SECONDS
        self.totals = BatchOutcome()
        self.on_commit: list = []  # callbacks(outcome) after each committed batch
        self._consumer: AIOKafkaConsumer | None = None
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        """The consumer's one connection; only used with ``offsets_lock`` held."""
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self.database_url)
        return self._conn

    async def seek_to_stored(self, partitions: list[TopicPartition], *, unpositioned_only: bool = False) -> None:
        assert self._consumer is not None
        async with self.offsets_lock:
            if unpositioned_only:
                partitions = [tp for tp in partitions if tp.partition not in self.positions]
            if not partitions:
                return
            conn = await self._connection()
            for tp in partitions:
                # A partition without a stored offset is read from 0, not from the log start
                # the broker reports: a report that runs ahead of what a reader can see would
                # skip messages unseen. A log that no longer starts at 0 is a gap, stepped
                # over after rereads, and its lost offsets are logged and counted.
                offset = await stored_offset(conn, self.config.group, tp.topic, tp.partition, 0)
                self._seek(tp, offset)
                self.positions[tp.partition] = offset
        self.assigned.set()

    async def run(self, stop: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap_servers,
            group_id=self.config.group,
            client_id=self.client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.settings.consumer_fetch_wait_ms,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            rebalance_timeout_ms=30_000,
        )
        self._consumer = consumer
        consumer.subscribe([self.config.topic], listener=_OffsetListener(self))
        await consumer.start()
        self.log.info("consumer_started", topic=self.config.topic, group=self.config.group)
        delay = RETRY_MIN_SECONDS
        # The next batch is fetched and decoded while the current one's SQL runs.
        ahead = _NextBatch()
        fetcher = asyncio.create_task(self._fetch_ahead(consumer, ahead, stop), name="consumer-fetch")
        try:
            while not stop.is_set():
                await self._take_up_missed()
                fetched = await ahead.take(self.settings.consumer_poll_ms / 1000)
                if fetched is None:
                    continue
                # Every log line about this batch carries its id and the offsets it covers.
                with structlog.contextvars.bound_contextvars(
                    batch_id=new_id("bat"), offsets=_offset_ranges(fetched.records)
                ):
                    try:
                        await self._book(fetched)
                        delay = RETRY_MIN_SECONDS
                    except Exception as exc:  # roll back to what the database holds and retry
                        await self._rewind(fetched.records)
                        if isinstance(exc, Fenced):
                            metrics.BATCHES_FENCED.inc()
                            self.log.warning("batch_fenced", partition=exc.partition, expected=exc.expected)
                        else:
                            self.log.error("batch_failed", error=repr(exc), retry_in=delay)
                            await _sleep_unless(stop, delay)
                            delay = min(delay * 2, RETRY_MAX_SECONDS)
        finally:
            fetcher.cancel()
            await asyncio.gather(fetcher, return_exceptions=True)
            self.membership.left()
            await consumer.stop()
            if self._conn is not None and not self._conn.is_closed():
                await self._conn.close()
            self.log.info("consumer_stopped")

    async def _take_up_missed(self) -> None:
        """Partitions assigned whose stored offsets could not be read when they arrived (the
        database was away during the rebalance; the rebalance listener cannot retry, as
        aiokafka only logs what it raises): read them again, with backoff. Until then their
        messages are fetched but not booked, and /readyz reports the member out of its group."""
        assert self._consumer is not None
        if not self.missed or time.monotonic() < self._take_up_at:
            return
        missed = [tp for tp in self._consumer.assignment() if tp.partition not in self.positions]
        if not missed:
            self.missed = False
            return
        try:
            await self.seek_to_stored(missed, unpositioned_only=True)
        except Exception as exc:
            self._drop_connection()
            self.membership.failed(exc)
            self._take_up_at = time.monotonic() + self._take_up_delay
            self.log.error("partitions_not_taken_up", partitions=sorted(tp.partition for tp in missed),
                           error=repr(exc), retry_in=self._take_up_delay)
            self._take_up_delay = min(self._take_up_delay * 2, RETRY_MAX_SECONDS)
            return
        self._take_up_delay = RETRY_MIN_SECONDS
        self.missed = False
        self.membership.joined(tp.partition for tp in self._consumer.assignment())
        self.log.info("partitions_assigned", partitions=sorted(tp.partition for tp in missed), late=True)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    async def _fetch_ahead(self, consumer: AIOKafkaConsumer, ahead: "_NextBatch", stop: asyncio.Event) -> None:
        """Fetch batches and judge them against the contract (pure CPU) while the batch
        before is being booked; hand them over with their partitions' seek counts."""
        try:
            while not stop.is_set():
                room = self.settings.consumer_batch_max - ahead.messages
                if room <= 0:
                    await ahead.taken()
                    continue
                batch = await consumer.getmany(timeout_ms=self.settings.consumer_poll_ms, max_records=room)
                seeks = {tp.partition: self._seeks.get(tp.partition, 0) for tp in batch}
                if time.monotonic() - self._lag_reported_at >= LAG_REPORT_SECONDS:
                    self._report_lag()
                if not batch:
                    continue
                now = datetime.now(timezone.utc)
                records: dict[TopicPartition, list[Record]] = {}
                for tp, messages in batch.items():
                    judged = records[tp] = []
                    for start in range(0, len(messages), DECODE_SLICE):
                        chunk = [Record(tp.partition, m.offset, m.key, m.value, m.timestamp)
                                 for m in messages[start:start + DECODE_SLICE]]
                        judge_contract(chunk, self.config, now)
                        judged += chunk
                        await asyncio.sleep(0)  # let the booking task move its SQL along
                # Only the records are kept from here on: aiokafka's message objects are
                # let go now rather than live, watched by the garbage collector, until booked.
                del batch, messages
                ahead.add(_Fetched(seeks, records))
        except Exception as exc:  # the booking loop re-raises it
            ahead.fail(exc)

    async def _book(self, fetched: "_Fetched") -> None:
        async with self.offsets_lock:
            booked = await self._book_positioned(fetched)
        if booked is None:
            return
        moves, outcome = booked
        await self._commit_to_kafka(moves)
        for callback in self.on_commit:
            callback(outcome)

    async def _book_positioned(self, fetched: "_Fetched") -> tuple[dict[int, tuple[int, int]], BatchOutcome] | None:
        """Book what follows on from each partition's stored offset; ``offsets_lock`` is held."""
        records: list[Record] = []
        moves: dict[int, tuple[int, int]] = {}
        produced_at: list[int] = []  # Kafka timestamp (ms) of each partition's oldest message
        for tp, judged in fetched.records.items():
            if tp.partition not in self.positions or not judged:
                continue  # revoked while fetched
            if fetched.seeks[tp.partition] != self._seeks.get(tp.partition, 0):
                continue  # sought since: the fetcher reads these again from the new position
            expected = self.positions[tp.partition]
            fresh = [r for r in judged if r.offset >= expected]
            if not fresh:
                continue
            if fresh[0].offset > expected and not self._step_over_gap(tp, expected, fresh[0].offset):
                continue
            first = fresh[0]
            if first.timestamp is not None and first.timestamp > 0:
                produced_at.append(first.timestamp)
            run = _contiguous(fresh)
            if run < len(fresh):  # a hole inside the fetch: book up to it, read again from there
                self._reread(tp, fresh[run - 1].offset + 1, fresh[run].offset, 0)
                fresh = fresh[:run]
            records += fresh
            moves[tp.partition] = (expected, fresh[-1].offset + 1)
        if not moves:
            return None
        started = time.perf_counter()
        conn = await self._connection()
        try:
            outcome = await process_batch(conn, records, moves, self.config, self.prices,
                                          look_up_ids=self._look_up_ids)
        except asyncpg.UniqueViolationError as exc:
            if self._look_up_ids or not is_booked_before(exc):
                raise
            metrics.BATCHES_REBOOKED.inc()
            self.log.info("batch_rebooked", events=len(records), reason="an event id the ledger already holds")
            outcome = await process_batch(conn, records, moves, self.config, self.prices, look_up_ids=True)
        # Redelivered events come in runs (a replay, a producer's retries): look ids up in
        # advance while batches keep finding booked ones, and not otherwise.
        self._look_up_ids = outcome.booked_before > 0
        committed_at = datetime.now(timezone.utc)
        for partition, (_, new) in moves.items():
            self.positions[partition] = new
        self._observe(outcome, time.perf_counter() - started, committed_at)
        committed_ms = committed_at.timestamp() * 1000
        for timestamp in produced_at:
            metrics.PRODUCE_TO_COMMIT_SECONDS.observe(max(committed_ms - timestamp, 0) / 1000)
        self._report_lag()
        return moves, outcome

    def _step_over_gap(self, tp: TopicPartition, expected: int, first: int) -> bool:
        """The fetch of a partition starts at ``first``, past its stored offset ``expected``.
        Read the partition again from ``expected`` (False) up to GAP_REREADS times; a gap
        still there after that is offsets the log does not hold (retention, control
        records), and is stepped over (True)."""
        stored, rereads = self._gaps.get(tp.partition, (expected, 0))
        if stored != expected:
            rereads = 0
        if rereads < GAP_REREADS:
            self._gaps[tp.partition] = (expected, rereads + 1)
            self._reread(tp, expected, first, rereads + 1)
            return False
        del self._gaps[tp.partition]
        metrics.OFFSET_GAPS.labels("skipped").inc()
        metrics.OFFSETS_SKIPPED.inc(first - expected)
        self.log.error("offset_gap_skipped", partition=tp.partition, expected=expected, first=first,
                       skipped=first - expected)
        return True

    def _reread(self, tp: TopicPartition, expected: int, first: int, reread: int) -> None:
        """Point the fetcher back at ``expected``: the fetch went on at ``first``."""
        metrics.OFFSET_GAPS.labels("reread").inc()
        self.log.warning("offset_gap", partition=tp.partition, expected=expected, first=first, reread=reread)
        self._seek(tp, expected)

    def _report_lag(self) -> None:
        """Lag of each owned partition: its end (as of the last fetch) minus the offset the
        database holds. Also while idle or failing, so the gauge never freezes."""
        self._lag_reported_at = time.monotonic()
        if self._consumer is None:
            return
        for partition, position in list(self.positions.items()):
            highwater = self._consumer.highwater(TopicPartition(self.config.topic, partition))
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(str(partition)).set(max(highwater - position, 0))

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        assert self._consumer is not None
        self._consumer.seek(tp, offset)
        self._seeks[tp.partition] = self._seeks.get(tp.partition, 0) + 1

    async def _rewind(self, records: dict[TopicPartition, list[Record]]) -> None:
        """After a rollback, read again from the offsets the database holds."""
        assert self._consumer is not None
        async with self.offsets_lock:
            try:
                conn = await self._connection()
                for tp in records:
                    if tp in self._consumer.assignment():
                        offset = await stored_offset(conn, self.config.group, tp.topic, tp.partition, 0)
                        self.positions[tp.partition] = offset
                        self._seek(tp, offset)
            except Exception as exc:
                self._drop_connection()
                for tp in records:
                    if tp.partition in self.positions and tp in self._consumer.assignment():
                        self._seek(tp, self.positions[tp.partition])
                self.log.error("rewind_failed", error=repr(exc))

    async def _commit_to_kafka(self, moves: dict[int, tuple[int, int]]) -> None:
        assert self._consumer is not None
        offsets = {
            TopicPartition(self.config.topic, p): OffsetAndMetadata(new, "")
            for p, (_, new) in moves.items()
        }
        try:
            await self._consumer.commit(offsets)
        except Exception as exc:  # informational copy only; the database is the truth
            self.log.debug("kafka_commit_skipped", error=repr(exc))

    def _observe(self, outcome: BatchOutcome, seconds: float, committed_at: datetime) -> None:
        t = self.totals
        t.received += outcome.received
        t.accepted += outcome.accepted
        t.duplicates += outcome.duplicates
        t.conflicts += outcome.conflicts
        t.dead_lettered += outcome.dead_lettered
        t.breaches += outcome.breaches
        t.dead_letter_reasons.update(outcome.dead_letter_reasons)
        metrics.EVENTS_CONSUMED.inc(outcome.received)
        metrics.EVENTS_ACCEPTED.inc(outcome.accepted)
        metrics.EVENTS_DUPLICATE.inc(outcome.duplicates)
        metrics.EVENTS_CONFLICT.inc(outcome.conflicts)
        for reason, n in outcome.dead_letter_reasons.items():
            metrics.EVENTS_DEAD_LETTERED.labels(reason).inc(n)
        for kind, n in outcome.breach_types.items():
            metrics.BREACHES.labels(kind).inc(n)
        metrics.BATCH_COMMIT_SECONDS.observe(seconds)
        if outcome.event_times:
            metrics.EVENT_TO_COMMIT_SECONDS.observe((committed_at - max(outcome.event_times)).total_seconds())
        self.log.debug(
            "batch_committed", received=outcome.received, accepted=outcome.accepted,
            duplicates=outcome.duplicates, dead_lettered=outcome.dead_lettered, seconds=round(seconds, 4),
        )


def consumer_members(settings: Settings, database_url: str) -> list[UsageConsumer]:
    """The ``consumer_members`` group members of one metering process, each its own Kafka
    client and database connection; the group spreads the partitions over all of them."""
    count = settings.consumer_members
    names = ["tollhouse-metering"] if count == 1 else [f"tollhouse-metering-{i}" for i in range(1, count + 1)]
    return [UsageConsumer(settings, database_url, client_id=name) for name in names]


@dataclass(slots=True)
class _Fetched:
    seeks: dict[int, int]  # partition → its seek count when the messages were fetched
    records: dict[TopicPartition, list[Record]]  # the messages as fetched, judged


class _NextBatch:
    """What the fetcher has read and judged since the booking loop last took a batch. New
    fetches are appended to it (the fetcher stops at the batch size until it is taken); a
    partition sought between two fetches keeps only the messages fetched after the seek."""

    def __init__(self) -> None:
        self._fetched: _Fetched | None = None
        self.messages = 0
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._taken = asyncio.Event()

    def add(self, fetched: _Fetched) -> None:
        self.messages += sum(len(r) for r in fetched.records.values())
        if self._fetched is None:
            self._fetched = fetched
        else:
            held = self._fetched
            for tp, records in fetched.records.items():
                seeks = fetched.seeks[tp.partition]
                if tp in held.records and held.seeks[tp.partition] == seeks:
                    held.records[tp].extend(records)
                else:  # new, or sought since: what was held of it is stale
                    held.records[tp] = records
                    held.seeks[tp.partition] = seeks
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def take(self, timeout: float) -> _Fetched | None:
        """The batch, once there is one (None after ``timeout`` seconds); raises what the fetcher raised."""
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        if self._error is not None:
            raise self._error
        fetched, self._fetched, self.messages = self._fetched, None, 0
        self._ready.clear()
        self._taken.set()
        return fetched

    async def taken(self) -> None:
        """Wait until the booking loop takes the batch."""
        self._taken.clear()
        await self._taken.wait()


def _contiguous(records: list[Record]) -> int:
    """How many of ``records`` follow on from the first without a missing offset."""
    start = records[0].offset
    if records[-1].offset - start + 1 == len(records):  # offsets only ever increase
        return len(records)
    for i, record in enumerate(records):
        if record.offset != start + i:
            return i
    return len(records)


def _offset_ranges(records: dict[TopicPartition, list[Record]]) -> dict[str, list[int]]:
    """``{"3": [first, last]}``: the offsets fetched per partition, for the log."""
    return {str(tp.partition): [r[0].offset, r[-1].offset] for tp, r in records.items() if r}


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass
