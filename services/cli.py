"""``tollhouse …``: the command line of every Tollhouse program."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from services.logging import configure_logging
from services.settings import SettingsError, get_settings

if TYPE_CHECKING:
    from services.metering.store.billing import LedgerQuery


def _migrate(args: argparse.Namespace) -> int:
    from services.metering.store.migrate import upgrade_to_head
    from services.runtime import database_url

    url = database_url(get_settings())
    upgrade_to_head(url)
    print("database migrated to head")
    return 0


def _metering(args: argparse.Namespace) -> int:
    from services.metering.service import run_metering
    from services.metering.store.migrate import upgrade_to_head
    from services.runtime import database_url

    settings = get_settings()
    url = database_url(settings)
    if args.migrate:
        upgrade_to_head(url)
    if args.no_api and args.no_consumer:
        print("--no-api and --no-consumer together leave nothing to run", file=sys.stderr)
        return 2
    _run(run_metering(settings, url, host=args.host, port=args.port, serve_api=not args.no_api,
                      consume=not args.no_consumer))
    return 0


def _gateway(args: argparse.Namespace) -> int:
    from services.gateway.app import run_gateway

    _run(run_gateway(get_settings(), host=args.host, port=args.port))
    return 0


def _rebuild_projections(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from services.metering.store.projections import PROJECTION_TABLES, rebuild_projections
    from services.runtime import database_url

    url = database_url(get_settings())
    with Progress() as progress:
        task = progress.add_task("rebuilding projections", total=len(PROJECTION_TABLES))
        counts = rebuild_projections(url, progress=lambda table: progress.advance(task))
    for table, rows in counts.items():
        print(f"{table}: {rows} rows")
    return 0


def _dev(args: argparse.Namespace) -> int:
    from services.dev import Ports, run_dev

    ports = Ports(gateway=args.gateway_port, metering=args.metering_port, upstream=args.upstream_port,
                  broker=args.broker_port)
    return run_dev(get_settings(), ports)


def _upstream_sim(args: argparse.Namespace) -> int:
    from services.upstream_sim.config import SimConfig
    from services.upstream_sim.server import serve

    try:
        config = SimConfig(host=args.host, port=args.port, latency_ms=args.latency_ms, error_rate=args.error_rate,
                           seed=args.seed, chunk_delay_ms=args.chunk_delay_ms, reply_tokens=args.reply_tokens)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    serve(config)
    return 0


def _export(args: argparse.Namespace) -> int:
    """``tollhouse export``: the ledger export of ``GET /v1/exports/ledger``, written to a file."""
    from services.metering.api.schemas import OBJECT_ID, parse_rfc3339
    from services.metering.store.billing import LedgerQuery
    from services.runtime import database_url

    times = {}
    for option, value in (("--from", args.time_from), ("--to", args.time_to)):
        try:
            times[option] = parse_rfc3339(value)
        except ValueError as exc:
            print(f"tollhouse export: {option}: {exc}", file=sys.stderr)
            return 2
    if times["--from"] > times["--to"]:
        print(f"tollhouse export: --from {args.time_from} is after --to {args.time_to}", file=sys.stderr)
        return 2
    if args.account_id is not None and not OBJECT_ID.match(args.account_id):
        print(f"tollhouse export: --account-id: {args.account_id[:80]!r} is not an account id", file=sys.stderr)
        return 2
    query = LedgerQuery(args.account_id, times["--from"], times["--to"])
    url = database_url(get_settings())
    return asyncio.run(_export_to_file(url, query, args.format, args.output))


async def _export_to_file(url: str, query: LedgerQuery, fmt: str, output: str) -> int:
    """Stream the export into ``output`` (via a ``.partial`` file renamed at the end)."""
    import os
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from services.contracts.errors import TollhouseError
    from services.metering.ledger_export import export_ledger
    from services.metering.store.billing import BillingStore
    from services.metering.store.db import make_engine

    target = Path(output)
    partial = target.with_name(target.name + ".partial")
    engine = make_engine(url, pool_size=1)
    written = 0
    try:
        try:
            await BillingStore(engine).check_scope(account_id=query.account_id, key_id=None)
        except TollhouseError as exc:
            print(f"tollhouse export: {exc.msg}", file=sys.stderr)
            return 1
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=False) as progress, partial.open("wb") as sink:
            task = progress.add_task(f"exporting ledger ({fmt})", total=None)

            def started(total: int) -> None:
                progress.update(task, total=total)

            def advanced(rows: int) -> None:
                nonlocal written
                written += rows
                progress.advance(task, rows)

            async for chunk in export_ledger(engine, query, fmt, on_start=started, on_rows=advanced):
                sink.write(chunk)
            sink.flush()
            os.fsync(sink.fileno())
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        await engine.dispose()
    print(f"exported {written} ledger entries to {target}")
    return 0


def _run(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollhouse", description="Usage metering for LLM APIs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("dev", help="run everything on embedded defaults, with a demo account")
    p.add_argument("--gateway-port", type=int, default=8080)
    p.add_argument("--metering-port", type=int, default=8081)
    p.add_argument("--upstream-port", type=int, default=8090)
    p.add_argument("--broker-port", type=int, default=9092)
    p.set_defaults(func=_dev)

    p = commands.add_parser("migrate", help="upgrade the database schema to the latest version")
    p.set_defaults(func=_migrate)

    p = commands.add_parser("metering", help="run the metering consumer and API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--no-api", action="store_true", help="run the consumer without the HTTP API")
    p.add_argument("--no-consumer", action="store_true", help="serve the HTTP API without consuming events")
    p.add_argument("--migrate", action="store_true", help="migrate the database before starting")
    p.set_defaults(func=_metering)

    p = commands.add_parser("upstream-sim", help="run the simulated OpenAI-compatible upstream model server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--latency-ms", type=int, default=0, help="wait this long before every reply")
    p.add_argument("--chunk-delay-ms", type=int, default=0, help="wait this long between stream chunks")
    p.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered with HTTP 500 (0..1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random error draws")
    p.add_argument("--reply-tokens", type=int, default=None, help="every reply exactly this many tokens")
    p.set_defaults(func=_upstream_sim)

    p = commands.add_parser("gateway", help="run the OpenAI-compatible gateway")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=_gateway)

    p = commands.add_parser("rebuild-projections", help="recompute balances, spend and rollups from the ledger")
    p.set_defaults(func=_rebuild_projections)

    p = commands.add_parser(
        "export",
        help="export ledger entries to a CSV, JSONL or Parquet file (columns: docs/exports.md)",
        description="Ledger entries with event_time in [--from, --to), in entry_id order, as of one snapshot; "
        "the same rows and columns as GET /v1/exports/ledger.",
    )
    p.add_argument("--from", dest="time_from", required=True, metavar="INSTANT",
                   help="first event time, inclusive (RFC 3339, e.g. 2026-11-01T00:00:00+08:00)")
    p.add_argument("--to", dest="time_to", required=True, metavar="INSTANT",
                   help="event time the export ends before, exclusive (RFC 3339)")
    p.add_argument("--account-id", help="only this account (default: every account)")
    p.add_argument("--format", choices=("csv", "jsonl", "parquet"), default="csv", help="file format (default: csv)")
    p.add_argument("--output", required=True, metavar="FILE", help="the file to write (replaced when done)")
    p.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
