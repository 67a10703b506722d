"""The gateway's durable local store: the usage-event spool, and who owns which Batch API
file and job. One SQLite file (write-ahead log) under ``DATA_DIR``.

A metered call is held here as it goes upstream: ``hold`` stores the call's fallback
event (what it is billed as if the gateway dies before it ends: status ``cancelled``, the
prompt estimate, ``usage_estimated``) at once, and its future gives the row once that is
durable (fsynced); the upstream request is on its way meanwhile, so the fsync is not
waited for on top of the call. When the call ends, ``settle`` replaces the fallback with
the call's real event without an fsync of its own: a process that dies after it loses
nothing (the write is in the operating system), and a power cut before the next fsync
leaves the fallback, billed as the estimate, never nothing. A call that never reached
upstream is ``drop``-ped. Held rows are not sent; when the spool is opened, holds left by
a previous process are released as their fallback events. Events with nothing to hold
(a Batch API job's) are ``append``-ed, durable on return.

The emitter sends released rows to Kafka in order and deletes them only after the broker
acknowledged them. When Kafka is unreachable rows accumulate; past ``SPOOL_MAX_EVENTS`` /
``SPOOL_MAX_BYTES`` the gateway refuses new calls (it never serves a call it cannot meter).

How it writes: every statement is small and runs on the event loop's thread (one here
costs ~20 µs; handing work to a thread and back cost ~100 µs of CPU on the machines
measured). Transactions commit to the write-ahead log without an fsync
(``synchronous=NORMAL``); a write that must be durable before its caller goes on (a hold,
an append, Batch API records) then waits for an fsync of the log. The fsync is asked for
once the callbacks already due have run, so that one fsync covers every write they made
(group commit); one fsync runs at a time, and writes made while it runs wait for the next.
Where it runs depends on what else the loop has to do (``quiet``, given by the gateway:
no call but the one asking is in flight). When the loop is quiet the fsync runs on it: it
blocks nothing else, and it ends sooner than a round trip to another process (two
wake-ups, ~0.15 ms on the machines measured, against an fsync of ~0.2 ms). Otherwise, and
when a write's caller needs the loop meanwhile (``hold(off_loop=True)``: a stream), a
small child process (``FsyncWorker``) does it, and the loop goes on serving calls
meanwhile. Without the worker (it could not start, or it died) every fsync runs on the
loop. A hold is stored after the call's request went upstream, so its fsync overlaps the
upstream's work. The log is checkpointed by a thread of the spool's own (``_Checkpointer``),
never inside a commit on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from services.gateway.fsync_worker import FsyncWorker

T = TypeVar("T")

log = structlog.get_logger("tollhouse.gateway.spool")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    key   BLOB NOT NULL,
    value BLOB NOT NULL,
    held  INTEGER NOT NULL DEFAULT 0  -- 1: a call in flight's fallback event, not to be sent yet
);
CREATE TABLE IF NOT EXISTS files (
    file_id          TEXT PRIMARY KEY,
    account_id       TEXT NOT NULL,
    key_id           TEXT NOT NULL,
    purpose          TEXT NOT NULL,
    model            TEXT,
    lines            INTEGER NOT NULL DEFAULT 0,
    prompt_estimate  INTEGER NOT NULL DEFAULT 0,
    reserve_estimate INTEGER NOT NULL DEFAULT 0,
    created_at       REAL NOT NULL,
    deleted_at       REAL
);
CREATE TABLE IF NOT EXISTS batches (
    batch_id         TEXT PRIMARY KEY,
    account_id       TEXT NOT NULL,
    key_id           TEXT NOT NULL,
    model            TEXT NOT NULL,
    input_file_id    TEXT NOT NULL,
    lines            INTEGER NOT NULL,
    prompt_estimate  INTEGER NOT NULL,
    reservation_id   TEXT,
    created_at       REAL NOT NULL,
    emitted_event_id TEXT,
    emitted_at       REAL
);
CREATE INDEX IF NOT EXISTS batches_pending ON batches (created_at) WHERE emitted_event_id IS NULL;
CREATE INDEX IF NOT EXISTS batches_by_account ON batches (account_id, created_at, batch_id);
"""
# After the files table exists in its current shape (spool files written before
# DELETE /v1/files was routed have no deleted_at).
_FILES_BY_ACCOUNT = "CREATE INDEX IF NOT EXISTS files_by_account ON files (account_id, created_at, file_id)"
_FILE_COLUMNS = "file_id, account_id, key_id, purpose, model, lines, prompt_estimate, reserve_estimate"
_BATCH_COLUMNS = ("batch_id, account_id, key_id, model, input_file_id, lines, prompt_estimate, reservation_id,"
                  " emitted_event_id")
