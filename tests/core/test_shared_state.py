"""The pure state of a shared subscription on one partition (meshq.core.shared_state)."""

from __future__ import annotations

import msgpack

from meshq.core.shared_state import (
    DEFAULT_PRIORITY,
    LOW_SLOT_EVERY,
    REASON_MAX_DELIVERIES,
    REASON_REJECTED,
    SharedState,
    record_deliver_at,
    record_priority,
)

NOW_MS = 1_000_000


def fill(state: SharedState, offsets, priority: int = DEFAULT_PRIORITY, deliver_at: int = 0, skipped=()) -> None:
    offsets = list(offsets)
    end = max(offsets + list(skipped)) + 1
    state.scan([(o, priority, deliver_at) for o in offsets], list(skipped), end, NOW_MS)


def hand_out(state: SharedState, n: int, member: str = "m1", now_s: float = 0.0, timeout_ms: int = 1000,
             max_deliveries: int = 5) -> list[int]:
    offsets = state.take(n)
    state.deliver(offsets, member, now_s, timeout_ms, max_deliveries)
    return offsets


def test_acks_in_any_order_move_the_floor_over_done_and_skipped_offsets():
    state = SharedState("g", 0)
    fill(state, [0, 1, 2, 4, 5], skipped=[3])  # offset 3 holds a control batch
    assert hand_out(state, 10) == [0, 1, 2, 4, 5]
    for offset in (2, 4, 0):
        assert state.ack(offset, "m1")
    assert state.floor == 1 and state.done == {2, 3, 4}
    assert state.ack(1, "m1")
    assert state.floor == 5 and state.done == set()
    assert state.ack(5, "m1") and state.floor == 6 and state.stats["acked"] == 5


def test_bad_acks_change_nothing_and_are_counted_stale():
    state = SharedState("g", 0)
    fill(state, range(3))
    hand_out(state, 2, member="m1")
    before = state.snapshot()
    assert not state.ack(0, "m2"), "another member's record"
    assert not state.ack(2, "m1"), "never handed out"
    assert not state.nack(7, "m1", 0, NOW_MS), "unknown offset"
    assert not state.reject(1, "m2")
    assert state.snapshot()["in_flight"] == before["in_flight"] and state.floor == 0
    assert state.stats["stale_acks"] == 4
    assert state.ack(0, "m1")
    assert not state.ack(0, "m1"), "twice"
    assert state.stats["stale_acks"] == 5 and state.stats["acked"] == 1


def test_expired_records_are_redelivered_oldest_first_then_dead_lettered():
    state = SharedState("g", 0)
    fill(state, range(4))
    hand_out(state, 4, now_s=0.0, timeout_ms=1000, max_deliveries=2)
    assert state.next_deadline_s() == 1.0
    assert state.expire(0.5) == [] and len(state.in_flight) == 4
    assert state.expire(1.0) == []
    assert state.stats["redelivered"] == 4 and not state.in_flight
    assert not state.ack(1, "m1"), "an ack after the deadline is stale: the record is queued again"
    offsets = state.take(4)
    assert offsets == [0, 1, 2, 3]
    entries = state.deliver(offsets, "m2", 2.0, 1000, 2)
    assert [e[1] for e in entries] == [2, 2, 2, 2]
    assert state.ack(0, "m2")
    assert state.expire(3.0) == [1, 2, 3], "the second delivery was the last: to the DLQ"
    assert state.dead_pending == {1: REASON_MAX_DELIVERIES, 2: REASON_MAX_DELIVERIES, 3: REASON_MAX_DELIVERIES}
    assert state.take(10) == []
    for offset in (1, 2, 3):
        state.dead_lettered(offset)
    assert state.floor == 4 and state.stats["dead_lettered"] == 3 and state.next_deadline_s() is None


def test_reject_and_nack_with_delay():
    state = SharedState("g", 0)
    fill(state, range(3))
    hand_out(state, 3)
    assert state.reject(0, "m1") and state.dead_pending == {0: REASON_REJECTED}
    assert state.nack(1, "m1", NOW_MS + 500, NOW_MS)
    assert state.nack(2, "m1", 0, NOW_MS)
    assert state.take(10) == [2]
    assert state.next_due_ms() == NOW_MS + 500
    assert state.release_due(NOW_MS + 499) == 0
    assert state.release_due(NOW_MS + 500) == 1 and state.take(10) == [1]


