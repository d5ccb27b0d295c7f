"""The ``access`` room (meshq.core.cluster.access): permissions checked where requests are served, grants
changed and listed by the admin, agreed through the metadata group."""

from __future__ import annotations

import msgpack
import pytest

from meshq.core import wire
from meshq.core.acl import ADMIN, CLUSTER
from meshq.core.events import AclChange, AclList, ServeService
from tests.core.harness import CoreHarness
from tests.core.rooms.conftest import Net, batch, create_topic, error_of, member_info, produce_body

TOPIC = {"name": "new", "partitions": 1, "replication_factor": 1, "retention_bytes": None, "retention_ms": None,
         "cleanup_policy": "delete"}


def change(h: CoreHarness, action: str, name: str, permission: str, pattern: str, caller: str | None = ADMIN):
    return h.request("acl_change", {"action": action, "name": name, "permission": permission, "pattern": pattern},
                     caller=caller)


def produce_as(h: CoreHarness, caller: str | None, topic: str = "orders.eu", producer_id: int = 42):
    return h.request("produce", produce_body(topic, acks="leader"), (batch([b"v"], producer_id),), caller=caller)


def fetch_as(h: CoreHarness, caller: str | None, topic: str = "orders.eu"):
    return h.request("fetch", {"topic": topic, "partition": 0, "offset": 0, "max_bytes": 1 << 20, "max_wait_ms": 0},
                     caller=caller)


def end_offset(h: CoreHarness, topic: str = "orders.eu") -> int:
    return h.core.partitions[(topic, 0)].log.end_offset


def test_a_client_without_a_grant_is_refused_produce_and_nothing_is_stored_until_granted(lone):
    create_topic(lone, "orders.eu")
    code, message = error_of(produce_as(lone, "alice"))
    assert code == "authorization"
    assert message.startswith("client 'alice' may not produce topic 'orders.eu': no grant of produce matches it")
    assert end_offset(lone) == 0 and lone.replies[-1] is not None
    assert change(lone, "grant", "alice", "produce", "orders.>").body == {"changed": True}
    assert produce_as(lone, "alice").type == "produce_ok" and end_offset(lone) == 1
    assert error_of(produce_as(lone, "alice", "payments"))[0] == "authorization"  # another pattern
    assert error_of(fetch_as(lone, "alice"))[0] == "authorization"  # produce is not consume
    assert change(lone, "revoke", "alice", "produce", "orders.>").body == {"changed": True}
    assert error_of(produce_as(lone, "alice"))[0] == "authorization" and end_offset(lone) == 1


def test_storage_nodes_the_admin_and_unkeyed_callers_need_no_grant(lone):
    create_topic(lone, "orders.eu")
    for producer_id, caller in enumerate((CLUSTER, ADMIN, None)):
        assert produce_as(lone, caller, producer_id=producer_id + 1).type == "produce_ok"
        assert fetch_as(lone, caller).type == "fetch_ok"
    assert end_offset(lone) == 3


def test_consume_covers_fetch_offsets_and_group_membership(lone):
    create_topic(lone, "orders.eu")
    lone.request("metadata", {"topics": ["__consumer_offsets"], "auto_create": False})  # internal: always made
    requests = [
        ("fetch", {"topic": "orders.eu", "partition": 0, "offset": 0, "max_bytes": 1 << 20, "max_wait_ms": 0}),
        ("list_offsets", {"topic": "orders.eu", "partition": 0, "timestamp_ms": -1}),
        ("offset_fetch", {"group": "g", "topic": "orders.eu"}),
        ("offset_commit", {"group": "g", "offsets": [{"topic": "orders.eu", "partition": 0, "offset": 0}]}),
        ("join_group", {"group": "g", "topic": "orders.eu", "member": "m1", "partitions": 1}),
    ]
    for type_, body in requests:
        code, message = error_of(lone.request(type_, body, caller="bob"))
        assert (code, message.split(":")[0]) == ("authorization", "client 'bob' may not consume topic 'orders.eu'")
    assert lone.core.groups.group_offsets == {}
    change(lone, "grant", "bob", "consume", "orders.*")
    for type_, body in requests:
        assert lone.request(type_, body, caller="bob").type == f"{type_}_ok"


