"""Reconciliation API (DESIGN §6.4), billing token (read-only) or admin.

* ``GET /v1/reconciliation?from&to`` — what the consumer received, accepted, dropped as
  duplicates, quarantined as id conflicts and dead-lettered, and the ledger's totals, overall
  and per event source.
* ``POST /v1/reconciliation/diff?from&to`` — an upstream's per-request usage (CSV or JSON
  lines), parsed as it streams in, compared with the ledger: what is missing, extra or
  different.

Time semantics: ledger figures cover usage entries whose ``event_time`` is in [from, to).
The consumer's counters are kept per UTC day of processing, so they cover the whole UTC
days that the window touches; the reply says which (``counters_from``, ``counters_to``).
The SQL lives in ``services.metering.store.reconciliation``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import AsyncIterator, Iterator
from datetime import date, datetime, time, timedelta, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from services.contracts.errors import INVALID_REQUEST, PAYLOAD_TOO_LARGE, Canonical, ErrorKind, TollhouseError
from services.contracts.events import MAX_TOKENS_PER_EVENT
from services.contracts.money import format_cny
from services.metering.api.auth import ADMIN, BILLING, require_billing_read, role_checked_route, settings_of
from services.metering.api.query import instant_query, only_params, page_limit, required_window
from services.metering.api.schemas import ErrorBody
from services.metering.api.stores import app_store
from services.metering.store.reconciliation import (
    DiffResult,
    ReconciliationStore,
    SourceTotals,
    TokenCounts,
    UpstreamRecord,
)

UNSUPPORTED_MEDIA_TYPE = ErrorKind(415, Canonical.INVALID_ARGUMENT, "unsupported_media_type", "invalid_request_error")

CSV_TYPES = frozenset({"text/csv"})
JSONL_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/x-jsonl", "application/jsonlines",
                         "application/x-jsonlines"})
COLUMNS = ("request_id", "prompt_tokens", "completion_tokens", "total_tokens")
REQUIRED_COLUMNS = ("request_id", "total_tokens")
TOKEN_COLUMNS = ("prompt_tokens", "completion_tokens", "total_tokens")
MAX_REQUEST_ID_CHARS = 256  # ledger_entries.request_id
DIFF_BATCH_ROWS = 5_000
DEFAULT_ITEM_LIMIT = 100

_DIGITS = re.compile(r"^[0-9]{1,13}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BOM = b"\xef\xbb\xbf"

WindowStart = Annotated[str, instant_query("RFC 3339 with an offset; inclusive", alias="from")]
WindowEnd = Annotated[str, instant_query("RFC 3339 with an offset; exclusive", alias="to")]

router = APIRouter(
    tags=["billing"],
    dependencies=[Depends(require_billing_read)],
    route_class=role_checked_route(BILLING, ADMIN),
    responses={s: {"model": ErrorBody} for s in (400, 401, 403, 413)},
)


def reconciliation_store(request: Request) -> ReconciliationStore:
    return app_store(request, ReconciliationStore)


# GET /v1/reconciliation


class ReconciliationFigures(BaseModel):
    received: int = Field(description="Messages the consumer read (UTC days of processing, see counters_from/to)")
    accepted: int = Field(description="Events booked into the ledger")
    duplicates: int = Field(description="Redeliveries of an event (or dead-lettered message) already handled")
    conflicts: int = Field(description="Events whose id was already booked with another payload (quarantined)")
    dead_lettered: int = Field(description="Messages dead-lettered for any other reason")
    requests: int = Field(description="Ledger usage entries with event_time in [from, to)")
    total_tokens: int
    package_tokens: int = Field(description="Tokens deducted from packages")
    charge: str = Field(description="PAYG charges, decimal CNY")


class SourceFigures(ReconciliationFigures):
    source: str = Field(description="The events' CloudEvents source ('unknown' for messages that could not be read)")


class ReconciliationOut(ReconciliationFigures):
    from_: datetime = Field(alias="from", serialization_alias="from")
    to: datetime
    counters_from: datetime = Field(description="Start of the first UTC day the counters cover")
    counters_to: datetime = Field(description="End of the last UTC day the counters cover")
    sources: list[SourceFigures] = Field(description="Per event source, sorted by source")

    model_config = {"populate_by_name": True}


def counter_days(lower: datetime, upper: datetime) -> tuple[date, date]:
    """The UTC days [first, end) that the window [lower, upper) touches."""
    first = lower.astimezone(timezone.utc).date()
    last_instant = upper.astimezone(timezone.utc) - timedelta(microseconds=1)
    return first, last_instant.date() + timedelta(days=1)


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), timezone.utc)


def _figures(totals: SourceTotals) -> dict[str, Any]:
    return {
        "received": totals.received,
        "accepted": totals.accepted,
        "duplicates": totals.duplicates,
        "conflicts": totals.conflicts,
        "dead_lettered": totals.dead_lettered,
        "requests": totals.requests,
        "total_tokens": totals.total_tokens,
        "package_tokens": totals.package_tokens,
        "charge": format_cny(totals.charge),
    }


@router.get(
    "/v1/reconciliation",
    response_model=ReconciliationOut,
    response_model_by_alias=True,
    dependencies=[Depends(only_params("from", "to"))],
)
async def reconciliation(
    request: Request,
    start: WindowStart,
    end: WindowEnd,
) -> ReconciliationOut:
    """Consumer counters and ledger totals for [from, to), overall and per source."""
    max_days = settings_of(request).reconciliation_max_window_days
    lower, upper = required_window(start, end, max_days=max_days)
    first_day, end_day = counter_days(lower, upper)
    by_source = await reconciliation_store(request).totals(lower, upper, first_day, end_day)
    overall = SourceTotals("")
    for totals in by_source.values():
        for name in ("received", "accepted", "duplicates", "conflicts", "dead_lettered", "requests",
                     "total_tokens", "package_tokens", "charge"):
            setattr(overall, name, getattr(overall, name) + getattr(totals, name))
    return ReconciliationOut(
        from_=lower,
        to=upper,
        counters_from=_midnight(first_day),
        counters_to=_midnight(end_day),
        sources=[SourceFigures(source=s, **_figures(by_source[s])) for s in sorted(by_source)],
        **_figures(overall),
    )


# POST /v1/reconciliation/diff


class Tokens(BaseModel):
    prompt_tokens: int | None = Field(description="null when the upstream did not give it")
    completion_tokens: int | None = Field(description="null when the upstream did not give it")
    total_tokens: int


class MissingOut(BaseModel):
    request_id: str
    line: int = Field(description="Line of the upload (the CSV header is line 1)")
    upstream: Tokens


class ExtraOut(BaseModel):
    request_id: str
    entries: int = Field(description="Ledger usage entries with this request_id in the window (summed)")
    first_event_time: datetime
    ledger: Tokens


class DifferentOut(BaseModel):
    request_id: str
    line: int
    entries: int
    upstream: Tokens
    ledger: Tokens
    fields: list[str] = Field(description="The token fields that differ")


class MissingSection(BaseModel):
    count: int
    upstream_total_tokens: int
    items: list[MissingOut]
    truncated: bool = Field(description="More items than `limit`; the count and totals cover all")


class ExtraSection(BaseModel):
    count: int
    ledger_total_tokens: int
    items: list[ExtraOut]
    truncated: bool


class DifferentSection(BaseModel):
    count: int
    upstream_total_tokens: int
    ledger_total_tokens: int
    items: list[DifferentOut]
    truncated: bool


class SideTotals(BaseModel):
    records: int = Field(description="Distinct request ids")
    total_tokens: int


class LedgerSide(SideTotals):
    entries: int = Field(description="Usage entries (several may share a request_id)")


class DiffOut(BaseModel):
    from_: datetime = Field(alias="from", serialization_alias="from")
    to: datetime
    upstream: SideTotals
    ledger: LedgerSide
    matched: int = Field(description="Request ids on both sides with the same tokens")
    missing: MissingSection = Field(description="In the upstream's records, not in the ledger's window")
    extra: ExtraSection = Field(description="In the ledger's window, not in the upstream's records")
    different: DifferentSection = Field(description="On both sides with different tokens")

    model_config = {"populate_by_name": True}


def _tokens(counts: TokenCounts) -> Tokens:
    return Tokens(prompt_tokens=counts.prompt_tokens, completion_tokens=counts.completion_tokens,
                  total_tokens=counts.total_tokens)


def diff_out(lower: datetime, upper: datetime, r: DiffResult) -> DiffOut:
    return DiffOut(
        from_=lower,
        to=upper,
        upstream=SideTotals(records=r.upstream_records, total_tokens=r.upstream_total_tokens),
        ledger=LedgerSide(records=r.ledger_records, entries=r.ledger_entries, total_tokens=r.ledger_total_tokens),
        matched=r.matched,
        missing=MissingSection(
            count=r.missing,
            upstream_total_tokens=r.missing_total_tokens,
            items=[MissingOut(request_id=i.request_id, line=i.line, upstream=_tokens(i.upstream))
                   for i in r.missing_items],
            truncated=r.missing > len(r.missing_items),
        ),
        extra=ExtraSection(
            count=r.extra,
            ledger_total_tokens=r.extra_total_tokens,
            items=[ExtraOut(request_id=i.request_id, entries=i.entries, first_event_time=i.first_event_time,
                            ledger=_tokens(i.ledger)) for i in r.extra_items],
            truncated=r.extra > len(r.extra_items),
        ),
        different=DifferentSection(
            count=r.different,
            upstream_total_tokens=r.different_upstream_total_tokens,
            ledger_total_tokens=r.different_ledger_total_tokens,
            items=[DifferentOut(request_id=i.request_id, line=i.line, entries=i.entries, upstream=_tokens(i.upstream),
                                ledger=_tokens(i.ledger), fields=i.fields) for i in r.different_items],
            truncated=r.different > len(r.different_items),
        ),
    )


_DIFF_BODY_DOC = {
    "requestBody": {
        "required": True,
        "description": "The upstream's usage, one request per line. CSV with a header naming the columns "
        "(request_id and total_tokens required; prompt_tokens, completion_tokens optional), or JSON lines "
        "with the same field names.",
        "content": {
            "text/csv": {"schema": {"type": "string"},
                         "example": "request_id,prompt_tokens,completion_tokens,total_tokens\nchatcmpl-1,19,9,28\n"},
            "application/x-ndjson": {"schema": {"type": "string"},
                                     "example": '{"request_id": "chatcmpl-1", "total_tokens": 28}\n'},
        },
    }
}


@router.post(
    "/v1/reconciliation/diff",
    response_model=DiffOut,
    response_model_by_alias=True,
    responses={415: {"model": ErrorBody}},
    openapi_extra=_DIFF_BODY_DOC,
    dependencies=[Depends(only_params("from", "to", "limit"))],
)
async def reconciliation_diff(
    request: Request,
    start: WindowStart,
    end: WindowEnd,
    limit: Annotated[int | None, Query(description=f"Items listed per kind (default {DEFAULT_ITEM_LIMIT})")] = None,
) -> DiffOut:
    """Compare an upstream's per-request usage with the ledger's usage entries of [from, to)."""
    settings = settings_of(request)
    lower, upper = required_window(start, end, max_days=settings.reconciliation_max_window_days)
    item_limit = page_limit(request, limit, default=DEFAULT_ITEM_LIMIT)
    parser = upload_parser(request.headers.get("content-type"))
    batches = upstream_batches(request.stream(), parser, max_bytes=settings.max_request_bytes)
    result = await reconciliation_store(request).diff(lower, upper, batches, item_limit=item_limit)
    return diff_out(lower, upper, result)


# Parsing the upload: line by line as it arrives, one batch of records at a time.


def _bad(line: int, msg: str) -> TollhouseError:
    return TollhouseError(INVALID_REQUEST, f"line {line}: {msg}")


def _request_id(value: object, line: int) -> str:
    if not isinstance(value, str):
        raise _bad(line, f"request_id: must be a string, not {type(value).__name__}")
    if not value:
        raise _bad(line, "request_id: is required (empty)")
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise _bad(line, f"request_id: is {len(value)} characters long; at most {MAX_REQUEST_ID_CHARS}")
    if _CONTROL.search(value):
        raise _bad(line, "request_id: must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, written as a \ud800 escape in JSON
        raise _bad(line, "request_id: must be valid Unicode text (no lone surrogates)") from None
    return value


def _check_tokens(name: str, value: int, line: int) -> int:
    if value < 0:
        raise _bad(line, f"{name}: {value} is negative")
    if value > MAX_TOKENS_PER_EVENT:
        raise _bad(line, f"{name}: {value} is above the limit of {MAX_TOKENS_PER_EVENT}")
    return value


def _record(line: int, request_id: str, tokens: dict[str, int | None]) -> UpstreamRecord:
    total = tokens.get("total_tokens")
    if total is None:
        raise _bad(line, "total_tokens: is required")
    prompt, completion = tokens.get("prompt_tokens"), tokens.get("completion_tokens")
    if prompt is not None and completion is not None and prompt + completion != total:
        raise _bad(line, f"total_tokens: {total} is not prompt_tokens + completion_tokens ({prompt + completion})")
    return UpstreamRecord(request_id, line, prompt, completion, total)


class CsvUsage:
    """``request_id,prompt_tokens,completion_tokens,total_tokens`` (any order; the last two optional)."""

    def __init__(self) -> None:
        self.columns: list[str] | None = None

    def parse(self, line: int, text: str) -> UpstreamRecord | None:
        if not text.strip():
            return None
        try:
            cells = next(csv.reader([text], strict=True))
        except csv.Error as exc:
            raise _bad(line, f"not a CSV line: {exc}") from None
        cells = [c.strip() for c in cells]
        if self.columns is None:
            self.columns = self._header(line, cells)
            return None
        if len(cells) != len(self.columns):
            raise _bad(line, f"has {len(cells)} fields; the header has {len(self.columns)} ({','.join(self.columns)})")
        values = dict(zip(self.columns, cells))
        tokens: dict[str, int | None] = {}
        for name in TOKEN_COLUMNS:
            cell = values.get(name)
            if cell is None or cell == "":
                tokens[name] = None
                continue
            if not _DIGITS.match(cell):
                raise _bad(line, f"{name}: {cell[:40]!r} is not a whole number of tokens")
            tokens[name] = _check_tokens(name, int(cell), line)
        return _record(line, _request_id(values["request_id"], line), tokens)

    @staticmethod
    def _header(line: int, cells: list[str]) -> list[str]:
        for name in cells:
            if name not in COLUMNS:
                raise _bad(line, f"header: column {name[:40]!r} is not known; the columns are {', '.join(COLUMNS)} "
                                 "(request_id and total_tokens required)")
        if len(set(cells)) != len(cells):
            raise _bad(line, "header: a column is named twice")
        for name in REQUIRED_COLUMNS:
            if name not in cells:
                raise _bad(line, f"header: column {name} is required (the header is {','.join(cells)[:120]!r})")
        return cells

    def finish(self, lines: int) -> None:
        if self.columns is None:
            raise TollhouseError(
                INVALID_REQUEST, "body: empty; a CSV upload starts with a header such as "
                                 "request_id,prompt_tokens,completion_tokens,total_tokens",
            )


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


class JsonLinesUsage:
    """One JSON object per line with ``request_id`` and ``total_tokens`` (prompt/completion optional)."""

    def parse(self, line: int, text: str) -> UpstreamRecord | None:
        if not text.strip():
            return None
        try:
            doc = json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            raise _bad(line, f"not a JSON object: {exc}") from None
        except RecursionError:
            raise _bad(line, "not a JSON object: nested too deeply") from None
        if not isinstance(doc, dict):
            raise _bad(line, f"must be a JSON object, not a JSON {type(doc).__name__}")
        for name in doc:
            if name not in COLUMNS:
                raise _bad(line, f"{name[:40]}: is not a known field; the fields are {', '.join(COLUMNS)}")
        if "request_id" not in doc:
            raise _bad(line, "request_id: is required")
        tokens: dict[str, int | None] = {}
        for name in TOKEN_COLUMNS:
            value = doc.get(name)
            if value is None:
                tokens[name] = None
            elif isinstance(value, bool) or not isinstance(value, int):
                raise _bad(line, f"{name}: must be a JSON integer, not {json.dumps(value)[:40]}")
            else:
                tokens[name] = _check_tokens(name, value, line)
        return _record(line, _request_id(doc["request_id"], line), tokens)

    def finish(self, lines: int) -> None:
        return None


def upload_parser(content_type: str | None) -> CsvUsage | JsonLinesUsage:
    media, _, params = (content_type or "").partition(";")
    media = media.strip().lower()
    charset = next((p.split("=", 1)[1].strip().strip('"').lower() for p in params.split(";")
                    if p.strip().lower().startswith("charset=")), "utf-8")
    accepted = "text/csv or application/x-ndjson (also application/jsonl), UTF-8"
    if charset not in ("utf-8", "utf8"):
        raise TollhouseError(UNSUPPORTED_MEDIA_TYPE, f"header Content-Type: charset {charset!r}; send {accepted}")
    if media in CSV_TYPES:
        return CsvUsage()
    if media in JSONL_TYPES:
        return JsonLinesUsage()
    raise TollhouseError(
        UNSUPPORTED_MEDIA_TYPE, f"header Content-Type: {media[:80] or 'missing'!s}; send {accepted}"
    )


def _lines(buffer: bytearray) -> Iterator[bytes]:
    """Complete lines taken off the front of ``buffer`` (the incomplete rest stays)."""
    start = 0
    while True:
        end = buffer.find(b"\n", start)
        if end < 0:
            break
        yield bytes(buffer[start:end])
        start = end + 1
    del buffer[:start]


async def upstream_batches(
    chunks: AsyncIterator[bytes], parser: CsvUsage | JsonLinesUsage, *, max_bytes: int
) -> AsyncIterator[list[UpstreamRecord]]:
    """Records in batches of ``DIFF_BATCH_ROWS`` as the body streams in; bad input → 400 naming the line."""
    buffer = bytearray()
    size = 0
    line = 0
    batch: list[UpstreamRecord] = []

    def take(raw: bytes) -> None:
        nonlocal line
        line += 1
        if line == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _bad(line, f"not UTF-8 text (byte {exc.start + 1} of the line)") from None
        record = parser.parse(line, text)
        if record is not None:
            batch.append(record)

    async for chunk in chunks:
        size += len(chunk)
        if size > max_bytes:
            raise TollhouseError(
                PAYLOAD_TOO_LARGE,
                f"body: the upload is larger than the limit of {max_bytes} bytes (setting TOLLHOUSE_MAX_REQUEST_BYTES);"
                " split it into shorter windows",
            )
        buffer.extend(chunk)
        for raw in _lines(buffer):
            take(raw)
        if len(batch) >= DIFF_BATCH_ROWS:
            yield batch
            batch = []
    if buffer:
        take(bytes(buffer))
    parser.finish(line)
    if batch:
        yield batch
