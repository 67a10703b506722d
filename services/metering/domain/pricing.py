"""Price rows and the two ways a call is paid for: PAYG money and package tokens."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum

from services.contracts.money import PPM, ceil_div, div_round_half_even


class Tier(IntEnum):
    free = 0
    developer = 1
    enterprise = 2


TIERS = tuple(t.name for t in Tier)


@dataclass(frozen=True, slots=True)
class PriceRow:
    """One version of a model's price. Prices are nano-CNY per token (= milli-CNY per 1M)."""

    price_id: int
    model: str
    effective_from: datetime
    input_price: int
    output_price: int
    cached_input_price: int
    per_request_fee: int
    batch_discount_ppm: int
    package_weight_ppm: int
    min_tier: str = "free"


class PriceBook:
    """All price versions, per model, ordered by ``effective_from``."""

    def __init__(self, rows: list[PriceRow]) -> None:
        by_model: dict[str, list[PriceRow]] = {}
        for row in sorted(rows, key=lambda r: (r.model, r.effective_from, r.price_id)):
            by_model.setdefault(row.model, []).append(row)
        self._rows = by_model
        self._starts = {m: [r.effective_from for r in rs] for m, rs in by_model.items()}

    def knows(self, model: str) -> bool:
        return model in self._rows

    def models(self) -> list[str]:
        return sorted(self._rows)

    def at(self, model: str, moment: datetime) -> PriceRow | None:
        """The row with the latest ``effective_from ≤ moment``; None when none applies yet."""
        starts = self._starts.get(model)
        if not starts:
            return None
        i = bisect.bisect_right(starts, moment)
        return self._rows[model][i - 1] if i else None


def payg_charge(
    price: PriceRow,
    *,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    is_batch: bool,
) -> int:
    """nano-CNY for one event. Exact integers; the batch discount rounds half-to-even once."""
    gross = (
        (prompt_tokens - cached_tokens) * price.input_price
        + cached_tokens * price.cached_input_price
        + completion_tokens * price.output_price
        + price.per_request_fee
    )
    if is_batch and price.batch_discount_ppm:
        return div_round_half_even(gross * (PPM - price.batch_discount_ppm), PPM)
    return gross


def package_deduction(price: PriceRow, total_tokens: int) -> int:
    """Package tokens one event costs: ceil(total_tokens × package_weight)."""
    return ceil_div(total_tokens * price.package_weight_ppm, PPM)
