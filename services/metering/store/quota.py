"""SQL behind the quota decision: key snapshots from the projections, and change notices.

Every writer of what a quota decision reads (consumer batches, top-ups, packages, key
changes, prices) sends a NOTIFY on ``QUOTA_CHANNEL`` inside its transaction, so it is
delivered exactly when the change commits; authorizers listen and reload what changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import asyncpg
import msgspec

from services.metering.domain.quota import KeySnapshot

QUOTA_CHANNEL = "tollhouse_quota"
_NOTIFY_BYTES = 7_000  # PostgreSQL refuses NOTIFY payloads of 8000 bytes or more

_SNAPSHOT = """
SELECT k.key_id, k.secret_hash, k.account_id, k.billing_mode, k.status, a.tier, a.timezone, b.balance,
       k.daily_cap, k.monthly_cap, ($1::timestamptz AT TIME ZONE a.timezone)::date AS day,
       coalesce(d.spend, 0) AS daily_spend, coalesce(m.spend, 0) AS monthly_spend,
       k.package_id, coalesce(p.tokens_total, 0) AS package_total,
       coalesce(p.tokens_total - pb.tokens_used - pb.tokens_expired, 0) AS package_left,
       p.valid_from, p.valid_until
FROM api_keys k
JOIN accounts a ON a.account_id = k.account_id
JOIN account_balances b ON b.account_id = k.account_id
LEFT JOIN key_spend d ON d.key_id = k.key_id AND d.period_type = 'day'
     AND d.period_start = ($1::timestamptz AT TIME ZONE a.timezone)::date
LEFT JOIN key_spend m ON m.key_id = k.key_id AND m.period_type = 'month'
     AND m.period_start = date_trunc('month', $1::timestamptz AT TIME ZONE a.timezone)::date
LEFT JOIN packages p ON p.package_id = k.package_id
LEFT JOIN package_balances pb ON pb.package_id = k.package_id
"""
_FIELDS = KeySnapshot.__slots__


def _snapshot(row: asyncpg.Record) -> tuple[bytes, KeySnapshot]:
    return bytes(row["secret_hash"]), KeySnapshot(**{f: row[f] for f in _FIELDS})


async def snapshot_by_hash(conn: asyncpg.Connection, secret_hash: bytes, now: datetime) -> KeySnapshot | None:
    row = await conn.fetchrow(_SNAPSHOT + " WHERE k.secret_hash = $2", now, secret_hash)
    return None if row is None else _snapshot(row)[1]


async def snapshots_by_key(conn: asyncpg.Connection, key_ids: list[str], now: datetime) -> dict[bytes, KeySnapshot]:
    rows = await conn.fetch(_SNAPSHOT + " WHERE k.key_id = ANY($2::text[])", now, key_ids)
    return dict(_snapshot(r) for r in rows)


async def price_rows(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT price_id, model, effective_from, input_price, output_price, cached_input_price,"
        " per_request_fee, batch_discount_ppm, package_weight_ppm, min_tier FROM prices"
    )


def quota_notices(
    accounts: Iterable[str] = (), reservations: Iterable[str] = (), *, prices: bool = False, keys: bool = False
) -> list[str]:
    """NOTIFY payloads (each under the size limit) naming what changed."""
    accounts, reservations = sorted(set(accounts)), [r for r in reservations if r]
    payloads: list[str] = []
    batch: dict = {"a": [], "r": []}
    if prices:
        batch["p"] = 1
    if keys:
        batch["k"] = 1
    size = 40
    for field, values in (("a", accounts), ("r", reservations)):
        for value in values:
            if size + len(value) + 3 > _NOTIFY_BYTES:
                payloads.append(msgspec.json.encode(batch).decode())
                batch, size = {"a": [], "r": []}, 40
            batch[field].append(value)
            size += len(value) + 3
    if batch["a"] or batch["r"] or len(batch) > 2 or not payloads:
        payloads.append(msgspec.json.encode(batch).decode())
    return payloads


async def notify_quota(conn: asyncpg.Connection, payloads: list[str]) -> None:
    """Queue the notices in the current transaction (delivered on commit)."""
    for payload in payloads:
        await conn.execute("SELECT pg_notify($1, $2)", QUOTA_CHANNEL, payload)
