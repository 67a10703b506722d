"""Reference data for consumer tests, written straight into the database.

Mirrors what the control-plane API books (a top-up is a ledger entry plus the balance
projection), so ledger-derived checks and projection rebuilds see consistent data.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import psycopg

EPOCH = datetime(2020, 1, 1, tzinfo=timezone.utc)


def create_account(url: str, account_id: str, tz: str = "Asia/Shanghai", tier: str = "developer") -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO accounts (account_id, name, tier, timezone) VALUES (%s, %s, %s, %s)",
            (account_id, account_id, tier, tz),
        )
        conn.execute("INSERT INTO account_balances (account_id) VALUES (%s)", (account_id,))


def topup(url: str, account_id: str, amount: int, reference: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("SELECT 1 FROM account_balances WHERE account_id = %s FOR UPDATE", (account_id,))
        conn.execute(
            "INSERT INTO ledger_entries (entry_type, account_id, reference, event_time, local_day, balance_delta)"
            " SELECT 'topup', account_id, %s, now(), (now() AT TIME ZONE timezone)::date, %s"
            " FROM accounts WHERE account_id = %s",
            (reference, amount, account_id),
        )
        conn.execute(
            "UPDATE account_balances SET balance = balance + %s, topups_total = topups_total + %s,"
            " balance_depleted = CASE WHEN balance + %s > 0 THEN false ELSE balance_depleted END"
            " WHERE account_id = %s",
            (amount, amount, amount, account_id),
        )


def create_package(url: str, account_id: str, package_id: str, tokens: int, valid_from: datetime,
                   valid_until: datetime) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO packages (package_id, account_id, tokens_total, price, valid_from, valid_until)"
            " VALUES (%s, %s, %s, 0, %s, %s)",
            (package_id, account_id, tokens, valid_from, valid_until),
        )
        conn.execute("INSERT INTO package_balances (package_id, account_id) VALUES (%s, %s)", (package_id, account_id))
        conn.execute(
            "INSERT INTO ledger_entries (entry_type, account_id, package_id, event_time, local_day, package_tokens)"
            " SELECT 'package_grant', account_id, %s, now(), (now() AT TIME ZONE timezone)::date, %s"
            " FROM accounts WHERE account_id = %s",
            (package_id, tokens, account_id),
        )


def create_key(url: str, key_id: str, account_id: str, mode: str, *, package_id: str | None = None,
               daily_cap: int = 0, monthly_cap: int = 0) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO api_keys (key_id, account_id, name, secret_hash, secret_hint, billing_mode, package_id,"
            " daily_cap, monthly_cap) VALUES (%s, %s, %s, %s, 'sk-test', %s, %s, %s, %s)",
            (key_id, account_id, key_id, hashlib.sha256(key_id.encode()).digest(), mode, package_id,
             daily_cap, monthly_cap),
        )


def add_price(url: str, model: str, *, input_price: int, output_price: int, cached_input_price: int | None = None,
              per_request_fee: int = 0, batch_discount_ppm: int = 0, package_weight_ppm: int = 1_000_000,
              effective_from: datetime = EPOCH, min_tier: str = "free") -> None:
    """Prices in nano-CNY per token (= CNY per 1M tokens × 1000)."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO prices (model, effective_from, input_price, output_price, cached_input_price,"
            " per_request_fee, batch_discount_ppm, package_weight_ppm, min_tier)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (model, effective_from, input_price, output_price,
             input_price if cached_input_price is None else cached_input_price,
             per_request_fee, batch_discount_ppm, package_weight_ppm, min_tier),
        )


def scalar(url: str, sql: str, *params: object):
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchone()[0]


def rows(url: str, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def stored_offsets(url: str, group: str, topic: str) -> dict[int, int]:
    """partition → the next offset the consumer group has stored for ``topic``."""
    return dict(rows(
        url, "SELECT topic_partition, next_offset FROM consumer_offsets WHERE group_id = %s AND topic = %s",
        group, topic,
    ))
