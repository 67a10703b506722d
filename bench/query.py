"""Query benchmark: the billing reads and finance exports over a large ledger.

Builds, server-side (INSERT … SELECT over generate_series, no Python per row), a ledger of
N usage entries (default 10,000,000) over 1,000 accounts of 10 keys in four time zones,
spread over six months, with the projections rebuilt from it by the project's own
``rebuild_projections``. Then prints, in one run:

  * ``GET /v1/usage`` for the busiest account and one month, grouped by day, over loopback
    HTTP against ``tollhouse metering --no-consumer``: p50/p95/p99 of sequential requests on
    one keep-alive connection; baseline: the same two SQL statements the store runs
    (page and totals), timed directly over one asyncpg connection;
  * for information, the same figures for ``GET /v1/ledger`` (first page of that account's
    month) and ``GET /v1/statements/{account}/{month}``;
  * ``GET /v1/exports/ledger`` of half the ledger (5,000,000 rows at the default size), every
    account, as CSV, JSONL and Parquet: rows/s from request to last byte, bytes, and the peak
    RSS of the server process during that export; baseline: raw
    ``COPY (SELECT * FROM ledger_entries WHERE <same window>) TO STDOUT (FORMAT csv)``
    read by this process.

Run:  python bench/query.py [--events 10000000] [--requests 200] [--formats csv,jsonl,parquet]
Starts its own embedded PostgreSQL unless TOLLHOUSE_DATABASE_URL is set; ``--reuse URL``
skips the build and measures an existing bench database.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402

from services.local_services import free_port, port_in_use, start_embedded_postgres  # noqa: E402
from services.metering.store.migrate import upgrade_to_head  # noqa: E402
from services.metering.store.projections import rebuild_projections  # noqa: E402
from services.runtime import ensure_database  # noqa: E402
from scratch import scratch_dir  # noqa: E402

NANO = 10**9
BILLING_TOKEN = "bench-billing-token"
ACCOUNTS = 1_000
KEYS_PER_ACCOUNT = 10  # keys 0-6 of an account are PAYG, 7-9 draw on its package
ZONES = ("Asia/Shanghai",) * 7 + ("America/New_York", "Europe/London", "Asia/Kolkata")
# model, input, output and cached-input price in nano-CNY per token (CNY per 1M tokens × 1000)
MODELS = (("gpt-4o", 17_500, 70_000, 8_750), ("gpt-4o-mini", 1_050, 4_200, 525),
          ("gpt-3.5-turbo", 3_500, 10_500, 3_500), ("deepseek-chat", 2_000, 8_000, 500))
START = datetime(2026, 5, 31, 16, tzinfo=timezone.utc)  # 2026-06-01 00:00 in Shanghai
END = datetime(2026, 11, 30, 16, tzinfo=timezone.utc)  # 2026-12-01 00:00 in Shanghai
BUSIEST = "acc_000000"  # the skew below gives account 0 about 3 % of all events
USAGE_MONTH = "2026-11"


def seed_catalog(url: str) -> None:
    """Prices, accounts (and their top-ups and packages, in the ledger too), keys."""
    with psycopg.connect(url) as conn:
        for model, inp, out, cached in MODELS:
            conn.execute("INSERT INTO prices (model, effective_from, input_price, output_price, cached_input_price)"
                         " VALUES (%s, %s, %s, %s, %s)", (model, START - timedelta(days=30), inp, out, cached))
        conn.execute(
            "INSERT INTO accounts (account_id, name, tier, timezone)"
            " SELECT format('acc_%%s', lpad(a::text, 6, '0')), 'bench ' || a, 'developer', (%s::text[])[a %% 10 + 1]"
            " FROM generate_series(0, %s - 1) a", (list(ZONES), ACCOUNTS))
        conn.execute(
            "INSERT INTO packages (package_id, account_id, tokens_total, price, valid_from, valid_until)"
            " SELECT replace(account_id, 'acc_', 'pkg_'), account_id, 1000000000000, 0, %s, %s FROM accounts",
            (START - timedelta(days=1), END + timedelta(days=365)))
        conn.execute(
            "INSERT INTO api_keys (key_id, account_id, name, secret_hash, secret_hint, billing_mode, package_id)"
            " SELECT format('key_%%s', lpad((a * %(k)s + k)::text, 6, '0')), format('acc_%%s', lpad(a::text, 6, '0')),"
            "        'bench', sha256(((a * %(k)s + k)::text)::bytea), 'sk-bench',"
            "        CASE WHEN k < 7 THEN 'payg' ELSE 'package' END,"
            "        CASE WHEN k < 7 THEN NULL ELSE format('pkg_%%s', lpad(a::text, 6, '0')) END"
            " FROM generate_series(0, %(a)s - 1) a, generate_series(0, %(k)s - 1) k",
            {"a": ACCOUNTS, "k": KEYS_PER_ACCOUNT})
        booked = START - timedelta(days=1)
        conn.execute(
            "INSERT INTO ledger_entries (entry_type, account_id, reference, event_time, local_day, balance_delta,"
            " created_at)"
            " SELECT 'topup', account_id, 'bench-topup', %(t)s, (%(t)s AT TIME ZONE timezone)::date,"
            "        1000000000000000, %(t)s FROM accounts ORDER BY account_id", {"t": booked})
        conn.execute(
            "INSERT INTO ledger_entries (entry_type, account_id, package_id, event_time, local_day, package_tokens,"
            " created_at)"
            " SELECT 'package_grant', a.account_id, p.package_id, %(t)s, (%(t)s AT TIME ZONE a.timezone)::date,"
            "        p.tokens_total, %(t)s FROM accounts a JOIN packages p USING (account_id) ORDER BY a.account_id",
            {"t": booked})


# One usage entry per i, every value derived from hashes of i so that runs are repeatable.
# Account a is floor(ACCOUNTS × u²) for a uniform u: a few busy accounts, a long tail.
USAGE_INSERT = """
INSERT INTO ledger_entries (
    entry_type, account_id, key_id, package_id, event_id, source, request_id, endpoint, model, kind, status,
    usage_estimated, event_time, local_day, inputs, prompt_tokens, completion_tokens, total_tokens, cached_tokens,
    reasoning_tokens, package_tokens, overage_tokens, charge, overage_charge, balance_delta, price_id, created_at)
