"""The metering HTTP API: one FastAPI app, wired once from settings and an engine.

``create_app`` builds it with the control plane, health and metrics routes; other
audiences' routers (authorize, billing, exports, reconciliation) are passed in ``routers``
or added later with ``app.include_router``. Whatever goes wrong, the reply has the
documented error shape (DESIGN §6.1), and bad input is a 4xx that names the field.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Literal

import structlog
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.contracts.errors import (
    CONFLICT,
    FORBIDDEN,
    INTERNAL,
    INVALID_REQUEST,
    NOT_FOUND,
    PAYLOAD_TOO_LARGE,
    UNAUTHENTICATED,
    UNAVAILABLE,
    Canonical,
    ErrorKind,
    TollhouseError,
    error_body,
)
from services.metering.api import admin, authorize, billing, exports
from services.metering.api.schemas import ErrorBody
from services.metering.readiness import Readiness
from services.metering.store.admin import AdminStore, database_ready, utc_now
from services.settings import Settings

log = structlog.get_logger("tollhouse.metering.api")

MAX_REPORTED_ERRORS = 5
MAX_REQUEST_ID_CHARS = 128

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
METHOD_NOT_ALLOWED = ErrorKind(405, Canonical.INVALID_ARGUMENT, "method_not_allowed", "invalid_request_error")

_KIND_BY_STATUS = {
    400: INVALID_REQUEST,
    401: UNAUTHENTICATED,
    403: FORBIDDEN,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    409: CONFLICT,
    413: PAYLOAD_TOO_LARGE,
    422: INVALID_REQUEST,
    500: INTERNAL,
    503: UNAVAILABLE,
}


def create_app(
    settings: Settings,
    engine: AsyncEngine,
    *,
    routers: Iterable[APIRouter] = (),
    clock: Callable[[], datetime] = utc_now,
) -> FastAPI:
    """The metering API. ``app.state`` holds ``settings``, ``engine`` and ``admin_store``
    for routers' dependencies, and ``readiness`` (database only until the caller wires in
    the broker and consumer checks); the caller owns the engine (and disposes it)."""
    app = MeteringApp(
        title="Tollhouse metering",
        version="1",
        description="Usage metering for LLM APIs: control plane, authorization, billing queries.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.admin_store = AdminStore(engine, clock)
    app.state.readiness = Readiness(lambda: database_ready(engine))
    install_error_handlers(app)
    routers = list(routers)
    if authorize.router in routers:
        app.fast_paths[("POST", authorize.PATH)] = RequestIds(
            RequestBodyLimit(authorize.answer, max_bytes=settings.max_request_bytes))
    app.add_middleware(RequestBodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestIds)
    app.include_router(operations_router())
    app.include_router(admin.router)
    app.include_router(billing.router)
    app.include_router(exports.router)
    for router in routers:
        app.include_router(router)
    app.openapi = lambda: _openapi_with_error_shape(app)  # type: ignore[method-assign]
    return app


class MeteringApp(FastAPI):
    """FastAPI, but the routes in ``fast_paths`` (``POST /v1/authorize``, on every gateway
    call's path) are answered by their own ASGI stack, ahead of FastAPI's per-request
    layers (its telemetry check, body-limit and error middlewares, routing). That stack
    applies the request id and body limit as on every route, and the app's exception
    handlers."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast_paths: dict[tuple[str, str], ASGIApp] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast_paths.get((scope.get("method"), scope["path"])) if scope["type"] == "http" else None
        if fast is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        await fast(scope, receive, send)


# Health and metrics


class ReadyBody(BaseModel):
    status: str = Field(description="'ok'")
    database: str = Field(description="'ok'")
    broker: str = Field(description="'ok', or 'not used' when this process runs no consumer (--no-consumer)")
    consumer: str = Field(description="'ok' (each consumer member in the group), or 'off' (--no-consumer)")
    partitions: list[int] | None = Field(
        None, description="usage-topic partitions assigned to this process's consumer members (may be empty: a standby)"
    )


def operations_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @router.get("/readyz", response_model=ReadyBody, response_model_exclude_none=True,
                responses={503: {"model": ErrorBody, "description": "Not ready: the message names each cause"}})
    async def readyz(
        request: Request,
        scope: Literal["all", "api"] = Query(
            "all", description="`api`: only what the API needs (the database); the gateway asks this"),
    ) -> dict[str, Any]:
        """The process can serve: the database answers and, when it runs the consumer, the
        Kafka cluster answers and the consumer is a member of its group (docs/operations.md).
        With `scope=api`, the database alone: what authorize and the query APIs need."""
        report = await request.app.state.readiness.check(api_only=scope == "api")
        if report.problems:
            raise TollhouseError(UNAVAILABLE, "not ready: " + "; ".join(report.problems))
        return {"status": "ok", **report.checks, "partitions": report.partitions}

    @router.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics of this process."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router


# Errors: every failure leaves in the documented shape.


def error_response(kind: ErrorKind, msg: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(kind, msg), status_code=kind.http_status, headers=headers)


def _kind_for_status(status_code: int) -> ErrorKind:
    kind = _KIND_BY_STATUS.get(status_code)
    if kind is not None:
        return kind
    if 400 <= status_code < 500:
        return ErrorKind(status_code, Canonical.INVALID_ARGUMENT, f"http_{status_code}", "invalid_request_error")
    return ErrorKind(status_code, Canonical.INTERNAL, f"http_{status_code}", "server_error")


_TYPE_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a known field",
    "string_type": "must be a JSON string",
    "int_type": "must be a JSON integer",
    "int_parsing": "must be an integer",
    "bool_type": "must be true or false",
}


