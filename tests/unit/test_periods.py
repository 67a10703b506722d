"""Local days and months in the account's IANA zone (DESIGN §2), across DST changes."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.metering.domain.periods import (
    DEFAULT_TIMEZONE,
    day_period,
    day_resets_at,
    is_valid_timezone,
    local_day,
    local_midnight,
    month_of,
    month_period,
    month_resets_at,
    next_month,
)

UTC = timezone.utc
SHANGHAI = "Asia/Shanghai"
NEW_YORK = "America/New_York"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def day_length(day: date, tz: str) -> timedelta:
    return local_midnight(day + timedelta(days=1), tz) - local_midnight(day, tz)


# --- Asia/Shanghai (UTC+8, no DST) -------------------------------------------------------


def test_default_timezone_is_shanghai() -> None:
    assert DEFAULT_TIMEZONE == SHANGHAI


def test_shanghai_day_starts_at_16_utc_the_day_before() -> None:
    assert local_midnight(date(2026, 11, 22), SHANGHAI) == utc(2026, 11, 21, 16)


def test_shanghai_local_day_is_ahead_of_utc_in_the_evening_utc() -> None:
    assert local_day(utc(2026, 11, 22, 16, 0), SHANGHAI) == date(2026, 11, 23)


def test_shanghai_last_instant_before_local_midnight_is_the_old_day() -> None:
    assert local_day(utc(2026, 11, 22, 15, 59, 59, 999999), SHANGHAI) == date(2026, 11, 22)


def test_local_day_accepts_times_written_with_any_offset() -> None:
    new_york_evening = datetime(2026, 11, 22, 20, 0, tzinfo=timezone(timedelta(hours=-5)))  # 01:00Z on the 23rd
    assert local_day(new_york_evening, SHANGHAI) == date(2026, 11, 23)


def test_shanghai_day_resets_at_next_local_midnight() -> None:
    assert day_resets_at(utc(2026, 11, 22, 2, 0), SHANGHAI) == utc(2026, 11, 22, 16)


def test_shanghai_day_resets_at_is_strictly_after_an_event_at_local_midnight() -> None:
    assert day_resets_at(utc(2026, 11, 21, 16, 0), SHANGHAI) == utc(2026, 11, 22, 16)


def test_shanghai_days_are_24_hours() -> None:
    assert day_length(date(2026, 3, 8), SHANGHAI) == timedelta(hours=24)


def test_event_at_2330_local_on_last_day_of_month_belongs_to_that_month() -> None:
    moment = utc(2026, 11, 30, 15, 30)  # 23:30 on 30 November in Shanghai
    assert month_period(month_of(local_day(moment, SHANGHAI))) == "2026-11"


def test_event_at_local_midnight_after_last_day_belongs_to_next_month() -> None:
    moment = utc(2026, 11, 30, 16, 0)  # 00:00 on 1 December in Shanghai, still November in UTC
    assert month_period(month_of(local_day(moment, SHANGHAI))) == "2026-12"


def test_month_resets_at_local_midnight_of_the_first() -> None:
    assert month_resets_at(utc(2026, 11, 30, 15, 30), SHANGHAI) == utc(2026, 11, 30, 16)


def test_month_resets_at_rolls_over_the_year() -> None:
    assert month_resets_at(utc(2026, 12, 15), SHANGHAI) == utc(2026, 12, 31, 16)


def test_event_on_new_years_eve_local_belongs_to_december() -> None:
    assert month_of(local_day(utc(2026, 12, 31, 15, 59), SHANGHAI)) == date(2026, 12, 1)
    assert month_of(local_day(utc(2026, 12, 31, 16, 0), SHANGHAI)) == date(2027, 1, 1)


def test_february_month_rolls_over_to_march() -> None:
    assert month_resets_at(utc(2028, 2, 29, 12), SHANGHAI) == utc(2028, 2, 29, 16)


# --- America/New_York (DST) --------------------------------------------------------------


def test_new_york_spring_forward_day_is_23_hours() -> None:
    assert day_length(date(2026, 3, 8), NEW_YORK) == timedelta(hours=23)


def test_new_york_fall_back_day_is_25_hours() -> None:
    assert day_length(date(2026, 11, 1), NEW_YORK) == timedelta(hours=25)


def test_new_york_ordinary_day_is_24_hours() -> None:
    assert day_length(date(2026, 3, 7), NEW_YORK) == timedelta(hours=24)


def test_new_york_spring_forward_day_starts_in_standard_time() -> None:
    assert local_midnight(date(2026, 3, 8), NEW_YORK) == utc(2026, 3, 8, 5)


def test_new_york_spring_forward_day_resets_at_midnight_daylight_time() -> None:
    after_the_jump = utc(2026, 3, 8, 12)  # 08:00 EDT
    assert day_resets_at(after_the_jump, NEW_YORK) == utc(2026, 3, 9, 4)


def test_new_york_spring_forward_day_resets_the_same_before_the_jump() -> None:
    before_the_jump = utc(2026, 3, 8, 6, 30)  # 01:30 EST
    assert day_resets_at(before_the_jump, NEW_YORK) == utc(2026, 3, 9, 4)


def test_new_york_late_evening_after_spring_forward_is_still_that_day() -> None:
    assert local_day(utc(2026, 3, 9, 3, 59), NEW_YORK) == date(2026, 3, 8)  # 23:59 EDT
    assert local_day(utc(2026, 3, 9, 4, 0), NEW_YORK) == date(2026, 3, 9)


def test_new_york_fall_back_day_resets_at_midnight_standard_time() -> None:
    assert day_resets_at(utc(2026, 11, 1, 12), NEW_YORK) == utc(2026, 11, 2, 5)


def test_new_york_repeated_hour_belongs_to_the_same_day() -> None:
    first_0130 = utc(2026, 11, 1, 5, 30)  # 01:30 EDT
    second_0130 = utc(2026, 11, 1, 6, 30)  # 01:30 EST
    assert local_day(first_0130, NEW_YORK) == local_day(second_0130, NEW_YORK) == date(2026, 11, 1)
    assert day_resets_at(first_0130, NEW_YORK) == day_resets_at(second_0130, NEW_YORK) == utc(2026, 11, 2, 5)


def test_new_york_late_evening_after_fall_back_is_still_that_day() -> None:
    assert local_day(utc(2026, 11, 2, 4, 59), NEW_YORK) == date(2026, 11, 1)  # 23:59 EST
    assert local_day(utc(2026, 11, 2, 5, 0), NEW_YORK) == date(2026, 11, 2)


def test_new_york_event_at_2330_on_october_31_belongs_to_october() -> None:
    moment = utc(2026, 11, 1, 3, 30)  # 23:30 EDT on 31 October, already November in UTC
    assert month_period(month_of(local_day(moment, NEW_YORK))) == "2026-10"


def test_new_york_october_resets_at_local_midnight_daylight_time() -> None:
    assert month_resets_at(utc(2026, 10, 15), NEW_YORK) == utc(2026, 11, 1, 4)


def test_new_york_november_resets_at_local_midnight_standard_time() -> None:
    assert month_resets_at(utc(2026, 11, 15), NEW_YORK) == utc(2026, 12, 1, 5)


def test_new_york_march_is_one_hour_short() -> None:
    march = local_midnight(date(2026, 4, 1), NEW_YORK) - local_midnight(date(2026, 3, 1), NEW_YORK)
    assert march == timedelta(days=31, hours=-1)


# --- a zone whose midnight does not exist -----------------------------------------------


def test_day_without_a_midnight_starts_at_its_first_instant() -> None:
    # Santiago jumps from 00:00 -04 to 01:00 -03 on 2026-09-06
    start = local_midnight(date(2026, 9, 6), "America/Santiago")
    assert start == utc(2026, 9, 6, 4)
    assert local_day(start, "America/Santiago") == date(2026, 9, 6)
    assert local_day(start - timedelta(microseconds=1), "America/Santiago") == date(2026, 9, 5)


def test_day_before_a_missing_midnight_resets_at_the_first_instant_of_the_next() -> None:
    assert day_resets_at(utc(2026, 9, 5, 12), "America/Santiago") == utc(2026, 9, 6, 4)


# --- helpers -----------------------------------------------------------------------------


def test_month_of_is_the_first_of_the_month() -> None:
    assert month_of(date(2026, 11, 22)) == date(2026, 11, 1)


@pytest.mark.parametrize(
    ("first", "expected"),
    [(date(2026, 1, 1), date(2026, 2, 1)), (date(2026, 11, 1), date(2026, 12, 1)), (date(2026, 12, 1), date(2027, 1, 1))],
)
def test_next_month(first: date, expected: date) -> None:
    assert next_month(first) == expected


def test_period_names() -> None:
    assert day_period(date(2026, 3, 8)) == "2026-03-08"
    assert month_period(date(2026, 3, 1)) == "2026-03"


def test_resets_at_is_in_utc() -> None:
    assert day_resets_at(utc(2026, 11, 22), SHANGHAI).utcoffset() == timedelta(0)
    assert month_resets_at(utc(2026, 11, 22), NEW_YORK).utcoffset() == timedelta(0)


@pytest.mark.parametrize("name", [SHANGHAI, NEW_YORK, "UTC", "Europe/London"])
def test_known_iana_zones_are_valid(name: str) -> None:
    assert is_valid_timezone(name)


@pytest.mark.parametrize("name", ["", "Mars/Olympus", "asia/shanghai", "+08:00", "../../etc/passwd", None, 8])
def test_unknown_zones_are_invalid(name: object) -> None:
    assert not is_valid_timezone(name)  # type: ignore[arg-type]


# --- local_day against zoneinfo, every zone ----------------------------------------------


def test_local_day_is_right_on_both_sides_of_a_midnight_off_the_quarter_hour() -> None:
    # Pacific/Kiritimati was UTC-10:40 until 1979: local midnight fell at hh:40 UTC, inside
    # a 15-minute slice of UTC, so both halves of that slice must still get their own day.
    before, after = utc(1975, 6, 1, 10, 35), utc(1975, 6, 1, 10, 41)
    assert local_day(before, "Pacific/Kiritimati") == date(1975, 5, 31)
    assert local_day(after, "Pacific/Kiritimati") == date(1975, 6, 1)


def test_local_day_is_right_on_both_sides_of_a_monrovia_midnight_in_1971() -> None:
    # Africa/Monrovia was UTC-0:44:30 until 1972
    before, after = utc(1971, 3, 1, 0, 44, 29), utc(1971, 3, 1, 0, 44, 30)
    assert local_day(before, "Africa/Monrovia") == date(1971, 2, 28)
    assert local_day(after, "Africa/Monrovia") == date(1971, 3, 1)


def test_local_day_in_a_quarter_hour_zone_turns_at_its_midnight() -> None:
    # Asia/Kathmandu is UTC+5:45: midnight is 18:15 UTC
    assert local_day(utc(2026, 11, 21, 18, 14, 59), "Asia/Kathmandu") == date(2026, 11, 21)
    assert local_day(utc(2026, 11, 21, 18, 15), "Asia/Kathmandu") == date(2026, 11, 22)


def test_local_day_turns_at_chatham_midnight_in_daylight_time() -> None:
    # Pacific/Chatham is UTC+13:45 in (southern) summer: midnight is 10:15 UTC
    assert local_day(utc(2026, 1, 10, 10, 14, 59), "Pacific/Chatham") == date(2026, 1, 10)
    assert local_day(utc(2026, 1, 10, 10, 15), "Pacific/Chatham") == date(2026, 1, 11)


_ALL_ZONES = sorted(available_timezones())


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    st.sampled_from(_ALL_ZONES),
    st.integers(-(10**9), 4 * 10**9),  # seconds since 1970: from 1938 to 2096
    st.integers(0, 899),
)
def test_local_day_agrees_with_zoneinfo_for_instants_close_together(name: str, seconds: int, step: int) -> None:
    first = datetime.fromtimestamp(seconds, UTC)
    second = first + timedelta(seconds=step)
    for moment in (first, second):
        assert local_day(moment, name) == moment.astimezone(ZoneInfo(name)).date()
