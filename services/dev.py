"""``tollhouse dev``: everything on embedded defaults, as one process tree.

Starts PostgreSQL (embedded, data under ``DATA_DIR``) unless ``DATABASE_URL`` is set, a
Kafka-protocol broker unless ``KAFKA_BOOTSTRAP_SERVERS`` is set, migrates, then runs the
upstream simulator, metering (consumer + API) and the gateway as child processes. A demo
account with a price list, a token-package key and a PAYG key with a small daily cap is
created once and reused on later runs. Ctrl-C stops everything, gateway first so its
spool drains into the broker while metering still consumes.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import psycopg

from services.local_services import LocalBroker, port_in_use
from services.metering.store.migrate import upgrade_to_head
from services.runtime import database_url
from services.settings import Settings

READY_TIMEOUT_SECONDS = 60
DEMO_PRICES = {
    # model: (input, output, cached input) in CNY per 1M tokens, min tier
    "gpt-3.5-turbo": ("3.5", "10.5", "1.75", "free"),
    "gpt-4o-mini": ("1.05", "4.2", "0.525", "free"),
    "gpt-4o": ("17.5", "70", "8.75", "developer"),
    "gpt-4": ("210", "420", "210", "developer"),
    "text-embedding-3-small": ("0.14", "0", "0.14", "free"),
}


class DevError(SystemExit):
    pass


@dataclass
class Ports:
    gateway: int
    metering: int
    upstream: int
    broker: int


def _check_ports(ports: Ports, with_broker: bool) -> None:
    wanted = [("gateway", ports.gateway, "--gateway-port"), ("metering", ports.metering, "--metering-port"),
              ("upstream simulator", ports.upstream, "--upstream-port")]
    if with_broker:
        wanted.append(("Kafka broker", ports.broker, "--broker-port"))
    for name, port, flag in wanted:
        if port_in_use(port):
            raise DevError(
                f"port {port} (the {name}) is already in use on 127.0.0.1: stop what listens there, "
                f"or pick another port with {flag}"
            )


def _secret_file(path: Path, make) -> dict:
    """Read a small JSON file of dev secrets, or create it (mode 0600) with ``make()``."""
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    path.write_text(json.dumps(value, indent=2))
    path.chmod(0o600)
    return value


def _wait_ready(url: str, proc: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DevError(f"the {name} exited with code {proc.returncode}; its log is above")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise DevError(f"the {name} did not become ready at {url} within {READY_TIMEOUT_SECONDS} s")


def _forget_offsets(url: str, group: str) -> None:
    """The local broker keeps topics in memory: a new broker means new, empty logs, so the
    offsets booked against the previous broker no longer apply (event ids still prevent
    any double booking)."""
    with psycopg.connect(url) as conn:
        conn.execute("DELETE FROM consumer_offsets WHERE group_id = %s", (group,))


def _seed_demo(metering: str, admin_token: str) -> dict:
    headers = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=metering, headers=headers, timeout=10) as client:
        for model, (inp, out, cached, tier) in DEMO_PRICES.items():
            r = client.put(f"/v1/prices/{model}", json={
                "input_price": inp, "output_price": out, "cached_input_price": cached, "min_tier": tier,
                "batch_discount": "0.5", "effective_from": "2020-01-01T00:00:00Z"})
            if r.status_code not in (201, 409):
                raise DevError(f"could not set the demo price of {model}: {r.status_code} {r.text}")
        account = client.post("/v1/accounts", json={"name": "Demo", "tier": "developer",
                                                      "timezone": "Asia/Shanghai"}).json()
        account_id = account["account_id"]
        client.post(f"/v1/accounts/{account_id}/topups", json={"amount": "10", "reference": "demo-initial"})
        now = datetime.now(timezone.utc)
        client.post(f"/v1/accounts/{account_id}/packages", json={
            "tokens": 100_000, "price": "9.9", "valid_from": now.isoformat(),
            "valid_until": (now + timedelta(days=30)).isoformat()})
        package_key = client.post(f"/v1/accounts/{account_id}/keys",
                                  json={"name": "demo-package", "billing_mode": "package"}).json()
        payg_key = client.post(f"/v1/accounts/{account_id}/keys",
                               json={"name": "demo-payg", "billing_mode": "payg", "daily_cap": "0.05"}).json()
    return {
        "account_id": account_id,
        "package_key": {"key_id": package_key["key_id"], "api_key": package_key["api_key"]},
        "payg_key": {"key_id": payg_key["key_id"], "api_key": payg_key["api_key"], "daily_cap": "0.05"},
    }


def _banner(ports: Ports, demo: dict, tokens: dict) -> str:
    gw = f"http://127.0.0.1:{ports.gateway}"
    payg = demo["payg_key"]["api_key"]
    return f"""