SELECT 'usage', a.account_id, e.key_id, CASE WHEN e.package THEN replace(a.account_id, 'acc_', 'pkg_') END,
       md5(e.i::text)::uuid::text, 'gateway/gw-' || (e.i %% 4), 'chatcmpl-' || left(md5('r' || e.i), 24),
       '/v1/chat/completions', p.model, e.kind, e.status, e.status = 'cancelled',
       e.t, (e.t AT TIME ZONE a.timezone)::date, e.inputs, e.prompt, e.completion, e.prompt + e.completion,
       e.cached, e.reasoning,
       CASE WHEN e.package THEN e.prompt + e.completion ELSE 0 END, 0,
       CASE WHEN e.package THEN 0 ELSE e.charge END, 0, CASE WHEN e.package THEN 0 ELSE -e.charge END,
       p.price_id, e.t + interval '40 milliseconds'
FROM (
    SELECT i, account_id, key_id, package, t, kind, status, inputs, prompt, completion, cached, reasoning, model_no,
           (prompt - cached) * m.input_price + cached * m.cached_price + completion * m.output_price AS charge
    FROM (
        SELECT i, format('acc_%%s', lpad(acc::text, 6, '0')) AS account_id,
               format('key_%%s', lpad((acc * %(k)s + k)::text, 6, '0')) AS key_id, k >= 7 AS package,
               %(start)s::timestamptz + (i - 1) * %(step)s::interval
                   + make_interval(secs => (h2 %% 60000) / 1000.0 - 30)
                   - CASE WHEN h2 %% 1000 = 0 THEN make_interval(secs => h3 %% 172800) ELSE interval '0' END AS t,
               CASE WHEN h1 %% 50 = 0 THEN 'batch' ELSE 'request' END AS kind,
               CASE h3 %% 100 WHEN 0 THEN 'error' WHEN 1 THEN 'cancelled' ELSE 'ok' END AS status,
               CASE WHEN h1 %% 50 = 0 THEN 2 + h2 %% 20 ELSE 1 END AS inputs,
               prompt, completion, prompt * (h4 %% 4) / 8 AS cached, completion * (h4 %% 3) / 4 AS reasoning,
               h4 %% 4 AS model_no
        FROM (
            SELECT i, h1, h2, h3, h4, floor(%(a)s * power((h1 %% 1000003) / 1000003.0, 2))::int AS acc,
                   (h2 / 7 %% %(k)s)::int AS k, 10 + h3 / 3 %% 4000 AS prompt, h4 / 5 %% 1000 AS completion
            FROM (
                SELECT i, abs(hashint8extended(i, 1)) AS h1, abs(hashint8extended(i, 2)) AS h2,
                       abs(hashint8extended(i, 3)) AS h3, abs(hashint8extended(i, 4)) AS h4
                FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) i
            ) h
        ) r
    ) u
    JOIN (VALUES %(prices)s) m (model_no, input_price, output_price, cached_price) USING (model_no)
) e
JOIN accounts a ON a.account_id = e.account_id
JOIN prices p ON p.model = (%(models)s::text[])[e.model_no + 1]
ORDER BY e.i
"""


def build_ledger(url: str, events: int, chunk: int = 1_000_000) -> float:
    """The usage entries in chunks (one transaction each), then VACUUM ANALYZE; seconds taken."""
    started = time.perf_counter()
    step = (END - START) / events
    prices = ", ".join(f"({n}, {inp}, {out}, {cached})" for n, (_, inp, out, cached) in enumerate(MODELS))
    sql = USAGE_INSERT.replace("%(prices)s", prices)
    with psycopg.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")
        for lo in range(1, events + 1, chunk):
            hi = min(events, lo + chunk - 1)
            conn.execute(sql, {"lo": lo, "hi": hi, "start": START, "step": step, "a": ACCOUNTS,
                               "k": KEYS_PER_ACCOUNT, "models": [m[0] for m in MODELS]})
            conn.commit()
            print(f"  ledger: {hi:,} / {events:,} usage entries ({time.perf_counter() - started:.0f} s)", flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) ledger_entries")
    return time.perf_counter() - started


def build(url: str, events: int) -> dict:
    started = time.perf_counter()
    upgrade_to_head(url)
    seed_catalog(url)
    ledger_s = build_ledger(url, events)
    t = time.perf_counter()
    rebuilt = rebuild_projections(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) usage_daily, key_spend, account_balances, package_balances")
    projections_s = time.perf_counter() - t
    print(f"  projections rebuilt from the ledger in {projections_s:.0f} s: "
          + ", ".join(f"{table} {rows:,}" for table, rows in rebuilt.items()), flush=True)
    return {"ledger_s": round(ledger_s), "projections_s": round(projections_s), "projection_rows": rebuilt,
            "total_s": round(time.perf_counter() - started)}


# Latency of the read API


def quantiles(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": round(q[49], 3), "p95_ms": round(q[94], 3), "p99_ms": round(q[98], 3),
            "max_ms": round(max(samples), 3), "n": len(samples)}


def time_http(client, path: str, params: dict, requests: int, warmup: int = 20) -> tuple[dict, dict]:
    """Sequential GETs on one keep-alive connection: (latency figures, last body)."""
    samples = []
    body = None
    for i in range(warmup + requests):
        t = time.perf_counter()
        r = client.get(path, params=params)
        elapsed = (time.perf_counter() - t) * 1000
        if r.status_code != 200:
            raise SystemExit(f"GET {path} → {r.status_code}: {r.text[:300]}")
        body = r.json()
        if i >= warmup:
            samples.append(elapsed)
    return quantiles(samples), body


# The two statements BillingStore.usage runs for group_by=day (page and totals), in one
# read-only REPEATABLE READ transaction as the store does.
USAGE_SUMS = ("requests", "inputs", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
              "total_tokens", "package_tokens", "charge")
_SUMS_SQL = ", ".join(f"coalesce(sum({c}), 0) AS {c}" for c in USAGE_SUMS)
USAGE_PAGE_SQL = (f"SELECT day, {_SUMS_SQL} FROM usage_daily WHERE account_id = $1 AND day >= $2 AND day < $3"
                  " GROUP BY day ORDER BY day LIMIT $4")
USAGE_TOTALS_SQL = f"SELECT {_SUMS_SQL} FROM usage_daily WHERE account_id = $1 AND day >= $2 AND day < $3"


async def time_usage_sql(url: str, account: str, first: date, end: date, requests: int, warmup: int = 20):
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        samples = []
        for i in range(warmup + requests):
            t = time.perf_counter()
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            rows = await conn.fetch(USAGE_PAGE_SQL, account, first, end, 101)  # prepared once, then cached
            total = await conn.fetchrow(USAGE_TOTALS_SQL, account, first, end)
            await conn.execute("COMMIT")
            if i >= warmup:
                samples.append((time.perf_counter() - t) * 1000)
        return quantiles(samples), rows, total
    finally:
        await conn.close()


# Exports


class PeakRss:
    """Peak resident memory of a process while a block runs: the kernel's high-water mark
    (reset first through /proc/PID/clear_refs when allowed) and a 10 ms sampler."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.sampled_kb = 0
        self.hwm_kb: int | None = None
        self._stop = threading.Event()

    def _status(self, field: str) -> int:
        for line in open(f"/proc/{self.pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled_kb = max(self.sampled_kb, self._status("VmRSS"))
            self._stop.wait(0.01)

    def __enter__(self) -> "PeakRss":
        self.reset = False
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            pass
        self.before_kb = self._status("VmRSS")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.reset:
            self.hwm_kb = self._status("VmHWM")

    @property
    def peak_mb(self) -> float:
        return max(self.sampled_kb, self.hwm_kb or 0) / 1024


def time_export(port: int, pid: int, params: dict, fmt: str, keep: Path | None) -> dict:
    """One GET /v1/exports/ledger, read to the end over loopback; the body is counted (and
    written to ``keep`` for Parquet, to read its row count back)."""
    import httpx

    started = time.perf_counter()
    size = 0
    lines = 0
    with PeakRss(pid) as rss, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                           headers={"Authorization": f"Bearer {BILLING_TOKEN}"}) as client:
        sink = keep.open("wb") if keep else None
        with client.stream("GET", "/v1/exports/ledger", params={**params, "format": fmt}) as r:
            if r.status_code != 200:
                raise SystemExit(f"export {fmt} → {r.status_code}: {r.read()[:300]!r}")
            first_byte = time.perf_counter() - started
            for chunk in r.iter_raw(1 << 20):
                size += len(chunk)
                if fmt != "parquet":
                    lines += chunk.count(b"\n")
                if sink:
                    sink.write(chunk)
        if sink:
            sink.close()
    elapsed = time.perf_counter() - started
    if fmt == "parquet":
        import pyarrow.parquet as pq

        meta = pq.read_metadata(keep)
        rows, groups = meta.num_rows, meta.num_row_groups
    else:
        rows, groups = lines - (fmt == "csv"), None
    return {"format": fmt, "rows": rows, "bytes": size, "seconds": round(elapsed, 2),
            "rows_per_s": round(rows / elapsed), "first_byte_ms": round(first_byte * 1000, 1),
            "server_peak_rss_mb": round(rss.peak_mb, 1), "server_rss_before_mb": round(rss.before_kb / 1024, 1),
            "row_groups": groups}


