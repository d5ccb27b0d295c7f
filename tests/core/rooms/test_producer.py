"""The ``producer`` room (meshq.core.client.producer): records into batches, exactly once in the log."""

from __future__ import annotations

import pytest

from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.client.metadata import METADATA_RETRY_S
from meshq.core.client.producer import HINT_RETRY_S, MAX_HINT_FOLLOWS
from meshq.core.cluster.agreement import OFFSETS_TOPIC
from meshq.core.events import ReplyReceived
from meshq.errors import InvalidTopicError, MessageTooLargeError, NodeStoppedError, TimeoutError, UsageError
from tests.core.harness import CoreHarness, pump
from tests.core.rooms.conftest import sent_of


@pytest.fixture
def server() -> CoreHarness:
    return CoreHarness("server", partitions=2)


def remote_producer(server: CoreHarness, **config) -> CoreHarness:
    """A client node that met ``server`` (deliver with ``pump(h, server)``)."""
    h = CoreHarness("c1", role="client", data_dir=None, seeds=("127.0.0.1:9000",), **config)
    pump(h, server)
    return h


def in_flight(h: CoreHarness) -> list[tuple[int, int]]:
    """(producer epoch, base sequence) of each produce batch ``h`` has sent and nobody delivered yet."""
    headers = [batch_format.parse_header(message.payloads[0]) for _peer, message in sent_of(h, "produce")]
    return [(header.producer_epoch, header.base_sequence) for header in headers]


def test_keyless_records_of_one_call_stay_on_one_partition_and_the_next_call_moves_on():
    h = CoreHarness("n1", partitions=4)
    partitions = [{p for _t, p, _o in h.produce("t", [b"a", b"b", b"c"]).results} for _ in range(5)]
    assert all(len(one) == 1 for one in partitions)
    first = partitions[0].pop()
    assert [one.pop() for one in partitions[1:]] == [(first + i) % 4 for i in range(1, 5)]


def test_records_are_cut_into_batches_of_at_most_batch_max_records_numbered_by_sequence():
    h = CoreHarness("n1", batch_max_records=3)
    outcome = h.produce("t", [b"%d" % i for i in range(7)], partition=0)
    assert [offset for _t, _p, offset in outcome.results] == list(range(7))
    state = h.core.partitions[("t", 0)]
    headers = [header for _pos, header in batch_format.iter_batches(state.log.read(0, 1 << 20))]
    assert [(hd.base_sequence, hd.record_count) for hd in headers] == [(0, 3), (3, 3), (6, 1)]
    assert {hd.producer_id for hd in headers} == {h.core.producer.producer_id}


def test_no_more_than_max_in_flight_batches_per_partition_are_sent_at_once(server):
    h = remote_producer(server, max_in_flight_per_partition=2, batch_max_records=1)
    outcome = h.produce("t", [b"1", b"2", b"3", b"4", b"5"], partition=0)
    pump(h, server, rounds=1)  # the metadata answer: the first batches go out
    assert in_flight(h) == [(0, 0), (0, 1)]
    pump(h, server, rounds=1)  # their answers: the next ones go out
    assert in_flight(h) == [(0, 2), (0, 3)]
    pump(h, server)
    assert [offset for _t, _p, offset in outcome.results] == [0, 1, 2, 3, 4]


def test_a_batch_whose_answer_never_came_is_sent_again_with_the_same_bytes_after_a_metadata_refresh(server):
    h = remote_producer(server, request_timeout_s=1.0)
    outcome = h.produce("t", [b"x"], partition=1, timeout_s=10.0)
    pump(h, server, rounds=1)
    (first,) = sent_of(h, "produce", clear=True)  # lost on the way
    h.advance(1.0)  # its request times out: retried after METADATA_RETRY_S
    assert sent_of(h, "metadata") == [] and sent_of(h, "produce") == []
    h.advance(METADATA_RETRY_S)
    assert len(sent_of(h, "metadata")) == 1
    pump(h, server, rounds=1)
    (again,) = sent_of(h, "produce")
    assert again[1].payloads == first[1].payloads
    pump(h, server)
    assert outcome.results == [("t", 1, 0)] and outcome.errors == []


def _not_leader(h: CoreHarness, sent: tuple[str, wire.Message], hint: str | None) -> None:
    """Answer one produce request ``h`` sent with ``not_leader``, naming ``hint`` as the leader."""
    peer, message = sent
    body = {"code": "not_leader", "message": "moved", "retriable": True, "leader": hint}
    h.handle(ReplyReceived(peer, wire.Message("error", peer, message.request_id, body)))


