"""The gateway's call path: authenticate, reserve at metering, forward upstream, meter.

Every call that reaches upstream yields exactly one usage event, spooled before the
call's reply ends: ``ok`` with upstream's ``usage``; ``error`` when upstream failed
(tokens 0 unless upstream reported usage); ``cancelled`` with an estimate when a stream
broke off or its client went away. A call that never reached upstream (refused, upstream
unreachable) yields none. When metering cannot answer, or the spool is full, the call is
refused with 503: the gateway never serves a call it cannot meter.

An inference call's fallback event (``cancelled``, the prompt estimate) is held in the
spool while the call goes upstream (its fsync overlaps the upstream request); the call's
own event replaces it at the end. A gateway that dies in between bills the fallback when
it starts again, rather than nothing.
"""

from __future__ import annotations

import asyncio
import functools
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import orjson
import structlog
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

from services.contracts import errors
from services.contracts.errors import ErrorKind, TollhouseError, error_body
from services.contracts.events import UsageEvent, build_usage_event
from services.gateway import metrics
from services.gateway.batches import TERMINAL_STATUS, BatchTracker, MultipartError, parse_multipart
from services.gateway.emitter import Emitter, Held
from services.gateway.http_client import ConnectFailed, HTTPClient, HTTPError
from services.gateway.http_client import Response as UpstreamReply
from services.gateway.metering_client import Authorization, KeyModels, MeteringClient, MeteringUnavailable
from services.gateway.spool import BatchRecord, FileRecord, Spool, SpoolError
from services.gateway.sse import SSEError, SSEParser
from services.gateway.usage import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    ZERO,
    StreamMeter,
    Usage,
    count_inputs,
    estimate_call,
    estimated_usage,
    reply_completion_bytes,
    summarize_batch_file,
    usage_from,
)
from services.settings import Settings

log = structlog.get_logger("tollhouse.gateway")

MAX_API_KEY_CHARS = 512
MAX_MODEL_CHARS = 256
MULTIPART_OVERHEAD = 64 * 1024  # room for the form fields around an uploaded file
MAX_ERROR_BODY_BYTES = 1024 * 1024
DRAIN_AFTER_DONE_SECONDS = 1.0  # a stream past [DONE]: the longest wait for its body to end
# Lists of files and batch jobs come from this gateway's ownership records, each object
# fetched from upstream: at most this many objects a page (the cursor pages on), and this
# many upstream requests at a time.
LIST_PAGE_MAX = 100
LIST_FETCHES_AT_ONCE = 16

# Request headers never forwarded: hop-by-hop, the caller's credentials (upstream gets
# the gateway's own key), compression (replies are read as they come), and what the
# client sets itself.
_DROP_REQUEST_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade",
    "proxy-authorization", "proxy-connection", "authorization", "x-api-key", "cookie", "accept-encoding",
    "expect", "openai-organization", "openai-project",
})
# Upstream response headers passed back. Upstream's rate-limit headers describe the
# gateway's upstream account, not the caller's key, so they are not passed.
_KEEP_RESPONSE_HEADERS = ("content-type", "x-request-id", "openai-processing-ms", "openai-version", "retry-after")

_REFUSALS: dict[str, ErrorKind] = {
    kind.error_code: kind
    for kind in (
        errors.INVALID_API_KEY, errors.KEY_REVOKED, errors.MODEL_NOT_ALLOWED, errors.MODEL_NOT_FOUND,
        errors.INVALID_REQUEST, errors.PACKAGE_EXHAUSTED, errors.PACKAGE_EXPIRED, errors.INSUFFICIENT_BALANCE,
        errors.DAILY_CAP_REACHED, errors.MONTHLY_CAP_REACHED, errors.UNAVAILABLE,
    )
}
_STATUS_BY_CODE = {3: 400, 5: 404, 7: 403, 8: 429, 14: 503, 16: 401}


def refusal_kind(reason: str, code: int) -> ErrorKind:
    """The DESIGN §6.1 error for a metering refusal (``reason`` is the ``error.code``)."""
    kind = _REFUSALS.get(reason)
    if kind is not None:
        return kind
    status = _STATUS_BY_CODE.get(code, 403)
    return ErrorKind(status, errors.Canonical(code) if code in errors.Canonical._value2member_map_
                     else errors.Canonical.PERMISSION_DENIED, reason or "refused", "invalid_request_error")