def test_creating_a_topic_needs_admin_on_it_also_by_auto_creation(lone):
    code, message = error_of(lone.request("create_topic", {"config": TOPIC, "if_not_exists": True}, caller="carol"))
    assert code == "authorization" and "may not admin topic 'new'" in message
    code, _ = error_of(lone.request("metadata", {"topics": ["new"], "auto_create": True}, caller="carol"))
    assert code == "authorization" and lone.core.topics == {}
    change(lone, "grant", "carol", "admin", "mine")  # one of two: neither is created
    code, message = error_of(lone.request("metadata", {"topics": ["mine", "new"], "auto_create": True},
                                          caller="carol"))
    assert code == "authorization" and "topic 'new'" in message and lone.core.topics == {}
    assert lone.request("metadata", {"topics": ["new"], "auto_create": False}, caller="carol").type == "metadata_ok"
    change(lone, "grant", "carol", "admin", "new")
    assert lone.request("create_topic", {"config": TOPIC, "if_not_exists": True}, caller="carol").body["created"]


def test_only_the_admin_changes_or_lists_grants_and_asks_a_node_to_leave(lone):
    code, message = error_of(change(lone, "grant", "alice", "produce", ">", caller="alice"))
    assert code == "authorization" and "only the admin key" in message
    assert lone.core.meta.acl.listing() == []
    assert error_of(lone.request("acl_list", {}, caller="alice"))[0] == "authorization"
    assert error_of(lone.request("leave", {"node_id": "n1"}, caller="alice"))[0] == "authorization"
    change(lone, "grant", "alice", "produce", ">")
    assert lone.request("acl_list", {}, caller=ADMIN).body == {
        "grants": [{"name": "alice", "permission": "produce", "pattern": ">"}]}


def test_a_repeated_grant_changes_nothing_and_a_revoke_of_nothing_says_so(lone):
    change(lone, "grant", "alice", "produce", ">")
    listing = lone.core.meta.acl.listing()
    # (proposed all the same: this node's state may be behind a revoke committed elsewhere; applying it is a no-op)
    assert change(lone, "grant", "alice", "produce", ">").body == {"changed": False}
    assert lone.core.meta.acl.listing() == listing
    entries = len(lone.core.raft.entries)
    code, message = error_of(change(lone, "revoke", "alice", "consume", ">"))
    assert code == "usage" and "holds no grant consume '>'" in message
    code, message = error_of(change(lone, "grant", "alice", "produce", "a.>.b"))
    assert code == "usage" and "'>' may only be the last token" in message
    assert len(lone.core.raft.entries) == entries


@pytest.mark.parametrize("type_", ["raft_propose", "raft_append"])
def test_a_client_key_cannot_send_what_only_storage_nodes_send_each_other(lone, type_):
    before = list(lone.core.raft.entries)
    body = ({"command": msgpack.packb({"op": "acl", "action": "grant", "name": "alice", "permission": "produce",
                                       "pattern": ">"})} if type_ == "raft_propose" else
            {"term": 99, "leader": "x", "prev_index": -1, "prev_term": 0, "commit": -1, "entries": []})
    code, message = error_of(lone.request(type_, body, caller="alice"))
    assert code == "authorization" and "only a node holding the cluster key" in message
    assert lone.core.raft.entries == before and lone.core.raft.term < 99 and lone.core.meta.acl.listing() == []


def test_a_grant_made_through_a_follower_is_agreed_by_every_node_and_a_client_command_lists_it():
    net = Net("n1", "n2", "n3")
    net.form()
    follower = next(h for h in net.nodes.values() if h.core.raft.role != "leader")
    follower.request("acl_change", {"action": "grant", "name": "alice", "permission": "produce",
                                    "pattern": "orders.>"}, caller=ADMIN)
    net.run_until(lambda: all(h.core.meta.acl.allows("alice", "produce", "orders.eu") for h in net.nodes.values()),
                  5.0)
    client = net.add("c1", role="client", data_dir=None)
    net.introduce()
    net.run(1.0)
    token = client.command(AclList())
    net.run_until(lambda: token in client.resolved or token in client.failed, 5.0)
    assert client.resolved[token] == [{"name": "alice", "permission": "produce", "pattern": "orders.>"}]
    token = client.command(AclChange("revoke", "alice", "produce", "orders.>"))
    net.run_until(lambda: token in client.resolved or token in client.failed, 5.0)
    assert client.resolved[token] is True
    net.run_until(lambda: all(h.core.meta.acl.listing() == [] for n, h in net.nodes.items() if n != "c1"), 5.0)
    token = client.command(AclChange("grant", "alice", "write", "x"))  # refused before anything is sent
    assert "unknown permission 'write'" in str(client.failed[token])


