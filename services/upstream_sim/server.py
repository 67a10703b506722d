"""Serve the simulator with uvicorn: uvloop and httptools when installed, no access log."""

from __future__ import annotations

import importlib.util
from typing import Any

import uvicorn

from services.upstream_sim.app import create_app
from services.upstream_sim.config import SimConfig


def uvicorn_options() -> dict[str, Any]:
    """The fastest event loop and HTTP parser available; an access log line per request would
    cost more than the simulator's own work."""
    return {
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "access_log": False,
        "log_level": "warning",
    }


def serve(config: SimConfig) -> None:
    print(f"upstream-sim: OpenAI-compatible API on http://{config.host}:{config.port}/v1", flush=True)
    uvicorn.run(create_app(config), host=config.host, port=config.port, **uvicorn_options())
