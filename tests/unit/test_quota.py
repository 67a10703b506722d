"""The pure quota decision: refusal order, remaining amounts, holds."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from services.metering.domain.pricing import PriceRow
from services.metering.domain.quota import Holds, KeySnapshot, decide, estimate_hold

NOW = datetime(2026, 11, 22, 4, 0, tzinfo=timezone.utc)  # 12:00 in Shanghai
NANO = 10**9
PRICE = PriceRow(1, "m", datetime(2020, 1, 1, tzinfo=timezone.utc), 1000, 3000, 1000, 0, 0, 1_500_000, "developer")


def snap(**changes) -> KeySnapshot:
    base = dict(key_id="key_1", account_id="acc_1", billing_mode="payg", status="active", tier="developer",
                timezone="Asia/Shanghai", balance=10 * NANO, daily_cap=NANO, monthly_cap=5 * NANO,
                day=date(2026, 11, 22), daily_spend=0, monthly_spend=0)
    base.update(changes)
    return KeySnapshot(**base)


def package_snap(**changes) -> KeySnapshot:
    base = dict(billing_mode="package", daily_cap=0, monthly_cap=0, package_id="pkg_1", package_total=1000,
                package_left=1000, valid_from=NOW - timedelta(days=1), valid_until=NOW + timedelta(days=1))
    return snap(**{**base, **changes})


def test_the_first_limit_in_design_order_is_reported() -> None:
    everything_wrong = snap(status="revoked", tier="free", balance=0, daily_spend=NANO, monthly_spend=5 * NANO)
    assert decide(everything_wrong, PRICE, "m", Holds(), NOW).reason == "key_revoked"
    assert decide(snap(tier="free", balance=0), PRICE, "m", Holds(), NOW).reason == "model_not_allowed"
    assert decide(snap(balance=0, monthly_spend=5 * NANO), PRICE, "m", Holds(), NOW).reason == "insufficient_balance"
    assert decide(snap(monthly_spend=5 * NANO, daily_spend=NANO), PRICE, "m", Holds(), NOW).reason == "monthly_cap_reached"
    assert decide(snap(daily_spend=NANO), PRICE, "m", Holds(), NOW).reason == "daily_cap_reached"


def test_package_expired_comes_before_exhausted() -> None:
    expired_and_empty = package_snap(package_left=0)
    later = NOW + timedelta(days=2)
    assert decide(expired_and_empty, PRICE, "m", Holds(), later).reason == "package_expired"
    assert decide(expired_and_empty, PRICE, "m", Holds(), NOW).reason == "package_exhausted"


def test_unknown_model_is_not_found() -> None:
    d = decide(snap(), None, "M", Holds(), NOW)
    assert (d.allowed, d.reason, d.code) == (False, "model_not_found", 5)


def test_yesterdays_spend_does_not_count_today() -> None:
    stale = snap(day=date(2026, 11, 21), daily_spend=NANO)
    assert decide(stale, PRICE, "m", Holds(), NOW).allowed


def test_a_new_month_resets_the_monthly_spend() -> None:
    stale = snap(day=date(2026, 10, 31), daily_spend=NANO, monthly_spend=5 * NANO)
    assert decide(stale, PRICE, "m", Holds(), NOW).allowed


def test_holds_count_against_caps_balance_and_package() -> None:
    assert decide(snap(), PRICE, "m", Holds(money=NANO), NOW).reason == "daily_cap_reached"
    assert decide(snap(), PRICE, "m", Holds(), NOW, account_money=10 * NANO).reason == "insufficient_balance"
    assert decide(package_snap(), PRICE, "m", Holds(tokens=1000), NOW).reason == "package_exhausted"
    assert decide(package_snap(), PRICE, "m", Holds(tokens=999), NOW).allowed


def test_a_call_is_allowed_while_any_room_is_left_and_holds_its_estimate() -> None:
    d = decide(snap(daily_spend=NANO - 1), PRICE, "m", Holds(), NOW, estimated_tokens=1_000_000)
    assert d.allowed
    assert d.hold_money == 1_000_000 * 3000  # the dearer (output) price
    assert d.remaining["daily"] == "0.000000001"


def test_package_holds_use_the_package_weight() -> None:
    assert estimate_hold(PRICE, "package", 101) == (152, 0)  # ceil(101 × 1.5)
    assert estimate_hold(PRICE, "payg", 0) == (0, 0)


def test_refusal_messages_say_when_a_cap_resets() -> None:
    d = decide(snap(daily_spend=NANO), PRICE, "m", Holds(), NOW)
    assert "2026-11-22T16:00:00+00:00" in d.msg  # midnight in Shanghai
    assert "1.000000000" in d.msg
