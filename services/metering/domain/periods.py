"""Local days and months: spend caps roll over at the account's midnight, not UTC's."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

DEFAULT_TIMEZONE = "Asia/Shanghai"


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def is_valid_timezone(name: str) -> bool:
    if not isinstance(name, str) or not name or name not in _known_zones():
        return False
    try:
        zone(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


@lru_cache(maxsize=1)
def _known_zones() -> frozenset[str]:
    return frozenset(available_timezones())


# Every UTC offset in use today is a whole number of quarter hours, and so are the instants
# of DST changes: the local date is constant within each 15-minute slice of UTC time since
# 1980 (Africa/Monrovia was UTC-0:44:30 until 1972, Pacific/Kiritimati UTC-10:40 until
# 1979). Rating asks for it once per event, so it is remembered per (zone, slice).
_SLICE_SECONDS = 900
_SLICES_SAFE_FROM = 315_532_800  # 1980-01-01T00:00:00Z
_DAY_CACHE: dict[tuple[str, int], date] = {}
_DAY_CACHE_MAX = 200_000


def local_day(moment: datetime, tz: str) -> date:
    """The date in zone ``tz`` at the aware instant ``moment``."""
    seconds = moment.timestamp()
    if seconds < _SLICES_SAFE_FROM:  # before 1980 offsets were not all quarter hours
        return moment.astimezone(zone(tz)).date()
    key = (tz, int(seconds // _SLICE_SECONDS))
    day = _DAY_CACHE.get(key)
    if day is None:
        if len(_DAY_CACHE) >= _DAY_CACHE_MAX:
            _DAY_CACHE.clear()
        day = _DAY_CACHE[key] = moment.astimezone(zone(tz)).date()
    return day


@lru_cache(maxsize=4096)  # rating asks once or twice per event; date.replace is slow
def month_of(day: date) -> date:
    return day.replace(day=1)


def next_month(first: date) -> date:
    return date(first.year + (first.month == 12), first.month % 12 + 1, 1)


def local_midnight(day: date, tz: str) -> datetime:
    """The instant (UTC) at which the local ``day`` begins (DST-safe)."""
    return datetime.combine(day, time(0), zone(tz)).astimezone(timezone.utc)


def day_resets_at(moment: datetime, tz: str) -> datetime:
    return local_midnight(local_day(moment, tz) + timedelta(days=1), tz)


def month_resets_at(moment: datetime, tz: str) -> datetime:
    return local_midnight(next_month(month_of(local_day(moment, tz))), tz)


def day_period(day: date) -> str:
    return day.isoformat()


def month_period(first: date) -> str:
    return first.strftime("%Y-%m")
