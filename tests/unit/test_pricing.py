"""Price versions and the two ways a call is paid for (DESIGN §4)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from services.contracts.money import parse_fraction_ppm, parse_price
from services.metering.domain.pricing import PriceBook, PriceRow, Tier, package_deduction, payg_charge

UTC = timezone.utc
JAN = datetime(2026, 1, 1, tzinfo=UTC)
JUN = datetime(2026, 6, 1, tzinfo=UTC)


def price_row(
    *,
    price_id: int = 1,
    model: str = "gpt-4o",
    effective_from: datetime = JAN,
    input_price: str = "2",
    output_price: str = "8",
    cached_input_price: str | None = None,
    per_request_fee: int = 0,
    batch_discount: str = "0",
    package_weight: str = "1",
) -> PriceRow:
    """A price row built from the strings an admin would PUT (CNY per 1M tokens)."""
    return PriceRow(
        price_id=price_id,
        model=model,
        effective_from=effective_from,
        input_price=parse_price(input_price),
        output_price=parse_price(output_price),
        cached_input_price=parse_price(cached_input_price or input_price),
        per_request_fee=per_request_fee,
        batch_discount_ppm=parse_fraction_ppm(batch_discount, "batch_discount"),
        package_weight_ppm=parse_fraction_ppm(package_weight, "package_weight"),
    )


def charge(row: PriceRow, prompt: int = 0, completion: int = 0, cached: int = 0, batch: bool = False) -> int:
    return payg_charge(row, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, is_batch=batch)


# --- PriceBook ---------------------------------------------------------------------------


@pytest.fixture
def book() -> PriceBook:
    # given out of order on purpose: the book sorts by effective_from
    return PriceBook([
        price_row(price_id=2, effective_from=JUN, input_price="3"),
        price_row(price_id=1, effective_from=JAN, input_price="2"),
        price_row(price_id=3, model="gpt-3.5-turbo", effective_from=JUN),
    ])


def test_price_book_has_no_price_before_the_first_version(book: PriceBook) -> None:
    assert book.at("gpt-4o", JAN - timedelta(microseconds=1)) is None


def test_price_book_uses_a_version_from_exactly_its_effective_from(book: PriceBook) -> None:
    assert book.at("gpt-4o", JAN).price_id == 1
    assert book.at("gpt-4o", JUN).price_id == 2


def test_price_book_keeps_the_old_version_until_the_new_one_starts(book: PriceBook) -> None:
    assert book.at("gpt-4o", JUN - timedelta(microseconds=1)).price_id == 1


def test_price_book_uses_the_latest_version_after_it_starts(book: PriceBook) -> None:
    assert book.at("gpt-4o", datetime(2030, 1, 1, tzinfo=UTC)).price_id == 2


def test_price_book_compares_instants_not_wall_clocks(book: PriceBook) -> None:
    # 2026-06-01T07:59+08:00 is 2026-05-31T23:59Z: still the January price
    shanghai = timezone(timedelta(hours=8))
    assert book.at("gpt-4o", datetime(2026, 6, 1, 7, 59, tzinfo=shanghai)).price_id == 1
    assert book.at("gpt-4o", datetime(2026, 6, 1, 8, 0, tzinfo=shanghai)).price_id == 2


def test_price_book_does_not_mix_models(book: PriceBook) -> None:
    assert book.at("gpt-3.5-turbo", JAN + timedelta(days=30)) is None
    assert book.at("gpt-3.5-turbo", JUN).price_id == 3


def test_price_book_has_no_price_for_an_unknown_model(book: PriceBook) -> None:
    assert book.at("claude", JUN) is None
    assert not book.knows("claude")


def test_price_book_lists_its_models(book: PriceBook) -> None:
    assert book.models() == ["gpt-3.5-turbo", "gpt-4o"]
    assert book.knows("gpt-4o")


def test_price_book_model_ids_are_case_sensitive(book: PriceBook) -> None:
    assert book.at("GPT-4o", JUN) is None


def test_price_book_prefers_the_later_row_when_two_start_together() -> None:
    book = PriceBook([price_row(price_id=7, effective_from=JAN), price_row(price_id=5, effective_from=JAN)])
    assert book.at("gpt-4o", JAN).price_id == 7


def test_empty_price_book_has_no_price() -> None:
    assert PriceBook([]).at("gpt-4o", JUN) is None


def test_tiers_are_ordered_free_developer_enterprise() -> None:
    assert Tier.free < Tier.developer < Tier.enterprise


# --- payg_charge -------------------------------------------------------------------------


def test_payg_charge_is_tokens_times_price_times_1000_nano() -> None:
    # 1000 prompt tokens at 2 CNY/1M = 0.002 CNY = 2_000_000 nano; 500 completion at 8 CNY/1M = 4_000_000
    assert charge(price_row(), prompt=1000, completion=500) == 6_000_000


def test_payg_charge_bills_cached_tokens_at_the_cached_price() -> None:
    row = price_row(input_price="2", cached_input_price="0.5", output_price="8")
    # 600 × 2000 + 400 × 500 + 200 × 8000
    assert charge(row, prompt=1000, cached=400, completion=200) == 1_200_000 + 200_000 + 1_600_000


def test_payg_charge_never_bills_cached_tokens_twice() -> None:
    row = price_row(input_price="2", cached_input_price="2", output_price="0")
    assert charge(row, prompt=1000, cached=400) == charge(row, prompt=1000, cached=0)


def test_payg_charge_bills_all_cached_prompt_at_cached_price_only() -> None:
    row = price_row(input_price="2", cached_input_price="0.5", output_price="0")
    assert charge(row, prompt=1000, cached=1000) == 500_000


def test_payg_charge_with_three_decimal_price_is_exact() -> None:
    row = price_row(input_price="0.001", output_price="0.003")
    assert charge(row, prompt=1, completion=1) == 4


def test_payg_charge_adds_the_per_request_fee_once() -> None:
    row = price_row(per_request_fee=1_000_000)
    assert charge(row, prompt=1000, completion=500) == 6_000_000 + 1_000_000


def test_payg_charge_of_an_empty_call_is_the_per_request_fee() -> None:
    assert charge(price_row(per_request_fee=123)) == 123
    assert charge(price_row()) == 0


def test_payg_charge_ignores_the_batch_discount_for_a_request() -> None:
    row = price_row(batch_discount="0.5")
    assert charge(row, prompt=1000, completion=500, batch=False) == 6_000_000


def test_payg_charge_applies_the_batch_discount_to_a_batch() -> None:
    row = price_row(batch_discount="0.5")
    assert charge(row, prompt=1000, completion=500, batch=True) == 3_000_000


def test_payg_charge_discounts_the_per_request_fee_of_a_batch_too() -> None:
    row = price_row(input_price="0", output_price="0", per_request_fee=1000, batch_discount="0.25")
    assert charge(row, batch=True) == 750


def test_payg_charge_batch_without_discount_is_the_gross() -> None:
    row = price_row(batch_discount="0")
    assert charge(row, prompt=1000, completion=500, batch=True) == 6_000_000


def test_payg_charge_batch_discount_tie_rounds_down_to_even() -> None:
    row = price_row(input_price="0.001", output_price="0", batch_discount="0.5")
    assert charge(row, prompt=5, batch=True) == 2  # 5 × 0.5 = 2.5 → 2


def test_payg_charge_batch_discount_tie_rounds_up_to_even() -> None:
    row = price_row(input_price="0.001", output_price="0", batch_discount="0.5")
    assert charge(row, prompt=3, batch=True) == 2  # 3 × 0.5 = 1.5 → 2


def test_payg_charge_batch_discount_rounds_non_tie_to_nearest() -> None:
    row = price_row(input_price="0.001", output_price="0", batch_discount="0.3")
    assert charge(row, prompt=7, batch=True) == 5  # 7 × 0.7 = 4.9 → 5
    assert charge(row, prompt=2, batch=True) == 1  # 2 × 0.7 = 1.4 → 1


def test_payg_charge_batch_discount_rounds_once_for_the_whole_charge() -> None:
    # each term alone would be 0.5 → 0; the whole is 1.0 → 1
    row = price_row(input_price="0.001", output_price="0.001", batch_discount="0.5")
    assert charge(row, prompt=1, completion=1, batch=True) == 1


def test_payg_charge_full_batch_discount_is_free() -> None:
    row = price_row(batch_discount="1")
    assert charge(row, prompt=1000, completion=500, batch=True) == 0


def test_payg_charge_is_an_int() -> None:
    row = price_row(batch_discount="0.333333")
    assert type(charge(row, prompt=12345, completion=678, batch=True)) is int


def test_payg_charge_of_huge_call_is_exact() -> None:
    row = price_row(input_price="999.999", output_price="999.999")
    assert charge(row, prompt=10**12, completion=10**12) == 2 * 10**12 * 999_999


# --- package_deduction -------------------------------------------------------------------


def test_package_deduction_with_weight_one_is_total_tokens() -> None:
    assert package_deduction(price_row(), 28) == 28


def test_package_deduction_rounds_fractional_tokens_up() -> None:
    row = price_row(package_weight="1.5")
    assert package_deduction(row, 3) == 5  # 4.5 → 5


def test_package_deduction_with_whole_result_is_not_rounded_up() -> None:
    assert package_deduction(price_row(package_weight="1.5"), 2) == 3


def test_package_deduction_with_one_third_weight_rounds_up() -> None:
    row = price_row(package_weight="0.333333")
    assert package_deduction(row, 3) == 1  # 0.999999 → 1
    assert package_deduction(row, 1) == 1  # 0.333333 → 1
    assert package_deduction(row, 4) == 2  # 1.333332 → 2


def test_package_deduction_with_one_third_weight_on_a_million_tokens_is_exact() -> None:
    assert package_deduction(price_row(package_weight="0.333333"), 1_000_000) == 333_333


def test_package_deduction_of_zero_tokens_is_zero() -> None:
    assert package_deduction(price_row(package_weight="1.5"), 0) == 0


def test_package_deduction_with_zero_weight_is_zero() -> None:
    assert package_deduction(price_row(package_weight="0"), 1000) == 0


def test_package_deduction_ignores_cached_and_batch_pricing() -> None:
    row = replace(price_row(cached_input_price="0.1", batch_discount="0.5"), package_weight_ppm=2_000_000)
    assert package_deduction(row, 10) == 20
