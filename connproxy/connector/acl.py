# -*- test-case-name: tests.unit.test_acl -*-
"""Access-rule evaluation, run for every stream: which ``accessControl`` rule serves a virtual host and port, which
internal port a virtual port maps to, and which resource admits a request path.

The configuration (:mod:`connproxy.config`) holds the rules as data and judges configured paths; the path rule
itself (:func:`connproxy.config.path_problem`: ``.``/``..`` segments, also percent-encoded, Unicode-normalised or
in non-standard escapes) is shared, so that a path the configuration would refuse as a resource is refused as a
request too. :func:`connproxy.connector.access.decide` is the one caller that makes the access decision.
"""

from __future__ import annotations

from connproxy.config import AccessRule, ConnectorConfig, Resource, normalize_host, path_problem

__all__ = ["allows_path", "find_rule", "internal_port_for", "request_path_problem", "resource_allows", "rule_matches"]


def rule_matches(rule: AccessRule, host: str, port: int) -> bool:
    """Whether ``host:port`` is ``rule``'s virtual host (case-insensitive for names, IP literals compared
    canonically) and in its virtual port range."""
    return rule.virtual_ports[0] <= port <= rule.virtual_ports[1] and _normal(host) == _normal(rule.virtual_host)


#: Canonical forms of hosts seen (:func:`connproxy.config.normalize_host` parses IP literals with ``ipaddress``,
#: which cost 6 % of the connector's CPU per HTTP request when run per rule and request). Bounded: cleared when
#: full.
_NORMAL: dict[str, str] = {}
_NORMAL_MAX = 4096


def _normal(host: str) -> str:
    normal = _NORMAL.get(host)
    if normal is None:
        if len(_NORMAL) >= _NORMAL_MAX:
            _NORMAL.clear()
        normal = _NORMAL[host] = normalize_host(host)
    return normal


#: The rules of the last ``access_control`` tuple seen, by canonical virtual host, in configuration order (the
#: tuple is kept, so its identity stands for its content: configurations are immutable).
_index: tuple[tuple[AccessRule, ...], dict[str, list[AccessRule]]] | None = None


def _rules_by_host(rules: tuple[AccessRule, ...]) -> dict[str, list[AccessRule]]:
    global _index
    index = _index
    if index is not None and index[0] is rules:
        return index[1]
    by_host: dict[str, list[AccessRule]] = {}
    for rule in rules:
        by_host.setdefault(_normal(rule.virtual_host), []).append(rule)
    _index = (rules, by_host)
    return by_host


def find_rule(config: ConnectorConfig, host: str, port: int) -> AccessRule | None:
    """The access rule for virtual ``host:port`` (the first in configuration order), or ``None`` (access
    denied)."""
    rules = config.access_control
    if type(rules) is not tuple:  # a list (tests build configurations by hand): no index
        for rule in rules:
            if rule_matches(rule, host, port):
                return rule
        return None
    for rule in _rules_by_host(rules).get(_normal(host), ()):
        if rule.virtual_ports[0] <= port <= rule.virtual_ports[1]:
            return rule
    return None


def internal_port_for(rule: AccessRule, port: int) -> int:
    """The internal port a virtual ``port`` maps to (same offset into the range).

    :raises ValueError: ``port`` is outside the rule's virtual port range.
    """
    first, last = rule.virtual_ports
    if not first <= port <= last:
        raise ValueError(f"port {port} is outside the virtual port range {first}-{last}")
    return rule.internal_ports[0] + (port - first)


def resource_allows(resource: Resource, path: str) -> bool:
    """Whether ``resource`` admits ``path`` (a query-free path already checked by :func:`request_path_problem`).

    Exact, case-sensitive match; with ``all_sub_paths`` also everything below it on a segment boundary (``/api``
    admits ``/api`` and ``/api/x`` but not ``/apix``).
    """
    if path == resource.path:
        return True
    if not resource.all_sub_paths:
        return False
    prefix = resource.path if resource.path.endswith("/") else resource.path + "/"
    return path.startswith(prefix)


def request_path_problem(target: str) -> str | None:
    """Why the origin-form request ``target`` is refused before any resource is consulted, or ``None``.

    A fragment (``#``) never belongs in a request target (a backend that does not cut it off might normalise
    ``/api#/../admin`` to ``/admin``); the path (query cut off; ``""`` counts as ``/``) must start with ``/`` and
    pass :func:`connproxy.config.path_problem`.
    """
    if "#" in target:
        return "a fragment in the request target"
    path = target.split("?", 1)[0] or "/"
    if not path.startswith("/"):
        return "not an origin-form path"
    return path_problem(path)


def allows_path(rule: AccessRule, target: str) -> Resource | None:
    """The first resource of ``rule`` that admits the request ``target``, or ``None`` (access denied).

    The query string is ignored. Targets refused by :func:`request_path_problem` are never admitted. Matching is
    case-sensitive and on the path as sent (write percent-encoded characters in resources the same way). TCP
    rules have no resources, so this returns ``None`` for them.
    """
    if request_path_problem(target) is not None:
        return None
    path = target.split("?", 1)[0] or "/"
    for resource in rule.resources:
        if resource_allows(resource, path):
            return resource
    return None
