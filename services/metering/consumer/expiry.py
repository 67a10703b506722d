"""Books the tokens left in expired packages as ``package_expiry`` ledger entries (breakage)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import asyncpg
import structlog

from services.metering import metrics
from services.metering.consumer.batch import book_breaches
from services.metering.domain.periods import local_day
from services.metering.domain.rating import book_package_expiry
from services.metering.store.ingest import IngestBatch, connect, due_package_expiries, ledger_row
from services.settings import Settings

log = structlog.get_logger("tollhouse.expiry")


async def sweep_package_expiries(
    conn: asyncpg.Connection, now: datetime, grace: timedelta, breach_topic: str, source: str = "metering"
) -> int:
    """Book every due package expiry, one account per transaction; return how many."""
    booked = 0
    for account_id, package_id in await due_package_expiries(conn, now, int(grace.total_seconds())):
        async with IngestBatch(conn) as uow:
            accounts = await uow.lock_accounts([account_id])
            package = (await uow.packages([package_id]))[package_id]
            result = book_package_expiry(package, now, grace)
            if result is None:  # booked by another replica meanwhile
                continue
            expired, breach = result
            tz = accounts[account_id].timezone
            await uow.insert_ledger([ledger_row(
                entry_type="package_expiry", account_id=account_id, package_id=package_id,
                event_time=package.valid_until, local_day=local_day(package.valid_until, tz),
                package_tokens=expired,
            )])
            await uow.save_packages([package])
            if breach is not None:
                rows, outbox = book_breaches([breach], breach_topic, source)
                await uow.insert_breaches(rows)
                await uow.insert_outbox(outbox)
            booked += 1
        if breach is not None:  # counted once committed, like the consumer's breaches
            metrics.BREACHES.labels(breach.type).inc()
        log.info("package_expiry_booked", package_id=package_id, account_id=account_id, tokens=expired)
    return booked


async def run_expiry_sweeper(settings: Settings, database_url: str, stop: asyncio.Event) -> None:
    grace = timedelta(seconds=settings.package_expiry_grace_seconds)
    conn = None
    while not stop.is_set():
        try:
            if conn is None or conn.is_closed():
                conn = await connect(database_url)
            await sweep_package_expiries(conn, datetime.now(timezone.utc), grace, settings.breach_topic)
        except Exception as exc:
            log.error("expiry_sweep_failed", error=repr(exc))
            if conn is not None:
                conn.terminate()
                conn = None
        try:
            await asyncio.wait_for(stop.wait(), timeout=settings.package_expiry_sweep_seconds)
        except asyncio.TimeoutError:
            pass
    if conn is not None and not conn.is_closed():
        await conn.close()
