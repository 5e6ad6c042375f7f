"""Helper of ``scripts/build-steps.sh``: lay out what the pods would see, then probe the running processes.

``stage`` plays the kubelet for one workload of rendered manifests (``kubectl kustomize`` output): it writes the
ConfigMap files and the Secret items (taken from a PKI folder, the way ``docs/kubernetes.md`` creates the
Secrets) under a root folder at the container's mount paths, and rewrites the configuration for a run on this
machine: file paths under that root, listeners on 127.0.0.1 and on free ports (the configured ones where they
are free), the connector pointed at the local proxy and one access rule at a local backend. It prints shell
assignments for ``eval``.

``probe`` starts that backend, waits for the proxy and checks its ports: an HTTP answer from the HTTP proxy, a
SOCKS5 greeting reply, ``GET /healthcheck`` over TLS without a client certificate, ``/metrics``; ``/ready`` is
reported; then it waits for the connector's tunnel and sends one request through proxy, tunnel and connector.

Only the standard library and PyYAML (a connproxy dependency) are used: it runs in the freshly built venv.
Every wait is bounded by a deadline; all traffic is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

LOOPBACK = "127.0.0.1"

#: Secret name -> {key: file in the PKI folder}: what ``docs/kubernetes.md`` puts into each Secret.
SECRET_SOURCES: Mapping[str, Mapping[str, str]] = {
    "connectivity-proxy-tls": {"tls.crt": "proxy.crt", "tls.key": "proxy.key", "ca.crt": "ca.crt"},
    "connectivity-proxy-token-keys": {"token_keys.json": "token_keys.json"},
    "connproxy-connector-tls": {"tls.crt": "connector.crt", "tls.key": "connector.key", "ca.crt": "ca.crt"},
}
WORKLOAD_KINDS = ("StatefulSet", "Deployment")


class SmokeError(Exception):
    """A check failed; the message says which and why."""


# ------------------------------------------------------------------------------------------------------------
# stage


def load_documents(path: Path) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML file (``kubectl kustomize`` output)."""
    with path.open(encoding="utf-8") as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc]


