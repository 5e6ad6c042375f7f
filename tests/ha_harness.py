"""Several proxy replicas and connectors as real twistd processes on 127.0.0.1 (high-availability tests).

Each replica is its own ``twistd -n connproxy`` process with its own ports; connectors are
``twistd -n connproxy-connector`` processes. Everything started here is ended by PID in :meth:`Fleet.stop`.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol

from tests.harness import _merge, free_port

reactor: Any = global_reactor
BIN = Path(sys.executable).parent


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

    def add_replicas(self, count: int, **overrides: Any) -> list[Replica]:
        """Write the configuration of ``count`` replicas ``connectivity-proxy-<n>`` (not started)."""
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