Tollhouse is running.

  gateway      {gw}/v1        (OpenAI-compatible)
  metering     http://127.0.0.1:{ports.metering}   (docs at /docs)
  upstream sim http://127.0.0.1:{ports.upstream}/v1

  demo account {demo['account_id']}
  package key  {demo['package_key']['api_key']}   (100,000 tokens)
  PAYG key     {payg}   (daily cap 0.05 CNY)
  admin token   {tokens['admin']}
  billing token {tokens['billing']}

Try it:

  curl {gw}/v1/chat/completions -H "X-API-Key: {payg}" -H "Content-Type: application/json" \\
       -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  python -c 'from openai import OpenAI; c = OpenAI(api_key="{payg}", base_url="{gw}/v1"); \\
print(c.chat.completions.create(model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello"}}]).usage)'

  curl "http://127.0.0.1:{ports.metering}/v1/usage?account_id={demo['account_id']}&group_by=day" \\
       -H "Authorization: Bearer {tokens['billing']}"

Ctrl-C stops everything.
"""


def run_dev(settings: Settings, ports: Ports) -> int:
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    own_broker = not settings.kafka_bootstrap_servers
    _check_ports(ports, own_broker)

    tokens = _secret_file(data_dir / "dev-tokens.json", lambda: {
        role: secrets.token_urlsafe(24) for role in ("admin", "gateway", "billing")})
    tokens = {
        "admin": settings.admin_token or tokens["admin"],
        "gateway": settings.gateway_token or tokens["gateway"],
        "billing": settings.billing_token or tokens["billing"],
    }
    print("starting PostgreSQL …", flush=True)
    url = database_url(settings)
    upgrade_to_head(url)

    broker = None
    bootstrap = settings.kafka_bootstrap_servers
    if own_broker:
        print("starting the Kafka-protocol broker …", flush=True)
        broker = LocalBroker(ports.broker, log_path=data_dir / "broker.log").start()
        bootstrap = broker.bootstrap_servers
        _forget_offsets(url, settings.consumer_group)

    env = {
        **os.environ,
        "TOLLHOUSE_DATABASE_URL": url,
        "TOLLHOUSE_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "TOLLHOUSE_ADMIN_TOKEN": tokens["admin"],
        "TOLLHOUSE_GATEWAY_TOKEN": tokens["gateway"],
        "TOLLHOUSE_BILLING_TOKEN": tokens["billing"],
        "TOLLHOUSE_METERING_URL": f"http://127.0.0.1:{ports.metering}",
        "TOLLHOUSE_UPSTREAM_BASE_URL": f"http://127.0.0.1:{ports.upstream}/v1",
        "TOLLHOUSE_UPSTREAM_API_KEY": settings.upstream_api_key or "sk-upstream-sim",
        "TOLLHOUSE_DATA_DIR": str(data_dir.resolve()),
    }
    cli = [sys.executable, "-m", "services.cli"]
    children: list[tuple[str, subprocess.Popen]] = []

    def start(name: str, args: list[str], ready: str) -> None:
        proc = subprocess.Popen(cli + args, env=env, start_new_session=True)
        children.append((name, proc))
        _wait_ready(ready, proc, name)

    stopping = False

    def stop_all(*_: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        # A second Ctrl-C must not cut the orderly stop short (metering would outlive its database).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name, proc in reversed(children):  # gateway first, then metering, then upstream
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if broker is not None:
            broker.stop()

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        start("upstream simulator", ["upstream-sim", "--port", str(ports.upstream)],
              f"http://127.0.0.1:{ports.upstream}/v1/models")
        start("metering service", ["metering", "--port", str(ports.metering)],
              f"http://127.0.0.1:{ports.metering}/healthz")
        demo = _secret_file(data_dir / "demo.json", lambda: _seed_demo(f"http://127.0.0.1:{ports.metering}",
                                                                        tokens["admin"]))
        start("gateway", ["gateway", "--port", str(ports.gateway)], f"http://127.0.0.1:{ports.gateway}/healthz")
        print(_banner(ports, demo, tokens), flush=True)
        while all(proc.poll() is None for _, proc in children):
            time.sleep(0.5)
        dead = [name for name, proc in children if proc.poll() is not None]
        print(f"the {', '.join(dead)} stopped; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping …", flush=True)
        return 0
    finally:
        stop_all()
