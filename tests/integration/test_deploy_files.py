"""The deployment files, checked against the code they run: Dockerfile, docker-compose.yml,
the Kubernetes manifests under deploy/k8s and the Grafana dashboard.

No Docker engine or Kubernetes API server runs where CI does, so nothing here starts a
container: the files are parsed and compared with what the code defines (settings,
``tollhouse`` subcommands and their ports, Prometheus metric names and labels).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import ValidationError

import services
from services.cli import build_parser
from services.metering.store import migrate
from services.settings import Settings

ROOT = Path(services.__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "tollhouse-dashboard.json"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

IMAGE = "tollhouse"
SECRET_NAME = "tollhouse-secrets"
SECRET_EXAMPLE = "secret.example.yaml"
PLACEHOLDER = "REPLACE_ME"
# Variables whose values are secrets: they may only come from a Secret or an env file.
SECRET_VARIABLE = re.compile(r"(TOKEN|API_KEY|PASSWORD|DATABASE_URL)$")
SETTING_NAME = re.compile(r"\bTOLLHOUSE_[A-Z0-9_]+")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
SERVERS = {"metering": 8081, "gateway": 8080, "upstream-sim": 8090}
STACK_SERVICES = {"kafka", "postgres", "migrate", "metering", "gateway", "upstream-sim"}


# Loading


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def deploy_yaml_files() -> list[Path]:
    return sorted(p for p in (ROOT / "deploy").rglob("*") if p.suffix in (".yaml", ".yml"))


def k8s_objects(*, with_example_secret: bool = False) -> list[dict[str, Any]]:
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml" or (path.name == SECRET_EXAMPLE and not with_example_secret):
            continue
        objects += load_yaml_documents(path)
    return objects


def k8s_by_kind(kind: str) -> list[dict[str, Any]]:
    return [obj for obj in k8s_objects() if obj["kind"] == kind]


def k8s_one(kind: str, name: str) -> dict[str, Any]:
    found = [obj for obj in k8s_by_kind(kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r} under deploy/k8s, found {len(found)}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def containers_of(kinds: tuple[str, ...] = (*WORKLOAD_KINDS, "Job")) -> Iterator[tuple[dict, dict]]:
    for obj in k8s_objects():
        if obj["kind"] in kinds:
            spec = pod_spec(obj)
            for container in spec.get("initContainers", []) + spec["containers"]:
                yield obj, container


def compose() -> dict[str, Any]:
    return load_yaml_documents(COMPOSE)[0]


def compose_services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def uses_tollhouse_image(service_or_container: dict[str, Any]) -> bool:
    return str(service_or_container.get("image", "")).split(":")[0].split("/")[-1] == IMAGE


def example_secret() -> dict[str, str]:
    (secret,) = load_yaml_documents(K8S / SECRET_EXAMPLE)
    return secret["stringData"]


def config_map_data(name: str) -> dict[str, str]:
    return k8s_one("ConfigMap", name)["data"]


def resolved_k8s_environment(obj: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the pod would see it: ConfigMaps, literal values,
    the example Secret's values, and the pod name for metadata.name."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{obj['metadata']['name']}: envFrom only from ConfigMaps"
        env.update(config_map_data(source["configMapRef"]["name"]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]
        if "secretKeyRef" in ref:
            env[item["name"]] = example_secret()[ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            env[item["name"]] = config_map_data(ref["configMapKeyRef"]["name"])[ref["configMapKeyRef"]["key"]]
        elif ref.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[item["name"]] = f"{obj['metadata']['name']}-0"
        else:
            pytest.fail(f"{obj['metadata']['name']}: unexpected valueFrom {ref}")
    return env


def interpolated(value: str) -> str:
    """A Compose value with every ${…} replaced by a stand-in, as Compose would fill it."""
    return INTERPOLATION.sub("placeholder", value)


def parse_tollhouse_args(argv: list[str], where: str):
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `tollhouse {shlex.join(argv)}` is not a valid tollhouse command line")


def settings_from_environment(env: dict[str, str], where: str) -> Settings:
    values = {name.removeprefix("TOLLHOUSE_").lower(): value
              for name, value in env.items() if name.startswith("TOLLHOUSE_")}
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        pytest.fail(f"{where}: settings the program would refuse at start:\n{exc}")


# Every file parses


@pytest.mark.parametrize("path", [COMPOSE, *deploy_yaml_files()], ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_file_parses(path: Path) -> None:
    assert load_yaml_documents(path), f"{path.relative_to(ROOT)} holds no YAML document"


def test_dashboard_json_parses() -> None:
    json.loads(DASHBOARD.read_text())


# Settings and commands


def deployment_texts() -> dict[str, str]:
    paths = [COMPOSE, DOCKERFILE, ENV_EXAMPLE, DEPLOY_DOC, *deploy_yaml_files()]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths}


def test_every_tollhouse_variable_is_a_setting() -> None:
    known = {f"TOLLHOUSE_{name.upper()}" for name in Settings.model_fields}
    unknown = {
        f"{where}: {name}"
        for where, text in deployment_texts().items()
        for name in SETTING_NAME.findall(text)
        if name not in known
    }
    assert not unknown, "not fields of services.settings.Settings:\n" + "\n".join(sorted(unknown))


def test_compose_settings_are_valid_values() -> None:
    for name, service in compose_services().items():
        if uses_tollhouse_image(service):
            env = {k: interpolated(v) for k, v in compose_environment(service).items()}
            settings_from_environment(env, f"docker-compose.yml service {name}")


def test_k8s_settings_are_valid_values() -> None:
    for obj, container in containers_of():
        settings_from_environment(resolved_k8s_environment(obj, container), f"{obj['kind']} {obj['metadata']['name']}")


def test_dockerfile_settings_are_valid_values() -> None:
    env = dict(re.findall(r"\b(TOLLHOUSE_[A-Z0-9_]+)=(\S+)", DOCKERFILE.read_text()))
    assert env, "the Dockerfile sets TOLLHOUSE_DATA_DIR for the spool volume"
    settings = settings_from_environment(env, "Dockerfile ENV")
    assert str(settings.data_dir).startswith("/"), "TOLLHOUSE_DATA_DIR in the image must be absolute"


def test_compose_commands_are_tollhouse_subcommands() -> None:
    for name, service in compose_services().items():
        if not uses_tollhouse_image(service):
            continue
        args = parse_tollhouse_args(service["command"], f"docker-compose.yml service {name}")
        assert args.command == name, f"service {name} runs `tollhouse {args.command}`"
        if name in SERVERS:
            assert args.host == "0.0.0.0", f"service {name} must listen on 0.0.0.0 to be reachable"
            assert args.port == SERVERS[name]
            healthcheck = " ".join(service["healthcheck"]["test"])
            assert f"http://127.0.0.1:{args.port}/healthz" in healthcheck, f"service {name}: healthcheck on /healthz"


def test_k8s_commands_are_tollhouse_subcommands() -> None:
    for obj, container in containers_of():
        where = f"{obj['kind']} {obj['metadata']['name']}"
        assert uses_tollhouse_image(container), f"{where}: runs the tollhouse image"
        assert "command" not in container, f"{where}: keep the image's ENTRYPOINT (tollhouse); use args"
        args = parse_tollhouse_args(container["args"], where)
        assert obj["metadata"]["name"].startswith(args.command), f"{where} runs `tollhouse {args.command}`"
        if args.command in SERVERS:
            assert args.host == "0.0.0.0", f"{where}: must listen on 0.0.0.0 to be reachable"
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports == {"http": args.port}, f"{where}: containerPort 'http' is the --port it listens on"


def test_k8s_services_target_the_workloads_ports() -> None:
    for service in k8s_by_kind("Service"):
        app = service["spec"]["selector"]["app.kubernetes.io/name"]
        workloads = [o for o in k8s_objects() if o["kind"] in WORKLOAD_KINDS
                     and o["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == app]
        assert len(workloads) == 1, f"Service {service['metadata']['name']} selects no single workload"
        (container,) = pod_spec(workloads[0])["containers"]
        listens_on = parse_tollhouse_args(container["args"], service["metadata"]["name"]).port
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
        assert [p["port"] for p in service["spec"]["ports"]] == [listens_on], (
            f"Service {service['metadata']['name']} should expose the port its pods listen on"
        )


def test_service_urls_point_at_the_servers() -> None:
    config = config_map_data("tollhouse-config")
    k8s_ports = {s["metadata"]["name"]: s["spec"]["ports"][0]["port"] for s in k8s_by_kind("Service")}
    compose_gateway = compose_environment(compose_services()["gateway"])
    targets = (("TOLLHOUSE_METERING_URL", "metering"), ("TOLLHOUSE_UPSTREAM_BASE_URL", "upstream-sim"))
    for env, ports in ((config, k8s_ports), (compose_gateway, SERVERS)):
        for setting, target in targets:
            url = urlsplit(env[setting])
            assert (url.hostname, url.port) == (target, ports[target]), f"{setting}={env[setting]}"
    assert urlsplit(config["TOLLHOUSE_UPSTREAM_BASE_URL"]).path == "/v1"
    kafka = compose_environment(compose_services()["kafka"])
    for name in ("metering", "gateway"):
        bootstrap = compose_environment(compose_services()[name])["TOLLHOUSE_KAFKA_BOOTSTRAP_SERVERS"]
        assert f"PLAINTEXT://{bootstrap}" in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","), (
            f"compose {name} bootstraps from {bootstrap}, which the broker does not advertise"
        )


# Kubernetes


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    (kustomization,) = load_yaml_documents(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present - {SECRET_EXAMPLE}, "kustomization.yaml resources differ from the files in deploy/k8s"


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_workloads_probe_readyz_and_healthz(kind: str) -> None:
    workloads = k8s_by_kind(kind)
    assert workloads
    for obj in workloads:
        for container in pod_spec(obj)["containers"]:
            where = f"{kind} {obj['metadata']['name']}"
            path = container["readinessProbe"]["httpGet"]["path"]
            assert path in ("/readyz", "/readyz?scope=api"), f"{where}: readiness on /readyz"
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", f"{where}: liveness on /healthz"
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                if probe in container:
                    assert container[probe]["httpGet"]["port"] == "http", f"{where}: {probe} on the http port"


def test_containers_request_and_limit_resources() -> None:
    for obj, container in containers_of():
        resources = container["resources"]
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[part]), f"{obj['metadata']['name']}: {part} cpu and memory"


def test_containers_run_as_non_root() -> None:
    for obj in k8s_objects():
        if obj["kind"] in (*WORKLOAD_KINDS, "Job"):
            security = pod_spec(obj)["securityContext"]
            assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, obj["metadata"]["name"]


def test_k8s_secrets_only_through_secret_key_refs() -> None:
    example = example_secret()
    for obj, container in containers_of():
        for item in container.get("env", []):
            if SECRET_VARIABLE.search(item["name"]):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                assert ref, f"{obj['metadata']['name']}: {item['name']} must come from a secretKeyRef"
                assert ref["name"] == SECRET_NAME and ref["key"] in example, (
                    f"{obj['metadata']['name']}: {item['name']} reads {ref}, which {SECRET_EXAMPLE} does not document"
                )
    for config_map in k8s_by_kind("ConfigMap"):
        leaked = [key for key in config_map["data"] if SECRET_VARIABLE.search(key)]
        assert not leaked, f"ConfigMap {config_map['metadata']['name']} holds secrets: {leaked}"
    assert all(PLACEHOLDER in value for value in example.values()), f"{SECRET_EXAMPLE} holds only placeholders"


def consumer_groups(env_list: list[dict[str, str]]) -> set[str]:
    return {env.get("TOLLHOUSE_CONSUMER_GROUP", Settings.model_fields["consumer_group"].default) for env in env_list}


def test_k8s_metering_scales_out_in_one_consumer_group() -> None:
    metering = k8s_one("Deployment", "metering")
    assert metering["spec"]["replicas"] >= 2
    envs = [resolved_k8s_environment(obj, c) for obj, c in containers_of(("Deployment",))
            if c["args"][0] == "metering"]
    assert envs and all("TOLLHOUSE_CONSUMER_GROUP" in env for env in envs), "set TOLLHOUSE_CONSUMER_GROUP explicitly"
    assert len(consumer_groups(envs)) == 1, "every metering pod must join the same consumer group"
    partitions = int(envs[0]["TOLLHOUSE_TOPIC_PARTITIONS"])
    hpa = k8s_one("HorizontalPodAutoscaler", "metering")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "metering"
    assert 2 <= hpa["spec"]["minReplicas"] and metering["spec"]["replicas"] <= partitions
    assert hpa["spec"]["maxReplicas"] <= partitions, "replicas beyond the partition count consume nothing"


def test_k8s_gateway_spool_survives_pod_replacement() -> None:
    gateway = k8s_one("StatefulSet", "gateway")
    (container,) = pod_spec(gateway)["containers"]
    env = resolved_k8s_environment(gateway, container)
    claims = {t["metadata"]["name"] for t in gateway["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts.get(env["TOLLHOUSE_DATA_DIR"]) in claims, "the spool directory is on the pod's own volume"
    gateway_id = next(e for e in container["env"] if e["name"] == "TOLLHOUSE_GATEWAY_ID")
    assert gateway_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", (
        "GATEWAY_ID names the spool file: it must be the pod's stable name"
    )


# Compose


def test_compose_has_the_whole_stack() -> None:
    services = compose_services()
    assert STACK_SERVICES <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert re.fullmatch(r"postgres:1[78](\.\d+)?", services["postgres"]["image"])
    assert services["metering"]["deploy"]["replicas"] >= 2


def test_compose_kafka_runs_kraft_with_its_controller() -> None:
    kafka = compose_environment(compose_services()["kafka"])
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    controller = kafka["KAFKA_CONTROLLER_LISTENER_NAMES"]
    listeners = dict(item.split("://") for item in kafka["KAFKA_LISTENERS"].split(","))
    node, voter = kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert node == kafka["KAFKA_NODE_ID"] and voter == f"kafka{listeners[controller]}"
    assert kafka["CLUSTER_ID"]


def test_compose_metering_replicas_share_one_consumer_group() -> None:
    metering = compose_services()["metering"]
    env = compose_environment(metering)
    assert "TOLLHOUSE_CONSUMER_GROUP" in env, "set TOLLHOUSE_CONSUMER_GROUP explicitly"
    assert int(env["TOLLHOUSE_TOPIC_PARTITIONS"]) >= metering["deploy"]["replicas"]


def test_compose_start_order_waits_for_health() -> None:
    services = compose_services()
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["metering"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name, service in services.items():
        for dependency, how in (service.get("depends_on") or {}).items():
            assert isinstance(how, dict) and "condition" in how, f"{name} depends on {dependency} without a condition"
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has no healthcheck"


def test_compose_secrets_come_from_the_env_file() -> None:
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line and not line.startswith("#"))
    for name, service in compose_services().items():
        for variable, value in compose_environment(service).items():
            if SECRET_VARIABLE.search(variable):
                assert INTERPOLATION.search(value), f"compose {name}: {variable} must come from .env, not a literal"
            for referenced, modifier in INTERPOLATION.findall(value):
                if not modifier.startswith(":-"):
                    assert referenced in example, f"compose {name}: ${{{referenced}}} is not in .env.example"
    assert all(value.startswith("replace-with-") for value in example.values()), ".env.example holds only placeholders"
    # Tollhouse reads TOLLHOUSE_* from a .env in its working directory too: the stack's
    # .env must not hand its tokens to a local run or to the tests.
    assert not [n for n in example if n.startswith("TOLLHOUSE_")]


# Image


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()  # type: ignore[misc]
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_entrypoint_is_tollhouse() -> None:
    instructions = dockerfile_instructions()
    entrypoints = [json.loads(arg) for op, arg in instructions if op == "ENTRYPOINT"]
    assert entrypoints == [["tollhouse"]]
    assert [arg for op, arg in instructions if op == "FROM"] == ["python:3.11-slim"]
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as a non-root user"


def test_dockerfile_keeps_the_migrations_beside_the_code() -> None:
    # `tollhouse migrate` reads alembic.ini and alembic/ from the directory above the
    # `services` package (migrate.ROOT); the image must keep that layout.
    assert (migrate.ROOT / "alembic.ini").is_file() and migrate.ROOT == ROOT
    instructions = dockerfile_instructions()
    workdir = [arg for op, arg in instructions if op == "WORKDIR"][-1]
    copied = {}
    for op, arg in instructions:
        if op == "COPY" and not arg.startswith("--from"):
            *sources, target = arg.split()
            for source in sources:
                copied[source.rstrip("/")] = target
    for needed in ("requirements.lock", "pyproject.toml", "README.md", "alembic.ini", "alembic", "services"):
        assert needed in copied, f"the Dockerfile does not copy {needed}"
    for beside in ("alembic.ini", "alembic", "services"):
        target = copied[beside].rstrip("/")
        assert target in (".", beside, workdir, f"{workdir}/{beside}"), f"{beside} must land in {workdir}"
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "-r requirements.lock" in runs, "dependencies come from the lock"
    assert "pip install --no-deps -e ." in runs, (
        "install editable: a plain `pip install .` imports services from site-packages, "
        "where migrate.ROOT has no alembic.ini"
    )


def test_dockerignore_keeps_out_secrets_and_state_but_not_the_build_inputs() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "negations are not handled by this check"

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p.removeprefix("**/")) or fnmatch.fnmatch(path.split("/")[0], p)
                   for p in patterns)

    for secret_or_state in (".env", ".env.local", ".venv", ".git", ".tollhouse"):
        assert ignored(secret_or_state), f".dockerignore must keep {secret_or_state} out of the image"
    for build_input in ("requirements.lock", "pyproject.toml", "README.md", "alembic.ini", "alembic", "services"):
        assert not ignored(build_input), f".dockerignore drops {build_input}, which the Dockerfile copies"


# Grafana


def declared_metrics() -> dict[str, dict[str, Any]]:
    """Every Prometheus metric created under services/: name → kind, labels, exposed series."""
    pattern = re.compile(
        r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"\s*,\s*\"(?:[^\"\\]|\\.)*\""
        r"\s*(?:,\s*\[([^\]]*)\])?", re.DOTALL)
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((ROOT / "services").rglob("*.py")):
        for kind, name, labels in pattern.findall(path.read_text()):
            base = name.removesuffix("_total") if kind == "Counter" else name
            series = {
                "Counter": {f"{base}_total"},
                "Gauge": {base},
                "Histogram": {f"{base}_bucket", f"{base}_sum", f"{base}_count"},
                "Summary": {base, f"{base}_sum", f"{base}_count"},
            }[kind]
            found[name] = {"kind": kind, "labels": set(re.findall(r"\"(\w+)\"", labels or "")),
                           "series": series, "module": path.relative_to(ROOT)}
    return found


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard_panels(dashboard["panels"]) for t in p.get("targets", [])]


def test_dashboard_uses_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    every_panel = list(dashboard_panels(dashboard["panels"]))
    assert len({p["id"] for p in every_panel}) == len(every_panel), "panel ids must be unique"
    for panel in (p for p in every_panel if p["type"] != "row"):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"


def test_dashboard_queries_only_metrics_and_labels_the_code_exports() -> None:
    metrics = declared_metrics()
    series = {s: m for m in metrics.values() for s in m["series"]}
    assert len(metrics) >= 10, "metric declarations were not found under services/ (did the regex break?)"
    for expr in dashboard_exprs():
        used = [series[name] for name in re.findall(r"\btollhouse_\w+", expr) if name in series]
        unknown = [name for name in re.findall(r"\btollhouse_\w+", expr) if name not in series]
        assert not unknown, f"{expr}: no such series in the code: {unknown}"
        assert used, f"{expr}: queries no Tollhouse metric"
        labels = set().union(*(m["labels"] for m in used))
        if re.search(r"\btollhouse_\w+_bucket\b", expr):
            labels.add("le")
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (part.strip() for part in group.split(","))):
                assert label in labels, f"{expr}: the metric has no label {label!r}"
        if "histogram_quantile" in expr:
            assert all(m["kind"] == "Histogram" for m in used), f"{expr}: quantile of a non-histogram"


def test_dashboard_shows_every_metering_and_gateway_metric() -> None:
    shown = {name for expr in dashboard_exprs() for name in re.findall(r"\btollhouse_\w+", expr)}
    missing = [name for name, m in declared_metrics().items()
               if str(m["module"]) in ("services/metering/metrics.py", "services/gateway/metrics.py")
               and not m["series"] & shown]
    assert not missing, f"add panels to {DASHBOARD.relative_to(ROOT)} for: {missing}"
