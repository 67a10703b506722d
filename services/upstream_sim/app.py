"""The simulated upstream's HTTP face: OpenAI's routes, the X-Sim-* failure switches, SSE.

Any ``Authorization`` is accepted. Everything under ``/v1`` goes through the same prelude:
read the switches (config defaults, overridden per request by headers), wait the latency,
answer with the asked-for (or randomly drawn) error. With the switches at zero it does no
artificial work, so the simulator can stand as the baseline of a gateway benchmark.

Per-request headers:

``X-Sim-Latency-Ms: N``      wait N ms before answering
``X-Sim-Chunk-Delay-Ms: N``  wait N ms between two stream chunks
``X-Sim-Error: S``           answer with HTTP status S (4xx/5xx) and an OpenAI-shaped error
``X-Sim-Break-After: N``     streams: close the connection after N content chunks, without the
                             finish chunk, the usage chunk or ``[DONE]``; non-streaming: send
                             the headers and half the body, then close
``X-Sim-Reply-Tokens: N``    a reply of exactly N tokens (before ``max_tokens``)
``X-Sim-Cached-Tokens: N``   report N cached prompt tokens (at most the prompt)
``X-Sim-Batch-Delay-Ms: N``  POST /v1/batches: stay in_progress N ms before running
``X-Sim-Batch-Line-Delay-Ms: N``  POST /v1/batches: each line takes N ms to run
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.event_loop import watching_event_loop
from services.upstream_sim import replies
from services.upstream_sim.batches import BatchRunner
from services.upstream_sim.config import SimConfig
from services.upstream_sim.errors import SimError, invalid_request, simulated
from services.upstream_sim.files import PURPOSES, FileStore, parse_multipart
from services.upstream_sim.replies import Options, Plan, StreamEvent, Usage
from services.upstream_sim.state import IdMint, UsageLog

DONE = b"data: [DONE]\n\n"
MULTIPART_OVERHEAD = 64 * 1024  # room for the form fields around an uploaded file
USAGE_PAGE_MAX = 10_000
FILES_PAGE_MAX = 10_000  # OpenAI's limits of one list page
BATCHES_PAGE_MAX = 100


@dataclasses.dataclass(frozen=True)
class Switches:
    latency_ms: int
    chunk_delay_ms: int
    error: int | None
    break_after: int | None
    batch_delay_ms: int
    batch_line_delay_ms: int
    options: Options


# The two generative endpoints: how a request is planned, answered whole, and streamed.
_GENERATIVE = {
    "/v1/chat/completions": (replies.plan_chat, replies.chat_response, replies.chat_stream_events),
    "/v1/completions": (replies.plan_completions, replies.completions_response, replies.completions_stream_events),
}


# ---------------------------------------------------------------- responses


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json", headers=headers)


def error_response(exc: SimError) -> Response:
    return json_response(exc.body(), exc.status, exc.headers)


class EventStream(Response):
    """Server-sent events, one ``send`` per chunk; ``complete=False`` stops without ending
    the body, so the server closes the connection mid-stream (a broken upstream)."""

    media_type = "text/event-stream"

    def __init__(self, chunks: list[bytes], *, complete: bool, chunk_delay_ms: int, request_id: str) -> None:
        self.status_code = 200
        self.background = None
        self.chunks = chunks
        self.complete = complete
        self.chunk_delay = chunk_delay_ms / 1000
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-request-id", request_id.encode()),
        ]

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        if self.chunk_delay:
            await self._send_slowly(receive, send)
        else:
            for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if self.complete:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_slowly(self, receive, send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            for chunk in self.chunks:
                await asyncio.sleep(self.chunk_delay)
                if gone.is_set():
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            watcher.cancel()


class BrokenBody(Response):
    """Headers promising the whole body, then half of it, then the connection is closed."""

    def __init__(self, body: bytes, request_id: str) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.raw_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
        ]

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[: len(self.body) // 2], "more_body": True})


def _sse(event: dict) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


# ---------------------------------------------------------------- the simulator


class Simulator:
    """State and request plumbing shared by the routes; one per app."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.options = Options(reply_tokens=config.reply_tokens, embedding_dimensions=config.embedding_dimensions,
                               max_choices=config.max_choices, max_reply_tokens=config.max_reply_tokens)
        self.defaults = Switches(config.latency_ms, config.chunk_delay_ms, None, None, config.batch_delay_ms,
                                 config.batch_line_delay_ms, self.options)
        self.random = random.Random(config.seed)
        self.mint = IdMint()
        self.usage_log = UsageLog(config.usage_log_max)
        self.files = FileStore(max_file_bytes=config.max_file_bytes, max_stored_bytes=config.max_stored_bytes,
                               max_files=config.max_files)
        self.batches = BatchRunner(self.files, self.mint, self.usage_log, self.options,
                                   max_lines=config.max_batch_lines, max_batches=config.max_batches,
                                   yield_every=config.batch_yield_every)
        self.requests: Counter[tuple[str, int]] = Counter()
        self.tokens: Counter[str] = Counter()

    # ------------------------------------------------------------ the prelude of every /v1 route

    def switches(self, request: Request) -> Switches:
        found: dict[str, str] = {}
        for name, value in request.scope["headers"]:
            if name.startswith(b"x-sim-"):
                found[name.decode("latin-1")] = value.decode("latin-1")
        if not found:
            return self.defaults
        config = self.config

        def number(header: str, upper: int) -> int | None:
            raw = found.get(header)
            if raw is None:
                return None
            raw = raw.strip()
            if not (raw.isascii() and raw.isdigit()) or int(raw) > upper:
                raise invalid_request(f"Header {header} must be an integer in 0..{upper}, got {raw!r}.",
                                      code="invalid_sim_header")
            return int(raw)

        def milliseconds(header: str, default: int) -> int:
            value = number(header, config.max_latency_ms)
            return default if value is None else value

        error = number("x-sim-error", 599)
        if error is not None and error < 400:
            raise invalid_request(f"Header x-sim-error must be an HTTP status in 400..599, got {error}.",
                                  code="invalid_sim_header")
        options = self.options
        reply_tokens = number("x-sim-reply-tokens", config.max_reply_tokens)
        cached_tokens = number("x-sim-cached-tokens", 10**12)
        if reply_tokens is not None or cached_tokens is not None:
            options = dataclasses.replace(
                options,
                reply_tokens=options.reply_tokens if reply_tokens is None else reply_tokens,
                cached_tokens=cached_tokens,
            )
        return Switches(
            latency_ms=milliseconds("x-sim-latency-ms", config.latency_ms),
            chunk_delay_ms=milliseconds("x-sim-chunk-delay-ms", config.chunk_delay_ms),
            error=error,
            break_after=number("x-sim-break-after", 10**9),
            batch_delay_ms=milliseconds("x-sim-batch-delay-ms", config.batch_delay_ms),
            batch_line_delay_ms=milliseconds("x-sim-batch-line-delay-ms", config.batch_line_delay_ms),
            options=options,
        )

    async def prelude(self, request: Request) -> Switches:
        switches = self.switches(request)
        if switches.latency_ms:
            await asyncio.sleep(switches.latency_ms / 1000)
        if switches.error is not None:
            raise simulated(switches.error)
        if self.config.error_rate and self.random.random() < self.config.error_rate:
            raise simulated(500)
        return switches

    def route(self, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Response]]:
        """Wrap a ``/v1`` route: the prelude first (its switches in ``request.state.switches``),
        then the handler; what it returns is sent as JSON unless it is a response already, and
        counted as a 200. (FastAPI reads the handler's own parameters through ``__wrapped__``.)"""

        @functools.wraps(handler)
        async def run(request: Request, **params: Any) -> Response:
            request.state.switches = await self.prelude(request)
            answer = await handler(request, **params)
            self.count(request, 200)
            return answer if isinstance(answer, Response) else json_response(answer)

        return run

    async def read_body(self, request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        too_large = SimError(413, f"The request body is larger than the simulator's limit of {limit} bytes.",
                             type="invalid_request_error", code="request_too_large")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_json(self, request: Request) -> Any:
        raw = await self.read_body(request, self.config.max_request_bytes)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise invalid_request("We could not parse the JSON body of your request. Send valid JSON.") from None
        if not isinstance(body, dict):
            raise invalid_request("The request body must be a JSON object.")
        return body

    # ------------------------------------------------------------ bookkeeping

    def count(self, request: Request, status: int) -> None:
        route = request.scope.get("route")
        self.requests[(getattr(route, "path", "unmatched"), status)] += 1

    def served(self, request_id: str, endpoint: str, model: str, usage: Usage, inputs: int,
               status: str = "ok") -> None:
        self.usage_log.record(request_id, endpoint, model, usage, inputs=inputs, status=status)
        self.tokens["prompt"] += usage.prompt_tokens
        self.tokens["completion"] += usage.completion_tokens

    # ------------------------------------------------------------ answers

    async def generate(self, request: Request, endpoint: str) -> Response:
        """Chat completions and completions: plan the reply, then send it whole or as a stream."""
        switches: Switches = request.state.switches
        body = await self.read_json(request)
        stream, include_usage = _stream_flags(body)
        plan_reply, whole, stream_events = _GENERATIVE[endpoint]
        plan = plan_reply(body, switches.options)
        request_id = self.mint(replies.ID_PREFIXES[endpoint])
        created = int(time.time())
        if stream:
            events = stream_events(plan, request_id, created, include_usage=include_usage)
            return self.stream(switches, request_id, endpoint, plan, events)
        return self.reply(switches, request_id, endpoint, whole(plan, request_id, created), plan.usage, plan.model,
                          plan.inputs)

    def reply(self, switches: Switches, request_id: str, endpoint: str, content: dict, plan_usage: Usage,
              model: str, inputs: int) -> Response:
        if switches.break_after is not None:
            # The model finished; only the transfer breaks, so the whole usage was incurred.
            self.served(request_id, endpoint, model, plan_usage, inputs, status="broken")
            return BrokenBody(orjson.dumps(content), request_id)
        self.served(request_id, endpoint, model, plan_usage, inputs)
        return json_response(content, headers={"x-request-id": request_id})

    def stream(self, switches: Switches, request_id: str, endpoint: str, plan: Plan,
               events: list[StreamEvent]) -> Response:
        chunks = [_sse(event) for _, event in events]
        if switches.break_after is None:
            self.served(request_id, endpoint, plan.model, plan.usage, plan.inputs)
            chunks.append(DONE)
            return EventStream(chunks, complete=True, chunk_delay_ms=switches.chunk_delay_ms, request_id=request_id)
        # Cut right after the N-th content chunk (after the last one, if there are fewer; before
        # the first one for N = 0): no finish chunk, no usage chunk, no [DONE].
        positions = [i for i, (is_content, _) in enumerate(events) if is_content]
        sent = min(switches.break_after, len(positions))
        if not positions:
            cut = 1
        elif sent == 0:
            cut = positions[0]
        else:
            cut = positions[sent - 1] + 1
        usage = Usage(prompt_tokens=plan.usage.prompt_tokens, completion_tokens=sent + plan.usage.reasoning_tokens,
                      cached_tokens=plan.usage.cached_tokens, reasoning_tokens=plan.usage.reasoning_tokens)
        self.served(request_id, endpoint, plan.model, usage, plan.inputs, status="broken")
        return EventStream(chunks[:cut], complete=False, chunk_delay_ms=switches.chunk_delay_ms,
                           request_id=request_id)

    def metrics_text(self) -> str:
        lines = ["# TYPE tollhouse_sim_requests_total counter"]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'tollhouse_sim_requests_total{{route="{route}",status="{status}"}} {n}')
        lines.append("# TYPE tollhouse_sim_tokens_total counter")
        for kind in ("prompt", "completion"):
            lines.append(f'tollhouse_sim_tokens_total{{kind="{kind}"}} {self.tokens[kind]}')
        return "\n".join(lines) + "\n"


