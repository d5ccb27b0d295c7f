"""The ``host`` room (meshq.core.partitions.host.PartitionHost): replicas, rebalancing, fsync, retention."""

from __future__ import annotations

from meshq.core import batch as batch_format
from meshq.core.events import SyncLogs
from meshq.core.replica import persisted_name
from meshq.log.memory import MemoryStorage
from tests.core.harness import CoreHarness
from tests.core.rooms.conftest import Net, advance, answers, create_topic, error_of, heartbeat, member_info, records_of


def syncs(effects: list) -> list[frozenset]:
    return [effect.keys for effect in effects if isinstance(effect, SyncLogs)]


def test_a_topic_agreed_opens_a_replica_of_each_partition_assigned_here_and_leads_it(lone):
    create_topic(lone, "t", 3)
    assert sorted(lone.core.partitions) == [("t", 0), ("t", 1), ("t", 2)]
    assert lone.core.host.leads() == [["t", 0, 1, 0, 0], ["t", 1, 1, 0, 0], ["t", 2, 1, 0, 0]]
    assert lone.core.host.current_leader("t", 2) == "n1"


def test_fsync_interval_syncs_every_log_written_since_the_last_sync_together():
    h = CoreHarness("n1", fsync="interval", fsync_interval_s=1.0)
    create_topic(h, "t", 3)
    advance(h, 1.0)
    h.syncs.clear()
    h.produce("t", [b"a"], partition=0)
    h.produce("t", [b"b"], partition=2)
    assert h.syncs == []  # nothing synced per write
    assert syncs(advance(h, 0.9)) == []
    assert syncs(advance(h, 0.1)) == [frozenset({("t", 0), ("t", 2)})]
    assert syncs(advance(h, 1.0)) == []  # nothing written since: no sync, but the timer goes on
    h.produce("t", [b"c"], partition=1)
    assert syncs(advance(h, 1.0)) == [frozenset({("t", 1)})]


def test_stopping_asks_for_a_last_sync_of_every_log_held_here(lone):
    create_topic(lone, "t", 2)
    assert syncs(lone.core.stop(lone.clock.now_s)) == [frozenset({("t", 0), ("t", 1)})]


def test_retention_trims_delete_topics_at_each_check_and_never_compacted_ones():
    h = CoreHarness("n1", storage=MemoryStorage(segment_bytes=4096), retention_check_interval_s=1.0)
    create_topic(h, "old", retention_ms=1)
    create_topic(h, "kept", retention_ms=1, cleanup_policy="compact")
    for _ in range(12):
        h.produce("old", [b"x" * 1000], partition=0)
        h.produce("kept", [b"x" * 1000], partition=0)
    h.clock.wall_ms_value += 10_000
    advance(h, 1.0)
    first = h.core.partitions[("old", 0)].log.start_offset
    assert first > 0 and h.core.partitions[("kept", 0)].log.start_offset == 0
    for _ in range(12):
        h.produce("old", [b"x" * 1000], partition=0)
    h.clock.wall_ms_value += 10_000
    advance(h, 1.0)  # the check re-armed itself
    assert h.core.partitions[("old", 0)].log.start_offset > first
    assert h.core.partitions[("old", 0)].log.end_offset == 24


def test_a_replication_message_for_a_partition_not_held_here_is_ignored(lone):
    create_topic(lone, "t")
    body = {"topic": "t", "partition": 5, "epoch": 9, "cv": 0, "leader": "n7", "prev_offset": -1, "prev_epoch": 0,
            "hw": 0, "epoch_start": 0, "log_start": 0}
    assert lone.request("repl_append", body) is None
    assert sorted(lone.core.partitions) == [("t", 0)] and lone.sent == []


def test_without_a_local_replica_the_leader_is_the_one_live_heartbeats_name():
    h = CoreHarness("n1", failure_timeout_s=1.0)
    h.handle(heartbeat(member_info("a", 7000), leads=[["t", 3, 2]]))
    assert h.core.host.current_leader("t", 3) == "a"
    h.advance(1.0)
    assert h.core.host.current_leader("t", 3) is None  # a went silent


