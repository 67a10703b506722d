"""The usage event contract (DESIGN §3): strict decoding, dead-letter reasons, digest."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from services.contracts.events import (
    MAX_INPUTS_PER_EVENT,
    MAX_TOKENS_PER_EVENT,
    USAGE_EVENT_TYPE,
    AcceptedEvent,
    InvalidEvent,
    Reason,
    build_usage_event,
    decode_usage_event,
    encode_event,
    format_time,
    parse_event_time,
)

NOW = datetime(2026, 11, 22, 10, 0, 0, tzinfo=timezone.utc)
MAX_FUTURE = timedelta(minutes=5)
MAX_BYTES = 64 * 1024

# The reasons that need the database; decode_usage_event never gives them.
METERING_ONLY_REASONS = {
    Reason.UNKNOWN_ACCOUNT,
    Reason.UNKNOWN_KEY,
    Reason.KEY_ACCOUNT_MISMATCH,
    Reason.UNKNOWN_MODEL,
    Reason.NO_PRICE,
    Reason.ID_CONFLICT,
}


def sample() -> dict[str, Any]:
    """The example event of DESIGN §3."""
    return {
        "specversion": "1.0",
        "id": "0193a5c2-7d7e-7b1a-9a51-5f3c1e0a2b11",
        "source": "gateway/gw-1",
        "type": "tollhouse.usage.v1",
        "subject": "key_01JD8ZK3",
        "time": "2026-11-22T10:00:00.123Z",
        "datacontenttype": "application/json",
        "data": {
            "account_id": "acc_01JD8ZJ9",
            "key_id": "key_01JD8ZK3",
            "request_id": "chatcmpl-83jZ61GDHtdlsFUzXDbpGeoU193Mj",
            "endpoint": "/v1/chat/completions",
            "model": "gpt-3.5-turbo",
            "kind": "request",
            "inputs": 1,
            "prompt_tokens": 19,
            "completion_tokens": 9,
            "total_tokens": 28,
            "cached_tokens": 0,
            "reasoning_tokens": 0,
            "usage_estimated": False,
            "status": "ok",
            "reservation_id": None,
        },
    }


def decode(payload: bytes | None, *, max_bytes: int = MAX_BYTES) -> AcceptedEvent:
    return decode_usage_event(payload, max_bytes=max_bytes, now=NOW, max_future=MAX_FUTURE)


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def reason_of(payload: bytes | None, *, max_bytes: int = MAX_BYTES) -> str:
    with pytest.raises(InvalidEvent) as caught:
        decode(payload, max_bytes=max_bytes)
    return caught.value.reason


def with_data(**changes: Any) -> bytes:
    doc = sample()
    doc["data"].update(changes)
    return encode(doc)


def with_envelope(**changes: Any) -> bytes:
    doc = sample()
    doc.update(changes)
    return encode(doc)


def without(field: str, *, in_data: bool) -> bytes:
    doc = sample()
    del (doc["data"] if in_data else doc)[field]
    return encode(doc)


# --- accepted events ---------------------------------------------------------------------


def test_design_example_is_accepted() -> None:
    accepted = decode(encode(sample()))
    assert accepted.event.data.total_tokens == 28
    assert accepted.event.data.key_id == "key_01JD8ZK3"


def test_event_time_is_parsed_to_aware_utc() -> None:
    accepted = decode(encode(sample()))
    assert accepted.event_time == datetime(2026, 11, 22, 10, 0, 0, 123000, tzinfo=timezone.utc)


def test_event_time_with_local_offset_is_converted_to_utc() -> None:
    accepted = decode(with_envelope(time="2026-11-22T18:00:00+08:00"))
    assert accepted.event_time == datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)
    assert accepted.event_time.utcoffset() == timedelta(0)


def test_optional_data_fields_take_their_defaults() -> None:
    doc = sample()
    for name in ("kind", "inputs", "cached_tokens", "reasoning_tokens", "usage_estimated", "status", "reservation_id"):
        del doc["data"][name]
    data = decode(encode(doc)).event.data
    assert (data.kind, data.inputs, data.cached_tokens, data.reasoning_tokens) == ("request", 1, 0, 0)
    assert (data.usage_estimated, data.status, data.reservation_id) == (False, "ok", None)


def test_missing_subject_is_accepted() -> None:
    assert decode(without("subject", in_data=False)).event.subject is None


def test_unknown_extension_attributes_are_ignored() -> None:
    assert decode(with_envelope(traceparent="00-abc-def-01")).event.id == sample()["id"]


def test_batch_kind_with_many_inputs_is_accepted() -> None:
    data = decode(with_data(kind="batch", inputs=500)).event.data
    assert (data.kind, data.inputs) == ("batch", 500)


def test_cancelled_and_error_statuses_are_accepted() -> None:
    assert decode(with_data(status="cancelled")).event.data.status == "cancelled"
    assert decode(with_data(status="error", prompt_tokens=0, completion_tokens=0, total_tokens=0)).event.data.status == "error"


def test_cached_equal_to_prompt_and_reasoning_equal_to_completion_are_accepted() -> None:
    data = decode(with_data(cached_tokens=19, reasoning_tokens=9)).event.data
    assert (data.cached_tokens, data.reasoning_tokens) == (19, 9)


def test_time_exactly_at_the_future_limit_is_accepted() -> None:
    assert decode(with_envelope(time=format_time(NOW + MAX_FUTURE))).event_time == NOW + MAX_FUTURE


def test_time_in_the_past_is_accepted() -> None:
    assert decode(with_envelope(time="2020-01-01T00:00:00Z")).event_time.year == 2020


def test_payload_exactly_at_the_size_limit_is_accepted() -> None:
    payload = encode(sample())
    assert decode(payload, max_bytes=len(payload)).event.id == sample()["id"]


def test_tokens_at_the_per_event_limit_are_accepted() -> None:
    data = decode(
        with_data(prompt_tokens=MAX_TOKENS_PER_EVENT, completion_tokens=0, total_tokens=MAX_TOKENS_PER_EVENT)
    ).event.data
    assert data.prompt_tokens == MAX_TOKENS_PER_EVENT


def test_built_event_round_trips_through_decode() -> None:
    event = build_usage_event(
        account_id="acc_1", key_id="key_1", model="gpt-4o", prompt_tokens=100, completion_tokens=20,
        request_id="req_1", time=NOW, event_id="ev_1", kind="batch", inputs=3, cached_tokens=40,
        reasoning_tokens=5, reservation_id="res_1",
    )
    accepted = decode(encode_event(event))
    assert accepted.event == event
    assert accepted.event.data.total_tokens == 120
    assert accepted.event.type == USAGE_EVENT_TYPE


def test_format_time_writes_utc_with_z_and_milliseconds() -> None:
    moment = datetime(2026, 11, 22, 18, 0, 0, 123456, tzinfo=timezone(timedelta(hours=8)))
    assert format_time(moment) == "2026-11-22T10:00:00.123Z"


# --- dead-letter reasons -----------------------------------------------------------------

DEAD_LETTERS: list[tuple[str, bytes | None, str]] = [
    ("no value", None, Reason.INVALID_JSON),
    ("not json", b"this is not json", Reason.INVALID_JSON),
    ("truncated json", encode(sample())[:-5], Reason.INVALID_JSON),
    ("invalid utf-8", b'{"specversion": "\xff\xfe"}', Reason.INVALID_JSON),
    ("trailing garbage", encode(sample()) + b" x", Reason.INVALID_JSON),
    ("lone surrogate escape", encode(sample()).replace(b"chatcmpl-", b"\\ud800"), Reason.INVALID_JSON),
    ("top level array", b"[1, 2]", Reason.INVALID_FIELD),
    ("tokens as string", with_data(prompt_tokens="19"), Reason.INVALID_FIELD),
    ("tokens as float", with_data(prompt_tokens=19.0), Reason.INVALID_FIELD),
    ("tokens as bool", with_data(completion_tokens=True), Reason.INVALID_FIELD),
    ("inputs as bool", with_data(inputs=True), Reason.INVALID_FIELD),
    ("usage_estimated as string", with_data(usage_estimated="false"), Reason.INVALID_FIELD),
    ("account_id as number", with_data(account_id=5), Reason.INVALID_FIELD),
    ("data as null", with_envelope(data=None), Reason.INVALID_FIELD),
    ("empty id", with_envelope(id=""), Reason.INVALID_FIELD),
    ("id too long", with_envelope(id="x" * 129), Reason.INVALID_FIELD),
    ("unknown kind", with_data(kind="stream"), Reason.INVALID_FIELD),
    ("kind wrong case", with_data(kind="Request"), Reason.INVALID_FIELD),
    ("unknown status", with_data(status="done"), Reason.INVALID_FIELD),
    ("missing envelope id", without("id", in_data=False), Reason.MISSING_FIELD),
    ("missing time", without("time", in_data=False), Reason.MISSING_FIELD),
    ("missing data", without("data", in_data=False), Reason.MISSING_FIELD),
    ("missing model", without("model", in_data=True), Reason.MISSING_FIELD),
    ("missing prompt_tokens", without("prompt_tokens", in_data=True), Reason.MISSING_FIELD),
    ("missing total_tokens", without("total_tokens", in_data=True), Reason.MISSING_FIELD),
    ("negative prompt", with_data(prompt_tokens=-1, total_tokens=8), Reason.NEGATIVE_TOKENS),
    ("negative completion", with_data(completion_tokens=-1, total_tokens=18), Reason.NEGATIVE_TOKENS),
    ("negative total", with_data(prompt_tokens=0, completion_tokens=0, total_tokens=-1), Reason.NEGATIVE_TOKENS),
    ("negative cached", with_data(cached_tokens=-1), Reason.NEGATIVE_TOKENS),
    ("negative reasoning", with_data(reasoning_tokens=-1), Reason.NEGATIVE_TOKENS),
    ("tokens over limit", with_data(prompt_tokens=MAX_TOKENS_PER_EVENT + 1, completion_tokens=0,
                                    total_tokens=MAX_TOKENS_PER_EVENT + 1), Reason.TOKENS_TOO_LARGE),
    ("tokens beyond int64", with_data(prompt_tokens=10**30), Reason.TOKENS_TOO_LARGE),
    ("total too small", with_data(total_tokens=27), Reason.TOKENS_MISMATCH),
    ("total too large", with_data(total_tokens=29), Reason.TOKENS_MISMATCH),
    ("total counts cached twice", with_data(cached_tokens=5, total_tokens=33), Reason.TOKENS_MISMATCH),
    ("cached above prompt", with_data(cached_tokens=20), Reason.CACHED_EXCEEDS_PROMPT),
    ("reasoning above completion", with_data(reasoning_tokens=10), Reason.REASONING_EXCEEDS_COMPLETION),
    ("inputs zero", with_data(inputs=0), Reason.INVALID_INPUTS),
    ("inputs negative", with_data(inputs=-3), Reason.INVALID_INPUTS),
    ("inputs over limit", with_data(inputs=MAX_INPUTS_PER_EVENT + 1), Reason.INVALID_INPUTS),
    ("time without offset", with_envelope(time="2026-11-22T10:00:00"), Reason.INVALID_TIME),
    ("date only", with_envelope(time="2026-11-22"), Reason.INVALID_TIME),
    ("time not a timestamp", with_envelope(time="yesterday"), Reason.INVALID_TIME),
    ("time empty", with_envelope(time=""), Reason.INVALID_TIME),
    ("time far in future", with_envelope(time="2026-11-23T10:00:00Z"), Reason.TIME_IN_FUTURE),
    ("time just past the limit", with_envelope(time=format_time(NOW + MAX_FUTURE + timedelta(milliseconds=1))),
     Reason.TIME_IN_FUTURE),
    ("specversion 0.3", with_envelope(specversion="0.3"), Reason.UNSUPPORTED_SPECVERSION),
    ("specversion 1", with_envelope(specversion="1"), Reason.UNSUPPORTED_SPECVERSION),
    ("breach type", with_envelope(type="tollhouse.breach.v1"), Reason.UNSUPPORTED_TYPE),
    ("future version type", with_envelope(type="tollhouse.usage.v2"), Reason.UNSUPPORTED_TYPE),
    ("subject is another key", with_envelope(subject="key_other"), Reason.SUBJECT_MISMATCH),
    ("subject empty", with_envelope(subject=""), Reason.SUBJECT_MISMATCH),
]


@pytest.mark.parametrize(("payload", "reason"), [(p, r) for _, p, r in DEAD_LETTERS],
                         ids=[name for name, _, _ in DEAD_LETTERS])
def test_invalid_event_is_dead_lettered_with_its_reason(payload: bytes | None, reason: str) -> None:
    assert reason_of(payload) == reason


def test_oversize_event_is_dead_lettered_before_parsing() -> None:
    payload = encode(sample())
    assert reason_of(payload, max_bytes=len(payload) - 1) == Reason.OVERSIZE


def test_oversize_is_measured_in_bytes_not_characters() -> None:
    doc = sample()
    doc["data"]["request_id"] = "请求" * 10  # 3 bytes per character in UTF-8
    payload = json.dumps(doc, ensure_ascii=False).encode()
    assert reason_of(payload, max_bytes=len(payload.decode()) + 1) == Reason.OVERSIZE


def test_every_contract_reason_is_produced_by_decoding() -> None:
    produced = {reason for _, _, reason in DEAD_LETTERS} | {Reason.OVERSIZE}
    declared = {v for k, v in vars(Reason).items() if k.isupper()}
    assert produced == declared - METERING_ONLY_REASONS


def test_dead_letter_detail_names_the_bad_field() -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode(with_data(cached_tokens=20))
    assert "cached_tokens" in caught.value.detail
    assert str(caught.value).startswith(Reason.CACHED_EXCEEDS_PROMPT + ":")


def test_missing_field_detail_names_the_field() -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode(without("model", in_data=True))
    assert "model" in caught.value.detail


def test_parse_event_time_refuses_naive_time() -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event_time("2026-11-22T10:00:00")
    assert caught.value.reason == Reason.INVALID_TIME


# --- digest ------------------------------------------------------------------------------


def digest_of(doc: dict[str, Any]) -> bytes:
    return decode(encode(doc)).digest


def test_digest_ignores_key_order_and_whitespace() -> None:
    doc = sample()
    compact = json.dumps(doc, separators=(",", ":")).encode()
    shuffled = dict(reversed(list(doc.items())))
    shuffled["data"] = dict(reversed(list(doc["data"].items())))
    spaced = json.dumps(shuffled, indent=4).encode()
    assert compact != spaced
    assert decode(compact).digest == decode(spaced).digest


def test_digest_is_the_same_for_the_same_instant_written_with_another_offset() -> None:
    doc = sample()
    doc["time"] = "2026-11-22T18:00:00.123+08:00"
    assert digest_of(doc) == digest_of(sample())


def test_digest_is_the_same_when_defaults_are_written_out_or_left_out() -> None:
    doc = sample()
    for name in ("kind", "inputs", "cached_tokens", "reasoning_tokens", "usage_estimated", "status", "reservation_id"):
        del doc["data"][name]
    assert digest_of(doc) == digest_of(sample())


ENVELOPE_CHANGES = {"id": "other-id", "source": "gateway/gw-2", "subject": None, "time": "2026-11-22T10:00:00.124Z"}
DATA_CHANGES: dict[str, dict[str, Any]] = {
    "account_id": {"account_id": "acc_other"},
    "key_id": {"key_id": "key_other"},
    "request_id": {"request_id": "chatcmpl-other"},
    "endpoint": {"endpoint": "/v1/completions"},
    "model": {"model": "gpt-4"},
    "kind": {"kind": "batch"},
    "inputs": {"inputs": 2},
    "prompt_tokens": {"prompt_tokens": 20, "total_tokens": 29},
    "completion_tokens": {"completion_tokens": 10, "total_tokens": 29},
    "cached_tokens": {"cached_tokens": 1},
    "reasoning_tokens": {"reasoning_tokens": 1},
    "usage_estimated": {"usage_estimated": True},
    "status": {"status": "cancelled"},
    "reservation_id": {"reservation_id": "res_1"},
}


@pytest.mark.parametrize(("field", "value"), ENVELOPE_CHANGES.items(), ids=list(ENVELOPE_CHANGES))
def test_digest_changes_when_an_envelope_field_changes(field: str, value: Any) -> None:
    doc = sample()
    doc[field] = value
    assert digest_of(doc) != digest_of(sample())


@pytest.mark.parametrize("changes", DATA_CHANGES.values(), ids=list(DATA_CHANGES))
def test_digest_changes_when_a_data_field_changes(changes: dict[str, Any]) -> None:
    doc = sample()
    doc["data"].update(changes)
    if "key_id" in changes:
        doc["subject"] = changes["key_id"]
    assert digest_of(doc) != digest_of(sample())


def test_digest_tells_null_reservation_from_the_string_none() -> None:
    doc = sample()
    doc["data"]["reservation_id"] = "None"
    assert digest_of(doc) != digest_of(sample())


def test_digest_tells_apart_fields_that_differ_only_in_where_a_separator_falls() -> None:
    a, b = sample(), sample()
    a["data"]["request_id"], a["data"]["endpoint"] = "req\x1f/v1/x", "/v1/y"
    b["data"]["request_id"], b["data"]["endpoint"] = "req", "/v1/x\x1f/v1/y"
    assert digest_of(a) != digest_of(b)


def test_digest_is_the_same_for_two_deliveries_of_one_event() -> None:
    assert decode(encode(sample())).digest == decode(encode(sample())).digest


def test_digest_fits_the_16_byte_column() -> None:
    assert len(decode(encode(sample())).digest) == 16
