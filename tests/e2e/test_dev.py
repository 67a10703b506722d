"""`tollhouse dev` end to end, as a newcomer runs it: start it, call the gateway with the
printed key through the official SDK, see the usage in /v1/usage, Ctrl-C, run it again on
the same data, and get a clear message when a port is taken."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from services.local_services import free_port

BANNER_END = "Ctrl-C stops everything."


class Dev:
    def __init__(self, workdir: Path, ports: dict[str, int]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLHOUSE_")}
        env["TOLLHOUSE_DATA_DIR"] = str(workdir / ".tollhouse")
        args = [sys.executable, "-m", "services.cli", "dev"]
        for name, port in ports.items():
            args += [f"--{name}-port", str(port)]
        self.proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def banner(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.output.append(line)
            if BANNER_END in line:
                return "".join(self.output)
        raise AssertionError("no banner:\n" + "".join(self.output)[-4000:])

    def value(self, label: str) -> str:
        match = re.search(rf"^\s*{label}\s+(\S+)", "".join(self.output), re.MULTILINE)
        assert match, label
        return match.group(1)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(90)


@pytest.fixture
def ports() -> dict[str, int]:
    return {"gateway": free_port(), "metering": free_port(), "upstream": free_port(), "broker": free_port()}


@pytest.mark.slow
def test_dev_runs_everything_and_the_printed_snippet_works(tmp_path: Path, ports: dict[str, int]) -> None:
    dev = Dev(tmp_path, ports)
    try:
        banner = dev.banner()
        payg_key = dev.value("PAYG key")
        account_id = dev.value("demo account")
        billing = dev.value("billing token")
        assert payg_key.startswith("sk-") and len(payg_key) >= 43
        assert f"http://127.0.0.1:{ports['gateway']}/v1" in banner

        client = OpenAI(api_key=payg_key, base_url=f"http://127.0.0.1:{ports['gateway']}/v1")
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}])
        assert reply.usage is not None and reply.usage.total_tokens > 0

        usage_url = f"http://127.0.0.1:{ports['metering']}/v1/usage"
        deadline = time.monotonic() + 30
        while True:
            r = httpx.get(usage_url, params={"account_id": account_id, "group_by": "day"},
                          headers={"Authorization": f"Bearer {billing}"})
            assert r.status_code == 200, r.text
            totals = r.json()["totals"]
            if totals["requests"] >= 1:
                break
            assert time.monotonic() < deadline, "the call never reached the ledger"
            time.sleep(0.3)
        assert totals["total_tokens"] == reply.usage.total_tokens
    finally:
        code = dev.stop()
    assert code == 0, "".join(dev.output)[-3000:]

    # A second run reuses the data: same demo account and keys, the usage is still there.
    again = Dev(tmp_path, ports)
    try:
        again.banner()
        assert again.value("demo account") == account_id
        assert again.value("PAYG key") == payg_key
        r = httpx.get(usage_url, params={"account_id": account_id, "group_by": "day"},
                      headers={"Authorization": f"Bearer {billing}"})
        assert r.json()["totals"]["requests"] >= 1
    finally:
        assert again.stop() == 0


def test_a_port_in_use_gives_a_clear_message(tmp_path: Path, ports: dict[str, int]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["gateway"]))
        taken.listen()
        dev = Dev(tmp_path, ports)
        code = dev.proc.wait(60)
        dev.pump.join(10)  # everything it printed is queued
        out = "".join(dev.lines.queue)
    assert code != 0
    assert f"port {ports['gateway']}" in out
    assert "--gateway-port" in out
