# -*- test-case-name: tests.unit.test_lifecycle -*-
"""Live reload and process signals, for both roles.

* :func:`changed_keys` compares two configurations (frozen dataclasses) and names what changed by its YAML key
  path; :func:`split_changes` separates what a role can apply while running from what needs a restart.
* :class:`Reloader` re-reads the configuration file on demand (SIGHUP) and when the file changes: it polls the
  file's resolved path, inode, size and modification time every few seconds on the injected reactor (a
  Kubernetes ConfigMap is updated by swapping a symlink, which changes the resolved path; an edited file
  changes its inode or time). A file that does not load is refused with one log line that names the key; the
  running configuration stays. Each attempt is counted by result (``ok`` / ``error``).
* :func:`install_signal_handlers` makes SIGTERM stop the reactor (the services then drain) with exit status 0,
  and SIGHUP reload; SIGHUP never stops the process.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from connproxy.config import ConfigError

log = Logger(namespace="connproxy.reload")

C = TypeVar("C")

#: Seconds between two looks at the configuration file.
DEFAULT_POLL_SECONDS = 5.0

#: YAML key paths of configuration fields whose name is not just their camelCase spelling.
_KEY_NAMES = {
    "tunnel_listener": "servers.businessDataTunnel",
    "http": "servers.proxy.http",
    "socks5": "servers.proxy.socks5",
    "oauth": "servers.proxy.authorization.oauth",
    "client_connection": "servers.proxy.clientConnection",
    "metrics": "metrics.prometheus",
    "allowed_client_ids": "allowedClientId",
}


class ReloadError(Exception):
    """A new configuration cannot be applied; the message names the key (``key_path``)."""

    def __init__(self, message: str, key_path: str | None = None) -> None:
        super().__init__(message)
        self.key_path = key_path


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def key_path(fields: Sequence[str]) -> str:
    """The YAML key path of a configuration field path (``("tunnel_listener", "port")`` is
    ``servers.businessDataTunnel.port``)."""
    return ".".join(_KEY_NAMES.get(name) or _camel(name) for name in fields)


def changed_keys(old: Any, new: Any) -> list[str]:
    """The YAML key paths whose values differ between two configurations, innermost where both sides are
    dataclasses of the same type (a changed list such as ``accessControl`` is named as a whole)."""
    found: list[str] = []

    def walk(a: Any, b: Any, where: tuple[str, ...]) -> None:
        if a == b:
            return
        if dataclasses.is_dataclass(a) and type(a) is type(b) and not isinstance(a, type):
            for f in dataclasses.fields(a):
                walk(getattr(a, f.name), getattr(b, f.name), (*where, f.name))
            return
        found.append(key_path(where) if where else "(top level)")

    walk(old, new, ())
    return found


def split_changes(changed: Iterable[str], reloadable: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(applicable, needs_restart)``: a change is applicable if its key path is, or lies under, one of
    ``reloadable``."""
    prefixes = tuple(reloadable)
    applicable: list[str] = []
    restart: list[str] = []
    for key in changed:
        if any(key == p or key.startswith((p + ".", p + "[")) for p in prefixes):
            applicable.append(key)
        else:
            restart.append(key)
    return applicable, restart


def file_signature(path: str) -> tuple[str, int, int, int] | None:
    """What identifies one version of ``path``: resolved path, inode, size, modification time (ns); ``None``
    if it cannot be read."""
    try:
        resolved = os.path.realpath(path)
        st = os.stat(resolved)
    except OSError:
        return None
    return (resolved, st.st_ino, st.st_size, st.st_mtime_ns)


