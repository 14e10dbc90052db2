"""The Kubernetes manifests (deploy/kubernetes), offline: valid against the API schemas of every
Kubernetes version that kubernetes-validate bundles (strict: an unknown field is an error), and
true to the code: the container runs the image's command, the probes hit the gateway's routes
on its port, the users and paths match the Dockerfile, the grace periods are ordered, the
ConfigMap's gateway.yaml loads with the real loader, and an edit of it reloads in place (no
rollout). One test runs the pod's command as a process and goes through a pod's shutdown.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate.utils as kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from starlette.routing import Route

from gateway import cli, lifecycle
from gateway.app import create_app
from gateway.config import parse_config
from gateway.testing import wait_until_ready
from tests.conftest import Simulator
from tests.test_deploy import (
    dockerfile_stages,
    exec_form,
    free_port,
    without_shared,
)

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OPT_IN = {"servicemonitor.yaml"}  # not in the default set: needs the Prometheus Operator
_VARIABLE = re.compile(r"\$\{(\w+)\}")


def manifests(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc]


def resource(kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of this kind (and name) among all the manifests."""
    (found,) = [
        doc
        for path in sorted(KUBERNETES.glob("*.yaml"))
        for doc in manifests(path.name)
        if doc["kind"] == kind and name in (None, doc["metadata"]["name"])
    ]
    return found


def gateway_pod() -> dict[str, Any]:
    spec: dict[str, Any] = resource("Deployment")["spec"]["template"]["spec"]
    return spec


def gateway_container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = gateway_pod()["containers"]
    (container,) = containers
    return container


def configmap_gateway_yaml() -> str:
    text: str = resource("ConfigMap")["data"]["gateway.yaml"]
    return text


def image_cmd() -> list[str]:
    return exec_form(dict(dockerfile_stages()[-1])["CMD"])


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def pre_stop_s() -> int:
    command = gateway_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


# --- Schemas


@pytest.mark.parametrize("version", sorted(set(kubernetes_validate.all_versions())))
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    checked = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in manifests(path.name):
            if doc["kind"] in ("Kustomization", "ServiceMonitor"):  # no schema ships for them
                continue
            kubernetes_validate.validate(doc, version, strict=True)
            checked.append(doc["kind"])
    assert sorted(checked) == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "StatefulSet",
        ]
    )


