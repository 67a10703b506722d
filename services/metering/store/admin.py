"""Repositories of the control plane: accounts, top-ups, packages, API keys and prices.

Each public method is one unit of work: one transaction that commits when the method
returns and rolls back when it raises. Ledger rows are only ever inserted. Money-moving
writes take the account's ``account_balances`` row lock first, the same lock the usage
consumer takes, so projections change in one order whoever writes them.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Select, exists, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.contracts.errors import CONFLICT, INVALID_REQUEST, NOT_FOUND, TollhouseError
from services.contracts.ids import new_id
from services.contracts.money import format_cny
from services.metering.domain.periods import local_day
from services.metering.domain.pricing import PriceRow
from services.metering.domain.rating import PACKAGE, PAYG, AccountState, apply_topup
from services.metering.store.paging import keyset_page, page_of
from services.metering.store.quota import QUOTA_CHANNEL, quota_notices
from services.metering.store.tables import (
    Account,
    AccountBalance,
    ApiKey,
    LedgerEntry,
    Package,
    PackageBalance,
    Price,
)

accounts = Account.__table__
account_balances = AccountBalance.__table__
packages = Package.__table__
package_balances = PackageBalance.__table__
api_keys = ApiKey.__table__
ledger_entries = LedgerEntry.__table__
prices = Price.__table__

TOPUP_REFERENCE_INDEX = "uq_ledger_entries_topup_reference"
PRICE_VERSION_CONSTRAINT = "uq_prices_model_effective_from"

API_KEY_PREFIX = "sk-"
API_KEY_HINT_CHARS = 7  # "sk-" and 4 random characters: tells keys apart, reveals nothing useful

KEY_ACTIVE = "active"
KEY_REVOKED = "revoked"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def new_api_key_secret() -> str:
    """``sk-`` + 43 URL-safe characters (256 random bits)."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key_secret(secret: str) -> bytes:
    """What ``api_keys.secret_hash`` holds: SHA-256 of the whole key, ``sk-`` included."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


# Records handed to the API layer: plain values, money as int nano-CNY.


@dataclass(frozen=True, slots=True)
class PackageRecord:
    package_id: str
    account_id: str
    tokens_total: int
    tokens_used: int
    tokens_expired: int
    price: int
    valid_from: datetime
    valid_until: datetime
    created_at: datetime

    @property
    def tokens_remaining(self) -> int:
        return self.tokens_total - self.tokens_used - self.tokens_expired

    def is_active(self, now: datetime) -> bool:
        """Active blocks buying another: not yet over and tokens left (a future start counts)."""
        return now < self.valid_until and self.tokens_remaining > 0

    def status(self, now: datetime) -> str:
        if now >= self.valid_until:
            return "expired"
        if self.tokens_remaining <= 0:
            return "exhausted"
        if now < self.valid_from:
            return "pending"
        return "active"


@dataclass(frozen=True, slots=True)
class AccountRecord:
    account_id: str
    name: str
    tier: str
    timezone: str
    created_at: datetime
    balance: int
    topups_total: int
    charges_total: int
    balance_depleted: bool
    active_package: PackageRecord | None


@dataclass(frozen=True, slots=True)
class TopupRecord:
    entry_id: int
    account_id: str
    reference: str
    amount: int
    created_at: datetime
    balance: int


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    account_id: str
    name: str
    billing_mode: str
    package_id: str | None
    daily_cap: int
    monthly_cap: int
    status: str
    secret_hint: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """A PATCH: only the fields in ``fields`` change (``package_id=None`` there unbinds)."""

    fields: frozenset[str]
    name: str | None = None
    package_id: str | None = None
    daily_cap: int | None = None
    monthly_cap: int | None = None


PriceKey = tuple[str, datetime, int]  # (model, effective_from, price_id): the listing order


@dataclass(frozen=True, slots=True)
class PricePage:
    rows: list[PriceRow]
    next_after: PriceKey | None


def _constraint_of(exc: IntegrityError) -> str:
    """The violated constraint's name, from the driver's exception or its text."""
    for candidate in (exc.orig, getattr(exc.orig, "__cause__", None)):
        name = getattr(candidate, "constraint_name", None)
        if name:
            return name
    return str(exc.orig)


_PACKAGE_COLUMNS = (
    packages.c.package_id,
    packages.c.account_id,
    packages.c.tokens_total,
    package_balances.c.tokens_used,
    package_balances.c.tokens_expired,
    packages.c.price,
    packages.c.valid_from,
    packages.c.valid_until,
    packages.c.created_at,
)
_SELECT_PACKAGES = select(*_PACKAGE_COLUMNS).select_from(
    packages.join(package_balances, package_balances.c.package_id == packages.c.package_id)
)

_KEY_COLUMNS = (
    api_keys.c.key_id,
    api_keys.c.account_id,
    api_keys.c.name,
    api_keys.c.billing_mode,
    api_keys.c.package_id,
    api_keys.c.daily_cap,
    api_keys.c.monthly_cap,
    api_keys.c.status,
    api_keys.c.secret_hint,
    api_keys.c.created_at,
    api_keys.c.revoked_at,
)

_PRICE_COLUMNS = (
    prices.c.price_id,
    prices.c.model,
    prices.c.effective_from,
    prices.c.input_price,
    prices.c.output_price,
    prices.c.cached_input_price,
    prices.c.per_request_fee,
    prices.c.batch_discount_ppm,
    prices.c.package_weight_ppm,
    prices.c.min_tier,
)


def _select_key(key_id: str) -> Select:
    return select(*_KEY_COLUMNS).where(api_keys.c.key_id == key_id)


def _package(row: Any) -> PackageRecord:
    return PackageRecord(**row._mapping)


def _key(row: Any) -> KeyRecord:
    return KeyRecord(**row._mapping)


def _price(row: Any) -> PriceRow:
    return PriceRow(**row._mapping)


class AdminStore:
    """All SQL of the control plane. ``clock`` is injectable so tests can move time."""

    def __init__(self, engine: AsyncEngine, clock: Callable[[], datetime] = utc_now) -> None:
        self._engine = engine
        self._clock = clock

    def now(self) -> datetime:
        return self._clock()

    # Accounts

    async def create_account(self, *, name: str, tier: str, timezone: str) -> AccountRecord:
        """An account and its balance projection row (balance 0), together."""
        account_id = new_id("acc")
        async with self._engine.begin() as conn:
            created_at = await conn.scalar(
                insert(accounts)
                .values(account_id=account_id, name=name, tier=tier, timezone=timezone)
                .returning(accounts.c.created_at)
            )
            await conn.execute(insert(account_balances).values(account_id=account_id))
        return AccountRecord(account_id, name, tier, timezone, created_at, 0, 0, 0, False, None)

    async def get_account(self, account_id: str) -> AccountRecord:
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    select(
                        accounts,
                        account_balances.c.balance,
                        account_balances.c.topups_total,
                        account_balances.c.charges_total,
                        account_balances.c.balance_depleted,
                    )
                    .select_from(accounts.join(account_balances))
                    .where(accounts.c.account_id == account_id)
                )
            ).first()
            if row is None:
                raise account_not_found(account_id)
            package = await self._active_package(conn, account_id, self._clock())
        return AccountRecord(
            row.account_id, row.name, row.tier, row.timezone, row.created_at, row.balance,
            row.topups_total, row.charges_total, row.balance_depleted, package,
        )

    async def _lock_account(self, conn: AsyncConnection, account_id: str) -> AccountState:
        """Take the account's balance row lock (as the consumer does) and read its state."""
        row = (
            await conn.execute(
                select(
                    account_balances.c.balance,
                    account_balances.c.balance_depleted,
                    accounts.c.timezone,
                )
                .select_from(account_balances.join(accounts))
                .where(account_balances.c.account_id == account_id)
                .with_for_update(of=account_balances)
            )
        ).first()
        if row is None:
            raise account_not_found(account_id)
        return AccountState(account_id, row.timezone, row.balance, row.balance_depleted)

    # Top-ups

    async def top_up(self, account_id: str, *, amount: int, reference: str) -> tuple[TopupRecord, bool]:
        """Credit the balance once per (account, reference); returns (top-up, newly created).

        The same reference with the same amount returns the original top-up; with another
        amount it is a conflict. Concurrent duplicates queue on the account lock and find
        the first one's entry; the unique index catches anything that slips past.
        """
        if amount <= 0:
            raise ValueError("a top-up amount must be positive")
        try:
            return await self._top_up_once(account_id, amount, reference)
        except IntegrityError as exc:
            if _constraint_of(exc) != TOPUP_REFERENCE_INDEX:
                raise
        async with self._engine.begin() as conn:
            existing = await self._existing_topup(conn, account_id, reference)
            if existing is None:  # pragma: no cover - the index only fires for a committed row
                raise TollhouseError(CONFLICT, f"top-up reference {reference!r} is being used; retry")
            return _same_topup(existing, amount), False

    async def _top_up_once(self, account_id: str, amount: int, reference: str) -> tuple[TopupRecord, bool]:
        async with self._engine.begin() as conn:
            account = await self._lock_account(conn, account_id)
            existing = await self._existing_topup(conn, account_id, reference)
            if existing is not None:
                return _same_topup(existing, amount), False
            now = self._clock()
            entry_id = await conn.scalar(
                insert(ledger_entries)
                .values(
                    entry_type="topup",
                    account_id=account_id,
                    reference=reference,
                    balance_delta=amount,
                    event_time=now,
                    local_day=local_day(now, account.timezone),
                )
                .returning(ledger_entries.c.entry_id)
            )
            apply_topup(account, amount)
            await _notify_quota(conn, accounts=[account_id])
            await conn.execute(
                update(account_balances)
                .where(account_balances.c.account_id == account_id)
                .values(
                    balance=account.balance,
                    balance_depleted=account.balance_depleted,
                    topups_total=account_balances.c.topups_total + amount,
                )
            )
            return TopupRecord(entry_id, account_id, reference, amount, now, account.balance), True

    async def _existing_topup(self, conn: AsyncConnection, account_id: str, reference: str) -> TopupRecord | None:
        row = (
            await conn.execute(
                select(
                    ledger_entries.c.entry_id,
                    ledger_entries.c.balance_delta,
                    ledger_entries.c.event_time,
                    account_balances.c.balance,
                )
                .select_from(
                    ledger_entries.join(
                        account_balances, account_balances.c.account_id == ledger_entries.c.account_id
                    )
                )
                .where(
                    ledger_entries.c.account_id == account_id,
                    ledger_entries.c.entry_type == "topup",
                    ledger_entries.c.reference == reference,
                )
            )
        ).first()
        if row is None:
            return None
        return TopupRecord(row.entry_id, account_id, reference, row.balance_delta, row.event_time, row.balance)

    # Packages

    async def create_package(
        self, account_id: str, *, tokens: int, price: int, valid_from: datetime, valid_until: datetime
    ) -> PackageRecord:
        """Sell a package: the package, its balance row and a ``package_grant`` ledger entry.

        Refused while another package of the account is active; the account lock makes
        two concurrent purchases take turns, so at most one passes the check.
        """
        if tokens <= 0 or valid_until <= valid_from:
            raise ValueError("a package needs tokens and a validity window")
        async with self._engine.begin() as conn:
            account = await self._lock_account(conn, account_id)
            now = self._clock()
            active = await self._active_package(conn, account_id, now)
            if active is not None:
                raise TollhouseError(
                    CONFLICT,
                    f"account {account_id} already has an active package {active.package_id} "
                    f"({active.tokens_remaining} of {active.tokens_total} tokens left, valid until "
                    f"{active.valid_until.isoformat()}); one active package per account: buy the next "
                    "one when it is used up or has expired",
                )
            package_id = new_id("pkg")
            created_at = await conn.scalar(
                insert(packages)
                .values(
                    package_id=package_id,
                    account_id=account_id,
                    tokens_total=tokens,
                    price=price,
                    valid_from=valid_from,
                    valid_until=valid_until,
                )
                .returning(packages.c.created_at)
            )
            await conn.execute(insert(package_balances).values(package_id=package_id, account_id=account_id))
            await _notify_quota(conn, accounts=[account_id])
            await conn.execute(
                insert(ledger_entries).values(
                    entry_type="package_grant",
                    account_id=account_id,
                    package_id=package_id,
                    package_tokens=tokens,
                    balance_delta=0,
                    event_time=now,
                    local_day=local_day(now, account.timezone),
                )
            )
        return PackageRecord(package_id, account_id, tokens, 0, 0, price, valid_from, valid_until, created_at)

    async def _active_package(self, conn: AsyncConnection, account_id: str, now: datetime) -> PackageRecord | None:
        row = (
            await conn.execute(
                _SELECT_PACKAGES.where(
                    packages.c.account_id == account_id,
                    packages.c.valid_until > now,
                    packages.c.tokens_total - package_balances.c.tokens_used - package_balances.c.tokens_expired > 0,
                )
                .order_by(packages.c.valid_from, packages.c.package_id)
                .limit(1)
            )
        ).first()
        return None if row is None else _package(row)

    async def _package_of(self, conn: AsyncConnection, package_id: str) -> PackageRecord | None:
        row = (
            await conn.execute(
                _SELECT_PACKAGES.where(packages.c.package_id == package_id)
            )
        ).first()
        return None if row is None else _package(row)

    async def _bindable_package(self, conn: AsyncConnection, account_id: str, package_id: str | None) -> str:
        """The package a package-mode key will draw from: the one named, or the active one."""
        now = self._clock()
        if package_id is None:
            active = await self._active_package(conn, account_id, now)
            if active is None:
                raise TollhouseError(
                    CONFLICT,
                    f"account {account_id} has no active package to bind a package key to: buy one with "
                    f"POST /v1/accounts/{account_id}/packages, or create a payg key",
                )
            return active.package_id
        package = await self._package_of(conn, package_id)
        if package is None or package.account_id != account_id:
            raise TollhouseError(
                INVALID_REQUEST, f"body.package_id: {package_id} is not a package of account {account_id}"
            )
        if not package.is_active(now):
            raise TollhouseError(
                CONFLICT,
                f"package {package_id} is {package.status(now)} and cannot be bound to a key; "
                "buy a new package and bind that one",
            )
        return package.package_id

    # API keys

    async def create_key(
        self,
        account_id: str,
        *,
        name: str,
        billing_mode: str,
        package_id: str | None,
        daily_cap: int,
        monthly_cap: int,
        secret: str,
    ) -> KeyRecord:
        """Store a new key; only the hash of ``secret`` and a short hint are kept."""
        _check_key_rules(billing_mode, package_id, daily_cap, monthly_cap)
        key_id = new_id("key")
        hint = secret[:API_KEY_HINT_CHARS]
        async with self._engine.begin() as conn:
            if await conn.scalar(select(exists().where(accounts.c.account_id == account_id))) is not True:
                raise account_not_found(account_id)
            if billing_mode == PACKAGE:
                package_id = await self._bindable_package(conn, account_id, package_id)
            row = (
                await conn.execute(
                    insert(api_keys)
                    .values(
                        key_id=key_id,
                        account_id=account_id,
                        name=name,
                        secret_hash=hash_api_key_secret(secret),
                        secret_hint=hint,
                        billing_mode=billing_mode,
                        package_id=package_id,
                        daily_cap=daily_cap,
                        monthly_cap=monthly_cap,
                        status=KEY_ACTIVE,
                    )
                    .returning(*_KEY_COLUMNS)
                )
            ).one()
            await _notify_quota(conn, accounts=[account_id], keys=True)
        return _key(row)

    async def get_key(self, key_id: str) -> KeyRecord:
        async with self._engine.begin() as conn:
            row = (await conn.execute(_select_key(key_id))).first()
        if row is None:
            raise key_not_found(key_id)
        return _key(row)

    async def update_key(self, key_id: str, changes: KeyChanges) -> KeyRecord:
        """Change name, caps or package binding, checked against the key's billing mode."""
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(_select_key(key_id).with_for_update())
            ).first()
            if row is None:
                raise key_not_found(key_id)
            key = _key(row)
            if key.status == KEY_REVOKED:
                raise TollhouseError(CONFLICT, f"key {key_id} is revoked and cannot be changed; create a new key")
            values: dict[str, Any] = {}
            if "name" in changes.fields:
                values["name"] = changes.name
            for cap in ("daily_cap", "monthly_cap"):
                if cap in changes.fields:
                    values[cap] = getattr(changes, cap)
            package_id = key.package_id
            if "package_id" in changes.fields:
                package_id = changes.package_id
            _check_key_rules(
                key.billing_mode,
                package_id,
                values.get("daily_cap", key.daily_cap),
                values.get("monthly_cap", key.monthly_cap),
                unbinding="package_id" in changes.fields,
            )
            if "package_id" in changes.fields and key.billing_mode == PACKAGE:
                values["package_id"] = await self._bindable_package(conn, key.account_id, package_id)
            if not values:
                return key
            row = (
                await conn.execute(
                    update(api_keys).where(api_keys.c.key_id == key_id).values(**values).returning(*_KEY_COLUMNS)
                )
            ).one()
            await _notify_quota(conn, accounts=[key.account_id])
        return _key(row)

    async def revoke_key(self, key_id: str) -> KeyRecord:
        """Revoke for good; revoking a revoked key returns it unchanged."""
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    update(api_keys)
                    .where(api_keys.c.key_id == key_id, api_keys.c.status == KEY_ACTIVE)
                    .values(status=KEY_REVOKED, revoked_at=self._clock())
                    .returning(*_KEY_COLUMNS)
                )
            ).first()
            if row is None:
                row = (await conn.execute(_select_key(key_id))).first()
            else:
                await _notify_quota(conn, accounts=[row.account_id])
        if row is None:
            raise key_not_found(key_id)
        return _key(row)

    # Prices

    async def add_price(
        self,
        model: str,
        *,
        effective_from: datetime,
        input_price: int,
        output_price: int,
        cached_input_price: int,
        per_request_fee: int,
        batch_discount_ppm: int,
        package_weight_ppm: int,
        min_tier: str,
    ) -> PriceRow:
        """A new price version; versions are never edited. The same start twice is a conflict."""
        try:
            async with self._engine.begin() as conn:
                row = (
                    await conn.execute(
                        insert(prices)
                        .values(
                            model=model,
                            effective_from=effective_from,
                            input_price=input_price,
                            output_price=output_price,
                            cached_input_price=cached_input_price,
                            per_request_fee=per_request_fee,
                            batch_discount_ppm=batch_discount_ppm,
                            package_weight_ppm=package_weight_ppm,
                            min_tier=min_tier,
                        )
                        .returning(*_PRICE_COLUMNS)
                    )
                ).one()
                await _notify_quota(conn, prices=True)
        except IntegrityError as exc:
            if _constraint_of(exc) != PRICE_VERSION_CONSTRAINT:
                raise
            raise TollhouseError(
                CONFLICT,
                f"model {model!r} already has a price version effective from {effective_from.isoformat()}; "
                "versions are never edited: add one with another effective_from",
            ) from None
        return _price(row)

    async def list_prices(self, *, model: str | None, after: PriceKey | None, limit: int) -> PricePage:
        """Price versions ordered by model, then effective_from; keyset-paginated."""
        query = select(*_PRICE_COLUMNS)
        if model is not None:
            query = query.where(prices.c.model == model)
        query = keyset_page(query, (prices.c.model, prices.c.effective_from, prices.c.price_id), after, limit)
        async with self._engine.begin() as conn:
            rows = [_price(r) for r in (await conn.execute(query)).all()]
        return PricePage(*page_of(rows, limit, lambda p: (p.model, p.effective_from, p.price_id)))


