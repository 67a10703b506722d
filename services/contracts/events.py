"""The usage event (DESIGN §3): CloudEvents 1.0, structured JSON mode.

``decode_usage_event`` is strict: it refuses anything that is not exactly the contract and
says which field is wrong and why, as a dead-letter reason plus a detail for people.
The checks that need the database (unknown key, unknown model, no price) live in metering.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from typing import Annotated, Literal

import msgspec
import uuid_utils

USAGE_TOPIC = "tollhouse.usage.v1"
USAGE_DLQ_TOPIC = "tollhouse.usage.v1.dlq"
BREACH_TOPIC = "tollhouse.breaches.v1"
USAGE_EVENT_TYPE = "tollhouse.usage.v1"
BREACH_EVENT_TYPE = "tollhouse.breach.v1"
DEAD_LETTER_EVENT_TYPE = "tollhouse.usage.dead_letter.v1"
SPECVERSION = "1.0"

MAX_TOKENS_PER_EVENT = 10**12  # far above any real call, low enough that sums stay in BIGINT
MAX_INPUTS_PER_EVENT = 10_000_000

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class Reason:
    """Dead-letter reasons: stable strings that operators filter and alert on."""

    OVERSIZE = "oversize"
    INVALID_JSON = "invalid_json"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    UNSUPPORTED_SPECVERSION = "unsupported_specversion"
    UNSUPPORTED_TYPE = "unsupported_type"
    INVALID_TIME = "invalid_time"
    TIME_IN_FUTURE = "time_in_future"
    NEGATIVE_TOKENS = "negative_tokens"
    TOKENS_TOO_LARGE = "tokens_too_large"
    TOKENS_MISMATCH = "tokens_mismatch"
    CACHED_EXCEEDS_PROMPT = "cached_exceeds_prompt"
    REASONING_EXCEEDS_COMPLETION = "reasoning_exceeds_completion"
    INVALID_INPUTS = "invalid_inputs"
    SUBJECT_MISMATCH = "subject_mismatch"
    UNKNOWN_ACCOUNT = "unknown_account"
    UNKNOWN_KEY = "unknown_key"
    KEY_ACCOUNT_MISMATCH = "key_account_mismatch"
    UNKNOWN_MODEL = "unknown_model"
    NO_PRICE = "no_price"
    ID_CONFLICT = "id_conflict"


class UsageData(msgspec.Struct, forbid_unknown_fields=False, gc=False):
    account_id: _Id
    key_id: _Id
    request_id: _Name
    endpoint: _Name
    model: _Name
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    kind: Literal["request", "batch"] = "request"
    inputs: int = 1
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    usage_estimated: bool = False
    status: Literal["ok", "error", "cancelled"] = "ok"
    reservation_id: Annotated[str, msgspec.Meta(max_length=128)] | None = None


class UsageEvent(msgspec.Struct, forbid_unknown_fields=False, gc=False):
    specversion: str
    id: _Id
    source: _Name
    type: str
    time: str
    data: UsageData
    subject: str | None = None
    datacontenttype: str | None = None


class InvalidEvent(Exception):
    """An event that breaks the contract: ``reason`` is the dead-letter reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class AcceptedEvent(msgspec.Struct, gc=False):
    """A usage event that passed the contract checks, with its parsed time and digest."""

    event: UsageEvent
    event_time: datetime
    digest: bytes


_decoder = msgspec.json.Decoder(UsageEvent)
_TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


