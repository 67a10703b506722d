"""structlog, configured once: JSON lines in production, readable lines in a terminal.

Libraries that log through the standard library (uvicorn, aiokafka, asyncpg) come out in
the same format, with the same context (``request_id``, ``batch_id``, …) where they log
from inside a unit of work.
"""

from __future__ import annotations

import logging
import sys

import structlog

_SECRET_KEYS = frozenset({"api_key", "authorization", "token", "secret", "password"})
_HANDLER_NAME = "tollhouse"


def _redact(_, __, event_dict: dict) -> dict:
    for name in list(event_dict):
        if name.lower() in _SECRET_KEYS:
            event_dict[name] = "[redacted]"
    return event_dict


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    ))
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    # Libraries say much at INFO (every rebalance step, every connection): warnings and up.
    root.setLevel(max(logging.WARNING, getattr(logging, level.upper())))
    logging.captureWarnings(True)  # Python warnings, too, as log lines rather than bare text
