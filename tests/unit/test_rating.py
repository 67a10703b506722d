"""Rating one usage event against account, key and package state (DESIGN §4)."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta, timezone

import pytest

from services.contracts.money import NANO_PER_CNY, parse_fraction_ppm, parse_price
from services.metering.domain.pricing import PriceRow
from services.metering.domain.rating import (
    BALANCE_DEPLETED,
    DAILY_CAP,
    MONTHLY_CAP,
    PACKAGE,
    PACKAGE_EXHAUSTED,
    PACKAGE_EXPIRED,
    PAYG,
    UNIT_CNY,
    UNIT_TOKENS,
    AccountState,
    Breach,
    KeyState,
    PackageState,
    Rating,
    Usage,
    apply_topup,
    book_package_expiry,
    rate_usage,
)

UTC = timezone.utc
T0 = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
NANO_PER_TOKEN = 1000  # the test price: 1 CNY per 1M tokens, input and output alike
PRICE = PriceRow(
    price_id=42, model="gpt-4o", effective_from=datetime(2026, 1, 1, tzinfo=UTC),
    input_price=parse_price("1"), output_price=parse_price("1"), cached_input_price=parse_price("1"),
    per_request_fee=0, batch_discount_ppm=0, package_weight_ppm=parse_fraction_ppm("1", "package_weight"),
)
GRACE = timedelta(hours=1)


def cost(tokens: int) -> int:
    """What ``tokens`` cost in nano-CNY at PRICE."""
    return tokens * NANO_PER_TOKEN


def account(balance: int = 10 * NANO_PER_CNY, tz: str = "Asia/Shanghai") -> AccountState:
    return AccountState(account_id="acc_1", timezone=tz, balance=balance)


def payg_key(*, daily_cap: int = 0, monthly_cap: int = 0, key_id: str = "key_1") -> KeyState:
    return KeyState(key_id=key_id, account_id="acc_1", billing_mode=PAYG, package_id=None,
                    daily_cap=daily_cap, monthly_cap=monthly_cap)


def package_key(package_id: str | None = "pkg_1") -> KeyState:
    return KeyState(key_id="key_p", account_id="acc_1", billing_mode=PACKAGE, package_id=package_id,
                    daily_cap=0, monthly_cap=0)


def package(tokens_total: int = 1000, *, valid_from: datetime = T0 - timedelta(days=1),
            valid_until: datetime = T0 + timedelta(days=30)) -> PackageState:
    return PackageState(package_id="pkg_1", account_id="acc_1", tokens_total=tokens_total, tokens_used=0,
                        valid_from=valid_from, valid_until=valid_until)


_counter = iter(range(10**9))


def usage(tokens: int, *, at: datetime = T0, event_id: str | None = None, batch: bool = False) -> Usage:
    return Usage(event_id=event_id or f"ev_{next(_counter)}", event_time=at, is_batch=batch,
                 prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens, cached_tokens=0)


def rate(u: Usage, acct: AccountState, key: KeyState, pkg: PackageState | None = None,
         breaches: list[Breach] | None = None, price: PriceRow = PRICE) -> Rating:
    return rate_usage(u, account=acct, key=key, package=pkg, price=price,
                      breaches=breaches if breaches is not None else [])


def of_type(breaches: list[Breach], kind: str) -> list[Breach]:
    return [b for b in breaches if b.type == kind]


# --- PAYG: charge and balance ------------------------------------------------------------


def test_payg_charge_is_debited_from_the_balance() -> None:
    acct = account(balance=cost(5000))
    result = rate(usage(1000), acct, payg_key())
    assert result.charge == cost(1000)
    assert acct.balance == cost(4000)


def test_payg_charge_within_the_balance_has_no_overage() -> None:
    result = rate(usage(1000), account(balance=cost(5000)), payg_key())
    assert result.overage_charge == 0


def test_payg_charge_taking_balance_below_zero_has_overage_of_the_part_below_zero() -> None:
    acct = account(balance=cost(300))
    result = rate(usage(1000), acct, payg_key())
    assert result.overage_charge == cost(700)
    assert acct.balance == -cost(700)


def test_payg_charge_on_a_spent_balance_is_all_overage() -> None:
    acct = account(balance=-cost(10))
    result = rate(usage(1000), acct, payg_key())
    assert result.overage_charge == cost(1000)
    assert acct.balance == -cost(1010)


def test_payg_charge_to_exactly_zero_has_no_overage() -> None:
    result = rate(usage(1000), account(balance=cost(1000)), payg_key())
    assert result.overage_charge == 0


def test_payg_rating_books_money_never_package_tokens() -> None:
    pkg = package()
    result = rate(usage(1000), account(), payg_key(), pkg)
    assert (result.package_id, result.package_tokens, result.overage_tokens) == (None, 0, 0)
    assert pkg.tokens_used == 0


def test_payg_rating_names_local_day_and_price() -> None:
    result = rate(usage(10, at=datetime(2026, 11, 22, 16, 30, tzinfo=UTC)), account(), payg_key())
    assert result.local_day == date(2026, 11, 23)
    assert result.price_id == 42


def test_payg_batch_gets_the_batch_discount() -> None:
    price = replace(PRICE, batch_discount_ppm=500_000)
    assert rate(usage(1000, batch=True), account(), payg_key(), price=price).charge == cost(500)


# --- PAYG: balance_depleted --------------------------------------------------------------


def test_balance_depleted_is_recorded_by_the_charge_that_takes_balance_below_zero() -> None:
    breaches: list[Breach] = []
    acct = account(balance=cost(300))
    rate(usage(1000, event_id="ev_deplete"), acct, payg_key(), breaches=breaches)
    [breach] = breaches
    assert breach.type == BALANCE_DEPLETED
    assert (breach.account_id, breach.key_id, breach.event_id) == ("acc_1", "key_1", "ev_deplete")
    assert (breach.unit, breach.cap, breach.overshoot) == (UNIT_CNY, 0, cost(700))
    assert acct.balance_depleted


def test_balance_depleted_is_recorded_when_balance_reaches_exactly_zero() -> None:
    breaches: list[Breach] = []
    rate(usage(1000), account(balance=cost(1000)), payg_key(), breaches=breaches)
    assert [b.type for b in breaches] == [BALANCE_DEPLETED]
    assert breaches[0].overshoot == 0


def test_balance_depleted_is_not_recorded_while_balance_stays_positive() -> None:
    breaches: list[Breach] = []
    rate(usage(999), account(balance=cost(1000)), payg_key(), breaches=breaches)
    assert breaches == []


def test_balance_depleted_is_recorded_once() -> None:
    breaches: list[Breach] = []
    acct, key = account(balance=cost(100)), payg_key()
    for _ in range(3):
        rate(usage(1000), acct, key, breaches=breaches)
    assert len(of_type(breaches, BALANCE_DEPLETED)) == 1


def test_balance_depleted_is_recorded_again_after_a_top_up_and_new_depletion() -> None:
    breaches: list[Breach] = []
    acct, key = account(balance=cost(100)), payg_key()
    rate(usage(1000), acct, key, breaches=breaches)
    apply_topup(acct, cost(2000))  # -900 + 2000 = 1100
    rate(usage(1000), acct, key, breaches=breaches)  # 100 left: still above zero
    assert len(of_type(breaches, BALANCE_DEPLETED)) == 1
    rate(usage(1000, event_id="ev_second"), acct, key, breaches=breaches)
    assert [b.event_id for b in of_type(breaches, BALANCE_DEPLETED)][1] == "ev_second"


def test_top_up_that_leaves_balance_below_zero_does_not_rearm_depletion() -> None:
    breaches: list[Breach] = []
    acct, key = account(balance=cost(100)), payg_key()
    rate(usage(1000), acct, key, breaches=breaches)  # -900
    apply_topup(acct, cost(500))  # -400
    rate(usage(1000), acct, key, breaches=breaches)
    assert len(of_type(breaches, BALANCE_DEPLETED)) == 1


def test_top_up_to_exactly_zero_does_not_rearm_depletion() -> None:
    acct = account(balance=cost(100))
    rate(usage(1000), acct, payg_key())
    apply_topup(acct, cost(900))
    assert acct.balance == 0
    assert acct.balance_depleted


def test_zero_charge_on_a_zero_balance_records_no_depletion() -> None:
    breaches: list[Breach] = []
    acct = account(balance=0)
    rate(usage(0), acct, payg_key(), breaches=breaches)
    assert breaches == []
    assert not acct.balance_depleted


def test_apply_topup_adds_to_the_balance() -> None:
    acct = account(balance=cost(100))
    apply_topup(acct, cost(50))
    assert acct.balance == cost(150)


# --- PAYG: daily and monthly caps --------------------------------------------------------


def test_daily_cap_is_not_breached_below_the_cap() -> None:
    breaches: list[Breach] = []
    rate(usage(999), account(), payg_key(daily_cap=cost(1000)), breaches=breaches)
    assert breaches == []


def test_daily_cap_is_breached_when_spend_reaches_it_exactly() -> None:
    breaches: list[Breach] = []
    key = payg_key(daily_cap=cost(1000))
    rate(usage(400), account(), key, breaches=breaches)
    rate(usage(600, event_id="ev_reach"), account(), key, breaches=breaches)
    [breach] = breaches
    assert (breach.type, breach.key_id, breach.period, breach.event_id) == (DAILY_CAP, "key_1", "2026-11-22", "ev_reach")
    assert (breach.unit, breach.cap, breach.spend, breach.overshoot) == (UNIT_CNY, cost(1000), cost(1000), 0)


def test_daily_cap_overshoot_is_spend_minus_cap() -> None:
    breaches: list[Breach] = []
    key = payg_key(daily_cap=cost(1000))
    rate(usage(700), account(), key, breaches=breaches)
    rate(usage(500), account(), key, breaches=breaches)
    [breach] = breaches
    assert (breach.spend, breach.overshoot) == (cost(1200), cost(200))


def test_daily_cap_is_breached_once_per_day() -> None:
    breaches: list[Breach] = []
    key = payg_key(daily_cap=cost(1000))
    for _ in range(4):
        rate(usage(600), account(), key, breaches=breaches)
    assert len(breaches) == 1


def test_daily_spend_keeps_counting_after_the_breach() -> None:
    key = payg_key(daily_cap=cost(1000))
    for _ in range(3):
        rate(usage(600), account(), key)
    assert key.daily[date(2026, 11, 22)].spend == cost(1800)


def test_daily_cap_can_be_breached_again_on_a_new_local_day() -> None:
    breaches: list[Breach] = []
    key = payg_key(daily_cap=cost(1000))
    rate(usage(1000), account(), key, breaches=breaches)
    rate(usage(1000, at=T0 + timedelta(days=1)), account(), key, breaches=breaches)
    assert [b.period for b in breaches] == ["2026-11-22", "2026-11-23"]


def test_daily_cap_day_is_the_accounts_local_day() -> None:
    breaches: list[Breach] = []
    key = payg_key(daily_cap=cost(1000))
    rate(usage(600, at=datetime(2026, 11, 22, 15, 59, tzinfo=UTC)), account(), key, breaches=breaches)
    rate(usage(600, at=datetime(2026, 11, 22, 16, 0, tzinfo=UTC)), account(), key, breaches=breaches)
    assert breaches == []  # 23:59 and 00:00 in Shanghai: two local days, 600 each
    assert set(key.daily) == {date(2026, 11, 22), date(2026, 11, 23)}


def test_daily_cap_uses_event_time_even_for_a_late_event() -> None:
    breaches: list[Breach] = []
    key = payg_key(daily_cap=cost(1000))
    rate(usage(600), account(), key, breaches=breaches)
    rate(usage(100, at=T0 + timedelta(days=1)), account(), key, breaches=breaches)
    rate(usage(400, at=T0 - timedelta(hours=1), event_id="ev_late"), account(), key, breaches=breaches)
    assert [(b.period, b.event_id) for b in breaches] == [("2026-11-22", "ev_late")]


def test_zero_daily_cap_means_unlimited() -> None:
    breaches: list[Breach] = []
    key = payg_key(daily_cap=0, monthly_cap=0)
    rate(usage(10**9), account(), key, breaches=breaches)
    assert of_type(breaches, DAILY_CAP) == of_type(breaches, MONTHLY_CAP) == []
    assert key.daily[date(2026, 11, 22)].spend == cost(10**9)


def test_caps_are_counted_per_key() -> None:
    breaches: list[Breach] = []
    acct = account()
    first, second = payg_key(daily_cap=cost(1000), key_id="key_1"), payg_key(daily_cap=cost(1000), key_id="key_2")
    rate(usage(600), acct, first, breaches=breaches)
    rate(usage(600), acct, second, breaches=breaches)
    assert breaches == []


def test_monthly_cap_is_breached_across_days_of_one_month() -> None:
    breaches: list[Breach] = []
    key = payg_key(monthly_cap=cost(1000))
    rate(usage(600, at=datetime(2026, 11, 1, tzinfo=UTC)), account(), key, breaches=breaches)
    rate(usage(600, at=datetime(2026, 11, 20, tzinfo=UTC), event_id="ev_m"), account(), key, breaches=breaches)
    [breach] = breaches
    assert (breach.type, breach.period, breach.event_id) == (MONTHLY_CAP, "2026-11", "ev_m")
    assert (breach.spend, breach.overshoot) == (cost(1200), cost(200))


def test_monthly_cap_is_breached_once_per_month() -> None:
    breaches: list[Breach] = []
    key = payg_key(monthly_cap=cost(1000))
    for day in range(1, 6):
        rate(usage(600, at=datetime(2026, 11, day, tzinfo=UTC)), account(), key, breaches=breaches)
    assert len(breaches) == 1


def test_monthly_cap_can_be_breached_again_in_a_new_local_month() -> None:
    breaches: list[Breach] = []
    key = payg_key(monthly_cap=cost(1000))
    rate(usage(1000, at=datetime(2026, 11, 30, 15, 30, tzinfo=UTC)), account(), key, breaches=breaches)
    rate(usage(1000, at=datetime(2026, 11, 30, 16, 0, tzinfo=UTC)), account(), key, breaches=breaches)
    assert [b.period for b in breaches] == ["2026-11", "2026-12"]


def test_one_event_can_breach_daily_and_monthly_caps_together() -> None:
    breaches: list[Breach] = []
    rate(usage(1000), account(), payg_key(daily_cap=cost(1000), monthly_cap=cost(1000)), breaches=breaches)
    assert sorted(b.type for b in breaches) == [DAILY_CAP, MONTHLY_CAP]


def test_cap_is_still_breached_when_balance_is_spent_too() -> None:
    breaches: list[Breach] = []
    rate(usage(1000), account(balance=cost(500)), payg_key(daily_cap=cost(800)), breaches=breaches)
    assert sorted(b.type for b in breaches) == [BALANCE_DEPLETED, DAILY_CAP]


def test_daily_cap_follows_new_york_dst_day() -> None:
    # 2026-03-08 is 23 hours long in New York: 05:00Z to 04:00Z the next day
    breaches: list[Breach] = []
    acct, key = account(tz="America/New_York"), payg_key(daily_cap=cost(1000))
    rate(usage(600, at=datetime(2026, 3, 8, 5, 0, tzinfo=UTC)), acct, key, breaches=breaches)
    rate(usage(600, at=datetime(2026, 3, 9, 3, 59, tzinfo=UTC), event_id="ev_same_day"), acct, key, breaches=breaches)
    rate(usage(600, at=datetime(2026, 3, 9, 4, 0, tzinfo=UTC)), acct, key, breaches=breaches)
    assert [(b.period, b.event_id) for b in breaches] == [("2026-03-08", "ev_same_day")]


# --- package keys ------------------------------------------------------------------------


def test_package_event_deducts_tokens() -> None:
    pkg = package(1000)
    result = rate(usage(300), account(), package_key(), pkg)
    assert (result.package_id, result.package_tokens, result.overage_tokens) == ("pkg_1", 300, 0)
    assert pkg.tokens_used == 300
    assert pkg.tokens_remaining == 700


def test_package_event_never_charges_money() -> None:
    acct = account(balance=cost(5))
    key = package_key()
    result = rate(usage(300), acct, key, package(1000))
    assert (result.charge, result.overage_charge) == (0, 0)
    assert acct.balance == cost(5)
    assert key.daily == {} and key.monthly == {}


def test_package_event_deducts_weighted_tokens_rounded_up() -> None:
    price = replace(PRICE, package_weight_ppm=1_500_000)
    pkg = package(1000)
    assert rate(usage(3), account(), package_key(), pkg, price=price).package_tokens == 5
    assert pkg.tokens_used == 5


def test_package_exhausted_is_recorded_by_the_event_that_takes_it_to_zero() -> None:
    breaches: list[Breach] = []
    pkg = package(1000)
    rate(usage(600), account(), package_key(), pkg, breaches=breaches)
    assert breaches == []
    result = rate(usage(400, event_id="ev_last"), account(), package_key(), pkg, breaches=breaches)
    [breach] = breaches
    assert (breach.type, breach.package_id, breach.key_id, breach.event_id) == (PACKAGE_EXHAUSTED, "pkg_1", "key_p", "ev_last")
    assert (breach.unit, breach.cap, breach.spend, breach.overshoot) == (UNIT_TOKENS, 1000, 1000, 0)
    assert (result.package_tokens, result.overage_tokens) == (400, 0)


def test_package_event_beyond_what_is_left_gives_what_is_left_and_the_rest_is_overage() -> None:
    breaches: list[Breach] = []
    pkg = package(1000)
    rate(usage(800), account(), package_key(), pkg)
    result = rate(usage(500), account(), package_key(), pkg, breaches=breaches)
    assert (result.package_tokens, result.overage_tokens) == (200, 300)
    assert pkg.tokens_remaining == 0
    assert [(b.type, b.overshoot) for b in breaches] == [(PACKAGE_EXHAUSTED, 300)]


def test_package_exhausted_is_recorded_once() -> None:
    breaches: list[Breach] = []
    pkg = package(1000)
    for _ in range(4):
        rate(usage(600), account(), package_key(), pkg, breaches=breaches)
    assert len(of_type(breaches, PACKAGE_EXHAUSTED)) == 1


def test_package_event_after_exhaustion_is_all_overage() -> None:
    pkg = package(1000)
    rate(usage(1000), account(), package_key(), pkg)
    result = rate(usage(250), account(), package_key(), pkg)
    assert (result.package_tokens, result.overage_tokens) == (0, 250)
    assert pkg.tokens_used == 1000


def test_package_event_with_zero_tokens_does_not_exhaust_a_package_with_tokens_left() -> None:
    breaches: list[Breach] = []
    rate(usage(0), account(), package_key(), package(1000), breaches=breaches)
    assert breaches == []


def test_package_event_after_valid_until_is_all_overage_and_records_expired() -> None:
    breaches: list[Breach] = []
    pkg = package(1000, valid_until=T0)
    result = rate(usage(300, event_id="ev_after"), account(), package_key(), pkg, breaches=breaches)
    assert (result.package_id, result.package_tokens, result.overage_tokens) == ("pkg_1", 0, 300)
    assert pkg.tokens_used == 0
    [breach] = breaches
    assert (breach.type, breach.event_id, breach.overshoot) == (PACKAGE_EXPIRED, "ev_after", 300)


def test_package_event_before_valid_from_is_all_overage_and_records_expired() -> None:
    breaches: list[Breach] = []
    pkg = package(1000, valid_from=T0 + timedelta(seconds=1))
    result = rate(usage(300), account(), package_key(), pkg, breaches=breaches)
    assert (result.package_tokens, result.overage_tokens) == (0, 300)
    assert [b.type for b in breaches] == [PACKAGE_EXPIRED]


def test_package_event_exactly_at_valid_from_deducts() -> None:
    pkg = package(1000, valid_from=T0)
    assert rate(usage(300), account(), package_key(), pkg).package_tokens == 300


def test_package_event_just_before_valid_until_deducts() -> None:
    pkg = package(1000, valid_until=T0 + timedelta(microseconds=1))
    assert rate(usage(300), account(), package_key(), pkg).package_tokens == 300


def test_package_expired_is_recorded_once() -> None:
    breaches: list[Breach] = []
    pkg = package(1000, valid_until=T0)
    for _ in range(3):
        rate(usage(300), account(), package_key(), pkg, breaches=breaches)
    assert len(of_type(breaches, PACKAGE_EXPIRED)) == 1


def test_package_key_without_a_package_is_all_overage() -> None:
    breaches: list[Breach] = []
    result = rate(usage(300), account(), package_key(None), None, breaches=breaches)
    assert (result.package_id, result.package_tokens, result.overage_tokens, result.charge) == (None, 0, 300, 0)
    assert breaches == []


# --- book_package_expiry -----------------------------------------------------------------


def test_expiry_is_not_booked_before_the_grace_has_passed() -> None:
    pkg = package(1000, valid_until=T0)
    assert book_package_expiry(pkg, T0 + GRACE - timedelta(microseconds=1), GRACE) is None
    assert (pkg.tokens_expired, pkg.expiry_booked) == (0, False)


def test_expiry_is_not_booked_while_the_package_is_valid() -> None:
    assert book_package_expiry(package(1000, valid_until=T0), T0 - timedelta(days=1), GRACE) is None


def test_expiry_books_the_remaining_tokens_once_the_grace_has_passed() -> None:
    pkg = package(1000, valid_until=T0)
    pkg.tokens_used = 300
    booked = book_package_expiry(pkg, T0 + GRACE, GRACE)
    assert booked is not None
    expired, breach = booked
    assert expired == 700
    assert (pkg.tokens_expired, pkg.tokens_remaining, pkg.expiry_booked) == (700, 0, True)
    assert breach is not None
    assert (breach.type, breach.key_id, breach.event_id, breach.occurred_at) == (PACKAGE_EXPIRED, None, None, T0)
    assert (breach.cap, breach.spend, breach.unit) == (1000, 300, UNIT_TOKENS)


def test_expiry_is_booked_only_once() -> None:
    pkg = package(1000, valid_until=T0)
    book_package_expiry(pkg, T0 + GRACE, GRACE)
    assert book_package_expiry(pkg, T0 + 2 * GRACE, GRACE) is None
    assert pkg.tokens_expired == 1000


def test_expiry_after_an_event_recorded_expired_books_tokens_without_a_second_breach() -> None:
    breaches: list[Breach] = []
    pkg = package(1000, valid_until=T0)
    rate(usage(10, at=T0), account(), package_key(), pkg, breaches=breaches)
    assert book_package_expiry(pkg, T0 + GRACE, GRACE) == (1000, None)
    assert len(of_type(breaches, PACKAGE_EXPIRED)) == 1


def test_late_event_from_inside_the_window_still_deducts_during_the_grace() -> None:
    pkg = package(1000, valid_until=T0)
    assert book_package_expiry(pkg, T0 + GRACE / 2, GRACE) is None
    result = rate(usage(200, at=T0 - timedelta(minutes=1)), account(), package_key(), pkg)
    assert result.package_tokens == 200
    assert book_package_expiry(pkg, T0 + GRACE, GRACE)[0] == 800  # type: ignore[index]


def test_expiry_of_a_used_up_package_books_nothing() -> None:
    pkg = package(1000, valid_until=T0)
    rate(usage(1000, at=T0 - timedelta(hours=1)), account(), package_key(), pkg)
    assert book_package_expiry(pkg, T0 + GRACE, GRACE)[0] == 0  # type: ignore[index]


def test_late_in_window_event_after_expiry_was_booked_is_overage_not_exhaustion() -> None:
    breaches: list[Breach] = []
    pkg = package(1000, valid_until=T0)
    book_package_expiry(pkg, T0 + GRACE, GRACE)
    result = rate(usage(200, at=T0 - timedelta(minutes=1)), account(), package_key(), pkg, breaches=breaches)
    assert (result.package_tokens, result.overage_tokens) == (0, 200)
    assert of_type(breaches, PACKAGE_EXHAUSTED) == []
    assert pkg.tokens_used == 0


@pytest.mark.parametrize("mode", [PAYG, PACKAGE])
def test_every_rating_is_in_whole_integers(mode: str) -> None:
    key = payg_key() if mode == PAYG else package_key()
    result = rate(usage(123), account(), key, package(1000))
    assert all(type(v) is int for v in (result.charge, result.overage_charge, result.package_tokens, result.overage_tokens))
