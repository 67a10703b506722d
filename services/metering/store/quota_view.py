"""SQL behind ``GET /v1/keys/{key_id}/quota``: one key's limits and what it used, read from the
projections (``account_balances``, ``package_balances``, ``key_spend``).

Read in one REPEATABLE READ transaction, so the balance, the package and the spend figures
are of the same committed state (a consumer batch commits all of them together).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.metering.domain.periods import local_day, month_of
from services.metering.store.admin import PackageRecord
from services.metering.store.billing import read_snapshot
from services.metering.store.tables import Account, AccountBalance, ApiKey, KeySpend, Package, PackageBalance

accounts = Account.__table__
account_balances = AccountBalance.__table__
api_keys = ApiKey.__table__
packages = Package.__table__
package_balances = PackageBalance.__table__
key_spend = KeySpend.__table__


@dataclass(frozen=True, slots=True)
class KeyQuotaRecord:
    """Money in nano-CNY; ``day`` is the account-local day the spend figures are for."""

    key_id: str
    account_id: str
    billing_mode: str
    status: str
    timezone: str
    balance: int
    daily_cap: int
    monthly_cap: int
    package: PackageRecord | None
    day: date
    daily_spend: int
    monthly_spend: int


class QuotaViewStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def key_quota(self, key_id: str, now: datetime) -> KeyQuotaRecord | None:
        """The key's quota as of ``now`` (periods in the account's zone); None for an unknown key."""
        async with read_snapshot(self._engine) as conn:
            row = (
                await conn.execute(
                    select(
                        api_keys.c.key_id,
                        api_keys.c.account_id,
                        api_keys.c.billing_mode,
                        api_keys.c.status,
                        api_keys.c.daily_cap,
                        api_keys.c.monthly_cap,
                        api_keys.c.package_id,
                        accounts.c.timezone,
                        account_balances.c.balance,
                        packages.c.tokens_total,
                        packages.c.price,
                        packages.c.valid_from,
                        packages.c.valid_until,
                        packages.c.created_at.label("package_created_at"),
                        package_balances.c.tokens_used,
                        package_balances.c.tokens_expired,
                    )
                    .select_from(
                        api_keys.join(accounts, accounts.c.account_id == api_keys.c.account_id)
                        .join(account_balances, account_balances.c.account_id == api_keys.c.account_id)
                        .outerjoin(packages, packages.c.package_id == api_keys.c.package_id)
                        .outerjoin(package_balances, package_balances.c.package_id == api_keys.c.package_id)
                    )
                    .where(api_keys.c.key_id == key_id)
                )
            ).first()
            if row is None:
                return None
            # The same local day and month the consumer books spend under.
            day = local_day(now, row.timezone)
            month = month_of(day)
            spend_rows = (
                await conn.execute(
                    select(key_spend.c.period_type, key_spend.c.spend).where(
                        key_spend.c.key_id == key_id,
                        or_(
                            and_(key_spend.c.period_type == "day", key_spend.c.period_start == day),
                            and_(key_spend.c.period_type == "month", key_spend.c.period_start == month),
                        ),
                    )
                )
            ).all()
        spend = {period_type: amount for period_type, amount in spend_rows}
        package = None
        if row.package_id is not None and row.tokens_total is not None:
            package = PackageRecord(
                package_id=row.package_id,
                account_id=row.account_id,
                tokens_total=row.tokens_total,
                tokens_used=row.tokens_used or 0,
                tokens_expired=row.tokens_expired or 0,
                price=row.price,
                valid_from=row.valid_from,
                valid_until=row.valid_until,
                created_at=row.package_created_at,
            )
        return KeyQuotaRecord(
            key_id=row.key_id,
            account_id=row.account_id,
            billing_mode=row.billing_mode,
            status=row.status,
            timezone=row.timezone,
            balance=row.balance,
            daily_cap=row.daily_cap,
            monthly_cap=row.monthly_cap,
            package=package,
            day=day,
            daily_spend=spend.get("day", 0),
            monthly_spend=spend.get("month", 0),
        )
