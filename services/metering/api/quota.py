"""Billing API (DESIGN §6.4): ``GET /v1/keys/{key_id}/quota``, billing token (read-only) or admin.

What a key has left: package tokens and validity, daily and monthly spend against the
caps with the instant each period resets (the account's IANA zone), and the balance.
Figures are what the ledger has booked; calls in flight (authorize reservations) are not
subtracted here. The SQL lives in ``services.metering.store.quota_view``.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from services.contracts.errors import NOT_FOUND, TollhouseError
from services.contracts.money import format_cny
from services.metering.api.auth import ADMIN, BILLING, require_billing_read, role_checked_route
from services.metering.api.query import only_params, path_id
from services.metering.api.schemas import ErrorBody
from services.metering.api.stores import app_now, app_store
from services.metering.domain.periods import day_resets_at, month_resets_at, zone
from services.metering.store.quota_view import KeyQuotaRecord, QuotaViewStore

router = APIRouter(
    tags=["billing"],
    dependencies=[Depends(require_billing_read)],
    route_class=role_checked_route(BILLING, ADMIN),
    responses={s: {"model": ErrorBody} for s in (400, 401, 403, 404)},
)


class PackageQuota(BaseModel):
    package_id: str
    tokens_total: int
    tokens_used: int
    tokens_expired: int = Field(description="Tokens left when the package expired (booked as breakage)")
    tokens_remaining: int
    valid_from: datetime
    valid_until: datetime
    status: Literal["pending", "active", "exhausted", "expired"]


class PeriodQuota(BaseModel):
    cap: str = Field(description='Decimal CNY; "0" (0.000000000) means unlimited')
    spent: str = Field(description="PAYG charges of this key booked in the current local period, decimal CNY")
    remaining: str | None = Field(description="cap − spent, never below 0; null when the cap is unlimited")
    resets_at: datetime = Field(description="The next local midnight (of the day or month), in the account's zone")


class QuotaOut(BaseModel):
    key_id: str
    account_id: str
    billing_mode: Literal["package", "payg"]
    status: Literal["active", "revoked"]
    balance: str = Field(description="The account balance, decimal CNY (may be negative after overage)")
    package: PackageQuota | None = Field(description="The key's package; null for PAYG keys")
    daily: PeriodQuota
    monthly: PeriodQuota
    timezone: str = Field(description="The account's IANA zone: days and months roll over at its midnight")
    day: date = Field(description="The account-local day the spend figures are for")
    as_of: datetime


def _period(cap: int, spent: int, resets_at: datetime) -> PeriodQuota:
    return PeriodQuota(
        cap=format_cny(cap),
        spent=format_cny(spent),
        remaining=None if cap == 0 else format_cny(max(cap - spent, 0)),
        resets_at=resets_at,
    )


def quota_out(quota: KeyQuotaRecord, now: datetime) -> QuotaOut:
    tz = zone(quota.timezone)
    package = quota.package
    return QuotaOut(
        key_id=quota.key_id,
        account_id=quota.account_id,
        billing_mode=quota.billing_mode,  # type: ignore[arg-type]
        status=quota.status,  # type: ignore[arg-type]
        balance=format_cny(quota.balance),
        package=None if package is None else PackageQuota(
            package_id=package.package_id,
            tokens_total=package.tokens_total,
            tokens_used=package.tokens_used,
            tokens_expired=package.tokens_expired,
            tokens_remaining=package.tokens_remaining,
            valid_from=package.valid_from,
            valid_until=package.valid_until,
            status=package.status(now),  # type: ignore[arg-type]
        ),
        daily=_period(quota.daily_cap, quota.daily_spend, day_resets_at(now, quota.timezone).astimezone(tz)),
        monthly=_period(quota.monthly_cap, quota.monthly_spend, month_resets_at(now, quota.timezone).astimezone(tz)),
        timezone=quota.timezone,
        day=quota.day,
        as_of=now,
    )


@router.get("/v1/keys/{key_id}/quota", response_model=QuotaOut, dependencies=[Depends(only_params())])
async def key_quota(key_id: str, request: Request) -> QuotaOut:
    """The key's package tokens, daily and monthly spend against its caps, and the account balance."""
    now = app_now(request)
    quota = await app_store(request, QuotaViewStore).key_quota(path_id(key_id, "key"), now)
    if quota is None:
        raise TollhouseError(NOT_FOUND, f"key {key_id} not found")
    return quota_out(quota, now)
