"""The ``catalog`` room (meshq.core.cluster.catalog): topic metadata served, topics created."""

from __future__ import annotations

import pytest

from meshq.config import TopicConfig
from meshq.core.cluster.agreement import OFFSETS_TOPIC
from tests.core.harness import CoreHarness
from tests.core.rooms.conftest import create_topic, error_of


def metadata(h: CoreHarness, topics: list[str] | None, auto_create: bool = False):
    return h.request("metadata", {"topics": topics, "auto_create": auto_create})


def create(h: CoreHarness, config: dict, if_not_exists: bool = False):
    return h.request("create_topic", {"config": config, "if_not_exists": if_not_exists})


def test_metadata_lists_the_members_and_each_requested_topic_with_its_partitions(lone):
    create_topic(lone, "t", 2)
    lone.produce("t", [b"a", b"b"], partition=1)
    reply = metadata(lone, ["t", "absent"])
    assert reply.type == "metadata_ok"
    assert reply.body["members"] == [{"node_id": "n1", "address": lone.core.endpoint, "role": "storage",
                                      "state": "alive"}]
    (topic,) = reply.body["topics"]  # the absent one is left out (no auto-creation asked)
    assert topic["config"] == TopicConfig("t", 2, 1).to_wire()
    assert [(p["partition"], p["leader"], p["replicas"], p["in_sync"], p["high_watermark"])
            for p in topic["partitions"]] == [(0, "n1", ["n1"], ["n1"], 0), (1, "n1", ["n1"], ["n1"], 2)]
    assert "absent" not in lone.core.topics


@pytest.mark.parametrize(("node_allows", "request_asks", "created"), [
    (True, True, True), (True, False, False), (False, True, False)])
def test_a_missing_topic_is_created_only_when_both_the_node_and_the_request_allow_it(node_allows, request_asks,
                                                                                      created):
    h = CoreHarness("n1", partitions=3, auto_create_topics=node_allows)
    reply = metadata(h, ["a", "b"], auto_create=request_asks)
    assert [t["config"]["name"] for t in reply.body["topics"]] == (["a", "b"] if created else [])
    assert sorted(h.core.topics) == (["a", "b"] if created else [])
    if created:
        assert h.core.topics["a"].partitions == 3


def test_metadata_for_every_topic_leaves_out_meshq_internal_ones(lone):
    create_topic(lone, "b")
    create_topic(lone, "a")
    metadata(lone, [OFFSETS_TOPIC])
    reply = metadata(lone, None)
    assert [t["config"]["name"] for t in reply.body["topics"]] == ["a", "b"]


def test_the_offsets_topic_is_created_when_asked_for_even_without_auto_creation():
    h = CoreHarness("n1", auto_create_topics=False, partitions=4)
    (topic,) = metadata(h, [OFFSETS_TOPIC]).body["topics"]
    assert topic["config"]["cleanup_policy"] == "compact" and topic["config"]["retention_ms"] is None
    assert h.core.topics[OFFSETS_TOPIC].partitions == 4


@pytest.mark.parametrize(("name", "message"), [
    ("bad name", "invalid topic name 'bad name': use 1-200 characters from letters, digits, '.', '_' and '-'"),
    ("__mine", "topic names starting with '__' are reserved for meshq ('__mine')"),
])
def test_a_bad_topic_name_is_refused_saying_why_and_nothing_is_created(lone, name, message):
    assert error_of(metadata(lone, [name], auto_create=True)) == ("invalid_topic", message)
    assert error_of(create(lone, {**TopicConfig("ok", 1, 1).to_wire(), "name": name})) == ("invalid_topic", message)
    assert lone.core.topics == {}


def test_create_topic_answers_with_the_new_topic_and_its_partitions(lone):
    reply = create(lone, TopicConfig("t", 3, 1).to_wire())
    assert reply.type == "create_topic_ok" and reply.body["created"] is True
    assert reply.body["topic"]["config"]["partitions"] == 3
    assert [p["leader"] for p in reply.body["topic"]["partitions"]] == ["n1", "n1", "n1"]
    assert sorted(lone.core.partitions) == [("t", 0), ("t", 1), ("t", 2)]


def test_creating_an_existing_topic_is_refused_unless_if_not_exists_and_never_changes_it(lone):
    create_topic(lone, "t", 2)
    entries = len(lone.core.raft.entries)
    assert error_of(create(lone, TopicConfig("t", 5, 1).to_wire())) == ("invalid_topic", "topic 't' already exists")
    reply = create(lone, TopicConfig("t", 5, 1).to_wire(), if_not_exists=True)
    assert reply.body["created"] is False and reply.body["topic"]["config"]["partitions"] == 2
    assert lone.core.topics["t"].partitions == 2 and len(lone.core.raft.entries) == entries


@pytest.mark.parametrize("type_", ["metadata", "create_topic"])
def test_a_client_serves_no_metadata(client, type_):
    body = ({"topics": None, "auto_create": False} if type_ == "metadata"
            else {"config": TopicConfig("t", 1, 1).to_wire(), "if_not_exists": True})
    assert error_of(client.request(type_, body)) == ("not_leader", "node c1 is a client and holds no partitions")
