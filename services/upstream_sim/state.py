"""What the simulator remembers between requests: how it mints ids, and what it served."""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from typing import Any

from services.upstream_sim.replies import Usage


class IdMint:
    """Unique ids in OpenAI's styles (``chatcmpl-…``, ``file-…``, ``batch_…``), cheap to make."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()  # another run of the simulator never repeats an id
        self._counter = itertools.count(1)

    def __call__(self, kind: str) -> str:
        return f"{kind}{self._prefix}{next(self._counter):010x}"


class UsageLog:
    """The last ``limit`` requests served, with their usage: the upstream's side of a reconciliation."""

    def __init__(self, limit: int) -> None:
        self._records: deque[dict[str, Any]] = deque(maxlen=limit)
        self.recorded = 0

    def record(self, request_id: str, endpoint: str, model: str, usage: Usage, *, inputs: int, kind: str = "request",
               status: str = "ok") -> None:
        self.recorded += 1
        self._records.append({
            "request_id": request_id, "endpoint": endpoint, "model": model, "kind": kind, "inputs": inputs,
            "status": status, "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "cached_tokens": usage.cached_tokens,
            "reasoning_tokens": usage.reasoning_tokens, "created": int(time.time()),
        })

    def page(self, after: int, limit: int) -> dict[str, Any]:
        """Records numbered ``after + 1`` on (numbering starts at 1 and never resets)."""
        first_kept = self.recorded - len(self._records) + 1
        start = max(after + 1, first_kept)
        rows = list(itertools.islice(self._records, start - first_kept, start - first_kept + limit))
        return {"object": "list", "data": rows, "first": start, "next_after": start + len(rows) - 1,
                "recorded": self.recorded, "dropped_before": first_kept - 1}
