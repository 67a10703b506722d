"""Dead-letter API (DESIGN §6.4).

* ``GET /v1/dead-letters?reason&from&to&cursor&limit`` and ``GET /v1/dead-letters/{id}``:
  billing token (read-only) or admin. Newest first; ``from``/``to`` filter on when the
  consumer dead-lettered the message (``received_at``), half-open [from, to).
* ``POST /v1/dead-letters/{id}/replay``: admin token only (it changes state). After the
  cause is fixed (the key now exists, the price was added), the stored payload is published
  again on the usage topic, exactly once per dead letter; a repeat returns the first
  replay's record (200) and sends nothing.

The SQL lives in ``services.metering.store.dead_letters``.
"""

from __future__ import annotations

import base64
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import BaseModel, Field

from services.contracts.errors import CONFLICT, INVALID_REQUEST, NOT_FOUND, TollhouseError
from services.contracts.events import InvalidEvent, Reason, decode_usage_event
from services.metering.api.auth import (
    ADMIN,
    BILLING,
    require_admin,
    require_billing_read,
    role_checked_route,
    settings_of,
)
from services.metering.api.cursors import decode_cursor, encode_cursor, strict_int
from services.metering.api.query import (
    Cursor,
    Limit,
    check_window,
    instant_query,
    only_params,
    page_limit,
    path_id,
    query_instant,
)
from services.metering.api.schemas import ErrorBody, parse_rfc3339
from services.metering.api.stores import app_now, app_store
from services.metering.store.dead_letters import DeadLetterKey, DeadLetterRecord, DeadLetterStore, ReplayRecord

REASONS = frozenset(value for name, value in vars(Reason).items() if name.isupper() and isinstance(value, str))

_errors = {s: {"model": ErrorBody} for s in (400, 401, 403, 404)}

_read = APIRouter(
    tags=["dead letters"],
    dependencies=[Depends(require_billing_read)],
    route_class=role_checked_route(BILLING, ADMIN),
    responses=_errors,
)
_admin = APIRouter(
    tags=["dead letters"],
    dependencies=[Depends(require_admin)],
    route_class=role_checked_route(ADMIN),
    responses={**_errors, 409: {"model": ErrorBody}},
)


def dead_letter_store(request: Request) -> DeadLetterStore:
    return app_store(request, DeadLetterStore)


# Responses


class ReplayOut(BaseModel):
    dead_letter_id: str
    event_id: str | None
    topic: str = Field(description="The topic the payload was published on again (the usage topic)")
    replayed_at: datetime


class DeadLetterOut(BaseModel):
    dead_letter_id: str
    reason: str
    detail: str
    event_id: str | None = Field(description="Set when the message was a readable event (database-side reasons)")
    source: str | None = Field(description="The event's source; 'unknown' when the message could not be read")
    topic: str
    partition: int
    offset: int
    received_at: datetime = Field(description="When the consumer dead-lettered the message")
    payload: str = Field(description="The original message: UTF-8 text, or base64 (see payload_encoding)")
    payload_encoding: str = Field(description="'utf-8' or 'base64'")
    payload_bytes: int = Field(description="Size of the whole original message")
    payload_truncated: bool = Field(
        description="The list shows at most DEAD_LETTER_PAYLOAD_PREVIEW_BYTES of each payload; "
        "GET /v1/dead-letters/{id} returns it whole"
    )
    replayed: bool
    replay: ReplayOut | None


class DeadLetterList(BaseModel):
    data: list[DeadLetterOut]
    next_cursor: str | None


def payload_text(payload: bytes, truncated: bool) -> tuple[str, str]:
    """(text, 'utf-8') when the bytes are UTF-8, else (base64, 'base64'), as on the DLQ topic.

    A cut-off preview may end inside a character: that partial character is left out.
    """
    try:
        return payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as exc:
        if truncated and exc.reason == "unexpected end of data" and exc.end == len(payload):
            try:
                return payload[: exc.start].decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                pass
        return base64.b64encode(payload).decode("ascii"), "base64"


def replay_out(replay: ReplayRecord) -> ReplayOut:
    return ReplayOut(dead_letter_id=replay.dead_letter_id, event_id=replay.event_id, topic=replay.topic,
                     replayed_at=replay.replayed_at)


def dead_letter_out(record: DeadLetterRecord) -> DeadLetterOut:
    text, encoding = payload_text(record.payload, record.payload_truncated)
    return DeadLetterOut(
        dead_letter_id=record.dead_letter_id,
        reason=record.reason,
        detail=record.detail,
        event_id=record.event_id,
        source=record.source,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        received_at=record.received_at,
        payload=text,
        payload_encoding=encoding,
        payload_bytes=record.payload_bytes,
        payload_truncated=record.payload_truncated,
        replayed=record.replay is not None,
        replay=None if record.replay is None else replay_out(record.replay),
    )


# Listing


