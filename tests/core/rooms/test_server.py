"""The ``server`` room (meshq.core.partitions.server.PartitionServer): produce, fetch, list_offsets."""

from __future__ import annotations

import pytest

from meshq.core import batch as batch_format
from meshq.core.cluster.agreement import OFFSETS_TOPIC
from meshq.core.partitions.server import MAX_PARKED_FETCHES
from tests.core.harness import CoreHarness
from tests.core.rooms.conftest import (
    Net,
    answers,
    batch,
    create_topic,
    error_of,
    fire_due_timers,
    produce_body,
    records_of,
)


def fetch_body(offset: int, max_wait_ms: int = 0, topic: str = "t", partition: int = 0) -> dict:
    return {"topic": topic, "partition": partition, "offset": offset, "max_bytes": 1 << 20, "max_wait_ms": max_wait_ms}


def replicated_pair(**config) -> tuple[Net, CoreHarness, CoreHarness]:
    """Two nodes and topic ``t`` with one partition replicated on both: (net, its leader, its follower)."""
    net = Net("n1", "n2", **config)
    create_topic(net.form(), "t", 1, 2, net=net)
    net.run(1.0)
    leader = net[net["n1"].core.partitions[("t", 0)].replica.leader]
    follower = net["n2" if leader.core.node_id == "n1" else "n1"]
    return net, leader, follower


@pytest.fixture
def with_topic(lone) -> CoreHarness:
    create_topic(lone, "t", 2)
    return lone


def test_a_produce_is_stored_and_answered_with_its_base_offset(with_topic):
    h = with_topic
    first = h.request("produce", produce_body(), (batch([b"a", b"b"]),))
    second = h.request("produce", produce_body(), (batch([b"c"], base_sequence=2),))
    assert first.body == {"topic": "t", "partition": 0, "base_offset": 0, "duplicate": False}
    assert second.body["base_offset"] == 2
    assert records_of(h, "t", 0) == [b"a", b"b", b"c"]
    assert (h.core.counters["records_produced"], h.core.counters["batches_produced"]) == (3, 2)


def test_acks_none_is_stored_and_answered_at_once_only_when_it_carries_a_request_id(with_topic):
    # meshq's producer sends acks=none with request id 0: no answer
    assert with_topic.request("produce", produce_body(acks="none"), (batch([b"a"]),), request_id=0) is None
    # a client that gave an id gets the append confirmed at once (every request with an id is answered)
    reply = with_topic.request("produce", produce_body(acks="none"), (batch([b"b"], base_sequence=1),))
    assert reply.type == "produce_ok" and reply.body["base_offset"] == 1
    assert records_of(with_topic, "t", 0) == [b"a", b"b"]


@pytest.mark.parametrize(("topic", "partition", "message"), [
    ("nope", 0, "topic 'nope' does not exist (as far as n1 knows)"),
    ("t", 2, "topic 't' has 2 partitions; 2 does not exist"),
])
def test_a_request_for_a_partition_that_does_not_exist_is_refused_naming_it(with_topic, topic, partition, message):
    h = with_topic
    for type_, body, payloads in (("produce", produce_body(topic, partition), (batch([b"a"]),)),
                                  ("fetch", fetch_body(0, topic=topic, partition=partition), ()),
                                  ("list_offsets", {"topic": topic, "partition": partition, "timestamp_ms": -1}, ())):
        assert error_of(h.request(type_, body, payloads)) == ("unknown_topic", message)
    assert sorted(h.core.partitions) == [("t", 0), ("t", 1)]
    assert h.core.partitions[("t", 0)].log.end_offset == 0


def test_a_client_leads_no_partition(client):
    assert error_of(client.request("fetch", fetch_body(0))) == (
        "not_leader", "node c1 is a client and leads no partition")


def test_a_follower_refuses_a_produce_naming_the_leader():
    _net, leader, follower = replicated_pair()
    before = follower.core.partitions[("t", 0)].log.end_offset
    reply = follower.request("produce", produce_body(), (batch([b"a"]),))
    assert error_of(reply) == (
        "not_leader", f"{follower.core.node_id} does not lead t/0; its leader is {leader.core.node_id} "
                      f"(refresh metadata)")
    assert reply.body["leader"] == leader.core.node_id  # a field, for clients that do not parse text
    assert follower.core.partitions[("t", 0)].log.end_offset == before


def test_a_not_leader_reply_becomes_a_not_leader_error_that_names_the_leader():
    from meshq.errors import NotLeaderError, error_from_code

    error = error_from_code("not_leader", "moved", "n2")
    assert isinstance(error, NotLeaderError) and error.leader == "n2" and error.retriable
    assert error_from_code("not_leader", "unknown").leader is None


