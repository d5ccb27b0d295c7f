"""The ``client`` room (meshq.core.client.metadata.ClientMetadata): topic metadata for this node's calls."""

from __future__ import annotations

import pytest

from meshq.core.client.metadata import METADATA_RETRY_S
from meshq.core.events import Connect
from meshq.errors import NodeStoppedError, TimeoutError, UnknownTopicError
from tests.core.harness import CoreHarness, pump
from tests.core.rooms.conftest import flush, sent_of


@pytest.fixture
def server() -> CoreHarness:
    return CoreHarness("server", partitions=2)


@pytest.fixture
def linked(server) -> CoreHarness:
    """A client that met ``server`` through its seed (deliver with ``pump(linked, server)``)."""
    h = CoreHarness("c1", role="client", data_dir=None, seeds=("127.0.0.1:9000",))
    pump(h, server)
    assert h.core.client.storage_peers() == ["server"]
    return h


def wait_for(h: CoreHarness, topic: str, within_s: float = 5.0, auto_create: bool = True) -> list:
    """``with_metadata`` called directly; returns the list its callback appends to."""
    outcome: list = []
    h.core.client.with_metadata(topic, h.clock.now_s, h.clock.now_s + within_s, outcome.append, auto_create)
    flush(h)
    return outcome


def test_waiters_for_the_same_topic_share_one_request_and_all_learn_its_leaders(linked, server):
    first, second = wait_for(linked, "t"), wait_for(linked, "t")
    assert [(peer, m.body) for peer, m in sent_of(linked, "metadata")] == [
        ("server", {"topics": ["t"], "auto_create": True})]
    pump(linked, server)
    assert first == [None] and second == [None]
    assert linked.core.client.leader_of("t", 1) == "server" and linked.core.client.leader_of("t", 2) is None
    assert wait_for(linked, "t") == [None] and sent_of(linked, "metadata") == []  # known: no request


def test_forgetting_a_topic_makes_the_next_use_ask_afresh(linked, server):
    wait_for(linked, "t")
    pump(linked, server)
    linked.core.client.forget("t")
    assert linked.core.client.leader_of("t", 0) is None
    assert wait_for(linked, "t") == [] and len(sent_of(linked, "metadata")) == 1


def test_a_missing_topic_without_auto_creation_fails_with_unknown_topic(linked, server):
    outcome = wait_for(linked, "u", auto_create=False)
    pump(linked, server)
    (error,) = outcome
    assert isinstance(error, UnknownTopicError) and str(error) == "topic 'u' does not exist (and auto-creation is off)"
    assert "u" not in server.core.topics


def test_without_a_storage_peer_waiters_are_retried_and_each_fails_by_its_own_deadline(client):
    soon, later = wait_for(client, "t", within_s=0.5), wait_for(client, "t", within_s=2.0)
    timers = [kind for _deadline, _seq, kind, _key in client.core.out._timers]
    assert timers.count("metadata_retry") == 1
    client.advance(METADATA_RETRY_S)  # asked again: still nobody
    assert soon == [] and later == []
    client.advance(METADATA_RETRY_S)  # the next retry would come after its deadline: it fails now
    (error,) = soon
    assert isinstance(error, TimeoutError) and "check --seed / mDNS" in str(error)
    assert later == []
    for _ in range(6):  # up to 0.4 s before its deadline
        client.advance(METADATA_RETRY_S)
    assert later == []
    client.advance(METADATA_RETRY_S)
    client.advance(METADATA_RETRY_S)
    assert len(later) == 1 and isinstance(later[0], TimeoutError)


def test_a_waiter_still_in_time_is_answered_once_a_storage_node_turns_up(server):
    h = CoreHarness("c1", role="client", data_dir=None, seeds=("127.0.0.1:9000",))
    outcome = wait_for(h, "t", within_s=5.0)  # the seed has not answered yet
    h.advance(0.5)
    assert outcome == []
    pump(h, server)  # hello answered: a storage peer is known
    h.advance(METADATA_RETRY_S)
    pump(h, server)
    assert outcome == [None] and h.core.client.leader_of("t", 0) == "server"


def test_stopping_fails_every_metadata_waiter_with_node_stopped(client):
    outcome = wait_for(client, "t")
    client.apply(client.core.stop(client.clock.now_s))
    (error,) = outcome
    assert isinstance(error, NodeStoppedError)
    assert client.core.client.awaiting_metadata == {}


def test_metadata_links_only_live_storage_members_other_than_this_node(client):
    def member(node_id: str, role: str = "storage", state: str = "alive") -> dict:
        return {"node_id": node_id, "address": f"tcp://127.0.0.1:{7000 + len(node_id)}", "role": role, "state": state}

    client.core.client.absorb_metadata({"topics": [], "members": [
        member("s1"), member("s22", state="suspect"), member("s333", state="dead"), member("c4444", role="client"),
        member("c1")]})
    assert client.core.out.take() == [Connect("s1", "tcp://127.0.0.1:7002"), Connect("s22", "tcp://127.0.0.1:7003")]


def test_a_storage_node_in_the_cluster_asks_itself_and_one_outside_it_asks_nobody(lone):
    assert lone.core.client.storage_peers() == ["n1"] and lone.core.client.any_storage_peer() == "n1"
    outside = CoreHarness("n9", seeds=("127.0.0.1:9100",))  # never formed: not in any group
    assert outside.core.client.any_storage_peer() is None
