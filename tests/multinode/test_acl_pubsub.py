"""Pub/sub between keyed client nodes under ``publish`` / ``subscribe`` grants (issue #17 item 3;
docs/protocol.md "Identity and permissions").

A cluster from `meshq keygen` and three client nodes with their own keys: alice may publish ``events.>``,
bob may subscribe to ``events.>``, carol may subscribe to ``other.>`` only and publish nothing. Bob gets
alice's messages; carol cannot subscribe to ``events.>`` and, subscribed to ``>``, gets none of them (the
publisher routes nothing to a key without the grant); carol cannot publish, and when her node is made to
send all the same (its own check bypassed) bob's node drops what she sent; a batch she forges in alice's
name is refused; and a revoke of bob's grant stops his data within a bounded time.
"""

from __future__ import annotations

import os
import time

import pytest

import meshq
from meshq.core.pubsub import frames
from tests.multinode.helpers import keyed_client, keyed_mesh, received, wait_until

pytestmark = pytest.mark.timeout(300)
REVOKE_BOUND_S = 10.0  # views refresh every second; the bound leaves room for a loaded machine


@pytest.fixture
def keyed(mesh):
    return keyed_mesh(mesh, "alice", "bob", "carol")


def _subscribe(client: meshq.Node, pattern: str):
    try:
        return client.subscribe(pattern)
    except meshq.AuthorizationError:
        return None


def _refused(call) -> BaseException | None:
    try:
        call()
    except meshq.AuthorizationError as exc:
        return exc
    return None


def test_publish_and_subscribe_grants_rule_pubsub_between_keyed_client_nodes(keyed):
    mesh, keys, nodes = keyed
    clients = {name: keyed_client(mesh, nodes, os.path.join(keys, "clients", name))
               for name in ("admin", "alice", "bob", "carol")}
    admin, alice, bob, carol = (clients[name] for name in ("admin", "alice", "bob", "carol"))
    try:
        for name, permission, pattern in (("alice", "publish", "events.>"), ("bob", "subscribe", "events.>"),
                                          ("carol", "subscribe", "other.>")):
            assert admin.acl_grant(name, permission, pattern) is True
        to_bob = wait_until(lambda: _subscribe(bob, "events.>"), 30, "bob's node to learn he may subscribe")
        refused = wait_until(lambda: _refused(lambda: carol.subscribe("events.>").close()), 30,
                             "carol's subscription to events.> to be refused")
        assert "client 'carol' may not subscribe 'events.>'" in str(refused)
        # ">" overlaps her grant: taken, but only other.> may reach it (her node may not have the grant in its view yet)
        to_carol = wait_until(lambda: _subscribe(carol, ">"), 30, "carol's subscription to > to be taken")
        wait_until(lambda: alice.publish("events.one", b"first") or received(to_bob, b"first"), 60,
                   "alice's message to reach bob")
        for _ in range(20):
            alice.publish("events.two", b"second")
        assert received(to_bob, b"second", 2.0)
        assert not received(to_carol, b"second", 1.0)  # routed to bob's key only

        refused = wait_until(lambda: _refused(lambda: carol.publish("events.one", b"carol")), 30,
                             "carol's publish to be refused")
        assert "client 'carol' may not publish subject 'events.one'" in str(refused)
        assert "nothing was published" in str(refused)

        # carol's node sends all the same (its own check bypassed): bob's node drops and counts it
        carol.core.access.refuse_own = lambda permission, resource: None
        carol.core.pubsub._routes = {}
        bob_counters = bob.core.pubsub.counters
        before = bob_counters["publish_refused"]
        wait_until(lambda: carol.publish("events.one", b"carol") or bob_counters["publish_refused"] > before, 30,
                   "bob's node to refuse carol's messages")
        assert not received(to_bob, b"carol", 1.0)

        # a batch carol forges in alice's name, addressed to bob: the key of its connection is carol's
        forged = frames.encode_batch(frames.keyed_data_prefix(bob.node_id, bob.runtime.curve.keys.public), 1_000_000,
                                     alice.node_id,
                                     [("events.one", None, None, b"forged")])
        before = bob_counters["source_forged"]

        def forge() -> bool:
            with carol.runtime.pub_lock:
                carol.runtime.pub.send_multipart(forged)
            return bob_counters["source_forged"] > before

        wait_until(forge, 30, "bob's node to refuse a batch forged in alice's name")
        assert not received(to_bob, b"forged", 1.0)

        # revoked: alice's node stops routing to bob within the bound
        admin.acl_revoke("bob", "subscribe", "events.>")
        revoked_at = time.monotonic()
        wait_until(lambda: alice.publish("events.one", b"late") or not received(to_bob, b"late"), REVOKE_BOUND_S,
                   "bob to stop getting events once his grant is revoked")
        took = time.monotonic() - revoked_at
        for _ in range(5):
            alice.publish("events.one", b"after")
        assert not received(to_bob, b"after", 1.0)
        print(f"revoke took effect within {took:.2f} s")
        assert wait_until(lambda: _refused(lambda: bob.subscribe("events.x").close()), 30,
                          "bob's new subscription to be refused once revoked")
    finally:
        for client in clients.values():
            client.stop()
