"""What start-up needs beyond valid keys and values: the files a configuration names, and (for ``connproxy config
check``) free listening ports.

Every problem is one line ``<key path>: <problem> (<file>)``, recorded in a :class:`~connproxy.config.reader.Context`
so that all of them are reported together. Files are checked as start-up reads them: certificates and keys as PEM
(a private key given where a certificate belongs, or the reverse, is named as such), the key against the
certificate, the TLS context built exactly as the service builds it, and ``tokenKeysFile`` with the key store's own
JWKS parser. A key whose value already had a problem is not looked at again.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from connproxy.config.connector import build_connector_config, embedded_connector_config
from connproxy.config.model import ConnectorConfig, ProxyConfig, TlsFiles
from connproxy.config.proxy import OAUTH_PATH, build_proxy_config, embedded_proxy_config, listener_ports
from connproxy.config.reader import Context, read_yaml
from connproxy.pki import tls

__all__ = [
    "bind_problem",
    "connector_file_problems",
    "connector_port_problems",
    "describe_bind_error",
    "port_problems",
    "proxy_file_problems",
    "proxy_port_problems",
    "startup_warnings",
    "verify_connector_config",
    "verify_connector_config_file",
    "verify_proxy_config",
    "verify_proxy_config_file",
]

_PEM_CERT: Final = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY_MARK: Final = b"PRIVATE KEY-----"
#: Files larger than this are not certificates or keys anyone meant to configure.
_MAX_PEM_BYTES: Final = 1 << 20


def _read(context: Context, key_path: str, path: str) -> bytes | None:
    """The bytes of ``path``, or ``None`` with the problem recorded."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        context.report(key_path, "no such file", path)
        return None
    except IsADirectoryError:
        context.report(key_path, "is a directory, not a file", path)
        return None
    except OSError as exc:
        context.report(key_path, f"cannot be read: {exc.strerror or exc}", path)
        return None
    if len(data) > _MAX_PEM_BYTES:
        context.report(key_path, f"larger than {_MAX_PEM_BYTES} bytes: not a PEM file", path)
        return None
    return data


def _certificates(context: Context, key_path: str, path: str) -> list[x509.Certificate] | None:
    data = _read(context, key_path, path)
    if data is None:
        return None
    if _PEM_CERT not in data:
        if _PEM_KEY_MARK in data:
            context.report(key_path, "is a private key, not a certificate", path)
        else:
            context.report(key_path, "holds no PEM certificate", path)
        return None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        context.report(key_path, f"holds a PEM certificate that does not parse: {exc}", path)
        return None


def _private_key(context: Context, key_path: str, path: str) -> Any:
    data = _read(context, key_path, path)
    if data is None:
        return None
    if _PEM_KEY_MARK not in data:
        if _PEM_CERT in data:
            context.report(key_path, "is a certificate, not a private key", path)
        else:
            context.report(key_path, "holds no PEM private key", path)
        return None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        context.report(key_path, "the private key is encrypted; connproxy needs it unencrypted", path)
    except (ValueError, UnsupportedAlgorithm) as exc:
        context.report(key_path, f"holds a PEM private key that does not parse: {exc}", path)
    return None


