"""structlog, configured once: JSON lines in production, readable lines in a terminal."""

from __future__ import annotations

import logging
import sys

import structlog

_SECRET_KEYS = frozenset({"api_key", "authorization", "token", "secret", "password"})


def _redact(_, __, event_dict: dict) -> dict:
    for name in list(event_dict):
        if name.lower() in _SECRET_KEYS:
            event_dict[name] = "[redacted]"
    return event_dict


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
