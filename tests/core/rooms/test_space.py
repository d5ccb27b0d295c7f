"""The ``space`` room (meshq.core.partitions.space.StorageSpace): a full disk refuses new records,
keeps serving reads, and lifts the refusal by itself once space returns."""

from __future__ import annotations

from meshq.core.partitions.space import FULL_RECHECK_S
from meshq.core.status import merge_status
from meshq.errors import DiskFullError, StorageFullError
from meshq.log.memory import MemoryStorage
from tests.core.harness import CoreHarness
from tests.core.rooms.conftest import Net, answers, batch, create_topic, error_of, produce_body, records_of


def fetch_body(offset: int) -> dict:
    return {"topic": "t", "partition": 0, "offset": offset, "max_bytes": 1 << 20, "max_wait_ms": 0}


def produce(h: CoreHarness, value: bytes, sequence: int, acks: str = "leader"):
    return h.request("produce", produce_body(acks=acks), (batch([value], base_sequence=sequence),))


def lone_with(storage: MemoryStorage) -> CoreHarness:
    h = CoreHarness("n1", storage=storage)
    create_topic(h, "t", 1)
    return h


def fill(h: CoreHarness, value: bytes) -> int:
    """Produce ``value`` until the disk refuses one; returns how many were acknowledged."""
    for sequence in range(10_000):
        reply = produce(h, value, sequence)
        if reply.type == "error":
            code, message = error_of(reply)
            assert code == "storage_full", message
            return sequence
    raise AssertionError("the disk never filled")


def test_a_write_that_finds_the_disk_full_is_refused_and_nothing_is_stored():
    storage = MemoryStorage(capacity_bytes=20_000)
    h = lone_with(storage)
    stored = fill(h, b"x" * 1000)
    assert stored > 0
    assert h.core.space.full and h.core.status.local_status()["storage_full"] is True
    end = h.core.partitions[("t", 0)].log.end_offset
    assert end == stored  # the refused batch left nothing behind
    # refused at once from now on, before the log is even tried, with what to do
    code, message = error_of(produce(h, b"y", stored))
    assert code == "storage_full"
    assert "storage is full" in message and "Free space" in message and "Nothing was stored" in message
    assert h.core.partitions[("t", 0)].log.end_offset == end
    assert h.core.counters["storage_full_refused"] == 2


def test_reads_go_on_while_the_disk_is_full():
    h = lone_with(MemoryStorage(capacity_bytes=20_000))
    stored = fill(h, b"x" * 1000)
    h.advance(0.1)
    reply = h.request("fetch", fetch_body(0))
    assert reply.type == "fetch_ok", reply
    assert records_of(h, "t", 0) == [b"x" * 1000] * stored


def test_the_refusal_lifts_by_itself_when_space_returns_and_nothing_acknowledged_is_lost():
    storage = MemoryStorage(capacity_bytes=20_000)
    h = lone_with(storage)
    stored = fill(h, b"x" * 1000)
    end = h.core.partitions[("t", 0)].log.end_offset
    # no reserve (min_free_bytes 0): the check lifts the refusal and the next write is a retry,
    # which fails again while there is no room, costing nothing stored
    h.advance(h.config.storage_check_interval_s)
    assert not h.core.space.full
    assert error_of(produce(h, b"x" * 1000, stored))[0] == "storage_full"
    assert h.core.space.full and h.core.partitions[("t", 0)].log.end_offset == end
    storage.set_capacity(None)
    h.advance(h.config.storage_check_interval_s)
    assert not h.core.space.full and h.core.status.local_status()["storage_full"] is False
    reply = produce(h, b"after", stored)
    assert reply.type == "produce_ok" and reply.body["base_offset"] == stored
    assert records_of(h, "t", 0) == [b"x" * 1000] * stored + [b"after"]


def test_free_space_below_the_reserve_refuses_writes_before_the_disk_is_full():
    storage = MemoryStorage(capacity_bytes=100_000, min_free_bytes=90_000)
    h = lone_with(storage)
    first = produce(h, b"x" * 20_000, 0)
    assert first.type == "produce_ok"  # fits: the reserve is measured by the periodic check
    h.advance(h.config.storage_check_interval_s)
    assert h.core.space.full and "below the reserve" in h.core.space.full_reason
    code, _message = error_of(produce(h, b"y", 1))
    assert code == "storage_full"
    storage.set_capacity(1_000_000)
    h.advance(h.config.storage_check_interval_s)
    assert produce(h, b"y", 1).type == "produce_ok"


