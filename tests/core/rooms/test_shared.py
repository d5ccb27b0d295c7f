"""The ``shared`` room (meshq.core.partitions.shared): shared subscriptions at a partition's leader."""

from __future__ import annotations

import struct

import pytest

from meshq.core import batch as batch_format
from meshq.core.client.consumer import ConsumerState, FetchSpec
from meshq.core.events import ShareAck, ShareFetch
from tests.core.harness import CoreHarness
from tests.core.rooms.conftest import create_topic, error_of

ACK, NACK, REJECT = 0, 1, 2


def storage(**config) -> CoreHarness:
    h = CoreHarness("n1", partitions=1, replication_factor=1, **config)
    create_topic(h, "jobs", partitions=1)
    return h


def share_fetch(h: CoreHarness, member: str = "m1", max_records: int = 100, max_wait_ms: int = 0,
                ack_timeout_ms: int = 1000, max_deliveries: int = 3, request_id: int = 77):
    return h.request("share_fetch", {"group": "g", "topic": "jobs", "partition": 0, "member": member,
                                     "max_records": max_records, "max_wait_ms": max_wait_ms,
                                     "ack_timeout_ms": ack_timeout_ms, "max_deliveries": max_deliveries},
                     request_id=request_id)


def delivered(reply) -> list[tuple[int, int, bytes]]:
    """(offset, delivery count, value) of each record a share_fetch_ok carries."""
    assert reply is not None and reply.type == "share_fetch_ok", reply
    if not reply.body["index"]:
        return []
    index = list(struct.iter_unpack(">qi", reply.body["index"]))
    records = batch_format.decode_records(reply.payloads[0], "jobs", 0)
    assert [int(r.headers["meshq-delivery-count"]) for r in records] == [c for _o, c in index]
    return [(o, c, r.value) for (o, c), r in zip(index, records)]


def share_ack(h: CoreHarness, answers: list[tuple[int, int, int]], member: str = "m1"):
    payload = b"".join(struct.pack(">qBI", *a) for a in answers)
    return h.request("share_ack", {"group": "g", "topic": "jobs", "partition": 0, "member": member}, (payload,))


def control_batches(h: CoreHarness) -> int:
    state = h.core.partitions[("jobs", 0)]
    return sum(1 for _pos, header in batch_format.iter_batches(state.log.read(0, 1 << 30))
               if header.attributes & batch_format.CONTROL)


def test_deliveries_and_acks_are_one_control_batch_per_round_and_skipped_by_readers():
    h = storage()
    h.produce("jobs", [f"j{i}".encode() for i in range(10)])
    got = delivered(share_fetch(h, max_records=6))
    assert [(o, c) for o, c, _v in got] == [(i, 1) for i in range(6)]
    assert control_batches(h) == 1, "one control batch records six deliveries"
    assert share_ack(h, [(o, ACK, 0) for o, _c, _v in got]).body == {"stale": b""}
    assert control_batches(h) == 2, "one control batch records six acks"
    rest = delivered(share_fetch(h, member="m2"))
    assert [o for o, _c, _v in rest] == [6, 7, 8, 9]
    # A stream reader sees the ten records and reads on past the control batches (their offsets are gaps).
    state = h.core.partitions[("jobs", 0)]
    data = state.log.read(0, 1 << 30)
    assert [r.value for r in batch_format.decode_records(data, "jobs", 0)] == [f"j{i}".encode() for i in range(10)]
    consumer = ConsumerState("jobs", [0])
    consumer.start_at(0, 10)
    (spec,) = consumer.fetches_due(0.0)
    consumer.on_fetched(spec, state.log.read(10, 1 << 30))  # control batches only
    assert consumer.fetch_positions[0] == state.log.end_offset
    assert consumer.fetches_due(0.0) == [FetchSpec(0, state.log.end_offset, 0)]


def test_an_acked_record_is_never_redelivered_and_bad_answers_change_nothing():
    h = storage()
    h.produce("jobs", [b"a", b"b", b"c"])
    delivered(share_fetch(h))
    assert share_ack(h, [(0, ACK, 0)]).body == {"stale": b""}
    end = h.core.partitions[("jobs", 0)].log.end_offset
    reply = share_ack(h, [(0, ACK, 0), (1, ACK, 0), (9, NACK, 0)], member="m2")  # acked already, not its own, unknown
    assert struct.unpack(">3q", reply.body["stale"]) == (0, 1, 9)
    assert h.core.partitions[("jobs", 0)].log.end_offset == end, "nothing written"
    code, message = error_of(share_ack(h, [(1, 7, 0)]))
    assert code == "protocol" or "kind 7" in message
    assert h.core.partitions[("jobs", 0)].log.end_offset == end
    h.advance(1.5)  # ack timeout: 1 and 2 come back, 0 never does
    again = delivered(share_fetch(h))
    assert [(o, c) for o, c, _v in again] == [(1, 2), (2, 2)]


