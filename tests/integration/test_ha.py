"""Several replicas and reconnects with real processes: twistd replicas and connectors on 127.0.0.1."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks

from connproxy.testing import mint_test_pki
from tests.ha_harness import NGINX, Fleet, Replica, SniRouter, reactor
from tests.harness import Echo, free_port, serve, socks_connect, tcp_rule, wait_for
from tests.http_harness import http_rule, serve_http

REGISTERED = b"registered for subaccount"
LISTENING = b"tunnel listener listening on"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp=tmp_path, pki=mint_test_pki())
    yield f
    pytest_twisted.blockon(f.stop())


@pytest_twisted.inlineCallbacks
def test_connector_is_back_within_seconds_after_the_proxy_is_killed_and_restarted(fleet: Fleet) -> Iterator[Any]:
    """SIGKILL the proxy (the kernel closes the tunnel: the connector sees it at once) and start it again, at once
    and after an outage of 4 s: the connector registers again shortly after the new process listens, with the
    default ``reconnect`` settings."""
    (replica,) = fleet.add_replicas(1)
    child = fleet.start_replica(replica)
    connector = fleet.start_connector(fleet.connector_config("c1", replica.tunnel_port, []))
    yield wait_for(lambda: child.count(REGISTERED) == 1, timeout=30)
    measured = []
    for outage in (0.0, 4.0):
        fleet.kill(child)
        killed_at = reactor.seconds()
        yield child.ended
        if outage:
            d: Deferred[None] = Deferred()
            reactor.callLater(outage, d.callback, None)
            yield d
        restarted_at = reactor.seconds()
        child = fleet.start_replica(replica)
        yield wait_for(lambda c=child: c.count(LISTENING) == 1, timeout=30)
        listening_at = reactor.seconds()
        yield wait_for(lambda c=child: c.count(REGISTERED) == 1, timeout=30)
        back_at = reactor.seconds()
        measured.append((outage, back_at - killed_at, back_at - restarted_at, back_at - listening_at))
    for outage, since_kill, since_restart, since_listening in measured:
        print(f"outage {outage:.0f}s: connector registered {since_kill:.2f}s after SIGKILL, "
              f"{since_restart:.2f}s after the restart, {since_listening:.2f}s after the listener was up")
        # The connector's part is the time after the listener is up; the process start (1-4 s on a loaded
        # machine) is Python's.
        assert since_listening < 4.0  # at most reconnect.maxDelaySeconds (2 s) plus a handshake
        assert since_restart < 10.0
    assert connector.count(b"Traceback") == 0


# ------------------------------------------------------------------------------------------------ several replicas

needs_nginx = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed (.ci/run installs it)")


def registered_on(replica: Replica, *connector_ids: str) -> bool:
    """Whether every connector in ``connector_ids`` registered on ``replica``'s current process."""
    child = replica.child
    return child is not None and all(
        child.count(b"connector " + c.encode() + b" registered") >= 1 for c in connector_ids
    )


@inlineCallbacks
def echo_once(port: int, size: int = 2048) -> Iterator[Deferred[Any]]:
    """One SOCKS5 exchange through a replica: connect, send ``size`` bytes, read them back, close."""
    client, reply = yield socks_connect(port, "echo.internal", 7)
    if reply != 0:
        raise AssertionError(f"SOCKS reply {reply} from port {port}")
    assert client.transport is not None
    client.transport.write(b"x" * size)
    yield wait_for(lambda: client.received >= size, timeout=10)
    client.transport.loseConnection()
    yield client.done


@inlineCallbacks
def slow_echo(port: int, pieces: int = 8, interval: float = 0.25, size: int = 1024) -> Iterator[Deferred[Any]]:
    """One SOCKS5 stream that stays open for ``pieces * interval`` seconds, sending ``size`` bytes at a time and
    waiting for each to come back: a stream still in flight when its replica is told to stop."""
    client, reply = yield socks_connect(port, "echo.internal", 7)
    if reply != 0:
        raise AssertionError(f"SOCKS reply {reply} from port {port}")
    assert client.transport is not None
    for n in range(1, pieces + 1):
        client.transport.write(b"y" * size)
        yield wait_for(lambda n=n: client.received >= n * size, timeout=10)
        yield sleep(interval)
    client.transport.loseConnection()
    yield client.done


def http_get_once(port: int) -> Deferred[None]:
    """One HTTP request through a replica's HTTP proxy (``Connection: close``), in a thread; fails unless 200."""
    from twisted.internet.threads import deferToThread

    from tests.http_harness import parse_response, raw_exchange

    def get() -> None:
        raw = raw_exchange(port, b"GET http://web.internal/roll HTTP/1.1\r\nHost: web.internal\r\n"
                                 b"Connection: close\r\n\r\n")
        status = parse_response(raw)[0] if raw else 0
        if status != 200:
            raise AssertionError(f"HTTP {status} from port {port}")

    return deferToThread(get)


