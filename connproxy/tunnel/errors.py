"""Failures a tunnel stream open can end in (the front ends' answers to them are in
:mod:`connproxy.proxy.replies`)."""

from __future__ import annotations

from twisted.internet.error import ConnectionLost

from connproxy.wire.errors import ErrorCode


class TunnelOpenError(Exception):
    """Base class: a stream through a tunnel could not be opened."""


class NoConnectorError(TunnelOpenError):
    """No connector serves the (tenant, location) pair."""

    def __init__(self, tenant: str, location: str) -> None:
        super().__init__(f"no connector for subaccount {tenant}, location {location or '(default)'}")
        self.tenant = tenant
        self.location = location


class TenantStreamLimitError(TunnelOpenError):
    """The tenant already has ``limit`` streams open over its tunnels (``maxStreamsPerTenant``): refused by the
    proxy before any tunnel is asked."""

    def __init__(self, tenant: str, open_streams: int, limit: int) -> None:
        super().__init__(
            f"subaccount {tenant} has {open_streams} streams open, the limit is "
            f"servers.businessDataTunnel.maxStreamsPerTenant={limit}"
        )
        self.tenant = tenant
        self.open_streams = open_streams
        self.limit = limit


class StreamRefusedError(TunnelOpenError):
    """The connector refused the stream with a RESET ``code`` (access denied, backend unreachable ...)."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}" if reason else code.name)
        self.code = code
        self.reason = reason


class OpenTimeoutError(TunnelOpenError):
    """The connector answered neither ACCEPT nor RESET in time."""


class TunnelLostError(TunnelOpenError):
    """The tunnel went away while the stream was being opened."""


class StreamResetError(ConnectionLost):
    """An established stream was reset by the peer (a connection-lost reason for the relay)."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(f"stream reset: {code.name} {reason}".strip())
        self.code = code
        self.reason = reason