def api_key_of(request: Request) -> str:
    """``X-API-Key: sk-…`` or ``Authorization: Bearer sk-…``."""
    key = request.headers.get("x-api-key", "").strip()
    if not key:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else ""
    if not key or len(key) > MAX_API_KEY_CHARS:
        raise TollhouseError(
            errors.INVALID_API_KEY,
            "No valid API key given. Send it as 'Authorization: Bearer sk-…' or 'X-API-Key: sk-…'.",
        )
    return key


async def read_body(request: Request, limit: int, setting: str = "TOLLHOUSE_MAX_REQUEST_BYTES") -> bytes:
    too_large = TollhouseError(
        errors.PAYLOAD_TOO_LARGE, f"body: the request body is larger than the limit of {limit} bytes (setting {setting})")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise TollhouseError(errors.INVALID_REQUEST, "header Content-Length: not a number")
        if int(declared) > limit:
            raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_object(raw: bytes) -> dict:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise TollhouseError(errors.INVALID_REQUEST, f"body: not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(body, dict):
        raise TollhouseError(errors.INVALID_REQUEST, "body: must be a JSON object")
    return body


def _required_string(body: dict, field: str, limit: int) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise TollhouseError(errors.INVALID_REQUEST, f"body.{field}: is required and must be a non-empty string")
    if len(value) > limit:
        raise TollhouseError(errors.INVALID_REQUEST, f"body.{field}: at most {limit} characters")
    return value


def _forward_headers(request: Request, **extra: str) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k not in _DROP_REQUEST_HEADERS}
    headers.update(extra)
    return headers


def _reply_headers(upstream: UpstreamReply) -> dict[str, str]:
    return {name: upstream.headers[name] for name in _KEEP_RESPONSE_HEADERS if name in upstream.headers}


def _passthrough(upstream: UpstreamReply, content: bytes) -> Response:
    return Response(content, status_code=upstream.status_code, headers=_reply_headers(upstream))


def _upstream_error(upstream: UpstreamReply, content: bytes) -> Response:
    """Upstream's error, status and body, for the caller to see, except when upstream
    refused the gateway's own credentials (401/403): passed through, that would tell the
    caller their key is bad, so it is a 503 and an error in the gateway's log instead."""
    if upstream.status_code in (401, 403):
        log.error("upstream_refused_gateway_credentials", status=upstream.status_code,
                  body=content[:300].decode("utf-8", "replace"))
        return JSONResponse(error_body(errors.UNAVAILABLE, "The upstream model service refused the gateway's "
                                       "credentials; the operator has to fix TOLLHOUSE_UPSTREAM_API_KEY. Retry later."),
                            status_code=errors.UNAVAILABLE.http_status)
    return _passthrough(upstream, content)


class _Reply(msgspec.Struct):
    """The two fields of an upstream reply the meter needs; the rest is skipped unparsed."""

    id: str | None = None
    usage: dict | None = None


_decode_reply = msgspec.json.Decoder(_Reply).decode


def _read_reply(content: bytes) -> _Reply:
    try:
        return _decode_reply(content)
    except (msgspec.MsgspecError, UnicodeDecodeError):
        return _Reply()


def _unreachable(exc: HTTPError) -> TollhouseError:
    return TollhouseError(errors.UNAVAILABLE, f"The upstream model service is unavailable ({exc}). Retry shortly.")


def _never_sent(exc: HTTPError) -> bool:
    """The call did not reach upstream (so nothing was generated and nothing is billed)."""
    return isinstance(exc, ConnectFailed)


@dataclass(slots=True)
class Call:
    """One metered call: who makes it, what was reserved, what it is billed as."""

    endpoint: str
    model: str
    auth: Authorization
    prompt_estimate: int
    inputs: int
    kind: str = "request"
    started: float = 0.0
    held: Held | None = None  # the call's fallback event in the spool


