"""Several replicas and reconnects with real processes: twistd replicas and connectors on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from connproxy.pki.certs import mint_test_pki
from tests.ha_harness import Fleet, reactor
from tests.harness import wait_for

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
        assert since_restart < 5.0
        assert since_listening < 3.0
    assert connector.count(b"Traceback") == 0
