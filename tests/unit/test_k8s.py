"""The Kubernetes manifests under ``k8s/``: what schema validation (scripts/check-k8s.sh) cannot see.

Each rendering (``kubectl kustomize`` of the base, both overlays and the connector example) is checked for
consistency: selectors match the pod labels, ``serviceName`` is the headless Service, every probe, Service and
NetworkPolicy port exists on the container, the mounted configuration passes the project's own loader and names
files the pod mounts, the termination grace period exceeds the drain deadline, the security settings are there,
no Secret material is committed, and the Dockerfile's entry point fits the workloads' arguments.

The checks are functions that return a list of problems; each is also run on a deliberately broken copy, to show
that it can fail. ``kubectl`` comes from PATH, else from the test extra in the venv (it renders without a
cluster).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from connproxy.config import (
    ConnectorConfig,
    ProxyConfig,
    load_connector_config,
    load_proxy_config,
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
PROXY_DIRS = ("base", "overlays/dedicated", "overlays/shared")
CONNECTOR_DIR = "examples/connector"
PROXY = "connectivity-proxy"
CONNECTOR = "connproxy-connector"
APP_UID = 10001
BASE_REPLICAS = 3
#: The contract's default drain deadline (``shutdown.drainTimeoutSeconds``); the tests read the configured one.
DEFAULT_DRAIN_TIMEOUT_SECONDS = 20.0
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
#: What docs/kubernetes.md puts into each Secret (``kubectl create secret generic ... --from-file=KEY=...``).
SECRET_KEYS: Mapping[str, frozenset[str]] = {
    "connectivity-proxy-tls": frozenset({"tls.crt", "tls.key", "ca.crt"}),
    "connectivity-proxy-token-keys": frozenset({"token_keys.json"}),
    "connproxy-connector-tls": frozenset({"tls.crt", "tls.key", "ca.crt"}),
}

Obj = dict[str, Any]


# ------------------------------------------------------------------------------------------------------------
# rendering and lookups


def render(directory: str) -> list[Obj]:
    """``kubectl kustomize k8s/<directory>``, parsed."""
    kubectl = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: it is required to render k8s/ (kubectl kustomize, no cluster needed)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    """Every rendering, by directory under ``k8s/``."""
    return {directory: render(directory) for directory in (*PROXY_DIRS, CONNECTOR_DIR)}


def objects(docs: list[Obj], kind: str) -> list[Obj]:
    """All objects of ``kind``."""
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[Obj], kind: str, name: str) -> Obj:
    """The object of ``kind`` named ``name``."""
    found = [doc for doc in objects(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def workload_of(docs: list[Obj]) -> Obj:
    """The rendering's only StatefulSet or Deployment."""
    (workload,) = [doc for doc in docs if doc["kind"] in ("StatefulSet", "Deployment")]
    return workload


def pod_spec(workload: Obj) -> Obj:
    """The workload's pod spec."""
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def container_of(workload: Obj) -> Obj:
    """The workload's only container."""
    (container,) = pod_spec(workload)["containers"]
    return dict(container)


def pod_labels(workload: Obj) -> dict[str, str]:
    """The labels of the workload's pods."""
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Whether a non-empty equality selector matches ``labels``."""
    return bool(selector) and all(labels.get(key) == value for key, value in (selector or {}).items())


def resolve_port(container: Obj, port: int | str) -> int | None:
    """The container port number that ``port`` (a number or a port name) refers to, or ``None``."""
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return int(declared["containerPort"])
    return None


def config_path(container: Obj) -> str:
    """The path after ``--config`` in the container's command line."""
    argv = [*container.get("command", []), *container.get("args", [])]
    index = argv.index("--config")
    return str(argv[index + 1])