async def raw_copy(url: str, time_from: datetime, time_to: datetime) -> dict:
    """Baseline: the matching ledger rows as stored, COPY'd out as CSV and thrown away."""
    import asyncpg

    conn = await asyncpg.connect(url)
    size = 0

    async def sink(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)

    try:
        started = time.perf_counter()
        status = await conn.copy_from_query(
            "SELECT * FROM ledger_entries WHERE event_time >= $1 AND event_time < $2", time_from, time_to,
            output=sink, format="csv")
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    rows = int(status.split()[-1])
    return {"rows": rows, "bytes": size, "seconds": round(elapsed, 2), "rows_per_s": round(rows / elapsed)}


def cli_export(url: str, params: dict, fmt: str, target: Path) -> dict:
    """``tollhouse export`` in its own process: rows/s and that process's peak RSS."""
    env = {**os.environ, "TOLLHOUSE_DATABASE_URL": url, "TOLLHOUSE_LOG_LEVEL": "warning"}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "export", "--from", params["from"],
                             "--to", params["to"], "--format", fmt, "--output", str(target)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    out = proc.stdout.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"tollhouse export failed ({proc.returncode})")
    rows = int(out.split("exported ")[1].split()[0])
    return {"format": fmt, "rows": rows, "bytes": target.stat().st_size, "seconds": round(elapsed, 2),
            "rows_per_s": round(rows / elapsed), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def start_metering(url: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "TOLLHOUSE_DATABASE_URL": url, "TOLLHOUSE_BILLING_TOKEN": BILLING_TOKEN,
           "TOLLHOUSE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "metering", "--no-consumer", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not port_in_use(port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("metering did not start")
        time.sleep(0.1)
    return proc, port


def main() -> None:
    import asyncio

    import httpx

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="usage entries in the ledger")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per read endpoint")
    parser.add_argument("--formats", default="csv,jsonl,parquet")
    parser.add_argument("--no-cli", action="store_true", help="skip the tollhouse export run")
    parser.add_argument("--reuse", metavar="URL", help="measure this already-built bench database")
    args = parser.parse_args()

    build_figures = None
    if args.reuse:
        url = args.reuse
    else:
        server = os.environ.get("TOLLHOUSE_DATABASE_URL") or start_embedded_postgres(
            scratch_dir("tollhouse-bench-") / "pg")
        url = ensure_database(server, f"bench_{uuid.uuid4().hex[:8]}")
        print(f"building a ledger of {args.events:,} usage entries in {url}", flush=True)
        build_figures = build(url, args.events)
    with psycopg.connect(url) as conn:
        ledger_rows = conn.execute("SELECT count(*) FROM ledger_entries").fetchone()[0]
        busiest_rows = conn.execute("SELECT count(*) FROM ledger_entries WHERE account_id = %s", (BUSIEST,)).fetchone()[0]
    result: dict = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                    "ledger_rows": ledger_rows, "accounts": ACCOUNTS, "keys": ACCOUNTS * KEYS_PER_ACCOUNT,
                    "build": build_figures, "busiest_account_rows": busiest_rows}
    print(f"ledger: {ledger_rows:,} entries; {BUSIEST} has {busiest_rows:,}", flush=True)

    proc, port = start_metering(url)
    try:
        # Reads: usage for one account and month by day; ledger page and statement for information.
        first, end = date(2026, 11, 1), date(2026, 12, 1)
        usage_params = {"account_id": BUSIEST, "from": first.isoformat(), "to": end.isoformat(), "group_by": "day"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                          headers={"Authorization": f"Bearer {BILLING_TOKEN}"}) as client:
            usage_http, usage_body = time_http(client, "/v1/usage", usage_params, args.requests)
            ledger_http, _ = time_http(client, "/v1/ledger", {
                "account_id": BUSIEST, "from": "2026-11-01T00:00:00+08:00", "to": "2026-12-01T00:00:00+08:00",
                "limit": 100}, args.requests)
            statement_http, statement = time_http(client, f"/v1/statements/{BUSIEST}/{USAGE_MONTH}", {},
                                                  max(20, args.requests // 4), warmup=3)
        usage_sql, sql_rows, sql_totals = asyncio.run(time_usage_sql(url, BUSIEST, first, end, args.requests))
        if [r["day"] for r in usage_body["data"]] != [r["day"].isoformat() for r in sql_rows] or \
                usage_body["totals"]["requests"] != sql_totals["requests"]:
            raise SystemExit("GET /v1/usage and its SQL disagree")
        with psycopg.connect(url) as conn:  # the projection against the ledger it came from
            from_ledger = conn.execute(
                "SELECT count(*), coalesce(sum(charge), 0) FROM ledger_entries WHERE account_id = %s"
                " AND entry_type = 'usage' AND local_day >= %s AND local_day < %s", (BUSIEST, first, end)).fetchone()
        if (usage_body["totals"]["requests"], int(sql_totals["charge"])) != tuple(from_ledger):
            raise SystemExit(f"usage_daily disagrees with the ledger: {usage_body['totals']} vs {from_ledger}")
        result["usage"] = {"account": BUSIEST, "month": USAGE_MONTH, "group_by": "day",
                           "rows": len(usage_body["data"]), "requests_in_month": from_ledger[0],
                           "http": usage_http, "sql_baseline": usage_sql}
        result["ledger_page"] = {"limit": 100, "http": ledger_http}
        result["statement"] = {"http": statement_http}
        for name, figures in (("GET /v1/usage (day)", usage_http), ("  same SQL, direct", usage_sql),
                              ("GET /v1/ledger (100)", ledger_http), ("GET /v1/statements", statement_http)):
            print(f"{name:24s} p50 {figures['p50_ms']:7.2f} ms  p95 {figures['p95_ms']:7.2f} ms"
                  f"  p99 {figures['p99_ms']:7.2f} ms  ({figures['n']} requests)", flush=True)
        print(f"  usage: {len(usage_body['data'])} days, {from_ledger[0]:,} requests in {USAGE_MONTH};"
              f" target p95 ≤ 20 ms", flush=True)

        # Exports: the later half of the ledger's time span, every account.
        middle = START + (END - START) / 2
        window = {"from": middle.isoformat(), "to": END.isoformat()}
        baseline = asyncio.run(raw_copy(url, middle, END))
        print(f"raw COPY baseline        {baseline['rows']:,} rows  {baseline['rows_per_s']:>9,} rows/s"
              f"  {baseline['bytes'] / 1e6:,.0f} MB", flush=True)
        exports = []
        with tempfile.TemporaryDirectory(prefix="tollhouse-bench-export-") as tmp:
            for fmt in args.formats.split(","):
                keep = Path(tmp) / "export.parquet" if fmt == "parquet" else None
                figures = time_export(port, proc.pid, window, fmt, keep)
                exports.append(figures)
                print(f"GET /v1/exports/ledger {fmt:7s} {figures['rows']:,} rows  {figures['rows_per_s']:>9,} rows/s"
                      f"  ({figures['rows_per_s'] / baseline['rows_per_s']:.2f} of raw COPY)"
                      f"  {figures['bytes'] / 1e6:,.0f} MB  server peak RSS {figures['server_peak_rss_mb']:,.0f} MB"
                      f" (before {figures['server_rss_before_mb']:,.0f} MB)", flush=True)
                if figures["rows"] != baseline["rows"]:
                    raise SystemExit(f"the {fmt} export has {figures['rows']:,} rows, not {baseline['rows']:,}")
            cli = None
            if not args.no_cli:
                cli = cli_export(url, window, "csv", Path(tmp) / "export.csv")
                print(f"tollhouse export csv     {cli['rows']:,} rows  {cli['rows_per_s']:>9,} rows/s"
                      f"  peak RSS {cli['peak_rss_mb']:,.0f} MB (counts the rows first, writes a file)", flush=True)
        result["exports"] = {"window": window, "raw_copy_baseline": baseline, "http": exports, "cli": cli}
    finally:
        proc.terminate()
        proc.wait(10)
    print("targets: usage p95 ≤ 20 ms; CSV export ≥ 300,000 rows/s with peak RSS ≤ 200 MB")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "query.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
