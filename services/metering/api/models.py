"""Gateway-facing API: ``GET /v1/authorize/models``, the models an API key's tier may use.

The gateway answers its callers' ``GET /v1/models`` from this. The key travels in the
``X-Tollhouse-Api-Key`` header (a GET has no body, and a query string ends up in access
logs). Like ``POST /v1/authorize`` the answer is 200 with ``allowed``; a refused key
(unknown or revoked) carries the code, reason and message the gateway shows its caller.
"""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from services.contracts import errors
from services.metering.api.auth import GATEWAY, require_gateway, role_checked_route
from services.metering.api.schemas import ErrorBody
from services.metering.authorizer import Authorizer

API_KEY_HEADER = "X-Tollhouse-Api-Key"
MAX_API_KEY_CHARS = 512

router = APIRouter(
    tags=["gateway"],
    route_class=role_checked_route(GATEWAY),
    dependencies=[Depends(require_gateway)],
    responses={s: {"model": ErrorBody} for s in (401, 403)},
)

_encode = msgspec.json.Encoder().encode


class ModelOut(BaseModel):
    id: str
    created: int = Field(description="Unix time the model's current price row took effect")


class KeyModelsOut(BaseModel):
    allowed: bool
    code: int = Field(description="gRPC canonical code: 0 when the key may be used")
    reason: str = Field(description="'ok', 'invalid_api_key' or 'key_revoked'")
    msg: str
    key_id: str | None
    account_id: str | None
    tier: str | None
    models: list[ModelOut] = Field(description="sorted by id; empty when refused")


def _refused(kind: errors.ErrorKind, msg: str, key_id: str | None = None, account_id: str | None = None) -> dict:
    return {"allowed": False, "code": int(kind.code), "reason": kind.error_code, "msg": msg,
            "key_id": key_id, "account_id": account_id, "tier": None, "models": []}


@router.get("/v1/authorize/models", response_model=KeyModelsOut)
async def key_models(request: Request) -> Response:
    authorizer: Authorizer = request.app.state.authorizer
    api_key = request.headers.get(API_KEY_HEADER, "")
    found = None
    if api_key and len(api_key) <= MAX_API_KEY_CHARS:
        found = await authorizer.models_for(api_key)
    if found is None:
        body = _refused(errors.INVALID_API_KEY,
                        "The API key is not valid. Check it, or create a new key in the console.")
    else:
        snap, rows = found
        if snap.status != "active":
            body = _refused(errors.KEY_REVOKED, "This API key was revoked. Create a new key and use it instead.",
                            snap.key_id, snap.account_id)
        else:
            body = {
                "allowed": True, "code": 0, "reason": "ok", "msg": "allowed",
                "key_id": snap.key_id, "account_id": snap.account_id, "tier": snap.tier,
                "models": [{"id": r.model, "created": int(r.effective_from.timestamp())} for r in rows],
            }
    return Response(_encode(body), media_type="application/json")
