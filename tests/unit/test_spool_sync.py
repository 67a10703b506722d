"""The spool's durability: writes made together share one fsync (group commit); writes
made while an fsync runs wait for the next; a failed fsync fails its writers, and the next
write syncs again; a closed spool refuses writes. The fsync runs in the fsync worker (a
child process) or, without one, on the loop; a worker that dies or is stopped hands the
fsyncs back to the loop, the one it had open included. A real SQLite file, real fsyncs and
a real worker process; ``os.fsync`` in this process is only wrapped to count the calls
(and, where said, to fail them), and the worker's requests are counted the same way."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sqlite3

import pytest
from structlog.testing import capture_logs

from services.gateway import spool as spool_module
from services.gateway.fsync_worker import FsyncWorker
from services.gateway.spool import Spool, SpoolError

REAL_FSYNC = os.fsync


class WatchedFsync:
    """Calls the real ``os.fsync``, counting the calls, or fails them while ``fail``."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.fail:
            raise OSError(errno.EIO, "Input/output error")
        REAL_FSYNC(fd)


@pytest.fixture
def fsync(monkeypatch) -> WatchedFsync:
    watched = WatchedFsync()
    monkeypatch.setattr(spool_module.os, "fsync", watched)
    return watched


@pytest.fixture
def requests(monkeypatch) -> list[int]:
    """One entry per fsync asked of a worker (the worker's pid)."""
    asked: list[int] = []
    real = FsyncWorker.request

    def counted(worker: FsyncWorker) -> bool:
        sent = real(worker)
        if sent:
            asked.append(worker.pid)
        return sent

    monkeypatch.setattr(FsyncWorker, "request", counted)
    return asked