def _check_key_rules(
    billing_mode: str, package_id: str | None, daily_cap: int, monthly_cap: int, *, unbinding: bool = False
) -> None:
    """Package keys are charged tokens and PAYG keys money (DESIGN §4): each takes only its own limits."""
    if billing_mode == PAYG and package_id is not None:
        raise TollhouseError(
            INVALID_REQUEST, "body.package_id: payg keys are charged money and take no package_id"
        )
    if billing_mode == PACKAGE:
        if unbinding and package_id is None:
            raise TollhouseError(
                INVALID_REQUEST, "body.package_id: a package key must stay bound to a package; revoke it instead"
            )
        for field, cap in (("daily_cap", daily_cap), ("monthly_cap", monthly_cap)):
            if cap != 0:
                raise TollhouseError(
                    INVALID_REQUEST,
                    f"body.{field}: spend caps apply to payg keys; a package key is limited by its package "
                    f"(got {format_cny(cap)})",
                )


def _same_topup(existing: TopupRecord, amount: int) -> TopupRecord:
    if existing.amount != amount:
        raise TollhouseError(
            CONFLICT,
            f"top-up reference {existing.reference!r} was already used for {format_cny(existing.amount)} CNY "
            f"(ledger entry {existing.entry_id}); use a new reference for another amount",
        )
    return existing


def account_not_found(account_id: str) -> TollhouseError:
    return TollhouseError(NOT_FOUND, f"account {account_id} not found")


def key_not_found(key_id: str) -> TollhouseError:
    return TollhouseError(NOT_FOUND, f"key {key_id} not found")


async def _notify_quota(conn: AsyncConnection, **changes: Any) -> None:
    """Tell authorizers what this transaction changed (delivered when it commits)."""
    for payload in quota_notices(**changes):
        await conn.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": QUOTA_CHANNEL, "payload": payload})


async def database_ready(engine: AsyncEngine) -> None:
    """Raise unless the database answers ``SELECT 1``."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