def test_a_batch_over_twice_batch_max_bytes_is_refused_and_nothing_is_stored():
    h = CoreHarness("n1", batch_max_bytes=1024)
    create_topic(h, "t")
    code, message = error_of(h.request("produce", produce_body(), (batch([b"x" * 3000]),)))
    assert code == "too_large" and "2048" in message, message
    assert h.core.partitions[("t", 0)].log.end_offset == 0


def test_a_commit_is_answered_only_once_a_majority_holds_it():
    net, leader, follower = replicated_pair()
    net.cut(follower.core.node_id)
    assert leader.request("produce", produce_body(acks="quorum", timeout_ms=5000), (batch([b"a"]),)) is None
    net.run(0.5)
    assert answers(leader) == {}
    net.heal()
    net.run(0.3)
    assert answers(leader)[77].body["base_offset"] == 0


def test_acks_leader_is_answered_at_once_but_fetch_serves_only_what_a_majority_holds():
    net, leader, follower = replicated_pair()
    net.cut(follower.core.node_id)
    assert leader.request("produce", produce_body(acks="leader"), (batch([b"a"]),)).body["base_offset"] == 0
    fetched = leader.request("fetch", fetch_body(0))
    assert fetched.body["high_watermark"] == 0 and fetched.payloads == ()


def test_a_quorum_waiter_fails_with_timeout_at_its_deadline_while_the_replicas_still_count_as_in_sync():
    net, leader, follower = replicated_pair()
    net.cut(follower.core.node_id)
    leader.request("produce", produce_body(acks="quorum", timeout_ms=500), (batch([b"a"]),))
    net.run(0.45)
    assert answers(leader) == {}
    net.run(0.1)
    assert error_of(answers(leader)[77]) == ("timeout", "records on t/0 did not reach acks=quorum in time")


def test_a_quorum_waiter_fails_with_not_enough_replicas_once_the_followers_fell_out_of_sync():
    net, leader, follower = replicated_pair(failure_timeout_s=1.0)
    net.cut(follower.core.node_id)
    leader.request("produce", produce_body(acks="quorum", timeout_ms=1500), (batch([b"a"]),))
    net.run(1.6)
    code, message = error_of(answers(leader)[77])
    assert code == "not_enough_replicas"
    assert message == (f"acks=quorum on t/0 needs 2 of the replicas {leader.core.node_id}, {follower.core.node_id}; "
                       f"only {leader.core.node_id} answered in time")


def test_a_waiter_fails_with_not_leader_when_its_leader_steps_down():
    net, leader, follower = replicated_pair()
    net.cut(follower.core.node_id)
    leader.request("produce", produce_body(acks="quorum", timeout_ms=10_000), (batch([b"a"]),))
    net.run(2.5)  # the partition leader hears no majority for 2 x election_timeout_s: it steps down
    code, message = error_of(answers(leader)[77])
    assert code == "not_leader" and "stopped leading t/0 before the records reached acks=quorum" in message


def test_a_leader_whose_lease_lapsed_refuses_writes_before_storing_anything():
    net, leader, follower = replicated_pair()
    net.cut(follower.core.node_id)
    net.run(1.1)  # past the election timeout, before it steps down
    end = leader.core.partitions[("t", 0)].log.end_offset
    code, message = error_of(leader.request("produce", produce_body(acks="none"), (batch([b"a"]),)))
    assert code == "not_enough_replicas" and "refuses writes rather than diverge" in message
    assert leader.core.partitions[("t", 0)].log.end_offset == end


def test_a_parked_fetch_is_answered_empty_when_its_wait_is_over_and_the_wait_is_capped(with_topic):
    h = with_topic
    assert h.request("fetch", fetch_body(0, max_wait_ms=200), request_id=1) is None
    assert h.request("fetch", fetch_body(0, max_wait_ms=1 << 31), request_id=2) is None
    h.advance(0.2)
    (short,) = answers(h).values()
    assert short.request_id == 1 and short.body["high_watermark"] == 0 and short.payloads == ()
    h.advance(29.7)
    assert answers(h) == {}
    h.advance(0.1)  # 30 s: MAX_FETCH_WAIT_MS
    assert list(answers(h)) == [2]


def test_fetches_beyond_the_parking_limit_are_answered_at_once(with_topic):
    h = with_topic
    for request_id in range(1, MAX_PARKED_FETCHES + 2):
        h.request("fetch", fetch_body(0, max_wait_ms=5000), request_id=request_id)
    assert list(answers(h)) == [MAX_PARKED_FETCHES + 1]
    assert len(h.core.partitions[("t", 0)].parked_fetches) == MAX_PARKED_FETCHES


def test_a_fetch_past_the_end_is_out_of_range_and_one_inside_returns_whole_batches_from_the_offset(with_topic):
    h = with_topic
    h.request("produce", produce_body(), (batch([b"a", b"b"]),))
    h.request("produce", produce_body(), (batch([b"c"], base_sequence=2),))
    assert error_of(h.request("fetch", fetch_body(4))) == ("offset_out_of_range", "offset 4 is past the end 3 of t/0")
    reply = h.request("fetch", fetch_body(2))
    values = [r.value for r in batch_format.decode_records(reply.payloads[0], "t", 0, 2)]
    assert values == [b"c"] and reply.body["high_watermark"] == 3


