# -*- test-case-name: tests.unit.test_fd_budget -*-
"""Fit the connection limits to the process's open-file limit (``RLIMIT_NOFILE``).

Every accepted connection is a file descriptor. The configured limits (``servers.proxy.clientConnection.
maxConnections`` per front end, ``servers.businessDataTunnel.maxConnections``: 10,000 each by default) only
protect the process if they are reached *before* the descriptors run out: past that, ``accept()`` fails with
EMFILE on every port at once, the tunnel port and the health check included. So, as the process (twistd), the
proxy first raises its soft open-file limit to the hard one (:func:`raise_nofile`), then, if the listeners'
limits together with :data:`RESERVED_FDS` still do not fit, lowers each in proportion (:func:`fit`) and says so in
one warning that names the keys and the limit to raise. The per-client limits are capped at the lowered totals.
"""

from __future__ import annotations

from collections.abc import Mapping

try:
    import resource
except ImportError:  # pragma: no cover - not on Unix
    resource = None  # type: ignore[assignment]

#: Descriptors kept out of the connection budget: listeners, the log and pid files, the metrics and probe
#: connections, token-key fetches, the connector's short-lived sockets during a reload.
RESERVED_FDS = 64


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard limit; return the soft limit now (``-1`` where it cannot be
    read). A refusal to raise (a container runtime that forbids it) leaves the limit as it was."""
    if resource is None:  # pragma: no cover - not on Unix
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return -1 if soft == resource.RLIM_INFINITY else int(soft)


def fit(limits: Mapping[str, int], nofile: int, reserved: int = RESERVED_FDS) -> dict[str, int]:
    """The limits (name to connections at once) scaled down in proportion so that together with ``reserved``
    they fit in ``nofile`` descriptors; unchanged when they fit already or ``nofile`` is unknown (``< 0``).
    Each stays at least 1."""
    total = sum(limits.values())
    budget = max(len(limits), nofile - reserved)
    if nofile < 0 or total <= budget:
        return dict(limits)
    return {name: max(1, value * budget // total) for name, value in limits.items()}