@_read.get(
    "/v1/dead-letters",
    response_model=DeadLetterList,
    dependencies=[Depends(only_params("reason", "from", "to", "cursor", "limit"))],
)
async def list_dead_letters(
    request: Request,
    reason: Annotated[
        str | None,
        Query(description="Only this reason, e.g. unknown_key", json_schema_extra={"enum": sorted(REASONS)}),
    ] = None,
    start: Annotated[str | None, instant_query("received_at ≥ this (RFC 3339)", alias="from")] = None,
    end: Annotated[str | None, instant_query("received_at < this (RFC 3339)", alias="to")] = None,
    cursor: Cursor = None,
    limit: Limit = None,
) -> DeadLetterList:
    """Dead letters, newest first: received_at, then topic, partition and offset, descending."""
    if reason is not None and reason not in REASONS:
        raise TollhouseError(
            INVALID_REQUEST,
            f"query.reason: {reason[:80]!r} is not a dead-letter reason; one of {', '.join(sorted(REASONS))}",
        )
    lower, upper = query_instant(start, "from"), query_instant(end, "to")
    check_window(lower, upper)
    page = await dead_letter_store(request).list(
        reason=reason,
        received_from=lower,
        received_to=upper,
        after=None if cursor is None else decode_cursor(cursor, "dead_letters", _parse_cursor),
        limit=page_limit(request, limit),
        payload_preview_bytes=settings_of(request).dead_letter_payload_preview_bytes,
    )
    return DeadLetterList(
        data=[dead_letter_out(r) for r in page.rows],
        next_cursor=None if page.next_after is None else _cursor(page.next_after),
    )


def _cursor(after: DeadLetterKey) -> str:
    received_at, topic, partition, offset = after
    return encode_cursor("dead_letters", [received_at.isoformat(), topic, partition, offset])


def _parse_cursor(values: list[Any]) -> DeadLetterKey:
    received_at, topic, partition, offset = values
    if not isinstance(topic, str) or not 0 < len(topic) <= 256 or not topic.isprintable():
        raise ValueError("not a topic")
    return parse_rfc3339(received_at), topic, strict_int(partition, 0, 2**31 - 1), strict_int(offset, 0)


@_read.get("/v1/dead-letters/{dead_letter_id}", response_model=DeadLetterOut, dependencies=[Depends(only_params())])
async def get_dead_letter(dead_letter_id: str, request: Request) -> DeadLetterOut:
    """One dead letter with its whole payload."""
    record = await dead_letter_store(request).get(path_id(dead_letter_id, "dead letter"))
    if record is None:
        raise TollhouseError(NOT_FOUND, f"dead letter {dead_letter_id} not found")
    return dead_letter_out(record)


# Replay


def _replayable(record: DeadLetterRecord, request: Request) -> tuple[str | None, bytes]:
    """(event id, Kafka key) of a dead letter worth replaying; 409 when replaying cannot help."""
    if record.reason == Reason.ID_CONFLICT:
        raise TollhouseError(
            CONFLICT,
            f"dead letter {record.dead_letter_id} is an id_conflict: event id {record.event_id!r} is already booked "
            "with another payload, so a replay would conflict again. Correct it with a new event id or a "
            "reversing entry instead",
        )
    settings = settings_of(request)
    now = app_now(request)
    try:
        accepted = decode_usage_event(
            record.payload,
            max_bytes=settings.max_event_bytes,
            now=now,
            max_future=timedelta(seconds=settings.max_event_future_seconds),
        )
    except InvalidEvent as exc:
        if exc.reason == Reason.INVALID_JSON:
            raise TollhouseError(
                CONFLICT,
                f"dead letter {record.dead_letter_id} cannot be replayed: its payload is not valid JSON "
                f"({exc.detail[:200]}); no fix on the metering side can book it. Have the sender emit a new event",
            ) from None
        raise TollhouseError(
            CONFLICT,
            f"dead letter {record.dead_letter_id} cannot be replayed: its payload breaks the usage event contract "
            f"now too ({exc.reason}: {exc.detail[:200]}), so it would be dead-lettered again",
        ) from None
    event = accepted.event
    # The original Kafka key when it was recorded; otherwise the gateway's key, the account id.
    key = record.message_key if record.message_key is not None else event.data.account_id.encode()
    return event.id, key


@_admin.post(
    "/v1/dead-letters/{dead_letter_id}/replay",
    status_code=status.HTTP_201_CREATED,
    response_model=ReplayOut,
    responses={200: {"model": ReplayOut, "description": "Already replayed: the first replay's record; nothing sent"}},
    dependencies=[Depends(only_params())],
)
async def replay_dead_letter(dead_letter_id: str, request: Request, response: Response) -> ReplayOut:
    """Publish the stored payload on the usage topic again, once (201); a repeat answers 200.

    The consumer then books the event once (its id is the idempotency key) or, if the cause
    is not fixed, dead-letters it again as a new dead letter with the current reason.
    """
    store = dead_letter_store(request)
    record = await store.get(path_id(dead_letter_id, "dead letter"))
    if record is None:
        raise TollhouseError(NOT_FOUND, f"dead letter {dead_letter_id} not found")
    if record.replay is not None:
        response.status_code = status.HTTP_200_OK
        return replay_out(record.replay)
    event_id, key = _replayable(record, request)
    replay, created = await store.replay(
        record.dead_letter_id, topic=settings_of(request).usage_topic, message_key=key, event_id=event_id
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return replay_out(replay)


router = APIRouter()
router.include_router(_read)
router.include_router(_admin)
