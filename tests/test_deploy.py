"""Deployment files: the Grafana dashboard and provisioning, the Prometheus config and alert rules
(checked and unit-tested with Debian's promtool), the compose stack's wiring, its gateway config,
its scale-out profile (the nginx config checked with `nginx -t` and run in front of three real
gateways), and the Dockerfile's install steps run without docker.

`promql_expressions()` is the list of every PromQL expression of the dashboard and the alert
rules, Grafana variables substituted, for tests that evaluate them against a real Prometheus.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import parse_config
from gateway.testing import wait_until_ready
from tests.conftest import Simulator, require_tool
from tests.test_cli import serving

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "grafana" / "dashboards" / "llm-gateway.json"
GRAFANA_DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
GRAFANA_DASHBOARDS = ROOT / "grafana" / "provisioning" / "dashboards" / "llm-gateway.yaml"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yaml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yaml"
COMPOSE = ROOT / "deploy" / "docker-compose.yaml"
GATEWAY_CONFIG = ROOT / "deploy" / "gateway.yaml"
LOADGEN = ROOT / "deploy" / "loadgen.py"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SCALE_OUT_CONFIG = ROOT / "deploy" / "gateway-scale-out.yaml"
NGINX_SCALE_OUT = ROOT / "deploy" / "nginx-scale-out.conf"
SCALE_OUT = {"gateway-1", "gateway-2", "gateway-3", "redis", "balancer"}  # profile scale-out
SCALE_OUT_GATEWAYS = ["gateway-1", "gateway-2", "gateway-3"]
# The `shared` section as issue 16 defines it.
SHARED_KEYS = {
    "redis_url",
    "key_prefix",
    "timeout_s",
    "lease_ttl_s",
    "on_failure",
    "expected_replicas",
}

# What GET /metrics exports (README "Metrics", DESIGN.md §7), by type.
COUNTERS = {
    "llm_gateway_requests",
    "llm_gateway_upstream_attempts",
    "llm_gateway_timeouts",
    "llm_gateway_upstream_cancellations",
    "llm_gateway_tokens",
    "llm_gateway_attempts_skipped",
    "llm_gateway_hedges",
    "llm_gateway_upstream_ejections",
    "llm_gateway_panic_routed",
    "llm_gateway_shared_ops",
    "llm_gateway_balance_picks",
    "llm_gateway_key_requests",
    "llm_gateway_key_tokens",
    "llm_gateway_rate_limited",
    "llm_gateway_shed",
}
HISTOGRAMS = {
    "llm_gateway_request_duration_seconds",
    "llm_gateway_overhead_seconds",
    "llm_gateway_ttft_seconds",
    "llm_gateway_stream_max_gap_seconds",
    "llm_gateway_pool_wait_seconds",
    "llm_gateway_deadline_budget_seconds",
    "llm_gateway_shared_op_seconds",
    "llm_gateway_queue_wait_seconds",
}
GAUGES = {
    "llm_gateway_inflight_requests",
    "llm_gateway_stalled_requests",
    "llm_gateway_oldest_inflight_seconds",
    "llm_gateway_pool_connections",
    "llm_gateway_pool_queue_depth",
    "llm_gateway_upstream_ejected",
    "llm_gateway_shared_state_up",
    "llm_gateway_shared_slots",
}
EXPORTED = (
    {f"{name}_total" for name in COUNTERS}
    | {f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_count", "_sum")}
    | GAUGES
)
METRIC_NAME = re.compile(r"llm_gateway_[a-z_]+")

# Grafana's interval variables, and what stands in for them outside Grafana.
_INTERVAL_VARIABLES = {"__rate_interval", "__interval", "__range"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _variable_values() -> dict[str, str]:
    """Grafana variables with a fixed numeric value (textbox, constant, custom): that value.
    The others (data source, label_values queries) become `.*` where they are used."""
    values: dict[str, str] = {}
    for variable in dashboard().get("templating", {}).get("list", []):
        if variable.get("type") in ("textbox", "constant", "custom"):
            value = str(variable.get("current", {}).get("value", variable.get("query", "")))
            if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
                values[variable["name"]] = value
    return values


def substitute_variables(expr: str, values: dict[str, str] | None = None) -> str:
    """A dashboard expression as Prometheus can run it: `$__rate_interval` and friends become
    `1m`, numeric variables their value, every other variable (`$route`, `${upstream}`) `.*`."""
    known = _variable_values() if values is None else values

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name in _INTERVAL_VARIABLES:
            return "1m"
        return known.get(name, ".*")

    return _VARIABLE.sub(replace, expr)


def dashboard_expressions() -> list[str]:
    """The PromQL of every dashboard target, as written (Grafana variables and all)."""
    return [
        target["expr"]
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def promql_expressions() -> list[str]:
    """Every PromQL expression of the dashboard (Grafana variables substituted) and of the alert
    rules, without duplicates, in file order."""
    values = _variable_values()
    exprs = [substitute_variables(expr, values) for expr in dashboard_expressions()]
    exprs += [str(rule["expr"]).strip() for rule in alert_rules()]
    return list(dict.fromkeys(exprs))


def run_promtool(*args: str, cwd: Path = ROOT) -> str:
    """Debian's promtool (package prometheus), as the test's real checker."""
    promtool = require_tool("promtool", package="prometheus")
    result = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def without_shared(data: dict[str, Any]) -> dict[str, Any]:
    """A config without its `shared` section (issue 16), whose keys are checked here: for a
    gateway run with no Redis, and for a loader that does not know the section yet."""
    data = dict(data)
    shared = data.pop("shared")
    assert set(shared) == SHARED_KEYS
    return data


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def mounts(service: str) -> dict[str, Path]:
    """A compose service's bind mounts: container path -> host path."""
    result: dict[str, Path] = {}
    for volume in compose()["services"][service].get("volumes", []):
        source, target = str(volume).split(":")[:2]
        result[target] = (COMPOSE.parent / source).resolve()
    return result


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, args))
    return stages


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD / HEALTHCHECK CMD."""
    form: list[str] = json.loads(args)
    return form


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def llm_gateway_command() -> str:
    """The `llm-gateway` script of the interpreter running the tests (the repo's venv)."""
    beside = Path(sys.executable).parent / "llm-gateway"
    found = str(beside) if beside.exists() else shutil.which("llm-gateway")
    assert found, "llm-gateway is not installed (pip install -e .)"
    return found


# --- Prometheus: config, rules and their unit tests


def test_alert_rules_pass_their_unit_tests() -> None:
    output = run_promtool("test", "rules", ALERTS_TEST.name, cwd=PROMETHEUS_DIR)
    assert "SUCCESS" in output


def test_prometheus_config_is_valid_and_loads_the_rules() -> None:
    output = run_promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(ROOT)))
    assert "1 rule files found" in output
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == [ALERTS.name]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "llm-gateway"
    assert job["scrape_interval"] == "5s"
    assert job["static_configs"] == [{"targets": ["gateway:8080"]}]