# What a result file of a batch job is recorded as (purpose), and what it is listed as.
RESULT_FILE_PURPOSES = {"batch_output": ("batch_output", "batch_error")}


class SpoolError(RuntimeError):
    """The spool could not store or read (disk full, file unwritable)."""


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    seq: int
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class FileRecord:
    file_id: str
    account_id: str
    key_id: str
    purpose: str
    model: str | None
    lines: int
    prompt_estimate: int
    reserve_estimate: int


@dataclass(frozen=True, slots=True)
class BatchRecord:
    batch_id: str
    account_id: str
    key_id: str
    model: str
    input_file_id: str
    lines: int
    prompt_estimate: int
    reservation_id: str | None
    emitted_event_id: str | None


# A checkpoint copies the log into the database file (and fsyncs it), after which the next
# write starts the log over. SQLite runs one inside the commit that takes the log past a
# size, blocking the loop for its length (~0.5–1 ms, several times a second at 500
# calls/s); here a thread of the spool's own runs them instead, on a connection of its own,
# every CHECKPOINT_SECONDS while there were writes (the sqlite3 module lets go of the
# interpreter lock while SQLite works, so the loop goes on meanwhile).
CHECKPOINT_SECONDS = 0.1


class _Checkpointer:
    """The thread that checkpoints the spool's log while the loop writes to it."""

    def __init__(self, path: Path, commits: Callable[[], int]) -> None:
        self._commits = commits
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-checkpointer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        done = 0
        failing = False
        while not self._stop.wait(CHECKPOINT_SECONDS):
            upto = self._commits()
            if upto == done:
                continue
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:  # tried again next time; the log grows meanwhile
                if not failing:
                    log.warning("spool_checkpoint_failed", error=repr(exc))
                failing = True
                continue
            if failing:
                log.info("spool_checkpoint_recovered")
            failing = False
            done = upto

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()


