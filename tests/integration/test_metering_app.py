"""The metering app as a whole: health, readiness, OpenAPI, routing errors and extension."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter, Depends
from sqlalchemy.ext.asyncio import AsyncEngine

from services.contracts.errors import CONFLICT, TollhouseError
from services.metering.api.app import create_app
from services.metering.api.auth import require_billing_read, require_gateway
from services.metering.store.db import make_engine
from services.settings import load_settings

ADMIN, GATEWAY, BILLING = "adm-token-0123456789", "gw-token-0123456789", "bill-token-0123456789"


def settings_for(database_url: str):
    return load_settings(database_url=database_url, admin_token=ADMIN, gateway_token=GATEWAY, billing_token=BILLING)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(database_url)
    yield eng
    await eng.dispose()


def client_for(app, **transport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, **transport), base_url="http://t")


def unreachable_database_url() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql://nobody@127.0.0.1:{port}/nothing"


def assert_error_shape(r: httpx.Response, status: int, code: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "msg", "error"} and body["code"] == code
    assert body["error"]["message"] == body["msg"]
    for needle in needles:
        assert needle in body["msg"], body["msg"]


async def test_healthz_and_readyz(database_url, engine):
    async with client_for(create_app(settings_for(database_url), engine)) as c:
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        r = await c.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ok"


async def test_readyz_is_503_when_the_database_is_down():
    url = unreachable_database_url()
    engine = make_engine(url)
    try:
        async with client_for(create_app(settings_for(url), engine)) as c:
            assert (await c.get("/healthz")).status_code == 200
            assert_error_shape(await c.get("/readyz"), 503, 14, "database")
    finally:
        await engine.dispose()


async def test_requests_are_503_when_the_database_is_down():
    url = unreachable_database_url()
    engine = make_engine(url)
    try:
        async with client_for(create_app(settings_for(url), engine)) as c:
            r = await c.post("/v1/accounts", json={"name": "a"}, headers={"Authorization": f"Bearer {ADMIN}"})
            assert_error_shape(r, 503, 14)
    finally:
        await engine.dispose()


async def test_metrics_are_served(database_url, engine):
    async with client_for(create_app(settings_for(database_url), engine)) as c:
        r = await c.get("/metrics")
    assert r.status_code == 200 and "python_info" in r.text


async def test_openapi_documents_the_control_plane_and_the_error_shape(database_url, engine):
    async with client_for(create_app(settings_for(database_url), engine)) as c:
        spec = (await c.get("/openapi.json")).json()
        docs = await c.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    for path in ("/v1/accounts", "/v1/accounts/{account_id}", "/v1/accounts/{account_id}/topups",
                 "/v1/accounts/{account_id}/packages", "/v1/accounts/{account_id}/keys", "/v1/keys/{key_id}",
                 "/v1/keys/{key_id}/revoke", "/v1/prices/{model}", "/v1/prices", "/healthz", "/readyz"):
        assert path in spec["paths"], path
    create_account = spec["paths"]["/v1/accounts"]["post"]
    assert "422" not in create_account["responses"]
    assert create_account["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")
    money = spec["components"]["schemas"]["TopupCreate"]["properties"]["amount"]
    assert money["type"] == "string"
    assert spec["components"]["securitySchemes"]["RoleToken"]["scheme"] == "bearer"


async def test_unknown_route_and_wrong_method_use_the_error_shape(database_url, engine):
    async with client_for(create_app(settings_for(database_url), engine)) as c:
        assert_error_shape(await c.get("/v1/nothing-here"), 404, 5, "/v1/nothing-here")
        r = await c.delete("/v1/accounts")
        assert_error_shape(r, 405, 3, "DELETE", "POST")
        assert r.json()["error"]["code"] == "method_not_allowed"
        assert_error_shape(await c.get("/v1/prices/gpt-4o"), 405, 3, "PUT")


async def test_a_405_allows_every_method_of_the_path(database_url, engine):
    async with client_for(create_app(settings_for(database_url), engine)) as c:
        r = await c.delete("/v1/keys/key_1")
    assert_error_shape(r, 405, 3, "use GET, PATCH")
    assert r.headers["allow"] == "GET, PATCH"


async def test_other_routers_plug_in_with_their_role(database_url, engine):
    gateway = APIRouter(dependencies=[Depends(require_gateway)])
    billing = APIRouter(dependencies=[Depends(require_billing_read)])

    @gateway.post("/v1/authorize-probe")
    async def authorize_probe() -> dict[str, bool]:
        return {"allowed": True}

    @billing.get("/v1/billing-probe")
    async def billing_probe() -> dict[str, bool]:
        raise TollhouseError(CONFLICT, "probe conflict")

    app = create_app(settings_for(database_url), engine, routers=[gateway])
    app.include_router(billing)  # added after creation, as other modules may do
    async with client_for(app) as c:
        def auth(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        assert (await c.post("/v1/authorize-probe", headers=auth(GATEWAY))).json() == {"allowed": True}
        assert_error_shape(await c.post("/v1/authorize-probe", headers=auth(ADMIN)), 403, 7, "gateway token")
        assert_error_shape(await c.get("/v1/billing-probe", headers=auth(BILLING)), 409, 6, "probe conflict")
        assert_error_shape(await c.get("/v1/billing-probe", headers=auth(ADMIN)), 409, 6)
        assert_error_shape(await c.get("/v1/billing-probe", headers=auth(GATEWAY)), 403, 7, "billing token")
        assert_error_shape(await c.get("/v1/billing-probe"), 401, 16)


async def test_an_unexpected_failure_is_a_500_in_the_error_shape(database_url, engine):
    broken = APIRouter()

    @broken.get("/v1/broken")
    async def broken_route() -> None:
        raise RuntimeError("secret internals")

    app = create_app(settings_for(database_url), engine, routers=[broken])
    async with client_for(app, raise_app_exceptions=False) as c:
        r = await c.get("/v1/broken")
    assert_error_shape(r, 500, 13)
    assert "secret internals" not in r.text


async def test_body_limit_follows_the_setting(database_url, engine):
    settings = load_settings(database_url=database_url, admin_token=ADMIN, max_request_bytes=2048)
    async with client_for(create_app(settings, engine)) as c:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        ok = await c.post("/v1/accounts", json={"name": "a" * 100}, headers=headers)
        assert ok.status_code == 201
        r = await c.post("/v1/accounts", json={"name": "a" * 3000}, headers=headers)
        assert_error_shape(r, 413, 3, "2048")


async def test_content_length_that_is_not_a_number_is_400(database_url, engine):
    app = create_app(settings_for(database_url), engine)
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/accounts", "raw_path": b"/v1/accounts", "query_string": b"", "root_path": "",
        "headers": [(b"content-length", b"12abc"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("t", 80),
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 400
    assert b"Content-Length" in sent[1]["body"]


async def test_price_list_default_page_respects_the_page_limit_setting(database_url, engine):
    settings = load_settings(database_url=database_url, admin_token=ADMIN, page_limit_max=2)
    async with client_for(create_app(settings, engine)) as c:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        for i in range(3):
            r = await c.put(f"/v1/prices/m{i}", json={"input_price": "1", "output_price": "1"}, headers=headers)
            assert r.status_code == 201
        page = (await c.get("/v1/prices", headers=headers)).json()
        assert [p["model"] for p in page["data"]] == ["m0", "m1"] and page["next_cursor"]
        assert_error_shape(await c.get("/v1/prices", params={"limit": 3}, headers=headers), 400, 3, "query.limit")