def parse_event_time(text: str) -> datetime:
    """RFC 3339 with an offset (``Z`` or ``+08:00``) → aware UTC datetime."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidEvent(Reason.INVALID_TIME, f"time {text!r} is not an RFC 3339 timestamp") from exc
    if parsed.tzinfo is None:
        raise InvalidEvent(Reason.INVALID_TIME, f"time {text!r} has no UTC offset; add 'Z' or '+08:00'")
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError as exc:  # e.g. 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        raise InvalidEvent(Reason.INVALID_TIME, f"time {text!r} is out of the supported range") from exc


def decode_usage_event(
    payload: bytes | None,
    *,
    max_bytes: int,
    now: datetime,
    max_future: timedelta,
) -> AcceptedEvent:
    """Parse and check one message value against the contract; raise ``InvalidEvent``."""
    if payload is None:
        raise InvalidEvent(Reason.INVALID_JSON, "message has no value")
    if len(payload) > max_bytes:
        raise InvalidEvent(Reason.OVERSIZE, f"event is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        event = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        text = str(exc)
        reason = Reason.MISSING_FIELD if "missing required field" in text else Reason.INVALID_FIELD
        raise InvalidEvent(reason, text) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError (not DecodeError) for bad UTF-8 inside a string.
        raise InvalidEvent(Reason.INVALID_JSON, f"not valid UTF-8 JSON: {exc}") from exc
    if b"\\u0000" in payload:  # JSON can only carry NUL as this escape; skip the scan otherwise
        _refuse_nul_characters(event)

    if event.specversion != SPECVERSION:
        raise InvalidEvent(
            Reason.UNSUPPORTED_SPECVERSION, f"specversion is {event.specversion!r}; only \"1.0\" is accepted"
        )
    if event.type != USAGE_EVENT_TYPE:
        raise InvalidEvent(Reason.UNSUPPORTED_TYPE, f"type is {event.type!r}; expected {USAGE_EVENT_TYPE!r}")
    data = event.data
    if event.subject is not None and event.subject != data.key_id:
        raise InvalidEvent(
            Reason.SUBJECT_MISMATCH, f"subject {event.subject!r} differs from data.key_id {data.key_id!r}"
        )
    for name in _TOKEN_FIELDS:
        value = getattr(data, name)
        if value < 0:
            raise InvalidEvent(Reason.NEGATIVE_TOKENS, f"data.{name} is {value}; token counts cannot be negative")
        if value > MAX_TOKENS_PER_EVENT:
            raise InvalidEvent(Reason.TOKENS_TOO_LARGE, f"data.{name} is {value}; the limit is {MAX_TOKENS_PER_EVENT}")
    if data.total_tokens != data.prompt_tokens + data.completion_tokens:
        raise InvalidEvent(
            Reason.TOKENS_MISMATCH,
            f"data.total_tokens is {data.total_tokens} but prompt_tokens + completion_tokens is "
            f"{data.prompt_tokens + data.completion_tokens}",
        )
    if data.cached_tokens > data.prompt_tokens:
        raise InvalidEvent(
            Reason.CACHED_EXCEEDS_PROMPT,
            f"data.cached_tokens ({data.cached_tokens}) is part of prompt_tokens ({data.prompt_tokens}) and cannot exceed it",
        )
    if data.reasoning_tokens > data.completion_tokens:
        raise InvalidEvent(
            Reason.REASONING_EXCEEDS_COMPLETION,
            f"data.reasoning_tokens ({data.reasoning_tokens}) is part of completion_tokens "
            f"({data.completion_tokens}) and cannot exceed it",
        )
    if not 1 <= data.inputs <= MAX_INPUTS_PER_EVENT:
        raise InvalidEvent(Reason.INVALID_INPUTS, f"data.inputs is {data.inputs}; it must be from 1 to {MAX_INPUTS_PER_EVENT}")
    event_time = parse_event_time(event.time)
    if event_time > now + max_future:
        raise InvalidEvent(
            Reason.TIME_IN_FUTURE,
            f"time {event.time} is more than {int(max_future.total_seconds())} s ahead of the metering clock",
        )
    return AcceptedEvent(event=event, event_time=event_time, digest=event_digest(event, event_time))


def _refuse_nul_characters(event: UsageEvent) -> None:
    """PostgreSQL text cannot hold U+0000: such an event could never be stored, so it is refused here
    (as a dead letter) instead of failing its whole batch again and again."""
    for prefix, struct in (("", event), ("data.", event.data)):
        for name in struct.__struct_fields__:
            value = getattr(struct, name)
            if isinstance(value, str) and "\x00" in value:
                raise InvalidEvent(Reason.INVALID_FIELD, f"{prefix}{name} contains a NUL character (U+0000)")


def event_digest(event: UsageEvent, event_time: datetime) -> bytes:
    """A digest of what the event says, independent of JSON key order and spacing.

    Two deliveries with the same id and the same digest are one event; the same id with
    another digest is an id conflict.
    """
    d = event.data
    # A JSON array, not joined str(): strings stay quoted and null stays null, so no two
    # different events share a canonical form (None vs "None", a separator inside a field).
    canonical = msgspec.json.encode(
        [
            event.id, event.source, event.type, event.subject, event_time.isoformat(),
            d.account_id, d.key_id, d.request_id, d.endpoint, d.model, d.kind, d.inputs,
            d.prompt_tokens, d.completion_tokens, d.total_tokens, d.cached_tokens,
            d.reasoning_tokens, d.usage_estimated, d.status, d.reservation_id,
        ]
    )
    return hashlib.blake2b(canonical, digest_size=16).digest()


_encoder = msgspec.json.Encoder()


def new_event_id() -> str:
    """A fresh event id: a UUIDv7, which starts with the millisecond it was made. Ids made
    close in time sort close together, so the ledger's unique index on them grows at its
    right edge (and its recent pages stay in memory) instead of at random places."""
    return str(uuid_utils.uuid7())


def format_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_usage_event(
    *,
    account_id: str,
    key_id: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    request_id: str,
    endpoint: str = "/v1/chat/completions",
    source: str = "gateway/local",
    time: datetime | None = None,
    event_id: str | None = None,
    kind: str = "request",
    inputs: int = 1,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
    usage_estimated: bool = False,
    status: str = "ok",
    reservation_id: str | None = None,
) -> UsageEvent:
    return UsageEvent(
        specversion=SPECVERSION,
        id=event_id or new_event_id(),
        source=source,
        type=USAGE_EVENT_TYPE,
        subject=key_id,
        time=format_time(time or datetime.now(timezone.utc)),
        datacontenttype="application/json",
        data=UsageData(
            account_id=account_id,
            key_id=key_id,
            request_id=request_id,
            endpoint=endpoint,
            model=model,
            kind=kind,  # type: ignore[arg-type]
            inputs=inputs,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            cached_tokens=cached_tokens,
            reasoning_tokens=reasoning_tokens,
            usage_estimated=usage_estimated,
            status=status,  # type: ignore[arg-type]
            reservation_id=reservation_id,
        ),
    )


def encode_event(event: msgspec.Struct) -> bytes:
    return _encoder.encode(event)
