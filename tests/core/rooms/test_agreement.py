"""The ``agreement`` room (meshq.core.cluster.agreement): the metadata Raft group, propose, apply."""

from __future__ import annotations

import msgpack
import pytest

from meshq.errors import NotLeaderError
from tests.core.harness import CoreHarness
from tests.core.rooms.conftest import Net, error_of, flush

TOPIC_X = {"name": "x", "partitions": 2, "replication_factor": 1, "retention_bytes": None, "retention_ms": None,
           "cleanup_policy": "delete"}


def propose_request(h: CoreHarness, command=None, raw: bytes | None = None):
    """A peer's ``raft_propose`` of ``command`` (or of the raw bytes ``raw``) to ``h``."""
    return h.request("raft_propose", {"command": raw if raw is not None else msgpack.packb(command)})


def propose(h: CoreHarness, command: dict, within_s: float = 5.0) -> list:
    """Call ``h.core.agreement.propose`` directly; returns the list its ``done`` appends to."""
    done: list = []
    h.core.agreement.propose(command, h.clock.now_s, h.clock.now_s + within_s, done.append)
    flush(h)
    return done


def test_a_client_refuses_raft_messages_saying_it_takes_no_part(client):
    code, message = error_of(client.request("raft_vote", {"term": 1, "candidate": "x", "last_index": -1,
                                                          "last_term": 0, "pre_vote": True}))
    assert code == "not_leader" and message == "node c1 is a client and takes no part in the metadata group"


@pytest.mark.parametrize(("command", "raw", "code", "message"), [
    (None, b"\xc1", "protocol", "raft_propose command does not decode"),
    ([1, 2], None, "protocol", "a peer may propose only create_topic, reassign, leave or acl"),
    ({"op": "config", "members": {}}, None, "protocol", "a peer may propose only create_topic, reassign, leave or acl"),
    ({"op": "leave", "node_id": "n7"}, None, "protocol", "a node may only ask for itself to leave"),
    ({"op": "create_topic", "config": {**TOPIC_X, "name": "__x"}}, None, "invalid_topic",
     "topic names starting with '__' are reserved for meshq ('__x')"),
    ({"op": "create_topic", "config": {"name": "x"}}, None, "protocol", "field command.config.partitions: missing"),
    ({"op": "reassign", "topic": "x"}, None, "protocol", "field command.partition: missing"),
])
def test_a_bad_peer_proposal_is_refused_saying_why_and_appends_nothing(lone, command, raw, code, message):
    before = list(lone.core.raft.entries)
    assert error_of(propose_request(lone, command, raw)) == (code, message)
    assert lone.core.raft.entries == before and lone.core.topics == {}


def test_a_peer_create_topic_is_answered_with_its_index_and_a_repeat_appends_nothing(lone):
    reply = propose_request(lone, {"op": "create_topic", "config": TOPIC_X})
    assert reply.type == "raft_propose_ok" and reply.body["index"] == lone.core.raft.last_index
    assert lone.core.topics["x"].partitions == 2 and lone.core.meta.assignments["x"] == [["n1"], ["n1"]]
    entries = len(lone.core.raft.entries)
    again = propose_request(lone, {"op": "create_topic", "config": {**TOPIC_X, "partitions": 5}})
    assert again.body == {"index": lone.core.meta.applied_index}
    assert len(lone.core.raft.entries) == entries and lone.core.topics["x"].partitions == 2


def test_a_follower_refuses_a_proposal_naming_the_leader():
    net = Net("n1", "n2")
    net.form()
    before = list(net["n2"].core.raft.entries)
    assert error_of(propose_request(net["n2"], {"op": "create_topic", "config": TOPIC_X})) == (
        "not_leader", "n2 is not the metadata leader (leader: n1)")
    assert net["n2"].core.raft.entries == before


def test_a_proposal_is_done_only_once_a_majority_holds_it():
    net = Net("n1", "n2", "n3")
    leader = net.form()
    net.cut("n2", "n3")
    done = propose(leader, {"op": "create_topic", "config": TOPIC_X})
    net.run(0.5)  # less than check-quorum's patience: the leader keeps leading, alone
    assert done == [] and "x" not in leader.core.topics
    net.heal()
    net.run(0.3)
    assert done == [None] and "x" in leader.core.topics


def test_a_proposal_through_a_follower_is_done_once_applied_there():
    net = Net("n1", "n2")
    net.form()
    follower = net["n2"]
    done = propose(follower, {"op": "create_topic", "config": TOPIC_X})
    net.pump()  # committed at the leader; the follower learns so with the next append
    assert "x" in net["n1"].core.topics
    assert done == [] and "x" not in follower.core.topics
    net.run(0.2)
    assert done == [None] and "x" in follower.core.topics


@pytest.mark.parametrize(("make", "message"), [
    (lambda: CoreHarness("c1", role="client", data_dir=None), "node c1 is a client"),
    (lambda: CoreHarness("n9", seeds=("127.0.0.1:9100",)), "the metadata group has no leader yet; retry"),
])
def test_a_proposal_nobody_can_take_fails_at_once_with_a_retriable_error(make, message):
    done = propose(make(), {"op": "create_topic", "config": TOPIC_X})
    (error,) = done
    assert isinstance(error, NotLeaderError) and error.retriable and str(error) == message


def test_joiners_are_admitted_one_configuration_change_at_a_time():
    net = Net("n1")
    for joiner in ("n2", "n3"):
        net.add(joiner, mdns=True, bootstrap_wait_s=100.0)  # they never form a group of their own
    leader = net.form()
    assert leader.core.node_id == "n1"
    configs = [sorted(command["members"]) for _term, command in leader.core.raft.entries
               if command["op"] == "config"]
    assert configs == [["n1"], ["n1", "n2"], ["n1", "n2", "n3"]]
    assert all(h.core.raft.is_member for h in net.nodes.values())


def test_a_voter_silent_for_member_timeout_s_is_removed_by_the_leader():
    net = Net("n1", "n2", "n3", member_timeout_s=5.0)
    leader = net.form()
    net.cut("n3")
    net.run(4.5)
    assert sorted(leader.core.raft.voters) == ["n1", "n2", "n3"]
    net.run(1.5)
    assert sorted(leader.core.raft.voters) == ["n1", "n2"]
    assert sorted(net["n2"].core.meta.members) == ["n1", "n2"]