class Load:
    """Workers doing :func:`echo_once` (or ``exchange``) round-robin over some replicas until stopped (bounded in
    count)."""

    def __init__(self, ports: list[int], workers: int = 4, limit: int = 5000,
                 exchange: Callable[[int], Deferred[Any]] | None = None) -> None:
        self.exchange = exchange or echo_once
        self.ports = ports
        self.ok = 0
        self.failures: list[str] = []
        self.running = True
        self.limit = limit
        self.done = [self._worker(n) for n in range(workers)]

    @inlineCallbacks
    def _worker(self, n: int) -> Iterator[Deferred[Any]]:
        i = n
        while self.running and self.ok + len(self.failures) < self.limit:
            port = self.ports[i % len(self.ports)]
            i += 1
            try:
                yield self.exchange(port)
                self.ok += 1
            except Exception as e:
                self.failures.append(f"port {port}: {e!r}")

    @inlineCallbacks
    def stop(self) -> Iterator[Deferred[Any]]:
        self.running = False
        yield from self.done


def sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@needs_nginx
@pytest_twisted.inlineCallbacks
def test_three_replicas_behind_nginx_path_mode(fleet: Fleet) -> Iterator[Any]:
    """Three replicas behind NGINX (TLS with client certificates, routing by path, the certificate forwarded in
    ``ssl-client-cert``), two connectors with a tunnel to every replica; a replica SIGKILLed under load costs the
    others nothing; restarted, it has both connectors again within 5 s."""
    echo = yield serve(Echo)
    try:
        nginx_port = free_port()
        replicas = fleet.add_replicas(3, mode="path", external_port=nginx_port)
        for r in replicas:
            fleet.start_replica(r)
        nginx = fleet.start_nginx(nginx_port)
        yield wait_for(lambda: (fleet.tmp / "nginx.pid").exists(), timeout=20)
        access = [tcp_rule("echo.internal", 7, echo.getHost().port)]
        for name in ("c1", "c2"):
            fleet.start_connector(fleet.connector_config(
                name, nginx_port, access, proxy={"highAvailabilityMode": "path"}))
        yield wait_for(lambda: all(registered_on(r, "c1", "c2") for r in replicas), timeout=40)
        for r in replicas:
            yield echo_once(r.socks_port)

        # The header NGINX sets, sent straight to a replica from an address outside trustedSources: refused.
        from tests.integration.test_ha_ingress import ask, upgrade

        cert, _key = fleet.pki.connector("tenant-a", None)
        answer = yield ask(replicas[0].ingress_port, upgrade(
            "/connectivity-proxy-0", {"ssl-client-cert": quote(cert.decode(), safe="")}), source="127.0.0.2")
        assert answer.startswith(b"HTTP/1.1 403 ")
        yield wait_for(lambda: replicas[0].child is not None
                       and replicas[0].child.count(b"tunnel handshake failure") == 1)
        assert b"untrusted address 127.0.0.2" in bytes(replicas[0].child.output)

        # Under load on replicas 0 and 2, kill replica 1.
        load = Load([replicas[0].socks_port, replicas[2].socks_port])
        yield wait_for(lambda: load.ok >= 20, timeout=30)
        victim = replicas[1]
        assert victim.child is not None
        fleet.kill(victim.child)
        yield victim.child.ended
        before = load.ok
        yield sleep(3.0)
        assert load.ok > before  # the others kept serving
        restarted_at = reactor.seconds()
        child = fleet.start_replica(victim)
        yield wait_for(lambda: child.count(b"ingress listener (plain HTTP) listening on") == 1, timeout=30)
        listening_after = reactor.seconds() - restarted_at
        yield wait_for(lambda: registered_on(victim, "c1", "c2"), timeout=30)
        back_after = reactor.seconds() - restarted_at
        yield load.stop()
        print(f"replica restarted: both connectors registered {back_after:.2f}s after the restart "
              f"({back_after - listening_after:.2f}s after it listened); "
              f"{load.ok} exchanges under load, {len(load.failures)} failed")
        assert load.failures == []
        # The connectors' part: at most reconnect.maxDelaySeconds (2 s) plus a handshake; the process start is Python's.
        assert back_after - listening_after < 4.0
        assert back_after < 10.0
        yield echo_once(victim.socks_port)
        assert not nginx.ended.called
        assert b"[emerg]" not in (fleet.tmp / "nginx-error.log").read_bytes()
    finally:
        yield echo.stopListening()


@pytest.fixture
def sni_fleet(tmp_path: Path) -> Iterator[Fleet]:
    hosts = ("localhost", "127.0.0.1", *(f"connectivity-proxy-{n}.localhost" for n in range(3)))
    f = Fleet(tmp=tmp_path, pki=mint_test_pki(hosts))
    yield f
    pytest_twisted.blockon(f.stop())


