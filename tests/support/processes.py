"""Tollhouse programs run as the operator runs them: ``tollhouse …`` in a child process with
``TOLLHOUSE_*`` settings in its environment, stopped with SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def tollhouse_env(settings: dict[str, object]) -> dict[str, str]:
    """This environment without any ``TOLLHOUSE_*`` of its own, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLHOUSE_")}
    env.update({f"TOLLHOUSE_{name.upper()}": str(value) for name, value in settings.items()})
    return env


class TollhouseProcess:
    def __init__(self, args: list[str], settings: dict[str, object], workdir: Path, name: str) -> None:
        self.args = args
        self.log_path = workdir / f"{name}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            env=tollhouse_env(settings),
            cwd=workdir,  # no stray .env file is read
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("wb"),
        )

    def log_lines(self) -> list[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]

    def json_log(self) -> list[dict]:
        """Every line of its log, parsed: fails naming the first line that is not JSON."""
        records = []
        for number, line in enumerate(self.log_lines(), 1):
            try:
                records.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"{self.log_path.name} line {number} is not a JSON line: {line[:300]}") from None
        return records

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                raise AssertionError(f"tollhouse {' '.join(self.args)} did not stop on SIGTERM") from None
        return self.process.returncode


@contextlib.contextmanager
def tollhouse_process(args: list[str], settings: dict[str, object], workdir: Path,
                      name: str = "tollhouse") -> Iterator[TollhouseProcess]:
    proc = TollhouseProcess(args, settings, workdir, name)
    try:
        yield proc
    finally:
        proc.stop()


def wait_for_http(url: str, proc: TollhouseProcess, timeout: float = 60.0) -> None:
    """Wait until ``url`` answers at all (any status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            tail = "\n".join(proc.log_lines()[-20:])
            raise AssertionError(f"tollhouse {' '.join(proc.args)} exited with {proc.process.returncode}:\n{tail}")
        try:
            httpx.get(url, timeout=2.0)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")