def _public_bytes(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _tls_problems(context: Context, files: TlsFiles, path: str, ca_key: str, *, server: bool) -> None:
    """Check one ``tls`` block (keys left out are the development PKI's and are not checked here)."""
    cert_path, key_path, ca_path = f"{path}.certFile", f"{path}.keyFile", f"{path}.{ca_key}"
    if context.is_bad(path):
        return
    before = len(context.problems)
    certs = _certificates(context, cert_path, files.cert_file) if files.cert_file else None
    key = _private_key(context, key_path, files.key_file) if files.key_file else None
    if certs and key is not None and _public_bytes(certs[0].public_key()) != _public_bytes(key.public_key()):
        context.report(key_path, f"does not match the certificate in {cert_path}", files.key_file)
    if files.ca_file:
        _certificates(context, ca_path, files.ca_file)
    if len(context.problems) != before or not (files.cert_file and files.key_file and files.ca_file):
        return
    # The TLS context exactly as the service builds it, so that nothing start-up refuses gets through.
    try:
        if server:
            tls.server_options_from_files(files.cert_file, files.key_file, files.ca_file)
        else:
            tls.client_options_from_files("localhost", files.ca_file, files.cert_file, files.key_file)
    except Exception as exc:  # any refusal by OpenSSL or Twisted is a problem of these files
        context.report(path, f"the certificate, key and CA files do not make a TLS context: {exc}")


def proxy_file_problems(config: ProxyConfig, context: Context) -> None:
    """Record the problems of the files ``config`` names: the tunnel listener's certificate, key and client CA,
    and ``tokenKeysFile`` (read only where authorization is enabled, as start-up does)."""
    _tls_problems(context, config.tunnel_listener.tls, "servers.businessDataTunnel.tls", "clientCaFile", server=True)
    oauth = config.oauth
    key_path = f"{OAUTH_PATH}.tokenKeysFile"
    if oauth is not None and oauth.token_keys_file and config.authorization_enabled and not context.is_bad(key_path):
        # Imported here: PyJWT is the proxy's, and the connector's start-up runs this module too.
        from connproxy.pki.jwks import JwksError, read_jwks_file

        try:
            read_jwks_file(oauth.token_keys_file)
        except FileNotFoundError:
            context.report(key_path, "no such file", oauth.token_keys_file)
        except OSError as exc:
            context.report(key_path, f"cannot be read: {exc.strerror or exc}", oauth.token_keys_file)
        except JwksError as exc:
            context.report(key_path, str(exc), oauth.token_keys_file)


def connector_file_problems(config: ConnectorConfig, context: Context) -> None:
    """Record the problems of the files ``config`` names: the connector's certificate, key and CA, and each access
    rule's ``caFile``."""
    _tls_problems(context, config.tls, "tls", "caFile", server=False)
    # Rules with problems are left out of config.access_control: context.rule_indexes maps them back.
    indexes = context.rule_indexes or list(range(len(config.access_control)))
    for position, rule in enumerate(config.access_control):
        if rule.ca_file:
            _certificates(context, f"accessControl[{indexes[position]}].caFile", rule.ca_file)


def port_problems(context: Context, listeners: Iterable[tuple[str, str, int]]) -> None:
    """Record each ``(key path, address, port)`` that cannot be bound now (port 0 is skipped): in use, not
    permitted, or an address this host does not have (then the problem names the port's key too)."""
    for key_path, address, port in listeners:
        if port == 0 or context.is_bad(key_path):
            continue
        problem = bind_problem(address, port)
        if problem is not None:
            context.report(key_path, problem)


def bind_problem(address: str, port: int) -> str | None:
    """Why ``address:port`` cannot be listened on now, or ``None`` (binds and closes a socket at once, with
    ``SO_REUSEADDR`` as Twisted listens)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
            sock.listen(1)
        except OSError as exc:
            return describe_bind_error(address, port, exc.errno, exc.strerror)
    return None


def describe_bind_error(address: str, port: int, code: int | None, text: str | None) -> str:
    """The problem text for a failed bind of ``address:port`` (also used for the error at start-up)."""
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    if code == errno.EADDRINUSE:
        return f"port {port} is already in use ({where})"
    if code in (errno.EACCES, errno.EPERM):
        return f"not permitted to listen on {where} (ports below 1024 need privileges)"
    if code == errno.EADDRNOTAVAIL:
        return f"this host has no address {address} to listen on ({where})"
    return f"cannot listen on {where}: {text or code}"


def proxy_port_problems(config: ProxyConfig, context: Context) -> None:
    """Record the enabled listeners of ``config`` whose port cannot be bound now."""
    addresses = {
        "servers.businessDataTunnel.port": config.tunnel_listener.bind_address,
        "servers.businessDataTunnel.ingress.port": config.tunnel_listener.ingress.bind_address,
        "servers.proxy.http.port": config.interface_for(config.http),
        "servers.proxy.socks5.port": config.interface_for(config.socks5),
        "metrics.prometheus.port": config.metrics.bind_address,
    }
    port_problems(context, [(path, addresses[path], port) for path, port in listener_ports(config)])


def connector_port_problems(config: ConnectorConfig, context: Context) -> None:
    """Record the connector's metrics port if enabled and it cannot be bound now."""
    if config.metrics.enabled:
        port_problems(context, [("metrics.prometheus.port", config.metrics.bind_address, config.metrics.port)])



# --------------------------------------------------------------------------------------------------------
# everything start-up checks, in one call per role


def verify_proxy_config(config: ProxyConfig, *, check_ports: bool = False, context: Context | None = None) -> None:
    """Check the files ``config`` names (and, with ``check_ports``, that its ports are free now).

    :raises ConfigError: every problem (with those already in ``context``), one line each.
    """
    context = context if context is not None else Context()
    proxy_file_problems(config, context)
    if check_ports:
        proxy_port_problems(config, context)
    context.raise_problems()


def verify_connector_config(config: ConnectorConfig, *, check_ports: bool = False,
                            context: Context | None = None) -> None:
    """Check the files ``config`` names (and, with ``check_ports``, that its metrics port is free now).

    :raises ConfigError: every problem (with those already in ``context``), one line each.
    """
    context = context if context is not None else Context()
    connector_file_problems(config, context)
    if check_ports:
        connector_port_problems(config, context)
    context.raise_problems()


def verify_proxy_config_file(path: str | os.PathLike[str] | None, *, check_ports: bool = False) -> ProxyConfig:
    """The proxy configuration start-up runs with: the file ``path`` (or the embedded defaults for ``None``),
    with every key, value, cross-field rule and named file checked (and free ports, with ``check_ports``).

    :raises ConfigError: the file cannot be read or is not YAML (one line), or every problem found.
    """
    if path is None:
        config = embedded_proxy_config()
        verify_proxy_config(config, check_ports=check_ports)
        return config
    context = Context(base_dir=Path(path).resolve().parent)
    config = build_proxy_config(read_yaml(path), context)
    verify_proxy_config(config, check_ports=check_ports, context=context)
    return config


def verify_connector_config_file(path: str | os.PathLike[str] | None, *,
                                 check_ports: bool = False) -> ConnectorConfig:
    """The connector configuration start-up runs with (see :func:`verify_proxy_config_file`).

    :raises ConfigError: the file cannot be read or is not YAML (one line), or every problem found.
    """
    if path is None:
        config = embedded_connector_config()
        verify_connector_config(config, check_ports=check_ports)
        return config
    context = Context(base_dir=Path(path).resolve().parent)
    config = build_connector_config(read_yaml(path), context)
    verify_connector_config(config, check_ports=check_ports, context=context)
    return config


# --------------------------------------------------------------------------------------------------------
# warnings: valid, but open to the network


def _beyond_loopback(address: str) -> bool:
    try:
        return not ipaddress.ip_address(address).is_loopback
    except ValueError:
        return True


def startup_warnings(config: ProxyConfig | ConnectorConfig) -> list[str]:
    """Warnings for a configuration that is valid but exposes the process: a front end listening beyond loopback
    without proxy authorization (anyone who reaches it uses the tunnels), a tunnel listener beyond loopback with the
    development certificates (whose CA key lies in the state folder), a metrics endpoint beyond loopback. One line
    each, naming the keys; start-up logs them."""
    warnings: list[str] = []
    if isinstance(config, ProxyConfig):
        for name, front_end in (("http", config.http), ("socks5", config.socks5)):
            address = config.interface_for(front_end)
            if front_end.enabled and not front_end.enable_proxy_authorization and _beyond_loopback(address):
                warnings.append(
                    f"servers.proxy.{name}: listens on {address}:{front_end.port} without proxy authorization: "
                    "anyone who can reach it can use every connector of the tenant (set enableProxyAuthorization: "
                    "true, or allowRemoteConnections: false for loopback only)")
        listener = config.tunnel_listener
        files = listener.tls
        if _beyond_loopback(listener.bind_address) and not (files.cert_file and files.key_file and files.ca_file):
            warnings.append(
                f"servers.businessDataTunnel: listens on {listener.bind_address}:{listener.port} with the development "
                "certificates (tls.certFile, keyFile or clientCaFile left out): not for production")
        metrics = config.metrics
        if metrics.enabled and _beyond_loopback(metrics.bind_address):
            warnings.append(
                f"metrics.prometheus: serves /metrics on {metrics.bind_address}:{metrics.port} to the network "
                "(bindAddress: 127.0.0.1 for loopback only)")
    else:
        files = config.tls
        if not (files.cert_file and files.key_file and files.ca_file):
            warnings.append("tls: the connector uses the development certificates (certFile, keyFile or caFile left "
                            "out): not for production")
        metrics = config.metrics
        if metrics.enabled and _beyond_loopback(metrics.bind_address):
            warnings.append(
                f"metrics.prometheus: serves /metrics on {metrics.bind_address}:{metrics.port} to the network")
    return warnings