@pytest_twisted.inlineCallbacks
def test_three_replicas_subdomain_mode_through_an_sni_router(sni_fleet: Fleet) -> Iterator[Any]:
    """``subdomain``: TLS passed through by SNI ``connectivity-proxy-<n>.localhost``, mutual TLS end to end."""
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.protocol import Factory

    fleet = sni_fleet
    echo = yield serve(Echo)
    router_port = free_port()
    replicas = fleet.add_replicas(3, mode="subdomain", external_port=router_port)
    routes = {f"{r.name}.localhost": r.tunnel_port for r in replicas}
    default = [r.tunnel_port for r in replicas]
    router = yield TCP4ServerEndpoint(reactor, router_port, interface="127.0.0.1").listen(
        Factory.forProtocol(lambda: SniRouter(routes, default)))
    try:
        for r in replicas:
            fleet.start_replica(r)
        yield wait_for(lambda: all(r.child is not None and r.child.count(LISTENING) == 1 for r in replicas),
                       timeout=40)
        fleet.start_connector(fleet.connector_config(
            "c1", router_port, [tcp_rule("echo.internal", 7, echo.getHost().port)],
            proxy={"highAvailabilityMode": "subdomain"}))
        yield wait_for(lambda: all(registered_on(r, "c1") for r in replicas), timeout=40)
        for r in replicas:
            yield echo_once(r.socks_port)
            assert r.child is not None and r.child.count(REGISTERED) == 1  # exactly one tunnel per replica
    finally:
        yield router.stopListening()
        yield echo.stopListening()


@needs_nginx
@pytest_twisted.inlineCallbacks
def test_rolling_restart_of_three_replicas_loses_nothing(fleet: Fleet) -> Iterator[Any]:
    """A rolling restart as the StatefulSet does it: each replica in turn leaves the Service's endpoints (readiness
    false; here: the load stops choosing it), gets SIGTERM, drains (its streams in flight finish, GOAWAY sends the
    connectors elsewhere), exits 0, is started again and has both connectors back before the next one goes. Under
    steady SOCKS5 and HTTP load through the replicas no exchange fails, and a SOCKS5 stream still open on the
    replica when it gets SIGTERM is carried to its end by the drain."""
    echo = yield serve(Echo)
    web = yield serve_http()
    try:
        nginx_port = free_port()
        replicas = fleet.add_replicas(3, mode="path", external_port=nginx_port,
                                      shutdown={"drainTimeoutSeconds": 5})
        for r in replicas:
            fleet.start_replica(r)
        fleet.start_nginx(nginx_port)
        access = [tcp_rule("echo.internal", 7, echo.getHost().port), http_rule("web.internal", 80, web.getHost().port)]
        for name in ("c1", "c2"):
            fleet.start_connector(fleet.connector_config(
                name, nginx_port, access, proxy={"highAvailabilityMode": "path"}))
        yield wait_for(lambda: all(registered_on(r, "c1", "c2") for r in replicas), timeout=40)
        load = Load([r.socks_port for r in replicas], limit=20000)
        http_load = Load([r.http_port for r in replicas], workers=2, limit=20000, exchange=http_get_once)
        yield wait_for(lambda: load.ok >= 20 and http_load.ok >= 10, timeout=30)
        exits = []
        in_flight = []
        for victim in replicas:
            # A stream opened on the victim that lasts 2 s: the SIGTERM comes 0.5 s into it.
            in_flight.append(slow_echo(victim.socks_port))
            load.ports = [r.socks_port for r in replicas if r is not victim]  # out of the Service's endpoints
            http_load.ports = [r.http_port for r in replicas if r is not victim]
            yield sleep(0.5)  # exchanges already started on the victim are in flight now, or done
            assert victim.child is not None
            fleet.kill(victim.child, signal.SIGTERM)
            reason = yield victim.child.ended
            exits.append(getattr(reason, "exitCode", None))
            child = fleet.start_replica(victim)
            yield wait_for(lambda v=victim: registered_on(v, "c1", "c2"), timeout=40)
            assert child is victim.child
            load.ports = [r.socks_port for r in replicas]
            http_load.ports = [r.http_port for r in replicas]
        yield sleep(1.0)
        yield load.stop()
        yield http_load.stop()
        drained = yield DeferredList(in_flight, consumeErrors=True)
        sent = load.ok + len(load.failures) + http_load.ok + len(http_load.failures)
        print(f"rolling restart of 3 replicas: {sent} exchanges sent ({load.ok + len(load.failures)} SOCKS5, "
              f"{http_load.ok + len(http_load.failures)} HTTP), {load.ok + http_load.ok} succeeded, "
              f"{len(load.failures) + len(http_load.failures)} failed; streams open at SIGTERM carried to the end: "
              f"{sum(ok for ok, _ in drained)} of {len(drained)}; exit statuses {exits}")
        assert load.failures == [] and http_load.failures == []
        assert [ok for ok, _ in drained] == [True, True, True], drained
        assert exits == [0, 0, 0]
        assert load.ok > 100 and http_load.ok > 20
    finally:
        yield echo.stopListening()
        yield web.stopListening()
