"""The metering API as tests drive it: the real app, engine and authorizer on a test database."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx

from services.metering.api import authorize, dead_letters, models, quota, reconciliation
from services.metering.api.app import create_app
from services.metering.authorizer import Authorizer
from services.metering.store.db import make_engine
from services.settings import Settings

ADMIN = {"Authorization": "Bearer admin-token"}
GATEWAY = {"Authorization": "Bearer gateway-token"}
BILLING = {"Authorization": "Bearer billing-token"}


@contextlib.asynccontextmanager
async def metering_client(settings: Settings, database_url: str, **authorizer_options) -> AsyncIterator[httpx.AsyncClient]:
    engine = make_engine(database_url, pool_size=4)
    authorizer = await Authorizer(database_url, **authorizer_options).start()
    app = create_app(
        settings,
        engine,
        routers=[authorize.router, models.router, quota.router, reconciliation.router, dead_letters.router],
    )
    app.state.authorizer = authorizer
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metering") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client
    finally:
        await authorizer.stop()
        await engine.dispose()
