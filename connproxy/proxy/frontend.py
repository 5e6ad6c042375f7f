"""What every application-facing front end (SOCKS5, HTTP) shares: its factory's collaborators and settings."""

from __future__ import annotations

from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory

from connproxy.obs import audit
from connproxy.proxy.routing import Router


class Authorizing(TypingProtocol):
    """What the front ends need of :class:`connproxy.proxy.auth.Authorizer`."""

    def authorize(self, *, proxy_token: str | None, service_token: str | None = None) -> Deferred[Any]:
        """Fire with a caller (``.tenant``, ``.client_id``) or fail with an ``AuthError``."""


class FrontEndFactory(Factory):
    """Base of the front ends' factories.

    :param router: hands out tunnel endpoints for (tenant, location, target).
    :param authorizer: decides who calls, for which tenant.
    :param clock: the injected reactor time for every timer of the front end's connections.
    :param authorization_enabled: whether this front end requires a token (``enableProxyAuthorization``).
    :param idle_timeout: seconds a connection may stay without traffic either way before it is closed.
    :param audit_writer: where refused calls are audited (``None``: stdout).
    """

    def __init__(
        self,
        router: Router,
        authorizer: Authorizing,
        clock: IReactorTime,
        *,
        authorization_enabled: bool,
        idle_timeout: float = 3600.0,
        audit_writer: audit.AuditWriter | None = None,
    ) -> None:
        self.router = router
        self.authorizer = authorizer
        self.clock = clock
        self.authorization_enabled = authorization_enabled
        self.idle_timeout = idle_timeout
        self.audit_writer = audit_writer
