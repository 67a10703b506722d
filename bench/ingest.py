"""Ingest benchmark: Kafka → rated, committed ledger (projections included).

Prints, in one run on this machine:
  * sustained events/s of the metering consumers over N pre-produced events (default 1,000,000
    across 10,000 keys), from the first commit to the last: by default two `tollhouse
    metering --no-api` processes, in one consumer group, of CONSUMER_MEMBERS members each as
    `tollhouse metering` runs them (one process per core: a process's Python runs on one core);
  * p50/p99 produce-to-commit latency while a separate process produces at a steady rate
    (default 5,000 events/s), consumed by members in this process;
  * baselines measured in the same run: the raw consume rate from the broker (no work), and
    the raw COPY rate of the same rows (usage_events + ledger_entries) into PostgreSQL;
  * the ratio of the pipeline to those baselines, and peak memory (of this process and of
    each metering process);
  * the CPU each event cost the consumers, PostgreSQL and the broker while the pipeline ran,
    and the rate the machine's cores could give at that cost;
  * what PostgreSQL wrote to its write-ahead log per event (bytes, records, full-page
    images) and how many checkpoints ran meanwhile.

Run:  python bench/ingest.py [--events 1000000] [--keys 10000] [--rate 5000] [--seconds 20]
                             [--consumers 2] [--members 2]
Starts its own embedded PostgreSQL (PostgreSQL's default settings) and broker unless
TOLLHOUSE_DATABASE_URL / TOLLHOUSE_KAFKA_BOOTSTRAP_SERVERS are set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpg  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from services.contracts.events import build_usage_event, encode_event, format_time  # noqa: E402
from services.local_services import LocalBroker, start_embedded_postgres  # noqa: E402
from services.logging import configure_logging  # noqa: E402
from services.metering.consumer.topics import ensure_topics  # noqa: E402
from services.metering.consumer.worker import UsageConsumer, consumer_members  # noqa: E402
from services.metering.store.migrate import upgrade_to_head  # noqa: E402
from services.runtime import ensure_database, settle_heap  # noqa: E402
from services.settings import Settings, load_settings  # noqa: E402
from scratch import scratch_dir  # noqa: E402

NANO = 10**9
MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-3.5-turbo")


def seed(url: str, keys: int) -> list[tuple[str, str]]:
    """Accounts of 10 keys each: 80 % PAYG keys with caps, 20 % package keys."""
    accounts = max(1, keys // 10)
    now = datetime.now(timezone.utc)
    out = []
    with psycopg.connect(url) as conn:
        for model in MODELS:
            conn.execute(
                "INSERT INTO prices (model, effective_from, input_price, output_price, cached_input_price,"
                " per_request_fee, batch_discount_ppm, package_weight_ppm) VALUES (%s, %s, 2500, 10000, 1250, 0,"
                " 500000, 1000000)", (model, now - timedelta(days=400)))
        with conn.cursor() as cur:
            with cur.copy("COPY accounts (account_id, name, tier, timezone) FROM STDIN") as copy:
                for a in range(accounts):
                    copy.write_row((f"acc_{a:06d}", f"bench {a}", "developer", "Asia/Shanghai"))
            with cur.copy("COPY account_balances (account_id, balance) FROM STDIN") as copy:
                for a in range(accounts):
                    copy.write_row((f"acc_{a:06d}", 10**6 * NANO))
            with cur.copy("COPY packages (package_id, account_id, tokens_total, price, valid_from, valid_until)"
                          " FROM STDIN") as copy:
                for a in range(accounts):
                    copy.write_row((f"pkg_{a:06d}", f"acc_{a:06d}", 10**12, 0, now - timedelta(days=400),
                                    now + timedelta(days=30)))
            with cur.copy("COPY package_balances (package_id, account_id) FROM STDIN") as copy:
                for a in range(accounts):
                    copy.write_row((f"pkg_{a:06d}", f"acc_{a:06d}"))
            with cur.copy("COPY api_keys (key_id, account_id, name, secret_hash, secret_hint, billing_mode,"
                          " package_id, daily_cap, monthly_cap) FROM STDIN") as copy:
                for k in range(keys):
                    acc = f"acc_{k // 10:06d}"
                    package = k % 10 >= 8
                    copy.write_row((f"key_{k:06d}", acc, "bench", uuid.uuid4().bytes + uuid.uuid4().bytes,
                                    "sk-bench", "package" if package else "payg",
                                    f"pkg_{k // 10:06d}" if package else None,
                                    0 if package else 50 * NANO, 0 if package else 1000 * NANO))
                    out.append((acc, f"key_{k:06d}"))
    return out


def make_payloads(keys: list[tuple[str, str]], count: int, seed_value: int = 1) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed_value)
    base = datetime.now(timezone.utc) - timedelta(hours=2)
    out = []
    for i in range(count):
        acc, key = keys[rng.randrange(len(keys))]
        prompt = rng.randint(10, 4000)
        completion = rng.randint(0, 1000)
        event = build_usage_event(
            account_id=acc, key_id=key, model=MODELS[i % 3], prompt_tokens=prompt, completion_tokens=completion,
            cached_tokens=prompt // 4, request_id=f"req-{i}", time=base + timedelta(microseconds=5 * i),
            source="gateway/bench", kind="batch" if i % 50 == 0 else "request", inputs=1 + (i % 50 == 0) * 9,
        )
        out.append((acc.encode(), encode_event(event)))
    return out


async def produce_all(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=20,
                                max_batch_size=512 * 1024)
    await producer.start()
    started = time.perf_counter()
    pending = []
    for key, value in payloads:
        pending.append(await producer.send(topic, value, key=key))
        if len(pending) >= 20_000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    elapsed = time.perf_counter() - started
    await producer.stop()
    return len(payloads) / elapsed


async def raw_consume_rate(bootstrap: str, topic: str, expected: int) -> float:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"raw-{uuid.uuid4().hex[:6]}",
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20)
    await consumer.start()
    seen = 0
    started = None
    while seen < expected:
        batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
        if started is None and batch:
            started = time.perf_counter()
        seen += sum(len(v) for v in batch.values())
    elapsed = time.perf_counter() - started
    await consumer.stop()
    return expected / elapsed


class CpuMeter:
    """CPU seconds spent between ``start`` and ``stop`` by the consumer (this process, or the
    metering processes given), and by this machine's PostgreSQL and broker processes (none
    found: an outside server, reported as n/a). A process that exits in between is missed."""

    def __init__(self, consumer_pids: list[int] | None = None) -> None:
        self.consumer_pids = consumer_pids
        self._started: dict[tuple[str, int], float] = {}
        self.spent: dict[str, float | None] = {}
        self.events = 0

    def _read(self) -> dict[tuple[str, int], float]:
        now: dict[tuple[str, int], float] = {}
        for proc in psutil.process_iter(["name", "cpu_times"]):
            name, times = proc.info["name"] or "", proc.info["cpu_times"]
            if times is None:
                continue
            role = ("postgres" if name == "postgres" else "broker" if name.startswith("tansu")
                    else "consumer" if self.consumer_pids and proc.pid in self.consumer_pids else None)
            if role:
                now[(role, proc.pid)] = times.user + times.system
        if self.consumer_pids is None:
            now[("consumer", os.getpid())] = time.process_time()
        return now

    def start(self) -> None:
        self._started = self._read()

    def stop(self, events: int) -> None:
        """``events``: how many were booked between start and stop."""
        self.events = events
        self.spent = {"consumer": None, "postgres": None, "broker": None}
        for (role, pid), seconds in self._read().items():
            self.spent[role] = (self.spent[role] or 0.0) + seconds - self._started.get((role, pid), 0.0)

    def per_event_us(self) -> dict[str, float | None]:
        return {role: None if s is None else round(s / self.events * 1e6, 1) for role, s in self.spent.items()}

    def summary(self) -> str:
        per_event = self.per_event_us()
        parts = [f"{role} {'n/a' if us is None else f'{us:.1f} µs'}" for role, us in per_event.items()]
        text = "CPU per event: " + ", ".join(parts)
        if None not in per_event.values():
            bound = (os.cpu_count() or 1) / sum(per_event.values()) * 1e6
            text += f" — {os.cpu_count()} cores give at most {bound:,.0f} events/s at that cost"
        return text


def peak_rss_mb(pid: int) -> float:
    """The most memory process ``pid`` has held (Linux: VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


class WalMeter:
    """What PostgreSQL wrote to its write-ahead log between ``start`` and ``stop``
    (``pg_stat_wal``, server-wide): bytes and full-page images per event."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._started: tuple[int, int, int, int] | None = None
        self.per_event: dict[str, float] = {}

    async def _read(self) -> tuple[int, int, int, int]:
        conn = await asyncpg.connect(self.url)
        try:
            row = await conn.fetchrow("SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal")
            checkpoints = await conn.fetchval("SELECT num_timed + num_requested FROM pg_stat_checkpointer")
        finally:
            await conn.close()
        return int(row[0]), int(row[1]), int(row[2]), int(checkpoints)

    async def start(self) -> None:
        self._started = await self._read()

    async def stop(self, events: int) -> None:
        now = await self._read()
        records, fpi, wal_bytes, checkpoints = (b - a for a, b in zip(self._started, now))
        self.per_event = {"wal_records": records / events, "wal_fpi": fpi / events, "wal_bytes": wal_bytes / events,
                          "checkpoints": checkpoints}

    def summary(self) -> str:
        e = self.per_event
        return (f"WAL per event: {e['wal_bytes']:,.0f} bytes, {e['wal_records']:.1f} records,"
                f" {e['wal_fpi']:.3f} full-page images; {e['checkpoints']} checkpoints")


def start_members(settings, url: str, stop: asyncio.Event, on_commit=None) -> tuple[list[UsageConsumer], list]:
    """This process's consumer members (``consumer_members``), running as `tollhouse metering`
    runs them until ``stop``; ``on_commit(outcome)`` is called after each committed batch."""
    settle_heap()  # as `tollhouse metering` does once started
    consumers = consumer_members(settings, url)
    if on_commit is not None:
        for consumer in consumers:
            consumer.on_commit.append(on_commit)
    return consumers, [asyncio.create_task(c.run(stop)) for c in consumers]


async def pipeline_rate(settings, url: str, expected: int, cpu: CpuMeter,
                        wal: WalMeter) -> tuple[float, list[UsageConsumer]]:
    """The rate of the consumer members from when all have their partitions to the last commit."""
    stop = asyncio.Event()
    consumers, tasks = start_members(settings, url, stop)
    started = None
    while sum(c.totals.received for c in consumers) < expected:
        if started is None and all(c.assigned.is_set() for c in consumers):
            started = time.perf_counter()
            cpu.start()
            await wal.start()
        for task in tasks:
            if task.done():
                task.result()
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    cpu.stop(expected)
    await wal.stop(expected)
    stop.set()
    await asyncio.gather(*tasks)
    return expected / elapsed, consumers


async def group_rate(settings, url: str, expected: int, consumers: int,
                     wal: WalMeter) -> tuple[float, CpuMeter, list[float]]:
    """``consumers`` real ``tollhouse metering --no-api`` processes in one consumer group: the
    rate from the first committed batch to the last, and each process's peak memory (MB). Progress is read from the group's
    committed offsets (a few rows), not by counting the ledger, whose scans would take CPU
    from the pipeline being measured."""
    env = {**os.environ, "TOLLHOUSE_DATABASE_URL": url, "TOLLHOUSE_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
           "TOLLHOUSE_USAGE_TOPIC": settings.usage_topic, "TOLLHOUSE_DLQ_TOPIC": settings.dlq_topic,
           "TOLLHOUSE_BREACH_TOPIC": settings.breach_topic, "TOLLHOUSE_CONSUMER_GROUP": settings.consumer_group,
           "TOLLHOUSE_CONSUMER_BATCH_MAX": str(settings.consumer_batch_max),
           "TOLLHOUSE_CONSUMER_MEMBERS": str(settings.consumer_members), "TOLLHOUSE_LOG_LEVEL": "warning"}
    procs = [subprocess.Popen([sys.executable, "-m", "services.cli", "metering", "--no-api"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(consumers)]
    cpu = CpuMeter([proc.pid for proc in procs])
    conn = await asyncpg.connect(url)
    try:
        started = None
        committed = (
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM consumer_offsets WHERE group_id = $1 AND topic = $2"
        )
        while (booked := await conn.fetchval(committed, settings.consumer_group, settings.usage_topic)) < expected:
            if started is None and booked:
                started, first = time.perf_counter(), booked
                cpu.start()
                await wal.start()
            if any(proc.poll() is not None for proc in procs):
                raise SystemExit("a metering process stopped early")
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        cpu.stop(expected - first)
        await wal.stop(expected - first)
        return (expected - first) / elapsed, cpu, [peak_rss_mb(proc.pid) for proc in procs]
    finally:
        await conn.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


async def raw_copy_rate(url: str, expected: int) -> float:
    """COPY the rows the pipeline wrote (events + ledger) into empty twins of the tables."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE bench_events (LIKE usage_events INCLUDING ALL)")
        await conn.execute("CREATE TABLE bench_ledger (LIKE ledger_entries INCLUDING ALL)")
        from services.metering.store.ingest import LEDGER_COLUMNS, USAGE_EVENT_COLUMNS

        events = await conn.fetch(f"SELECT {', '.join(USAGE_EVENT_COLUMNS)} FROM usage_events LIMIT {expected}")
        ledger = await conn.fetch(
            f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger_entries WHERE entry_type = 'usage' LIMIT {expected}")
        events = [tuple(r) for r in events]
        ledger = [tuple(r) for r in ledger]
        batch = 5000
        started = time.perf_counter()
        for i in range(0, len(events), batch):
            async with conn.transaction():
                await conn.copy_records_to_table("bench_events", records=events[i:i + batch], columns=USAGE_EVENT_COLUMNS)
                await conn.copy_records_to_table("bench_ledger", records=ledger[i:i + batch], columns=LEDGER_COLUMNS)
        elapsed = time.perf_counter() - started
        await conn.execute("DROP TABLE bench_events, bench_ledger")
        return len(events) / elapsed
    finally:
        await conn.close()


def _steady_producer(bootstrap: str, topic: str, keys: list, rate: int, seconds: float) -> None:
    async def go() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=1)
        await producer.start()
        rng = random.Random(3)
        tick = 0.01
        per_tick = rate * tick
        started = time.perf_counter()
        sent = 0
        while (now := time.perf_counter()) - started < seconds:
            due = int((now - started) * rate) - sent
            for _ in range(due):
                acc, key = keys[rng.randrange(len(keys))]
                event = build_usage_event(account_id=acc, key_id=key, model=MODELS[sent % 3],
                                          prompt_tokens=rng.randint(10, 4000), completion_tokens=rng.randint(0, 999),
                                          request_id=f"steady-{sent}", source="gateway/steady")
                await producer.send(topic, encode_event(event), key=acc.encode())
                sent += 1
            await asyncio.sleep(max(0.0, tick - (time.perf_counter() - now)) if due < per_tick * 2 else 0)
        await producer.flush()
        await producer.stop()

    asyncio.run(go())


