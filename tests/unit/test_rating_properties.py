"""Rating against a deliberately plain reference model, on random event sequences.

The reference below is a straight loop with ``Fraction`` arithmetic and ``zoneinfo``: it
shares no code with ``services.metering.domain`` beyond the state dataclasses it feeds in.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from fractions import Fraction
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.metering.domain.pricing import PriceRow, payg_charge
from services.metering.domain.rating import (
    BALANCE_DEPLETED,
    DAILY_CAP,
    MONTHLY_CAP,
    PACKAGE,
    PACKAGE_EXHAUSTED,
    PACKAGE_EXPIRED,
    PAYG,
    AccountState,
    Breach,
    KeyState,
    PackageState,
    Rating,
    Usage,
    apply_topup,
    rate_usage,
)

UTC = timezone.utc
MILLION = 1_000_000

# Deterministic and database-less so CI sees the same examples every run.
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Starts chosen so that five days cross a DST change and/or a month end.
STARTS = [
    datetime(2026, 3, 6, 12, tzinfo=UTC),  # New York springs forward on 2026-03-08
    datetime(2026, 10, 29, 12, tzinfo=UTC),  # October ends; New York falls back on 2026-11-01
    datetime(2026, 11, 28, 0, tzinfo=UTC),  # November ends
]
ZONES = ["Asia/Shanghai", "America/New_York"]
SPAN_SECONDS = 5 * 86_400


# --- scenario ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    key_index: int
    offset_seconds: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    is_batch: bool


@dataclass(frozen=True)
class TopUp:
    amount: int


@dataclass(frozen=True)
class KeySpec:
    billing_mode: str
    daily_cap: int
    monthly_cap: int


@dataclass
class Scenario:
    tz: str
    start: datetime
    price: PriceRow
    balance: int
    keys: list[KeySpec]
    package_total: int
    package_from: int  # offsets in seconds from start
    package_until: int
    actions: list[Call | TopUp]

    def moment(self, offset_seconds: int) -> datetime:
        return self.start + timedelta(seconds=offset_seconds)


prices = st.builds(
    PriceRow,
    price_id=st.just(1),
    model=st.just("m"),
    effective_from=st.just(datetime(2026, 1, 1, tzinfo=UTC)),
    input_price=st.integers(0, 20_000),
    output_price=st.integers(0, 60_000),
    cached_input_price=st.integers(0, 20_000),
    per_request_fee=st.one_of(st.just(0), st.integers(0, 5_000_000)),
    batch_discount_ppm=st.one_of(st.just(0), st.just(500_000), st.integers(0, MILLION)),
    package_weight_ppm=st.one_of(st.just(MILLION), st.just(1_500_000), st.just(333_333), st.integers(0, 3 * MILLION)),
)

caps = st.one_of(st.just(0), st.integers(1, 2_000_000_000))


EDGE_MARKERS = (-1, -2, -3, -4)  # stand for the package's boundaries, resolved per scenario


def _call(parts: tuple[int, int, int, int, int, bool]) -> Call:
    key_index, offset, prompt, cached_permille, completion, is_batch = parts
    return Call(key_index, offset, prompt, prompt * cached_permille // 1000, completion, is_batch)


# Built once, from flat tuples of plain draws: generation is most of these tests' time.
CALLS = st.tuples(
    st.integers(0, 2),  # taken modulo the number of keys
    # now and then exactly on (or just before) a package boundary
    st.one_of(st.integers(0, SPAN_SECONDS), st.integers(0, SPAN_SECONDS), st.sampled_from(EDGE_MARKERS)),
    st.integers(0, 50_000),
    st.one_of(st.just(0), st.integers(0, 1000)),
    st.integers(0, 20_000),
    st.booleans(),
).map(_call)
TOPUPS = st.builds(TopUp, amount=st.integers(1, 3_000_000_000))
ACTIONS = st.lists(st.one_of(CALLS, CALLS, CALLS, TOPUPS), min_size=1, max_size=16)
CALLS_ONLY = st.lists(CALLS, min_size=1, max_size=16)
KEYS = {
    modes: st.lists(st.builds(KeySpec, billing_mode=st.sampled_from(modes), daily_cap=caps, monthly_cap=caps),
                    min_size=1, max_size=3)
    for modes in ((PAYG, PACKAGE), (PAYG,), (PACKAGE,))
}


def _resolve(action: Call | TopUp, key_count: int, edges: list[int]) -> Call | TopUp:
    if isinstance(action, TopUp):
        return action
    offset = edges[-1 - action.offset_seconds] if action.offset_seconds < 0 else action.offset_seconds
    return Call(action.key_index % key_count, offset, action.prompt_tokens, action.cached_tokens,
                action.completion_tokens, action.is_batch)


@st.composite
def scenarios(draw: st.DrawFn, *, modes: tuple[str, ...] = (PAYG, PACKAGE), topups: bool = True) -> Scenario:
    keys = draw(KEYS[modes])
    package_from = draw(st.integers(-86_400, SPAN_SECONDS))
    package_until = package_from + draw(st.integers(1, 4 * 86_400))
    edges = [package_from, package_from - 1, package_until, package_until - 1]
    actions = [_resolve(a, len(keys), edges) for a in draw(ACTIONS if topups else CALLS_ONLY)]
    price = draw(prices)
    balance = draw(st.integers(-1_000_000_000, 5_000_000_000))
    if draw(st.booleans()):
        # Random caps and balances are almost never hit exactly; these are: a cap equal to
        # a key's first charge(s), a balance equal to the first charge.
        keys = [_exact_caps(spec, i, price, actions) for i, spec in enumerate(keys)]
        first = next((a for a in actions if isinstance(a, Call)), None)
        if first is not None:
            balance = reference_charge(price, first)
    return Scenario(
        tz=draw(st.sampled_from(ZONES)),
        start=draw(st.sampled_from(STARTS)),
        price=price,
        balance=balance,
        keys=keys,
        package_total=draw(st.integers(1, 300_000)),
        package_from=package_from,
        package_until=package_until,
        actions=actions,
    )


def _exact_caps(spec: KeySpec, index: int, price: PriceRow, actions: list[Call | TopUp]) -> KeySpec:
    charges = [reference_charge(price, a) for a in actions if isinstance(a, Call) and a.key_index == index]
    if spec.billing_mode != PAYG or not charges:
        return spec
    return KeySpec(spec.billing_mode, daily_cap=charges[0], monthly_cap=sum(charges[:2]))


# --- running the code under test -------------------------------------------------------------


@dataclass
class Outcome:
    ratings: list[tuple[Call, Rating, str]] = field(default_factory=list)  # (call, rating, event_id)
    breaches: list[Breach] = field(default_factory=list)
    package: PackageState | None = None
    keys: list[KeyState] = field(default_factory=list)


def run(scenario: Scenario) -> Outcome:
    account = AccountState(account_id="acc", timezone=scenario.tz, balance=scenario.balance)
    package = PackageState(
        package_id="pkg", account_id="acc", tokens_total=scenario.package_total, tokens_used=0,
        valid_from=scenario.moment(scenario.package_from), valid_until=scenario.moment(scenario.package_until),
    )
    keys = [
        KeyState(key_id=f"key_{i}", account_id="acc", billing_mode=spec.billing_mode,
                 package_id="pkg" if spec.billing_mode == PACKAGE else None,
                 daily_cap=spec.daily_cap, monthly_cap=spec.monthly_cap)
        for i, spec in enumerate(scenario.keys)
    ]
    outcome = Outcome(package=package, keys=keys)
    for n, action in enumerate(scenario.actions):
        if isinstance(action, TopUp):
            apply_topup(account, action.amount)
            continue
        event_id = f"ev_{n}"
        usage = Usage(
            event_id=event_id, event_time=scenario.moment(action.offset_seconds), is_batch=action.is_batch,
            prompt_tokens=action.prompt_tokens, completion_tokens=action.completion_tokens,
            total_tokens=action.prompt_tokens + action.completion_tokens, cached_tokens=action.cached_tokens,
        )
        key = keys[action.key_index]
        rating = rate_usage(usage, account=account, key=key, package=package if key.package_id else None,
                            price=scenario.price, breaches=outcome.breaches)
        outcome.ratings.append((action, rating, event_id))
    return outcome


# --- the reference model -----------------------------------------------------------------


def reference_charge(price: PriceRow, call: Call) -> int:
    gross = (
        (call.prompt_tokens - call.cached_tokens) * price.input_price
        + call.cached_tokens * price.cached_input_price
        + call.completion_tokens * price.output_price
        + price.per_request_fee
    )
    if not call.is_batch:
        return gross
    return round(Fraction(gross) * (1 - Fraction(price.batch_discount_ppm, MILLION)))  # round() is half-even


def reference_deduction(price: PriceRow, call: Call) -> int:
    total = call.prompt_tokens + call.completion_tokens
    return math.ceil(Fraction(total * price.package_weight_ppm, MILLION))


def reference_local_day(scenario: Scenario, call: Call) -> date:
    return scenario.moment(call.offset_seconds).astimezone(ZoneInfo(scenario.tz)).date()


@dataclass
class Reference:
    charges: list[int] = field(default_factory=list)  # one per call, 0 for package keys
    overage_charges: list[int] = field(default_factory=list)
    depleted_by: list[str] = field(default_factory=list)
    # (key_id, cap type, period) → (event_id, spend, cap) of the first event whose cumulative spend reached the cap
    cap_breaches: dict[tuple[str, str, str], tuple[str, int, int]] = field(default_factory=dict)
    spend: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (key_id, cap type, period) → sum
    package_tokens: list[int] = field(default_factory=list)
    overage_tokens: list[int] = field(default_factory=list)
    deductions: list[int] = field(default_factory=list)
    in_window_deductions: int = 0
    exhausted_by: str | None = None
    any_outside_window: bool = False


def reference(scenario: Scenario) -> Reference:
    ref = Reference()
    balance, armed = scenario.balance, True
    spend: dict[tuple[str, str, str], int] = defaultdict(int)
    ref.spend = spend
    left = scenario.package_total
    valid_from, valid_until = scenario.moment(scenario.package_from), scenario.moment(scenario.package_until)
    for n, action in enumerate(scenario.actions):
        if isinstance(action, TopUp):
            balance += action.amount
            if balance > 0:
                armed = True
            continue
        event_id, spec = f"ev_{n}", scenario.keys[action.key_index]
        key_id = f"key_{action.key_index}"
        deduction = reference_deduction(scenario.price, action)
        if spec.billing_mode == PACKAGE:
            ref.charges.append(0)
            ref.overage_charges.append(0)
            ref.deductions.append(deduction)
            if valid_from <= scenario.moment(action.offset_seconds) < valid_until:
                taken = min(left, deduction)
                left -= taken
                ref.in_window_deductions += deduction
                if ref.exhausted_by is None and ref.in_window_deductions >= scenario.package_total:
                    ref.exhausted_by = event_id
            else:
                taken = 0
                ref.any_outside_window = True
            ref.package_tokens.append(taken)
            ref.overage_tokens.append(deduction - taken)
            continue
        charge = reference_charge(scenario.price, action)
        ref.charges.append(charge)
        ref.deductions.append(0)
        ref.package_tokens.append(0)
        ref.overage_tokens.append(0)
        below_zero_before = max(0, -balance)
        balance -= charge
        ref.overage_charges.append(max(0, -balance) - below_zero_before)
        if charge > 0 and balance <= 0 and armed:
            armed = False
            ref.depleted_by.append(event_id)
        day = reference_local_day(scenario, action)
        for cap_type, cap, period in (
            (DAILY_CAP, spec.daily_cap, day.isoformat()),
            (MONTHLY_CAP, spec.monthly_cap, f"{day.year:04d}-{day.month:02d}"),
        ):
            bucket = (key_id, cap_type, period)
            spend[bucket] += charge
            if cap > 0 and spend[bucket] >= cap and bucket not in ref.cap_breaches:
                ref.cap_breaches[bucket] = (event_id, spend[bucket], cap)
    return ref


def calls_only(scenario: Scenario) -> list[Call]:
    return [a for a in scenario.actions if isinstance(a, Call)]


# --- PAYG properties ---------------------------------------------------------------------


@PROPERTY
@given(scenarios())
def test_sum_of_charges_equals_reference(scenario: Scenario) -> None:
    outcome, ref = run(scenario), reference(scenario)
    assert sum(r.charge for _, r, _ in outcome.ratings) == sum(ref.charges)


@PROPERTY
@given(scenarios())
def test_each_charge_equals_reference(scenario: Scenario) -> None:
    outcome, ref = run(scenario), reference(scenario)
    assert [r.charge for _, r, _ in outcome.ratings] == ref.charges


@PROPERTY
@given(scenarios())
def test_every_amount_is_an_int(scenario: Scenario) -> None:
    for _, rating, _ in run(scenario).ratings:
        for value in (rating.charge, rating.overage_charge, rating.package_tokens, rating.overage_tokens):
            assert type(value) is int


@PROPERTY
@given(scenarios())
def test_overage_charge_is_the_part_of_each_charge_below_zero(scenario: Scenario) -> None:
    outcome, ref = run(scenario), reference(scenario)
    assert [r.overage_charge for _, r, _ in outcome.ratings] == ref.overage_charges


@PROPERTY
@given(scenarios())
def test_balance_depleted_follows_reference(scenario: Scenario) -> None:
    outcome, ref = run(scenario), reference(scenario)
    assert [b.event_id for b in outcome.breaches if b.type == BALANCE_DEPLETED] == ref.depleted_by


@PROPERTY
@given(scenarios())
def test_each_event_is_booked_on_the_accounts_local_day(scenario: Scenario) -> None:
    for call, rating, _ in run(scenario).ratings:
        assert rating.local_day == reference_local_day(scenario, call)


@PROPERTY
@given(scenarios(modes=(PAYG,)))
def test_daily_and_monthly_spend_equal_reference_sums(scenario: Scenario) -> None:
    outcome, ref = run(scenario), reference(scenario)
    actual = {}
    for key in outcome.keys:
        for day, state in key.daily.items():
            actual[(key.key_id, DAILY_CAP, day.isoformat())] = state.spend
        for first, state in key.monthly.items():
            actual[(key.key_id, MONTHLY_CAP, f"{first.year:04d}-{first.month:02d}")] = state.spend
    assert actual == ref.spend


@PROPERTY
@given(scenarios())
def test_each_cap_is_breached_at_most_once_per_key_type_and_period(scenario: Scenario) -> None:
    counts = Counter((b.key_id, b.type, b.period) for b in run(scenario).breaches if b.type in (DAILY_CAP, MONTHLY_CAP))
    assert all(n == 1 for n in counts.values())


@PROPERTY
@given(scenarios(modes=(PAYG,)))
def test_cap_breaches_are_exactly_where_reference_spend_reaches_the_cap(scenario: Scenario) -> None:
    outcome, ref = run(scenario), reference(scenario)
    actual = {
        (b.key_id, b.type, b.period): (b.event_id, b.spend, b.cap)
        for b in outcome.breaches if b.type in (DAILY_CAP, MONTHLY_CAP)
    }
    assert actual == ref.cap_breaches


@PROPERTY
@given(scenarios(modes=(PAYG,)))
def test_cap_breach_overshoot_is_spend_minus_cap(scenario: Scenario) -> None:
    for breach in run(scenario).breaches:
        if breach.type in (DAILY_CAP, MONTHLY_CAP):
            assert breach.overshoot == breach.spend - breach.cap >= 0


@PROPERTY
@given(scenarios())
def test_payg_keys_never_book_tokens_and_package_keys_never_book_money(scenario: Scenario) -> None:
    for call, rating, _ in run(scenario).ratings:
        if scenario.keys[call.key_index].billing_mode == PAYG:
            assert (rating.package_id, rating.package_tokens, rating.overage_tokens) == (None, 0, 0)
        else:
            assert (rating.charge, rating.overage_charge) == (0, 0)


@dataclass(frozen=True)
class Tokens:
    prompt: int
    cached: int
    completion: int


tokens = st.integers(0, 10**9).flatmap(
    lambda prompt: st.builds(Tokens, st.just(prompt), st.integers(0, prompt), st.integers(0, 10**9))
)


@PROPERTY
@given(prices, tokens, tokens)
def test_request_charge_without_per_request_fee_is_additive(price: PriceRow, a: Tokens, b: Tokens) -> None:
    price = replace(price, per_request_fee=0)

    def charge(t: Tokens) -> int:
        return payg_charge(price, prompt_tokens=t.prompt, completion_tokens=t.completion,
                           cached_tokens=t.cached, is_batch=False)

    both = Tokens(a.prompt + b.prompt, a.cached + b.cached, a.completion + b.completion)
    assert charge(a) + charge(b) == charge(both)


# --- package properties ------------------------------------------------------------------


@PROPERTY
@given(scenarios(modes=(PACKAGE,), topups=False))
def test_package_tokens_plus_overage_is_the_deduction(scenario: Scenario) -> None:
    outcome, ref = run(scenario), reference(scenario)
    assert [r.package_tokens + r.overage_tokens for _, r, _ in outcome.ratings] == ref.deductions


@PROPERTY
@given(scenarios(modes=(PACKAGE,), topups=False))
def test_package_tokens_follow_reference(scenario: Scenario) -> None:
    outcome, ref = run(scenario), reference(scenario)
    assert [r.package_tokens for _, r, _ in outcome.ratings] == ref.package_tokens


@PROPERTY
@given(scenarios(modes=(PACKAGE,), topups=False))
def test_package_never_gives_more_than_its_total(scenario: Scenario) -> None:
    outcome = run(scenario)
    assert sum(r.package_tokens for _, r, _ in outcome.ratings) <= scenario.package_total
    assert outcome.package is not None
    assert outcome.package.tokens_used == sum(r.package_tokens for _, r, _ in outcome.ratings)


@PROPERTY
@given(scenarios(modes=(PACKAGE,), topups=False))
def test_package_exhausted_once_iff_in_window_deductions_reach_the_total(scenario: Scenario) -> None:
    outcome, ref = run(scenario), reference(scenario)
    exhausted = [b.event_id for b in outcome.breaches if b.type == PACKAGE_EXHAUSTED]
    assert exhausted == ([ref.exhausted_by] if ref.exhausted_by else [])
    assert bool(exhausted) == (ref.in_window_deductions >= scenario.package_total)


@PROPERTY
@given(scenarios(modes=(PACKAGE,), topups=False))
def test_package_expired_once_iff_an_event_falls_outside_the_window(scenario: Scenario) -> None:
    outcome, ref = run(scenario), reference(scenario)
    expired = [b for b in outcome.breaches if b.type == PACKAGE_EXPIRED]
    assert len(expired) == (1 if ref.any_outside_window else 0)


@PROPERTY
@given(scenarios(modes=(PACKAGE,), topups=False))
def test_package_keys_record_no_money_breaches(scenario: Scenario) -> None:
    kinds = {b.type for b in run(scenario).breaches}
    assert kinds <= {PACKAGE_EXHAUSTED, PACKAGE_EXPIRED}
