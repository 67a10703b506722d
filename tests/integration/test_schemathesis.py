"""The metering API against its own OpenAPI schema, by Schemathesis.

The real app is served by uvicorn on a test database seeded with accounts, keys, a package,
prices, usage, breaches, ledger entries and dead letters; path and query parameters are
drawn from those ids part of the time, so generated requests reach real objects as well as
missing ones. Every response must be: no 5xx, a status code the schema documents for the
operation, the documented content type, and a body that matches the documented schema; a
method the path does not serve is a 405 whose ``Allow`` lists the methods it does serve.

Generation is bounded and seeded, so a run is the same every time.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import schemathesis
import uvicorn
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from services.contracts.events import build_usage_event, encode_event
from services.metering.api import authorize, dead_letters, models, quota, reconciliation
from services.metering.api.app import create_app
from services.metering.authorizer import Authorizer
from services.metering.store.db import make_engine
from services.settings import load_settings
from tests.support import seed

# The reconciliation diff takes its upload as text, CSV or JSON lines.
schemathesis.serializer.alias(["text/csv", "application/x-ndjson"], "text/plain")

SEED = 20261122
MAX_EXAMPLES = 25  # per operation, fuzzing phase; the examples and coverage phases add a bounded few

ADMIN_TOKEN, GATEWAY_TOKEN, BILLING_TOKEN = "admin-token", "gateway-token", "billing-token"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    unsupported_method,  # a method the path does not serve is a 405 whose Allow lists the ones it does
]

UTC = timezone.utc
NANO = 1_000_000_000
ACCOUNT, OTHER_ACCOUNT = "acc_st_shanghai", "acc_st_newyork"
PACKAGE = "pkg_st_1"
PACKAGE_KEY, PAYG_KEY, REVOKED_KEY = "key_st_package", "key_st_payg", "key_st_revoked"
MODELS = ("gpt-4o", "org/model:v2")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _admin(url: str, sql: str) -> None:
    with psycopg.connect(_with_database(url, "postgres"), autocommit=True) as conn:
        conn.execute(sql)


def seed_database(url: str, now: datetime) -> dict[str, list[str]]:
    """Reference data for every route; returns the ids to draw parameters from."""
    seed.create_account(url, ACCOUNT, "Asia/Shanghai", "developer")
    seed.create_account(url, OTHER_ACCOUNT, "America/New_York", "free")
    seed.topup(url, ACCOUNT, 100 * NANO, "invoice-1")
    seed.topup(url, OTHER_ACCOUNT, 5 * NANO, "invoice-2")
    seed.create_package(url, ACCOUNT, PACKAGE, 1_000_000, now - timedelta(days=1), now + timedelta(days=30))
    seed.create_key(url, PACKAGE_KEY, ACCOUNT, "package", package_id=PACKAGE)
    seed.create_key(url, PAYG_KEY, ACCOUNT, "payg", daily_cap=5 * NANO, monthly_cap=50 * NANO)
    seed.create_key(url, REVOKED_KEY, OTHER_ACCOUNT, "payg")
    seed.rows(url, "UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE key_id = %s RETURNING 1",
              REVOKED_KEY)
    for model in MODELS:
        seed.add_price(url, model, input_price=2_000, output_price=8_000, cached_input_price=1_000)
    today = now.date()
    with psycopg.connect(url) as conn:
        for days_ago in (0, 1, 40):
            day = today - timedelta(days=days_ago)
            for key_id, model, charge, package_tokens in ((PAYG_KEY, MODELS[0], 30_000_000, 0),
                                                           (PACKAGE_KEY, MODELS[1], 0, 1_500)):
                conn.execute(
                    "INSERT INTO usage_daily (key_id, model, day, account_id, requests, inputs, prompt_tokens,"
                    " completion_tokens, cached_tokens, reasoning_tokens, total_tokens, package_tokens, charge)"
                    " VALUES (%s, %s, %s, %s, 3, 3, 1000, 500, 100, 50, 1500, %s, %s)",
                    (key_id, model, day, ACCOUNT, package_tokens, charge),
                )
        conn.execute(
            "INSERT INTO ledger_entries (entry_type, account_id, key_id, event_id, source, request_id, endpoint,"
            " model, kind, status, event_time, local_day, inputs, prompt_tokens, completion_tokens, total_tokens,"
            " charge, balance_delta) VALUES ('usage', %s, %s, 'evt-st-1', 'gateway/gw-1', 'chatcmpl-1',"
            " '/v1/chat/completions', %s, 'request', 'ok', %s, %s, 1, 1000, 500, 1500, 30000000, -30000000)",
            (ACCOUNT, PAYG_KEY, MODELS[0], now - timedelta(hours=1), today),
        )
        conn.execute(
            "INSERT INTO breaches (breach_id, type, account_id, key_id, package_id, period, unit, cap, spend,"
            " overshoot, event_id, occurred_at) VALUES"
            " ('brk_st_daily', 'daily_cap', %s, %s, NULL, %s, 'cny', 5000000000, 5030000000, 30000000, 'evt-st-1', %s),"
            " ('brk_st_package', 'package_exhausted', %s, %s, %s, NULL, 'tokens', 1000000, 1000100, 100, NULL, %s)",
            (ACCOUNT, PAYG_KEY, today.isoformat(), now - timedelta(hours=1),
             ACCOUNT, PACKAGE_KEY, PACKAGE, now - timedelta(minutes=5)),
        )
        event = build_usage_event(account_id=ACCOUNT, key_id=PAYG_KEY, model=MODELS[0], prompt_tokens=10,
                                  completion_tokens=5, request_id="chatcmpl-dlq", time=now - timedelta(hours=2))
        dead = [("dlq_st_unknown_key", "unknown_key", encode_event(event), 0),
                ("dlq_st_invalid_json", "invalid_json", b"{not json", 1)]
        for dead_letter_id, reason, payload, offset in dead:
            conn.execute(
                "INSERT INTO dead_letters (dead_letter_id, reason, detail, source, topic, topic_partition,"
                " kafka_offset, payload, received_at, message_key) VALUES (%s, %s, 'seeded', 'gateway/gw-1',"
                " 'usage-test', 0, %s, %s, %s, %s)",
                (dead_letter_id, reason, offset, payload, now - timedelta(minutes=30), ACCOUNT.encode()),
            )
    month = today.strftime("%Y-%m")
    return {
        "account_ids": [ACCOUNT, OTHER_ACCOUNT],
        "key_ids": [PACKAGE_KEY, PAYG_KEY, REVOKED_KEY],
        "api_keys": [PACKAGE_KEY, PAYG_KEY, REVOKED_KEY],  # the seeded secrets are the key ids
        "package_ids": [PACKAGE],
        "models": list(MODELS),
        "months": [month, (date.fromisoformat(month + "-01") - timedelta(days=1)).strftime("%Y-%m")],
        "dead_letter_ids": ["dlq_st_unknown_key", "dlq_st_invalid_json"],
        # Every start is before every end, so a drawn pair is a window that holds the seeded data.
        "starts": [(now - timedelta(days=2)).isoformat(), (now - timedelta(hours=3)).isoformat()],
        "ends": [now.isoformat(), (now + timedelta(days=1)).isoformat()],
        "first_days": [(today - timedelta(days=3)).isoformat(), date(today.year, today.month, 1).isoformat()],
        "end_days": [(today + timedelta(days=1)).isoformat()],
        "package_ends": [(now + timedelta(days=60)).isoformat()],
    }


class ServedApp:
    """The metering app under uvicorn in a thread with its own event loop (engine and authorizer live there)."""

    def __init__(self, database_url: str) -> None:
        self.settings = load_settings(database_url=database_url, admin_token=ADMIN_TOKEN,
                                      gateway_token=GATEWAY_TOKEN, billing_token=BILLING_TOKEN)
        self.database_url = database_url
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.socket.getsockname()[1]
        self.server: uvicorn.Server | None = None
        self.failure: BaseException | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, name="metering-under-test", daemon=True)

    def __enter__(self) -> ServedApp:
        self.thread.start()
        if not self.started.wait(30) or self.failure is not None:
            raise RuntimeError(f"the metering app did not start: {self.failure!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by __enter__
            self.failure = exc
            self.started.set()

    async def _serve(self) -> None:
        engine = make_engine(self.database_url, pool_size=4)
        authorizer = await Authorizer(self.database_url).start()
        app = create_app(
            self.settings, engine,
            routers=[authorize.router, models.router, quota.router, reconciliation.router, dead_letters.router],
        )
        app.state.authorizer = authorizer
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        try:
            serving = asyncio.create_task(self.server.serve(sockets=[self.socket]))
            while not self.server.started and not serving.done():
                await asyncio.sleep(0.01)
            self.started.set()
            await serving
        finally:
            await authorizer.stop()
            await engine.dispose()


@pytest.fixture(scope="module")
def metering_app(pg_server_url: str, template_database: str) -> Iterator[tuple[ServedApp, dict[str, list[str]]]]:
    name = f"tollhouse_st_{uuid.uuid4().hex[:12]}"
    _admin(pg_server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    url = _with_database(pg_server_url, name)
    try:
        ids = seed_database(url, datetime.now(UTC))
        with ServedApp(url) as served:
            yield served, ids
    finally:
        _admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _drawn(bindings: dict[str, str], probability: float) -> dict[str, dict[str, object]]:
    return {key: {"dictionary": name, "probability": probability} for key, name in bindings.items()}


def schema_config(ids: dict[str, list[str]]) -> schemathesis.Config:
    """Seeded, bounded generation; ids of seeded objects drawn half of the time, windows more often."""
    bindings = {
        "path.account_id": "account_ids", "query.account_id": "account_ids",
        "path.key_id": "key_ids", "query.key_id": "key_ids",
        "body.package_id": "package_ids",
        "path.model": "models", "query.model": "models", "body.model": "models",
        "path.month": "months",
        "path.dead_letter_id": "dead_letter_ids",
        "body.api_key": "api_keys",
        "body.valid_until": "package_ends",
    }
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "dictionaries": {name: {"values": values} for name, values in ids.items()},
        "parameters": {
            **_drawn(bindings, 0.5),
            **_drawn({"query.from": "starts", "query.to": "ends"}, 0.7),
        },
        "operations": [
            {  # usage ranges are local days, not instants
                "include-path": "/v1/usage",
                "parameters": _drawn({"query.from": "first_days", "query.to": "end_days"}, 0.7),
            },
        ],
    })


@pytest.fixture(scope="module")
def metering_schema(metering_app):
    served, ids = metering_app
    document = httpx.get(f"{served.url}/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(document, config=schema_config(ids))
    schema.config.update(base_url=served.url)
    return schema


def token_for(case) -> str:
    """The role the route is for: gateway routes take the gateway token, all others admin."""
    return GATEWAY_TOKEN if "gateway" in (case.operation.tags or ()) else ADMIN_TOKEN


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # Schemathesis names each operation's subtest by rewriting ``node._nodeid``, which pytest 9
    # no longer has; give it one to rewrite (pytest itself reads ``nodeid``).
    request.node._nodeid = request.node.nodeid


metering = schemathesis.pytest.from_fixture("metering_schema")


@metering.parametrize()
def test_metering_api_conforms_to_its_schema(case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {token_for(case)}"}, checks=CHECKS)


def _billing_reads(ctx) -> bool:
    return ctx.operation.method.upper() == "GET" or ctx.operation.path == "/v1/reconciliation/diff"


@metering.include(_billing_reads).parametrize()
def test_metering_api_conforms_to_its_schema_for_the_billing_token(case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {BILLING_TOKEN}"}, checks=CHECKS)