async def latency_at_rate(settings, url: str, keys: list, rate: int, seconds: float) -> dict:
    latencies: list[float] = []

    def record(outcome) -> None:
        committed = datetime.now(timezone.utc)
        latencies.extend((committed - t).total_seconds() for t in outcome.event_times)

    stop = asyncio.Event()
    consumers, tasks = start_members(settings, url, stop, record)
    while not all(c.assigned.is_set() for c in consumers):
        await asyncio.sleep(0.05)
    proc = multiprocessing.get_context("spawn").Process(
        target=_steady_producer, args=(settings.kafka_bootstrap_servers, settings.usage_topic, keys, rate, seconds))
    proc.start()
    while proc.is_alive():
        await asyncio.sleep(0.1)
    await asyncio.sleep(2)
    stop.set()
    await asyncio.gather(*tasks)
    warm = latencies[len(latencies) // 20:]  # drop the first 5 % (connection warm-up)
    q = statistics.quantiles(warm, n=100)
    return {"events": len(latencies), "rate": rate, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000,
            "max_ms": max(warm) * 1000}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--batch", type=int, default=Settings.model_fields["consumer_batch_max"].default)
    parser.add_argument("--latency-only", action="store_true", help="skip the throughput and baseline phases")
    parser.add_argument("--consumers", type=int, default=2,
                        help="for the sustained rate: N `tollhouse metering --no-api` processes in one group"
                             " (default 2, one per core of the 2-core machine the targets are set for);"
                             " 1 consumes in this process")
    parser.add_argument("--members", type=int, default=Settings.model_fields["consumer_members"].default,
                        help="consumer group members per consuming process (CONSUMER_MEMBERS; by default as"
                             " `tollhouse metering` runs)")
    args = parser.parse_args()
    configure_logging("console", "warning")

    broker = None
    bootstrap = os.environ.get("TOLLHOUSE_KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        broker = LocalBroker().start()
        bootstrap = broker.bootstrap_servers
    try:
        server = os.environ.get("TOLLHOUSE_DATABASE_URL") or start_embedded_postgres(
            scratch_dir("tollhouse-bench-") / "pg")
        url = ensure_database(server, f"bench_{uuid.uuid4().hex[:8]}")
        upgrade_to_head(url)
        keys = seed(url, args.keys)
        suffix = uuid.uuid4().hex[:6]
        settings = load_settings(
            database_url=url, kafka_bootstrap_servers=bootstrap, usage_topic=f"bench-usage-{suffix}",
            dlq_topic=f"bench-dlq-{suffix}", breach_topic=f"bench-breach-{suffix}", consumer_group=f"bench-{suffix}",
            topic_partitions=args.partitions, consumer_batch_max=args.batch, consumer_members=args.members,
            log_level="warning",
        )
        await ensure_topics(bootstrap, [settings.usage_topic, settings.dlq_topic, settings.breach_topic], args.partitions)

        if args.latency_only:
            lat = await latency_at_rate(settings, url, keys, args.rate, args.seconds)
            print(f"produce→commit @{args.rate:,}/s p50 {lat['p50_ms']:.1f} ms  p99 {lat['p99_ms']:.1f} ms"
                  f"  max {lat['max_ms']:.1f} ms ({lat['events']:,} events)")
            return
        print(f"generating {args.events:,} events over {len(keys):,} keys …", flush=True)
        payloads = make_payloads(keys, args.events)
        produce_rate = await produce_all(bootstrap, settings.usage_topic, payloads)
        del payloads
        print(f"  produced at {produce_rate:,.0f} events/s", flush=True)

        consume_rate = await raw_consume_rate(bootstrap, settings.usage_topic, args.events)
        print(f"  baseline raw consume: {consume_rate:,.0f} events/s", flush=True)
        wal = WalMeter(url)
        metering_peaks: list[float] = []  # MB per metering process (none when consuming here)
        if args.consumers == 1:
            cpu = CpuMeter()
            rate, consumers = await pipeline_rate(settings, url, args.events, cpu, wal)
            print(f"  pipeline sustained:   {rate:,.0f} events/s  ({args.members} consumer members; accepted"
                  f" {sum(c.totals.accepted for c in consumers):,},"
                  f" dead-lettered {sum(c.totals.dead_lettered for c in consumers):,})", flush=True)
        else:
            rate, cpu, metering_peaks = await group_rate(settings, url, args.events, args.consumers, wal)
            print(f"  pipeline sustained:   {rate:,.0f} events/s  ({args.consumers} metering processes in one group,"
                  f" {args.members} members each)", flush=True)
        print(f"    {cpu.summary()}", flush=True)
        print(f"    {wal.summary()}", flush=True)
        copy_rate = await raw_copy_rate(url, args.events)
        print(f"  baseline raw COPY:    {copy_rate:,.0f} events/s (usage_events + ledger_entries rows)", flush=True)

        lat_settings = settings.model_copy(update={"usage_topic": f"bench-steady-{suffix}", "consumer_group": f"steady-{suffix}"})
        await ensure_topics(bootstrap, [lat_settings.usage_topic], args.partitions)
        latency = await latency_at_rate(lat_settings, url, keys, args.rate, args.seconds)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        result = {
            "when": format_time(datetime.now(timezone.utc)),
            "events": args.events, "keys": len(keys), "partitions": args.partitions, "batch_max": args.batch,
            "consumers": args.consumers, "members": args.members,
            "pipeline_events_per_s": round(rate), "raw_consume_events_per_s": round(consume_rate),
            "raw_copy_events_per_s": round(copy_rate), "ratio_to_copy": round(rate / copy_rate, 3),
            "ratio_to_consume": round(rate / consume_rate, 3),
            "latency": {k: round(v, 1) if isinstance(v, float) else v for k, v in latency.items()},
            "cpu_us_per_event": cpu.per_event_us(),
            "wal_per_event": {k: round(v, 3) for k, v in wal.per_event.items()},
            "peak_rss_mb": round(peak_mb), "metering_peak_rss_mb": [round(mb) for mb in metering_peaks],
            "cpus": os.cpu_count(),
        }
        print()
        print(f"sustained ingest        {rate:>10,.0f} events/s   (target ≥ 50,000)")
        print(f"raw COPY baseline       {copy_rate:>10,.0f} events/s   ratio {rate / copy_rate:.2f}")
        print(f"raw consume baseline    {consume_rate:>10,.0f} events/s   ratio {rate / consume_rate:.2f}")
        print(f"pipeline {cpu.summary()}")
        print(f"produce→commit @{args.rate:,}/s p50 {latency['p50_ms']:.1f} ms  p99 {latency['p99_ms']:.1f} ms"
              f"  (target p99 ≤ 250 ms, {latency['events']:,} events)")
        print(f"peak RSS                {peak_mb:>10,.0f} MB   (this process: the generator"
              f"{', the consumers' if args.consumers == 1 else ''} and the latency phase's members)")
        if metering_peaks:
            print(f"peak RSS per metering process  {', '.join(f'{mb:,.0f} MB' for mb in metering_peaks)}")
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(exist_ok=True)
        (out / "ingest.json").write_text(json.dumps(result, indent=2))
    finally:
        if broker:
            broker.stop()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
