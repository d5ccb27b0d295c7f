"""The consumer's position state (meshq.core.client.consumer): pure, driven by hand."""

from __future__ import annotations

import pytest

from meshq.core.batch import encode_batch, stamp
from meshq.core.client.consumer import ConsumerState, FetchSpec
from meshq.errors import NotLeaderError, OffsetOutOfRangeError, UnknownTopicError, UsageError


def batch(base_offset: int, *values: bytes) -> bytes:
    return stamp(encode_batch([(None, v, None, 1000) for v in values]), base_offset, 1)


def started(partitions=(0, 1)) -> ConsumerState:
    state = ConsumerState("t", list(partitions))
    for p in partitions:
        state.start_at(p, 0)
    return state


def test_one_fetch_in_flight_per_partition_and_fetch_position_moves_on_records():
    state = started()
    first = state.fetches_due(0.0)
    assert [(s.partition, s.offset) for s in first] == [(0, 0), (1, 0)]
    assert state.fetches_due(0.0) == []  # both busy
    records = state.on_fetched(first[0], batch(0, b"a", b"b"))
    assert [r.value for r in records] == [b"a", b"b"]
    assert [(s.partition, s.offset) for s in state.fetches_due(0.0)] == [(0, 2)]
    assert state.position(0) == 0  # nothing handed out yet


def test_take_moves_positions_past_what_it_hands_out_only():
    state = started()
    spec = state.fetches_due(0.0)[0]
    state.on_fetched(spec, batch(0, b"a", b"b", b"c"))
    assert [r.value for r in state.take(2)] == [b"a", b"b"]
    assert state.position(0) == 2 and state.fetch_positions[0] == 3
    assert state.to_commit() == {0: 2, 1: 0}
    state.on_committed({0: 2, 1: 0})
    assert state.to_commit() == {}
    assert state.to_commit({0: 5}) == {0: 5}


def test_a_seek_drops_buffered_records_and_the_answer_to_a_fetch_sent_before_it():
    state = started()
    spec = state.fetches_due(0.0)[0]
    state.on_fetched(spec, batch(0, b"a"))
    stale = state.fetches_due(0.0)[0]
    state.seek(0, 10)
    assert not state.buffer and state.position(0) == 10
    assert state.on_fetched(stale, batch(1, b"b")) == []  # stale: ignored
    fresh = [s for s in state.fetches_due(0.0) if s.partition == 0]
    assert fresh[0].offset == 10 and fresh[0].generation == stale.generation + 1


def test_a_retriable_error_backs_the_partition_off_and_others_raise():
    state = started()
    spec = state.fetches_due(0.0)[0]
    assert state.on_fetch_failed(spec, NotLeaderError("moved"), now_s=1.0) is False
    assert [s.partition for s in state.fetches_due(1.05)] == []  # partition 1 still busy, 0 backing off
    assert [s.partition for s in state.fetches_due(1.2)] == [0]
    busy = ConsumerState("t", [0])
    busy.start_at(0, 0)
    with pytest.raises(UnknownTopicError):
        busy.on_fetch_failed(busy.fetches_due(0.0)[0], UnknownTopicError("gone"), 0.0)


def test_offset_out_of_range_asks_for_a_reset():
    state = started((0,))
    spec = state.fetches_due(0.0)[0]
    assert state.on_fetch_failed(spec, OffsetOutOfRangeError("past the end"), 0.0) is True
    state.reset(0, 7)
    assert state.position(0) == 7 and state.fetches_due(0.0)[0].offset == 7


def test_a_batch_that_begins_before_the_requested_offset_yields_only_the_records_from_it():
    state = started((0,))
    state.seek(0, 4)
    spec = state.fetches_due(0.0)[0]
    records = state.on_fetched(spec, batch(3, b"x", b"y", b"z"))
    assert [(r.offset, r.value) for r in records] == [(4, b"y"), (5, b"z")]
    assert state.fetch_positions[0] == 6


def test_unassigned_partitions_are_refused():
    state = started((0,))
    with pytest.raises(UsageError):
        state.seek(3, 0)
    with pytest.raises(UsageError):
        state.position(3)


def test_revoke_drops_a_partition_with_its_buffer_and_ignores_its_fetch_in_flight():
    state = started((0, 1))
    specs = {s.partition: s for s in state.fetches_due(0.0)}
    state.on_fetched(specs[1], batch(0, b"x"))
    state.revoke([1])
    assert state.partitions == [0] and 1 not in state.positions and list(state.buffer) == []
    with pytest.raises(UsageError):
        state.position(1)
    state.assign([1])  # given back in a later generation: the old fetch's answer still does not count
    state.start_at(1, 5)
    assert state.on_fetched(specs[1], batch(1, b"late")) == []
    assert [(s.partition, s.offset) for s in state.fetches_due(0.0)] == [(1, 5)]


def test_assign_adds_partitions_to_start_and_commits_only_count_for_held_ones():
    state = ConsumerState("t", [])
    assert state.fetches_due(0.0) == []
    state.assign([3, 2])
    assert state.partitions == [2, 3]
    assert state.fetches_due(0.0) == []  # not started yet
    state.start_at(2, 7, committed=True)
    state.on_committed({2: 9, 3: 1})
    assert state.committed == {2: 9}