def test_a_not_leader_answer_naming_the_leader_is_followed_at_once_without_a_metadata_refresh(server):
    h = remote_producer(server)
    h.core.out.peer_endpoints["server2"] = "tcp://127.0.0.1:9002"  # a member the client reaches
    outcome = h.produce("t", [b"x"], partition=1, timeout_s=10.0)
    pump(h, server, rounds=1)  # metadata: server leads
    (first,) = sent_of(h, "produce", clear=True)
    assert first[0] == "server"
    _not_leader(h, first, "server2")  # a hand-off: server names its successor
    h.advance(0.0)
    (again,) = sent_of(h, "produce", clear=True)
    assert again[0] == "server2" and again[1].payloads == first[1].payloads, "same bytes, at once, to the named node"
    _not_leader(h, again, "server")  # views not agreed yet: the next follow waits a little
    h.advance(HINT_RETRY_S / 2)
    assert sent_of(h, "produce") == []
    h.advance(HINT_RETRY_S / 2)
    assert [peer for peer, _message in sent_of(h, "produce")] == ["server"]
    assert sent_of(h, "metadata") == [], "no metadata refresh on the way"
    assert outcome.results == [] and outcome.errors == []


def test_a_hint_nobody_can_use_or_one_followed_too_often_takes_the_refresh_path(server):
    h = remote_producer(server)
    h.core.out.peer_endpoints["server2"] = "tcp://127.0.0.1:9002"
    h.produce("t", [b"x"], partition=1, timeout_s=30.0)
    pump(h, server, rounds=1)
    sent = sent_of(h, "produce", clear=True)[0]
    _not_leader(h, sent, "stranger")  # not a member we reach
    h.advance(HINT_RETRY_S)
    assert sent_of(h, "produce") == []
    h.advance(METADATA_RETRY_S)
    assert len(sent_of(h, "metadata")) == 1
    pump(h, server, rounds=1)  # the refresh names server again; the batch goes there
    followed = 0
    targets = ["server2", "server"]
    while True:  # two nodes that name each other
        produced = sent_of(h, "produce", clear=True)
        if not produced:
            break
        _not_leader(h, produced[0], targets[followed % 2])
        followed += 1
        h.advance(HINT_RETRY_S)
        assert followed <= MAX_HINT_FOLLOWS + 1, "hints followed without end"
    assert followed == MAX_HINT_FOLLOWS + 1
    h.advance(METADATA_RETRY_S)
    assert len(sent_of(h, "metadata")) == 1, "after MAX_HINT_FOLLOWS the refresh path takes over"


def test_a_batch_that_fails_for_good_starts_a_new_epoch_and_renumbers_what_was_never_sent(server):
    h = remote_producer(server, max_in_flight_per_partition=1, request_timeout_s=1.0)
    h.produce("t", [b"warm"], partition=0)
    pump(h, server)
    lost = h.produce("t", [b"a"], partition=0, timeout_s=1.0)
    queued = h.produce("t", [b"b"], partition=0, timeout_s=10.0)
    assert in_flight(h) == [(0, 1)]  # a; b waits
    h.sent.clear()  # a is lost
    h.advance(1.0)
    (error,) = lost.errors
    assert isinstance(error, TimeoutError)
    h.advance(METADATA_RETRY_S)
    pump(h, server, rounds=1)
    assert in_flight(h) == [(1, 0)]  # b, renumbered under the new epoch
    pump(h, server)
    assert queued.results == [("t", 0, 1)]
    assert h.core.producer.producer_epoch == 1


def test_acks_none_uses_its_own_producer_id_and_is_settled_as_soon_as_it_is_sent():
    h = CoreHarness("n1")
    outcome = h.produce("t", [b"x"], partition=0, acks="none")
    assert outcome.results == [("t", 0, -1)] and outcome.errors == []
    (header,) = [hd for _pos, hd in batch_format.iter_batches(h.core.partitions[("t", 0)].log.read(0, 1 << 20))]
    assert header.producer_id == h.core.producer.at_most_once_id != h.core.producer.producer_id


@pytest.mark.parametrize(("topic", "records", "partition", "error_type", "message"), [
    ("bad name", [b"x"], None, InvalidTopicError,
     "invalid topic name 'bad name': use 1-200 characters from letters, digits, '.', '_' and '-'"),
    ("t", [b"x"], 4, UsageError, "partition 4 does not exist; 't' has 2"),
    ("t", [b"x" * 3_000_000], 0, MessageTooLargeError,
     "a record batch of 3000071 bytes exceeds the limit of 2097152; send smaller records"),
])
def test_a_produce_that_cannot_be_sent_fails_every_record_saying_why_and_stores_nothing(
        topic, records, partition, error_type, message):
    h = CoreHarness("n1", partitions=2)
    outcome = h.produce(topic, records, partition=partition)
    assert [(type(e), str(e)) for e in outcome.errors] == [(error_type, message)]
    assert all(state.log.end_offset == 0 for state in h.core.partitions.values())


def test_a_produce_after_stop_fails_with_node_stopped(server):
    h = remote_producer(server)
    h.apply(h.core.stop(h.clock.now_s))
    outcome = h.produce("t", [b"x"])
    assert [type(e) for e in outcome.errors] == [NodeStoppedError] and h.sent == []


def test_a_produce_to_the_internal_offsets_topic_is_refused():
    h = CoreHarness("n1")
    outcome = h.produce(OFFSETS_TOPIC, [b"junk"])
    assert outcome.results == [] and len(outcome.errors) == 1
