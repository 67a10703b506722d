"""The gateway app (DESIGN §6.1): OpenAI-compatible routes, health, metrics, and wiring.

``create_app`` builds everything from settings once (metering and upstream clients, the
spool, the emitter, the batch poller) and starts and stops it with the app's lifespan;
tests hand in a producer factory. ``run_gateway`` serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import structlog
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from services.contracts import errors
from services.contracts.errors import Canonical, ErrorKind, TollhouseError, error_body
from services.event_loop import watching_event_loop
from services.gateway import metrics
from services.gateway.batches import BatchTracker
from services.gateway.emitter import Emitter
from services.gateway.http_client import HTTPClient
from services.gateway.metering_client import MeteringClient, MeteringUnavailable
from services.gateway.proxy import Proxy
from services.gateway.spool import Spool
from services.gateway.usage import CHAT, COMPLETIONS, EMBEDDINGS
from services.runtime import settle_heap, stop_on_signals
from services.settings import Settings

log = structlog.get_logger("tollhouse.gateway")

READY_TIMEOUT_SECONDS = 2.0
DRAIN_ON_STOP_SECONDS = 5.0
METHOD_NOT_ALLOWED = ErrorKind(405, Canonical.INVALID_ARGUMENT, "method_not_allowed", "invalid_request_error")


def spool_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / f"gateway-spool-{settings.gateway_id}.sqlite"


def create_app(
    settings: Settings,
    *,
    producer_factory: Callable[[], AIOKafkaProducer] | None = None,
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        spool = await Spool(spool_path(settings), max_events=settings.spool_max_events,
                            max_bytes=settings.spool_max_bytes, quiet=lambda: app.calls_in_flight <= 1).open()
        spool.on_change.append(_spool_gauges(settings, spool))
        spool.on_change[-1]()
        if spool.events:
            log.info("spool_recovered", events=spool.events, path=str(spool.path))
        emitter = await Emitter(settings, spool, producer_factory=producer_factory).start()
        metering = MeteringClient(settings.metering_url, settings.gateway_token,
                                  timeout_seconds=settings.metering_timeout_seconds,
                                  max_connections=settings.metering_max_connections)
        upstream = HTTPClient(
            settings.upstream_base_url,
            headers={"Authorization": f"Bearer {settings.upstream_api_key}"} if settings.upstream_api_key else None,
            connect_timeout=settings.upstream_connect_timeout_seconds, read_timeout=settings.upstream_timeout_seconds,
            max_connections=settings.upstream_max_connections)
        batches = BatchTracker(settings, spool, emitter, upstream)
        stop = asyncio.Event()
        poller = asyncio.create_task(batches.run(stop), name="batch-poller")
        app.state.proxy = Proxy(settings, metering, upstream, spool, emitter, batches)
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(poller, return_exceptions=True)
            await emitter.stop(DRAIN_ON_STOP_SECONDS)
            await upstream.aclose()
            await metering.aclose()
            await spool.close()
            if spool.events:
                log.warning("spool_kept", events=spool.events, path=str(spool.path))

    app = GatewayApp(
        title="Tollhouse gateway",
        version="1",
        description="OpenAI-compatible gateway: authenticates API keys, asks metering, forwards upstream, "
                    "emits one usage event per call.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.settings = settings
    metrics.CALLS_IN_FLIGHT.labels(settings.gateway_id).set_function(lambda: app.calls_in_flight)
    _install_error_handlers(app)

    def proxy_of(request: Request) -> Proxy:
        return request.app.state.proxy

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz(request: Request) -> dict:
        """Ready to serve: metering answers and the spool can be written."""
        proxy = proxy_of(request)
        try:
            await asyncio.wait_for(proxy.metering.ready(), READY_TIMEOUT_SECONDS)
        except (MeteringUnavailable, asyncio.TimeoutError) as exc:
            raise TollhouseError(errors.UNAVAILABLE, f"metering not reachable: {exc or 'timeout'}") from None
        try:
            await asyncio.wait_for(proxy.spool.probe(), READY_TIMEOUT_SECONDS)
        except Exception as exc:
            raise TollhouseError(errors.UNAVAILABLE, f"usage spool not writable: {type(exc).__name__}") from None
        if proxy.spool.full:
            raise TollhouseError(errors.UNAVAILABLE, f"usage spool full ({proxy.spool.events} events)")
        return {"status": "ok", "metering": "ok", "spool": "ok", "spool_events": proxy.spool.events,
                "kafka": "connected" if proxy.emitter.connected else "disconnected"}

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics_text() -> Response:
        """Prometheus metrics of this process."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["openai"])
    async def list_models(request: Request) -> Response:
        """The models this key's tier may use."""
        return await proxy_of(request).list_models(request)

    @app.get("/v1/models/{model_id:path}", tags=["openai"])
    async def get_model(request: Request, model_id: str) -> Response:
        return await proxy_of(request).get_model(request, model_id)

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(request: Request) -> Response:
        """Streaming (SSE) and not; usage is always captured."""
        return await proxy_of(request).inference(request, CHAT)

    @app.post("/v1/completions", tags=["openai"])
    async def completions(request: Request) -> Response:
        """A list of prompts is one request with several inputs."""
        return await proxy_of(request).inference(request, COMPLETIONS)

    @app.post("/v1/embeddings", tags=["openai"])
    async def embeddings(request: Request) -> Response:
        """An ``input`` array is one request with several inputs."""
        return await proxy_of(request).inference(request, EMBEDDINGS)

    @app.post("/v1/files", tags=["openai"])
    async def upload_file(request: Request) -> Response:
        """multipart/form-data, passed through; a batch file's model and lines are noted."""
        return await proxy_of(request).upload_file(request)

    @app.get("/v1/files", tags=["openai"])
    async def list_files(request: Request) -> Response:
        """This account's files (uploaded through this gateway, or written by its batch jobs)."""
        return await proxy_of(request).list_files(request)

    @app.get("/v1/files/{file_id}", tags=["openai"])
    async def retrieve_file(request: Request, file_id: str) -> Response:
        return await proxy_of(request).retrieve_file(request, file_id)

    @app.delete("/v1/files/{file_id}", tags=["openai"])
    async def delete_file(request: Request, file_id: str) -> Response:
        return await proxy_of(request).delete_file(request, file_id)

    @app.get("/v1/files/{file_id}/content", tags=["openai"])
    async def file_content(request: Request, file_id: str) -> Response:
        return await proxy_of(request).file_content(request, file_id)

    @app.post("/v1/batches", tags=["openai"])
    async def create_batch(request: Request) -> Response:
        """A Batch API job: one request, billed once when it ends."""
        return await proxy_of(request).create_batch(request)

    @app.get("/v1/batches", tags=["openai"])
    async def list_batches(request: Request) -> Response:
        """This account's Batch API jobs, newest first."""
        return await proxy_of(request).list_batches(request)

    @app.get("/v1/batches/{batch_id}", tags=["openai"])
    async def get_batch(request: Request, batch_id: str) -> Response:
        return await proxy_of(request).get_batch(request, batch_id)

    @app.post("/v1/batches/{batch_id}/cancel", tags=["openai"])
    async def cancel_batch(request: Request, batch_id: str) -> Response:
        """Billed when it has ended: the lines it ran, as one ``cancelled`` event."""
        return await proxy_of(request).cancel_batch(request, batch_id)

    return app