def test_the_schemas_catch_a_misspelt_field_and_a_wrong_type() -> None:
    deployment = resource("Deployment")
    version = kubernetes_validate.latest_version()
    misspelt = copy.deepcopy(deployment)
    container = misspelt["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(misspelt, version, strict=True)
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "50s"
    with pytest.raises(kubernetes_validate.ValidationError, match="'50s' is not of type"):
        kubernetes_validate.validate(wrong, version, strict=True)


def test_the_default_set_is_every_manifest_but_the_opt_in_ones() -> None:
    kustomization = manifests("kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk - OPT_IN
    assert on_disk >= OPT_IN
    assert set(kustomization) == {"apiVersion", "kind", "resources"}, "a new kustomize feature"


def test_service_monitor_scrapes_the_gateway_service() -> None:
    """No schema ships for the Prometheus Operator's CRD: its shape, checked by hand."""
    monitor = resource("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    service = resource("Service", "llm-gateway")
    assert monitor["spec"]["selector"] == {"matchLabels": service["metadata"]["labels"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["path"] in route_paths()
    durations = [endpoint["scrapeTimeout"], endpoint["interval"]]
    seconds = [int(re.fullmatch(r"(\d+)s", duration)[1]) for duration in durations]  # type: ignore[index]
    assert seconds[0] < seconds[1], "scrapeTimeout must be shorter than interval"


# --- The manifests against each other


def test_selectors_pick_the_right_pods() -> None:
    deployment = resource("Deployment")
    gateway_labels = deployment["spec"]["template"]["metadata"]["labels"]
    redis = resource("StatefulSet")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return selector.items() <= labels.items()

    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        resource("Service", "llm-gateway")["spec"]["selector"],
        resource("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        gateway_pod()["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"],
    ):
        assert selects(selector, gateway_labels)
        assert not selects(selector, redis_labels), "the gateway's selectors pick Redis too"
    redis_service = resource("Service", redis["spec"]["serviceName"])
    assert selects(redis["spec"]["selector"]["matchLabels"], redis_labels)
    assert selects(redis_service["spec"]["selector"], redis_labels)
    assert not selects(redis_service["spec"]["selector"], gateway_labels)

    target = resource("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert resource("ConfigMap")["metadata"]["name"] == next(
        volume["configMap"]["name"] for volume in gateway_pod()["volumes"] if "configMap" in volume
    )


def test_three_replicas_owned_by_the_autoscaler() -> None:
    hpa = resource("HorizontalPodAutoscaler")["spec"]
    assert hpa["minReplicas"] == 3
    assert hpa["maxReplicas"] > hpa["minReplicas"]
    # re-applying the Deployment must not reset what the autoscaler chose
    assert "replicas" not in resource("Deployment")["spec"]
    shared = yaml.safe_load(configmap_gateway_yaml())["shared"]
    assert shared["expected_replicas"] == hpa["minReplicas"]
    pdb = resource("PodDisruptionBudget")["spec"]
    assert pdb["maxUnavailable"] < hpa["minReplicas"]
    (cpu,) = hpa["metrics"]
    assert cpu["resource"]["name"] == "cpu"
    assert "cpu" in gateway_container()["resources"]["requests"], "utilization needs a request"


def test_every_key_the_config_reads_comes_from_the_secret() -> None:
    variables = set(_VARIABLE.findall(configmap_gateway_yaml()))
    env = {item["name"]: item for item in gateway_container()["env"]}
    assert variables == set(env)
    for item in env.values():
        reference = item["valueFrom"]["secretKeyRef"]
        assert reference == {"name": "llm-gateway-keys", "key": item["name"]}
    assert set(secret_literals()) == variables, "the README's secret is not the config's"


# --- The manifests against the code


def route_paths() -> set[str]:
    """The GET paths of the gateway the ConfigMap's config makes (what probes and scrapes
    can ask for)."""
    data = without_shared(yaml.safe_load(configmap_gateway_yaml()))  # routes do not depend on it
    routes = create_app(parse_config(data, env=fake_secrets())).starlette.routes
    return {r.path for r in routes if isinstance(r, Route) and "GET" in (r.methods or ())}


def test_the_container_runs_the_images_command() -> None:
    container = gateway_container()
    cmd = image_cmd()
    assert "command" not in container
    assert container["args"] == cmd
    (port,) = container["ports"]
    assert port["containerPort"] == int(option(cmd, "--port"))
    assert option(cmd, "--host") == "0.0.0.0"
    # the ConfigMap's key is mounted where the command reads its config
    config_path = Path(option(cmd, "--config"))
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts[str(config_path.parent)]["readOnly"] is True
    assert config_path.name in resource("ConfigMap")["data"]
    # the image's tag is the project's version
    name, tag = container["image"].rsplit(":", 1)
    assert name == "llm-gateway"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'\nversion = "{tag}"\n' in pyproject


def test_the_probes_are_gateway_routes_on_the_container_port() -> None:
    container = gateway_container()
    paths = route_paths()
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"]["path"] == "/readyz"
    assert liveness["httpGet"]["path"] == "/healthz"
    (port,) = container["ports"]
    for probe in (readiness, liveness):
        assert probe["httpGet"]["path"] in paths
        assert probe["httpGet"]["port"] == port["name"]
    # a liveness failure restarts the pod: it must be slower to trip than readiness
    assert (
        liveness["periodSeconds"] * liveness["failureThreshold"]
        > readiness["periodSeconds"] * readiness["failureThreshold"]
    )
    service_port = resource("Service", "llm-gateway")["spec"]["ports"][0]
    assert service_port["targetPort"] == port["name"]


def test_the_grace_periods_are_ordered() -> None:
    """preStop pause, then SIGTERM: the drain (server.shutdown_grace_s), the cut requests' last
    words, uvicorn's own wait; all inside terminationGracePeriodSeconds, or the kubelet's
    SIGKILL cuts streams the drain promised to finish."""
    pause = pre_stop_s()
    grace = gateway_pod()["terminationGracePeriodSeconds"]
    shutdown_grace_s = parse_config(
        yaml.safe_load(configmap_gateway_yaml()), env=fake_secrets()
    ).server.shutdown_grace_s
    after_sigterm = shutdown_grace_s + lifecycle._SETTLE_S + cli._GRACEFUL_SHUTDOWN_S
    assert 0 < pause < grace - after_sigterm
    assert pause + after_sigterm < grace


def test_the_pod_runs_as_the_images_user_on_a_read_only_root() -> None:
    final = dict(dockerfile_stages()[-1])
    user, group = final["USER"].split(":")
    pod = gateway_pod()["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert (str(pod["runAsUser"]), str(pod["runAsGroup"])) == (user, group)
    container = gateway_container()["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    # What the process writes: its working directory and tempfile's directory (serve --workers
    # keeps prometheus_client's multiprocess files there): one writable emptyDir.
    mounts = {mount["mountPath"]: mount["name"] for mount in gateway_container()["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in gateway_pod()["volumes"]}
    assert final["WORKDIR"] == "/tmp"
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert gateway_pod()["automountServiceAccountToken"] is False
    resources = gateway_container()["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert set(resources["limits"]) == {"memory"}


def test_redis_is_single_non_root_and_keeps_nothing() -> None:
    redis = resource("StatefulSet")["spec"]
    assert redis["replicas"] == 1
    (container,) = redis["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "redis-server"
    assert option(args, "--save") == ""
    assert option(args, "--appendonly") == "no"
    assert option(args, "--maxmemory-policy") == "noeviction"
    assert redis["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service = resource("Service", redis["serviceName"])
    (port,) = service["spec"]["ports"]
    assert port["port"] == container["ports"][0]["containerPort"] == 6379
    assert secret_literals()["REDIS_URL"] == f"redis://{service['metadata']['name']}:6379/0"


# --- The ConfigMap


def secret_literals() -> dict[str, str]:
    """The values of the README's `kubectl create secret` line, as written."""
    readme = (KUBERNETES / "README.md").read_text()
    command = readme[readme.index("kubectl create secret generic llm-gateway-keys") :]
    command = command[: command.index("\n\n")]
    return dict(re.findall(r"--from-literal=(\w+)=(\S+)", command))


def fake_secrets() -> dict[str, str]:
    """The Secret as the README creates it, a test value where it reads a shell variable."""
    return {
        name: f"test-{name.lower()}" if value.startswith('"$') else value
        for name, value in secret_literals().items()
    }


def test_the_configmaps_gateway_yaml_loads_with_the_real_loader() -> None:
    data = yaml.safe_load(configmap_gateway_yaml())
    config = parse_config(data, env=fake_secrets())
    assert config.auth is not None, "a cluster-wide gateway without client keys"
    assert config.server.log_format == "json"
    assert [route.model for route in config.routes] == ["gpt-4o-mini"]
    shared = data["shared"]
    assert shared["redis_url"] == "${REDIS_URL}"
    assert shared["on_failure"] in ("closed", "open", "local_share")


def test_a_configmap_edit_applies_without_a_rollout() -> None:
    """The pods watch their config (`serve --watch-config`, gateway.reload): nothing on the pod
    template follows the ConfigMap's content, so an edit reloads in place, rolls nothing."""
    template = resource("Deployment")["spec"]["template"]
    assert "--watch-config" in gateway_container()["args"]
    assert not any("checksum" in key for key in template["metadata"].get("annotations", {}))
    volume = next(v for v in template["spec"]["volumes"] if "configMap" in v)
    mount = next(m for m in gateway_container()["volumeMounts"] if m["name"] == volume["name"])
    assert "subPath" not in mount  # a subPath mount is never updated by the kubelet


# --- The pod's command, run


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    kilobytes = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert kilobytes is not None
    return int(kilobytes[1]) * 1024


def mebibytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * (1024 if unit == "Gi" else 1)


@pytest.mark.timeout(120)
def test_the_pods_command_drains_a_stream_within_the_pods_grace(
    tmp_path: Path, simulator: Simulator
) -> None:
    """The Deployment's args as a process (port and config path local, the ConfigMap's config
    with its upstream on the simulator): both probes pass; SIGTERM mid-stream makes readiness
    fail while liveness still passes (the kubelet must not restart a draining pod), the stream
    finishes, and the process exits well inside terminationGracePeriodSeconds - preStop."""
    data = without_shared(yaml.safe_load(configmap_gateway_yaml()))  # no Redis: the pod's drain
    data["upstreams"][0]["base_url"] = simulator.base_url
    data["routes"][0]["targets"][0]["model"] = "sim@tokens=30,gap-ms=100"  # a 3 s stream
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(data))
    port = free_port()
    args = list(gateway_container()["args"])
    args[args.index("--config") + 1] = str(config_path)
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    assert args[:2] == ["llm-gateway", "serve"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_GATEWAY")}
    env.update(fake_secrets())
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *args[1:]],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        assert wait_until_ready(f"{url}/readyz", process), log.read_text()[-3000:]
        assert get(f"{url}/healthz") == 200

        answer: dict[str, Any] = {}
        stream = threading.Thread(target=read_stream, args=(url, answer), daemon=True)
        stream.start()
        simulator.wait_for(lambda stats: stats["open"] == 1, within_s=10)
        memory_request = mebibytes(gateway_container()["resources"]["requests"]["memory"])
        assert rss_bytes(process.pid) < memory_request * 1024 * 1024

        process.send_signal(signal.SIGTERM)  # what the kubelet sends after preStop
        terminated = time.monotonic()
        deadline = terminated + 5
        while get(f"{url}/readyz") != 503:
            assert time.monotonic() < deadline, "readiness still passes after SIGTERM"
            time.sleep(0.05)
        assert get(f"{url}/healthz") == 200, "liveness fails while draining: a restart"
        stream.join(timeout=30)
        process.wait(timeout=gateway_pod()["terminationGracePeriodSeconds"] - pre_stop_s())
        exited_s = time.monotonic() - terminated
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert answer.get("status") == 200, answer
    assert answer["body"].rstrip().endswith("data: [DONE]"), answer["body"][-500:]
    # uvicorn re-raises the signal it handled: a clean exit by SIGTERM, no traceback
    assert process.returncode == -signal.SIGTERM, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    assert exited_s < 15, f"exited {exited_s:.1f}s after SIGTERM with nothing left in flight"


def read_stream(url: str, answer: dict[str, Any]) -> None:
    body = {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={
            "content-type": "application/json",
            "authorization": f"Bearer {fake_secrets()['GATEWAY_API_KEY']}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer["status"] = response.status
            answer["body"] = response.read().decode()
    except urllib.error.HTTPError as error:
        answer["status"] = error.code
        answer["body"] = error.read().decode()
