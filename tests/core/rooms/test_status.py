"""The ``status`` room (meshq.core.status): one node's view, and the merge of several."""

from __future__ import annotations

from meshq.core.status import merge_status
from tests.core.rooms.conftest import Net, create_topic


def partition_view(leader: str | None, role: str | None = None, epoch: int = 1, high_watermark: int = 0,
                   in_sync: list | None = None, replicas: list | None = None, version: int = 0,
                   learners: list | None = None, target: list | None = None) -> dict:
    """One partition as a node's ``local_status`` reports it (``role`` None: no replica there)."""
    replicas = replicas or ["a", "b"]
    view = {"partition": 0, "leader": leader, "replicas": replicas, "in_sync": in_sync or [],
            "high_watermark": high_watermark, "learners": learners or [], "target": target or replicas,
            "config_version": version}
    if role is not None:
        view.update(epoch=epoch, role=role)
    return view


def report(node_id: str, *partitions: dict, groups: list | None = None) -> dict:
    return {"cluster": "default", "node_id": node_id, "members": [{"node_id": node_id}],
            "topics": [{"name": "t", "config": {}, "partitions": list(partitions)}], "groups": groups or [],
            "counters": {}}


def test_status_is_answered_with_this_nodes_view(lone):
    create_topic(lone, "t")
    lone.produce("t", [b"a"], partition=0)
    reply = lone.request("status", {})
    status = reply.body["status"]
    assert reply.type == "status_ok" and (status["cluster"], status["node_id"]) == ("default", "n1")
    assert [m["node_id"] for m in status["members"]] == ["n1"]
    ((partition,),) = [t["partitions"] for t in status["topics"]]
    assert (partition["leader"], partition["role"], partition["high_watermark"], partition["end_offset"]) == (
        "n1", "leader", 1, 1)
    assert status["counters"]["records_produced"] == 1
    assert status["metadata"]["voters"] == ["n1"] and status["metadata"]["applied_index"] >= 0
    assert status["ring"]["members"] == ["n1"]


def test_a_clients_view_has_no_metadata_group_nor_ring(client):
    status = client.request("status", {}).body["status"]
    assert status["node_id"] == "c1" and status["topics"] == []
    assert "metadata" not in status and "ring" not in status


def test_the_merge_takes_each_partition_as_its_leader_sees_it():
    follower = report("a", partition_view("b", role="follower", high_watermark=3, in_sync=[]))
    leader = report("b", partition_view("b", role="leader", high_watermark=7, in_sync=["a", "b"]))
    merged = merge_status({"a": follower, "b": leader}, preferred="a")
    (partition,) = merged["topics"][0]["partitions"]
    assert (partition["leader"], partition["high_watermark"], partition["in_sync"]) == ("b", 7, ["a", "b"])
    assert merged["node_id"] == "a" and merged["answered_by"] == ["a", "b"]


def test_the_merge_prefers_the_newest_epoch_when_two_nodes_still_claim_a_partition():
    stale = report("a", partition_view("a", role="leader", epoch=2, high_watermark=5, in_sync=["a"]))
    current = report("b", partition_view("b", role="leader", epoch=3, high_watermark=4, in_sync=["b"]))
    (partition,) = merge_status({"a": stale, "b": current}, "a")["topics"][0]["partitions"]
    assert (partition["leader"], partition["epoch"], partition["high_watermark"]) == ("b", 3, 4)


def test_a_partition_whose_leader_did_not_answer_shows_its_in_sync_set_as_unknown_not_empty():
    only = report("a", partition_view("b", role="follower", in_sync=["a"]))
    (partition,) = merge_status({"a": only}, "a")["topics"][0]["partitions"]
    assert partition["in_sync"] is None


def test_the_merge_takes_replica_sets_from_the_newest_configuration_and_counts_handoffs():
    old = report("a", partition_view("a", role="leader", replicas=["a", "b"], version=1))
    new = report("b", partition_view("a", replicas=["a", "c"], learners=["d"], version=2))
    merged = merge_status({"a": old, "b": new}, "a")
    (partition,) = merged["topics"][0]["partitions"]
    assert (partition["replicas"], partition["learners"], partition["config_version"]) == (["a", "c"], ["d"], 2)
    assert merged["handoffs"] == 1


def test_the_merge_recomputes_group_lag_against_the_leaders_high_watermark():
    group = {"group": "g", "partitions": [{"topic": "t", "partition": 0, "committed": 2, "high_watermark": 2,
                                           "lag": 0}]}
    coordinator = report("a", partition_view("b", role="follower", high_watermark=2), groups=[group])
    leader = report("b", partition_view("b", role="leader", high_watermark=9))
    merged = merge_status({"a": coordinator, "b": leader}, "b")
    assert merged["groups"] == [{"group": "g", "partitions": [
        {"topic": "t", "partition": 0, "committed": 2, "high_watermark": 9, "lag": 7}]}]


def test_handoffs_count_the_partitions_not_yet_where_the_ring_places_them():
    net = Net("n1")
    net.add("n2", mdns=True, bootstrap_wait_s=100.0)
    old = net["n1"]
    create_topic(old, "t", 6)
    assert old.core.status.handoffs() == 0
    net.introduce()
    net.run_until(lambda: len(old.core.raft.voters) == 2 and old.core.meta.members.keys() == {"n1", "n2"}, 5.0)
    moving = sum(1 for p in range(6) if old.core.meta.target("t", p) != ["n1"])
    assert moving > 0 and old.core.status.handoffs() == moving
    net.run_until(lambda: old.core.status.handoffs() == 0, within_s=10.0)
    assert all(old.core.meta.assignments["t"][p] == old.core.meta.target("t", p) for p in range(6))


def test_the_merge_takes_a_groups_members_from_its_coordinator_the_higher_generation_winning():
    members = [{"member": "c1-00000001", "topic": "t", "partitions": [0]}]
    current = {"group": "g", "mode": "stream", "generation": 2_000_001, "state": "stable", "members": members,
               "partitions": [{"topic": "t", "partition": 0, "committed": 2, "high_watermark": 2, "lag": 0}]}
    deposed = {"group": "g", "mode": "stream", "generation": 1_000_004, "state": "rebalancing", "members": [],
               "partitions": []}
    merged = merge_status({"a": report("a", partition_view("a", role="leader", high_watermark=5), groups=[current]),
                           "b": report("b", groups=[deposed])}, "b")
    assert merged["groups"] == [{"group": "g", "mode": "stream", "generation": 2_000_001, "state": "stable",
                                 "members": members, "partitions": [
                                     {"topic": "t", "partition": 0, "committed": 2, "high_watermark": 5, "lag": 3}]}]


def test_a_nodes_view_names_the_live_instances_of_each_service_it_has_heard_of():
    from tests.core.rooms.test_rpc import formed, serve

    net = formed("n1", "n2")
    serve(net, "n2", "echo")
    status = net["n1"].request("status", {}).body["status"]
    assert status["service_instances"] == {"echo": ["n2"]}


def test_the_merge_unions_the_instances_every_answering_node_sees():
    # a client process that serves is known to the nodes before a freshly started asker has heard its advert
    a = {**report("a"), "service_instances": {"echo": ["c9"], "resize": ["a"]}}
    b = {**report("b"), "service_instances": {"echo": ["b", "c9"]}}
    merged = merge_status({"a": a, "b": b}, preferred="a")
    assert merged["service_instances"] == {"echo": ["b", "c9"], "resize": ["a"]}
    assert merge_status({"a": report("a")}, preferred="a")["service_instances"] == {}
