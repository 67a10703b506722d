"""Booking usage events as production does (produced to the real broker, rated and written by
the real consumer), and an independent reference for what they should cost.

The reference uses plain integers and zoneinfo, not the rating module: prices are whole CNY
per 1M tokens, so a token costs ``price × 1000`` nano-CNY.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from zoneinfo import ZoneInfo

from services.contracts.events import UsageEvent, encode_event
from services.settings import Settings
from tests.support import seed
from tests.support.kafka import consume_until, create_topics, produce

NANO = 10**9

# model → (input, output, cached input) in CNY per 1M tokens.
PRICES = {
    "chat-s": (2, 8, 1),
    "chat-l": (30, 60, 15),
}


def seed_prices(url: str) -> None:
    for model, (inp, out, cached) in PRICES.items():
        seed.add_price(url, model, input_price=inp * 1000, output_price=out * 1000, cached_input_price=cached * 1000)


def charge_of(model: str, prompt: int, completion: int, cached: int) -> int:
    inp, out, cached_price = PRICES[model]
    return ((prompt - cached) * inp + cached * cached_price + completion * out) * 1000


def package_deduction(total_tokens: int) -> int:
    return math.ceil(total_tokens * 1)  # every seeded price has package_weight 1


def local_day(moment: datetime, tz: str) -> date:
    return moment.astimezone(ZoneInfo(tz)).date()


def cny(nano: int) -> str:
    """nano-CNY → the API's decimal string, computed with Decimal (not the money module)."""
    return f"{Decimal(nano).scaleb(-9):.9f}"


def fen(nano: int) -> str:
    rounded = Decimal(nano).scaleb(-9).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
    return f"{rounded + 0:.2f}"  # + 0: a tiny negative charge rounds to "0.00", not "-0.00"


@dataclass
class Booked:
    """One event as the reference sees it."""

    event: UsageEvent
    account_id: str
    key_id: str
    model: str
    time: datetime
    day: date
    charge: int = 0  # PAYG charge (0 for package keys)
    package_tokens: int = 0  # deducted from the package
    overage_tokens: int = 0
    overage_charge: int = 0


async def book(settings: Settings, url: str, events: Iterable[UsageEvent]) -> None:
    """Produce ``events`` in order to one partition and run the consumer until all are booked."""
    events = list(events)
    await create_topics(settings)
    await produce(
        settings.kafka_bootstrap_servers,
        settings.usage_topic,
        [(e.data.account_id.encode(), encode_event(e)) for e in events],
    )
    consumer = await consume_until(settings, url, lambda c: c.totals.received >= len(events))
    assert consumer.totals.accepted == len(events), consumer.totals
    assert consumer.totals.dead_lettered == 0, consumer.totals