def mounted_files(docs: list[Obj], workload: Obj) -> dict[str, tuple[str, str]]:
    """Every file the pod sees in its ConfigMap and Secret volumes: path -> (volume kind, object name)."""
    volumes = {volume["name"]: volume for volume in pod_spec(workload).get("volumes", [])}
    files: dict[str, tuple[str, str]] = {}
    for mount in container_of(workload).get("volumeMounts", []):
        base = mount["mountPath"].rstrip("/")
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            name = volume["configMap"]["name"]
            for key in one(docs, "ConfigMap", name).get("data", {}):
                files[f"{base}/{key}"] = ("ConfigMap", name)
        elif "secret" in volume:
            name = volume["secret"]["secretName"]
            items = volume["secret"].get("items") or [{"key": k, "path": k} for k in SECRET_KEYS.get(name, ())]
            for item in items:
                files[f"{base}/{item['path']}"] = ("Secret", name)
    return files


def configuration_text(docs: list[Obj]) -> str:
    """The configuration file the workload's ``--config`` names, from the ConfigMap mounted there."""
    workload = workload_of(docs)
    path = config_path(container_of(workload))
    kind, name = mounted_files(docs, workload)[path]
    assert kind == "ConfigMap"
    text: str = one(docs, "ConfigMap", name)["data"][path.rsplit("/", 1)[1]]
    return text


def load_proxy(docs: list[Obj], tmp_path: Path) -> ProxyConfig:
    """The proxy configuration of a rendering, through the project's loader."""
    path = tmp_path / "connectivity-proxy-config.yml"
    path.write_text(configuration_text(docs), encoding="utf-8")
    return load_proxy_config(path)


def load_connector(docs: list[Obj], tmp_path: Path) -> ConnectorConfig:
    """The connector configuration of a rendering, through the project's loader."""
    path = tmp_path / "connector-config.yml"
    path.write_text(configuration_text(docs), encoding="utf-8")
    return load_connector_config(path)


# ------------------------------------------------------------------------------------------------------------
# checks: each returns a list of problems (empty when all is well)


def selector_problems(docs: list[Obj]) -> list[str]:
    """Workload, Service, PDB, NetworkPolicy and anti-affinity selectors against the pod labels."""
    problems: list[str] = []
    workload = workload_of(docs)
    labels = pod_labels(workload)
    name = workload["metadata"]["name"]
    if not selects(workload["spec"]["selector"].get("matchLabels"), labels):
        problems.append(f"{workload['kind']} {name}: selector does not match the template labels")
    for service in objects(docs, "Service"):
        selector = dict(service["spec"].get("selector") or {})
        pod_name = selector.pop(POD_NAME_LABEL, None)
        if not selects(selector, labels):
            problems.append(f"Service {service['metadata']['name']}: selector does not match the pod labels")
        if pod_name is not None and not re.fullmatch(rf"{re.escape(name)}-\d+", pod_name):
            problems.append(f"Service {service['metadata']['name']}: {POD_NAME_LABEL} {pod_name} is no pod of {name}")
    for pdb in objects(docs, "PodDisruptionBudget"):
        if not selects(pdb["spec"]["selector"].get("matchLabels"), labels):
            problems.append(f"PodDisruptionBudget {pdb['metadata']['name']}: selector does not match the pods")
    for policy in objects(docs, "NetworkPolicy"):
        if not selects(policy["spec"]["podSelector"].get("matchLabels"), labels):
            problems.append(f"NetworkPolicy {policy['metadata']['name']}: podSelector does not match the pods")
    anti = pod_spec(workload).get("affinity", {}).get("podAntiAffinity", {})
    for term in anti.get("preferredDuringSchedulingIgnoredDuringExecution", []):
        if not selects(term["podAffinityTerm"]["labelSelector"].get("matchLabels"), labels):
            problems.append(f"{name}: an anti-affinity term does not select the workload's own pods")
    return problems


