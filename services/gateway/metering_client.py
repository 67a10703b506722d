"""The gateway's client for metering's gateway-facing API (DESIGN §6.3).

One pooled HTTP/1.1 client (``http_client``) with the gateway token. Anything but a well-formed 200 (no
answer in ``METERING_TIMEOUT_SECONDS``, a connection error, a 5xx, a refused gateway
token) is ``MeteringUnavailable``: the gateway then fails closed with 503.
"""

from __future__ import annotations

import time

import msgspec
import structlog

from services.gateway import metrics
from services.gateway.http_client import HTTPClient, HTTPError, Response

log = structlog.get_logger("tollhouse.gateway.metering")

API_KEY_HEADER = "X-Tollhouse-Api-Key"


class MeteringUnavailable(RuntimeError):
    pass


class KeyVerdict(msgspec.Struct, frozen=True):
    """What both of metering's answers say about the key: allowed or why not, and whose it is."""

    allowed: bool
    code: int
    reason: str
    msg: str
    key_id: str | None = None
    account_id: str | None = None


class Authorization(KeyVerdict, frozen=True):
    billing_mode: str | None = None
    reservation_id: str | None = None


class ModelEntry(msgspec.Struct, frozen=True):
    id: str
    created: int = 0


class KeyModels(KeyVerdict, frozen=True):
    tier: str | None = None
    models: list[ModelEntry] = []


_decode_authorization = msgspec.json.Decoder(Authorization).decode
_decode_key_models = msgspec.json.Decoder(KeyModels).decode
_encode = msgspec.json.Encoder().encode


class MeteringClient:
    def __init__(self, base_url: str, gateway_token: str, *, timeout_seconds: float, max_connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = HTTPClient(
            self.base_url, headers={"Authorization": f"Bearer {gateway_token}", "Content-Type": "application/json"},
            connect_timeout=timeout_seconds, read_timeout=timeout_seconds, max_connections=max_connections)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def authorize(self, api_key: str, model: str, estimated_tokens: int) -> Authorization:
        payload = _encode({"api_key": api_key, "model": model, "estimated_tokens": estimated_tokens})
        started = time.perf_counter()
        response = await self._request("POST", "/v1/authorize", content=payload)
        metrics.METERING_SECONDS.observe(time.perf_counter() - started)
        try:
            return _decode_authorization(response.content)
        except msgspec.MsgspecError as exc:
            raise MeteringUnavailable(f"metering sent an unreadable authorize reply: {exc}") from None

    async def key_models(self, api_key: str) -> KeyModels:
        response = await self._request("GET", "/v1/authorize/models", headers={API_KEY_HEADER: api_key})
        try:
            return _decode_key_models(response.content)
        except msgspec.MsgspecError as exc:
            raise MeteringUnavailable(f"metering sent an unreadable models reply: {exc}") from None

    async def ready(self) -> None:
        """Raise ``MeteringUnavailable`` unless metering's API is ready (its database answers;
        Kafka is not asked: while it is down the gateway spools)."""
        await self._request("GET", "/readyz", params={"scope": "api"})

    async def _request(self, method: str, path: str, **kwargs) -> Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except HTTPError as exc:
            raise MeteringUnavailable(f"metering at {self.base_url} is unreachable: {exc}") from None
        if response.status_code != 200:
            if response.status_code in (401, 403):
                log.error("metering_refused_gateway_token", status=response.status_code, path=path)
            raise MeteringUnavailable(f"metering answered {path} with HTTP {response.status_code}")
        return response
