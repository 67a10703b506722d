"""The consumer's database connection encodes and decodes timestamptz itself."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from services.metering.store.ingest import connect

MOMENTS = [
    datetime(2026, 12, 6, 21, 13, 40, 22271, tzinfo=timezone.utc),
    datetime(2026, 3, 29, 3, 30, tzinfo=ZoneInfo("Europe/Berlin")),  # an hour after summer time began
    datetime(2026, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=8))),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),  # before PostgreSQL's epoch
    datetime(1, 1, 1, tzinfo=timezone.utc),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
]


async def test_timestamps_go_in_and_come_out_as_the_same_instants(database_url: str) -> None:
    conn = await connect(database_url)
    try:
        await conn.execute("CREATE TEMP TABLE moments (i int, at timestamptz)")
        await conn.copy_records_to_table("moments", records=list(enumerate(MOMENTS)))
        # The server's own reading of what arrived, as text in UTC.
        as_text = [r[0] for r in await conn.fetch("SELECT at::text FROM moments ORDER BY i")]
        stored = [r[0] for r in await conn.fetch("SELECT at FROM moments ORDER BY i")]
        arrays = await conn.fetchval("SELECT $1::timestamptz[]", MOMENTS)
        infinities = await conn.fetchrow("SELECT 'infinity'::timestamptz, '-infinity'::timestamptz")
    finally:
        await conn.close()
    assert as_text[0] == "2026-12-06 21:13:40.022271+00"
    assert as_text[1] == "2026-03-29 01:30:00+00"
    assert as_text[2] == "2025-12-31 16:00:00+00"
    assert stored == arrays == MOMENTS
    assert all(m.utcoffset() == timedelta(0) for m in stored)
    assert tuple(infinities) == (datetime.max.replace(tzinfo=timezone.utc), datetime.min.replace(tzinfo=timezone.utc))


async def test_a_naive_timestamp_is_refused(database_url: str) -> None:
    conn = await connect(database_url)
    try:
        with pytest.raises(asyncpg.DataError, match="offset-naive"):
            await conn.fetchval("SELECT $1::timestamptz", datetime(2026, 12, 6, 12, 0))
    finally:
        await conn.close()