def test_a_delayed_record_holds_back_its_partition_in_order_and_others_go_on():
    from meshq.core import batch as batch_format
    from meshq.core.client.consumer import ConsumerState

    state = ConsumerState("t", [0, 1])
    state.start_at(0, 0)
    state.start_at(1, 0)
    spec0, spec1 = state.fetches_due(0.0)
    state.on_fetched(spec0, batch_format.encode_batch([
        (None, b"now", None, 1), (None, b"later", {"meshq-deliver-at": b"5000"}, 1), (None, b"after", None, 1)]))
    state.on_fetched(spec1, batch_format.encode_batch([(None, b"other", None, 1)]))
    assert [r.value for r in state.take(10, now_ms=4999)] == [b"now", b"other"]
    assert state.held == {0} and state.positions[0] == 1
    assert [s.partition for s in state.fetches_due(0.0)] == [1], "a held partition is not fetched further"
    assert state.take(10, now_ms=4999) == []
    assert [r.value for r in state.take(10, now_ms=5000)] == [b"later", b"after"], "in order once due"
    assert state.held == set()


@pytest.mark.parametrize("damage", ["flip", "truncate_header", "garbage"])
def test_a_fetch_answer_damaged_on_the_way_is_dropped_counted_and_fetched_again(damage):
    """Found by the simulator's ``corrupt`` fault: a fetch answer whose batch failed its CRC raised
    CorruptLogError out of the consumer (into the application's poll). A node never serves a batch
    its disk damaged, so such bytes were damaged on the way: drop, count, fetch again."""
    state = started((0,))
    (spec,) = state.fetches_due(0.0)
    data = bytearray(batch(0, b"a", b"b"))
    if damage == "flip":
        data[-3] ^= 0x10
    elif damage == "truncate_header":
        data[30] ^= 0xFF  # inside last_offset_delta: the header no longer matches its count
    else:
        data[:] = b"\x00" * 70
    assert state.on_fetched(spec, bytes(data)) == []
    assert state.invalid_fetches == 1
    assert [(s.partition, s.offset) for s in state.fetches_due(0.0)] == [(0, 0)]  # the same offset again
    assert state.take(10) == []


@pytest.mark.parametrize("damage", ["index", "batch", "count"])
def test_a_shared_fetch_answer_damaged_on_the_way_is_dropped_and_counted(damage):
    from meshq.core.client.shared import _INDEX, SharedConsumerState

    state = SharedConsumerState("t", [0])
    (due,) = state.fetches_due(0.0)
    index = _INDEX.pack(5, 1) + _INDEX.pack(6, 1)
    data = bytearray(batch(5, b"a", b"b"))
    if damage == "index":
        index = index[:-3]
    elif damage == "batch":
        data[-3] ^= 0x10
    else:
        index = index[:_INDEX.size]
    assert state.on_fetched(due[0], index, bytes(data)) == []
    assert state.stats["invalid_fetches"] == 1 and state.stats["received"] == 0
    assert state.fetches_due(0.0)  # the partition is free to be fetched again


@pytest.mark.parametrize("now_ms", [None, 1000])
def test_take_of_interleaved_partitions_sets_each_position_past_its_last_record(now_ms):
    state = started()
    first, second = state.fetches_due(0.0)
    state.on_fetched(first, batch(0, b"a", b"b"))
    state.on_fetched(second, batch(0, b"x", b"y", b"z"))
    state.on_fetched(state.fetches_due(0.0)[0], batch(2, b"c"))  # partition 0 again, after partition 1
    taken = state.take(4, now_ms=now_ms)  # part of the buffer: a, b, x, y
    assert [(r.partition, r.value) for r in taken] == [(0, b"a"), (0, b"b"), (1, b"x"), (1, b"y")]
    assert (state.position(0), state.position(1)) == (2, 2)
    taken = state.take(10, now_ms=now_ms)  # the whole rest: z, c
    assert [(r.partition, r.offset) for r in taken] == [(1, 2), (0, 2)]
    assert (state.position(0), state.position(1)) == (3, 3) and not state.buffer


def test_records_without_headers_each_get_their_own_headers_dict():
    state = started()
    state.on_fetched(state.fetches_due(0.0)[0], batch(0, b"a", b"b"))
    first, second = state.take(2)
    first.headers["mine"] = b"1"
    assert second.headers == {}
    with pytest.raises(AttributeError):
        first.value = b"changed"  # records stay immutable


def test_a_partition_is_prefetched_once_half_of_its_last_fetch_is_handed_out():
    state = started()
    first, second = state.fetches_due(0.0)
    state.on_fetched(first, batch(0, b"a", b"b", b"c", b"d"))
    assert state.prefetches_due(0.0) == []  # partition 0: 4 buffered; partition 1: still in flight
    state.take(1)
    assert state.prefetches_due(0.0) == [], "3 of 4 left: more than half"
    state.take(1)
    (spec,) = state.prefetches_due(0.0)  # 2 of 4 left: the next 4 are asked for now
    assert (spec.partition, spec.offset) == (0, 4)
    assert state.prefetches_due(0.0) == [] and state.fetches_due(0.0) == [], "one fetch in flight per partition"
    state.on_fetched(spec, batch(4, b"e"))
    assert [r.value for r in state.take(10)] == [b"c", b"d", b"e"]
    assert state.position(0) == 5
    state.on_fetched(second, b"")  # partition 1 has nothing buffered: asked again as well
    assert [s.partition for s in state.prefetches_due(0.0)] == [0, 1]
    assert state.fetches_due(0.0) == []


def test_a_held_or_backing_off_partition_is_not_prefetched():
    state = started((0,))
    state.on_fetched(state.fetches_due(0.0)[0], b"")
    assert [s.partition for s in state.prefetches_due(0.0)] == [0]
    state.on_fetch_failed(FetchSpec(0, 0, 0), NotLeaderError("moved"), 0.0)
    assert state.prefetches_due(0.0) == []  # backing off
    assert [s.partition for s in state.prefetches_due(1.0)] == [0]
