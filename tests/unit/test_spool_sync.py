"""The spool's durability: writes made together share one fsync (group commit); a failed
fsync fails its writers, and the next write syncs again; a closed spool refuses writes.
A real SQLite file and real fsyncs; ``os.fsync`` is only wrapped to count the calls (and,
where said, to fail them)."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from services.gateway import spool as spool_module
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


async def opened(tmp_path) -> Spool:
    return await Spool(tmp_path / "spool.db", max_events=10_000, max_bytes=10**8).open()


async def test_writes_made_together_share_one_fsync(tmp_path, fsync) -> None:
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
