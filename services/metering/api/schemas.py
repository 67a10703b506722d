"""Request and response bodies of the metering control plane (DESIGN §6.2, §6.5).

Money arrives and leaves as decimal CNY strings; inside it is an ``int`` of nano-CNY, so
request models validate the string with the money helpers and hold the integer. A JSON
number where money is expected is refused, and so is anything the store could not hold
(NUL bytes, lone surrogates, values beyond the column types): bad input is a 400 naming
the field, never a 500.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, WithJsonSchema
from pydantic_core import PydanticCustomError

from services.contracts.money import (
    NANO_PER_CNY,
    PPM,
    MoneyFormatError,
    parse_cny,
    parse_fraction_ppm,
    parse_price,
)
from services.metering.domain.periods import DEFAULT_TIMEZONE, is_valid_timezone

# Limits on what one request may set; each fits its column with room to add up.
MAX_MONEY_NANO = 100_000_000 * NANO_PER_CNY  # 100 million CNY per amount, cap or fee
MAX_PRICE_NANO_PER_TOKEN = 1_000_000 * 1_000  # 1,000,000 CNY per 1M tokens
MAX_PACKAGE_TOKENS = 10**15
MAX_PACKAGE_WEIGHT_PPM = 1_000 * PPM  # prices.package_weight_ppm is a 32-bit integer
MAX_NAME_CHARS = 200
MAX_REFERENCE_CHARS = 200
MAX_MODEL_CHARS = 256
MAX_ID_CHARS = 64
# Times far from now are typos; bounded so that adding a grace period can never overflow.
MIN_YEAR, MAX_YEAR = 1970, 2999

Tier = Literal["free", "developer", "enterprise"]
BillingMode = Literal["package", "payg"]

# Exact, case-sensitive ids such as "gpt-4o", "org/model:v2"; no empty path segments.
MODEL_NAME = re.compile(r"^(?!/)(?!.*//)[A-Za-z0-9._:/-]{1,%d}(?<!/)$" % MAX_MODEL_CHARS)
OBJECT_ID = re.compile(r"^[A-Za-z0-9_-]{1,%d}$" % MAX_ID_CHARS)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})$"
)


def _refuse(message: str, kind: str = "invalid_value") -> PydanticCustomError:
    # The message goes through str.format-like templating; pass it as context, verbatim.
    return PydanticCustomError(kind, "{reason}", {"reason": message})


def _without_subject(exc: MoneyFormatError) -> str:
    """The money helpers start their message with the subject; the field path replaces it."""
    return str(exc).removeprefix("value ")


def _money(value: object, *, positive: bool = False, maximum: int = MAX_MONEY_NANO) -> int:
    try:
        nano = parse_cny(value, "value")
    except MoneyFormatError as exc:
        raise _refuse(_without_subject(exc), "invalid_money") from None
    if positive and nano <= 0:
        raise _refuse(f"must be greater than 0, got {value!r}", "invalid_money")
    if nano > maximum:
        raise _refuse(f"{value!r} is above the limit of {maximum // NANO_PER_CNY} CNY", "invalid_money")
    return nano


def _cny(value: object) -> int:
    return _money(value)


def _positive_cny(value: object) -> int:
    return _money(value, positive=True)


def _price(value: object) -> int:
    try:
        nano_per_token = parse_price(value, "value")
    except MoneyFormatError as exc:
        raise _refuse(_without_subject(exc), "invalid_price") from None
    if nano_per_token > MAX_PRICE_NANO_PER_TOKEN:
        raise _refuse(
            f"{value!r} is above the limit of {MAX_PRICE_NANO_PER_TOKEN // 1000} CNY per 1M tokens",
            "invalid_price",
        )
    return nano_per_token


def _discount(value: object) -> int:
    try:
        return parse_fraction_ppm(value, "value", maximum_ppm=PPM)
    except MoneyFormatError as exc:
        raise _refuse(_without_subject(exc), "invalid_fraction") from None


def _weight(value: object) -> int:
    try:
        ppm = parse_fraction_ppm(value, "value", maximum_ppm=MAX_PACKAGE_WEIGHT_PPM)
    except MoneyFormatError as exc:
        raise _refuse(_without_subject(exc), "invalid_fraction") from None
    if ppm <= 0:
        raise _refuse(f"must be greater than 0, got {value!r}", "invalid_fraction")
    return ppm


def check_text(value: object, max_chars: int) -> str:
    """A person-written string the database can store: non-blank, bounded, printable."""
    if not isinstance(value, str):
        raise _refuse(f"must be a JSON string, not a JSON {type(value).__name__}", "string_type")
    if not value.strip():
        raise _refuse("must not be empty", "string_empty")
    if len(value) > max_chars:
        raise _refuse(f"is {len(value)} characters long; at most {max_chars} are allowed", "string_too_long")
    if _CONTROL.search(value):
        raise _refuse("must not contain control characters", "string_control")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _refuse("must be valid Unicode text (no lone surrogates)", "string_unicode") from None
    return value


def check_object_id(value: object) -> str:
    if not isinstance(value, str):
        raise _refuse(f"must be a JSON string, not a JSON {type(value).__name__}", "string_type")
    if not OBJECT_ID.match(value):
        raise _refuse(f"{value[:80]!r} is not an id such as 'pkg_01JD8ZK3…'", "invalid_id")
    return value


def check_model_name(value: object) -> str:
    if not isinstance(value, str):
        raise _refuse(f"must be a JSON string, not a JSON {type(value).__name__}", "string_type")
    if not MODEL_NAME.match(value):
        raise _refuse(
            f"{value[:80]!r} is not a model name: 1 to {MAX_MODEL_CHARS} characters of letters, digits and"
            " . _ - : / (not starting or ending with /)",
            "invalid_model",
        )
    return value


def _timezone(value: object) -> str:
    if not isinstance(value, str):
        raise _refuse(f"must be a JSON string, not a JSON {type(value).__name__}", "string_type")
    if len(value) > 64 or not is_valid_timezone(value):
        raise _refuse(f"{value[:80]!r} is not an IANA time zone name such as 'Asia/Shanghai'", "invalid_timezone")
    return value


def parse_rfc3339(value: object) -> datetime:
    """RFC 3339 timestamp with an offset (``Z`` or ``±hh:mm``) → aware UTC datetime."""
    if not isinstance(value, str):
        raise _refuse(
            f"must be an RFC 3339 string such as '2026-11-22T10:00:00+08:00', not a JSON {type(value).__name__}",
            "invalid_timestamp",
        )
    text = value.strip().upper()
    if not _RFC3339.match(text):
        raise _refuse(
            f"{value[:80]!r} is not an RFC 3339 timestamp with an offset such as '2026-11-22T10:00:00+08:00'",
            "invalid_timestamp",
        )
    try:
        moment = datetime.fromisoformat(text).astimezone(timezone.utc)
    except (ValueError, OverflowError) as exc:
        raise _refuse(f"{value[:80]!r} is not a valid time: {exc}", "invalid_timestamp") from None
    if not MIN_YEAR <= moment.year <= MAX_YEAR:
        raise _refuse(f"{value[:80]!r} is outside the years {MIN_YEAR} to {MAX_YEAR}", "invalid_timestamp")
    return moment


def _string_schema(description: str, example: str, **extra: Any) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "description": description, "examples": [example], **extra})


CnyAmount = Annotated[
    int, BeforeValidator(_cny),
    _string_schema("Decimal CNY, at most 9 decimal places", "12.50", pattern=r"^\d+(\.\d{1,9})?$"),
]
PositiveCnyAmount = Annotated[
    int, BeforeValidator(_positive_cny),
    _string_schema("Decimal CNY greater than 0, at most 9 decimal places", "100.00", pattern=r"^\d+(\.\d{1,9})?$"),
]
PricePerMillion = Annotated[
    int, BeforeValidator(_price),
    _string_schema("Decimal CNY per 1M tokens, at most 3 decimal places", "1.500", pattern=r"^\d+(\.\d{1,3})?$"),
]
DiscountFraction = Annotated[
    int, BeforeValidator(_discount), _string_schema("Fraction from 0 to 1 (\"0.5\" = half off)", "0.5")
]
WeightFraction = Annotated[
    int, BeforeValidator(_weight), _string_schema("Positive multiplier of total tokens (\"1\" = as counted)", "1")
]
Timestamp = Annotated[
    datetime, BeforeValidator(parse_rfc3339),
    _string_schema("RFC 3339 time with an offset", "2026-11-22T10:00:00+08:00", format="date-time"),
]
Name = Annotated[
    str, BeforeValidator(lambda v: check_text(v, MAX_NAME_CHARS)),
    _string_schema("A name for people", "prod-chat", minLength=1, maxLength=MAX_NAME_CHARS),
]
Reference = Annotated[
    str, BeforeValidator(lambda v: check_text(v, MAX_REFERENCE_CHARS)),
    _string_schema("Your unique reference for this top-up (the idempotency key)", "invoice-2026-0042",
                   minLength=1, maxLength=MAX_REFERENCE_CHARS),
]
TimeZoneName = Annotated[str, BeforeValidator(_timezone), _string_schema("IANA time zone", DEFAULT_TIMEZONE)]
ObjectId = Annotated[
    str, BeforeValidator(check_object_id), _string_schema("An object id", "pkg_01JD8ZK3", pattern=OBJECT_ID.pattern)
]
Tokens = Annotated[int, Strict(), Field(gt=0, le=MAX_PACKAGE_TOKENS)]


class _Request(BaseModel):
    # Unknown fields are refused: a misspelt cap must not silently leave a key uncapped.
    model_config = ConfigDict(extra="forbid")


class AccountCreate(_Request):
    name: Name
    tier: Tier = "free"
    timezone: TimeZoneName = Field(default=DEFAULT_TIMEZONE, validate_default=True)


class TopupCreate(_Request):
    amount: PositiveCnyAmount
    reference: Reference


class PackageCreate(_Request):
    tokens: Tokens
    price: CnyAmount
    valid_from: Timestamp | None = None
    valid_until: Timestamp


class KeyCreate(_Request):
    name: Name
    billing_mode: BillingMode
    package_id: ObjectId | None = None
    daily_cap: CnyAmount = Field(default="0", validate_default=True)
    monthly_cap: CnyAmount = Field(default="0", validate_default=True)


class KeyUpdate(_Request):
    """Only the fields sent are changed; ``package_id: null`` unbinds (PAYG keys only)."""

    name: Name | None = None
    package_id: ObjectId | None = None
    daily_cap: CnyAmount | None = None
    monthly_cap: CnyAmount | None = None


class PriceCreate(_Request):
    input_price: PricePerMillion
    output_price: PricePerMillion
    cached_input_price: PricePerMillion | None = None
    per_request_fee: CnyAmount = Field(default="0", validate_default=True)
    batch_discount: DiscountFraction = Field(default="0", validate_default=True)
    package_weight: WeightFraction = Field(default="1", validate_default=True)
    min_tier: Tier = "free"
    effective_from: Timestamp | None = None


# Responses: money as decimal CNY strings, times as RFC 3339.


class PackageOut(BaseModel):
    package_id: str
    account_id: str
    tokens_total: int
    tokens_used: int
    tokens_expired: int
    tokens_remaining: int
    price: str
    valid_from: datetime
    valid_until: datetime
    status: Literal["pending", "active", "exhausted", "expired"]
    created_at: datetime


class AccountOut(BaseModel):
    account_id: str
    name: str
    tier: Tier
    timezone: str
    balance: str
    topups_total: str
    charges_total: str
    balance_depleted: bool
    package: PackageOut | None = Field(description="The account's active package, if any")
    created_at: datetime


class TopupOut(BaseModel):
    entry_id: int = Field(description="The ledger entry of the top-up")
    account_id: str
    reference: str
    amount: str
    balance: str = Field(description="The account balance now")
    created_at: datetime


class KeyOut(BaseModel):
    key_id: str
    account_id: str
    name: str
    billing_mode: BillingMode
    package_id: str | None
    daily_cap: str = Field(description='Decimal CNY; "0" means unlimited')
    monthly_cap: str = Field(description='Decimal CNY; "0" means unlimited')
    status: Literal["active", "revoked"]
    secret_hint: str = Field(description="The first characters of the key, to tell keys apart")
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    api_key: str = Field(description="The secret key. Shown only now; only its hash is stored.")


class PriceOut(BaseModel):
    price_id: int
    model: str
    input_price: str
    output_price: str
    cached_input_price: str
    per_request_fee: str
    batch_discount: str
    package_weight: str
    min_tier: Tier
    effective_from: datetime


class PriceList(BaseModel):
    data: list[PriceOut]
    next_cursor: str | None


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str


class ErrorBody(BaseModel):
    """The error shape of every Tollhouse API (DESIGN §6.1)."""

    code: int = Field(description="gRPC canonical code")
    msg: str
    error: ErrorDetail
