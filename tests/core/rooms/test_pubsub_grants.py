"""``publish`` / ``subscribe`` between keyed nodes (meshq.core.pubsub.room with meshq.core.cluster.access): a
publisher routes a subject only to nodes whose key may subscribe to it, refuses its own publish without the
grant; a receiver drops what the key of the batch's connection may not publish and refuses a batch claiming
another source; a subscription that no grant could feed is refused. Revokes take effect at the next view."""

from __future__ import annotations

import pytest

from meshq.core.events import AddSubscription
from meshq.core.pubsub import frames
from meshq.errors import AuthorizationError, ProtocolError
from tests.core.rooms.test_peer_grants import grant, keyed_net


def subscribe(net, node_id: str, sub_id: int, pattern: str):
    h = net[node_id]
    token = h.command(AddSubscription(sub_id, pattern, None))
    net.run(0.05)
    return h.failed.get(token)


def batch(src_room, dst: str, subject: str, source: str | None = None) -> list[bytes]:
    return frames.encode_batch(frames.data_prefix(dst), 1, source or src_room.node_id,
                               [(subject, None, None, b"data")])


@pytest.fixture
def net():
    net = keyed_net()  # c1 alice, c2 bob, c3 dave; storage node n1
    for name, permission, pattern in (("alice", "publish", "events.>"), ("bob", "subscribe", "events.>"),
                                      ("dave", "subscribe", "other.>"), ("dave", "publish", "other.>")):
        grant(net, "grant", name, permission, pattern)
    assert subscribe(net, "c2", 1, "events.>") is None
    assert subscribe(net, "c3", 1, ">") is None  # overlaps other.>: taken
    net.run(0.5)  # the adverts travel
    return net


def test_a_publisher_routes_a_subject_only_to_nodes_whose_key_may_subscribe_to_it(net):
    room = net["c1"].core.pubsub
    local, nodes = room.plan("events.one")
    assert sorted(nodes) == ["c2"]  # dave's node advertises '>' but his key may not subscribe to events
    assert not net["c1"].core.access.may_node("c3", "subscribe", "events.one")
    grant(net, "grant", "dave", "subscribe", "events.one")
    assert sorted(room.plan("events.one")[1]) == ["c2", "c3"]  # the new view replaced the cached route
    grant(net, "revoke", "bob", "subscribe", "events.>")
    assert sorted(room.plan("events.one")[1]) == ["c3"]


def test_a_publish_without_the_grant_is_refused_and_nothing_is_sent(net):
    room = net["c1"].core.pubsub
    published = room.counters["published"]
    with pytest.raises(AuthorizationError, match="client 'alice' may not publish subject 'news.x'.*nothing was "
                                                 "published"):
        room.plan("news.x")
    assert room.counters["published"] == published
    # the storage node holds the cluster key: it may publish anything
    assert sorted(net["n1"].core.pubsub.plan("events.one")[1]) == ["c2"]


def test_a_subscription_no_grant_could_feed_is_refused(net):
    error = subscribe(net, "c3", 2, "events.>")
    assert isinstance(error, AuthorizationError) and "client 'dave' may not subscribe 'events.>'" in str(error)
    assert 2 not in net["c3"].core.pubsub.local
    grant(net, "revoke", "bob", "subscribe", "events.>")
    assert isinstance(subscribe(net, "c2", 2, "events.x"), AuthorizationError)


def test_a_receiver_drops_what_the_connections_key_may_not_publish_and_refuses_a_forged_source(net):
    bob = net["c2"].core.pubsub
    source, entries = bob.received(*batch(net["c1"].core.pubsub, "c2", "events.one"), via="c1")
    assert source == "c1" and len(entries) == 1
    # dave's node sends to events (his own check bypassed): bob's node drops it, counted
    source, entries = bob.received(*batch(net["c3"].core.pubsub, "c2", "events.one"), via="c3")
    assert entries == [] and bob.counters["publish_refused"] == 1
    # ... and claims alice's node as the source: the connection is dave's, the batch is refused
    with pytest.raises(ProtocolError, match="from node c3 claims to come from c1"):
        bob.received(*batch(net["c3"].core.pubsub, "c2", "events.one", source="c1"), via="c3")
    assert bob.counters["source_forged"] == 1
    # what dave may publish passes; and a revoke of alice's grant takes effect at the next view
    assert len(bob.received(*batch(net["c3"].core.pubsub, "c2", "other.x"), via="c3")[1]) == 1
    grant(net, "revoke", "alice", "publish", "events.>")
    assert bob.received(*batch(net["c1"].core.pubsub, "c2", "events.one"), via="c1")[1] == []


def test_unkeyed_nodes_route_and_receive_without_checks():
    from tests.core.rooms.conftest import Net

    net = Net("n1")
    net.form()
    net.add("c1", role="client", data_dir=None)
    net.introduce()
    assert subscribe(net, "c1", 1, "events.>") is None
    net.run(0.5)
    room = net["n1"].core.pubsub
    assert list(room.plan("events.one")[1]) == ["c1"]
    source, entries = net["c1"].core.pubsub.received(*batch(room, "c1", "events.one", source="n9"))
    assert source == "n9" and len(entries) == 1  # no keys: no identity, the claim is all there is


def test_a_fresh_client_node_holds_a_subscription_until_its_view_says_whether_its_key_may(net):
    from tests.core.rooms.test_peer_grants import KEYS

    for node_id, key in (("c5", KEYS["c3"]), ("c6", KEYS["c2"])):  # dave's second node, bob's second node
        net.keys[node_id] = key
        net.add(node_id, role="client", data_dir=None, public_key=key)
    refused = net["c5"].command(AddSubscription(1, "events.>", None))
    taken = net["c6"].command(AddSubscription(1, "events.>", None))
    assert refused not in net["c5"].failed and taken not in net["c6"].resolved  # held: no view yet
    assert not net["c5"].core.pubsub.local and not net["c6"].core.pubsub.local
    net.introduce()
    net.run_until(lambda: refused in net["c5"].failed and taken in net["c6"].resolved, 2.0)
    assert "client 'dave' may not subscribe 'events.>'" in str(net["c5"].failed[refused])
    assert not net["c5"].core.pubsub.local and list(net["c6"].core.pubsub.local) == [1]


def test_a_client_node_that_gets_no_view_subscribes_after_a_short_wait_and_a_held_one_can_be_closed():
    from meshq.core.events import RemoveSubscription
    from meshq.errors import NodeStoppedError
    from tests.core.rooms.conftest import Net
    from tests.core.rooms.test_peer_grants import CLUSTER_KEY, KEYS

    net = Net("n1", public_key=CLUSTER_KEY)
    net.form()
    c1 = net.add("c1", role="client", data_dir=None, public_key=KEYS["c1"])  # never introduced: no view
    token = c1.command(AddSubscription(1, "events.>", None))
    closed = c1.command(AddSubscription(2, "other.>", None))
    net.run(1.0)
    assert token not in c1.resolved and not c1.core.pubsub.local
    c1.command(RemoveSubscription(2))
    assert isinstance(c1.failed.get(closed), NodeStoppedError)
    net.run(1.2)
    assert c1.resolved.get(token, "missing") is None and list(c1.core.pubsub.local) == [1]
