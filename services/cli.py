"""``tollhouse …``: the command line of every Tollhouse program."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.logging import configure_logging
from services.settings import SettingsError, get_settings


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


def _run(coro) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollhouse", description="Usage metering for LLM APIs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("migrate", help="upgrade the database schema to the latest version")
    p.set_defaults(func=_migrate)

    p = commands.add_parser("metering", help="run the metering consumer and API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--no-api", action="store_true", help="run the consumer without the HTTP API")
    p.add_argument("--no-consumer", action="store_true", help="serve the HTTP API without consuming events")
    p.add_argument("--migrate", action="store_true", help="migrate the database before starting")
    p.set_defaults(func=_metering)

    p = commands.add_parser("rebuild-projections", help="recompute balances, spend and rollups from the ledger")
    p.set_defaults(func=_rebuild_projections)
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
