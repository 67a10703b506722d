"""Gateway-facing API (DESIGN §6.3): ``POST /v1/authorize``, on every call's path.

The answer is always 200 with ``allowed`` and, when refused, the code, reason and message
the gateway shows its caller (DESIGN §6.1 table). 4xx is for a bad request body or token.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, Strict
from starlette.types import Receive, Scope, Send

from services.contracts.errors import INVALID_REQUEST, TollhouseError
from services.metering.api.auth import GATEWAY, authenticate, role_checked_route
from services.metering.api.schemas import ErrorBody
from services.metering.authorizer import Authorizer

MAX_ESTIMATED_TOKENS = 10**9
PATH = "/v1/authorize"
ROLES = (GATEWAY,)  # who may call it

# The role is checked by the route class before the body is read; the scheme is documented
# in OpenAPI below rather than by a dependency, which would cost every call its resolution.
router = APIRouter(
    tags=["gateway"],
    route_class=role_checked_route(*ROLES),
    responses={s: {"model": ErrorBody} for s in (400, 401, 403, 413)},
)


class AuthorizeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: Annotated[str, Strict(), Field(min_length=1, max_length=512)]
    model: Annotated[str, Strict(), Field(min_length=1, max_length=256)]
    estimated_tokens: Annotated[int, Strict(), Field(ge=0, le=MAX_ESTIMATED_TOKENS)] = 0


class AuthorizeOut(BaseModel):
    allowed: bool
    code: int = Field(description="gRPC canonical code: 0 when allowed")
    reason: str = Field(description="'ok', or the error code the gateway shows (e.g. daily_cap_reached)")
    msg: str
    key_id: str | None
    account_id: str | None
    billing_mode: str | None
    remaining: dict = Field(
        description="package keys: {tokens}; PAYG keys: {balance, daily, monthly} as decimal CNY strings"
        " (null for an unlimited cap). Net of reservations in flight."
    )
    reservation_id: str | None = Field(
        description="set when estimated_tokens was given and the call is allowed; send it back in the usage event"
    )


class _AuthorizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The hot-path twin of ``AuthorizeIn`` (msgspec decodes it several times faster)."""

    api_key: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    estimated_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_ESTIMATED_TOKENS)] = 0


_decode_request = msgspec.json.Decoder(_AuthorizeRequest).decode
_encode = msgspec.json.Encoder().encode


def authorizer_of(request: Request) -> Authorizer:
    return request.app.state.authorizer


@router.post(
    PATH,
    response_model=AuthorizeOut,
    openapi_extra={
        "security": [{"HTTPBearer": []}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": AuthorizeIn.model_json_schema()}},
        }
    },
)
async def authorize(request: Request) -> Response:
    # On every gateway call: the body is decoded with msgspec and the reply encoded directly,
    # skipping pydantic on both sides; AuthorizeIn/AuthorizeOut document the same shapes.
    try:
        body = _decode_request(await request.body())
    except msgspec.ValidationError as exc:
        raise TollhouseError(INVALID_REQUEST, f"body: {exc}") from None
    except msgspec.DecodeError:
        raise TollhouseError(INVALID_REQUEST, "body: not a valid JSON object") from None
    result = await authorizer_of(request).authorize(body.api_key, body.model, body.estimated_tokens)
    d, snap = result.decision, result.snapshot
    return Response(
        _encode({
            "allowed": d.allowed,
            "code": d.code,
            "reason": d.reason,
            "msg": d.msg,
            "key_id": snap.key_id if snap else None,
            "account_id": snap.account_id if snap else None,
            "billing_mode": snap.billing_mode if snap else None,
            "remaining": d.remaining,
            "reservation_id": result.reservation_id,
        }),
        media_type="application/json",
    )


async def answer(scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/authorize`` as a bare ASGI app: the route's own handler, role check and
    the app's exception handlers, without FastAPI's routing and per-request layers, which
    on this path cost the process more CPU than the decision itself. The app sends this
    path's calls here (``MeteringApp``); the FastAPI route stays for the OpenAPI
    description."""
    request = Request(scope, receive)
    try:
        authenticate(request, ROLES)
        response = await authorize(request)
    except Exception as exc:
        response = await _handled(request, exc)
    await response(scope, receive, send)


async def _handled(request: Request, exc: Exception) -> Response:
    """The response the app's exception handler for ``exc`` gives (the most specific one)."""
    handlers = request.app.exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return await handlers[cls](request, exc)
    raise exc
