"""The gateway's durable local store: the usage-event spool, and who owns which Batch API
file and job. One SQLite file (WAL, ``synchronous=FULL``) under ``DATA_DIR``.

Every usage event is appended here before the call's reply ends; the emitter sends rows
to Kafka in order and deletes them only after the broker acknowledged them. When Kafka
is unreachable rows accumulate; past ``SPOOL_MAX_EVENTS`` / ``SPOOL_MAX_BYTES`` the
gateway refuses new calls (it never serves a call it cannot meter).

SQLite is blocking, so every statement runs on one dedicated thread; appends that arrive
while a commit is in progress are committed together in the next transaction (group
commit), so one fsync serves many calls.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    key   BLOB NOT NULL,
    value BLOB NOT NULL
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


class Spool:
    def __init__(self, path: Path, *, max_events: int, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.events = 0  # rows held; kept here so admission checks never touch the disk
        self.bytes = 0
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[bytes, bytes, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self.on_change: list[Callable[[], None]] = []

    # Life cycle

    async def open(self) -> "Spool":
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"spool-{self.path.stem}")
        self.events, self.bytes = await self._call(self._open)
        self._changed()
        return self

    def _open(self) -> tuple[int, int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        if "deleted_at" not in {row[1] for row in conn.execute("PRAGMA table_info(files)")}:
            conn.execute("ALTER TABLE files ADD COLUMN deleted_at REAL")
        conn.execute(_FILES_BY_ACCOUNT)
        self._conn = conn
        count, size = conn.execute("SELECT count(*), coalesce(sum(length(key) + length(value)), 0) FROM events").fetchone()
        return count, size

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._executor is None:
            return
        await self._call(self._close)
        self._executor.shutdown(wait=True)
        self._executor = None

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise SpoolError("the spool is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # Limits

    @property
    def full(self) -> bool:
        """At or over a limit: new calls are refused until the emitter drains rows."""
        return self.events >= self.max_events or self.bytes >= self.max_bytes

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()

    # Events

    async def append(self, key: bytes, value: bytes) -> None:
        """Store one event durably; return once it is committed (fsynced).

        Never refused for being full: the call it meters already happened. The limit is
        applied to new calls (``full``), so it is exceeded by at most the calls in flight.
        """
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)  # a caller cancelled while waiting leaves no unretrieved error
        self._pending.append((key, value, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="spool-flush")
        # Shielded: a caller that is cancelled while waiting does not un-append its event.
        await asyncio.shield(future)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                added = await self._call(self._insert, [(k, v) for k, v, _ in batch])
            except Exception as exc:
                error = exc if isinstance(exc, SpoolError) else SpoolError(f"spool write failed: {exc!r}")
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.events += len(batch)
            self.bytes += added
            self._changed()
            for _, _, future in batch:
                if not future.done():
                    future.set_result(None)

    def _insert(self, rows: list[tuple[bytes, bytes]]) -> int:
        conn = self._connection()
        with _transaction(conn):
            conn.executemany("INSERT INTO events (key, value) VALUES (?, ?)", rows)
        return sum(len(k) + len(v) for k, v in rows)

    async def read(self, limit: int) -> list[SpooledEvent]:
        """The oldest ``limit`` events, in the order they were appended."""
        rows = await self._call(self._read, limit)
        return [SpooledEvent(*row) for row in rows]

    def _read(self, limit: int) -> list[tuple]:
        return self._connection().execute("SELECT seq, key, value FROM events ORDER BY seq LIMIT ?", (limit,)).fetchall()

    async def delete(self, events: list[SpooledEvent]) -> None:
        """Forget events the broker acknowledged."""
        if not events:
            return
        await self._call(self._delete, [(e.seq,) for e in events])
        self.events -= len(events)
        self.bytes -= sum(len(e.key) + len(e.value) for e in events)
        self._changed()

    def _delete(self, seqs: list[tuple[int]]) -> None:
        # Without an fsync of its own: a delete lost in a power cut only means those rows
        # are sent again (metering books an event id once), and the next append's fsync
        # makes it durable anyway (the WAL is written in order). The appends calls wait
        # on then do not queue behind a second fsync.
        conn = self._connection()
        conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with _transaction(conn):
                conn.executemany("DELETE FROM events WHERE seq = ?", seqs)
        finally:
            conn.execute("PRAGMA synchronous=FULL")

    async def probe(self) -> None:
        """Raise unless the file can be written (for /readyz)."""
        await self._call(self._probe)

    def _probe(self) -> None:
        conn = self._connection()
        with _transaction(conn):
            conn.execute("CREATE TABLE IF NOT EXISTS probe (at REAL)")
            conn.execute("DELETE FROM probe")
            conn.execute("INSERT INTO probe VALUES (?)", (time.time(),))

    # Batch API ownership and the once-only batch event

    async def record_file(self, record: FileRecord) -> None:
        await self._call(self._record_file, record)

    def _record_file(self, r: FileRecord) -> None:
        conn = self._connection()
        with _transaction(conn):
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
        await self._call(self._forget_file, file_id)

    def _forget_file(self, file_id: str) -> None:
        conn = self._connection()
        with _transaction(conn):
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
        await self._call(self._record_batch, record)

    def _record_batch(self, r: BatchRecord) -> None:
        conn = self._connection()
        with _transaction(conn):
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
        added = await self._call(self._append_batch_event, batch_id, event_id, key, value)
        if added:
            self.events += 1
            self.bytes += len(key) + len(value)
            self._changed()
        return added

    def _append_batch_event(self, batch_id: str, event_id: str, key: bytes, value: bytes) -> bool:
        conn = self._connection()
        with _transaction(conn):
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


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class _transaction:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on error (the connection is in autocommit mode)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except sqlite3.Error as error:
                self._rollback()
                raise SpoolError(f"spool commit failed: {error}") from error
        self._rollback()

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