def test_alert_rules_are_valid_and_complete() -> None:
    run_promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {
        "LLMGatewayStalledRequests",
        "LLMGatewayTimeoutRateHigh",
        "LLMGatewayPoolSaturated",
        "LLMGatewayPoolWaitHigh",
        "LLMGatewayLoadShed",
        "LLMGatewayUpstreamEjected",
        "LLMGatewayCircuitOpen",
    } <= names
    for rule in rules:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
    by_name = {rule["alert"]: rule for rule in rules}
    assert "by (phase)" in by_name["LLMGatewayTimeoutRateHigh"]["expr"].replace(
        "route, upstream, phase", "phase"
    )
    assert 'outcome="upstream_saturated"' in by_name["LLMGatewayLoadShed"]["expr"]
    assert 'outcome="circuit_open"' in by_name["LLMGatewayCircuitOpen"]["expr"]
    assert "llm_gateway_upstream_ejected" in by_name["LLMGatewayUpstreamEjected"]["expr"]
    assert by_name["LLMGatewayUpstreamEjected"]["for"] == "1m"


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = load_yaml(ALERTS_TEST)
    assert tests["rule_files"] == [ALERTS.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"


# --- Grafana: the dashboard and its provisioning


def test_dashboard_loads_and_every_panel_has_queries() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    assert board["uid"] == "llm-gateway"
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queried = [panel for panel in panels if panel["type"] != "row"]
    assert len(queried) >= 20
    for panel in queried:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']}: a target without expr"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("route", "upstream"):
        assert variables[name]["query"].startswith("label_values(llm_gateway_")


def test_queries_use_only_exported_metrics() -> None:
    exprs = dashboard_expressions() + [str(rule["expr"]) for rule in alert_rules()]
    exprs += [
        variable["definition"]
        for variable in dashboard()["templating"]["list"]
        if variable["type"] == "query"
    ]
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used, "no llm_gateway_ metric in any query"
    assert used - EXPORTED == set(), "not exported by the gateway"


def test_dashboard_shows_every_exported_metric() -> None:
    used = {name for expr in dashboard_expressions() for name in METRIC_NAME.findall(expr)}
    families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
    assert (COUNTERS | HISTOGRAMS | GAUGES) - families == set()


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each one (variables substituted) as a recording rule."""
    exprs = [substitute_variables(expr) for expr in dashboard_expressions()]
    assert not any("$" in expr for expr in exprs)
    rules = [{"record": f"dashboard:expr_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    output = run_promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in output


def test_substitute_variables() -> None:
    expr = 'sum(rate(m{route=~"$route", upstream=~"${upstream:regex}"}[$__rate_interval]))'
    assert substitute_variables(expr, {}) == 'sum(rate(m{route=~".*", upstream=~".*"}[1m]))'
    assert substitute_variables("vector($max_connections)", {"max_connections": "64"}) == (
        "vector(64)"
    )
    exprs = promql_expressions()
    assert len(exprs) == len(set(exprs)) > 20
    assert not any("$" in expr for expr in exprs)
    assert "vector(64)" in exprs
    assert 'up{job="llm-gateway"} == 0' in exprs


def test_grafana_provisioning_points_where_compose_mounts() -> None:
    grafana = mounts("grafana")
    assert grafana["/etc/grafana/provisioning"] == (ROOT / "grafana" / "provisioning")
    assert GRAFANA_DATASOURCES.parent.parent == grafana["/etc/grafana/provisioning"]

    (datasource,) = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert datasource["uid"] == "prometheus"
    assert datasource["type"] == "prometheus"
    url = urllib.parse.urlsplit(datasource["url"])
    assert url.hostname == "prometheus"
    assert url.hostname in compose()["services"]
    assert f"{url.port}:9090" in compose()["services"]["prometheus"]["ports"]
    variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == datasource["uid"]

    (provider,) = load_yaml(GRAFANA_DASHBOARDS)["providers"]
    assert provider["type"] == "file"
    dashboards_path = provider["options"]["path"]
    assert dashboards_path == "/var/lib/grafana/dashboards"
    assert grafana[dashboards_path] == DASHBOARD.parent
    environment = compose()["services"]["grafana"]["environment"]
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_path}/{DASHBOARD.name}"


def test_compose_wiring() -> None:
    services = compose()["services"]
    assert set(services) >= {"gateway", "simulator", "prometheus", "grafana"}

    # prometheus reads this directory, and scrapes the gateway service's port
    prometheus = mounts("prometheus")
    assert prometheus["/etc/prometheus"] == PROMETHEUS_DIR
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert str(services["prometheus"]["image"]).startswith("prom/prometheus")
    assert str(services["grafana"]["image"]).startswith("grafana/grafana")

    # the gateway: built from the Dockerfile, config mounted where the image's CMD reads it
    gateway = services["gateway"]
    assert (COMPOSE.parent / gateway["build"]["context"]).resolve() == ROOT
    assert gateway["build"]["dockerfile"] == DOCKERFILE.name
    assert "8080:8080" in gateway["ports"]
    cmd = exec_form(dict(dockerfile_stages()[-1])["CMD"])
    config_path = cmd[cmd.index("--config") + 1]
    assert config_path == "/etc/llm-gateway/gateway.yaml"
    # its directory is mounted, so an edit that replaces the file reaches --watch-config
    assert "--watch-config" in cmd
    assert mounts("gateway")[str(Path(config_path).parent)] / "gateway.yaml" == GATEWAY_CONFIG
    assert cmd[cmd.index("--port") + 1] == "8080"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"

    # the simulator: same image, listening where the gateway config's upstream points
    simulator = services["simulator"]
    assert simulator["image"] == gateway["image"]
    assert simulator["command"][:2] == ["llm-gateway", "simulate"]
    port = simulator["command"][simulator["command"].index("--port") + 1]
    upstreams = {u["name"]: u["base_url"] for u in load_yaml(GATEWAY_CONFIG)["upstreams"]}
    assert upstreams["simulator"] == f"http://simulator:{port}/v1"
    assert simulator["environment"]["LLM_GATEWAY_HEALTH_URL"].startswith(
        f"http://127.0.0.1:{port}/"
    )

    # the demo traffic: the loadgen script is mounted where the command runs it
    loadgen = services["loadgen"]
    assert mounts("loadgen")[loadgen["command"][1]] == LOADGEN


def test_compose_traces_reach_jaeger_and_grafana() -> None:
    """gateway -> otel-collector (OTLP/HTTP) -> jaeger (OTLP/gRPC) <- Grafana's data source."""
    services = compose()["services"]
    endpoint = urllib.parse.urlsplit(load_yaml(GATEWAY_CONFIG)["telemetry"]["traces"]["endpoint"])
    assert endpoint.hostname == "otel-collector"
    assert "otel-collector" in services["gateway"]["depends_on"]
    collector = services["otel-collector"]
    assert str(collector["image"]).startswith("otel/opentelemetry-collector")
    config_arg = collector["command"][0].removeprefix("--config=")
    collector_config = load_yaml(mounts("otel-collector")[config_arg])
    receiver = collector_config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert receiver.endswith(f":{endpoint.port}")
    assert str(endpoint.port) in collector["expose"]
    (pipeline,) = collector_config["service"]["pipelines"].values()
    assert pipeline["receivers"] == ["otlp"]
    (exporter,) = pipeline["exporters"]
    host, port = collector_config["exporters"][exporter]["endpoint"].split(":")
    jaeger = services[host]
    assert str(jaeger["image"]).startswith("jaegertracing/")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert port in jaeger["expose"]  # OTLP/gRPC
    datasource = load_yaml(GRAFANA_DATASOURCES.parent / "jaeger.yaml")["datasources"][0]
    assert datasource["type"] == "jaeger"
    url = urllib.parse.urlsplit(datasource["url"])
    assert url.hostname == host
    assert f"{url.port}:{url.port}" in jaeger["ports"]  # the UI, also on the host
    assert host in services["grafana"]["depends_on"]


def test_loadgen_sends_to_the_configured_routes() -> None:
    spec = importlib.util.spec_from_file_location("deploy_loadgen", LOADGEN)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    routes = {route["model"] for route in load_yaml(GATEWAY_CONFIG)["routes"]}
    planned = set(module.PLAN)
    assert planned - routes == {"no-such-model"}
    assert routes - planned == set(), "a demo route without traffic"


def test_gateway_config_is_valid() -> None:
    result = subprocess.run(
        [llm_gateway_command(), "check-config", str(GATEWAY_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("LLM_GATEWAY")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "route demo " in result.stdout
    assert "${" not in GATEWAY_CONFIG.read_text(), "the compose config needs no environment"


# --- The Dockerfile, without docker


def test_dockerfile_shape() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage"
    final = dict(stages[-1])
    instructions = [instruction for instruction, _ in stages[-1]]
    assert "${PYTHON_IMAGE}" in final["FROM"]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()
    assert final["USER"].split(":")[0] not in ("root", "0")
    assert final["EXPOSE"] == "8080"
    assert instructions.count("HEALTHCHECK") == 1
    healthcheck = final["HEALTHCHECK"]
    assert "/healthz" in final["ENV"]
    assert exec_form(healthcheck[healthcheck.index("CMD ") + 4 :])[0] == "python"
    assert "curl" not in healthcheck
    assert exec_form(final["CMD"])[:2] == ["llm-gateway", "serve"]


def test_dockerignore_keeps_what_the_build_copies() -> None:
    kept = {
        line[1:].rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    }
    assert "*" in DOCKERIGNORE.read_text().splitlines()
    for source in _builder_copies():
        assert source in kept, f"{source} is copied by the Dockerfile but excluded"


def _builder_copies() -> list[str]:
    """Sources of the builder stage's COPY instructions (relative to the build context)."""
    sources: list[str] = []
    for instruction, args in dockerfile_stages()[0]:
        if instruction == "COPY" and not args.startswith("--from"):
            sources.extend(source.rstrip("/") for source in shlex.split(args)[:-1])
    return sources


@pytest.mark.timeout(600)
def test_dockerfile_install_steps_work_without_docker(tmp_path: Path) -> None:
    """The builder stage by hand: copy what it copies, make the venv, run its pip install; then
    the final stage's CMD (config and port swapped) and HEALTHCHECK against that install."""
    builder = dockerfile_stages()[0]
    context = tmp_path / "src"
    context.mkdir()
    for source in _builder_copies():
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, context / source)
    (install,) = [args for instruction, args in builder if instruction == "RUN" and "pip" in args]
    assert install == "/opt/venv/bin/pip install -c constraints.txt '.[otel]'"  # traces on hand
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = shlex.split(install.replace("/opt/venv", str(venv)))
    result = subprocess.run(
        pip, cwd=context, capture_output=True, text=True, timeout=540, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    (site_packages,) = venv.glob("lib/python*/site-packages")
    assert (site_packages / "opentelemetry" / "exporter" / "otlp" / "proto" / "http").is_dir()
    for init in sorted((ROOT / "gateway").rglob("__init__.py")):
        package = init.parent.relative_to(ROOT)
        assert (site_packages / package / "__init__.py").exists(), (
            f"{'.'.join(package.parts)} is not in the installed project: list every package "
            "in pyproject.toml ([tool.setuptools.packages.find] include = ['gateway*'])"
        )

    bin_dir = venv / "bin"
    result = subprocess.run(
        [str(bin_dir / "llm-gateway"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout

    final = dict(dockerfile_stages()[-1])
    cmd = exec_form(final["CMD"])
    port = free_port()
    cmd[cmd.index("--config") + 1] = str(GATEWAY_CONFIG)
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(port)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["LLM_GATEWAY_HEALTH_URL"] = f"http://127.0.0.1:{port}/healthz"
    healthcheck = exec_form(final["HEALTHCHECK"][final["HEALTHCHECK"].index("CMD ") + 4 :])
    healthcheck[0] = str(bin_dir / healthcheck[0])
    log = tmp_path / "serve.log"
    with log.open("w") as log_file:
        server = subprocess.Popen(
            [str(bin_dir / cmd[0]), *cmd[1:]],
            env=env,
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            check = subprocess.run(healthcheck, env=env, capture_output=True, timeout=10)
            if check.returncode == 0:
                break
            assert server.poll() is None, f"the gateway exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, check.stderr.decode()[-2000:]
            time.sleep(0.3)
    finally:
        server.terminate()
        server.wait(timeout=30)
    # and the check fails when nothing answers
    check = subprocess.run(healthcheck, env=env, capture_output=True, timeout=10)
    assert check.returncode != 0


# --- The compose stack's scale-out profile: three gateways, Redis, nginx in front


def nginx() -> str:
    """Debian's nginx: the tests fail, not skip, without it."""
    path = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if path is None:
        pytest.fail("nginx not found: install it (Debian: apt-get install nginx-light)")
    return path


def nginx_command(prefix: Path, config: Path, directives: str = "") -> list[str]:
    """nginx with this config, its prefix, pid file and error log in a test's directory, and
    these global directives (what the nginx image's command adds: `daemon off;`)."""
    pid = f"pid {prefix / 'nginx.pid'};"
    return [nginx(), "-p", str(prefix), "-c", str(config), "-e", "stderr", "-g", pid + directives]


def scale_out_config() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(SCALE_OUT_CONFIG)
    return data


def nginx_upstream_servers(text: str) -> list[str]:
    block = re.search(r"upstream gateways \{(.*?)\}", text, re.DOTALL)
    assert block is not None
    return re.findall(r"^\s*server\s+(\S+?)[\s;]", block[1], re.MULTILINE)


def nginx_directive(text: str, name: str) -> str:
    (value,) = re.findall(rf"^\s*{name}\s+([^;]+);", text, re.MULTILINE)
    return str(value)


def nginx_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)?", value)
    assert match is not None, value
    return int(match[1]) * (60 if match[2] == "m" else 1)


def local_nginx_config(upstreams: list[str], listen: int) -> str:
    """The balancer's config with the compose service names replaced (nginx resolves them at
    start, and nothing resolves them here) and its port moved."""
    text = NGINX_SCALE_OUT.read_text()
    for service, address in zip(SCALE_OUT_GATEWAYS, upstreams, strict=True):
        text = text.replace(f"server {service}:8080 ", f"server {address} ")
    assert nginx_upstream_servers(text) == upstreams
    return text.replace("listen 8080;", f"listen 127.0.0.1:{listen};")


def test_every_file_compose_mounts_exists() -> None:
    for name in compose()["services"]:
        for target, source in mounts(name).items():
            assert source.exists(), f"{name} mounts {source} at {target}: no such file"


def test_scale_out_profile_wiring() -> None:
    services = compose()["services"]
    profiled = {name for name, service in services.items() if "profiles" in service}
    assert profiled == SCALE_OUT, "a plain `up` must start what it started before"
    for name in SCALE_OUT:
        assert services[name]["profiles"] == ["scale-out"]
    cmd = exec_form(dict(dockerfile_stages()[-1])["CMD"])
    port = cmd[cmd.index("--port") + 1]

    # three gateways of the image, the scale-out config where the CMD reads it, not published
    for name in SCALE_OUT_GATEWAYS:
        gateway = services[name]
        assert (gateway["build"], gateway["image"]) == (
            services["gateway"]["build"],
            services["gateway"]["image"],
        )
        assert mounts(name)[cmd[cmd.index("--config") + 1]] == SCALE_OUT_CONFIG
        assert "ports" not in gateway
        assert gateway["expose"] == [port]
        for dependency in ("simulator", "redis"):
            assert gateway["depends_on"][dependency] == {"condition": "service_healthy"}

    # their config points at the simulator and redis services, and counts three replicas
    config = scale_out_config()
    simulator = services["simulator"]["command"]
    (upstream,) = config["upstreams"]
    sim_port = simulator[simulator.index("--port") + 1]
    assert upstream["base_url"] == f"http://simulator:{sim_port}/v1"
    redis_url = urllib.parse.urlsplit(config["shared"]["redis_url"])
    assert redis_url.hostname == "redis"
    assert str(redis_url.port) in services["redis"]["expose"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert config["shared"]["expected_replicas"] == len(SCALE_OUT_GATEWAYS)

    # nginx: its config mounted as the image's main config, in front of the three
    balancer = services["balancer"]
    assert str(balancer["image"]).startswith("nginx:")
    assert mounts("balancer")["/etc/nginx/nginx.conf"] == NGINX_SCALE_OUT
    text = NGINX_SCALE_OUT.read_text()
    assert nginx_upstream_servers(text) == [f"{name}:{port}" for name in SCALE_OUT_GATEWAYS]
    assert balancer["ports"] == [f"8090:{nginx_directive(text, 'listen')}"]
    for name in SCALE_OUT_GATEWAYS:
        assert balancer["depends_on"][name] == {"condition": "service_healthy"}


def test_scale_out_gateway_config_loads_and_fits_the_balancer() -> None:
    assert "${" not in SCALE_OUT_CONFIG.read_text(), "the compose config needs no environment"
    config = parse_config(scale_out_config(), env={})
    assert {route.model for route in config.routes} == {"demo", "demo-slow"}
    text = NGINX_SCALE_OUT.read_text()
    # nginx drops an idle connection to a gateway before the gateway does
    assert nginx_seconds(nginx_directive(text, "keepalive_timeout")) < config.server.keepalive_s
    # nginx's own idle limits never end a request the gateway may still answer
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        assert nginx_seconds(nginx_directive(text, directive)) >= config.server.deadline.max_s
    body = nginx_directive(text, "client_max_body_size")
    assert body == f"{config.server.max_body_bytes // (1024 * 1024)}m"
    assert nginx_directive(text, "proxy_buffering") == "off"
    assert nginx_directive(text, "worker_processes") == "1"  # least_conn sees every request


def test_nginx_scale_out_config_passes_nginx_t(tmp_path: Path) -> None:
    config = tmp_path / "nginx.conf"
    config.write_text(local_nginx_config(["127.0.0.1:8080"] * 3, free_port()))
    result = subprocess.run(
        [*nginx_command(tmp_path, config), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def _stream(url: str, model: str, result: dict[str, Any]) -> None:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=30) as response:
        result["status"] = response.status
        lines = []
        for line in response:
            if line.startswith(b"data:") and "first_s" not in result:
                result["first_s"] = time.monotonic() - started
            lines.append(line.decode())
    result["total_s"] = time.monotonic() - started
    result["body"] = "".join(lines)


@pytest.mark.timeout(120)
def test_nginx_spreads_streams_over_three_real_gateways(
    tmp_path: Path, simulator: Simulator
) -> None:
    """nginx with the scale-out config in front of three `llm-gateway serve` processes (the
    profile's config, its upstream on the simulator, its `shared` section left out until the
    loader has it): six concurrent 2 s streams end two on each gateway (least_conn); tokens flow
    through as they come, not at the end; a client that hangs up cancels its upstream request."""
    data = without_shared(scale_out_config())  # no Redis here: the balancing is the point
    data["upstreams"][0]["base_url"] = simulator.base_url
    data["upstreams"][0]["max_connections"] = 8  # the cap is per process without `shared`
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(data))
    listen = free_port()
    url = f"http://127.0.0.1:{listen}"
    with ExitStack() as stack:
        gateways = [
            stack.enter_context(serving(["--config", str(config)], cwd=tmp_path))
            for _ in SCALE_OUT_GATEWAYS
        ]
        addresses = [gateway.url.removeprefix("http://") for gateway in gateways]
        nginx_config = tmp_path / "nginx.conf"
        nginx_config.write_text(local_nginx_config(addresses, listen))
        log = stack.enter_context((tmp_path / "nginx.log").open("w"))
        balancer = subprocess.Popen(
            nginx_command(tmp_path, nginx_config, "daemon off;"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        stack.callback(balancer.wait, 10)
        stack.callback(balancer.terminate)
        assert wait_until_ready(f"{url}/readyz", balancer), (tmp_path / "nginx.log").read_text()

        # Two long streams, one short answer, four long streams: least_conn ends with two on
        # each gateway where round robin would put three on one and one on another.
        results: list[dict[str, Any]] = [{} for _ in range(6)]
        streams = [
            threading.Thread(target=_stream, args=(url, "demo-slow", result), daemon=True)
            for result in results
        ]
        for stream in streams[:2]:
            stream.start()
        simulator.wait_for(lambda stats: stats["open"] == 2, within_s=10)
        short: dict[str, Any] = {}
        _stream(url, "demo", short)
        assert short["status"] == 200
        for stream in streams[2:]:
            stream.start()
        simulator.wait_for(lambda stats: stats["open"] == 6, within_s=10)
        inflight = []
        for gateway in gateways:
            with urllib.request.urlopen(f"{gateway.url}/debug/inflight", timeout=5) as answer:
                inflight.append(len(json.load(answer)["inflight"]))
        assert inflight == [2, 2, 2]
        for stream in streams:
            stream.join(timeout=30)
        for result in results:
            assert result["status"] == 200
            assert result["body"].rstrip().endswith("data: [DONE]")
            # 20 tokens 100 ms apart: the first is through long before the last
            assert result["first_s"] < result["total_s"] - 1.0, result

        # a client hanging up mid-stream reaches the gateway, which cancels upstream
        before = simulator.stats()["cancelled"]
        body = {
            "model": "demo-slow",
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        }
        request = urllib.request.Request(
            f"{url}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.readline().startswith(b"data:")
        simulator.wait_for(lambda stats: stats["cancelled"] == before + 1, within_s=5)
