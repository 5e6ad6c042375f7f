"""The state folder and the development PKI that lets both services run with no configuration at all.

:func:`state_dir` locates (and creates) the folder; :func:`ensure_dev_pki` mints a CA, a proxy certificate
for the loopback names and a connector certificate into ``<state>/dev-pki/`` the first time it is needed
and reuses them afterwards, so a proxy and a connector started separately on one machine trust each other.

Creation is safe against concurrent starts: an exclusive ``flock`` on ``<state>/dev-pki.lock`` serialises
the check-and-create, and the files are written into a temporary directory that is renamed into place in
one step, so no reader ever sees half a set. A set that is incomplete, unparsable, inconsistent or about to
expire is replaced as a whole. This is blocking file I/O; call it at start-up, not from the reactor.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.logger import Logger

from connproxy.pki import certs

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX; the directory rename alone still keeps sets whole
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEV_PROXY_HOSTS",
    "DEV_SUBACCOUNT",
    "STATE_DIR_ENV",
    "DevPKI",
    "ensure_dev_pki",
    "state_dir",
]

#: The subaccount the embedded configurations (and the default dev connector certificate) use.
DEV_SUBACCOUNT = "dev-subaccount"
#: The names the development proxy certificate is valid for.
DEV_PROXY_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Environment variable that overrides the state folder.
STATE_DIR_ENV = "CONNPROXY_STATE_DIR"

_PKI_DIR = "dev-pki"
_LOCK_FILE = "dev-pki.lock"
_CONNECTORS_DIR = "connectors"
_CONNECTOR_CERT = "connector.crt"
_CONNECTOR_KEY = "connector.key"
#: A set whose certificates expire sooner than this is replaced.
_MIN_REMAINING = datetime.timedelta(days=1)
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


_log = Logger(namespace="connproxy.pki.state")


@dataclass(frozen=True)
class DevPKI:
    """Paths of a development PKI set (all files exist when :func:`ensure_dev_pki` returns).

    ``dir`` is the ``dev-pki`` folder itself (it holds the CA and proxy files; a connector certificate for a
    subaccount other than :data:`DEV_SUBACCOUNT` lives in a subfolder of it).
    """

    dir: Path
    ca_cert: Path
    ca_key: Path
    proxy_cert: Path
    proxy_key: Path
    connector_cert: Path
    connector_key: Path


def state_dir() -> Path:
    """Return the state folder, creating it (mode 0700) if it does not exist.

    ``$CONNPROXY_STATE_DIR`` if set and non-empty, else ``$XDG_STATE_HOME/connproxy`` (if that variable is
    an absolute path, as the XDG spec requires), else ``~/.local/state/connproxy``. An existing folder's
    permissions are left alone.

    :raises OSError: the folder cannot be created.
    """
    override = os.environ.get(STATE_DIR_ENV, "")
    if override:
        path = Path(override).expanduser()
    else:
        xdg = os.environ.get("XDG_STATE_HOME", "")
        base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
        path = base / "connproxy"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    fd = os.open(state / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _expires_soon(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < _MIN_REMAINING


def _load_pair(crt: Path, key: Path) -> x509.Certificate | None:
    """Load a certificate whose key file matches it, or ``None`` if anything is off."""
    try:
        cert = certs.load_cert_pem(crt)
        private_key = certs.load_key_pem(key)
    except (OSError, ValueError):
        return None
    if cert.public_key() != private_key.public_key() or _expires_soon(cert):
        return None
    return cert


def _binds(cert: x509.Certificate, subaccount: str) -> bool:
    try:
        identity = certs.connector_identity(cert)
    except certs.CertificateIdentityError:
        return False
    return identity == certs.ConnectorIdentity(subaccount, None)


def _ca_usable(pki: DevPKI) -> x509.Certificate | None:
    ca = _load_pair(pki.ca_cert, pki.ca_key)
    proxy = _load_pair(pki.proxy_cert, pki.proxy_key)
    if ca is None or proxy is None or not certs.is_signed_by(proxy, ca):
        return None
    return ca


def _connector_usable(pki: DevPKI, ca: x509.Certificate, subaccount: str) -> bool:
    connector = _load_pair(pki.connector_cert, pki.connector_key)
    return connector is not None and certs.is_signed_by(connector, ca) and _binds(connector, subaccount)


def _discard(path: Path) -> None:
    """Remove a stale folder: rename it out of the way first, so its name is free at once."""
    aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _install(target: Path, write: Callable[[Path], None]) -> None:
    """Create ``target`` by letting ``write`` fill a temporary sibling folder, then renaming it into place.

    If another process installed ``target`` first, its folder wins and ours is thrown away.
    """
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _connector_folder(subaccount: str) -> str:
    if _SAFE_NAME.fullmatch(subaccount):
        return subaccount
    return "sha256-" + hashlib.sha256(subaccount.encode("utf-8")).hexdigest()[:32]


def _paths(pki_dir: Path, connector_dir: Path) -> DevPKI:
    return DevPKI(
        dir=pki_dir,
        ca_cert=pki_dir / certs.CA_CERT_FILE,
        ca_key=pki_dir / certs.CA_KEY_FILE,
        proxy_cert=pki_dir / certs.PROXY_CERT_FILE,
        proxy_key=pki_dir / certs.PROXY_KEY_FILE,
        connector_cert=connector_dir / _CONNECTOR_CERT,
        connector_key=connector_dir / _CONNECTOR_KEY,
    )


def _write_base(folder: Path) -> None:
    ca_cert, ca_key = certs.mint_ca("connproxy development CA")
    certs.write_pem_pair(ca_cert, ca_key, folder / certs.CA_CERT_FILE, folder / certs.CA_KEY_FILE)
    proxy_cert, proxy_key = certs.mint_server_cert(ca_cert, ca_key, DEV_PROXY_HOSTS)
    certs.write_pem_pair(
        proxy_cert, proxy_key, folder / certs.PROXY_CERT_FILE, folder / certs.PROXY_KEY_FILE
    )
    _write_connector(folder, folder, DEV_SUBACCOUNT)


def _write_connector(folder: Path, ca_folder: Path, subaccount: str) -> None:
    ca_cert, ca_key = certs.load_ca(ca_folder)
    cert, key = certs.mint_connector_cert(
        ca_cert, ca_key, subaccount, None, connector_name="development connector"
    )
    certs.write_pem_pair(cert, key, folder / _CONNECTOR_CERT, folder / _CONNECTOR_KEY)


def ensure_dev_pki(state: Path | None = None, subaccount: str = DEV_SUBACCOUNT) -> DevPKI:
    """Return the development PKI in ``<state>/dev-pki/``, minting it on first use.

    The set holds a CA, a proxy certificate for ``localhost``, ``127.0.0.1`` and ``::1``, and a connector
    certificate binding :data:`DEV_SUBACCOUNT` and no location. For another ``subaccount`` an additional
    connector certificate (same CA) is minted into ``dev-pki/connectors/<name>/`` and returned instead.
    ``state`` defaults to :func:`state_dir`; it is created (mode 0700) if needed.

    Existing files are reused unless they are incomplete, unreadable, inconsistent (key/certificate or
    CA/leaf mismatch) or expire within a day; then the set is replaced as a whole (a replaced CA also
    replaces every connector certificate under it).

    :raises OSError: the state folder cannot be created or written.
    :raises ValueError: ``subaccount`` is empty or contains control characters.
    :raises connproxy.pki.certs.PKIError: the files still do not check out after being (re-)created.
    """
    if not isinstance(subaccount, str) or not subaccount:
        raise ValueError("subaccount must be a non-empty string")
    if state is None:
        state = state_dir()
    else:
        state = Path(state)
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
    pki_dir = state / _PKI_DIR
    if subaccount == DEV_SUBACCOUNT:
        connector_dir = pki_dir
    else:
        connector_dir = pki_dir / _CONNECTORS_DIR / _connector_folder(subaccount)
    pki = _paths(pki_dir, connector_dir)
    base = _paths(pki_dir, pki_dir)
    with _locked(state):
        ca = _ca_usable(base)
        if ca is None or not _connector_usable(base, ca, DEV_SUBACCOUNT):
            _discard(pki_dir)
            _install(pki_dir, _write_base)
            ca = _ca_usable(base)
        if ca is None or not _connector_usable(base, ca, DEV_SUBACCOUNT):
            raise certs.PKIError(f"the development PKI in {pki_dir} is unusable; remove that folder")
        if connector_dir != pki_dir and not _connector_usable(pki, ca, subaccount):
            _discard(connector_dir)
            connector_dir.parent.mkdir(mode=0o700, exist_ok=True)
            _install(connector_dir, lambda folder: _write_connector(folder, pki_dir, subaccount))
            if not _connector_usable(pki, ca, subaccount):
                raise certs.PKIError(
                    f"the development connector certificate in {connector_dir} is unusable; remove that folder"
                )
    return pki


def resolve_tls_files(files: Any, *, proxy: bool, subaccount: str | None = None) -> tuple[str, str, str]:
    """Certificate, key and CA file paths of ``files`` (a :class:`connproxy.config.TlsFiles`), the development
    PKI in the state folder filling in what the configuration leaves out (minted there on first use, with a
    warning in the log).

    :param proxy: the proxy's server pair (else the connector's client pair).
    """
    cert_file, key_file, ca_file = files.cert_file, files.key_file, files.ca_file
    if cert_file and key_file and ca_file:
        return cert_file, key_file, ca_file
    dev = ensure_dev_pki(subaccount=subaccount) if subaccount is not None else ensure_dev_pki()
    _log.warn("using development certificates from {folder} (state folder {state}): not for production",
              folder=str(dev.dir), state=str(state_dir()))
    if proxy:
        return cert_file or str(dev.proxy_cert), key_file or str(dev.proxy_key), ca_file or str(dev.ca_cert)
    return cert_file or str(dev.connector_cert), key_file or str(dev.connector_key), ca_file or str(dev.ca_cert)