def describe_validation_errors(errors: Iterable[Any]) -> str:
    """Pydantic/FastAPI errors → ``"body.amount: must be a decimal string …; body.tier: …"``."""
    parts = []
    errors = list(errors)
    for err in errors[:MAX_REPORTED_ERRORS]:
        loc = tuple(err.get("loc") or ())
        kind = err.get("type", "")
        if kind == "json_invalid":
            position = loc[1] if len(loc) > 1 else "?"
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            parts.append(f"body: malformed JSON at character {position}: {reason}")
            continue
        where = ".".join(str(p) for p in loc) or "request"
        msg = str(err.get("msg", "is not valid")).removeprefix("Value error, ")
        if loc == ("body",) and kind == "missing":
            msg = "a JSON object is required (Content-Type: application/json)"
        elif loc == ("body",) and kind in ("model_attributes_type", "dict_type", "model_type"):
            msg = "must be a JSON object sent with Content-Type: application/json"
        elif kind in _TYPE_MESSAGES:
            msg = _TYPE_MESSAGES[kind]
        else:  # pydantic's own words, in the same voice as ours
            msg = msg.replace("Input should be", "must be")
        parts.append(f"{where}: {msg}")
    if len(errors) > MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more")
    return "; ".join(parts) or "request: invalid"


def allowed_methods(request: Request) -> str:
    """Every method the app serves at the request's path, for a 405's ``Allow``.

    The router's own 405 names only the methods of the first route whose path matches, so a
    path served by several routes (GET and PATCH /v1/keys/{key_id}) would be under-reported.
    """
    routes = request.app.router.routes
    return ", ".join(
        method for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    )


def _sqlstate(exc: DBAPIError) -> str:
    for candidate in (exc.orig, getattr(exc.orig, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if code:
            return str(code)
    return ""


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to the documented error shape. Usable by any Tollhouse app."""

    @app.exception_handler(TollhouseError)
    async def tollhouse_error(_: Request, exc: TollhouseError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.kind.http_status == 401 else None
        return error_response(exc.kind, exc.msg, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(INVALID_REQUEST, describe_validation_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _kind_for_status(exc.status_code)
        path = request.url.path[:200]
        if exc.status_code == 404:
            msg = f"no route {request.method} {path}; the API is described at /docs"
        elif exc.status_code == 405:
            allowed = allowed_methods(request) or (exc.headers or {}).get("Allow", "")
            msg = f"method {request.method} is not allowed on {path}" + (f"; use {allowed}" if allowed else "")
            return error_response(kind, msg, {**(exc.headers or {}), "Allow": allowed} if allowed else None)
        else:
            msg = str(exc.detail)
        return error_response(kind, msg, dict(exc.headers) if exc.headers else None)

    @app.exception_handler(DBAPIError)
    async def database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        state = _sqlstate(exc)
        if isinstance(exc, IntegrityError):
            return error_response(CONFLICT, "the change conflicts with existing data; read the object and retry")
        if state.startswith("22"):  # data exception: a value the column cannot hold
            return error_response(INVALID_REQUEST, "body: a value is out of range for what can be stored")
        if exc.connection_invalidated or state.startswith("08") or state in ("57P01", "57P03", "53300"):
            return error_response(UNAVAILABLE, "the database is unavailable; retry shortly")
        log.error("database_error", path=request.url.path, sqlstate=state, exc_info=exc)
        return error_response(INTERNAL, "internal error; the server log has the details")

    @app.exception_handler(PoolTimeoutError)
    async def pool_timeout(_: Request, __: PoolTimeoutError) -> JSONResponse:
        return error_response(UNAVAILABLE, "the database is busy (no free connection); retry shortly")

    @app.exception_handler(OSError)
    async def connection_error(_: Request, exc: OSError) -> JSONResponse:
        return error_response(UNAVAILABLE, f"the database is unreachable ({type(exc).__name__}); retry shortly")

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled_error", path=request.url.path, exc_info=exc)
        return error_response(INTERNAL, "internal error; the server log has the details")


# Request ids: every log line of one request carries the same request_id.


class RequestIds:
    """Take the caller's ``X-Request-ID`` (printable ASCII, at most 128 characters) or make
    one; bind it to the log context and return it in the ``X-Request-ID`` response header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        if given and len(given) <= MAX_REQUEST_ID_CHARS and given.isprintable() and given.isascii():
            request_id = given
        else:
            request_id = os.urandom(12).hex()
        # Not reset afterwards: the error handlers outside this middleware log with it too,
        # and the server runs each request in a task of its own.
        structlog.contextvars.bind_contextvars(request_id=request_id)
        header = (b"x-request-id", request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


# Request size: a limit on every body, enforced before anything parses it.


class RequestBodyLimit:
    """Refuse bodies over ``max_bytes`` with 413, whether or not Content-Length is sent.

    Buffers the (bounded) body, then replays it to the app, so an oversize body is
    refused in the error shape before any route reads it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(INVALID_REQUEST, "header Content-Length: not a number")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        first: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # a disconnect: pass it on
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replay: list[Message] = [first if first else whole]

        async def buffered_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, buffered_receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        msg = (
            f"body: the request body is larger than the limit of {self.max_bytes} bytes "
            "(setting TOLLHOUSE_MAX_REQUEST_BYTES)"
        )
        await error_response(PAYLOAD_TOO_LARGE, msg, {"Connection": "close"})(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


# OpenAPI: document the error shape (400, not FastAPI's 422).


def _openapi_with_error_shape(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorBody" not in components:
        body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components["ErrorBody"] = body
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", {"description": "Bad request", "content": error_ref})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = schema
    return schema
