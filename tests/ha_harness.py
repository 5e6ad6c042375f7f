"""Several proxy replicas and connectors as real twistd processes on 127.0.0.1 (high-availability tests).

Each replica is its own ``twistd -n connproxy`` process with its own ports; connectors are
``twistd -n connproxy-connector`` processes. Everything started here is ended by PID in :meth:`Fleet.stop`.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol, Protocol

from tests.harness import _merge, free_port

reactor: Any = global_reactor
BIN = Path(sys.executable).parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class Child(ProcessProtocol):
    """A child process we started; ``ended`` fires with its exit reason; output is kept (bounded)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ended: Deferred[Any] = Deferred()
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if len(self.output) > 4 << 20:
            del self.output[: len(self.output) - (2 << 20)]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)

    @property
    def pid(self) -> int | None:
        return self.transport.pid if self.transport is not None else None  # type: ignore[no-any-return]

    def count(self, needle: bytes) -> int:
        return bytes(self.output).count(needle)


def spawn(name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
    child = Child(name)
    reactor.spawnProcess(child, args[0], args, env={**os.environ, **(env or {})})
    return child


@dataclass
class Replica:
    """One proxy replica: its name, ports and configuration file."""

    name: str
    config: Path
    tunnel_port: int
    socks_port: int
    http_port: int
    ingress_port: int
    child: Child | None = None

    @property
    def running(self) -> bool:
        return self.child is not None and not self.child.ended.called


@dataclass
class Fleet:
    """Proxy replicas and connectors as processes, sharing one PKI in ``tmp``."""

    tmp: Path
    pki: Any
    replicas: list[Replica] = field(default_factory=list)
    connectors: list[Child] = field(default_factory=list)
    others: list[Child] = field(default_factory=list)

    def pki_files(self) -> Any:
        return self.pki.write(self.tmp / "pki")

    def add_replicas(self, count: int, *, mode: str = "off", external_port: int | None = None,
                     **overrides: Any) -> list[Replica]:
        """Write the configuration of ``count`` replicas ``connectivity-proxy-<n>`` (not started).

        With a ``mode`` other than ``off`` they form one static replica set, each with a plain ingress listener
        trusting 127.0.0.1 only, and tell connectors to come through ``localhost:external_port``.
        """
        files = self.pki_files()
        names = [f"connectivity-proxy-{n}" for n in range(count)]
        for name in names:
            replica = Replica(name, self.tmp / f"{name}.yaml", free_port(), free_port(), free_port(), free_port())
            data: dict[str, Any] = {
                "tenantMode": "dedicated",
                "subaccountId": "tenant-a",
                "servers": {
                    "businessDataTunnel": {
                        "port": replica.tunnel_port, "bindAddress": "127.0.0.1",
                        "tls": {"certFile": str(files.proxy_cert), "keyFile": str(files.proxy_key),
                                "clientCaFile": str(files.ca_cert)},
                    },
                    "proxy": {
                        "http": {"port": replica.http_port, "enableProxyAuthorization": False,
                                 "allowRemoteConnections": False},
                        "socks5": {"port": replica.socks_port, "enableProxyAuthorization": False,
                                   "allowRemoteConnections": False},
                    },
                },
                "tunnel": {"pingIntervalSeconds": 2, "deadAfterSeconds": 6},
                "metrics": {"prometheus": {"enabled": False}},
            }
            if mode != "off":
                _merge(data, {
                    "highAvailabilityMode": mode,
                    "highAvailability": {"replicas": names},
                    "servers": {"businessDataTunnel": {
                        "externalHost": "localhost", "externalPort": external_port or replica.tunnel_port,
                        "ingress": {"enabled": True, "port": replica.ingress_port, "bindAddress": "127.0.0.1",
                                    "trustedSources": ["127.0.0.1/32"]},
                    }},
                })
            _merge(data, overrides)
            replica.config.write_text(yaml.safe_dump(data))
            self.replicas.append(replica)
        return self.replicas[-count:]

    def start_replica(self, replica: Replica) -> Child:
        replica.child = spawn(
            replica.name,
            [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "connproxy", "--config", str(replica.config)],
            {"POD_NAME": replica.name},
        )
        return replica.child

    def connector_config(self, name: str, proxy_port: int, access: list[dict[str, Any]],
                         **overrides: Any) -> Path:
        cert, key = self.pki.connector("tenant-a", None)
        (self.tmp / f"{name}.crt").write_bytes(cert)
        (self.tmp / f"{name}.key").write_bytes(key)
        (self.tmp / "ca.crt").write_bytes(self.pki.ca_cert_pem)
        path = self.tmp / f"{name}.yaml"
        data: dict[str, Any] = {
            "subaccountId": "tenant-a",
            "connectorId": name,
            "proxy": {"host": "localhost", "port": proxy_port},
            "tls": {"certFile": f"{name}.crt", "keyFile": f"{name}.key", "caFile": "ca.crt"},
            "tunnel": {"pingIntervalSeconds": 2, "deadAfterSeconds": 6},
            "accessControl": access,
        }
        _merge(data, overrides)
        path.write_text(yaml.safe_dump(data))
        return path

    def start_connector(self, config: Path, env: dict[str, str] | None = None) -> Child:
        child = spawn(config.stem, [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "connproxy-connector",
                                    "--config", str(config)], env)
        self.connectors.append(child)
        return child

    def start_nginx(self, port: int) -> Child:
        """NGINX terminating TLS (client certificates verified) in front of the replicas' ingress listeners."""
        conf = nginx_config(self.tmp, port, self.pki_files(), self.replicas)
        child = spawn("nginx", [NGINX, "-p", str(self.tmp), "-c", str(conf), "-e", str(self.tmp / "nginx-error.log"),
                                "-g", "daemon off;"])
        self.others.append(child)
        return child

    @staticmethod
    def kill(child: Child, sig: int = signal.SIGKILL) -> None:
        if child.pid is not None and not child.ended.called:
            os.kill(child.pid, sig)

    @inlineCallbacks
    def stop(self) -> Iterator[Deferred[Any]]:
        children = [c for c in self.connectors + [r.child for r in self.replicas if r.child] + self.others
                    if c is not None]
        for c in children:
            self.kill(c, signal.SIGTERM)
        for c in children:
            if not c.ended.called:
                timer = reactor.callLater(15, self.kill, c, signal.SIGKILL)
                yield c.ended
                if timer.active():
                    timer.cancel()


NGINX_CONF = """\
user root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {tmp}/nginx-access.log;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;

    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}

    upstream connectivity-proxy-any {{
{any_servers}
    }}

    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_verify_depth 2;

        proxy_http_version 1.1;
        proxy_set_header Host $host;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        # The verified connector certificate, URL-encoded PEM; the replica trusts it from this address only.
        proxy_set_header ssl-client-cert $ssl_client_escaped_cert;
        proxy_connect_timeout 5s;
        proxy_read_timeout 3600s;
        proxy_send_timeout 3600s;

        location = /connectivity {{
            proxy_pass http://connectivity-proxy-any;
        }}
{replica_locations}
    }}
}}
"""


def nginx_config(tmp: Path, port: int, files: Any, replicas: list[Replica]) -> Path:
    """The NGINX configuration of the path-mode tests (also shown in docs/high-availability.md)."""
    any_servers = "\n".join(f"        server 127.0.0.1:{r.ingress_port};" for r in replicas)
    locations = "\n".join(
        f"        location = /{r.name} {{\n            proxy_pass http://127.0.0.1:{r.ingress_port};\n        }}"
        for r in replicas
    )
    path = tmp / "nginx.conf"
    path.write_text(NGINX_CONF.format(tmp=tmp, port=port, cert=files.proxy_cert, key=files.proxy_key,
                                      ca=files.ca_cert, any_servers=any_servers, replica_locations=locations))
    return path


# ------------------------------------------------------------------------------------------------ SNI router


def client_hello_sni(data: bytes) -> str | None | bool:
    """The SNI host name in a TLS ClientHello; ``False`` while more bytes are needed, ``None`` for none."""
    if len(data) < 5:
        return False
    if data[0] != 0x16:
        return None
    record = 5 + int.from_bytes(data[3:5], "big")
    if len(data) < record:
        return False
    body = data[5:record]
    try:
        pos = 4 + 2 + 32  # handshake header, version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + int.from_bytes(body[pos:pos + 2], "big")  # cipher suites
        pos += 1 + body[pos]  # compression methods
        end = pos + 2 + int.from_bytes(body[pos:pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            ext_type = int.from_bytes(body[pos:pos + 2], "big")
            ext_len = int.from_bytes(body[pos + 2:pos + 4], "big")
            if ext_type == 0:
                name_len = int.from_bytes(body[pos + 7:pos + 9], "big")
                return body[pos + 9:pos + 9 + name_len].decode("ascii")
            pos += 4 + ext_len
    except IndexError:
        return None
    return None


class SniRouter(Protocol):
    """TLS passthrough by SNI (what NGINX's ``ssl_preread`` does): picks the backend port, then relays bytes."""

    def __init__(self, routes: dict[str, int], default: list[int]) -> None:
        self.routes = routes
        self.default = default
        self.buffer = b""
        self.back: Protocol | None = None
        self.chosen = False

    def dataReceived(self, data: bytes) -> None:
        if self.back is not None and self.back.transport is not None:
            self.back.transport.write(data)
            return
        self.buffer += data
        if self.chosen:
            return
        sni = client_hello_sni(self.buffer)
        if sni is False:
            return
        self.chosen = True
        port = self.routes.get(sni) if isinstance(sni, str) else None
        if port is None:
            self.default.append(self.default.pop(0))  # round robin for "any replica"
            port = self.default[0]
        me = self

        class Back(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                me.back = self
                self.transport.write(me.buffer)
                me.buffer = b""

            def dataReceived(self, data: bytes) -> None:
                if me.transport is not None:
                    me.transport.write(data)

            def connectionLost(self, reason: Any = None) -> None:
                if me.transport is not None:
                    me.transport.loseConnection()

        from twisted.internet.endpoints import TCP4ClientEndpoint
        from twisted.internet.protocol import Factory

        d = TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(Back))
        d.addErrback(lambda _f: self.transport.loseConnection() if self.transport is not None else None)

    def connectionLost(self, reason: Any = None) -> None:
        if self.back is not None and self.back.transport is not None:
            self.back.transport.loseConnection()