def _spool_gauges(settings: Settings, spool: Spool) -> Callable[[], None]:
    """What keeps the spool gauges current (called on every change of the spool)."""
    events, size = metrics.SPOOL_EVENTS.labels(settings.gateway_id), metrics.SPOOL_BYTES.labels(settings.gateway_id)

    def update() -> None:
        events.set(spool.events)
        size.set(spool.bytes)

    return update


# Errors: every failure leaves in the documented shape.


def error_response(kind: ErrorKind, msg: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(kind, msg), status_code=kind.http_status, headers=headers)


def refusal_response(exc: TollhouseError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.kind.http_status == 401 else None
    return error_response(exc.kind, exc.msg, headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TollhouseError)
    async def tollhouse_error(_: Request, exc: TollhouseError) -> JSONResponse:
        return refusal_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(errors.INVALID_REQUEST, f"request: {exc.errors()[:1]}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path[:200]
        if exc.status_code == 404:
            return error_response(errors.NOT_FOUND, f"no route {request.method} {path}; the API is described at /docs")
        if exc.status_code == 405:
            return error_response(METHOD_NOT_ALLOWED, f"method {request.method} is not allowed on {path}")
        kind = ErrorKind(exc.status_code, Canonical.INVALID_ARGUMENT if exc.status_code < 500 else Canonical.INTERNAL,
                         f"http_{exc.status_code}", "invalid_request_error")
        return error_response(kind, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        return internal_error_response(request.url.path, exc)


def internal_error_response(path: str, exc: Exception) -> JSONResponse:
    log.error("unhandled_error", path=path, exc_info=exc)
    return error_response(errors.INTERNAL, "internal error; the gateway log has the details")


# The app's entry point: request metrics, and the inference routes served without
# FastAPI's per-request layers (its telemetry check reads the environment on every call;
# then routing, dependency resolution, exception middleware). Most calls are inference
# calls, and those layers cost more CPU per call than the gateway's own work on them.

_INFERENCE = {CHAT: CHAT, COMPLETIONS: COMPLETIONS, EMBEDDINGS: EMBEDDINGS}
_UNCOUNTED = {"/metrics", "/healthz", "/readyz"}
_PATH_PARAMETER = re.compile(r"\{[^}]*\}")


@functools.lru_cache(maxsize=64)
def _template_label(template: str) -> str:
    """``/v1/batches/{batch_id}/cancel`` → ``/v1/batches/{id}/cancel``."""
    return _PATH_PARAMETER.sub("{id}", template)


def _route_label(scope: Scope) -> str:
    """The matched route's template; ``other`` for paths no route matched."""
    route = scope.get("route")
    return _template_label(route.path) if route is not None else "other"


class GatewayApp(FastAPI):
    """FastAPI, but every call is counted by route template, model and status here, and
    ``POST`` on the inference routes is answered here, with the same error handling as the
    FastAPI routes (which stay, for every other method and for the OpenAPI description).
    ``calls_in_flight`` counts the calls being answered (a stream until its end)."""

    calls_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNCOUNTED:
            await super().__call__(scope, receive, send)
            return
        self.calls_in_flight += 1
        try:
            await self._counted(scope, receive, send)
        finally:
            self.calls_in_flight -= 1

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 500

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        endpoint = _INFERENCE.get(scope["path"]) if scope["method"] == "POST" else None
        try:
            if endpoint is None:
                await super().__call__(scope, receive, counted_send)
            else:
                await self._inference(scope, receive, counted_send, endpoint)
        finally:
            model = (scope.get("state") or {}).get("model", "")
            label = endpoint or _route_label(scope)
            metrics.requests_of(label, model, str(status)).inc()

    async def _inference(self, scope: Scope, receive: Receive, send: Send, endpoint: str) -> None:
        scope["app"] = self
        request = Request(scope, receive)
        try:
            response = await self.state.proxy.inference(request, endpoint)
        except TollhouseError as exc:
            response = refusal_response(exc)
        except Exception as exc:
            response = internal_error_response(scope["path"], exc)
        await response(scope, receive, send)


# Serving


async def run_gateway(settings: Settings, *, host: str = "127.0.0.1", port: int = 8080,
                      stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``). Calls in flight finish (or are billed as
    cancelled), then the spool gets a few seconds to drain; what is left is sent at the
    next start."""
    import uvicorn

    missing = [name for name, value in (("KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers),
                                        ("GATEWAY_TOKEN", settings.gateway_token)) if not value]
    if missing:
        raise SystemExit("\n".join(f"setting TOLLHOUSE_{name}: required to run the gateway" for name in missing))
    stop = stop or asyncio.Event()
    stop_on_signals(stop)
    server = uvicorn.Server(uvicorn.Config(
        create_app(settings), host=host, port=port, http="httptools", log_level="warning", access_log=False,
        lifespan="on", timeout_graceful_shutdown=30,
        # Nothing here reads the client's address, so no X-Forwarded-For rewriting per call.
        proxy_headers=False, server_header=False,
    ))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # signals are ours (above)
    serving = asyncio.create_task(server.serve(), name="gateway-api")
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if server.started:
        settle_heap()  # after start-up: the app, its clients and the spool live as long as the process
    log.info("gateway_started", url=f"http://{host}:{port}", gateway_id=settings.gateway_id,
             upstream=settings.upstream_base_url, metering=settings.metering_url)
    waiting = asyncio.create_task(stop.wait())
    async with watching_event_loop("gateway"):
        await asyncio.wait([serving, waiting], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    waiting.cancel()
    await serving
