"""Money and fixed-point units shared by every service.

Inside Tollhouse money is an ``int`` of nano-CNY; it becomes a decimal string only at
the API edge. Fractions that are not money (discounts, package weights) are integers of
parts per million so that every computation stays in integer arithmetic.
"""

from __future__ import annotations

import re

NANO_PER_CNY = 1_000_000_000
PPM = 1_000_000

MONEY_PLACES = 9
PRICE_PLACES = 3
FRACTION_PLACES = 6

# ASCII digits only: in a str pattern \d also matches "١٢" or "１２", which int() would accept.
_DECIMAL = re.compile(r"^(-)?([0-9]{1,15})(?:\.([0-9]+))?$")


class MoneyFormatError(ValueError):
    """A decimal string that is not an acceptable amount; the message says why."""


def _parse_fixed(text: object, places: int, what: str, *, allow_negative: bool) -> int:
    if isinstance(text, bool) or not isinstance(text, str):
        raise MoneyFormatError(
            f"{what} must be a decimal string such as \"12.50\", not a JSON {type(text).__name__}"
        )
    m = _DECIMAL.match(text.strip())
    if m is None:
        raise MoneyFormatError(f"{what} {text!r} is not a decimal number such as \"12.50\"")
    sign, whole, frac = m.group(1), m.group(2), m.group(3) or ""
    if sign and not allow_negative:
        raise MoneyFormatError(f"{what} must not be negative, got {text!r}")
    if len(frac) > places:
        raise MoneyFormatError(
            f"{what} {text!r} has {len(frac)} decimal places; at most {places} are allowed"
        )
    value = int(whole) * 10**places + int(frac.ljust(places, "0") or "0")
    return -value if sign else value


def parse_cny(text: object, what: str = "amount", *, allow_negative: bool = False) -> int:
    """Decimal CNY string → nano-CNY. Refuses floats, and more than 9 decimal places."""
    return _parse_fixed(text, MONEY_PLACES, what, allow_negative=allow_negative)


def parse_price(text: object, what: str = "price") -> int:
    """Price in CNY per 1M tokens (≤ 3 places) → nano-CNY per token.

    P CNY per 1M tokens is P × 1e9 / 1e6 = P × 1000 nano-CNY per token, so a price with
    three decimal places is exactly an integer number of nano-CNY per token.
    """
    return _parse_fixed(text, PRICE_PLACES, what, allow_negative=False)


def parse_fraction_ppm(text: object, what: str, *, maximum_ppm: int | None = None) -> int:
    """Decimal fraction string (``"0.5"``) → parts per million (≤ 6 places)."""
    value = _parse_fixed(text, FRACTION_PLACES, what, allow_negative=False)
    if maximum_ppm is not None and value > maximum_ppm:
        raise MoneyFormatError(f"{what} {text!r} is above {format_fixed(maximum_ppm, FRACTION_PLACES)}")
    return value


def format_fixed(value: int, places: int) -> str:
    sign = "-" if value < 0 else ""
    whole, frac = divmod(abs(value), 10**places)
    if places == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:0{places}d}"


def format_cny(nano: int) -> str:
    """nano-CNY → ``"12.500000000"`` (always 9 places)."""
    return format_fixed(nano, MONEY_PLACES)


def format_price(nano_per_token: int) -> str:
    """nano-CNY per token → CNY per 1M tokens with 3 places."""
    return format_fixed(nano_per_token, PRICE_PLACES)


def format_fraction(ppm: int) -> str:
    """Parts per million → shortest decimal string (``500000`` → ``"0.5"``)."""
    text = format_fixed(ppm, FRACTION_PLACES).rstrip("0")
    return text + "0" if text.endswith(".") else text


def div_round_half_even(numerator: int, denominator: int) -> int:
    """Integer division rounded half-to-even (banker's rounding), exact for any size."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    q, r = divmod(numerator, denominator)
    twice = 2 * r
    if twice > denominator or (twice == denominator and q % 2 == 1):
        q += 1
    return q


def nano_to_fen(nano: int) -> int:
    """nano-CNY → whole fen (0.01 CNY), rounded half-to-even, for people."""
    return div_round_half_even(nano, NANO_PER_CNY // 100)


def format_fen(nano: int) -> str:
    """nano-CNY → ``"12.50"``, rounded half-to-even to the fen."""
    return format_fixed(nano_to_fen(nano), 2)


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)
