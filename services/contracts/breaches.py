"""Messages metering publishes for others: cap breaches and dead letters (CloudEvents JSON)."""

from __future__ import annotations

import base64
from datetime import datetime

import msgspec

from services.contracts.events import BREACH_EVENT_TYPE, DEAD_LETTER_EVENT_TYPE, SPECVERSION, format_time
from services.contracts.money import format_cny

_encoder = msgspec.json.Encoder()


def format_breach_amount(value: int, unit: str) -> str:
    """Breaches of caps and balance are money (decimal CNY); package breaches are tokens."""
    return format_cny(value) if unit == "cny" else str(value)


def breach_view(
    *,
    breach_id: str,
    type: str,
    account_id: str,
    key_id: str | None,
    package_id: str | None,
    period: str | None,
    unit: str,
    cap: int,
    spend: int,
    overshoot: int,
    event_id: str | None,
    occurred_at: datetime,
) -> dict:
    """A breach as clients see it (DESIGN §6.5)."""
    return {
        "breach_id": breach_id,
        "account_id": account_id,
        "key_id": key_id,
        "package_id": package_id,
        "type": type,
        "period": period,
        "unit": unit,
        "cap": format_breach_amount(cap, unit),
        "spend": format_breach_amount(spend, unit),
        "overshoot": format_breach_amount(overshoot, unit),
        "event_id": event_id,
        "occurred_at": format_time(occurred_at),
    }


def breach_message(view: dict, source: str) -> bytes:
    return _encoder.encode(
        {
            "specversion": SPECVERSION,
            "id": view["breach_id"],
            "source": source,
            "type": BREACH_EVENT_TYPE,
            "subject": view["key_id"] or view["package_id"] or view["account_id"],
            "time": view["occurred_at"],
            "datacontenttype": "application/json",
            "data": view,
        }
    )


def dead_letter_message(
    *,
    dead_letter_id: str,
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
    event_id: str | None,
    payload: bytes,
    received_at: datetime,
    source: str,
) -> bytes:
    try:
        text, encoding = payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(payload).decode("ascii"), "base64"
    return _encoder.encode(
        {
            "specversion": SPECVERSION,
            "id": dead_letter_id,
            "source": source,
            "type": DEAD_LETTER_EVENT_TYPE,
            "time": format_time(received_at),
            "datacontenttype": "application/json",
            "data": {
                "dead_letter_id": dead_letter_id,
                "reason": reason,
                "detail": detail,
                "topic": topic,
                "partition": partition,
                "offset": offset,
                "event_id": event_id,
                "payload": text,
                "payload_encoding": encoding,
            },
        }
    )
