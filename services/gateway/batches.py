"""Batch API jobs: one usage event per job (``kind: "batch"``), spooled exactly once when
the job ends, to the key that created it.

At creation the gateway records which key and account own the job (and the input file's
model and line count); the job is billed when the gateway sees it in a terminal state,
on a caller's ``GET /v1/batches/{id}`` or from the background poller, whichever comes
first. The spool marks the job and stores its event in one SQLite transaction, so
concurrent polls and restarts never bill it twice.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import orjson
import structlog

from services.contracts.events import build_usage_event
from services.gateway.emitter import Emitter
from services.gateway.http_client import HTTPClient, HTTPError
from services.gateway.spool import BatchRecord, FileRecord, Spool
from services.gateway.usage import Usage, usage_from
from services.settings import Settings

log = structlog.get_logger("tollhouse.gateway.batches")

BATCH_ENDPOINT = "/v1/batches"
POLL_PAGE = 100
MAX_OUTPUT_FILE_BYTES = 512 * 1024 * 1024

# Terminal job states → the usage event's status. Expired and cancelled jobs still bill
# the requests they completed.
TERMINAL_STATUS = {"completed": "ok", "expired": "cancelled", "cancelled": "cancelled", "failed": "error"}
_ENDED_AT = ("completed_at", "failed_at", "expired_at", "cancelled_at")


class MultipartError(ValueError):
    pass


class FormPart:
    __slots__ = ("name", "filename", "content")

    def __init__(self, name: str, filename: str | None, content: bytes) -> None:
        self.name = name
        self.filename = filename
        self.content = content


def parse_multipart(content_type: str, body: bytes) -> dict[str, FormPart]:
    """The parts of a ``multipart/form-data`` body by field name (the gateway forwards the
    body untouched; it reads the form only to learn the purpose and a batch file's model)."""
    boundary = None
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise MultipartError("Content-Type multipart/form-data has no boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    parts: dict[str, FormPart] = {}
    segments = body.split(delimiter)
    if len(segments) < 3:
        raise MultipartError("the multipart body has no complete part")
    for segment in segments[1:]:
        if segment.startswith(b"--"):
            break  # the closing delimiter
        segment = segment[2:] if segment.startswith(b"\r\n") else segment
        segment = segment[:-2] if segment.endswith(b"\r\n") else segment
        head, separator, content = segment.partition(b"\r\n\r\n")
        if not separator:
            raise MultipartError("a multipart part has no header block")
        name, filename = None, None
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() != "content-disposition":
                continue
            for item in value.split(";")[1:]:
                k, _, v = item.strip().partition("=")
                if k.lower() == "name":
                    name = v.strip().strip('"')
                elif k.lower() == "filename":
                    filename = v.strip().strip('"')
        if name:
            parts[name] = FormPart(name, filename, content)
    return parts


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class BatchTracker:
    def __init__(self, settings: Settings, spool: Spool, emitter: Emitter, upstream: HTTPClient) -> None:
        self.settings = settings
        self.spool = spool
        self.emitter = emitter
        self.upstream = upstream
        self.source = f"gateway/{settings.gateway_id}"

    async def settle(self, record: BatchRecord, batch: dict) -> bool:
        """Spool the job's usage event if it has ended and was not billed yet. True when
        this call spooled it."""
        status = TERMINAL_STATUS.get(batch.get("status"))  # type: ignore[arg-type]
        if status is None or record.emitted_event_id is not None:
            return False  # running, or billed (its result files were recorded before that)
        await self._own_result_files(record, batch)
        counts = batch.get("request_counts") if isinstance(batch.get("request_counts"), dict) else {}
        usage, estimated = usage_from(batch.get("usage")), False
        if usage is None:
            usage = await self._usage_from_output(batch)
        if usage is None:  # nothing to go by: bill an estimate of the work done rather than nothing
            usage, estimated = Usage(estimated_prompt_done(record.prompt_estimate, status, counts), 0), True
        inputs = max(1, _int(counts.get("total")) or record.lines)
        event = build_usage_event(
            account_id=record.account_id, key_id=record.key_id, model=record.model,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            cached_tokens=usage.cached_tokens, reasoning_tokens=usage.reasoning_tokens,
            request_id=record.batch_id, endpoint=BATCH_ENDPOINT, source=self.source, kind="batch",
            inputs=inputs, status=status, usage_estimated=estimated, reservation_id=record.reservation_id,
            time=_ended_at(batch),
        )
        added = await self.emitter.emit_batch(record.batch_id, event)
        if added:
            log.info("batch_billed", batch_id=record.batch_id, account_id=record.account_id,
                     status=status, inputs=inputs, total_tokens=usage.total_tokens)
        return added

    async def _own_result_files(self, record: BatchRecord, batch: dict) -> None:
        """The job's output and error files belong to the job's account."""
        for field in ("output_file_id", "error_file_id"):
            file_id = batch.get(field)
            if isinstance(file_id, str) and file_id:
                await self.spool.record_file(FileRecord(
                    file_id, record.account_id, record.key_id, f"batch_{field.split('_')[0]}", None, 0, 0, 0))

    async def _usage_from_output(self, batch: dict) -> Usage | None:
        """Sum the ``usage`` of each answered line of the output file (when the job object
        carries no ``usage`` of its own)."""
        file_id = batch.get("output_file_id")
        if not isinstance(file_id, str) or not file_id:
            return None
        try:
            response = await self.upstream.get(f"files/{quote(file_id, safe='')}/content")
        except HTTPError as exc:
            log.warning("batch_output_unreadable", file_id=file_id, error=repr(exc))
            return None
        if response.status_code != 200 or len(response.content) > MAX_OUTPUT_FILE_BYTES:
            return None
        prompt = completion = cached = reasoning = 0
        for line in response.content.splitlines():
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            body = ((row.get("response") or {}).get("body") or {}) if isinstance(row, dict) else {}
            usage = usage_from(body.get("usage")) if isinstance(body, dict) else None
            if usage is not None:
                prompt += usage.prompt_tokens
                completion += usage.completion_tokens
                cached += usage.cached_tokens
                reasoning += usage.reasoning_tokens
        return Usage(prompt, completion, cached, reasoning)

    # The background poller: bills jobs nobody asks about.

    async def poll_once(self) -> int:
        """Look at every unbilled job once; return how many were billed."""
        billed = 0
        for record in await self.spool.pending_batches(POLL_PAGE):
            try:
                response = await self.upstream.get(f"batches/{quote(record.batch_id, safe='')}")
            except HTTPError as exc:
                log.warning("batch_poll_failed", batch_id=record.batch_id, error=repr(exc))
                return billed  # upstream is down: try again next round
            if response.status_code != 200:
                log.warning("batch_poll_refused", batch_id=record.batch_id, status=response.status_code)
                continue
            try:
                batch = orjson.loads(response.content)
            except orjson.JSONDecodeError:
                continue
            if isinstance(batch, dict) and await self.settle(record, batch):
                billed += 1
        return billed

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll_once()
            except Exception as exc:  # keep polling; the next round retries
                log.error("batch_poller_failed", error=repr(exc))
            try:
                await asyncio.wait_for(stop.wait(), self.settings.batch_poll_seconds)
            except asyncio.TimeoutError:
                pass


def estimated_prompt_done(prompt_estimate: int, status: str, counts: dict) -> int:
    """Prompt tokens of the lines a job ran, from the upload's estimate, for a job that
    reports no usage: all of them when it completed, none when it failed, the completed
    share when it was cancelled or expired (all of them when it does not say)."""
    if status == "error":
        return 0
    total, completed = _int(counts.get("total")), _int(counts.get("completed"))
    if status == "ok" or not total or completed is None:
        return prompt_estimate
    return prompt_estimate * min(completed, total) // total


def _ended_at(batch: dict) -> datetime:
    """When the job ended (its event time), never later than now."""
    now = datetime.now(timezone.utc)
    for field in _ENDED_AT:
        value = batch.get(field)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            try:
                return min(datetime.fromtimestamp(value, timezone.utc), now)
            except (OverflowError, OSError, ValueError):
                break
    return now