def test_list_offsets_finds_the_earliest_the_latest_and_the_first_at_a_timestamp(with_topic):
    h = with_topic
    for sequence, timestamp_ms in enumerate((100, 200, 300)):
        h.request("produce", produce_body(), (batch([b"v"], base_sequence=sequence, timestamp_ms=timestamp_ms),))

    def offset_of(timestamp_ms: int) -> int:
        return h.request("list_offsets", {"topic": "t", "partition": 0, "timestamp_ms": timestamp_ms}).body["offset"]

    assert [offset_of(-2), offset_of(-1), offset_of(150), offset_of(200), offset_of(999)] == [0, 3, 1, 1, 3]


def test_a_produce_to_the_internal_offsets_topic_is_refused_and_stores_nothing():
    h = CoreHarness("n1", partitions=1)
    h.request("metadata", {"topics": [OFFSETS_TOPIC], "auto_create": False})
    reply = h.request("produce", produce_body(OFFSETS_TOPIC, 0), (batch([b"junk"]),))
    assert reply.type == "error", reply
    assert h.core.partitions[(OFFSETS_TOPIC, 0)].log.end_offset == 0


def _hand_over(net: Net, leader: CoreHarness, follower: CoreHarness):
    """Make ``follower`` the preferred replica of t/0 on both nodes and run until the leader starts handing
    leadership over: its ``repl_timeout_now`` then waits undelivered in ``leader.sent``."""
    a, b = leader.core.node_id, follower.core.node_id
    for h in (leader, follower):
        replica = h.core.partitions[("t", 0)].replica
        replica.set_config([b, a], [], replica.config_version + 1, net.clock.now_s)
    replica = leader.core.partitions[("t", 0)].replica
    start = net.clock.now_s
    while True:
        assert net.clock.now_s - start < 10.0 and replica.is_leader, "no hand-off"
        net.clock.now_s += 0.05
        fire_due_timers(leader)
        if replica.handing_off(net.clock.now_s):
            return replica
        fire_due_timers(follower)
        net.pump()


def test_a_produce_reaching_a_leader_that_hands_over_waits_and_is_sent_on_to_the_new_leader():
    net, leader, follower = replicated_pair()
    _hand_over(net, leader, follower)
    end = leader.core.partitions[("t", 0)].log.end_offset
    assert leader.request("produce", produce_body(acks="quorum"), (batch([b"a"]),)) is None, "held, not refused"
    assert leader.core.counters["produces_parked"] == 1
    net.pump()  # the hand-off: the follower campaigns, wins, and its first append deposes the old leader
    assert follower.core.partitions[("t", 0)].replica.is_leader
    reply = answers(leader)[77]
    assert error_of(reply) == ("not_leader", f"leadership of t/0 moved from {leader.core.node_id} to "
                                             f"{follower.core.node_id}; retry there")
    assert reply.body["leader"] == follower.core.node_id
    assert leader.core.partitions[("t", 0)].log.end_offset == end, "nothing stored by the deposed leader"


def test_a_produce_held_while_a_hand_off_fails_is_served_once_the_write_pause_ends():
    net, leader, follower = replicated_pair()
    replica = _hand_over(net, leader, follower)
    leader.sent.clear()  # the repl_timeout_now is lost: the hand-off fails
    assert leader.request("produce", produce_body(acks="leader"), (batch([b"a"]),)) is None
    assert leader.request("produce", produce_body(acks="leader"), (batch([b"b"], base_sequence=1),),
                          request_id=78) is None
    net.run(replica.transfer_until_s - net.clock.now_s + 0.05)
    got = answers(leader)
    assert [got[77].body["base_offset"], got[78].body["base_offset"]] == [0, 1], "served in arrival order"
    assert records_of(leader, "t", 0) == [b"a", b"b"]


def test_a_voter_that_knows_no_leader_holds_a_produce_for_at_most_an_election_timeout():
    net, leader, follower = replicated_pair()
    net.cut(leader.core.node_id)
    replica = follower.core.partitions[("t", 0)].replica
    net.run_until(lambda: replica.leader is None, within_s=5.0)  # it campaigns (and cannot win alone)
    assert follower.request("produce", produce_body(), (batch([b"a"]),)) is None
    net.run(replica.election_timeout_s - 0.1)
    assert answers(follower) == {}
    net.run(0.15)
    code, message = error_of(answers(follower)[77])
    assert code == "not_leader" and message.startswith(f"{follower.core.node_id} does not lead t/0"), message
    assert follower.core.partitions[("t", 0)].log.end_offset == 0
