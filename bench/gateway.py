"""Gateway benchmark: what the gateway adds to a call, against calling upstream directly.

Starts everything as separate processes (an embedded PostgreSQL, the local broker,
`tollhouse metering`, `tollhouse upstream-sim` with no artificial latency, and
`tollhouse gateway` in front of it) and drives them from a load generator in another
process. In one run, with the same requests:

  * non-streaming chat completions at a steady rate (default 500/s), open loop (latency
    counts from each request's scheduled send time, so a stall is not hidden): p50/p99
    through the gateway and straight to upstream-sim, and the difference (added latency);
  * streaming chat completions at the same rate: time to the first byte of the stream body
    (p50, p99) both ways, and the difference;
  * the most calls/s each way with a fixed number of connections kept busy (closed loop):
    the throughput ratio gateway / direct;
  * the gateway's CPU time per call, and whether every gateway call produced its usage event;
  * the two waits inside every gateway call, measured alone in the same run: metering's
    POST /v1/authorize at the same rate, and one spool commit (SQLite, synchronous=FULL) on
    the gateway's disk.

Direct and gateway phases alternate (A B B A …) so drift of the shared machine falls on both.

Run:  python bench/gateway.py [--rate 500] [--seconds 10] [--rounds 2] [--keys 100]
      [--profile-gateway FILE]  (the gateway under cProfile; read with python -m pstats FILE)
Starts its own embedded PostgreSQL and broker unless TOLLHOUSE_DATABASE_URL /
TOLLHOUSE_KAFKA_BOOTSTRAP_SERVERS are set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402

from services.local_services import LocalBroker, free_port, port_in_use, start_embedded_postgres  # noqa: E402
from services.metering.consumer.topics import ensure_topics  # noqa: E402
from services.metering.store.migrate import upgrade_to_head  # noqa: E402
from services.runtime import ensure_database  # noqa: E402

from loadgen import LoadGenerator, Outcome, Phase, http_request, summary  # noqa: E402
from scratch import scratch_dir  # noqa: E402

NANO = 10**9
GATEWAY_TOKEN = "bench-gateway-token"
MODEL = "gpt-4o"
PROMPT = [{"role": "user", "content": "Say hello to the gateway benchmark, briefly please."}]


def seed(url: str, keys: int) -> list[str]:
    """Accounts of 10 PAYG keys each, balance to spare and no caps; returns the API keys."""
    now = datetime.now(timezone.utc)
    out = []
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO prices (model, effective_from, input_price, output_price, cached_input_price)"
                     " VALUES (%s, %s, 2500, 10000, 1250)",
                     (MODEL, now - timedelta(days=1)))
        with conn.cursor() as cur:
            for a in range(max(1, keys // 10)):
                cur.execute("INSERT INTO accounts (account_id, name, tier, timezone) VALUES (%s, 'bench', 'developer',"
                            " 'Asia/Shanghai')", (f"acc_{a:05d}",))
                cur.execute("INSERT INTO account_balances (account_id, balance) VALUES (%s, %s)",
                            (f"acc_{a:05d}", 10**9 * NANO))
            for k in range(keys):
                secret = "sk-" + secrets.token_urlsafe(32)
                cur.execute(
                    "INSERT INTO api_keys (key_id, account_id, name, secret_hash, secret_hint, billing_mode, daily_cap,"
                    " monthly_cap) VALUES (%s, %s, 'bench', %s, 'sk-', 'payg', 0, 0)",
                    (f"key_{k:05d}", f"acc_{k // 10:05d}", hashlib.sha256(secret.encode()).digest()))
                out.append(secret)
    return out


def chat_request(key: str, stream: bool) -> bytes:
    body = json.dumps({"model": MODEL, "messages": PROMPT, "max_tokens": 16, "stream": stream}).encode()
    return http_request("/v1/chat/completions", key, body)


def authorize_request(key: str) -> bytes:
    """What the gateway sends metering for one of these calls."""
    body = json.dumps({"api_key": key, "model": MODEL, "estimated_tokens": 1_040}).encode()
    return http_request("/v1/authorize", GATEWAY_TOKEN, body)


# ---------------------------------------------------------------- the servers


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(args: list[str], env: dict, port: int, name: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not port_in_use(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"{name} did not start; see {log}")
        time.sleep(0.1)
    return proc


def _commit_latency(path: Path, commits: int = 300) -> dict:
    """p50/p99 of one small SQLite commit with the spool's settings (WAL, synchronous=FULL)
    on the gateway's disk: the fsync every non-streamed call waits for."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, key BLOB, value BLOB)")
    samples = []
    for _ in range(commits):
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO events (key, value) VALUES (?, ?)", (b"acc_00000", b"x" * 700))
        conn.execute("COMMIT")
        samples.append(time.perf_counter() - started)
        time.sleep(0.002)
    conn.close()
    q = statistics.quantiles(samples, n=100)
    return {"p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}


def _counters(servers: dict[str, subprocess.Popen], gateway_metrics: str) -> dict[str, float]:
    """CPU seconds of each server process, and the gateway's hop histograms (sum, count)."""
    text = urllib.request.urlopen(gateway_metrics, timeout=10).read().decode()
    out = {f"cpu {name}": _cpu_seconds(proc.pid) for name, proc in servers.items()}
    for key, metric in (("authorize", "tollhouse_gateway_authorize_seconds"),
                        ("upstream", "tollhouse_gateway_upstream_seconds")):
        out[f"{key}_sum"] = _metric_in(text, f"{metric}_sum")
        out[f"{key}_count"] = _metric_in(text, f"{metric}_count")
    return out


def _stalls(work: Path, windows: list[tuple[str, float, float]]) -> list[dict]:
    """The servers' ``event_loop_stalled`` log lines, each with the phase it fell in."""
    found = []
    for log in ("gateway", "metering", "upstream-sim"):
        for line in (work / f"{log}.log").read_text(errors="replace").splitlines():
            if '"event_loop_stalled"' not in line:
                continue
            stall = json.loads(line)
            at = datetime.fromisoformat(stall["timestamp"]).timestamp()
            stall["phase"] = next((name for name, start, end in windows if start <= at <= end), "between phases")
            found.append(stall)
    return sorted(found, key=lambda s: s["timestamp"])


def _metric(url: str, name: str) -> float:
    return _metric_in(urllib.request.urlopen(url, timeout=10).read().decode(), name)


def _metric_in(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=500, help="requests/s of the steady phases")
    parser.add_argument("--seconds", type=float, default=10, help="length of one steady phase")
    parser.add_argument("--rounds", type=int, default=2, help="direct/gateway alternations of each steady phase")
    parser.add_argument("--saturate-seconds", type=float, default=8, help="length of one closed-loop phase")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--saturate-connections", type=int, default=32)
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--profile-gateway", metavar="FILE", help="run the gateway under cProfile, stats to FILE")
    args = parser.parse_args()

    work = scratch_dir("tollhouse-bench-gw-")
    broker = None
    bootstrap = os.environ.get("TOLLHOUSE_KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        broker = LocalBroker(log_path=work / "broker.log").start()
        bootstrap = broker.bootstrap_servers
    try:
        run(args, work, bootstrap)
    finally:
        if broker:
            broker.stop()


def run(args: argparse.Namespace, work: Path, bootstrap: str) -> None:
    server = os.environ.get("TOLLHOUSE_DATABASE_URL") or start_embedded_postgres(work / "pg")
    url = ensure_database(server, f"bench_{uuid.uuid4().hex[:8]}")
    upgrade_to_head(url)
    keys = seed(url, args.keys)
    suffix = uuid.uuid4().hex[:6]
    topics = {"TOLLHOUSE_USAGE_TOPIC": f"bench-gw-usage-{suffix}", "TOLLHOUSE_DLQ_TOPIC": f"bench-gw-dlq-{suffix}",
              "TOLLHOUSE_BREACH_TOPIC": f"bench-gw-breach-{suffix}"}
    import uvloop

    uvloop.run(ensure_topics(bootstrap, list(topics.values()), 4))

    metering_port, sim_port, gateway_port = free_port(), free_port(), free_port()
    env = {**os.environ, **topics, "TOLLHOUSE_DATABASE_URL": url, "TOLLHOUSE_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "TOLLHOUSE_GATEWAY_TOKEN": GATEWAY_TOKEN, "TOLLHOUSE_CONSUMER_GROUP": f"bench-gw-{suffix}",
           "TOLLHOUSE_LOG_LEVEL": "warning", "TOLLHOUSE_METERING_URL": f"http://127.0.0.1:{metering_port}",
           "TOLLHOUSE_UPSTREAM_BASE_URL": f"http://127.0.0.1:{sim_port}/v1", "TOLLHOUSE_UPSTREAM_API_KEY": "sk-bench",
           "TOLLHOUSE_DATA_DIR": str(work / "gateway"), "TOLLHOUSE_GATEWAY_ID": "gw-bench"}
    profile = ["-m", "cProfile", "-o", str(Path(args.profile_gateway).resolve())] if args.profile_gateway else []
    procs = []
    try:
        procs.append(_start(["-m", "services.cli", "metering", "--no-consumer", "--port", str(metering_port)], env,
                            metering_port,
                            "metering", work / "metering.log"))
        procs.append(_start(["-m", "services.cli", "upstream-sim", "--port", str(sim_port)], env, sim_port,
                            "upstream-sim", work / "upstream-sim.log"))
        gateway = _start([*profile, "-m", "services.cli", "gateway", "--port", str(gateway_port)], env, gateway_port,
                         "gateway", work / "gateway.log")
        procs.append(gateway)
        targets = {"direct": sim_port, "gateway": gateway_port}

        unary = [chat_request(k, False) for k in keys]
        streamed = [chat_request(k, True) for k in keys]
        phases: list[Phase] = [
            Phase(f"warm {t}", port, streamed if stream else unary, 2, min(args.rate, 200), args.connections, stream)
            for t, port in targets.items() for stream in (False, True)]
        for kind, stream in (("unary", False), ("stream", True)):
            for r in range(args.rounds):
                order = ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")
                phases += [Phase(f"{t} {kind}", targets[t], streamed if stream else unary, args.seconds, args.rate,
                                 args.connections, stream)
                           for t in order]
        phases += [Phase(f"{t} saturate", targets[t], unary, args.saturate_seconds, 0, args.saturate_connections)
                   for t in ("direct", "gateway")]
        # The hops the gateway cannot avoid, at the same rate: metering's authorize as the
        # load generator sees it (its spool commit is measured below, on the gateway's disk).
        phases.append(Phase("metering authorize", metering_port, [authorize_request(k) for k in keys], args.seconds,
                            args.rate, args.connections))

        outcomes: dict[str, list[Outcome]] = {}
        spent: dict[str, dict[str, float]] = {}  # per phase: CPU seconds per process, hop seconds
        windows: list[tuple[str, float, float]] = []  # per phase: name, wall-clock start and end
        gateway_metrics = f"http://127.0.0.1:{gateway_port}/metrics"
        servers = {"gateway": gateway, "metering": procs[0], "upstream-sim": procs[1]}
        with LoadGenerator() as load:
            for phase in phases:
                before = _counters(servers, gateway_metrics)
                started = time.time()
                outcome = load.run(phase)
                windows.append((phase.name, started, time.time()))
                if not phase.name.startswith("warm"):
                    outcomes.setdefault(phase.name, []).append(outcome)
                    after = _counters(servers, gateway_metrics)
                    totals = spent.setdefault(phase.name, {})
                    for name, value in after.items():
                        totals[name] = totals.get(name, 0.0) + value - before[name]
                print(f"  {phase.name:18s} {outcome.requests:>7,} calls  {outcome.errors} errors", flush=True)
        commit = _commit_latency(work / "gateway" / "commit-probe.sqlite")
        time.sleep(2)  # the sender drains the spool
        spooled = _metric(gateway_metrics, "tollhouse_gateway_events_spooled_total")
        sent = _metric(gateway_metrics, "tollhouse_gateway_events_sent_total")
        served = _metric(gateway_metrics, "tollhouse_gateway_requests_total")
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    stalls = _stalls(work, windows)
    figures = {name: summary(o) for name, o in outcomes.items()}
    for name, f in figures.items():
        calls = max(1, f["requests"])
        used = spent[name]
        f["cpu_ms_per_call"] = {p: round(used[f"cpu {p}"] * 1000 / calls, 3)
                                for p in ("gateway", "metering", "upstream-sim")}
        if name.startswith("gateway"):
            f["authorize_mean_ms"] = used["authorize_sum"] * 1000 / max(1.0, used["authorize_count"])
            f["upstream_headers_mean_ms"] = used["upstream_sum"] * 1000 / max(1.0, used["upstream_count"])
    du, gu = figures["direct unary"], figures["gateway unary"]
    ds, gs = figures["direct stream"], figures["gateway stream"]
    dsat, gsat = figures["direct saturate"], figures["gateway saturate"]
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
        "rate": args.rate, "seconds": args.seconds, "rounds": args.rounds, "keys": args.keys,
        "added_p50_ms": gu["p50_ms"] - du["p50_ms"], "added_p99_ms": gu["p99_ms"] - du["p99_ms"],
        "steady_throughput_ratio": gu["achieved_rps"] / du["achieved_rps"],
        "added_ttfb_p50_ms": gs["ttfb_p50_ms"] - ds["ttfb_p50_ms"],
        "added_ttfb_p99_ms": gs["ttfb_p99_ms"] - ds["ttfb_p99_ms"],
        "max_throughput_ratio": gsat["achieved_rps"] / dsat["achieved_rps"],
        "authorize_direct": {k: figures["metering authorize"][k] for k in ("p50_ms", "p99_ms")},
        "spool_commit": commit,
        "usage_events": {"spooled": spooled, "sent": sent, "gateway_requests": served},
        "event_loop_stalls": stalls,
        "phases": figures,
    }
    print()
    for name, f in figures.items():
        extra = f"  first byte p50 {f['ttfb_p50_ms']:.2f} ms p99 {f['ttfb_p99_ms']:.2f} ms" if "ttfb_p50_ms" in f else ""
        cpu = "  CPU ms/call " + " ".join(f"{p} {v:.2f}" for p, v in f["cpu_ms_per_call"].items())
        hops = (f"  mean authorize {f['authorize_mean_ms']:.2f} ms, upstream headers {f['upstream_headers_mean_ms']:.2f} ms"
                if "authorize_mean_ms" in f else "")
        print(f"{name:16s} {f['achieved_rps']:>7,.0f}/s  p50 {f['p50_ms']:.2f} ms  p99 {f['p99_ms']:.2f} ms"
              f"  max {f['max_ms']:.1f} ms{extra}  ({f['requests']:,} calls, {f['errors']} errors)")
        print(f"{'':16s}{cpu}{hops}")
    print()
    print(f"added by the gateway @{args.rate}/s: p50 {result['added_p50_ms']:+.2f} ms (target ≤ 1 ms), "
          f"p99 {result['added_p99_ms']:+.2f} ms (target ≤ 3 ms); throughput at that rate "
          f"{result['steady_throughput_ratio']:.3f}× direct")
    print(f"streaming first byte added @{args.rate}/s: p50 {result['added_ttfb_p50_ms']:+.2f} ms (target ≤ 1 ms), "
          f"p99 {result['added_ttfb_p99_ms']:+.2f} ms")
    print(f"most calls/s with {args.saturate_connections} connections busy: gateway {gsat['achieved_rps']:,.0f}/s, "
          f"direct {dsat['achieved_rps']:,.0f}/s, ratio {result['max_throughput_ratio']:.2f}")
    print(f"the hops in it, at the same rate: metering authorize p50 {result['authorize_direct']['p50_ms']:.2f} ms"
          f" p99 {result['authorize_direct']['p99_ms']:.2f} ms; one spool commit (fsync) p50 {commit['p50_ms']:.2f} ms"
          f" p99 {commit['p99_ms']:.2f} ms")
    late = max(f.get("dispatch_late_p99_ms", 0.0) for f in figures.values())
    print(f"the load generator sent its requests at most {late:.3f} ms late (p99 of any steady phase)")
    print(f"event-loop stalls (a server's loop late by over 50 ms): {len(stalls) or 'none'}")
    for stall in stalls:
        print(f"  {stall['service']:12s} in {stall['phase']}: late {stall['late_ms']:.0f} ms; over its"
              f" {stall['window_ms']:.0f} ms tick the loop's thread computed {stall['cpu_ms']:.0f} ms, waited"
              f" {stall['waited']}×, was preempted {stall['preempted']}×, {stall['page_faults']} page faults")
    print(f"usage events: {spooled:,.0f} spooled, {sent:,.0f} sent to the broker, "
          f"for {served:,.0f} gateway requests")
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "gateway.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
