"""Error codes shared by the gateway and metering (DESIGN §6.1).

``code`` is the gRPC canonical code, ``error_code`` the OpenAI-style ``error.code`` string
that SDKs show to people.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Canonical(IntEnum):
    OK = 0
    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


@dataclass(frozen=True, slots=True)
class ErrorKind:
    http_status: int
    code: Canonical
    error_code: str
    error_type: str


INVALID_API_KEY = ErrorKind(401, Canonical.UNAUTHENTICATED, "invalid_api_key", "authentication_error")
KEY_REVOKED = ErrorKind(401, Canonical.UNAUTHENTICATED, "key_revoked", "authentication_error")
MODEL_NOT_ALLOWED = ErrorKind(403, Canonical.PERMISSION_DENIED, "model_not_allowed", "permission_error")
MODEL_NOT_FOUND = ErrorKind(404, Canonical.NOT_FOUND, "model_not_found", "invalid_request_error")
INVALID_REQUEST = ErrorKind(400, Canonical.INVALID_ARGUMENT, "invalid_request", "invalid_request_error")
PACKAGE_EXHAUSTED = ErrorKind(429, Canonical.RESOURCE_EXHAUSTED, "package_exhausted", "insufficient_quota")
PACKAGE_EXPIRED = ErrorKind(429, Canonical.RESOURCE_EXHAUSTED, "package_expired", "insufficient_quota")
INSUFFICIENT_BALANCE = ErrorKind(429, Canonical.RESOURCE_EXHAUSTED, "insufficient_balance", "insufficient_quota")
DAILY_CAP_REACHED = ErrorKind(429, Canonical.RESOURCE_EXHAUSTED, "daily_cap_reached", "insufficient_quota")
MONTHLY_CAP_REACHED = ErrorKind(429, Canonical.RESOURCE_EXHAUSTED, "monthly_cap_reached", "insufficient_quota")
UNAVAILABLE = ErrorKind(503, Canonical.UNAVAILABLE, "unavailable", "service_unavailable")

# Control-plane and query API errors (same envelope).
UNAUTHENTICATED = ErrorKind(401, Canonical.UNAUTHENTICATED, "unauthenticated", "authentication_error")
FORBIDDEN = ErrorKind(403, Canonical.PERMISSION_DENIED, "forbidden", "permission_error")
NOT_FOUND = ErrorKind(404, Canonical.NOT_FOUND, "not_found", "invalid_request_error")
CONFLICT = ErrorKind(409, Canonical.ALREADY_EXISTS, "conflict", "invalid_request_error")
PAYLOAD_TOO_LARGE = ErrorKind(413, Canonical.INVALID_ARGUMENT, "payload_too_large", "invalid_request_error")
INTERNAL = ErrorKind(500, Canonical.INTERNAL, "internal", "server_error")


class TollhouseError(Exception):
    """An error with a kind (status and codes) and a message for a person."""

    def __init__(self, kind: ErrorKind, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind
        self.msg = msg

    def body(self) -> dict:
        return error_body(self.kind, self.msg)


def error_body(kind: ErrorKind, msg: str) -> dict:
    """The documented error shape: gRPC code and msg, plus an OpenAI-style error object."""
    return {
        "code": int(kind.code),
        "msg": msg,
        "error": {"message": msg, "type": kind.error_type, "code": kind.error_code},
    }