def test_delayed_records_wait_in_an_index_and_cost_nothing_until_due():
    state = SharedState("g", 0)
    fill(state, range(100_000), deliver_at=NOW_MS + 60_000)
    fill(state, [100_000])
    assert state.unfinished() == 1, "delayed records do not fill the scan window"
    assert state.take(10) == [100_000], "only the record that is due"
    assert len(state.waiting) == 100_000 and state.next_due_ms() == NOW_MS + 60_000
    assert state.release_due(NOW_MS + 59_999) == 0
    assert state.release_due(NOW_MS + 60_000) == 100_000 and len(state.take(200_000)) == 100_000


def test_priorities_higher_first_and_no_starvation_bound():
    state = SharedState("g", 0)
    fill(state, range(0, 10), priority=0)
    fill(state, range(10, 1000), priority=9)
    fill(state, range(1000, 1010), priority=4)
    order = state.take(1010)
    assert order[:3] == [10, 11, 12], "the highest level first, oldest first"
    # Every LOW_SLOT_EVERY-th slot goes to the oldest ready record below the top level.
    assert order[LOW_SLOT_EVERY - 1] == 0
    position = {offset: i for i, offset in enumerate(order)}
    for n, offset in enumerate(range(0, 10)):  # n older lower-level records ahead of it
        assert position[offset] < LOW_SLOT_EVERY * (n + 1), offset
    assert sorted(order) == list(range(1010))
    # Within the lower levels, the oldest record goes first whatever its level.
    assert [o for o in order if o < 10 or o >= 1000][:10] == list(range(10))


def test_snapshot_and_ops_replay_to_the_same_state():
    live = SharedState("g", 0)
    fill(live, range(20))
    ops = [["s", live.snapshot()]]
    ops.append(["d", live.deliver(live.take(8), "m1", 0.0, 5000, 3)])
    live.ack(0, "m1")
    live.ack(3, "m1")
    ops.append(["a", [0, 3]])
    live.nack(1, "m1", NOW_MS + 10_000, NOW_MS)
    ops.append(["r", [[1, NOW_MS + 10_000]]])
    live.reject(2, "m1")
    live.dead_lettered(2)
    ops.append(["x", [[2, REASON_REJECTED]]])
    ops.append(["s", live.snapshot()])
    ops.append(["d", live.deliver(live.take(2), "m2", 1.0, 5000, 3)])
    ops = msgpack.unpackb(msgpack.packb(ops))  # as stored in the control batches
    for start in (0, len(ops) - 2):  # from the beginning, or from the last snapshot
        replayed = SharedState("g", 0)
        for op in ops[start:]:
            replayed.apply(op, 100.0)
        replayed.scan([(o, 4, 0) for o in range(20)], [], 20, NOW_MS)
        assert replayed.floor == live.floor == 0 or replayed.floor == live.floor
        assert replayed.counts == live.counts
        assert {o: f.member for o, f in replayed.in_flight.items()} == {o: f.member for o, f in live.in_flight.items()}
        assert replayed.waiting == live.waiting == {1: NOW_MS + 10_000}
        assert sorted(replayed.take(100)) == sorted(live.take(100)), "the same records are ready"
        assert replayed.next_deadline_s() == 105.0, "replayed deliveries get a fresh ack timeout"
        live = _rebuild(ops)


def _rebuild(ops):
    state = SharedState("g", 0)
    for op in ops:
        state.apply(op, 100.0)
    state.scan([(o, 4, 0) for o in range(20)], [], 20, NOW_MS)
    return state


def test_headers_parse_defensively():
    assert record_priority({}) == 4 and record_priority({"meshq-priority": b"9"}) == 9
    assert record_priority({"meshq-priority": b"x"}) == 4 and record_priority({"meshq-priority": b"12"}) == 4
    assert record_deliver_at({"meshq-deliver-at": b"123"}) == 123 and record_deliver_at({"meshq-deliver-at": b"?"}) == 0
