"""The quota decision: may this key make one more call to this model, right now?

Pure: it takes a snapshot of the key's limits and usage (from the projections), what is
already held by reservations in flight, and answers with the first limit that refuses,
in the order DESIGN §6.1 fixes: revoked, model not allowed, package expired, package
exhausted, balance spent, monthly cap, daily cap.

A call is allowed while some room is left; it then holds its estimate as a reservation.
Calls racing the last of a limit therefore overshoot it by at most about one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from services.contracts import errors
from services.contracts.errors import ErrorKind
from services.contracts.money import PPM, ceil_div, format_cny
from services.metering.domain.periods import (
    day_resets_at,
    local_day,
    month_of,
    month_resets_at,
)
from services.metering.domain.pricing import PriceRow, Tier
from services.metering.domain.rating import PACKAGE


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """What the projections say about one key and its account, as of ``day``."""

    key_id: str
    account_id: str
    billing_mode: str
    status: str
    tier: str
    timezone: str
    balance: int
    daily_cap: int
    monthly_cap: int
    day: date
    daily_spend: int
    monthly_spend: int
    package_id: str | None = None
    package_total: int = 0
    package_left: int = 0
    valid_from: datetime | None = None
    valid_until: datetime | None = None


@dataclass(slots=True)
class Holds:
    """Estimates held by reservations in flight: package tokens (of the key's package) and
    money (of this key, counted against its caps)."""

    tokens: int = 0
    money: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    kind: ErrorKind | None
    msg: str
    remaining: dict
    hold_tokens: int = 0
    hold_money: int = 0

    @property
    def reason(self) -> str:
        return "ok" if self.kind is None else self.kind.error_code

    @property
    def code(self) -> int:
        return 0 if self.kind is None else int(self.kind.code)


def estimate_hold(price: PriceRow, billing_mode: str, estimated_tokens: int) -> tuple[int, int]:
    """(package tokens, nano-CNY) to hold for a call of about ``estimated_tokens`` tokens.

    Money is held at the dearer of the input and output price, so the hold covers the
    call whatever its split between prompt and completion.
    """
    if estimated_tokens <= 0:
        return 0, 0
    if billing_mode == PACKAGE:
        return ceil_div(estimated_tokens * price.package_weight_ppm, PPM), 0
    return 0, estimated_tokens * max(price.input_price, price.output_price) + price.per_request_fee


def decide(
    snap: KeySnapshot,
    price: PriceRow | None,
    model: str,
    holds: Holds,
    now: datetime,
    estimated_tokens: int = 0,
    *,
    account_money: int = 0,
) -> Decision:
    """``account_money`` is what all of the account's keys hold against its balance."""
    if snap.status != "active":
        return _refuse(errors.KEY_REVOKED, "This API key was revoked. Create a new key and use it instead.")
    if price is None:
        return _refuse(errors.MODEL_NOT_FOUND, f"The model {model!r} does not exist. Model ids are case-sensitive.")
    if Tier[snap.tier] < Tier[price.min_tier]:
        return _refuse(
            errors.MODEL_NOT_ALLOWED,
            f"The model {model!r} needs the {price.min_tier} tier or above; this account is {snap.tier}.",
        )
    hold_tokens, hold_money = estimate_hold(price, snap.billing_mode, estimated_tokens)
    if snap.billing_mode == PACKAGE:
        return _decide_package(snap, holds, now, hold_tokens)
    return _decide_payg(snap, holds, account_money, now, hold_money)


def _decide_package(snap: KeySnapshot, holds: Holds, now: datetime, hold_tokens: int) -> Decision:
    if snap.package_id is None or snap.valid_from is None or snap.valid_until is None:
        return _refuse(errors.PACKAGE_EXHAUSTED, "This key is not bound to a token package. Bind one to the key.")
    if not snap.valid_from <= now < snap.valid_until:
        return _refuse(
            errors.PACKAGE_EXPIRED,
            f"The token package {snap.package_id} is valid from {snap.valid_from.isoformat()} until "
            f"{snap.valid_until.isoformat()}. Buy a new package and bind it to the key.",
        )
    left = snap.package_left - holds.tokens
    if left <= 0:
        return _refuse(
            errors.PACKAGE_EXHAUSTED,
            f"The token package {snap.package_id} is used up ({snap.package_total} tokens"
            f"{', some held by calls in flight' if holds.tokens else ''}). Buy a new package.",
            {"tokens": max(left, 0)},
        )
    return Decision(True, None, "allowed", {"tokens": left}, hold_tokens=hold_tokens)


def _decide_payg(snap: KeySnapshot, holds: Holds, account_money: int, now: datetime, hold_money: int) -> Decision:
    today = local_day(now, snap.timezone)
    daily_spend = snap.daily_spend if today == snap.day else 0
    monthly_spend = snap.monthly_spend if month_of(today) == month_of(snap.day) else 0
    balance_left = snap.balance - account_money
    daily_left = snap.daily_cap - daily_spend - holds.money if snap.daily_cap else None
    monthly_left = snap.monthly_cap - monthly_spend - holds.money if snap.monthly_cap else None
    remaining = {
        "balance": format_cny(max(balance_left, 0)),
        "daily": None if daily_left is None else format_cny(max(daily_left, 0)),
        "monthly": None if monthly_left is None else format_cny(max(monthly_left, 0)),
    }
    if balance_left <= 0:
        return _refuse(
            errors.INSUFFICIENT_BALANCE,
            f"The account balance is {format_cny(snap.balance)} CNY"
            f"{' with calls in flight' if account_money else ''}. Top up the account to continue.",
            remaining,
        )
    if monthly_left is not None and monthly_left <= 0:
        return _refuse(
            errors.MONTHLY_CAP_REACHED,
            f"The monthly spend cap of {format_cny(snap.monthly_cap)} CNY is reached (spent "
            f"{format_cny(monthly_spend)} CNY). It resets at {month_resets_at(now, snap.timezone).isoformat()}.",
            remaining,
        )
    if daily_left is not None and daily_left <= 0:
        return _refuse(
            errors.DAILY_CAP_REACHED,
            f"The daily spend cap of {format_cny(snap.daily_cap)} CNY is reached (spent "
            f"{format_cny(daily_spend)} CNY). It resets at {day_resets_at(now, snap.timezone).isoformat()}.",
            remaining,
        )
    return Decision(True, None, "allowed", remaining, hold_money=hold_money)


def _refuse(kind: ErrorKind, msg: str, remaining: dict | None = None) -> Decision:
    return Decision(False, kind, msg, remaining or {})
