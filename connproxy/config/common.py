"""Blocks both configurations share: ``tunnel``, ``logging``, ``shutdown`` and ``tls``, declared once and read once
(and the ``highAvailabilityMode`` value type)."""

from __future__ import annotations

from typing import Final

from connproxy.config.model import (
    HIGH_AVAILABILITY_MODES,
    LOG_FORMATS,
    LOG_LEVELS,
    LoggingConfig,
    ShutdownConfig,
    TlsFiles,
    TunnelTuning,
)
from connproxy.config.reader import Choice, Context, Custom, FilePath, Integer, Key, Seconds, Section, block

_MAX_WINDOW: Final = 2**31 - 1
_TUNNEL: Final = TunnelTuning()

TUNNEL_KEY: Final = block(
    "tunnel",
    "Tunnel protocol limits and timers (the same block in both configurations; see docs/tunnel-protocol.md).",
    Key("streamWindowBytes", Integer(65536, _MAX_WINDOW), _TUNNEL.stream_window_bytes,
        "Flow-control window of one stream: bytes a sender may have in flight on it."),
    Key("connectionWindowBytes", Integer(65536, _MAX_WINDOW), _TUNNEL.connection_window_bytes,
        "Flow-control window of the whole tunnel; at least streamWindowBytes."),
    Key("maxFrameBytes", Integer(16384, 16_777_215), _TUNNEL.max_frame_bytes, "Largest frame payload."),
    Key("maxStreams", Integer(1, _MAX_WINDOW), _TUNNEL.max_streams, "Streams open at once on one tunnel."),
    Key("pingIntervalSeconds", Seconds(), _TUNNEL.ping_interval_seconds, "Keepalive PING interval."),
    Key("deadAfterSeconds", Seconds(), _TUNNEL.dead_after_seconds,
        "A tunnel silent for this long is closed; greater than pingIntervalSeconds."),
    Key("openTimeoutSeconds", Seconds(), _TUNNEL.open_timeout_seconds,
        "How long the TLS connection and tunnel handshake, or opening one stream, may take."),
    Key("stallTimeoutSeconds", Seconds(), _TUNNEL.stall_timeout_seconds,
        "A stream whose buffered data makes no progress for this long is reset (STREAM_STALLED)."),
)

LOGGING_KEY: Final = block(
    "logging", "Log output (to standard output under twistd -n).",
    Key("format", Choice(LOG_FORMATS), LoggingConfig.format, "console lines or one JSON object per line."),
    Key("level", Choice(LOG_LEVELS), LoggingConfig.level, "Lowest level written."),
)

SHUTDOWN_KEY: Final = block(
    "shutdown", "The drain on SIGTERM.",
    Key("drainTimeoutSeconds", Seconds(), ShutdownConfig.drain_timeout_seconds,
        "Streams in flight may finish for this long; then they are reset and the process exits."),
)


def _read_high_availability_mode(section: Section, name: str, value: object) -> str:
    if value is False:  # an unquoted `off` is YAML 1.1 for false
        return "off"
    return str(Choice(HIGH_AVAILABILITY_MODES).read(section, name, value))


#: The type of ``highAvailabilityMode`` (proxy, top level) and ``proxy.highAvailabilityMode`` (connector).
HIGH_AVAILABILITY_MODE: Final = Custom(" | ".join(HIGH_AVAILABILITY_MODES), _read_high_availability_mode)


def read_tunnel(root: Section) -> TunnelTuning:
    """The ``tunnel`` block."""
    section = root.section("tunnel")
    return TunnelTuning(
        stream_window_bytes=section.get("streamWindowBytes"),
        connection_window_bytes=section.get("connectionWindowBytes"),
        max_frame_bytes=section.get("maxFrameBytes"),
        max_streams=section.get("maxStreams"),
        ping_interval_seconds=section.get("pingIntervalSeconds"),
        dead_after_seconds=section.get("deadAfterSeconds"),
        open_timeout_seconds=section.get("openTimeoutSeconds"),
        stall_timeout_seconds=section.get("stallTimeoutSeconds"),
    )


def read_logging(root: Section) -> LoggingConfig:
    """The ``logging`` block."""
    section = root.section("logging")
    return LoggingConfig(format=section.get("format"), level=section.get("level"))


def read_shutdown(root: Section) -> ShutdownConfig:
    """The ``shutdown`` block."""
    return ShutdownConfig(drain_timeout_seconds=root.section("shutdown").get("drainTimeoutSeconds"))


def tls_key(doc: str, ca_key: str, ca_doc: str) -> Key:
    """A ``tls`` block with ``certFile``, ``keyFile`` and the CA key ``ca_key``."""
    dev = "development PKI"
    return block(
        "tls", doc,
        Key("certFile", FilePath(), None, "PEM certificate (chain) presented to the peer.", default_text=dev),
        Key("keyFile", FilePath(), None, "PEM private key of certFile (unencrypted).", default_text=dev),
        Key(ca_key, FilePath(), None, ca_doc, default_text=dev),
    )


def read_tls(parent: Section, ca_key: str) -> TlsFiles:
    """A ``tls`` block (paths resolved against the configuration file's folder)."""
    section = parent.section("tls")
    return TlsFiles(cert_file=section.get("certFile"), key_file=section.get("keyFile"),
                    ca_file=section.get(ca_key))


def check_tunnel(tuning: TunnelTuning, context: Context) -> None:
    """``connectionWindowBytes >= streamWindowBytes``, ``deadAfterSeconds > pingIntervalSeconds``."""
    if tuning.connection_window_bytes < tuning.stream_window_bytes and not context.is_bad(
            "tunnel.connectionWindowBytes", "tunnel.streamWindowBytes"):
        context.report("tunnel.connectionWindowBytes",
                       "must be at least tunnel.streamWindowBytes "
                       f"({tuning.connection_window_bytes} < {tuning.stream_window_bytes})")
    if tuning.dead_after_seconds <= tuning.ping_interval_seconds and not context.is_bad(
            "tunnel.deadAfterSeconds", "tunnel.pingIntervalSeconds"):
        context.report("tunnel.deadAfterSeconds",
                       "must be greater than tunnel.pingIntervalSeconds "
                       f"({tuning.dead_after_seconds:g} <= {tuning.ping_interval_seconds:g})")


def check_tls_pair(tls: TlsFiles, path: str, context: Context) -> None:
    """``certFile`` and ``keyFile`` come in pairs."""
    if (tls.cert_file is None) != (tls.key_file is None) and not context.is_bad(path):
        context.report(path, "certFile and keyFile must be given together (or both left out for the development PKI)")
