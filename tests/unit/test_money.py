"""Money units (DESIGN §2): decimal CNY strings in and out, integers of nano-CNY inside."""

from __future__ import annotations

import pytest

from services.contracts.money import (
    NANO_PER_CNY,
    MoneyFormatError,
    ceil_div,
    div_round_half_even,
    format_cny,
    format_fen,
    format_fraction,
    format_price,
    nano_to_fen,
    parse_cny,
    parse_fraction_ppm,
    parse_price,
)

# --- parse_cny ---------------------------------------------------------------------------


def test_parse_cny_turns_decimal_string_into_nano_cny() -> None:
    assert parse_cny("12.5") == 12_500_000_000


def test_parse_cny_accepts_whole_number_string() -> None:
    assert parse_cny("3") == 3 * NANO_PER_CNY


def test_parse_cny_accepts_exactly_nine_places() -> None:
    assert parse_cny("0.000000001") == 1


def test_parse_cny_refuses_ten_places() -> None:
    with pytest.raises(MoneyFormatError, match="10 decimal places"):
        parse_cny("0.0000000001")


@pytest.mark.parametrize("number", [12, 12.5, 0, 0.0], ids=["int", "float", "zero-int", "zero-float"])
def test_parse_cny_refuses_json_numbers(number: object) -> None:
    with pytest.raises(MoneyFormatError, match="decimal string"):
        parse_cny(number)


@pytest.mark.parametrize("flag", [True, False])
def test_parse_cny_refuses_json_booleans(flag: bool) -> None:
    with pytest.raises(MoneyFormatError, match="not a JSON bool"):
        parse_cny(flag)


def test_parse_cny_refuses_null() -> None:
    with pytest.raises(MoneyFormatError):
        parse_cny(None)


def test_parse_cny_refuses_negative_by_default() -> None:
    with pytest.raises(MoneyFormatError, match="negative"):
        parse_cny("-1.5")


def test_parse_cny_accepts_negative_when_allowed() -> None:
    assert parse_cny("-1.5", allow_negative=True) == -1_500_000_000


@pytest.mark.parametrize(
    "text",
    ["", "abc", "1e3", "1.", ".5", "+1", "1,5", "1.2.3", "--1", "NaN", "Infinity", "0x10", "1 000"],
)
def test_parse_cny_refuses_text_that_is_not_a_plain_decimal(text: str) -> None:
    with pytest.raises(MoneyFormatError, match="not a decimal number"):
        parse_cny(text)


@pytest.mark.parametrize("text", ["١٢.٥", "１２.５", "१२"], ids=["arabic-indic", "fullwidth", "devanagari"])
def test_parse_cny_refuses_non_ascii_digits(text: str) -> None:
    with pytest.raises(MoneyFormatError):
        parse_cny(text)


def test_parse_cny_names_the_field_in_its_message() -> None:
    with pytest.raises(MoneyFormatError, match="daily_cap"):
        parse_cny(1, "daily_cap")


def test_parse_cny_and_format_cny_round_trip() -> None:
    for text in ["0.000000000", "12.500000000", "123456789.000000001"]:
        assert format_cny(parse_cny(text)) == text


# --- format_cny / format_price / format_fraction -----------------------------------------


def test_format_cny_always_has_nine_places() -> None:
    assert format_cny(12_500_000_000) == "12.500000000"


def test_format_cny_of_zero_has_nine_places() -> None:
    assert format_cny(0) == "0.000000000"


def test_format_cny_of_one_nano() -> None:
    assert format_cny(1) == "0.000000001"


def test_format_cny_of_negative_amount_keeps_sign_on_fractions() -> None:
    assert format_cny(-1) == "-0.000000001"
    assert format_cny(-12_500_000_000) == "-12.500000000"


def test_format_price_shows_cny_per_million_tokens_with_three_places() -> None:
    assert format_price(1500) == "1.500"


def test_format_fraction_gives_shortest_decimal() -> None:
    assert format_fraction(500_000) == "0.5"
    assert format_fraction(333_333) == "0.333333"
    assert format_fraction(1_000_000) == "1.0"


# --- parse_price / parse_fraction_ppm ----------------------------------------------------


def test_parse_price_is_nano_cny_per_token() -> None:
    # 2 CNY per 1M tokens = 2e9 nano / 1e6 tokens = 2000 nano-CNY per token
    assert parse_price("2") == 2000


def test_parse_price_accepts_three_places() -> None:
    assert parse_price("0.002") == 2


