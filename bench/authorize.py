"""Authorize benchmark: the quota check every gateway call makes.

Prints, in one run:
  * the in-process authorize path (Authorizer.authorize, snapshots warm, reservations
    taken): p50/p99 in microseconds;
  * POST /v1/authorize over loopback HTTP against `tollhouse metering --no-consumer`,
    driven at a fixed request rate (default 2,000/s) by the load generator of
    bench/loadgen.py (its own process, keep-alive connections): p50/p99/max latency
    measured from each request's scheduled send time (no coordinated omission), the
    achieved rate, and how late the generator itself sent (its own error). Every key is
    called once before the measured phase, so the figures are of warm snapshots;
  * a baseline in the same run: the same load against GET /healthz of the same server
    (what the HTTP stack alone costs).

Run:  python bench/authorize.py [--keys 1000] [--rate 2000] [--seconds 15]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402

from services.local_services import free_port, port_in_use, start_embedded_postgres  # noqa: E402
from services.metering.authorizer import Authorizer  # noqa: E402
from services.metering.store.migrate import upgrade_to_head  # noqa: E402
from services.runtime import ensure_database  # noqa: E402

from loadgen import LoadGenerator, Phase, http_request, summary  # noqa: E402
from scratch import scratch_dir  # noqa: E402

NANO = 10**9
GATEWAY_TOKEN = "bench-gateway-token"
WARM_RATE = 500  # requests/s of the warm-up, which calls every key once or more


def seed(url: str, keys: int) -> list[str]:
    """Accounts of 10 keys, half PAYG with caps, half on a package; returns the secrets."""
    now = datetime.now(timezone.utc)
    out = []
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO prices (model, effective_from, input_price, output_price, cached_input_price)"
            " VALUES ('gpt-4o', %s, 2500, 10000, 1250)", (now - timedelta(days=1),))
        with conn.cursor() as cur:
            for a in range(max(1, keys // 10)):
                acc = f"acc_{a:06d}"
                cur.execute("INSERT INTO accounts (account_id, name, tier, timezone) VALUES (%s, 'b', 'developer',"
                            " 'Asia/Shanghai')", (acc,))
                cur.execute("INSERT INTO account_balances (account_id, balance) VALUES (%s, %s)", (acc, 10**6 * NANO))
                cur.execute("INSERT INTO packages (package_id, account_id, tokens_total, price, valid_from, valid_until)"
                            " VALUES (%s, %s, %s, 0, %s, %s)", (f"pkg_{a:06d}", acc, 10**15, now - timedelta(days=1),
                                                               now + timedelta(days=30)))
                cur.execute("INSERT INTO package_balances (package_id, account_id) VALUES (%s, %s)", (f"pkg_{a:06d}", acc))
            for k in range(keys):
                secret = "sk-" + secrets.token_urlsafe(32)
                package = k % 2 == 1
                cur.execute(
                    "INSERT INTO api_keys (key_id, account_id, name, secret_hash, secret_hint, billing_mode, package_id,"
                    " daily_cap, monthly_cap) VALUES (%s, %s, 'b', %s, 'sk-', %s, %s, %s, %s)",
                    (f"key_{k:06d}", f"acc_{k // 10:06d}", hashlib.sha256(secret.encode()).digest(),
                     "package" if package else "payg", f"pkg_{k // 10:06d}" if package else None,
                     0 if package else 10**5 * NANO, 0))
                out.append(secret)
    return out


async def in_process(url: str, secrets_: list[str], calls: int) -> dict:
    authorizer = await Authorizer(url).start()
    try:
        for s in secrets_:
            await authorizer.authorize(s, "gpt-4o", 500)
        samples = []
        for i in range(calls):
            s = secrets_[i % len(secrets_)]
            t = time.perf_counter_ns()
            result = await authorizer.authorize(s, "gpt-4o", 500)
            samples.append(time.perf_counter_ns() - t)
            assert result.decision.allowed
        q = statistics.quantiles(samples, n=100)
        return {"calls": calls, "p50_us": q[49] / 1000, "p99_us": q[98] / 1000}
    finally:
        await authorizer.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--calls", type=int, default=50_000)
    args = parser.parse_args()

    server = os.environ.get("TOLLHOUSE_DATABASE_URL") or start_embedded_postgres(
        scratch_dir("tollhouse-bench-") / "pg")
    url = ensure_database(server, f"bench_{uuid.uuid4().hex[:8]}")
    upgrade_to_head(url)
    keys = seed(url, args.keys)

    import uvloop

    inproc = uvloop.run(in_process(url, keys, args.calls))
    print(f"in-process authorize   p50 {inproc['p50_us']:.1f} µs  p99 {inproc['p99_us']:.1f} µs"
          f"  ({inproc['calls']:,} calls; target p50 ≤ 100 µs)", flush=True)

    port = free_port()
    env = {**os.environ, "TOLLHOUSE_DATABASE_URL": url, "TOLLHOUSE_GATEWAY_TOKEN": GATEWAY_TOKEN,
           "TOLLHOUSE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "metering", "--no-consumer", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not port_in_use(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("metering did not start")
            time.sleep(0.1)
        authorize = [http_request("/v1/authorize", GATEWAY_TOKEN,
                                  json.dumps({"api_key": k, "model": "gpt-4o", "estimated_tokens": 500}).encode())
                     for k in keys]
        health = [http_request("/healthz", GATEWAY_TOKEN, None)]
        with LoadGenerator() as load:
            # Every key's snapshot is loaded once before the measured phases (a key's first
            # call waits for one query; that is the cold path, not the steady state).
            warm = load.run(Phase("warm", port, authorize, len(keys) / WARM_RATE + 1, WARM_RATE, args.connections))
            assert warm.requests >= len(keys), "the warm-up did not reach every key"
            base = summary([load.run(Phase("healthz", port, health, args.seconds, args.rate, args.connections))])
            http = summary([load.run(Phase("authorize", port, authorize, args.seconds, args.rate, args.connections))])
    finally:
        proc.terminate()
        proc.wait(10)
    for name, r in (("GET /healthz (baseline)", base), ("POST /v1/authorize", http)):
        print(f"{name:24s} @{args.rate:,}/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  max {r['max_ms']:.1f} ms"
              f"  achieved {r['achieved_rps']:,.0f}/s  errors {r['errors']}"
              f"  (sent late p99 {r['dispatch_late_p99_ms']:.3f} ms)", flush=True)
    print("target: POST /v1/authorize p99 ≤ 2 ms at 2,000/s")
    result = {"when": datetime.now(timezone.utc).isoformat(), "in_process": inproc, "http": http, "healthz": base,
              "rate": args.rate, "keys": args.keys}
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "authorize.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
