"""Tenant isolation under attack, over SOCKS5: every (token tenant, location) pair reaches exactly its own
backend, or is refused with the SAP answer; never another tenant's backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.protocol import Protocol

from connproxy.pki.tokens import issue_token, load_or_create_signing_key
from tests.harness import Stack, serve, socks_connect, tcp_rule, wait_for

TENANTS = ("tenant-a", "tenant-b", "tenant-c")
LOCATIONS = ("", "loc-2")
CLIENT = "sb-app!t1"


class Name(Protocol):
    """Says which backend it is, then closes."""

    def connectionMade(self) -> None:
        self.transport.write(self.factory.name)  # type: ignore[attr-defined]
        self.transport.loseConnection()


def authorization(tokens: Path, **extra: Any) -> dict[str, Any]:
    load_or_create_signing_key(tokens)
    return {
        "servers": {"proxy": {
            "socks5": {"enableProxyAuthorization": True},
            "authorization": {"oauth": {"allowedClientId": CLIENT, "tokenKeysFile": str(tokens / "token_keys.json")}},
        }},
        **extra,
    }


async def reach(stack: Stack, token: str, location: str) -> tuple[int, bytes]:
    client, reply = await socks_connect(stack.socks_port, "svc.internal", 1, token=token, location=location)
    if reply == 0:
        await client.eof
        client.transport.loseConnection()
        await client.done
    elif client.transport.connected:
        client.transport.loseConnection()
        await client.done
    return reply, bytes(client.keep or b"")


@pytest_twisted.ensureDeferred
async def test_isolation_matrix_shared_mode(stack: Stack, tmp_path: Path, log_text: list[str]) -> None:
    tokens = tmp_path / "tokens"
    stack.start_proxy(**authorization(tokens, tenantMode="shared"))
    for tenant in TENANTS:
        for location in LOCATIONS:
            name = f"{tenant}/{location or 'default'}".encode()
            backend = await serve(Name, name=name)
            stack.ports.append(backend)
            stack.start_connector(subaccount=tenant, location=location, bind_location=True,
                                  connector_id=f"{tenant}-{location or 'default'}",
                                  access=[tcp_rule("svc.internal", 1, backend.getHost().port)])
    await wait_for(lambda: stack.proxy.registry.count() == 6, timeout=10)
    for tenant in TENANTS:
        token = issue_token(tokens, tenant, CLIENT)
        for location in (*LOCATIONS, "loc-9"):
            reply, seen = await reach(stack, token, location)
            if location == "loc-9":
                assert reply == 0x03  # no connector for that tenant and location
            else:
                assert reply == 0
                assert seen == f"{tenant}/{location or 'default'}".encode()
    # A tenant with no connector at all, a wrong client id, a token from a foreign key, no token.
    assert (await reach(stack, issue_token(tokens, "tenant-d", CLIENT), ""))[0] == 0x03
    assert (await reach(stack, issue_token(tokens, "tenant-a", "other-client"), ""))[0] == 0x05
    foreign = issue_token(tmp_path / "foreign", "tenant-a", CLIENT)
    assert (await reach(stack, foreign, ""))[0] == 0x05
    assert (await reach(stack, "", ""))[0] == 0x05
    expired = issue_token(tokens, "tenant-a", CLIENT, ttl=1, now=1_000_000)
    assert (await reach(stack, expired, ""))[0] == 0x05
    reasons = [line.split('"reason":"')[1].split('"')[0] for line in stack.audit if '"frontEnd":"socks5"' in line]
    assert reasons == ["client_not_allowed", "unknown_key", "missing", "expired"]
    everything = "".join(stack.audit) + "".join(log_text)
    assert len(log_text) > 10
    for token in (foreign, expired, issue_token(tokens, "tenant-a", "other-client")):
        assert token.split(".")[2] not in everything  # no signature, hence no token, in audit lines or logs


@pytest_twisted.ensureDeferred
async def test_dedicated_mode_refuses_token_of_other_tenant(stack: Stack, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    stack.start_proxy(**authorization(tokens, tenantMode="dedicated", subaccountId="tenant-a"))
    backend = await serve(Name, name=b"tenant-a")
    stack.ports.append(backend)
    connector = stack.start_connector(subaccount="tenant-a", access=[tcp_rule("svc.internal", 1, backend.getHost().port)])
    await connector.when_up()
    assert await reach(stack, issue_token(tokens, "tenant-a", CLIENT), "") == (0, b"tenant-a")
    assert (await reach(stack, issue_token(tokens, "tenant-b", CLIENT), ""))[0] == 0x05


@pytest_twisted.ensureDeferred
async def test_trusted_shared_mode_takes_tenant_from_the_socks_token(stack: Stack, tmp_path: Path) -> None:
    """Authorization off, shared mode: the 0x80 token names the tenant (it is not verified: trusted mode)."""
    tokens = tmp_path / "tokens"
    stack.start_proxy(tenantMode="shared")
    for tenant in ("tenant-a", "tenant-b"):
        backend = await serve(Name, name=tenant.encode())
        stack.ports.append(backend)
        stack.start_connector(subaccount=tenant, connector_id=tenant,
                              access=[tcp_rule("svc.internal", 1, backend.getHost().port)])
    await wait_for(lambda: stack.proxy.registry.count() == 2, timeout=10)
    assert await reach(stack, issue_token(tokens, "tenant-b", "any"), "") == (0, b"tenant-b")
    assert await reach(stack, issue_token(tokens, "tenant-a", "any"), "") == (0, b"tenant-a")
    assert (await reach(stack, "", ""))[0] == 0x05  # no token: no tenant


async def http_get(stack: Stack, token: str | None, location: str) -> tuple[int, bytes]:
    import os

    from twisted.internet.utils import getProcessOutputAndValue

    args = ["-sS", "--max-time", "10", "-x", f"http://127.0.0.1:{stack.http_port}", "-w", "\n%{http_code}"]
    if token is not None:
        args += ["-H", f"Proxy-Authorization: Bearer {token}"]
    if location:
        args += ["-H", f"SAP-Connectivity-SCC-Location_ID: {location}"]
    out, err, code = await getProcessOutputAndValue("curl", [*args, "http://svc.internal/"], env=os.environ)
    assert code == 0, err
    body, _, status = out.rpartition(b"\n")
    return int(status), body


@pytest_twisted.ensureDeferred
async def test_isolation_matrix_over_http(stack: Stack, tmp_path: Path, log_text: list[str]) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.server import Site
    from twisted.web.static import Data

    tokens = tmp_path / "tokens"
    load_or_create_signing_key(tokens)
    stack.start_proxy(tenantMode="shared", servers={"proxy": {
        "http": {"enabled": True, "enableProxyAuthorization": True},
        "authorization": {"oauth": {"allowedClientId": CLIENT, "tokenKeysFile": str(tokens / "token_keys.json")}},
    }})
    for tenant in TENANTS:
        for location in LOCATIONS:
            name = f"{tenant}/{location or 'default'}".encode()
            leaf = Data(name, "text/plain")
            leaf.isLeaf = True
            web = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(leaf))
            stack.ports.append(web)
            stack.start_connector(
                subaccount=tenant, location=location, bind_location=True, connector_id=f"{tenant}-{location}",
                access=[{"virtualHost": "svc.internal", "virtualPort": 80, "internalHost": "127.0.0.1",
                         "internalPort": web.getHost().port, "protocol": "HTTP",
                         "resources": [{"path": "/", "allSubPaths": True}]}])
    await wait_for(lambda: stack.proxy.registry.count() == 6, timeout=10)
    for tenant in TENANTS:
        token = issue_token(tokens, tenant, CLIENT)
        for location in LOCATIONS:
            assert await http_get(stack, token, location) == (200, f"{tenant}/{location or 'default'}".encode())
        status, body = await http_get(stack, token, "loc-9")
        assert status == 503 and b"no connector" in body
    assert (await http_get(stack, None, ""))[0] == 407
    assert (await http_get(stack, issue_token(tokens, "tenant-a", "other"), ""))[0] == 407
    assert (await http_get(stack, issue_token(tmp_path / "foreign", "tenant-a", CLIENT), ""))[0] == 407
    assert (await http_get(stack, "a.b.c", ""))[0] == 407
    stranger = issue_token(tokens, "tenant-d", CLIENT)
    assert (await http_get(stack, stranger, ""))[0] == 503
    wrong_client = issue_token(tokens, "tenant-a", "other")
    assert (await http_get(stack, wrong_client, ""))[0] == 407
    everything = "".join(stack.audit) + "".join(log_text)
    for token in (stranger, wrong_client):
        assert token.split(".")[2] not in everything
