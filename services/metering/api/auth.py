"""Role tokens for the metering API (DESIGN §6): admin, gateway and billing.

Each role has one token from settings, sent as ``Authorization: Bearer <token>``. A missing
or unknown token is 401; a valid token of a role the route does not accept is 403. An empty
configured token disables that role: it never matches anything.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import Request, Response, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.contracts.errors import FORBIDDEN, UNAUTHENTICATED, TollhouseError
from services.settings import Settings

ADMIN = "admin"
GATEWAY = "gateway"
BILLING = "billing"
ROLES = (ADMIN, GATEWAY, BILLING)

# Documents the scheme in OpenAPI; ``authenticate`` reads the header and raises our own errors.
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="RoleToken",
    description="The admin, gateway or billing token from settings, as `Authorization: Bearer <token>`.",
)


def settings_of(request: Request) -> Settings:
    """The settings ``create_app`` was given (``app.state.settings``)."""
    return request.app.state.settings


def role_tokens(settings: Settings) -> dict[str, str]:
    return {ADMIN: settings.admin_token, GATEWAY: settings.gateway_token, BILLING: settings.billing_token}


def roles_for_token(token: str | None, settings: Settings) -> frozenset[str]:
    """The roles whose configured token equals ``token`` (constant-time comparison).

    Compared as UTF-8 bytes: ``hmac.compare_digest`` refuses non-ASCII ``str`` and a
    header may carry anything. Every configured token is compared, match or not.
    """
    if not token:
        return frozenset()
    presented = token.encode("utf-8", "surrogatepass")
    matched = set()
    for role, configured in role_tokens(settings).items():
        if configured and hmac.compare_digest(presented, configured.encode("utf-8")):
            matched.add(role)
    return frozenset(matched)


def _describe(allowed: tuple[str, ...]) -> str:
    names = [f"the {role} token" for role in allowed]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def authenticate(request: Request, allowed: tuple[str, ...]) -> str:
    """The caller's role when it is one of ``allowed``; otherwise 401 (no valid token) or 403."""
    roles = roles_for_token(bearer_token(request.headers.get("authorization")), settings_of(request))
    if not roles:
        raise TollhouseError(
            UNAUTHENTICATED,
            f"missing or unknown token: this route needs {_describe(allowed)}, "
            "sent as 'Authorization: Bearer <token>'",
        )
    for role in allowed:
        if role in roles:
            return role
    raise TollhouseError(
        FORBIDDEN, f"the {sorted(roles)[0]} token may not use this route; it needs {_describe(allowed)}"
    )


def _checked(allowed: tuple[str, ...]) -> tuple[str, ...]:
    unknown = set(allowed) - set(ROLES)
    if not allowed or unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; roles are {ROLES}")
    return allowed


def require_roles(*allowed: str) -> Callable[..., Awaitable[str]]:
    """A FastAPI dependency that admits the given roles and returns the caller's role."""
    allowed = _checked(allowed)

    async def dependency(
        request: Request,
        _credentials: HTTPAuthorizationCredentials | None = Security(_bearer),  # documents the scheme
    ) -> str:
        return authenticate(request, allowed)

    dependency.__name__ = f"require_{'_or_'.join(allowed)}"
    return dependency


def role_checked_route(*allowed: str) -> type[APIRoute]:
    """A route class that checks the role before FastAPI reads the body.

    Dependencies run only after the body has been parsed, so without this a caller with no
    token would be told about malformed JSON (400) before being told to authenticate (401).
    Use as ``APIRouter(route_class=role_checked_route(ADMIN), dependencies=[Depends(require_admin)])``;
    the dependency keeps the security scheme in OpenAPI.
    """
    allowed = _checked(allowed)

    class RoleCheckedRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def checked_handler(request: Request) -> Response:
                authenticate(request, allowed)
                return await handler(request)

            return checked_handler

    RoleCheckedRoute.__name__ = f"RoleCheckedRoute_{'_or_'.join(allowed)}"
    return RoleCheckedRoute


require_admin = require_roles(ADMIN)
require_gateway = require_roles(GATEWAY)
require_billing_read = require_roles(BILLING, ADMIN)
