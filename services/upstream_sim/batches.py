"""The Batch API: a job validates its input file, runs each line through the simulated model
(the same code as the online endpoints), and writes an output file and an error file.

Jobs run in the background on the server's event loop, yielding every few hundred lines so
online requests are still served while a 50,000-line batch runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.upstream_sim.errors import SimError, invalid_request, not_found
from services.upstream_sim.files import FileStore
from services.upstream_sim.replies import ID_PREFIXES, Options, Usage, answer
from services.upstream_sim.state import IdMint, UsageLog

ENDPOINTS = tuple(ID_PREFIXES)
COMPLETION_WINDOW = "24h"
MAX_REPORTED_ERRORS = 100  # validation errors listed on a failed batch


@dataclass
class Batch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: int
    status: str = "validating"
    model: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    usage: Usage = field(default_factory=Usage)
    times: dict[str, int] = field(default_factory=dict)  # in_progress_at, completed_at, …
    cancel_requested: bool = False
    woken: asyncio.Event = field(default_factory=asyncio.Event)  # set on cancel: ends the delay early

    def stamp(self, status: str, at: str) -> None:
        self.status = status
        self.times[at] = int(time.time())

    def as_openai(self) -> dict[str, Any]:
        usage = self.usage
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.times.get("in_progress_at"),
            "expires_at": self.created_at + 86_400,
            "finalizing_at": self.times.get("finalizing_at"),
            "completed_at": self.times.get("completed_at"),
            "failed_at": self.times.get("failed_at"),
            "expired_at": None,
            "cancelling_at": self.times.get("cancelling_at"),
            "cancelled_at": self.times.get("cancelled_at"),
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            # OpenAI's names (input/output), and the chat names beside them: the same numbers.
            "usage": {
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
                "total_tokens": usage.total_tokens,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
            },
            "metadata": self.metadata,
        }


@dataclass
class _Line:
    custom_id: str
    body: Any


class BatchRunner:
    def __init__(self, files: FileStore, mint: IdMint, usage_log: UsageLog, options: Options, *, max_lines: int,
                 max_batches: int, yield_every: int) -> None:
        self.files = files
        self.mint = mint
        self.usage_log = usage_log
        self.options = options
        self.max_lines = max_lines
        self.max_batches = max_batches
        self.yield_every = yield_every
        self._batches: dict[str, Batch] = {}
        self._tasks: set[asyncio.Task] = set()

    def create(self, body: Any, *, delay_seconds: float = 0.0, line_delay_seconds: float = 0.0) -> Batch:
        if not isinstance(body, dict):
            raise invalid_request("The request body must be a JSON object.")
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str):
            raise invalid_request("'input_file_id' is required.", param="input_file_id")
        stored = self.files.get(input_file_id)
        if stored.purpose != "batch":
            raise invalid_request(f"File {input_file_id} has purpose '{stored.purpose}'; a batch needs 'batch'.",
                                  param="input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise invalid_request(f"'endpoint' must be one of {', '.join(ENDPOINTS)}.", param="endpoint")
        window = body.get("completion_window")
        if window != COMPLETION_WINDOW:
            raise invalid_request(f"'completion_window' must be '{COMPLETION_WINDOW}'.", param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16
                                         and all(isinstance(v, str) for v in metadata.values())):
            raise invalid_request("'metadata' must be an object of at most 16 string values.", param="metadata")
        if len(self._batches) >= self.max_batches:
            raise SimError(507, f"The simulator holds {len(self._batches)} batches, its limit; restart it.",
                           type="server_error", code="storage_full")
        batch = Batch(id=self.mint("batch_"), input_file_id=input_file_id, endpoint=endpoint,
                      completion_window=window, metadata=metadata, created_at=int(time.time()))
        self._batches[batch.id] = batch
        task = asyncio.get_running_loop().create_task(
            self._run(batch, stored.content, delay_seconds, line_delay_seconds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return batch

    def get(self, batch_id: str) -> Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise not_found(f"No such batch: {batch_id}", code="batch_not_found")
        return batch

    def list(self) -> list[Batch]:
        return list(self._batches.values())

    def cancel(self, batch_id: str) -> Batch:
        batch = self.get(batch_id)
        if batch.status in ("validating", "in_progress"):
            batch.cancel_requested = True
            batch.woken.set()
            batch.stamp("cancelling", "cancelling_at")
        elif batch.status not in ("cancelling", "cancelled"):
            raise SimError(409, f"Batch {batch_id} is {batch.status}; it cannot be cancelled.",
                           type="invalid_request_error", code="batch_not_cancellable")
        return batch

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------ the job

    async def _validate(self, batch: Batch, content: bytes) -> list[_Line] | None:
        errors: list[dict[str, Any]] = []

        def error(code: str, message: str, line: int | None = None, param: str | None = None) -> None:
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append({"code": code, "message": message, "param": param, "line": line})

        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:
            error("invalid_file_format", "The input file is not UTF-8.")
            text = ""
        lines: list[_Line] = []
        seen: set[str] = set()
        numbered = [(n, raw) for n, raw in enumerate(text.splitlines(), start=1) if raw.strip()]
        if not numbered and not errors:
            error("empty_file", "The input file has no requests.")
        if len(numbered) > self.max_lines:
            error("too_many_requests", f"The input file has {len(numbered)} requests; the limit is {self.max_lines}.")
            numbered = []
        for n, raw in numbered:
            if n % self.yield_every == 0:
                await asyncio.sleep(0)
            try:
                request = orjson.loads(raw)
            except orjson.JSONDecodeError:
                error("invalid_json_line", "This line is not valid JSON.", n)
                continue
            if not isinstance(request, dict):
                error("invalid_json_line", "This line is not a JSON object.", n)
                continue
            custom_id = request.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                error("missing_required_parameter", "'custom_id' is required.", n, "custom_id")
            elif custom_id in seen:
                error("duplicate_custom_id", f"custom_id '{custom_id}' appears more than once.", n, "custom_id")
            seen.add(custom_id)  # type: ignore[arg-type]
            if request.get("method") != "POST":
                error("invalid_method", "'method' must be 'POST'.", n, "method")
            if request.get("url") != batch.endpoint:
                error("mismatched_endpoint", f"'url' must be the batch's endpoint, {batch.endpoint}.", n, "url")
            if not isinstance(request.get("body"), dict):
                error("missing_required_parameter", "'body' must be an object.", n, "body")
            lines.append(_Line(custom_id, request.get("body")))  # type: ignore[arg-type]
        if errors:
            batch.errors = errors
            batch.stamp("failed", "failed_at")
            return None
        return lines

    async def _run(self, batch: Batch, content: bytes, delay_seconds: float, line_delay_seconds: float) -> None:
        await asyncio.sleep(0)  # the create call answers "validating" first
        lines = await self._validate(batch, content)
        if lines is None:
            return
        batch.total = len(lines)
        if batch.cancel_requested:
            batch.stamp("cancelled", "cancelled_at")
            return
        batch.stamp("in_progress", "in_progress_at")
        await _wait_unless_cancelled(batch, delay_seconds)
        output: list[bytes] = []
        failures: list[bytes] = []
        created = int(time.time())
        for i, line in enumerate(lines):
            if line_delay_seconds > 0:
                await _wait_unless_cancelled(batch, line_delay_seconds)
            elif i % self.yield_every == 0 and i:
                await asyncio.sleep(0)
            if batch.cancel_requested:
                break
            request_id = self.mint("batch_req_")
            try:
                reply_id = self.mint(ID_PREFIXES[batch.endpoint])
                body, usage, _ = answer(batch.endpoint, line.body, self.options, reply_id, created)
            except SimError as exc:
                batch.failed += 1
                failures.append(orjson.dumps({
                    "id": request_id, "custom_id": line.custom_id,
                    "response": {"status_code": exc.status, "request_id": request_id, "body": exc.body()},
                    "error": None,
                }))
                continue
            batch.completed += 1
            batch.usage.add(usage)
            batch.model = batch.model or body.get("model")
            output.append(orjson.dumps({
                "id": request_id, "custom_id": line.custom_id,
                "response": {"status_code": 200, "request_id": request_id, "body": body},
                "error": None,
            }))
        if batch.cancel_requested:
            batch.stamp("cancelled", "cancelled_at")
        else:
            batch.stamp("finalizing", "finalizing_at")
        try:
            if output:
                batch.output_file_id = self.files.add(self.mint("file-"), f"{batch.id}_output.jsonl",
                                                      "batch_output", b"\n".join(output) + b"\n").id
            if failures:
                batch.error_file_id = self.files.add(self.mint("file-"), f"{batch.id}_error.jsonl",
                                                     "batch_output", b"\n".join(failures) + b"\n").id
        except SimError as exc:
            batch.errors = [{"code": exc.code, "message": exc.message, "param": None, "line": None}]
            batch.stamp("failed", "failed_at")
            return
        if batch.status == "finalizing":
            batch.stamp("completed", "completed_at")
        # A batch job is one request, whatever its number of lines (DESIGN §1).
        self.usage_log.record(batch.id, "/v1/batches", batch.model or "", batch.usage, inputs=batch.completed,
                              kind="batch", status=batch.status)


async def _wait_unless_cancelled(batch: Batch, seconds: float) -> None:
    """Sleep ``seconds`` (a slow job), ending early when the batch is cancelled."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(batch.woken.wait(), seconds)