def test_a_partition_moved_to_a_new_member_is_copied_there_then_deleted_here():
    net = Net("n1")
    net.add("n2", mdns=True, bootstrap_wait_s=100.0)  # it joins n1's group
    old = net["n1"]
    create_topic(old, "t", 6)
    for partition in range(6):
        old.produce("t", [b"p%d" % partition], partition=partition)
    parked = old.request("fetch", {"topic": "t", "partition": 0, "offset": 1, "max_bytes": 1000,
                                   "max_wait_ms": 30_000}, request_id=5)
    assert parked is None
    net.form()
    new = net["n2"]
    net.run_until(lambda: not old.core.meta.learners["t"][0] and old.core.meta.assignments["t"][0] == ["n2"]
                  and ("t", 0) not in old.core.partitions, within_s=10.0)
    moved = sorted(new.core.partitions)
    assert moved and ("t", 0) in moved
    assert sorted(old.core.partitions) == sorted(set(("t", p) for p in range(6)) - set(moved))
    for key in moved:
        assert records_of(new, *key) == [b"p%d" % key[1]]
        assert key not in old.core.storage.logs() and old.core.storage.read_meta(persisted_name(*key)) == {}
    assert error_of(answers(old)[5])[0] == "not_leader"  # the long poll was let go
    assert error_of(old.request("fetch", {"topic": "t", "partition": 0, "offset": 0, "max_bytes": 1000,
                                          "max_wait_ms": 0}))[0] == "not_leader"


def test_the_retention_check_compacts_one_partition_of_a_compact_topic_per_tick_in_turn():
    h = CoreHarness("n1", storage=MemoryStorage(segment_bytes=4096), retention_check_interval_s=1.0)
    create_topic(h, "state", 2, cleanup_policy="compact")
    for i in range(60):
        for partition in (0, 1):
            h.produce("state", [b"v%d" % i + b"x" * 500], keys=[b"key-%d" % (i % 3)], partition=partition)
    sizes = {p: h.core.partitions[("state", p)].log.size_bytes for p in (0, 1)}
    advance(h, 1.0)
    shrunk = [p for p in (0, 1) if h.core.partitions[("state", p)].log.size_bytes < sizes[p]]
    assert len(shrunk) == 1  # one partition per tick: a bounded background rate
    advance(h, 1.0)
    assert all(h.core.partitions[("state", p)].log.size_bytes < sizes[p] for p in (0, 1))
    assert h.core.counters["compaction_records_removed"] > 0
    for p in (0, 1):  # the latest record of every key is still served, at its original offset
        log = h.core.partitions[("state", p)].log
        latest = {}
        for record in batch_format.decode_records(log.read(log.start_offset, 1 << 30), "state", p):
            latest[record.key] = record.value[:3]
        assert latest == {b"key-0": b"v57", b"key-1": b"v58", b"key-2": b"v59"}


def test_a_replica_that_cannot_save_its_state_does_not_stop_the_next_ones_timers(lone):
    """Disk full: t/0's timer step fails to write; t/1's still runs in the same timer step (before,
    the failure ended the step, and a replica whose deadline did not move kept the ones after it
    waiting) and the node enters the full state."""
    from meshq.errors import DiskFullError

    create_topic(lone, "t", 2)
    first, second = lone.core.partitions[("t", 0)].replica, lone.core.partitions[("t", 1)].replica

    def cannot_write(now_s: float) -> None:  # as a leader's step does: its deadline moves first
        first.heartbeat_deadline_s = now_s + first.heartbeat_interval_s
        raise DiskFullError("disk full while writing replica.t.0.msgpack")

    ran: list[float] = []
    step = second.on_timer
    first.on_timer = cannot_write
    second.on_timer = lambda now_s: (ran.append(now_s), step(now_s))
    now_s = max(first.next_deadline(), second.next_deadline())
    lone.core.on_timer(now_s)
    assert ran == [now_s], "t/1's timer did not run in the step where t/0's failed"
    assert lone.core.space.full and "replica.t.0" in lone.core.space.full_reason