class Reloader(Generic[C]):
    """Reloads a configuration file into a running service.

    :param path: the configuration file (``--config``).
    :param load: reads and validates it (raises :class:`~connproxy.config.ConfigError` naming the key).
    :param apply: applies a loaded configuration to the running service; raises :class:`ReloadError` (or
        ``ValueError``, e.g. an unreadable token keys file) to refuse it, leaving everything as it was.
    :param on_result: called with ``"ok"`` or ``"error"`` after each attempt (the reload counter).
    :param extra_files: more files whose change triggers a reload (the token keys file), read on each poll.
    """

    def __init__(
        self,
        reactor: Any,
        path: str,
        load: Callable[[str], C],
        apply: Callable[[C], None],
        on_result: Callable[[str], None],
        *,
        extra_files: Callable[[], Iterable[str]] = lambda: (),
        poll_seconds: float = DEFAULT_POLL_SECONDS,
    ) -> None:
        self.reactor = reactor
        self.path = path
        self.load = load
        self.apply = apply
        self.on_result = on_result
        self.extra_files = extra_files
        self.poll_seconds = poll_seconds
        self._poller: LoopingCall | None = None
        self._seen = self._signatures()

    def _signatures(self) -> tuple[Any, ...]:
        return tuple(file_signature(p) for p in (self.path, *self.extra_files()))

    def start(self) -> None:
        """Start watching the files (every ``poll_seconds``)."""
        if self._poller is None:
            self._poller = LoopingCall(self._poll)
            self._poller.clock = self.reactor
            self._poller.start(self.poll_seconds, now=False)

    def stop(self) -> None:
        """Stop watching."""
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._poller = None

    def _poll(self) -> None:
        seen = self._signatures()
        if seen != self._seen:
            self._seen = seen
            if seen[0] is None:
                return  # mid-swap, or removed: keep running on what we have; the next version is picked up
            self.reload("the configuration file changed")

    def reload(self, why: str = "SIGHUP") -> bool:
        """Load the file and apply it; True if applied. Never raises: a refusal is one log line."""
        self._seen = self._signatures()
        log.info("reloading the configuration from {path} ({why})", path=self.path, why=why)
        try:
            config = self.load(self.path)
            self.apply(config)
        except (ConfigError, ReloadError, ValueError) as e:
            log.error(
                "configuration reload ({why}) refused, the running configuration stays: {error}",
                why=why, error="; ".join(getattr(e, "lines", None) or [str(e)]), key=getattr(e, "key_path", None),
                path=self.path,
            )
            self.on_result("error")
            return False
        except Exception:
            log.failure("configuration reload ({why}) failed, the running configuration stays", why=why)
            self.on_result("error")
            return False
        self._seen = self._signatures()  # the applied configuration may watch other files
        self.on_result("ok")
        return True


def take_process_control(reactor: Any, hangup: Callable[[], object], reloader: Reloader[Any] | None) -> None:
    """As the process (twistd): SIGTERM/SIGINT stop the reactor (the services drain), SIGHUP calls ``hangup``,
    and ``reloader`` (if any) starts watching the configuration file."""
    install_signal_handlers(reactor, lambda: stop_reactor(reactor), hangup)
    if reloader is not None:
        reloader.start()


def reload_now(reloader: Reloader[Any] | None) -> bool:
    """SIGHUP: reload through ``reloader`` now; False if it refused the file, or (logged) there is no file to
    reload because the process started on embedded defaults."""
    if reloader is None:
        log.warn("SIGHUP: no configuration file to reload (started on embedded defaults)")
        return False
    return reloader.reload()


def log_restart_needed(keys: Sequence[str]) -> None:
    """One log line naming changed keys that only a restart applies."""
    if keys:
        log.warn(
            "configuration keys changed that need a restart (the running values stay): {keys}",
            keys=", ".join(keys),
        )


def install_signal_handlers(reactor: Any, terminate: Callable[[], object], hangup: Callable[[], object]) -> None:
    """Once the reactor runs (after Twisted's own handlers are in place): SIGTERM calls ``terminate`` and
    SIGHUP calls ``hangup``, both in the reactor thread.

    Twisted's SIGTERM handler would make twistd end by re-raising the signal (status -15) after the drain; ours
    lets it exit 0.
    """

    def install() -> None:
        signal.signal(signal.SIGTERM, lambda _n, _f: reactor.callFromThread(terminate))
        signal.signal(signal.SIGHUP, lambda _n, _f: reactor.callFromThread(hangup))

    reactor.callWhenRunning(install)


def stop_reactor(reactor: Any) -> None:
    """SIGTERM: log and stop the reactor (the services' ``stopService`` drains before it ends); a second
    SIGTERM during the drain changes nothing."""
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        log.info("SIGTERM again: the drain goes on")
        return
    log.info("SIGTERM: draining, then exiting")