async def opened(tmp_path, *, worker: bool = False) -> Spool:
    return await Spool(tmp_path / "spool.db", max_events=10_000, max_bytes=10**8, fsync_worker=worker).open()


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def wait_until(predicate, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_writes_made_together_share_one_fsync_on_the_loop(tmp_path, fsync) -> None:
    spool = await opened(tmp_path)
    try:
        before = fsync.calls
        await asyncio.gather(*(spool.append(b"acc", b"event %d" % i) for i in range(50)))
        assert fsync.calls - before == 1
        assert spool.events == 50
    finally:
        await spool.close()


async def test_a_failed_fsync_fails_its_writers_and_the_next_write_syncs_again(tmp_path, fsync) -> None:
    spool = await opened(tmp_path)
    try:
        fsync.fail = True
        results = await asyncio.gather(spool.append(b"acc", b"a"), spool.append(b"acc", b"b"),
                                       return_exceptions=True)
        assert all(isinstance(r, SpoolError) and "fsync failed" in str(r) for r in results), results
        fsync.fail = False
        before = fsync.calls
        await spool.append(b"acc", b"c")
        assert fsync.calls - before == 1
    finally:
        await spool.close()


async def test_a_closed_spool_refuses_durable_writes(tmp_path, fsync) -> None:
    spool = await opened(tmp_path)
    await spool.close()
    with pytest.raises(SpoolError):
        await spool.append(b"acc", b"late")


# The fsync worker


async def test_a_held_fallback_is_written_at_once_and_its_row_given_once_synced(tmp_path, fsync, requests) -> None:
    """``hold`` writes before it returns and starts the fsync without a task of its own;
    the row comes once the worker's fsync is done, and a failed write fails the future."""
    spool = await opened(tmp_path, worker=True)
    try:
        os.kill(spool.fsync_worker_pid, signal.SIGSTOP)
        try:
            row = spool.hold(b"acc", b"fallback")
            assert (spool.events, spool.held) == (1, 1)  # written before any turn of the loop
            with sqlite3.connect(spool.path) as reader:
                assert reader.execute("SELECT value, held FROM events").fetchall() == [(b"fallback", 1)]
            await wait_until(lambda: len(requests) == 1)
            await asyncio.sleep(0.05)
            assert not row.done()  # not on disk until the worker's fsync answers
        finally:
            os.kill(spool.fsync_worker_pid, signal.SIGCONT)
        seq = await asyncio.wait_for(row, 5)
        await spool.settle(seq, b"acc", b"the call's event")
        assert (spool.events, spool.held) == (1, 0)
    finally:
        await spool.close()
    failed = spool.hold(b"acc", b"after close")
    with pytest.raises(SpoolError):
        await failed


async def test_writes_made_together_share_one_fsync_of_the_worker_and_none_on_the_loop(
        tmp_path, fsync, requests) -> None:
    spool = await opened(tmp_path, worker=True)
    try:
        assert spool.fsync_worker_pid is not None
        before = fsync.calls
        await asyncio.gather(*(spool.append(b"acc", b"event %d" % i) for i in range(50)))
        assert requests == [spool.fsync_worker_pid]
        assert fsync.calls == before  # every fsync since the spool opened ran in the worker
        assert spool.events == 50
    finally:
        await spool.close()


async def test_the_fsync_runs_on_the_loop_while_it_is_quiet_and_in_the_worker_otherwise(
        tmp_path, fsync, requests) -> None:
    quiet = True
    spool = await Spool(tmp_path / "spool.db", max_events=10_000, max_bytes=10**8, quiet=lambda: quiet).open()
    try:
        before = fsync.calls
        await asyncio.gather(*(spool.append(b"acc", b"quiet %d" % i) for i in range(5)))
        assert (fsync.calls - before, requests) == (1, [])  # one fsync, on the loop
        quiet = False
        await asyncio.gather(*(spool.append(b"acc", b"busy %d" % i) for i in range(5)))
        assert fsync.calls - before == 1 and requests == [spool.fsync_worker_pid]
        quiet = True
        assert await spool.hold(b"acc", b"fallback") > 0
        assert fsync.calls - before == 2 and len(requests) == 1
        assert await spool.hold(b"acc", b"a stream's fallback", off_loop=True) > 0  # its caller needs the loop
        assert fsync.calls - before == 2 and len(requests) == 2
        assert await spool.hold(b"acc", b"fallback") > 0
        assert fsync.calls - before == 3 and len(requests) == 2
    finally:
        await spool.close()


async def test_writes_made_while_the_worker_fsyncs_wait_for_the_next_fsync(tmp_path, fsync, requests) -> None:
    spool = await opened(tmp_path, worker=True)
    before = fsync.calls
    try:
        os.kill(spool.fsync_worker_pid, signal.SIGSTOP)  # the fsync asked for stays open
        try:
            first = asyncio.ensure_future(spool.append(b"acc", b"first"))
            await wait_until(lambda: len(requests) == 1)
            second = asyncio.ensure_future(spool.append(b"acc", b"second"))
            await asyncio.sleep(0.1)
            assert not first.done() and not second.done()
            assert len(requests) == 1  # one fsync at a time; the second write waits for the next
        finally:
            os.kill(spool.fsync_worker_pid, signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert len(requests) == 2
        assert fsync.calls == before
    finally:
        await spool.close()


async def test_a_failed_fsync_in_the_worker_fails_its_writers_and_the_next_write_syncs_again(
        tmp_path, requests, monkeypatch) -> None:
    """The worker's fsync fails for real: it is given a pipe, which cannot be fsynced (its
    first fsync at start is skipped here, which would refuse to start it)."""
    spool = await opened(tmp_path, worker=True)
    read_end, write_end = os.pipe()
    monkeypatch.setattr(FsyncWorker, "_first_fsync", lambda self: None)
    failing = FsyncWorker(write_end, spool._worker_synced, spool._worker_gone).start(asyncio.get_running_loop())
    working, spool._worker = spool._worker, failing
    try:
        results = await asyncio.gather(spool.append(b"acc", b"a"), spool.append(b"acc", b"b"),
                                       return_exceptions=True)
        assert all(isinstance(r, SpoolError) and "fsync failed" in str(r) and "Invalid argument" in str(r)
                   for r in results), results
        spool._worker = working
        await spool.append(b"acc", b"c")
        assert requests == [failing.pid, working.pid]
    finally:
        failing.stop()
        os.close(read_end)
        os.close(write_end)
        await spool.close()


async def test_a_worker_killed_with_an_fsync_open_hands_it_and_the_next_ones_to_the_loop(
        tmp_path, fsync, requests) -> None:
    spool = await opened(tmp_path, worker=True)
    pid = spool.fsync_worker_pid
    before = fsync.calls
    try:
        os.kill(pid, signal.SIGSTOP)
        held = asyncio.ensure_future(spool.append(b"acc", b"held"))
        await wait_until(lambda: len(requests) == 1)
        assert not held.done()
        os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(held, 5)
        assert fsync.calls - before == 1  # the open fsync, run again on the loop
        assert spool.fsync_worker_pid is None
        await spool.append(b"acc", b"after")
        assert fsync.calls - before == 2 and len(requests) == 1
        assert spool.events == 2
    finally:
        await spool.close()
    assert not process_exists(pid)


async def test_the_worker_ignores_sigterm_and_stops_when_the_spool_closes(tmp_path, fsync, requests) -> None:
    spool = await opened(tmp_path, worker=True)
    pid = spool.fsync_worker_pid
    assert pid is not None and process_exists(pid)
    before = fsync.calls
    os.kill(pid, signal.SIGTERM)  # the gateway's process group is told to stop; the gateway still drains
    await asyncio.sleep(0.1)
    await spool.append(b"acc", b"after sigterm")
    assert requests == [pid] and fsync.calls == before
    await spool.close()
    assert not process_exists(pid)


async def test_a_spool_whose_worker_cannot_start_fsyncs_on_the_loop(tmp_path, fsync, monkeypatch) -> None:
    def cannot_start(*args, **kwargs):
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(spool_module.FsyncWorker, "start", cannot_start)
    spool = await opened(tmp_path, worker=True)
    try:
        assert spool.fsync_worker_pid is None
        before = fsync.calls
        await spool.append(b"acc", b"event")
        assert fsync.calls - before == 1
    finally:
        await spool.close()


async def test_a_worker_that_cannot_fsync_the_file_is_not_started(tmp_path) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(OSError, match="Invalid argument"):
            FsyncWorker(write_end, lambda error: None, lambda: None).start(asyncio.get_running_loop())
    finally:
        os.close(read_end)
        os.close(write_end)


# Checkpoints


async def test_the_log_is_checkpointed_by_the_spools_thread_and_starts_over(tmp_path) -> None:
    """No commit on the loop checkpoints (SQLite's automatic checkpoints are off); the
    checkpointer thread copies the log into the database file, so the log starts over
    instead of growing with every write."""
    spool = await opened(tmp_path)
    wal = tmp_path / "spool.db-wal"
    try:
        with sqlite3.connect(spool.path) as probe:
            assert probe.execute("PRAGMA wal_autocheckpoint").fetchone() == (1000,)  # a new connection's default
        assert spool._connection().execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        sizes = []
        for burst in range(6):
            await asyncio.gather(*(spool.append(b"acc", b"%d-%d " % (burst, i) + b"x" * 2000) for i in range(100)))
            await asyncio.sleep(spool_module.CHECKPOINT_SECONDS * 3)
            sizes.append(wal.stat().st_size)
        # 600 commits of a 2 kB row each (a page or two of log apiece): over 4 MB of log
        # without checkpoints; with them, each burst's log reuses the space of the one before
        assert max(sizes) < 2 * 1024 * 1024, sizes
        with sqlite3.connect(spool.path) as reader:
            assert reader.execute("SELECT count(*) FROM events").fetchone() == (600,)
    finally:
        await spool.close()


async def test_a_failing_checkpoint_is_logged_once_until_one_succeeds(tmp_path) -> None:
    class Refusing:
        def execute(self, statement: str):
            raise sqlite3.OperationalError("disk I/O error")

    spool = await opened(tmp_path)
    checkpointer = spool._checkpointer
    assert checkpointer is not None
    working, checkpointer._conn = checkpointer._conn, Refusing()
    try:
        with capture_logs() as logs:
            for i in range(4):
                await spool.append(b"acc", b"event %d" % i)
                await asyncio.sleep(spool_module.CHECKPOINT_SECONDS * 2)
            checkpointer._conn = working
            await spool.append(b"acc", b"after")
            await asyncio.sleep(spool_module.CHECKPOINT_SECONDS * 3)
        events = [entry["event"] for entry in logs if entry["event"].startswith("spool_checkpoint")]
        assert events == ["spool_checkpoint_failed", "spool_checkpoint_recovered"]
    finally:
        checkpointer._conn = working
        await spool.close()