def port_problems(docs: list[Obj]) -> list[str]:
    """Probe ports, Service targetPorts and NetworkPolicy ports must exist on the container."""
    problems: list[str] = []
    workload = workload_of(docs)
    container = container_of(workload)
    for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = container.get(probe_name)
        if probe is None:
            continue
        action = probe.get("httpGet") or probe.get("tcpSocket") or {}
        if resolve_port(container, action.get("port", -1)) is None:
            problems.append(f"{probe_name}: port {action.get('port')!r} is not a container port")
    for service in objects(docs, "Service"):
        for port in service["spec"]["ports"]:
            if resolve_port(container, port.get("targetPort", port["port"])) is None:
                problems.append(
                    f"Service {service['metadata']['name']}: targetPort {port.get('targetPort')!r} is not a container port"
                )
    for policy in objects(docs, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                if resolve_port(container, port["port"]) is None:
                    problems.append(f"NetworkPolicy: port {port['port']!r} is not a container port")
    return problems


def grace_problems(docs: list[Obj], drain_seconds: float = DEFAULT_DRAIN_TIMEOUT_SECONDS) -> list[str]:
    """``terminationGracePeriodSeconds`` must exceed the drain deadline (the kubelet kills at the grace period)."""
    grace = pod_spec(workload_of(docs)).get("terminationGracePeriodSeconds", 30)
    if grace <= drain_seconds:
        return [f"terminationGracePeriodSeconds {grace} does not exceed the drain deadline {drain_seconds:g} s"]
    return []


def security_problems(docs: list[Obj]) -> list[str]:
    """The restricted-profile settings and a read-only root file system (with /tmp writable)."""
    problems: list[str] = []
    workload = workload_of(docs)
    pod = pod_spec(workload)
    container = container_of(workload)
    for where, context in (("pod", pod.get("securityContext", {})), ("container", container.get("securityContext", {}))):
        if context.get("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if context.get("runAsUser") != APP_UID:
            problems.append(f"{where}: runAsUser is not {APP_UID}")
        if context.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile is not RuntimeDefault")
    context = container.get("securityContext", {})
    if context.get("readOnlyRootFilesystem") is not True:
        problems.append("container: readOnlyRootFilesystem is not true")
    if context.get("allowPrivilegeEscalation") is not False:
        problems.append("container: allowPrivilegeEscalation is not false")
    if context.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("container: capabilities.drop is not [ALL]")
    if context.get("capabilities", {}).get("add"):
        problems.append("container: adds capabilities")
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    if len(tmp) != 1 or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
        problems.append("container: /tmp is not an emptyDir mount")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("pod: automountServiceAccountToken is not false (the proxy does not use the API)")
    return problems


def mount_problems(docs: list[Obj], files: list[str | None]) -> list[str]:
    """The configuration is a directory mount of a rendered ConfigMap; every file it names is mounted."""
    problems: list[str] = []
    workload = workload_of(docs)
    container = container_of(workload)
    mounted = mounted_files(docs, workload)
    path = config_path(container)
    if mounted.get(path, ("", ""))[0] != "ConfigMap":
        problems.append(f"--config {path} is not in a ConfigMap volume")
    for mount in container.get("volumeMounts", []):
        if "subPath" in mount or "subPathExpr" in mount:
            problems.append(f"volume {mount['name']} is mounted with subPath: updates would not reach the pod")
    for name in files:
        if name is None:
            problems.append("a TLS or token key file is not configured (the development PKI would be used)")
        elif not name.startswith("/"):
            problems.append(f"{name}: relative (it would resolve inside the ConfigMap mount's link target)")
        elif name not in mounted:
            problems.append(f"{name}: not provided by any volume of the pod")
        elif mounted[name][0] == "Secret":
            secret = mounted[name][1]
            if secret not in SECRET_KEYS:
                problems.append(f"{name}: from Secret {secret}, which docs/kubernetes.md does not create")
    volumes = pod_spec(workload).get("volumes", [])
    for volume in volumes:
        secret = volume.get("secret")
        if secret is None:
            continue
        for item in secret.get("items", []):
            if item["key"] not in SECRET_KEYS.get(secret["secretName"], frozenset()):
                problems.append(f"Secret {secret['secretName']} key {item['key']} is not created by docs/kubernetes.md")
    return problems


def proxy_files(config: ProxyConfig) -> list[str | None]:
    """Every file a proxy configuration names."""
    tls = config.tunnel_listener.tls
    files: list[str | None] = [tls.cert_file, tls.key_file, tls.ca_file]
    if config.oauth is not None and config.oauth.token_keys_url is None and config.oauth.uaa_domain is None:
        files.append(config.oauth.token_keys_file)
    return files


def connector_files(config: ConnectorConfig) -> list[str | None]:
    """Every file a connector configuration names."""
    files: list[str | None] = [config.tls.cert_file, config.tls.key_file, config.tls.ca_file]
    files.extend(rule.ca_file for rule in config.access_control if rule.ca_file is not None)
    return files


# ------------------------------------------------------------------------------------------------------------
# the proxy: base and overlays


@pytest.fixture(params=PROXY_DIRS)
def proxy_docs(request: pytest.FixtureRequest, rendered: dict[str, list[Obj]]) -> list[Obj]:
    """One proxy rendering (base, dedicated, shared)."""
    docs: list[Obj] = rendered[request.param]
    return docs


def test_expected_objects_are_rendered(proxy_docs: list[Obj]) -> None:
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in proxy_docs}
    expected = {
        ("StatefulSet", PROXY),
        ("ConfigMap", PROXY),
        ("Service", PROXY),
        ("Service", "connectivity-proxy-headless"),
        ("Service", "connectivity-proxy-tunnel"),
        ("Service", "connectivity-proxy-prometheus-metrics"),
        ("PodDisruptionBudget", PROXY),
        ("NetworkPolicy", PROXY),
        ("Ingress", "connectivity-proxy-tunnel"),
    }
    assert expected <= names, expected - names


def test_selectors_match_the_pod_labels(proxy_docs: list[Obj]) -> None:
    assert selector_problems(proxy_docs) == []


def test_service_name_is_the_headless_service(proxy_docs: list[Obj]) -> None:
    statefulset = one(proxy_docs, "StatefulSet", PROXY)
    headless = one(proxy_docs, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert selects(headless["spec"]["selector"], pod_labels(statefulset))


def test_probe_service_and_policy_ports_exist_on_the_container(proxy_docs: list[Obj]) -> None:
    assert port_problems(proxy_docs) == []


def test_one_tunnel_service_per_replica(proxy_docs: list[Obj]) -> None:
    statefulset = one(proxy_docs, "StatefulSet", PROXY)
    replicas = statefulset["spec"]["replicas"]
    per_replica = {
        service["metadata"]["name"]: service["spec"]["selector"].get(POD_NAME_LABEL)
        for service in objects(proxy_docs, "Service")
        if re.fullmatch(r"connectivity-proxy-tunnel-\d+", service["metadata"]["name"])
    }
    assert per_replica == {f"connectivity-proxy-tunnel-{n}": f"{PROXY}-{n}" for n in range(replicas)}


def test_base_runs_three_replicas(rendered: dict[str, list[Obj]]) -> None:
    assert one(rendered["base"], "StatefulSet", PROXY)["spec"]["replicas"] == BASE_REPLICAS


def test_service_ports(proxy_docs: list[Obj], tmp_path: Path) -> None:
    config = load_proxy(proxy_docs, tmp_path)
    container = container_of(one(proxy_docs, "StatefulSet", PROXY))

    def ports(name: str) -> dict[int, int | None]:
        service = one(proxy_docs, "Service", name)
        return {p["port"]: resolve_port(container, p["targetPort"]) for p in service["spec"]["ports"]}

    assert ports(PROXY) == {20003: config.http.port, 20004: config.socks5.port}
    assert ports("connectivity-proxy-tunnel") == {8042: config.tunnel_listener.port}
    assert ports("connectivity-proxy-prometheus-metrics") == {9494: config.metrics.port}


def test_configuration_passes_the_loader_and_matches_the_container(proxy_docs: list[Obj], tmp_path: Path) -> None:
    config = load_proxy(proxy_docs, tmp_path)
    container = container_of(one(proxy_docs, "StatefulSet", PROXY))
    declared = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert declared == {
        "tunnel": config.tunnel_listener.port,
        "http-proxy": config.http.port,
        "socks5": config.socks5.port,
        "metrics": config.metrics.port,
    }
    assert config.http.enabled and config.socks5.enabled and config.metrics.enabled
    # Reached from other pods: the front ends and listeners must not be bound to loopback.
    assert config.http.allow_remote_connections and config.socks5.allow_remote_connections
    assert config.tunnel_listener.bind_address == "0.0.0.0" and config.metrics.bind_address == "0.0.0.0"
    assert config.authorization_enabled


def test_configuration_files_are_mounted(proxy_docs: list[Obj], tmp_path: Path) -> None:
    config = load_proxy(proxy_docs, tmp_path)
    assert mount_problems(proxy_docs, proxy_files(config)) == []


def test_probes(proxy_docs: list[Obj], tmp_path: Path) -> None:
    config = load_proxy(proxy_docs, tmp_path)
    container = container_of(one(proxy_docs, "StatefulSet", PROXY))
    liveness = container["livenessProbe"]["httpGet"]
    assert (liveness["path"], liveness["scheme"]) == ("/healthcheck", "HTTPS")
    assert resolve_port(container, liveness["port"]) == config.tunnel_listener.port
    readiness = container["readinessProbe"]["httpGet"]
    assert (readiness["path"], readiness.get("scheme", "HTTP")) == ("/ready", "HTTP")
    assert resolve_port(container, readiness["port"]) == config.metrics.port


def test_termination_grace_exceeds_the_drain_deadline(proxy_docs: list[Obj], tmp_path: Path) -> None:
    drain = load_proxy(proxy_docs, tmp_path).shutdown.drain_timeout_seconds
    assert drain == 20.0  # the manifests state it, so that the two numbers are read side by side
    assert grace_problems(proxy_docs, drain) == []


def test_security_context(proxy_docs: list[Obj]) -> None:
    assert security_problems(proxy_docs) == []


def test_pod_name_comes_from_the_downward_api(proxy_docs: list[Obj]) -> None:
    container = container_of(one(proxy_docs, "StatefulSet", PROXY))
    env = {item["name"]: item for item in container.get("env", [])}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_config_map_keeps_its_name(proxy_docs: list[Obj]) -> None:
    # A hash suffix would make every edit a new ConfigMap and a rolling restart instead of a live update.
    statefulset = one(proxy_docs, "StatefulSet", PROXY)
    names = [v["configMap"]["name"] for v in pod_spec(statefulset)["volumes"] if "configMap" in v]
    assert names == [PROXY]
    one(proxy_docs, "ConfigMap", PROXY)


def test_network_policy_admits_each_listener(proxy_docs: list[Obj]) -> None:
    container = container_of(one(proxy_docs, "StatefulSet", PROXY))
    policy = one(proxy_docs, "NetworkPolicy", PROXY)
    admitted = {
        resolve_port(container, port["port"]) for rule in policy["spec"]["ingress"] for port in rule.get("ports", [])
    }
    assert admitted == {p["containerPort"] for p in container["ports"]}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits everybody"


def test_ingress_routes_the_external_hosts_with_tls_passthrough(proxy_docs: list[Obj], tmp_path: Path) -> None:
    config = load_proxy(proxy_docs, tmp_path)
    host = config.tunnel_listener.external_host
    replicas = one(proxy_docs, "StatefulSet", PROXY)["spec"]["replicas"]
    ingress = one(proxy_docs, "Ingress", "connectivity-proxy-tunnel")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert config.tunnel_listener.external_port == 443  # ingress-nginx serves passthrough on its TLS port
    assert config.high_availability_mode == "subdomain"  # passthrough routes on SNI: per-replica host names
    routes: dict[str, tuple[str, str]] = {}
    for rule in ingress["spec"]["rules"]:
        (path,) = rule["http"]["paths"]
        backend = path["backend"]["service"]
        routes[rule["host"]] = (backend["name"], backend["port"]["name"])
    expected = {host: ("connectivity-proxy-tunnel", "tunnel")}
    expected.update({f"{PROXY}-{n}.{host}": (f"connectivity-proxy-tunnel-{n}", "tunnel") for n in range(replicas)})
    assert routes == expected
    for service_name, port_name in routes.values():
        service = one(proxy_docs, "Service", service_name)
        assert port_name in {p["name"] for p in service["spec"]["ports"]}


def test_overlays_differ_in_tenant_mode(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    dedicated = load_proxy(rendered["overlays/dedicated"], tmp_path)
    shared = load_proxy(rendered["overlays/shared"], tmp_path)
    assert (dedicated.tenant_mode, shared.tenant_mode) == ("dedicated", "shared")
    assert dedicated.subaccount_id
    for docs in (rendered["overlays/dedicated"], rendered["overlays/shared"]):
        assert {doc["metadata"].get("namespace") for doc in docs} == {"connectivity-proxy"}


# ------------------------------------------------------------------------------------------------------------
# the connector example


@pytest.fixture
def connector_docs(rendered: dict[str, list[Obj]]) -> list[Obj]:
    """The connector example's rendering."""
    return rendered[CONNECTOR_DIR]


def test_connector_example(connector_docs: list[Obj], tmp_path: Path) -> None:
    deployment = one(connector_docs, "Deployment", CONNECTOR)
    container = container_of(deployment)
    assert container["command"] == ["twistd", "-n", "--pidfile=", "connproxy-connector"]
    assert "ports" not in container  # it only dials out
    config = load_connector(connector_docs, tmp_path)
    assert config.access_control, "an example without access rules allows nothing"
    assert selector_problems(connector_docs) == []
    assert security_problems(connector_docs) == []
    assert grace_problems(connector_docs) == []
    assert mount_problems(connector_docs, connector_files(config)) == []


def test_connector_example_reaches_the_dedicated_overlay(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    proxy = load_proxy(rendered["overlays/dedicated"], tmp_path)
    connector = load_connector(rendered[CONNECTOR_DIR], tmp_path)
    assert connector.subaccount_id == proxy.subaccount_id
    assert (connector.proxy.host, connector.proxy.port) == (
        proxy.tunnel_listener.external_host,
        proxy.tunnel_listener.external_port,
    )


# ------------------------------------------------------------------------------------------------------------
# all renderings


def test_no_secret_objects_or_key_material(rendered: dict[str, list[Obj]]) -> None:
    for directory, docs in rendered.items():
        assert objects(docs, "Secret") == [], directory
        for doc in docs:
            text = json.dumps(doc)
            assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text, (directory, doc["kind"])
    for path in K8S.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert "PRIVATE KEY-----" not in text and "BEGIN CERTIFICATE" not in text, path


def test_image_is_set_by_kustomize(rendered: dict[str, list[Obj]]) -> None:
    for directory, docs in rendered.items():
        image = container_of(workload_of(docs))["image"]
        assert re.fullmatch(r"[\w.\-/:]+/connproxy:[\w.\-]+", image), (directory, image)


# ------------------------------------------------------------------------------------------------------------
# the Dockerfile against the workloads


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (keyword, arguments), continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in lines]


def test_dockerfile_entry_point_fits_the_workloads(rendered: dict[str, list[Obj]]) -> None:
    instructions = dockerfile_instructions()
    final_stage = instructions[max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM") :]
    values = {keyword: value for keyword, value in final_stage}
    assert json.loads(values["ENTRYPOINT"]) == ["twistd", "-n", "--pidfile=", "connproxy"]
    assert values["USER"].split(":")[0] == str(APP_UID)
    run = " ".join(value for keyword, value in final_stage if keyword == "RUN")
    assert "--no-index" in run and "getPlugins" in run and "chmod -R a-w" in run
    # The plugin cache must be dated after the plugin modules in whole seconds (image layers drop the fraction).
    assert re.search(r'touch -d "@\$\(\(\$\(date \+%s\) \+ 1\)\)" "\$cache"', run)
    assert run.index("getPlugins") < run.index("touch -d") < run.index("chmod -R a-w")
    assert f"--uid {APP_UID}" in run
    cmd = json.loads(values["CMD"])
    for directory in PROXY_DIRS:
        container = container_of(one(rendered[directory], "StatefulSet", PROXY))
        assert "command" not in container  # the image's entry point runs the proxy
        assert container["args"] == ["--config", config_path(container)]
        assert cmd == container["args"]  # the image's default matches where the manifests mount the file


def test_dockerignore_keeps_the_build_context_to_the_wheel_sources() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        word.rstrip("/")
        for keyword, value in dockerfile_instructions()
        if keyword == "COPY" and "--from" not in value
        for word in value.split()[:-1]
    }
    assert copied <= included, copied - included


# ------------------------------------------------------------------------------------------------------------
# the checks can fail


def _broken(docs: list[Obj], change: Callable[[list[Obj]], None]) -> list[Obj]:
    copied = copy.deepcopy(docs)
    change(copied)
    return copied


def _statefulset(docs: list[Obj]) -> Obj:
    return one(docs, "StatefulSet", PROXY)


def _break_pdb(docs: list[Obj]) -> None:
    one(docs, "PodDisruptionBudget", PROXY)["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "other"


def _break_replica_service(docs: list[Obj]) -> None:
    one(docs, "Service", "connectivity-proxy-tunnel-0")["spec"]["selector"][POD_NAME_LABEL] = "other-0"


def _break_target_port(docs: list[Obj]) -> None:
    one(docs, "Service", PROXY)["spec"]["ports"][0]["targetPort"] = "htpp-proxy"


def _break_readiness_port(docs: list[Obj]) -> None:
    _statefulset(docs)["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = 9495


def _break_grace(docs: list[Obj]) -> None:
    _statefulset(docs)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20


def _break_read_only_root(docs: list[Obj]) -> None:
    _statefulset(docs)["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False


def _break_sub_path(docs: list[Obj]) -> None:
    mounts = _statefulset(docs)["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    mounts[0]["subPath"] = "connectivity-proxy-config.yml"


@pytest.mark.parametrize(
    ("check", "change"),
    [
        (selector_problems, _break_pdb),
        (selector_problems, _break_replica_service),
        (port_problems, _break_target_port),
        (port_problems, _break_readiness_port),
        (grace_problems, _break_grace),
        (security_problems, _break_read_only_root),
    ],
    ids=["pdb-selector", "replica-service", "target-port", "readiness-port", "grace", "read-only-root"],
)
def test_checks_catch_broken_manifests(
    rendered: dict[str, list[Obj]], check: Callable[[list[Obj]], list[str]], change: Callable[[list[Obj]], None]
) -> None:
    docs = rendered["overlays/dedicated"]
    assert check(docs) == []
    assert check(_broken(docs, change)) != []


def test_mount_check_catches_sub_path_and_unmounted_files(rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    docs = rendered["overlays/dedicated"]
    files = proxy_files(load_proxy(docs, tmp_path))
    assert mount_problems(docs, files) == []
    assert mount_problems(_broken(docs, _break_sub_path), files) != []
    assert mount_problems(docs, [*files, "/etc/connproxy/tls/other.crt"]) != []
    assert mount_problems(docs, ["tls/tls.crt"]) != []


def test_every_rendering_is_checked(rendered: dict[str, list[Obj]]) -> None:
    # A new kustomization under k8s/ must be added to the renderings checked here.
    kustomizations = {str(path.parent.relative_to(K8S)) for path in K8S.rglob("kustomization.yaml")}
    assert kustomizations == set(rendered)
