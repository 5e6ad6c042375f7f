"""Unit tests for :class:`connproxy.proxy.registry.ConnectorRegistry` with fake tunnels."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.trial.unittest import SynchronousTestCase

from connproxy.proxy.registry import ConnectorRegistry, TunnelLimitError


@dataclass(eq=False)
class FakeTunnel:
    """What the registry needs of a tunnel (identity-compared, like the real ones)."""

    connector_id: str
    tenant: str = "tenant-a"
    location: str = ""
    load: int = 0
    routable: bool = True
    replaced_calls: int = 0

    def replaced(self) -> None:
        self.replaced_calls += 1
        self.routable = False


class PickTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = ConnectorRegistry()

    def test_unknown_key_picks_nothing(self) -> None:
        self.registry.register(FakeTunnel("c1", tenant="tenant-a"))
        self.assertIsNone(self.registry.pick("tenant-b", ""))
        self.assertIsNone(self.registry.pick("tenant-a", "loc-1"))

    def test_least_loaded_is_picked(self) -> None:
        busy = FakeTunnel("c1", load=5)
        idle = FakeTunnel("c2", load=1)
        middle = FakeTunnel("c3", load=3)
        for t in (busy, idle, middle):
            self.registry.register(t)
        self.assertIs(self.registry.pick("tenant-a", ""), idle)
        idle.load = 9
        self.assertIs(self.registry.pick("tenant-a", ""), middle)

    def test_equal_load_picks_the_first_registered(self) -> None:
        first, second = FakeTunnel("c1", load=2), FakeTunnel("c2", load=2)
        self.registry.register(first)
        self.registry.register(second)
        self.assertIs(self.registry.pick("tenant-a", ""), first)

    def test_unroutable_tunnels_are_skipped(self) -> None:
        draining = FakeTunnel("c1", load=0, routable=False)
        live = FakeTunnel("c2", load=7)
        self.registry.register(draining)
        self.registry.register(live)
        self.assertIs(self.registry.pick("tenant-a", ""), live)
        live.routable = False
        self.assertIsNone(self.registry.pick("tenant-a", ""))

    def test_keys_are_tenant_and_location(self) -> None:
        a_default = FakeTunnel("c1", tenant="tenant-a", location="")
        a_loc = FakeTunnel("c1", tenant="tenant-a", location="loc-1")
        b_default = FakeTunnel("c1", tenant="tenant-b", location="")
        for t in (a_default, a_loc, b_default):
            self.registry.register(t)
        # The same connector_id under different keys is not a replacement.
        self.assertEqual([t.replaced_calls for t in (a_default, a_loc, b_default)], [0, 0, 0])
        self.assertIs(self.registry.pick("tenant-a", ""), a_default)
        self.assertIs(self.registry.pick("tenant-a", "loc-1"), a_loc)
        self.assertIs(self.registry.pick("tenant-b", ""), b_default)
        self.assertEqual(self.registry.count(), 3)


class ReplacementTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.registry = ConnectorRegistry()

    def test_same_connector_id_replaces_the_old_tunnel(self) -> None:
        old = FakeTunnel("c1", load=0)
        new = FakeTunnel("c1", load=10)
        self.registry.register(old)
        self.registry.register(new)
        self.assertEqual(old.replaced_calls, 1)
        self.assertEqual(new.replaced_calls, 0)
        self.assertEqual(self.registry.tunnels(), [new])
        # Even though the old one is less loaded, it is gone from routing.
        self.assertIs(self.registry.pick("tenant-a", ""), new)

    def test_other_connectors_are_kept(self) -> None:
        other = FakeTunnel("c2")
        old, new = FakeTunnel("c1"), FakeTunnel("c1")
        for t in (other, old, new):
            self.registry.register(t)
        self.assertEqual(other.replaced_calls, 0)
        self.assertEqual(self.registry.count(), 2)
        self.assertCountEqual(self.registry.tunnels(), [other, new])

    def test_registering_the_same_tunnel_twice_neither_duplicates_nor_replaces(self) -> None:
        t = FakeTunnel("c1")
        self.registry.register(t)
        self.registry.register(t)
        self.assertEqual(t.replaced_calls, 0)
        self.assertEqual(self.registry.count(), 1)

    def test_unregister_after_replacement_is_harmless(self) -> None:
        old, new = FakeTunnel("c1"), FakeTunnel("c1")
        self.registry.register(old)
        self.registry.register(new)
        self.registry.unregister(old)  # the old tunnel's connectionLost arrives later
        self.assertEqual(self.registry.tunnels(), [new])
        self.assertIs(self.registry.pick("tenant-a", ""), new)

    def test_unregister_unknown_is_harmless(self) -> None:
        self.registry.unregister(FakeTunnel("never"))
        self.assertEqual(self.registry.count(), 0)

    def test_unregister_last_tunnel_empties_the_key(self) -> None:
        t = FakeTunnel("c1", location="loc-1")
        self.registry.register(t)
        self.registry.unregister(t)
        self.assertEqual(self.registry.count(), 0)
        self.assertEqual(self.registry.tunnels(), [])
        self.assertIsNone(self.registry.pick("tenant-a", "loc-1"))
        self.registry.unregister(t)  # twice: still harmless
        self.assertEqual(self.registry.count(), 0)


class IdentityLimitTests(SynchronousTestCase):
    """``maxTunnelsPerIdentity``: the certificate identity, not the connector id, is what is counted."""

    ID = ("tenant-a", None)  # a certificate binding no location

    def setUp(self) -> None:
        self.registry = ConnectorRegistry(max_tunnels_per_identity=2)

    def test_distinct_connector_ids_beyond_the_limit_are_refused(self) -> None:
        a, b, c = FakeTunnel("c1"), FakeTunnel("c2"), FakeTunnel("c3")
        self.registry.register(a, identity=self.ID)
        self.registry.register(b, identity=self.ID)
        with self.assertRaises(TunnelLimitError) as caught:
            self.registry.register(c, identity=self.ID)
        self.assertIn("maxTunnelsPerIdentity=2", str(caught.exception))
        self.assertEqual((caught.exception.held, caught.exception.limit), (2, 2))
        # Nothing changed: the refused tunnel is not routable, the others are untouched.
        self.assertCountEqual(self.registry.tunnels(), [a, b])
        self.assertEqual([a.replaced_calls, b.replaced_calls], [0, 0])
        self.assertEqual(self.registry.identity_count(self.ID), 2)

    def test_other_locations_of_an_unbound_certificate_count_together(self) -> None:
        self.registry.register(FakeTunnel("c1", location="loc-1"), identity=self.ID)
        self.registry.register(FakeTunnel("c1", location="loc-2"), identity=self.ID)
        with self.assertRaises(TunnelLimitError):
            self.registry.register(FakeTunnel("c1", location="loc-3"), identity=self.ID)

    def test_other_identities_have_their_own_count(self) -> None:
        for cid in ("c1", "c2"):
            self.registry.register(FakeTunnel(cid), identity=self.ID)
        bound = FakeTunnel("c9", location="loc-9")
        self.registry.register(bound, identity=("tenant-a", "loc-9"))
        other_tenant = FakeTunnel("c1", tenant="tenant-b")
        self.registry.register(other_tenant, identity=("tenant-b", None))
        self.assertEqual(self.registry.count(), 4)

    def test_reconnect_of_the_same_connector_at_the_limit_replaces(self) -> None:
        old, other = FakeTunnel("c1"), FakeTunnel("c2")
        self.registry.register(old, identity=self.ID)
        self.registry.register(other, identity=self.ID)
        new = FakeTunnel("c1")
        self.registry.register(new, identity=self.ID)  # not refused: it takes old's place
        self.assertEqual(old.replaced_calls, 1)
        self.assertCountEqual(self.registry.tunnels(), [other, new])
        self.assertEqual(self.registry.identity_count(self.ID), 2)
        self.registry.unregister(old)  # its connectionLost, later: frees nothing twice
        self.assertEqual(self.registry.identity_count(self.ID), 2)
        with self.assertRaises(TunnelLimitError):
            self.registry.register(FakeTunnel("c3"), identity=self.ID)

    def test_a_closed_tunnel_frees_its_place(self) -> None:
        a, b = FakeTunnel("c1"), FakeTunnel("c2")
        self.registry.register(a, identity=self.ID)
        self.registry.register(b, identity=self.ID)
        self.registry.unregister(a)
        c = FakeTunnel("c3")
        self.registry.register(c, identity=self.ID)
        self.assertCountEqual(self.registry.tunnels(), [b, c])

    def test_without_identity_or_limit_nothing_is_counted(self) -> None:
        unlimited = ConnectorRegistry()
        for n in range(10):
            unlimited.register(FakeTunnel(f"c{n}"), identity=self.ID)
            self.registry.register(FakeTunnel(f"x{n}"))
        self.assertEqual(unlimited.count(), 10)
        self.assertEqual(self.registry.count(), 10)


class TenantStreamTests(SynchronousTestCase):
    def test_streams_of_live_tunnels_of_the_tenant_are_summed(self) -> None:
        registry = ConnectorRegistry()
        a = FakeTunnel("c1", load=3)
        b = FakeTunnel("c2", location="loc-1", load=4)
        other = FakeTunnel("c1", tenant="tenant-b", load=100)
        for t in (a, b, other):
            registry.register(t)
        self.assertEqual(registry.tenant_streams("tenant-a"), 7)
        # A replaced tunnel still draining keeps counting until it closes.
        newer = FakeTunnel("c1", load=1)
        registry.register(newer)
        self.assertEqual(registry.tenant_streams("tenant-a"), 8)
        registry.unregister(a)
        self.assertEqual(registry.tenant_streams("tenant-a"), 5)
        self.assertEqual(registry.tenant_streams("nobody"), 0)