def find_object(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The object of ``kind`` named ``name``."""
    for doc in docs:
        if doc.get("kind") == kind and doc["metadata"]["name"] == name:
            return doc
    raise SmokeError(f"no {kind} {name!r} in the rendered manifests")


def config_path_of(container: Mapping[str, Any]) -> str:
    """The value after ``--config`` in the container's command line."""
    argv = [*container.get("command", []), *container.get("args", [])]
    for index, arg in enumerate(argv[:-1]):
        if arg in ("--config", "-c"):
            return str(argv[index + 1])
    raise SmokeError(f"container {container['name']!r} passes no --config")


def free_port(wanted: int, taken: set[int]) -> int:
    """``wanted`` if it can be bound on 127.0.0.1 (and is not in ``taken``), else a free port; added to ``taken``."""
    for candidate in (wanted, 0):
        if candidate in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As Twisted's listeners do: a port whose old connections linger in TIME_WAIT is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((LOOPBACK, candidate))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port
    raise SmokeError(f"no free port for {wanted}")


def _walk_strings(node: Any, change: Callable[[str], str]) -> Any:
    if isinstance(node, dict):
        return {key: _walk_strings(value, change) for key, value in node.items()}
    if isinstance(node, list):
        return [_walk_strings(value, change) for value in node]
    if isinstance(node, str):
        return change(node)
    return node


def rebase_paths(config: Any, mount_paths: list[str], root: Path) -> Any:
    """Every string that names a file under one of ``mount_paths``, moved under ``root``."""

    def change(value: str) -> str:
        for mount in mount_paths:
            if value.startswith(mount.rstrip("/") + "/"):
                return str(root) + value
        return value

    return _walk_strings(config, change)


def _pod(docs: list[dict[str, Any]], kind: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pod spec of workload ``kind/name`` and its only container."""
    pod = find_object(docs, kind, name)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def mounted_config(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The configuration file that ``--config`` names, parsed, from the ConfigMap mounted there."""
    pod, container = _pod(docs, kind, name)
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    config_file = config_path_of(container)
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        volume = volumes[mount["name"]]
        if config_file.startswith(prefix) and "configMap" in volume:
            data = find_object(docs, "ConfigMap", volume["configMap"]["name"]).get("data", {})
            key = config_file[len(prefix):]
            if key in data:
                return dict(yaml.safe_load(data[key]))
    raise SmokeError(f"{name}: {config_file} is not provided by a ConfigMap volume")


def stage_workload(
    docs: list[dict[str, Any]], kind: str, name: str, pki: Path, root: Path
) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """Write ConfigMap files and Secret items of workload ``kind/name`` under ``root``.

    :returns: the parsed configuration (paths already moved under ``root``), where to write it, and the container.
    """
    pod, container = _pod(docs, kind, name)
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    mounts = container.get("volumeMounts", [])
    config_file = config_path_of(container)
    config: dict[str, Any] | None = None
    for mount in mounts:
        if "subPath" in mount:
            raise SmokeError(f"{name}: volume {mount['name']} uses subPath; updates would not reach the pod")
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            config_map = find_object(docs, "ConfigMap", volume["configMap"]["name"])
            for key, text in config_map.get("data", {}).items():
                path = f"{mount['mountPath'].rstrip('/')}/{key}"
                if path == config_file:
                    config = yaml.safe_load(text)
                else:
                    (target / key).write_text(text, encoding="utf-8")
        elif "secret" in volume:
            secret_name = volume["secret"]["secretName"]
            sources = SECRET_SOURCES.get(secret_name)
            if sources is None:
                raise SmokeError(f"{name}: Secret {secret_name!r} is not one docs/kubernetes.md creates")
            items = volume["secret"].get("items") or [{"key": key, "path": key} for key in sources]
            for item in items:
                if item["key"] not in sources:
                    raise SmokeError(f"{name}: Secret {secret_name!r} has no key {item['key']!r}")
                destination = target / item["path"]
                shutil.copyfile(pki / sources[item["key"]], destination)
                destination.chmod(volume["secret"].get("defaultMode", 0o644))
    if config is None:
        raise SmokeError(f"{name}: {config_file} is not provided by a ConfigMap volume")
    mount_paths = [mount["mountPath"] for mount in mounts]
    config = rebase_paths(config, mount_paths, root)
    return config, root / config_file.lstrip("/"), container


def _container_ports(container: Mapping[str, Any]) -> set[int]:
    return {int(port["containerPort"]) for port in container.get("ports", [])}


def stage_proxy(docs: list[dict[str, Any]], pki: Path, root: Path, taken: set[int]) -> dict[str, Any]:
    """Stage the proxy; listeners on 127.0.0.1, on the configured ports where free."""
    config, path, container = stage_workload(docs, "StatefulSet", "connectivity-proxy", pki, root)
    servers = config["servers"]
    tunnel = servers["businessDataTunnel"]
    front_ends = servers["proxy"]
    metrics = config["metrics"]["prometheus"]
    declared = _container_ports(container)
    configured = [tunnel["port"], front_ends["http"]["port"], front_ends["socks5"]["port"], metrics["port"]]
    missing = [port for port in configured if port not in declared]
    if missing:
        raise SmokeError(f"configured ports {missing} are not container ports of connectivity-proxy")
    tunnel["port"] = free_port(tunnel["port"], taken)
    tunnel["bindAddress"] = LOOPBACK
    for front_end in ("http", "socks5"):
        front_ends[front_end]["port"] = free_port(front_ends[front_end]["port"], taken)
        front_ends[front_end]["allowRemoteConnections"] = False
    metrics["port"] = free_port(metrics["port"], taken)
    metrics["bindAddress"] = LOOPBACK
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return {
        "config": str(path),
        "external_host": tunnel["externalHost"],
        "subaccount": config.get("subaccountId"),
        "ports": {
            "tunnel": tunnel["port"],
            "http": front_ends["http"]["port"],
            "socks5": front_ends["socks5"]["port"],
            "metrics": metrics["port"],
        },
    }


def stage_connector(
    docs: list[dict[str, Any]], pki: Path, root: Path, proxy: Mapping[str, Any], taken: set[int]
) -> dict[str, Any]:
    """Stage the connector: the local proxy (certificate checked for the configured host), a local backend."""
    config, path, _ = stage_workload(docs, "Deployment", "connproxy-connector", pki, root)
    endpoint = config["proxy"]
    endpoint["serverName"] = endpoint["host"]
    endpoint["host"] = LOOPBACK
    endpoint["port"] = proxy["ports"]["tunnel"]
    rule = next(
        (r for r in config.get("accessControl", []) if r["protocol"] == "HTTP" and r.get("resources")), None
    )
    if rule is None:
        raise SmokeError("the connector example has no HTTP access rule with resources to try")
    backend_port = free_port(0, taken)
    rule["internalHost"] = LOOPBACK
    rule["internalPort"] = backend_port
    resource = rule["resources"][0]
    request_path = resource["path"].rstrip("/") + ("/ping" if resource.get("allSubPaths") else "")
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return {
        "config": str(path),
        "subaccount": config["subaccountId"],
        "location": config.get("locationId") or "",
        "backend_port": backend_port,
        "url": f"http://{rule['virtualHost']}:{rule['virtualPort']}{request_path}",
    }


def _connproxy(*argv: str, stdout: Path | None = None) -> None:
    """Run the ``connproxy`` command of this venv (as docs/kubernetes.md does), echoing the command line."""
    command = [str(Path(sys.executable).parent / "connproxy"), *argv]
    print("  $ connproxy " + shlex.join(argv) + (f" > {stdout.name}" if stdout else ""), file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise SmokeError(f"connproxy {' '.join(argv)} failed: {result.stderr.strip()}")
    if stdout is not None:
        stdout.write_text(result.stdout, encoding="utf-8")


def mint_pki(pki: Path, proxy_config: Mapping[str, Any], connector_config: Mapping[str, Any]) -> None:
    """The PKI and token of docs/kubernetes.md, for the hosts and identities the configurations name."""
    host = proxy_config["servers"]["businessDataTunnel"]["externalHost"]
    subaccount = connector_config["subaccountId"]
    location = connector_config.get("locationId") or ""
    if proxy_config.get("tenantMode", "dedicated") == "dedicated" and proxy_config.get("subaccountId") != subaccount:
        raise SmokeError(
            f"the connector example's subaccountId {subaccount!r} is not the proxy's {proxy_config.get('subaccountId')!r}"
        )
    client_ids = proxy_config["servers"]["proxy"]["authorization"]["oauth"]["allowedClientId"]
    client_id = client_ids if isinstance(client_ids, str) else client_ids[0]
    _connproxy("certs", "init", "--dir", str(pki), "--host", host, "--host", f"*.{host}")
    location_args = ("--location", location) if location else ()
    _connproxy(
        "certs", "connector", "--dir", str(pki), "--subaccount", subaccount, *location_args,
        "--out", str(pki / "connector"),
    )
    _connproxy(
        "token", "--dir", str(pki), "--subaccount", subaccount, "--client-id", client_id,
        stdout=pki / "token.jwt",
    )


def command_stage(args: argparse.Namespace) -> int:
    """``stage``: mint the PKI, lay out both workloads, print shell assignments, write the state for ``probe``."""
    taken: set[int] = set()
    work = Path(args.work)
    pki = Path(args.pki)
    proxy_docs = load_documents(Path(args.proxy_manifests))
    connector_docs = load_documents(Path(args.connector_manifests))
    mint_pki(
        pki,
        mounted_config(proxy_docs, "StatefulSet", "connectivity-proxy"),
        mounted_config(connector_docs, "Deployment", "connproxy-connector"),
    )
    proxy = stage_proxy(proxy_docs, pki, work / "proxy-root", taken)
    connector = stage_connector(connector_docs, pki, work / "connector-root", proxy, taken)
    state = {"proxy": proxy, "connector": connector, "ca": str(pki / "ca.crt"), "token": str(pki / "token.jwt")}
    (work / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    assignments = {
        "PROXY_CONFIG": proxy["config"],
        "CONNECTOR_CONFIG": connector["config"],
        "EXTERNAL_HOST": proxy["external_host"],
    }
    for key, value in assignments.items():
        print(f"{key}={shlex.quote(str(value))}")
    return 0


# ------------------------------------------------------------------------------------------------------------
# probe


class _Backend(http.server.BaseHTTPRequestHandler):
    """The internal system behind the connector: answers every GET with 200 and the path."""

    def do_GET(self) -> None:
        """Answer 200 with a short text naming the path."""
        body = f"backend ok {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _deadlines(seconds: float) -> Iterator[float]:
    """Yield the remaining time until ``seconds`` have passed, pausing 0.1 s between rounds."""
    end = time.monotonic() + seconds
    while (remaining := end - time.monotonic()) > 0:
        yield remaining
        time.sleep(0.1)


def wait_listening(port: int, pids: list[int], seconds: float) -> float:
    """Wait until 127.0.0.1:``port`` accepts; fail early if a process in ``pids`` exits. Returns the seconds taken."""
    start = time.monotonic()
    for remaining in _deadlines(seconds):
        dead = [pid for pid in pids if not _alive(pid)]
        if dead:
            raise SmokeError(f"process {dead[0]} exited before 127.0.0.1:{port} was listening")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=min(1.0, remaining)):
                return time.monotonic() - start
        except OSError:
            continue
    raise SmokeError(f"127.0.0.1:{port} was not listening within {seconds:g} s")


def http_get(port: int, target: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """``GET target`` on 127.0.0.1:``port`` (an absolute URL makes it a proxy request)."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        connection.request("GET", target, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def check_socks5(port: int) -> bytes:
    """Send SAP's client greeting (methods 0x00 and 0x80); return the two-byte reply."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(b"\x05\x02\x00\x80")
        reply = b""
        while len(reply) < 2:
            chunk = sock.recv(2 - len(reply))
            if not chunk:
                break
            reply += chunk
    return reply


def check_healthcheck(port: int, ca_file: str, server_name: str) -> str:
    """``GET /healthcheck`` over TLS, no client certificate, the server certificate verified for ``server_name``."""
    context = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(f"GET /healthcheck HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data and len(data) < 4096:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
    return data.split(b"\r\n", 1)[0].decode("latin-1")


def tunnels_count(metrics_port: int) -> float:
    """``connectivity_business_data_tunnels_count`` from ``/metrics``."""
    status, body = http_get(metrics_port, "/metrics")
    if status != 200:
        raise SmokeError(f"/metrics answered {status}")
    for line in body.decode().splitlines():
        if line.startswith("connectivity_business_data_tunnels_count "):
            return float(line.split()[1])
    raise SmokeError("/metrics has no connectivity_business_data_tunnels_count")


def command_probe(args: argparse.Namespace) -> int:
    """``probe``: check the proxy's ports and one request through the connector; print one line per check."""
    state = json.loads(Path(args.state).read_text(encoding="utf-8"))
    proxy, connector = state["proxy"], state["connector"]
    ports = proxy["ports"]
    pids = [args.proxy_pid, args.connector_pid]
    backend = http.server.ThreadingHTTPServer((LOOPBACK, connector["backend_port"]), _Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()

    def report(what: str, result: str) -> None:
        print(f"  ok  {what:<52} {result}")

    try:
        took = wait_listening(ports["tunnel"], pids, args.timeout)
        for name in ("http", "socks5", "metrics"):
            wait_listening(ports[name], pids, args.timeout)
        report(f"listening (tunnel {ports['tunnel']})", f"after {took:.1f} s")
        status, _ = http_get(ports["http"], connector["url"])
        if status != 407:
            raise SmokeError(f"HTTP proxy without a token answered {status}, expected 407")
        report(f"HTTP proxy 127.0.0.1:{ports['http']}, no token", f"HTTP {status}")
        reply = check_socks5(ports["socks5"])
        if reply != b"\x05\x80":
            raise SmokeError(f"SOCKS5 greeting 05 02 00 80 answered {reply.hex(' ') or 'nothing'}, expected 05 80")
        report(f"SOCKS5 127.0.0.1:{ports['socks5']}, greeting 05 02 00 80", f"reply {reply.hex(' ')}")
        status_line = check_healthcheck(ports["tunnel"], state["ca"], proxy["external_host"])
        if not status_line.startswith("HTTP/1.1 200"):
            raise SmokeError(f"GET /healthcheck over TLS answered {status_line!r}")
        report(f"GET /healthcheck TLS 127.0.0.1:{ports['tunnel']}", f"{status_line} ({proxy['external_host']})")
        count = tunnels_count(ports["metrics"])
        report(f"GET /metrics 127.0.0.1:{ports['metrics']}", f"HTTP 200, tunnels {count:g}")
        status, _ = http_get(ports["metrics"], "/ready")
        if status not in (200, 503):
            raise SmokeError(f"GET /ready answered {status}")
        note = {200: "ready", 503: "not ready"}
        report("GET /ready (readiness probe, reported)", f"HTTP {status}: {note[status]}")
        for _ in _deadlines(args.timeout):
            if tunnels_count(ports["metrics"]) >= 1:
                break
            if not _alive(args.connector_pid):
                raise SmokeError("the connector exited")
        else:
            raise SmokeError(f"the connector's tunnel was not registered within {args.timeout:g} s")
        report("connector tunnel registered", f"tunnels {tunnels_count(ports['metrics']):g}")
        token = Path(state["token"]).read_text(encoding="utf-8").strip()
        status, body = http_get(ports["http"], connector["url"], {"Proxy-Authorization": f"Bearer {token}"})
        if status != 200 or not body.startswith(b"backend ok"):
            raise SmokeError(f"GET {connector['url']} through proxy and connector: HTTP {status} {body[:80]!r}")
        report(f"GET {connector['url']} via proxy+connector", f"HTTP {status} {body.decode().strip()!r}")
    except SmokeError as exc:
        print(f"  FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        backend.shutdown()
        backend.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``stage`` or ``probe``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stage = commands.add_parser("stage", help="lay out ConfigMaps and Secrets, rewrite the configurations")
    stage.add_argument("--proxy-manifests", required=True, help="kubectl kustomize output of a proxy overlay")
    stage.add_argument("--connector-manifests", required=True, help="kubectl kustomize output of the connector")
    stage.add_argument("--pki", required=True, help="PKI folder (connproxy certs init/connector, token)")
    stage.add_argument("--work", required=True, help="work folder (proxy-root/, connector-root/, state.json)")
    stage.set_defaults(handler=command_stage)
    probe = commands.add_parser("probe", help="check the running proxy and connector")
    probe.add_argument("--state", required=True, help="state.json written by stage")
    probe.add_argument("--proxy-pid", type=int, required=True)
    probe.add_argument("--connector-pid", type=int, required=True)
    probe.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each condition")
    probe.set_defaults(handler=command_probe)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except SmokeError as exc:
        print(f"k8s_smoke {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