def test_grants_are_listed_only_by_the_metadata_leader_and_a_client_is_sent_on_to_it():
    # A follower's grants may lag the cluster's (a node back from a restart applies what the leader tells it):
    # it names the leader instead of listing, and a client's list goes on to that leader.
    net = Net("n1", "n2", "n3")
    net.form()
    leader = next(h for h in net.nodes.values() if h.core.raft.role == "leader")
    follower = next(h for h in net.nodes.values() if h.core.raft.role != "leader")
    change(leader, "grant", "alice", "produce", "orders.>")
    net.run_until(lambda: all(h.core.meta.acl.listing() for h in net.nodes.values()), 5.0)
    follower.core.meta.acl.apply({"action": "revoke", "name": "alice", "permission": "produce",
                                  "pattern": "orders.>"})  # as if it had not applied the grant yet
    code, text = error_of(follower.request("acl_list", {}, caller=ADMIN))
    assert code == "not_leader" and "not the metadata leader" in text, text
    client = net.add("c1", role="client", data_dir=None)
    net.introduce()
    net.run(1.0)
    client.core.client.any_storage_peer = lambda: follower.core.node_id  # always asks the lagging follower first
    token = client.command(AclList())
    net.run_until(lambda: token in client.resolved or token in client.failed, 5.0)
    assert client.resolved.get(token) == [{"name": "alice", "permission": "produce", "pattern": "orders.>"}], \
        client.failed.get(token)


def test_a_client_key_cannot_say_hello_as_a_storage_node(lone):
    code, message = error_of(lone.request("hello", {"member": member_info("n9", 7000)}, caller="alice"))
    assert code == "authorization" and message.startswith("a hello claiming the storage role: only a node holding")
    assert "n9" not in lone.core.members
    assert lone.request("hello", {"member": member_info("c9", 7000, role="client")}, caller="alice").type == "hello_ok"
    assert lone.request("hello", {"member": member_info("n9", 7000)}, caller=CLUSTER).type == "hello_ok"
    assert "n9" in lone.core.members


def test_a_service_served_by_a_storage_node_needs_request(lone):
    token = lone.command(ServeService("billing.invoice"))
    assert lone.resolved.get(token, "missing") is None
    body = {"service": "billing.invoice", "incarnation": 1, "timeout_ms": 1000}
    code, message = error_of(lone.request("rpc_request", body, (b"x",), request_id=5, caller="dave"))
    assert code == "authorization" and "may not request service 'billing.invoice'" in message
    assert lone.jobs == []
    change(lone, "grant", "dave", "request", "billing.*")
    assert lone.request("rpc_request", body, (b"x",), request_id=6, caller="dave") is None  # running: no reply yet
    assert [job.service for job in lone.jobs] == ["billing.invoice"]


def test_a_batch_of_requests_is_refused_request_by_request_without_request(lone):
    lone.command(ServeService("billing.invoice"))
    body = {"service": "billing.invoice", "incarnation": 1, "ids": [11, 12], "timeouts_ms": [1000, 1000],
            "sizes": [1, 1]}
    before = len(lone.replies)
    lone.request("rpc_batch", body, (b"xy",), request_id=0, caller="dave")
    answers = [wire.decode(r.frames, lone.config.cluster) for r in lone.replies[before:]]
    assert [(a.type, a.request_id, a.body["code"]) for a in answers] == [("error", 11, "authorization"),
                                                                          ("error", 12, "authorization")]
    assert lone.jobs == []
    change(lone, "grant", "dave", "request", "billing.>")
    lone.request("rpc_batch", dict(body, ids=[13, 14]), (b"xy",), request_id=0, caller="dave")
    assert [job.service for job in lone.jobs] == ["billing.invoice", "billing.invoice"]
