"""The ``requests`` room (meshq.core.client.requests): the local API calls other than produce."""

from __future__ import annotations

import pytest

from meshq.config import TopicConfig
from meshq.core.events import (
    AskLeave,
    CommitOffsets,
    CreateTopic,
    Fetch,
    FetchCommitted,
    GetMetadata,
    GetStatus,
    ListOffsets,
    ProduceCommand,
    WaitReady,
)
from meshq.errors import InvalidTopicError, NodeStoppedError, NotLeaderError, TimeoutError, UsageError
from tests.core.harness import CoreHarness, pump
from tests.core.rooms.conftest import Net, create_topic


def two_nodes_with_a_partition_on_n2(refresh: bool = True) -> tuple[Net, int]:
    """n1 and n2 with topic ``t`` (four single-replica partitions); returns one that n2 leads. n1's
    client metadata of ``t`` is from the creation, when no leader was known yet, unless ``refresh``."""
    net = Net("n1", "n2")
    net.form()
    n1 = net["n1"]
    create_topic(n1, "t", 4, net=net)
    on_n2 = [p for p, replicas in enumerate(n1.core.meta.assignments["t"]) if replicas == ["n2"]]
    assert on_n2 and n1.core.client.leader_of("t", on_n2[0]) is None
    net.run(1.0)
    if refresh:
        token = n1.command(GetMetadata("t", refresh=True))
        net.pump()
        assert n1.resolved[token]["leaders"][on_n2[0]] == "n2"
    return net, on_n2[0]


def settled(h: CoreHarness, token: int) -> bool:
    return token in h.resolved or token in h.failed


@pytest.mark.parametrize("make", [GetMetadata, WaitReady, GetStatus, lambda: AskLeave("n2")])
def test_a_call_that_needs_an_unknown_node_is_tried_again_until_its_deadline_then_fails_saying_so(make):
    h = CoreHarness("c1", role="client", data_dir=None, request_timeout_s=1.0)
    command = make()
    token = h.command(command)
    h.advance(0.5)
    h.advance(0.4)
    assert not settled(h, token) and h.sent == []
    h.advance(0.15)
    error = h.failed[token]
    if isinstance(command, AskLeave):
        assert isinstance(error, UsageError) and str(error) == "node 'n2' is not known here; known storage nodes: none"
    else:
        assert isinstance(error, TimeoutError) and "check --seed / mDNS" in str(error)


def test_wait_ready_resolves_once_a_storage_node_answered():
    server = CoreHarness("server")
    h = CoreHarness("c1", role="client", data_dir=None, seeds=("127.0.0.1:9000",))
    token = h.command(WaitReady())
    h.advance(0.1)
    assert not settled(h, token)
    pump(h, server)
    h.advance(0.02)
    assert h.resolved[token] is True


def test_a_reserved_topic_name_is_refused_before_anything_is_sent(lone):
    token = lone.command(CreateTopic(TopicConfig("__mine", 1, 1)))
    error = lone.failed[token]
    assert isinstance(error, InvalidTopicError) and "reserved for meshq" in str(error)
    assert "__mine" not in lone.core.topics


def test_a_fetch_may_take_its_long_poll_on_top_of_the_request_timeout():
    h = CoreHarness("n1", request_timeout_s=2.0)
    command = Fetch("t", 0, 0, max_wait_s=3.0)
    h.command(command)
    assert command.deadline_s == h.clock.now_s + 5.0
    listed = ListOffsets("t", 0, -1)
    h.command(listed)
    assert listed.deadline_s == h.clock.now_s + 2.0


def test_a_call_routed_to_a_silent_leader_is_retried_and_answered_once_it_is_back():
    net, partition = two_nodes_with_a_partition_on_n2()
    n1 = net["n1"]
    since_s = net.clock.now_s
    net.cut("n2")
    token = n1.command(ListOffsets("t", partition, -1, deadline_s=since_s + 10.0))
    net.run(2.5)
    assert not settled(n1, token)
    assert len(net.sent("n1", "list_offsets", since_s)) >= 2
    net.heal()
    net.run_until(lambda: settled(n1, token), within_s=7.0)
    assert n1.resolved[token] == 0


def test_a_routed_call_fails_at_its_deadline_with_the_last_reason():
    net, partition = two_nodes_with_a_partition_on_n2()
    net.cut("n2")
    n1 = net["n1"]
    token = n1.command(ListOffsets("t", partition, -1, deadline_s=net.clock.now_s + 5.0))
    net.run(4.7)
    assert not settled(n1, token)
    net.run(0.3)
    error = n1.failed[token]
    assert isinstance(error, NotLeaderError) and str(error) == (
        f"no leader known for t/{partition} (an election may be under way)")


def test_a_fetch_is_not_retried_the_consumer_retries_it_itself():
    net, partition = two_nodes_with_a_partition_on_n2()
    net.cut("n2")
    n1 = net["n1"]
    since_s = net.clock.now_s
    token = n1.command(Fetch("t", partition, 0, max_wait_s=0.0, deadline_s=since_s + 1.0))
    net.run(1.1)
    assert isinstance(n1.failed[token], TimeoutError)
    assert len(net.sent("n1", "fetch", since_s)) == 1


def test_a_fetch_that_found_no_leader_makes_the_next_fetch_ask_for_fresh_metadata():
    net, partition = two_nodes_with_a_partition_on_n2(refresh=False)
    n1 = net["n1"]
    first = n1.command(Fetch("t", partition, 0, max_wait_s=0.0))
    net.pump()
    assert isinstance(n1.failed[first], NotLeaderError)  # the consumer retries after a while
    net.run(0.5)
    again = n1.command(Fetch("t", partition, 0, max_wait_s=0.0))
    net.pump()
    assert again in n1.resolved, n1.failed.get(again)
    assert n1.resolved[again].high_watermark == 0


def test_commits_go_to_the_groups_coordinator_and_are_read_back():
    server = CoreHarness("server", partitions=2)
    h = CoreHarness("c1", role="client", data_dir=None, seeds=("127.0.0.1:9000",))
    pump(h, server)
    stored = h.command(CommitOffsets("g", {("t", 1): 4, ("t", 0): 2}))
    for _ in range(3):
        pump(h, server)
    assert h.resolved[stored] is None
    read = h.command(FetchCommitted("g", "t"))
    pump(h, server)
    assert h.resolved[read] == {("t", 0): 2, ("t", 1): 4}


def test_status_is_merged_from_every_live_storage_node_or_one_nodes_own_view():
    net = Net("n1", "n2")
    net.form()
    net.run(1.0)
    n1 = net["n1"]
    merged = n1.command(GetStatus())
    net.pump()
    assert n1.resolved[merged]["answered_by"] == ["n1", "n2"]
    own = n1.command(GetStatus(node_id="n2"))
    net.pump()
    assert n1.resolved[own]["node_id"] == "n2" and "answered_by" not in n1.resolved[own]


def test_every_call_after_stop_fails_with_node_stopped(lone):
    lone.apply(lone.core.stop(lone.clock.now_s))
    token = lone.command(GetMetadata("t"))
    assert isinstance(lone.failed[token], NodeStoppedError)


def test_run_refuses_a_command_it_does_not_carry_out(lone):
    with pytest.raises(UsageError, match="unknown command ProduceCommand"):
        lone.core.requests.run(ProduceCommand("t", [], None), lone.clock.now_s)