def test_state_is_rebuilt_from_the_control_log_when_leadership_comes_back():
    h = storage()
    h.produce("jobs", [f"j{i}".encode() for i in range(5)])
    delivered(share_fetch(h, max_records=3, ack_timeout_ms=60_000))
    share_ack(h, [(0, ACK, 0), (2, NACK, 0)])
    key = ("jobs", 0)
    h.core.shared.on_leadership(key, False)
    assert key not in h.core.shared.states
    h.core.shared.on_leadership(key, True)  # what a new leader does: replay the control batches
    group = h.core.shared.states[key]["g"]
    assert group.floor == 1 and set(group.in_flight) == {1} and group.counts == {1: 1, 2: 1}
    got = delivered(share_fetch(h, member="m2"))
    assert [(o, c) for o, c, _v in got] == [(2, 2), (3, 1), (4, 1)], "acked 0 is gone, held 1 waits for its timeout"
    assert share_ack(h, [(1, ACK, 0)]).body == {"stale": b""}, "the holder's ack still counts after the failover"


def test_a_parked_fetch_is_answered_when_records_arrive_and_timers_drive_redelivery():
    h = storage()
    assert share_fetch(h, max_wait_ms=5000) is None, "nothing to hand out: the fetch waits"
    h.produce("jobs", [b"x"])
    (message,) = [m for m in _answers(h) if m.type == "share_fetch_ok"]
    assert [(o, c) for o, c, _v in delivered(message)] == [(0, 1)]
    assert share_fetch(h, max_wait_ms=5000, request_id=78) is None
    h.advance(1.1)  # the ack timeout fires the one share_tick timer: the waiting fetch gets the record again
    (message,) = [m for m in _answers(h) if m.type == "share_fetch_ok"]
    assert [(o, c) for o, c, _v in delivered(message)] == [(0, 2)]


def _answers(h: CoreHarness):
    from tests.core.rooms.conftest import answers

    return list(answers(h).values())


def test_max_deliveries_and_reject_go_to_the_dead_letter_topic_with_headers():
    h = storage()
    h.produce("jobs", [b"poison", b"refused"])
    for attempt in (1, 2):
        got = delivered(share_fetch(h, max_deliveries=2))
        assert [(o, c) for o, c, _v in got] == ([(0, 1), (1, 1)] if attempt == 1 else [(0, 2)])
        if attempt == 1:
            share_ack(h, [(1, REJECT, 0)])
        h.advance(1.1)
        for _ in range(5):
            h.advance(0.1)
    assert "jobs.dlq" in h.core.topics and h.core.topics["jobs.dlq"].partitions == 1
    dlq = h.core.partitions[("jobs.dlq", 0)]
    records = batch_format.decode_records(dlq.log.read(0, 1 << 20), "jobs.dlq", 0)
    by_value = {r.value: r.headers for r in records}
    assert by_value[b"refused"]["meshq-dlq-reason"] == b"rejected"
    assert by_value[b"poison"]["meshq-dlq-reason"] == b"max_deliveries"
    assert by_value[b"poison"]["meshq-original-offset"] == b"0"
    assert by_value[b"poison"]["meshq-original-partition"] == b"0"
    group = h.core.shared.states[("jobs", 0)]["g"]
    assert group.stats["dead_lettered"] == 2 and group.floor >= 2
    assert delivered(share_fetch(h)) == []


def test_a_client_may_not_produce_a_control_batch():
    h = storage()
    data = batch_format.encode_batch([(None, b"forged", None, 1)], attributes=batch_format.CONTROL)
    code, message = error_of(h.request("produce", {"topic": "jobs", "partition": 0, "acks": "leader",
                                                   "timeout_ms": 1000}, (data,)))
    assert "CONTROL" in message
    assert h.core.partitions[("jobs", 0)].log.end_offset == 0


@pytest.mark.parametrize("command", [ShareFetch, ShareAck])
def test_client_commands_route_to_the_leader(command):
    h = storage()
    h.produce("jobs", [b"a"])
    if command is ShareFetch:
        token = h.command(ShareFetch("g", "jobs", 0, "m1", 10, 0.0))
        index, data = h.resolved[token]
        assert struct.unpack(">qi", index) == (0, 1) and data
    else:
        h.command(ShareFetch("g", "jobs", 0, "m1", 10, 0.0))
        token = h.command(ShareAck("g", "jobs", 0, "m1", struct.pack(">qBI", 0, ACK, 0)))
        assert h.resolved[token] == b""
