"""A benchmark run's scratch directory, for its embedded PostgreSQL, spool and logs.

Removed when the run ends (a 1,000,000-event ingest run leaves about 2.6 GB), unless
BENCH_KEEP is set, to look at the logs afterwards.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if not os.environ.get("BENCH_KEEP"):
        # Registered before the servers under it start: exit hooks run last-in first-out,
        # so the embedded PostgreSQL has stopped by the time this runs.
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