class Proxy:
    def __init__(
        self,
        settings: Settings,
        metering: MeteringClient,
        upstream: HTTPClient,
        spool: Spool,
        emitter: Emitter,
        batches: BatchTracker,
    ) -> None:
        self.settings = settings
        self.metering = metering
        self.upstream = upstream
        self.spool = spool
        self.emitter = emitter
        self.batches = batches
        self.source = f"gateway/{settings.gateway_id}"

    # Admission

    def admit(self) -> None:
        if self.spool.full:
            raise TollhouseError(
                errors.UNAVAILABLE,
                f"The gateway cannot record usage right now (its usage spool holds {self.spool.events} events, "
                "the limit of TOLLHOUSE_SPOOL_MAX_EVENTS / TOLLHOUSE_SPOOL_MAX_BYTES). Retry shortly.",
            )

    async def authorize(self, request: Request, api_key: str, model: str, estimated_tokens: int) -> Authorization:
        try:
            auth = await self.metering.authorize(api_key, model, estimated_tokens)
        except MeteringUnavailable as exc:
            log.warning("metering_unavailable", error=str(exc))
            raise TollhouseError(errors.UNAVAILABLE,
                                 "Usage metering is unavailable, so the call was not made. Retry shortly.") from None
        if not auth.allowed:
            raise TollhouseError(refusal_kind(auth.reason, auth.code), auth.msg)
        if not auth.key_id or not auth.account_id:
            raise TollhouseError(errors.UNAVAILABLE, "Usage metering sent an incomplete answer. Retry shortly.")
        request.state.model = model
        return auth

    async def identify(self, api_key: str) -> KeyModels:
        """The key's owner and models, for calls that are not billed (listing, files, polling)."""
        try:
            key = await self.metering.key_models(api_key)
        except MeteringUnavailable as exc:
            log.warning("metering_unavailable", error=str(exc))
            raise TollhouseError(errors.UNAVAILABLE, "Usage metering is unavailable. Retry shortly.") from None
        if not key.allowed:
            raise TollhouseError(refusal_kind(key.reason, key.code), key.msg)
        return key

    # Events

    def usage_event(self, call: Call, usage: Usage, *, status: str, estimated: bool = False,
                    request_id: str | None = None) -> UsageEvent:
        assert call.auth.account_id and call.auth.key_id
        return build_usage_event(
            account_id=call.auth.account_id, key_id=call.auth.key_id, model=call.model,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens, reasoning_tokens=usage.reasoning_tokens,
            request_id=(request_id or f"{self.settings.gateway_id}-{uuid.uuid4().hex}")[:256],
            endpoint=call.endpoint, source=self.source,
            kind=call.kind, inputs=call.inputs, status=status, usage_estimated=estimated,
            reservation_id=call.auth.reservation_id,
        )

    async def meter(self, call: Call, usage: Usage, *, status: str, estimated: bool = False,
                    request_id: str | None = None) -> None:
        """Meter the call before its reply goes: with a fallback held, once that is on disk
        (the call's event replaces it as the reply is written, see ``Emitter.settle_soon``);
        otherwise once the event is. If neither can be spooled the reply is withheld (503)."""
        event = functools.partial(self.usage_event, call, usage, status=status, estimated=estimated,
                                  request_id=request_id)
        try:
            if call.held is not None:
                await self.emitter.settle_soon(call.held, event)
            else:
                await self.emitter.emit(event())
        except SpoolError as exc:
            log.error("usage_event_not_spooled", error=str(exc), account_id=call.auth.account_id)
            raise TollhouseError(errors.UNAVAILABLE,
                                 "The gateway could not record usage for this call. Retry shortly.") from None

    def hold(self, call: Call, *, streamed: bool = False) -> None:
        """Start holding the call's fallback event, as it goes upstream."""
        fallback = self.usage_event(call, estimated_usage(call.prompt_estimate, 0), status="cancelled",
                                    estimated=True)
        call.held = self.emitter.hold(fallback, streamed=streamed)

    async def record(self, call: Call, event: UsageEvent) -> None:
        """Spool the call's event: in place of its fallback if one is held."""
        if call.held is None:
            await self.emitter.emit(event)
        else:
            await self.emitter.settle(call.held, event)

    def _bill_fallback(self, call: Call) -> None:
        """The call ended without an event of its own (an error of the gateway's): bill its fallback."""
        if call.held is not None and not call.held.finished:
            self.emitter.detached(self.emitter.settle(call.held, call.held.fallback))

    # Inference: chat completions, completions, embeddings

    async def inference(self, request: Request, endpoint: str) -> Response:
        api_key = api_key_of(request)
        raw = await read_body(request, self.settings.max_request_bytes)
        body = parse_object(raw)
        model = _required_string(body, "model", MAX_MODEL_CHARS)
        stream = body.get("stream") if endpoint in (CHAT, COMPLETIONS) else None
        if stream is not None and not isinstance(stream, bool):
            raise TollhouseError(errors.INVALID_REQUEST, "body.stream: must be true or false")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise TollhouseError(errors.INVALID_REQUEST, "body.stream_options: must be a JSON object")
        if endpoint == CHAT and not isinstance(body.get("messages"), list):
            raise TollhouseError(errors.INVALID_REQUEST, "body.messages: is required and must be an array")
        if endpoint == EMBEDDINGS and "input" not in body:
            raise TollhouseError(errors.INVALID_REQUEST, "body.input: is required")
        if endpoint == COMPLETIONS and "prompt" not in body:
            raise TollhouseError(errors.INVALID_REQUEST, "body.prompt: is required")
        self.admit()
        prompt_estimate, reserve = estimate_call(endpoint, body, self.settings.default_completion_allowance)
        auth = await self.authorize(request, api_key, model, reserve)
        call = Call(endpoint, model, auth, prompt_estimate, count_inputs(endpoint, body), started=time.perf_counter())
        headers = _forward_headers(request, **{"content-type": "application/json"})
        try:
            if stream:
                wants_usage = bool(options) and options.get("include_usage") is True
                if not wants_usage:  # always ask upstream for usage; the chunk is dropped again below
                    body["stream_options"] = {**(options or {}), "include_usage": True}
                    raw = orjson.dumps(body)
                return await self._stream(call, raw, headers, wants_usage)
            return await self._unary(call, raw, headers)
        except BaseException:
            self._bill_fallback(call)
            raise

    async def _unary(self, call: Call, raw: bytes, headers: dict[str, str]) -> Response:
        path = call.endpoint.removeprefix("/v1/")
        try:
            upstream = await self.upstream.post(path, content=raw, headers=headers, on_sent=lambda: self.hold(call))
        except HTTPError as exc:
            raise await self._upstream_failed(call, exc) from None
        metrics.upstream_seconds_of(call.endpoint).observe(time.perf_counter() - call.started)
        return await self._finish_unary(call, upstream, upstream.content)

    async def _finish_unary(self, call: Call, upstream: UpstreamReply, content: bytes) -> Response:
        reply = _read_reply(content)
        request_id = reply.id or upstream.headers.get("x-request-id")
        usage = usage_from(reply.usage)
        if upstream.status_code >= 400:
            await self.meter(call, usage or ZERO, status="error", request_id=request_id)
            return _upstream_error(upstream, content)
        estimated = usage is None
        if usage is None:  # upstream sent no usage: bill an estimate rather than nothing
            try:
                generated = reply_completion_bytes(orjson.loads(content))
            except orjson.JSONDecodeError:
                generated = 0
            usage = estimated_usage(call.prompt_estimate, generated)
        await self.meter(call, usage, status="ok", estimated=estimated, request_id=request_id)
        return _passthrough(upstream, content)

    async def _upstream_failed(self, call: Call, exc: HTTPError) -> TollhouseError:
        """No (complete) answer from upstream: the 503 to raise. If the call may have run,
        it is an ``error`` event; if it never left the gateway, there is nothing to bill."""
        log.warning("upstream_failed", endpoint=call.endpoint, error=repr(exc))
        if not _never_sent(exc):
            await self.meter(call, ZERO, status="error")
        elif call.held is not None:
            await self.emitter.release(call.held)
        return _unreachable(exc)

    async def _stream(self, call: Call, raw: bytes, headers: dict[str, str], wants_usage: bool) -> Response:
        path = call.endpoint.removeprefix("/v1/")
        try:
            upstream = await self.upstream.request("POST", path, content=raw, headers=headers, stream=True,
                                                   on_sent=lambda: self.hold(call, streamed=True))
        except HTTPError as exc:
            raise await self._upstream_failed(call, exc) from None
        metrics.upstream_seconds_of(call.endpoint).observe(time.perf_counter() - call.started)
        if upstream.status_code >= 400 or "text/event-stream" not in upstream.headers.get("content-type", ""):
            try:
                content = await _read_limited(upstream, MAX_ERROR_BODY_BYTES if upstream.status_code >= 400 else None)
            except HTTPError as exc:
                raise await self._upstream_failed(call, exc) from None
            finally:
                await upstream.aclose()
            return await self._finish_unary(call, upstream, content)
        return MeteredStream(self, call, upstream, wants_usage)

    # Models

    async def list_models(self, request: Request) -> Response:
        key = await self.identify(api_key_of(request))
        data = [{"id": m.id, "object": "model", "created": m.created, "owned_by": "tollhouse"} for m in key.models]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def get_model(self, request: Request, model_id: str) -> Response:
        key = await self.identify(api_key_of(request))
        for m in key.models:
            if m.id == model_id:
                return Response(orjson.dumps({"id": m.id, "object": "model", "created": m.created,
                                              "owned_by": "tollhouse"}), media_type="application/json")
        raise TollhouseError(errors.MODEL_NOT_FOUND,
                             f"The model {model_id!r} does not exist or this key's tier may not use it. "
                             "Model ids are case-sensitive; GET /v1/models lists yours.")

    # Files

    async def upload_file(self, request: Request) -> Response:
        key = await self.identify(api_key_of(request))
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise TollhouseError(errors.INVALID_REQUEST, "body: a file upload must be multipart/form-data")
        raw = await read_body(request, self.settings.max_file_bytes + MULTIPART_OVERHEAD, "TOLLHOUSE_MAX_FILE_BYTES")
        try:
            form = parse_multipart(content_type, raw)
        except MultipartError as exc:
            raise TollhouseError(errors.INVALID_REQUEST, f"body: {exc}") from None
        purpose_part, file_part = form.get("purpose"), form.get("file")
        if file_part is None:
            raise TollhouseError(errors.INVALID_REQUEST, "body: the form has no 'file' field")
        purpose = purpose_part.content.decode("utf-8", "replace").strip() if purpose_part else ""
        summary = None
        if purpose == "batch":
            try:
                summary = summarize_batch_file(file_part.content, self.settings.default_completion_allowance)
            except ValueError as exc:
                raise TollhouseError(errors.INVALID_REQUEST, f"file: {exc}") from None
        try:
            upstream = await self.upstream.post(
                "files", content=raw, headers=_forward_headers(request, **{"content-type": content_type}))
        except HTTPError as exc:
            raise _unreachable(exc) from None
        content = upstream.content
        if upstream.status_code == 200:
            file_id = _read_reply(content).id
            if file_id:
                assert key.account_id and key.key_id
                await self.spool.record_file(FileRecord(
                    file_id, key.account_id, key.key_id, purpose, summary.model if summary else None,
                    summary.lines if summary else 0, summary.prompt_estimate if summary else 0,
                    summary.reserve_estimate if summary else 0))
        return _upstream_error(upstream, upstream.content)

    async def list_files(self, request: Request) -> Response:
        """The account's files, newest first (``order=asc`` for oldest first), ``purpose``
        filtered, paged with ``after``; each object as upstream has it now."""
        key = await self.identify(api_key_of(request))
        assert key.account_id
        query = request.query_params
        limit = min(_query_int(query.get("limit"), "limit", default=10_000, most=10_000), LIST_PAGE_MAX)
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise TollhouseError(errors.INVALID_REQUEST, "query order: must be 'asc' or 'desc'")
        purpose = query.get("purpose")

        async def page_of_records(after: str | None, size: int) -> list[FileRecord]:
            return await self.spool.account_files(key.account_id, after=after, limit=size,  # type: ignore[arg-type]
                                                  newest_first=order == "desc", purpose=purpose)

        async def upstream_file(record: FileRecord) -> dict | None:
            found = await self._upstream_object(request, f"files/{_segment(record.file_id)}")
            if found is None:  # deleted or expired upstream: no longer listed
                await self.spool.forget_file(record.file_id)
            return found

        files, more = await _owned_page(page_of_records, upstream_file, lambda r: r.file_id,
                                        query.get("after"), limit)
        return _list_reply(files, more)

    async def retrieve_file(self, request: Request, file_id: str) -> Response:
        await self._owned_file(request, file_id)
        upstream = await self._forward(request, "GET", f"files/{_segment(file_id)}")
        return _upstream_error(upstream, upstream.content)

    async def delete_file(self, request: Request, file_id: str) -> Response:
        await self._owned_file(request, file_id)
        upstream = await self._forward(request, "DELETE", f"files/{_segment(file_id)}")
        if upstream.status_code in (200, 404):  # gone either way
            await self.spool.forget_file(file_id)
        return _upstream_error(upstream, upstream.content)

    async def file_content(self, request: Request, file_id: str) -> Response:
        await self._owned_file(request, file_id)
        try:
            upstream = await self.upstream.request("GET", f"files/{_segment(file_id)}/content",
                                                   headers=_forward_headers(request), stream=True)
        except HTTPError as exc:
            raise _unreachable(exc) from None
        if upstream.status_code != 200:
            try:
                content = await _read_limited(upstream, MAX_ERROR_BODY_BYTES)
            finally:
                await upstream.aclose()
            return _upstream_error(upstream, content)
        return StreamingResponse(upstream.aiter_bytes(), status_code=200, headers=_reply_headers(upstream),
                                 background=BackgroundTask(upstream.aclose))

    async def _owned_file(self, request: Request, file_id: str) -> FileRecord:
        """The file's record, if the caller's account owns it (uploaded it, or its batch job
        wrote it); otherwise 404, as if it did not exist."""
        key = await self.identify(api_key_of(request))
        record = await self.spool.file(file_id)
        if record is None or record.account_id != key.account_id:
            raise TollhouseError(errors.NOT_FOUND, f"No file {file_id!r} belongs to this account.")
        return record

    # Batches

    async def create_batch(self, request: Request) -> Response:
        api_key = api_key_of(request)
        raw = await read_body(request, self.settings.max_request_bytes)
        body = parse_object(raw)
        file_id = _required_string(body, "input_file_id", 256)
        key = await self.identify(api_key)
        record = await self.spool.file(file_id)
        if record is None or record.account_id != key.account_id or record.purpose != "batch" or not record.model:
            raise TollhouseError(errors.NOT_FOUND,
                                 f"No batch input file {file_id!r} belongs to this account. Upload it with "
                                 "POST /v1/files (purpose 'batch') through this gateway first.")
        self.admit()
        auth = await self.authorize(request, api_key, record.model, record.reserve_estimate)
        call = Call("/v1/batches", record.model, auth, record.prompt_estimate, max(record.lines, 1), kind="batch",
                    started=time.perf_counter())
        try:
            upstream = await self.upstream.post(
                "batches", content=raw, headers=_forward_headers(request, **{"content-type": "application/json"}))
        except HTTPError as exc:
            raise await self._upstream_failed(call, exc) from None
        if upstream.status_code >= 400:
            reply = _read_reply(upstream.content)
            await self.meter(call, usage_from(reply.usage) or ZERO, status="error",
                             request_id=reply.id or upstream.headers.get("x-request-id"))
            return _upstream_error(upstream, upstream.content)
        batch = _json_or_none(upstream.content)
        batch_id = batch.get("id") if isinstance(batch, dict) else None
        if not isinstance(batch_id, str) or not batch_id:
            log.error("batch_without_id", status=upstream.status_code)
            raise TollhouseError(errors.UNAVAILABLE, "The upstream answered the batch request without a batch id.")
        assert auth.account_id and auth.key_id
        batch_record = BatchRecord(batch_id, auth.account_id, auth.key_id, record.model, file_id, record.lines,
                                   record.prompt_estimate, auth.reservation_id, None)
        await self.spool.record_batch(batch_record)
        if batch.get("status") in TERMINAL_STATUS:
            await self.batches.settle(batch_record, batch)
        return _passthrough(upstream, upstream.content)

    async def list_batches(self, request: Request) -> Response:
        """The account's batch jobs, newest first, paged with ``after``; each as upstream has
        it now (an ended job seen here is billed, as on ``GET``)."""
        key = await self.identify(api_key_of(request))
        assert key.account_id
        query = request.query_params
        limit = _query_int(query.get("limit"), "limit", default=20, most=LIST_PAGE_MAX)

        async def page_of_records(after: str | None, size: int) -> list[BatchRecord]:
            return await self.spool.account_batches(key.account_id, after=after, limit=size)  # type: ignore[arg-type]

        async def upstream_batch(record: BatchRecord) -> dict | None:
            batch = await self._upstream_object(request, f"batches/{_segment(record.batch_id)}")
            if batch is not None:
                await self._settle_if_ended(record, batch)
            return batch

        batches, more = await _owned_page(page_of_records, upstream_batch, lambda r: r.batch_id,
                                          query.get("after"), limit)
        return _list_reply(batches, more)

    async def get_batch(self, request: Request, batch_id: str) -> Response:
        return await self._batch_call(request, batch_id, "GET", f"batches/{_segment(batch_id)}")

    async def cancel_batch(self, request: Request, batch_id: str) -> Response:
        """Cancel at upstream. The job is billed once it has ended (``cancelled``, usually a
        little later): the lines it ran, as a ``cancelled`` event."""
        return await self._batch_call(request, batch_id, "POST", f"batches/{_segment(batch_id)}/cancel")

    async def _batch_call(self, request: Request, batch_id: str, method: str, path: str) -> Response:
        """A call on one job, only for the account that owns it (else 404); the job it
        answers with is billed if it has ended."""
        key = await self.identify(api_key_of(request))
        record = await self.spool.batch(batch_id)
        if record is None or record.account_id != key.account_id:
            raise TollhouseError(errors.NOT_FOUND, f"No batch {batch_id!r} belongs to this account.")
        upstream = await self._forward(request, method, path)
        if upstream.status_code == 200:
            await self._settle_if_ended(record, _json_or_none(upstream.content))
        return _upstream_error(upstream, upstream.content)

    async def _settle_if_ended(self, record: BatchRecord, batch: Any) -> None:
        if isinstance(batch, dict) and batch.get("status") in TERMINAL_STATUS:
            try:
                await self.batches.settle(record, batch)
            except Exception as exc:  # the poller bills it later; the caller still gets the job
                log.error("batch_settle_failed", batch_id=record.batch_id, error=repr(exc))

    # Upstream calls that are not billed

    async def _forward(self, request: Request, method: str, path: str) -> UpstreamReply:
        try:
            return await self.upstream.request(method, path, headers=_forward_headers(request))
        except HTTPError as exc:
            raise _unreachable(exc) from None

    async def _upstream_object(self, request: Request, path: str) -> dict | None:
        """One object for a list: None when upstream no longer has it; any other failure
        fails the list (503)."""
        upstream = await self._forward(request, "GET", path)
        if upstream.status_code == 404:
            return None
        found = _json_or_none(upstream.content) if upstream.status_code == 200 else None
        if not isinstance(found, dict):
            log.warning("upstream_list_object_failed", path=path, status=upstream.status_code)
            raise TollhouseError(errors.UNAVAILABLE, f"The upstream model service answered HTTP {upstream.status_code}"
                                 " for an object of this list. Retry shortly.")
        return found


