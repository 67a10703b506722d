"""Projections rebuilt from the ledger alone.

Balances, package remaining, per-key spend and usage rollups are kept current by the
consumer in the batch's transaction; this module recomputes them from ``ledger_entries``
(and the append-only ``breaches``, which record which limits were already reported) and
replaces the live rows. A test checks the rebuild is identical to the live projections.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg

PROJECTION_TABLES = ("account_balances", "package_balances", "key_spend", "usage_daily")

# For each projection: the SELECT that derives it from the ledger, in the table's column order.
REBUILD_QUERIES: dict[str, str] = {
    "account_balances": """
        WITH running AS (
            SELECT account_id, entry_id, entry_type, charge, balance_delta,
                   sum(balance_delta) OVER (PARTITION BY account_id ORDER BY entry_id) AS balance_after
            FROM ledger_entries
        ), per_account AS (
            SELECT account_id,
                   sum(balance_delta) AS balance,
                   max(entry_id) FILTER (WHERE entry_type = 'usage' AND charge > 0 AND balance_after <= 0)
                       AS last_depletion,
                   max(entry_id) FILTER (WHERE entry_type = 'topup' AND balance_after > 0) AS last_refill,
                   sum(balance_delta) FILTER (WHERE entry_type = 'topup') AS topups,
                   sum(charge) FILTER (WHERE entry_type = 'usage') AS charges
            FROM running GROUP BY account_id
        )
        SELECT a.account_id,
               coalesce(p.balance, 0),
               coalesce(p.last_depletion > coalesce(p.last_refill, 0), false),
               coalesce(p.topups, 0),
               coalesce(p.charges, 0)
        FROM accounts a LEFT JOIN per_account p USING (account_id)
    """,
    "package_balances": """
        SELECT p.package_id, p.account_id,
               coalesce(sum(l.package_tokens) FILTER (WHERE l.entry_type = 'usage'), 0),
               coalesce(sum(l.package_tokens) FILTER (WHERE l.entry_type = 'package_expiry'), 0),
               coalesce(bool_or(l.entry_type = 'package_expiry'), false),
               EXISTS (SELECT 1 FROM breaches b WHERE b.package_id = p.package_id AND b.type = 'package_exhausted'),
               EXISTS (SELECT 1 FROM breaches b WHERE b.package_id = p.package_id AND b.type = 'package_expired')
        FROM packages p LEFT JOIN ledger_entries l ON l.package_id = p.package_id
        GROUP BY p.package_id, p.account_id
    """,
    "key_spend": """
        WITH periods AS (
            SELECT l.key_id, 'day' AS period_type, l.local_day AS period_start, l.account_id,
                   sum(l.charge) AS spend, to_char(l.local_day, 'YYYY-MM-DD') AS period, 'daily_cap' AS breach_type
            FROM ledger_entries l JOIN api_keys k ON k.key_id = l.key_id AND k.billing_mode = 'payg'
            WHERE l.entry_type = 'usage' GROUP BY l.key_id, l.local_day, l.account_id
            UNION ALL
            SELECT l.key_id, 'month', date_trunc('month', l.local_day)::date, l.account_id,
                   sum(l.charge), to_char(l.local_day, 'YYYY-MM'), 'monthly_cap'
            FROM ledger_entries l JOIN api_keys k ON k.key_id = l.key_id AND k.billing_mode = 'payg'
            WHERE l.entry_type = 'usage'
            GROUP BY l.key_id, date_trunc('month', l.local_day), to_char(l.local_day, 'YYYY-MM'), l.account_id
        )
        SELECT key_id, period_type, period_start, account_id, spend,
               EXISTS (SELECT 1 FROM breaches b WHERE b.key_id = periods.key_id
                       AND b.type = periods.breach_type AND b.period = periods.period)
        FROM periods
    """,
    "usage_daily": """
        SELECT key_id, model, local_day, account_id, count(*), sum(inputs), sum(prompt_tokens),
               sum(completion_tokens), sum(cached_tokens), sum(reasoning_tokens), sum(total_tokens),
               sum(package_tokens), sum(overage_tokens), sum(charge)
        FROM ledger_entries WHERE entry_type = 'usage'
        GROUP BY key_id, model, local_day, account_id
    """,
}

COLUMNS: dict[str, str] = {
    "account_balances": "account_id, balance, balance_depleted, topups_total, charges_total",
    "package_balances": "package_id, account_id, tokens_used, tokens_expired, expiry_booked,"
    " exhausted_recorded, expired_recorded",
    "key_spend": "key_id, period_type, period_start, account_id, spend, breached",
    "usage_daily": "key_id, model, day, account_id, requests, inputs, prompt_tokens, completion_tokens,"
    " cached_tokens, reasoning_tokens, total_tokens, package_tokens, overage_tokens, charge",
}


def rebuild_projections(database_url: str, progress: Callable[[str], None] | None = None) -> dict[str, int]:
    """Replace every projection with what the ledger says, in one transaction; rows per table."""
    counts = {}
    with psycopg.connect(database_url) as conn:
        conn.execute("LOCK TABLE " + ", ".join(PROJECTION_TABLES) + " IN EXCLUSIVE MODE")
        for table in PROJECTION_TABLES:
            conn.execute(f"DELETE FROM {table}")
            cur = conn.execute(f"INSERT INTO {table} ({COLUMNS[table]}) {REBUILD_QUERIES[table]}")
            counts[table] = cur.rowcount
            if progress:
                progress(table)
    return counts


def snapshot_projections(database_url: str) -> dict[str, list[tuple]]:
    """Every projection row, in a stable order (for comparing live and rebuilt state)."""
    with psycopg.connect(database_url) as conn:
        return {
            table: conn.execute(f"SELECT {COLUMNS[table]} FROM {table} ORDER BY 1, 2, 3").fetchall()
            for table in PROJECTION_TABLES
        }