def test_a_follower_whose_disk_is_full_falls_out_of_the_in_sync_replicas_and_quorum_writes_go_on():
    net = Net("n1", "n2", "n3")
    create_topic(net.form(), "t", 1, 3, net=net)
    net.run(2.0)
    leader = net[net["n1"].core.partitions[("t", 0)].replica.leader]
    name = min(n for n in ("n1", "n2", "n3") if n != leader.core.node_id)  # a follower
    replica = leader.core.partitions[("t", 0)].replica
    assert name in replica.in_sync(net.clock.now_s)
    full = net[name].storage
    full.set_capacity(full.used_bytes + 100)  # the follower's disk is now full
    for sequence in range(20):
        produce(leader, f"r{sequence}".encode() * 100, sequence, acks="quorum")
        net.run(0.2)
    net.run(leader.config.failure_timeout_s * 2)
    answered = answers(leader)
    assert len(answered) == 1 and next(iter(answered.values())).type == "produce_ok"  # (one request id: 77)
    assert name not in replica.in_sync(net.clock.now_s)
    assert net[name].core.space.full
    assert net[name].core.partitions[("t", 0)].log.end_offset < leader.core.partitions[("t", 0)].log.end_offset
    # quorum writes were acknowledged by the other two replicas
    assert replica.high_watermark == leader.core.partitions[("t", 0)].log.end_offset
    # space returns: the follower catches up and is in sync again, with the same records
    full.set_capacity(None)
    net.run_until(lambda: name in replica.in_sync(net.clock.now_s), 30.0)
    assert records_of(net[name], "t", 0) == records_of(leader, "t", 0)


def test_status_reports_each_storage_node_and_unknown_for_one_that_did_not_answer():
    h = lone_with(MemoryStorage(capacity_bytes=20_000))
    fill(h, b"x" * 1000)
    report = h.core.status.local_status()
    report["members"] = report["members"] + [{"node_id": "n9", "address": "tcp://x:1", "role": "storage",
                                               "state": "unknown"}]
    merged = merge_status({"n1": report}, "n1")
    by_id = {m["node_id"]: m for m in merged["members"]}
    assert by_id["n1"]["storage_full"] is True
    assert by_id["n9"]["storage_full"] is None


class FailingMeta(MemoryStorage):
    """Metadata writes fail with ENOSPC while ``failing`` is set."""

    failing = False

    def write_meta(self, name: str, value: dict) -> None:
        if self.failing:
            raise DiskFullError(f"disk full while writing {name}; the previous version is kept")
        super().write_meta(name, value)


def test_a_campaign_whose_vote_cannot_be_stored_is_retried_later_and_never_crashes_the_node():
    storage = FailingMeta()
    h = CoreHarness("n1", storage=storage)
    raft = h.core.raft
    assert raft.role == "leader"
    term = raft.term
    raft.role = "follower"  # as if it had lost its leader: its election timer is due
    raft.election_deadline_s = h.clock.now_s
    storage.failing = True
    h.advance(0.01)  # the campaign's vote cannot be stored: given up for now, not a crash
    assert h.core.space.full
    assert raft.role != "leader" and raft.election_deadline_s > h.clock.now_s  # re-armed: no busy loop
    storage.failing = False
    h.advance(raft.election_timeout_s * 2 + h.config.storage_check_interval_s)
    assert raft.role == "leader" and raft.term > term
    assert not h.core.space.full


def test_storage_full_error_is_reported_at_once_and_is_a_storage_error():
    assert not StorageFullError.retriable and issubclass(DiskFullError, StorageFullError)


def test_a_full_node_measures_again_at_the_full_pace_and_lifts_within_a_tenth_of_a_second():
    storage = MemoryStorage(capacity_bytes=20_000)
    h = lone_with(storage)
    stored = fill(h, b"x" * 1000)
    assert h.core.space.full
    storage.set_capacity(None)  # space returns right after the failed write
    h.advance(FULL_RECHECK_S)  # not a whole storage_check_interval_s (1 s)
    assert not h.core.space.full
    assert produce(h, b"after", stored).type == "produce_ok"
    # once lifted, back to the ordinary pace: one check per interval
    checks = h.core.space._checks
    for _ in range(3):
        h.advance(h.config.storage_check_interval_s / 2)
    assert h.core.space._checks == checks + 1  # (the harness's clock jumps: timers fire at the end of each step)