Owned = TypeVar("Owned")


async def _owned_page(page_of_records: Callable[[str | None, int], Awaitable[Sequence[Owned]]],
                      fetch: Callable[[Owned], Awaitable[dict | None]], id_of: Callable[[Owned], str],
                      after: str | None, limit: int) -> tuple[list[dict], bool]:
    """Up to ``limit`` upstream objects for the account's records after ``after``, in
    record order, and whether more records follow. Records upstream no longer has are
    skipped (and the page filled from the next ones)."""
    objects: list[dict] = []
    gate = asyncio.Semaphore(LIST_FETCHES_AT_ONCE)

    async def fetch_gated(record: Owned) -> dict | None:
        async with gate:
            return await fetch(record)

    while True:
        wanted = limit - len(objects)
        records = await page_of_records(after, wanted + 1)
        taken = records[:wanted]
        found = await asyncio.gather(*(fetch_gated(r) for r in taken))
        objects.extend(o for o in found if o is not None)
        more = len(records) > wanted
        if not more or len(objects) >= limit:
            return objects, more
        after = id_of(taken[-1])


def _list_reply(objects: list[dict], more: bool) -> Response:
    return Response(orjson.dumps({
        "object": "list", "data": objects, "has_more": more,
        "first_id": objects[0].get("id") if objects else None, "last_id": objects[-1].get("id") if objects else None,
    }), media_type="application/json")


