"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so SDKs show them."""

from __future__ import annotations

from typing import Any


class SimError(Exception):
    def __init__(self, status: int, message: str, *, type: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(message: str, *, param: str | None = None, code: str | None = "invalid_request") -> SimError:
    return SimError(400, message, type="invalid_request_error", code=code, param=param)


def not_found(message: str, *, code: str = "not_found") -> SimError:
    return SimError(404, message, type="invalid_request_error", code=code)


# What X-Sim-Error (and --error-rate, which uses 500) answers with, per HTTP status.
_SIMULATED: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "invalid_request", "Simulated bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Simulated: incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Simulated: access denied."),
    404: ("invalid_request_error", "model_not_found", "Simulated: the model does not exist."),
    408: ("server_error", "timeout", "Simulated: request timed out."),
    409: ("invalid_request_error", "conflict", "Simulated conflict."),
    422: ("invalid_request_error", "unprocessable_entity", "Simulated unprocessable request."),
    429: ("requests", "rate_limit_exceeded", "Simulated: rate limit reached for requests. Try again in 1s."),
    500: ("server_error", "server_error", "Simulated: the server had an error while processing your request."),
    502: ("server_error", "bad_gateway", "Simulated: bad gateway."),
    503: ("server_error", "service_unavailable", "Simulated: the engine is currently overloaded, try again later."),
    504: ("server_error", "gateway_timeout", "Simulated: gateway timeout."),
}


def simulated(status: int) -> SimError:
    """The error a failure switch asks for; unlisted 4xx/5xx statuses get a generic one."""
    type_, code, message = _SIMULATED.get(
        status,
        ("server_error" if status >= 500 else "invalid_request_error", f"http_{status}", f"Simulated HTTP {status}."),
    )
    headers = {}
    if status == 429:
        headers = {
            "retry-after": "1",
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1s",
        }
    return SimError(status, message, type=type_, code=code, headers=headers)