class Spool:
    def __init__(self, path: Path, *, max_events: int, max_bytes: int, fsync_worker: bool = True,
                 quiet: Callable[[], bool] | None = None) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.events = 0  # rows, held ones included; kept here so admission checks never touch the disk
        self.bytes = 0
        self.held = 0  # rows of calls in flight
        self.released_on_open = 0  # holds a previous process left, released as their fallback events
        self._held_sizes: dict[int, int] = {}
        self._conn: sqlite3.Connection | None = None
        self._log_fd: int | None = None  # the write-ahead log, for fsync
        self._commits = 0  # transactions committed by this process
        self._synced = 0  # of which on disk
        self._fsync: asyncio.Future | None = None  # the next fsync, not yet started
        self._in_flight: tuple[asyncio.Future, int] | None = None  # the worker's fsync, and the commits it covers
        self._use_worker = fsync_worker
        self._quiet = quiet  # True: an fsync on the loop would hold up nothing else (no other call in flight)
        self._fsync_off_loop = False  # the next fsync covers a write whose caller needs the loop meanwhile
        self._worker: FsyncWorker | None = None
        self._checkpointer: _Checkpointer | None = None
        self.on_change: list[Callable[[], None]] = []

    # Life cycle

    async def open(self) -> "Spool":
        try:
            self.events, self.bytes, self.released_on_open = self._open()
        except (sqlite3.Error, OSError) as exc:
            self._close()
            raise SpoolError(f"cannot open the spool {self.path}: {exc}") from exc
        if self._use_worker:
            self._start_worker()
        self._changed()
        return self

    def _start_worker(self) -> None:
        assert self._log_fd is not None
        try:
            self._worker = FsyncWorker(self._log_fd, self._worker_synced, self._worker_gone).start(
                asyncio.get_running_loop())
        except OSError as exc:
            log.warning("spool_fsync_worker_not_started", error=repr(exc))

    def _open(self) -> tuple[int, int, int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn = conn
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # durability comes from _sync
        conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's work
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        if "deleted_at" not in {row[1] for row in conn.execute("PRAGMA table_info(files)")}:
            conn.execute("ALTER TABLE files ADD COLUMN deleted_at REAL")
        if "held" not in {row[1] for row in conn.execute("PRAGMA table_info(events)")}:
            conn.execute("ALTER TABLE events ADD COLUMN held INTEGER NOT NULL DEFAULT 0")
        conn.execute(_FILES_BY_ACCOUNT)
        # Calls the previous process held and never settled (it died, or was killed, while
        # they ran): each is billed as its fallback event.
        with _transaction(conn):
            released = conn.execute("UPDATE events SET held = 0 WHERE held = 1").rowcount
        [(count, size)] = conn.execute(
            "SELECT count(*), coalesce(sum(length(key) + length(value)), 0) FROM events").fetchall()
        # The log exists once the connection has read in WAL mode; its directory entry is
        # made durable once, then every durable write is one fsync of the log.
        self._log_fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        os.fsync(self._log_fd)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self._checkpointer = _Checkpointer(self.path, lambda: self._commits)
        return count, size, released

    async def close(self) -> None:
        pending = [f for f in (self._in_flight and self._in_flight[0], self._fsync) if f is not None]
        await asyncio.gather(*pending, return_exceptions=True)
        self._close()

    def _close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _call(self, fn: Callable[..., T], *args: Any, durable: bool = False) -> T:
        """Run ``fn`` (statements on the connection); with ``durable``, return once what it
        committed is on disk."""
        try:
            result = fn(*args)
        except sqlite3.Error as exc:
            raise SpoolError(f"spool statement failed: {exc}") from exc
        if durable:
            await self._sync()
        return result

    # Durability

    def _committed(self) -> None:
        self._commits += 1

    @property
    def fsync_worker_pid(self) -> int | None:
        """The fsync worker's process id; None when fsyncs run on the loop."""
        return self._worker.pid if self._worker is not None and self._worker.alive else None

    async def _sync(self) -> None:
        """Return once every transaction committed so far is on disk."""
        fsync = self._sync_soon()
        if fsync is not None:
            await asyncio.shield(fsync)  # a caller cancelled while waiting does not stop the fsync

    def _sync_soon(self) -> asyncio.Future | None:
        """The fsync that covers every transaction committed so far (None if they are all
        on disk). It starts after the callbacks already due (so every write those make is
        covered by the same fsync), or after the fsync running now, which may not cover them."""
        if self._synced >= self._commits:
            return None
        if self._fsync is None:
            self._fsync = asyncio.get_running_loop().create_future()
            self._fsync.add_done_callback(_retrieve)
            if self._in_flight is None:
                asyncio.get_running_loop().call_soon(self._fsync_now)
        return self._fsync

    def _fsync_now(self) -> None:
        """Start the next fsync: scheduled once for each, and only while none runs."""
        done, self._fsync = self._fsync, None
        assert done is not None and self._in_flight is None, "one fsync at a time"
        upto = self._commits
        busy = self._fsync_off_loop or self._quiet is None or not self._quiet()
        self._fsync_off_loop = False
        if busy and self._log_fd is not None and self._worker is not None and self._worker.request():
            self._in_flight = (done, upto)
            return
        self._fsync_here(done, upto)

    def _fsync_here(self, done: asyncio.Future, upto: int) -> None:
        """The fsync on the loop's thread (blocking it for the fsync's length)."""
        try:
            if self._log_fd is None:
                raise SpoolError("the spool is closed")
            os.fsync(self._log_fd)
        except (OSError, SpoolError) as exc:
            self._synced_upto(done, upto, exc)
            return
        self._synced_upto(done, upto, None)

    def _synced_upto(self, done: asyncio.Future, upto: int, error: BaseException | None) -> None:
        if error is None:
            self._synced = max(self._synced, upto)
            done.set_result(None)
        else:
            done.set_exception(error if isinstance(error, SpoolError) else SpoolError(f"spool fsync failed: {error}"))
        if self._fsync is not None:  # writes made while this one ran
            asyncio.get_running_loop().call_soon(self._fsync_now)

    def _worker_synced(self, error: OSError | None) -> None:
        assert self._in_flight is not None, "a reply from the fsync worker without a request"
        (done, upto), self._in_flight = self._in_flight, None
        self._synced_upto(done, upto, error)

    def _worker_gone(self) -> None:
        """The worker stopped answering: fsyncs run on the loop from now on, the one it
        had open included (it may not have run)."""
        log.warning("spool_fsync_worker_gone", pid=self._worker.pid if self._worker else None)
        if self._in_flight is not None:
            (done, upto), self._in_flight = self._in_flight, None
            self._fsync_here(done, upto)

    # Limits

    @property
    def full(self) -> bool:
        """At or over a limit: new calls are refused until the emitter drains rows."""
        return self.events >= self.max_events or self.bytes >= self.max_bytes

    @property
    def sendable(self) -> int:
        """Rows the emitter may send (all but the holds of calls in flight)."""
        return self.events - self.held

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()

    # Events

    async def append(self, key: bytes, value: bytes) -> None:
        """Store one event to be sent; return once it is on disk.

        Never refused for being full: the call it meters already happened. The limit is
        applied to new calls (``full``), so it is exceeded by at most the calls in flight.
        """
        await self._call(self._insert, key, value, False, durable=True)

    def hold(self, key: bytes, value: bytes, *, off_loop: bool = False) -> asyncio.Future[int]:
        """Store a call's fallback event now, not to be sent while the call runs. The
        future gives its row (for ``settle`` or ``drop``) once it is on disk, or the
        ``SpoolError`` that kept it from there. Not a coroutine: the write and the start of
        its fsync need no turn of the event loop of their own. With ``off_loop`` its fsync
        is left to the worker even when the loop is quiet: the caller needs the loop before
        the fsync would end (a stream's first bytes)."""
        row: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        row.add_done_callback(_retrieve)
        try:
            seq = self._insert(key, value, True)
        except SpoolError as exc:
            row.set_exception(exc)
            return row
        fsync = self._sync_soon()
        self._fsync_off_loop |= off_loop
        if fsync is None:
            row.set_result(seq)
        else:
            fsync.add_done_callback(functools.partial(_resolve, row, seq))
        return row

    def _autocommit(self, statement: str, params: tuple) -> sqlite3.Cursor:
        """One statement, its own transaction (one call into SQLite instead of three)."""
        try:
            cursor = self._connection().execute(statement, params)
        except sqlite3.Error as exc:
            raise SpoolError(f"spool write failed: {exc}") from exc
        self._committed()
        return cursor

    def _insert(self, key: bytes, value: bytes, held: bool) -> int:
        seq = self._autocommit("INSERT INTO events (key, value, held) VALUES (?, ?, ?)", (key, value, held)).lastrowid
        self.events += 1
        self.bytes += len(key) + len(value)
        if held:
            self.held += 1
            self._held_sizes[seq] = len(key) + len(value)
        self._changed()
        return seq

    async def settle(self, seq: int, key: bytes, value: bytes) -> None:
        """Replace a held fallback event with the call's event, to be sent. Not waited on
        to reach the disk: safe from the process dying, and until the next fsync a power
        cut leaves the fallback."""
        await self._call(self._release, seq, key, value)

    async def drop(self, seq: int) -> None:
        """Forget a held fallback event: its call never reached upstream."""
        await self._call(self._release, seq, None, None)

    def _release(self, seq: int, key: bytes | None, value: bytes | None) -> None:
        if seq not in self._held_sizes:
            raise SpoolError(f"spool row {seq} is not held (settled or dropped before)")
        if key is None or value is None:
            self._autocommit("DELETE FROM events WHERE seq = ?", (seq,))
        else:
            self._autocommit("UPDATE events SET key = ?, value = ?, held = 0 WHERE seq = ?", (key, value, seq))
        self.held -= 1
        self.bytes -= self._held_sizes.pop(seq)
        if key is None or value is None:
            self.events -= 1
        else:
            self.bytes += len(key) + len(value)
        self._changed()

    async def read(self, limit: int) -> list[SpooledEvent]:
        """The oldest ``limit`` events to send, in the order they were stored."""
        rows = await self._call(self._read, limit)
        return [SpooledEvent(*row) for row in rows]

    def _read(self, limit: int) -> list[tuple]:
        return self._connection().execute(
            "SELECT seq, key, value FROM events WHERE held = 0 ORDER BY seq LIMIT ?", (limit,)).fetchall()

    async def delete(self, events: list[SpooledEvent]) -> None:
        """Forget events the broker acknowledged. Not waited on to reach the disk: a delete
        lost in a power cut only means those rows are sent again (metering books an event
        id once)."""
        if not events:
            return
        await self._call(self._delete, [(e.seq,) for e in events])
        self.events -= len(events)
        self.bytes -= sum(len(e.key) + len(e.value) for e in events)
        self._changed()

    def _delete(self, seqs: list[tuple[int]]) -> None:
        conn = self._connection()
        with _transaction(conn, self._committed):
            conn.executemany("DELETE FROM events WHERE seq = ?", seqs)

    async def probe(self) -> None:
        """Raise unless the file can be written (for /readyz)."""
        await self._call(self._probe, durable=True)

    def _probe(self) -> None:
        conn = self._connection()
        with _transaction(conn, self._committed):
            conn.execute("CREATE TABLE IF NOT EXISTS probe (at REAL)")
            conn.execute("DELETE FROM probe")
            conn.execute("INSERT INTO probe VALUES (?)", (time.time(),))

    # Batch API ownership and the once-only batch event

    async def record_file(self, record: FileRecord) -> None:
        await self._call(self._record_file, record, durable=True)

    def _record_file(self, r: FileRecord) -> None:
        conn = self._connection()
        with _transaction(conn, self._committed):
            conn.execute(
                "INSERT OR IGNORE INTO files (file_id, account_id, key_id, purpose, model, lines, prompt_estimate,"
                " reserve_estimate, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.file_id, r.account_id, r.key_id, r.purpose, r.model, r.lines, r.prompt_estimate,
                 r.reserve_estimate, time.time()),
            )

    async def file(self, file_id: str) -> FileRecord | None:
        """Who owns the file (None when unknown here, or deleted)."""
        return await self._call(self._file, file_id)

    def _file(self, file_id: str) -> FileRecord | None:
        row = self._connection().execute(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE file_id = ? AND deleted_at IS NULL", (file_id,)).fetchone()
        return FileRecord(*row) if row else None

    async def forget_file(self, file_id: str) -> None:
        """The file was deleted: it is no longer listed or served; its row stays, so a batch
        job seen again does not bring its result file back."""
        await self._call(self._forget_file, file_id, durable=True)

    def _forget_file(self, file_id: str) -> None:
        conn = self._connection()
        with _transaction(conn, self._committed):
            conn.execute("UPDATE files SET deleted_at = ? WHERE file_id = ? AND deleted_at IS NULL",
                         (time.time(), file_id))

    async def account_files(self, account_id: str, *, after: str | None, limit: int, newest_first: bool,
                            purpose: str | None = None) -> list[FileRecord]:
        """One page of the account's files in upload order (newest first by default),
        starting after the file ``after``; an ``after`` the account does not own gives []."""
        return await self._call(self._account_files, account_id, after, limit, newest_first, purpose)

    def _account_files(self, account_id: str, after: str | None, limit: int, newest_first: bool,
                       purpose: str | None) -> list[FileRecord]:
        where, params = ["account_id = ?", "deleted_at IS NULL"], [account_id]
        if purpose is not None:
            purposes = RESULT_FILE_PURPOSES.get(purpose, (purpose,))
            where.append(f"purpose IN ({', '.join('?' * len(purposes))})")
            params.extend(purposes)
        rows = self._page("files", "file_id", _FILE_COLUMNS, where, params, account_id, after, limit, newest_first)
        return [FileRecord(*row) for row in rows]

    async def account_batches(self, account_id: str, *, after: str | None, limit: int) -> list[BatchRecord]:
        """One page of the account's batch jobs, newest first, starting after the job ``after``."""
        return await self._call(self._account_batches, account_id, after, limit)

    def _account_batches(self, account_id: str, after: str | None, limit: int) -> list[BatchRecord]:
        rows = self._page("batches", "batch_id", _BATCH_COLUMNS, ["account_id = ?"], [account_id], account_id,
                          after, limit, True)
        return [BatchRecord(*row) for row in rows]

    def _page(self, table: str, id_column: str, columns: str, where: list[str], params: list, account_id: str,
              after: str | None, limit: int, newest_first: bool) -> list[tuple]:
        conn = self._connection()
        if after is not None:
            cursor = conn.execute(f"SELECT created_at FROM {table} WHERE {id_column} = ? AND account_id = ?",
                                  (after, account_id)).fetchone()
            if cursor is None:
                return []
            where = [*where, f"(created_at, {id_column}) {'<' if newest_first else '>'} (?, ?)"]
            params = [*params, cursor[0], after]
        order = "DESC" if newest_first else "ASC"
        return conn.execute(
            f"SELECT {columns} FROM {table} WHERE {' AND '.join(where)}"
            f" ORDER BY created_at {order}, {id_column} {order} LIMIT ?", (*params, limit)).fetchall()

    async def record_batch(self, record: BatchRecord) -> None:
        await self._call(self._record_batch, record, durable=True)

    def _record_batch(self, r: BatchRecord) -> None:
        conn = self._connection()
        with _transaction(conn, self._committed):
            conn.execute(
                "INSERT OR IGNORE INTO batches (batch_id, account_id, key_id, model, input_file_id, lines,"
                " prompt_estimate, reservation_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.batch_id, r.account_id, r.key_id, r.model, r.input_file_id, r.lines, r.prompt_estimate,
                 r.reservation_id, time.time()),
            )

    async def batch(self, batch_id: str) -> BatchRecord | None:
        return await self._call(self._batch, batch_id)

    def _batch(self, batch_id: str) -> BatchRecord | None:
        row = self._connection().execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE batch_id = ?",
                                         (batch_id,)).fetchone()
        return BatchRecord(*row) if row else None

    async def pending_batches(self, limit: int) -> list[BatchRecord]:
        """Batch jobs whose usage event has not been spooled yet, oldest first."""
        return await self._call(self._pending_batches, limit)

    def _pending_batches(self, limit: int) -> list[BatchRecord]:
        rows = self._connection().execute(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE emitted_event_id IS NULL ORDER BY created_at LIMIT ?",
            (limit,)).fetchall()
        return [BatchRecord(*row) for row in rows]

    async def append_batch_event(self, batch_id: str, event_id: str, key: bytes, value: bytes) -> bool:
        """Spool a batch job's usage event unless one was spooled before: the mark and the
        event row commit in one transaction, so the job is billed exactly once across
        concurrent polls and restarts. True when this call spooled it."""
        added = await self._call(self._append_batch_event, batch_id, event_id, key, value, durable=True)
        if added:
            self.events += 1
            self.bytes += len(key) + len(value)
            self._changed()
        return added

    def _append_batch_event(self, batch_id: str, event_id: str, key: bytes, value: bytes) -> bool:
        conn = self._connection()
        with _transaction(conn, self._committed):
            marked = conn.execute(
                "UPDATE batches SET emitted_event_id = ?, emitted_at = ? WHERE batch_id = ? AND emitted_event_id IS NULL",
                (event_id, time.time(), batch_id),
            ).rowcount
            if marked:
                conn.execute("INSERT INTO events (key, value) VALUES (?, ?)", (key, value))
        return bool(marked)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SpoolError("the spool is closed")
        return self._conn


def _resolve(row: asyncio.Future, seq: int, fsync: asyncio.Future) -> None:
    if row.done():
        return
    if fsync.cancelled():
        row.cancel()
    elif fsync.exception() is not None:
        row.set_exception(fsync.exception())
    else:
        row.set_result(seq)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class _transaction:
    """BEGIN IMMEDIATE … COMMIT (then ``on_commit``), or ROLLBACK on error (the connection
    is in autocommit mode)."""

    def __init__(self, conn: sqlite3.Connection, on_commit: Callable[[], None] | None = None) -> None:
        self.conn = conn
        self.on_commit = on_commit

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback()
                raise SpoolError(f"spool commit failed: {error}") from error
            if self.on_commit is not None:
                self.on_commit()
            return
        self._rollback()

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