def test_parse_price_refuses_four_places() -> None:
    with pytest.raises(MoneyFormatError, match="at most 3"):
        parse_price("0.0015")


def test_parse_price_refuses_negative() -> None:
    with pytest.raises(MoneyFormatError, match="negative"):
        parse_price("-1")


def test_parse_price_refuses_json_number() -> None:
    with pytest.raises(MoneyFormatError):
        parse_price(1.5)


def test_parse_fraction_ppm_reads_half() -> None:
    assert parse_fraction_ppm("0.5", "batch_discount") == 500_000


def test_parse_fraction_ppm_refuses_seven_places() -> None:
    with pytest.raises(MoneyFormatError, match="at most 6"):
        parse_fraction_ppm("0.1234567", "batch_discount")


def test_parse_fraction_ppm_refuses_value_above_maximum() -> None:
    with pytest.raises(MoneyFormatError, match="above 1.000000"):
        parse_fraction_ppm("1.000001", "batch_discount", maximum_ppm=1_000_000)


def test_parse_fraction_ppm_accepts_value_at_maximum() -> None:
    assert parse_fraction_ppm("1", "batch_discount", maximum_ppm=1_000_000) == 1_000_000


# --- rounding ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [
        (5, 2, 2),  # 2.5 → 2 (even)
        (7, 2, 4),  # 3.5 → 4 (even)
        (1, 2, 0),  # 0.5 → 0
        (3, 2, 2),  # 1.5 → 2
        (10, 4, 2),  # 2.5 → 2
        (14, 4, 4),  # 3.5 → 4
    ],
)
def test_div_round_half_even_sends_ties_to_even(numerator: int, denominator: int, expected: int) -> None:
    assert div_round_half_even(numerator, denominator) == expected


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [(7, 3, 2), (8, 3, 3), (6, 3, 2), (0, 5, 0), (249, 100, 2), (251, 100, 3)],
)
def test_div_round_half_even_rounds_non_ties_to_nearest(numerator: int, denominator: int, expected: int) -> None:
    assert div_round_half_even(numerator, denominator) == expected


@pytest.mark.parametrize(
    ("numerator", "denominator", "expected"),
    [
        (-5, 2, -2),  # -2.5 → -2
        (-7, 2, -4),  # -3.5 → -4
        (-1, 2, 0),  # -0.5 → 0
        (-3, 4, -1),  # -0.75 → -1
        (-1, 4, 0),  # -0.25 → 0
        (-7, 3, -2),  # -2.33 → -2
    ],
)
def test_div_round_half_even_handles_negative_numerators(numerator: int, denominator: int, expected: int) -> None:
    assert div_round_half_even(numerator, denominator) == expected


def test_div_round_half_even_is_exact_beyond_float_precision() -> None:
    big = 10**40
    assert div_round_half_even(big * 2 + 1, 2) == big  # big + 0.5, big even → big
    assert div_round_half_even(big * 2 + 3, 2) == big + 2  # big + 1.5 → big + 2


@pytest.mark.parametrize("denominator", [0, -2])
def test_div_round_half_even_refuses_non_positive_denominator(denominator: int) -> None:
    with pytest.raises(ValueError):
        div_round_half_even(5, denominator)


def test_ceil_div_rounds_up() -> None:
    assert ceil_div(7, 2) == 4
    assert ceil_div(6, 2) == 3
    assert ceil_div(0, 2) == 0


# --- fen ---------------------------------------------------------------------------------


def test_format_fen_rounds_half_down_to_even_fen() -> None:
    assert format_fen(12_345_000_000) == "12.34"  # 12.345 → 12.34


def test_format_fen_rounds_half_up_to_even_fen() -> None:
    assert format_fen(12_355_000_000) == "12.36"  # 12.355 → 12.36


def test_format_fen_rounds_just_above_half_up() -> None:
    assert format_fen(12_345_000_001) == "12.35"


def test_format_fen_rounds_just_below_half_down() -> None:
    assert format_fen(12_354_999_999) == "12.35"


def test_format_fen_has_two_places() -> None:
    assert format_fen(3 * NANO_PER_CNY) == "3.00"


def test_format_fen_of_negative_amount() -> None:
    assert format_fen(-12_345_000_000) == "-12.34"
    assert format_fen(-4_999_999) == "0.00"


def test_nano_to_fen_counts_whole_fen() -> None:
    assert nano_to_fen(NANO_PER_CNY) == 100