def _stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream?, include_usage?) as OpenAI reads them."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_request("'stream' must be a boolean.", param="stream")
    stream_options = body.get("stream_options")
    if stream_options is None:
        return bool(stream), False
    if not stream:
        raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              param="stream_options")
    if not isinstance(stream_options, dict):
        raise invalid_request("'stream_options' must be an object.", param="stream_options")
    return True, stream_options.get("include_usage") is True


# ---------------------------------------------------------------- the app


def create_app(config: SimConfig | None = None) -> FastAPI:
    config = config or SimConfig()
    sim = Simulator(config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with watching_event_loop("upstream-sim"):
            yield
        await sim.batches.stop()

    app = FastAPI(title="Tollhouse upstream simulator", version="1", lifespan=lifespan,
                  description="An OpenAI-compatible model server with deterministic replies, for "
                              "development, tests and benchmarks. See docs/upstream-sim.md.")
    app.state.sim = sim

    @app.exception_handler(SimError)
    async def _sim_error(request: Request, exc: SimError) -> Response:
        sim.count(request, exc.status)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(SimError(exc.status_code, message, type="invalid_request_error", code=code))

    @app.exception_handler(RequestValidationError)
    async def _query_error(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(invalid_request(f"Invalid parameters: {problems}."))

    # ------------------------------------------------------------ inference

    @app.post("/v1/chat/completions")
    @sim.route
    async def chat_completions(request: Request) -> Response:
        return await sim.generate(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    @sim.route
    async def completions(request: Request) -> Response:
        return await sim.generate(request, "/v1/completions")

    @app.post("/v1/embeddings")
    @sim.route
    async def embeddings(request: Request) -> Response:
        body = await sim.read_json(request)
        content, usage, inputs = replies.embeddings_response(body, request.state.switches.options)
        request_id = sim.mint(replies.ID_PREFIXES["/v1/embeddings"])
        return sim.reply(request.state.switches, request_id, "/v1/embeddings", content, usage, content["model"],
                         inputs)

    @app.get("/v1/models")
    @sim.route
    async def list_models(request: Request) -> Any:
        return {"object": "list", "data": [_model(m) for m in config.models]}

    @app.get("/v1/models/{model:path}")
    @sim.route
    async def get_model(request: Request, model: str) -> Any:
        return _model(model)  # any model id is served

    # ------------------------------------------------------------ files

    @app.post("/v1/files")
    @sim.route
    async def upload_file(request: Request) -> Any:
        raw = await sim.read_body(request, config.max_file_bytes + MULTIPART_OVERHEAD)
        parts = parse_multipart(request.headers.get("content-type", ""), raw)
        purpose_part = parts.get("purpose")
        purpose = purpose_part.content.decode("utf-8", "replace").strip() if purpose_part else ""
        if purpose not in PURPOSES:
            raise invalid_request(f"'purpose' must be one of {', '.join(sorted(PURPOSES))}.", param="purpose")
        file_part = parts.get("file")
        if file_part is None:
            raise invalid_request("The form has no 'file' field.", param="file")
        return sim.files.add(sim.mint("file-"), file_part.filename or "upload", purpose, file_part.content).as_openai()

    @app.get("/v1/files")
    @sim.route
    async def list_files(request: Request, purpose: str | None = None, after: str | None = None,
                         limit: int = 10_000, order: str = "desc") -> Any:
        return _page([f.as_openai() for f in sim.files.list(purpose)], after, limit, FILES_PAGE_MAX, order)

    @app.get("/v1/files/{file_id}")
    @sim.route
    async def get_file(request: Request, file_id: str) -> Any:
        return sim.files.get(file_id).as_openai()

    @app.get("/v1/files/{file_id}/content")
    @sim.route
    async def file_content(request: Request, file_id: str) -> Response:
        return Response(sim.files.get(file_id).content, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    @sim.route
    async def delete_file(request: Request, file_id: str) -> Any:
        sim.files.delete(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------ batches

    @app.post("/v1/batches")
    @sim.route
    async def create_batch(request: Request) -> Any:
        switches: Switches = request.state.switches
        body = await sim.read_json(request)
        return sim.batches.create(body, delay_seconds=switches.batch_delay_ms / 1000,
                                  line_delay_seconds=switches.batch_line_delay_ms / 1000).as_openai()

    @app.get("/v1/batches")
    @sim.route
    async def list_batches(request: Request, after: str | None = None, limit: int = 20) -> Any:
        return _page([b.as_openai() for b in sim.batches.list()], after, limit, BATCHES_PAGE_MAX, "desc")

    @app.get("/v1/batches/{batch_id}")
    @sim.route
    async def get_batch(request: Request, batch_id: str) -> Any:
        return sim.batches.get(batch_id).as_openai()

    @app.post("/v1/batches/{batch_id}/cancel")
    @sim.route
    async def cancel_batch(request: Request, batch_id: str) -> Any:
        return sim.batches.cancel(batch_id).as_openai()

    # ------------------------------------------------------------ the simulator's own

    @app.get("/sim/usage")
    async def usage_records(after: int = 0, limit: int = 1_000) -> Response:
        """What the simulator served (request ids and usage), oldest first: the upstream's
        records for a reconciliation. Page with ``after`` = the previous page's ``next_after``."""
        return json_response(sim.usage_log.page(max(0, after), max(1, min(limit, USAGE_PAGE_MAX))))

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        return json_response({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(sim.metrics_text(), media_type="text/plain; version=0.0.4")

    return app


def _page(objects: list[dict[str, Any]], after: str | None, limit: int, most: int, order: str) -> dict[str, Any]:
    """One page of a list in OpenAI's cursor style: ordered by ``created_at`` (then id),
    starting after the object ``after``."""
    if order not in ("asc", "desc"):
        raise invalid_request("'order' must be 'asc' or 'desc'.", param="order")
    if not 1 <= limit <= most:
        raise invalid_request(f"'limit' must be in 1..{most}.", param="limit")
    objects = sorted(objects, key=lambda o: (o["created_at"], o["id"]), reverse=order == "desc")
    if after is not None:
        ids = [o["id"] for o in objects]
        objects = objects[ids.index(after) + 1:] if after in ids else []
    page = objects[:limit]
    return {"object": "list", "data": page, "has_more": len(objects) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 1_700_000_000, "owned_by": "tollhouse-sim"}