def _query_int(raw: str | None, name: str, *, default: int, most: int) -> int:
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        raise TollhouseError(errors.INVALID_REQUEST, f"query {name}: must be an integer in 1..{most}")
    return int(raw)


def _segment(object_id: str) -> str:
    """An id as one path segment of an upstream URL (a caller's id may hold '/', '?', …)."""
    return urllib.parse.quote(object_id, safe="")


def _json_or_none(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


async def _read_limited(upstream: UpstreamReply, limit: int | None) -> bytes:
    if limit is None:
        return await upstream.aread()
    chunks, size = [], 0
    async for chunk in upstream.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


_BROKEN_STREAM = b"data: " + orjson.dumps({"error": {
    "message": "The upstream stream broke off before it finished. The part sent was billed as an estimate.",
    "type": "server_error", "code": "unavailable"}}) + b"\n\n"


class MeteredStream(Response):
    """An SSE reply streamed through as upstream sends it, metered on the way.

    Events are forwarded as they complete (never the whole reply buffered); the usage-only
    chunk is dropped when the client did not ask for it. The usage event is spooled before
    ``data: [DONE]`` reaches the client. If upstream breaks off, the client gets an error
    event (OpenAI SDKs raise it) and the call is billed as an estimate; if the client goes
    away, the upstream request is closed and the call is billed as an estimate too.
    """

    def __init__(self, proxy: Proxy, call: Call, upstream: UpstreamReply, wants_usage: bool) -> None:
        self.proxy = proxy
        self.call = call
        self.upstream = upstream
        self.meter = StreamMeter(wants_usage)
        self.parser = SSEParser()
        self.metered = False
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        if "x-request-id" in upstream.headers:
            self.raw_headers.append((b"x-request-id", upstream.headers["x-request-id"].encode("latin-1")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        gone = asyncio.Event()
        pump: asyncio.Task | None = None
        watcher: asyncio.Task | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            pump = asyncio.create_task(self._pump(send), name="stream-pump")
            watcher = asyncio.create_task(self._watch(receive, pump, gone), name="stream-watch")
            await pump
        except asyncio.CancelledError:
            if not gone.is_set():
                if pump is not None:
                    pump.cancel()
                raise  # this request itself is being cancelled (shutdown); finally still meters
        except Exception as exc:
            log.error("stream_failed", endpoint=self.call.endpoint, error=repr(exc))
        finally:
            if watcher is not None:
                watcher.cancel()
            # After [DONE] only the end of the chunked body is left: wait for it, so the
            # connection goes back to the pool instead of a new one per stream.
            closing = asyncio.ensure_future(self.upstream.aclose(drain_seconds=DRAIN_AFTER_DONE_SECONDS
                                                                 if self.meter.done else 0.0))
            if not self.metered:  # the client went away (or the pump failed): bill what was streamed
                self.metered = True
                task = self.proxy.emitter.detached(self.proxy.record(self.call, self._event(client_gone=True)))
                try:
                    await asyncio.shield(task)
                except (asyncio.CancelledError, Exception):
                    pass  # the task finishes on its own; shutdown waits for it
            try:
                await asyncio.shield(closing)
            except (asyncio.CancelledError, Exception):
                pass

    async def _watch(self, receive: Receive, pump: asyncio.Task, gone: asyncio.Event) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not pump.done():
                    gone.set()
                    pump.cancel()
                return

    def _event(self, *, client_gone: bool) -> UsageEvent:
        meter, call, proxy = self.meter, self.call, self.proxy
        request_id = meter.response_id
        so_far = estimated_usage(call.prompt_estimate, meter.completion_bytes)
        if meter.usage is not None:  # upstream reported usage: the call completed
            return proxy.usage_event(call, meter.usage, status="ok", request_id=request_id)
        if client_gone:
            return proxy.usage_event(call, so_far, status="cancelled", estimated=True, request_id=request_id)
        if meter.error is not None:  # upstream reported an error inside the stream
            generated = bool(meter.completion_bytes)
            return proxy.usage_event(call, so_far if generated else ZERO, status="error", estimated=generated,
                                     request_id=request_id)
        if meter.done:  # finished, but upstream sent no usage chunk
            return proxy.usage_event(call, so_far, status="ok", estimated=True, request_id=request_id)
        # broken off before the end
        return proxy.usage_event(call, so_far, status="cancelled", estimated=True, request_id=request_id)

    async def _spool(self) -> None:
        self.metered = True
        await self.proxy.record(self.call, self._event(client_gone=False))

    async def _pump(self, send: Send) -> None:
        meter, parser = self.meter, self.parser
        try:
            async for chunk in self.upstream.aiter_bytes():
                out: list[bytes] = []
                for event in parser.feed(chunk):
                    if meter.done:
                        break
                    if event.is_done:
                        meter.observe(event)
                        if out:
                            await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                            out = []
                        await self._spool()  # durable before the client sees [DONE]
                        out.append(event.raw)
                    elif meter.observe(event):
                        out.append(event.raw)
                if out:
                    await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                if meter.done:
                    break
        except (HTTPError, SSEError) as exc:
            log.warning("upstream_stream_broke", endpoint=self.call.endpoint, error=repr(exc),
                        streamed_bytes=meter.completion_bytes)
        if not self.metered:
            await self._spool()
        broken = not meter.done and meter.usage is None and meter.error is None
        await send({"type": "http.response.body", "body": _BROKEN_STREAM if broken else b"", "more_body": False})
