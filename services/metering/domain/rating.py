"""Rating: one usage event, the state it meets, and what it books (DESIGN §4).

Pure and sequential: the caller loads the state of the accounts, keys and packages a
batch touches, rates events in partition order, and writes back the mutated state with
the ledger entries and breaches that came out. Nothing here knows about SQL or Kafka.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from services.metering.domain.periods import day_period, local_day, month_of, month_period
from services.metering.domain.pricing import PriceRow, package_deduction, payg_charge

PACKAGE = "package"
PAYG = "payg"

DAILY_CAP = "daily_cap"
MONTHLY_CAP = "monthly_cap"
PACKAGE_EXHAUSTED = "package_exhausted"
PACKAGE_EXPIRED = "package_expired"
BALANCE_DEPLETED = "balance_depleted"
BREACH_TYPES = (DAILY_CAP, MONTHLY_CAP, PACKAGE_EXHAUSTED, PACKAGE_EXPIRED, BALANCE_DEPLETED)

UNIT_CNY = "cny"
UNIT_TOKENS = "tokens"


@dataclass(slots=True)
class AccountState:
    account_id: str
    timezone: str
    balance: int
    balance_depleted: bool = False


@dataclass(slots=True)
class PackageState:
    package_id: str
    account_id: str
    tokens_total: int
    tokens_used: int
    valid_from: datetime
    valid_until: datetime
    tokens_expired: int = 0
    expiry_booked: bool = False
    exhausted_recorded: bool = False
    expired_recorded: bool = False

    @property
    def tokens_remaining(self) -> int:
        return self.tokens_total - self.tokens_used - self.tokens_expired

    def is_valid_at(self, moment: datetime) -> bool:
        return self.valid_from <= moment < self.valid_until


@dataclass(slots=True)
class SpendState:
    """One key's PAYG spend in one local day or month, and whether its cap was breached."""

    spend: int = 0
    breached: bool = False


@dataclass(slots=True)
class KeyState:
    key_id: str
    account_id: str
    billing_mode: str
    package_id: str | None
    daily_cap: int
    monthly_cap: int
    daily: dict[date, SpendState] = field(default_factory=dict)
    monthly: dict[date, SpendState] = field(default_factory=dict)


@dataclass(slots=True)  # not frozen: built once per event, and frozen construction is slow
class Usage:
    """The parts of a usage event that rating reads."""

    event_id: str
    event_time: datetime
    is_batch: bool
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class Breach:
    type: str
    account_id: str
    key_id: str | None
    package_id: str | None
    period: str | None
    unit: str
    cap: int
    spend: int
    overshoot: int
    event_id: str | None
    occurred_at: datetime


@dataclass(slots=True)
class Rating:
    """What one event books: money for PAYG keys, tokens for package keys."""

    charge: int
    overage_charge: int
    package_id: str | None
    package_tokens: int
    overage_tokens: int
    local_day: date
    price_id: int


def rate_usage(
    usage: Usage,
    *,
    account: AccountState,
    key: KeyState,
    package: PackageState | None,
    price: PriceRow,
    breaches: list[Breach],
) -> Rating:
    """Rate one event against the state it meets; mutate that state; append breaches."""
    day = local_day(usage.event_time, account.timezone)
    if key.billing_mode == PACKAGE:
        return _rate_package(usage, key, package, price, day, breaches)
    return _rate_payg(usage, account, key, price, day, breaches)


def _rate_payg(
    usage: Usage, account: AccountState, key: KeyState, price: PriceRow, day: date, breaches: list[Breach]
) -> Rating:
    charge = payg_charge(
        price,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        is_batch=usage.is_batch,
    )
    before = account.balance
    account.balance = before - charge
    overage = charge - max(0, min(charge, before))
    if charge > 0 and account.balance <= 0 and not account.balance_depleted:
        account.balance_depleted = True
        breaches.append(
            Breach(BALANCE_DEPLETED, account.account_id, key.key_id, None, None, UNIT_CNY,
                   0, charge, -account.balance, usage.event_id, usage.event_time)
        )
    _add_spend(key.daily, day, key.daily_cap, charge, DAILY_CAP, key, usage, breaches)
    _add_spend(key.monthly, month_of(day), key.monthly_cap, charge, MONTHLY_CAP, key, usage, breaches)
    return Rating(charge, overage, None, 0, 0, day, price.price_id)


def _add_spend(
    spends: dict[date, SpendState],
    period_start: date,
    cap: int,
    charge: int,
    breach_type: str,
    key: KeyState,
    usage: Usage,
    breaches: list[Breach],
) -> None:
    state = spends.get(period_start)
    if state is None:
        state = spends[period_start] = SpendState()
    state.spend += charge
    if cap > 0 and state.spend >= cap and not state.breached:
        state.breached = True
        period = day_period(period_start) if breach_type == DAILY_CAP else month_period(period_start)
        breaches.append(
            Breach(breach_type, key.account_id, key.key_id, None, period, UNIT_CNY,
                   cap, state.spend, state.spend - cap, usage.event_id, usage.event_time)
        )


def _rate_package(
    usage: Usage, key: KeyState, package: PackageState | None, price: PriceRow, day: date, breaches: list[Breach]
) -> Rating:
    deduction = package_deduction(price, usage.total_tokens)
    if package is None:
        return Rating(0, 0, None, 0, deduction, day, price.price_id)
    if not package.is_valid_at(usage.event_time):
        if not package.expired_recorded:
            package.expired_recorded = True
            breaches.append(_package_breach(PACKAGE_EXPIRED, package, key.key_id, deduction, usage))
        return Rating(0, 0, package.package_id, 0, deduction, day, price.price_id)
    remaining = package.tokens_remaining
    taken = min(remaining, deduction)
    package.tokens_used += taken
    overage = deduction - taken
    # Used up by usage, not merely at zero: after expiry was booked, remaining is 0 too,
    # and a late event from inside the window is overage, not an exhaustion.
    if package.tokens_used >= package.tokens_total and not package.exhausted_recorded:
        package.exhausted_recorded = True
        breaches.append(_package_breach(PACKAGE_EXHAUSTED, package, key.key_id, overage, usage))
    return Rating(0, 0, package.package_id, taken, overage, day, price.price_id)


def _package_breach(kind: str, package: PackageState, key_id: str, overshoot: int, usage: Usage) -> Breach:
    return Breach(kind, package.account_id, key_id, package.package_id, None, UNIT_TOKENS,
                  package.tokens_total, package.tokens_used, overshoot, usage.event_id, usage.event_time)


def book_package_expiry(package: PackageState, now: datetime, grace: timedelta) -> tuple[int, Breach | None] | None:
    """Book the tokens a package still has once it has expired (finance's breakage).

    Waits ``grace`` after ``valid_until`` so that late usage events from inside the
    validity window still deduct from the package. Returns (expired tokens, breach or
    None) when something was booked, None when nothing is due.
    """
    if package.expiry_booked or now < package.valid_until + grace:
        return None
    expired = package.tokens_remaining
    package.tokens_expired += expired
    package.expiry_booked = True
    breach = None
    if not package.expired_recorded:
        package.expired_recorded = True
        breach = Breach(PACKAGE_EXPIRED, package.account_id, None, package.package_id, None, UNIT_TOKENS,
                        package.tokens_total, package.tokens_used, 0, None, package.valid_until)
    return expired, breach


def apply_topup(account: AccountState, amount: int) -> None:
    """A top-up adds to the balance; once it is above zero, depletion can be recorded again."""
    account.balance += amount
    if account.balance > 0:
        account.balance_depleted = False
