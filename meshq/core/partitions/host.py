"""The partition host: the replicas of topic partitions this storage node holds.

Theory of operation
-------------------
When the agreed metadata (``core.agreement``) names this node in a partition's replica set,
the host opens its log and starts its replication protocol (``PartitionState`` +
``meshq.core.replica.Replica``), and when a later step drops it, deletes the copy (only
after the new replicas confirmed a checked copy of everything committed). Each replica's
leadership and high watermark changes are passed on to those who wait on them: the request
server (produce waiters, parked fetches) and the group offsets. As a partition leader, at
every heartbeat it proposes the next reassignment step towards the ring placement
(``metadata.next_step``), one at a time per partition. It owns the group-commit fsync timer
(``fsync=interval``: every log written since the last sync is synced together) and the
retention timer, which also compacts: at each tick, one partition of a ``compact`` topic (in
turn) is compacted below its high watermark (``LogStore.compact``), so compaction runs in
the background at a bounded rate whatever the number of partitions. Every replica compacts
its own copy; all keep the latest record per key below the high watermark, so they serve
the same records per key.
"""

from __future__ import annotations

import logging
from typing import Any

from meshq.config import TopicConfig
from meshq.core import wire
from meshq.core.events import SyncLogs
from meshq.core.metadata import MetadataState, next_step
from meshq.core.partition import PartitionState
from meshq.core.partitions.latency import PeerLatency
from meshq.core.replica import MAX_APPEND_BYTES, Replica, persisted_name
from meshq.core.room import Room
from meshq.core.throttle import CopyThrottle
from meshq.errors import MeshqError, ProtocolError

log = logging.getLogger("meshq.core")


# The highest leader epoch a peer may name: the batch header stores it in a signed 32-bit field
# and a replica must be able to stand for epoch + 1. A message at the ceiling is refused (one
# such frame would otherwise leave the partition unable to elect, or fail stamping a batch).
MAX_EPOCH = (1 << 31) - 2
_EPOCH_FIELDS = ("epoch", "last_epoch", "for_epoch", "prev_epoch")

class PartitionHost(Room):
    """The local replicas and their lifecycle (see the module docstring)."""

    SERVES = {"repl_vote": "serve_replica", "repl_vote_ok": "serve_replica", "repl_append": "serve_replica",
              "repl_append_ok": "serve_replica", "repl_timeout_now": "serve_replica",
              "repl_step_aside": "serve_replica"}
    TIMERS = {"fsync": "sync_dirty", "retention": "apply_retention"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        # every partition replicated here; ``state.replica`` runs its replication protocol
        self.partitions: dict[tuple[str, int], PartitionState] = {}
        self._leading: set[tuple[str, int]] = set()  # partitions whose leadership we have acted on
        # partition -> time before which we propose no other reassignment step for it
        self._reassigning: dict[tuple[str, int], float] = {}
        self._dirty_logs: set[tuple[str, int]] = set()  # written since the last group-commit sync
        self._last_compacted: tuple[str, int] | None = None  # the partition the last tick compacted
        rate = self.config.copy_rate_mb_per_s * 1_000_000
        # one budget for every partition led here; a burst covers two replica heartbeats of refill
        self.copy_throttle = CopyThrottle(rate, max(MAX_APPEND_BYTES, int(rate * 2 * self.config.raft_heartbeat_interval_s)))
        # round trips to the other storage nodes, measured by every replica here: which peer is slow
        self.latency = PeerLatency()

    @property
    def meta(self) -> MetadataState:
        return self.core.agreement.meta

    def start(self, now_s: float) -> None:
        self.out.schedule(now_s + self.config.retention_check_interval_s, "retention", None)
        if self.config.fsync == "interval":
            self.out.schedule(now_s + self.config.fsync_interval_s, "fsync", None)

    def get(self, key: tuple[str, int]) -> PartitionState | None:
        """The local replica of ``key``, if this node holds one."""
        return self.partitions.get(key)

    def mark_dirty(self, key: tuple[str, int]) -> None:
        """``key``'s log was written: the next group-commit sync includes it."""
        self._dirty_logs.add(key)

    def sync_dirty(self, key: Any, now_s: float) -> None:
        """The ``fsync`` timer (``fsync=interval``): sync every log written since the last one."""
        if self._dirty_logs:
            self.out.emit(SyncLogs(frozenset(self._dirty_logs)))
            self._dirty_logs.clear()
        self.out.schedule(now_s + self.config.fsync_interval_s, "fsync", None)

    def stop(self) -> None:
        """A last sync of every log held here."""
        if self.partitions:
            self.out.emit(SyncLogs(frozenset(self.partitions)))

    def next_deadline(self) -> float | None:
        deadline = None
        for state in self.partitions.values():
            replica_deadline = state.replica.next_deadline()
            if deadline is None or replica_deadline < deadline:
                deadline = replica_deadline
        return deadline

    def on_timer(self, now_s: float) -> None:
        for _key, state in sorted(self.partitions.items()):
            if state.replica.next_deadline() <= now_s:
                # one replica that cannot save its state (disk full) must not end the step for the
                # ones after it: they would wait for the next wake-up, or for good if its deadline
                # did not move
                self.core.space.survive(state.replica.on_timer, now_s)

    def on_synced(self, keys: frozenset) -> None:
        for key in sorted(keys):
            state = self.partitions.get(key)
            if state is not None:
                state.replica.on_synced(self.core.now_s)
                self.on_replica_change(key)

    def on_replica_change(self, key: tuple[str, int]) -> None:
        """Leadership or the high watermark of a local replica changed: answer who waits on it."""
        state = self.partitions.get(key)
        if state is None:
            return
        replica = state.replica
        was_leader = key in self._leading
        if replica.is_leader and not was_leader:
            self._leading.add(key)
            self.core.groups.on_leadership(key, True)
            self.core.shared.on_leadership(key, True)
        elif not replica.is_leader and was_leader:
            self._leading.discard(key)
            self.core.groups.on_leadership(key, False)
            self.core.shared.on_leadership(key, False)
        self.core.server.on_replica_change(state)
        if replica.is_leader:
            self.core.shared.on_replica_change(state)

    def open_partitions(self, config: TopicConfig) -> None:
        """Open the replicas this node holds of ``config``'s partitions and start replicating."""
        for partition in range(config.partitions):
            voters, learners, _version = self.meta.partition_config(config.name, partition)
            if self.node_id in voters or self.node_id in learners:
                self._open_partition((config.name, partition))

    def _open_partition(self, key: tuple[str, int]) -> None:
        if key in self.partitions:
            return
        topic, partition = key
        voters, learners, version = self.meta.partition_config(topic, partition)
        name = persisted_name(topic, partition)
        persisted = self.core.storage.read_meta(name)
        rebuild = self.meta.rebuilds.get(key)
        if rebuild is not None and int((persisted or {}).get("cv", -1)) < rebuild["version"]:
            persisted = self._start_rebuilt(key, rebuild, voters, learners)
        state = PartitionState(topic, partition, self.core.storage.open_log(topic, partition))
        state.rebuilt = rebuild is not None
        self.partitions[key] = state
        replica = Replica(
            self.node_id, state, voters, persisted, self.core.rng,
            send=self.core.mesh.send_to_member,
            save=lambda value, name=name: self.core.storage.write_meta(name, value),
            request_sync=lambda key=key: self.out.emit(SyncLogs(frozenset([key]))),
            on_change=lambda key=key: self.on_replica_change(key),
            on_follower_append=lambda key=key: self._dirty_logs.add(key),
            wall_clock_ms=self.core.wall_clock_ms,
            election_timeout_s=self.config.election_timeout_s,
            heartbeat_interval_s=self.config.raft_heartbeat_interval_s,
            replica_lag_s=self.config.failure_timeout_s,
            fsync_always=self.config.fsync == "always",
            learners=learners, config_version=version, space=self.core.space, copy_throttle=self.copy_throttle,
            latency=self.latency,
        )
        replica.start(self.core.now_s)
        if replica.next_deadline() <= self.core.now_s:
            replica.on_timer(self.core.now_s)  # a sole or preferred replica campaigns at once

    def _start_rebuilt(self, key: tuple[str, int], rebuild: dict, voters: list[str], learners: list[str]) -> dict:
        """This node is a replica of a rebuilt partition (``metadata.py``, ``rebuild``) it has not
        started yet: its log starts empty at the rebuild's start offset (whatever an older copy
        here held is gone: the rebuild declared it lost), and its replica state at the rebuild's
        epoch, above any epoch an old copy elsewhere may carry. Returns the replica state."""
        storage, start = self.core.storage, rebuild["start"]
        store = storage.open_log(*key)
        if store.start_offset != start or store.end_offset != start:
            store.close()
            storage.delete_log(*key)
            if start > 0:
                storage.open_log(*key).restart_at(start)
        persisted = {"epoch": rebuild["epoch"], "voted_for": None, "history": [], "hw": start,
                     "cv": rebuild["version"], "voters": list(voters), "learners": list(learners)}
        storage.write_meta(persisted_name(*key), persisted)
        log.warning("%s/%d: starting the rebuilt partition here, empty from offset %d (epoch %d)", key[0], key[1],
                    start, rebuild["epoch"])
        return persisted

    def reconfigure_partition(self, key: tuple[str, int]) -> None:
        """A reassignment step of ``key`` was agreed: adopt it, start copying it, or let it go."""
        self._reassigning.pop(key, None)
        voters, learners, version = self.meta.partition_config(*key)
        state = self.partitions.get(key)
        if state is not None and version <= state.replica.config_version:
            return  # replaying the metadata log: the replica already knew a newer configuration
        rebuild = self.meta.rebuilds.get(key)
        if state is not None and rebuild is not None and rebuild["version"] == version:
            # an old copy here (a learner's, at most) of a partition that was rebuilt: it starts afresh
            self._delete_copy(key, state, "the partition was rebuilt")
            state = None
        if self.node_id in voters or self.node_id in learners:
            if state is None:
                log.info("%s/%d: now a %s here; copying it from the leader", key[0], key[1],
                         "voter" if self.node_id in voters else "learner")
                self._open_partition(key)
            else:
                state.replica.set_config(voters, learners, version, self.core.now_s)
            return
        if state is None:
            return
        # Every step that drops a replica was proposed only once the target replicas confirmed a
        # checked copy of everything committed (metadata.next_step), so this copy may go.
        state.replica.set_config(voters, learners, version, self.core.now_s)  # a leader hands over first
        self._delete_copy(key, state, f"moved to {', '.join(voters)}")

    def delete_every_copy(self) -> None:
        """This node has left: the metadata leader answered that no partition names it any more,
        so every copy still here is a leftover of steps it never applied (a removed member gets
        no more of the metadata log); delete them rather than leave stale data behind."""
        for key, state in sorted(self.partitions.items()):
            self._delete_copy(key, state, "this node left the cluster")

    def _delete_copy(self, key: tuple[str, int], state: Any, why: str) -> None:
        self.on_replica_change(key)
        del self.partitions[key]
        if key in self._leading:
            self.core.shared.on_leadership(key, False)
        self._leading.discard(key)
        self._dirty_logs.discard(key)
        self.core.server.abandon_parked(state)
        state.log.close()
        self.core.storage.delete_log(*key)
        self.core.storage.write_meta(persisted_name(*key), {})
        log.info("%s/%d: %s; the copy here is deleted", key[0], key[1], why)

    def rebalance_tick(self, now_s: float) -> None:
        """Partition leader: propose the next step towards the ring placement (metadata.next_step)."""
        if not self.core.is_storage or self.core.agreement.raft is None or not self.meta.members:
            return
        for key, state in sorted(self.partitions.items()):
            replica = state.replica
            if (not replica.is_leader or self._reassigning.get(key, 0.0) > now_s
                    or not replica.lease_valid(now_s) or not replica.config_established()):
                continue
            topic, partition = key
            voters, learners, version = self.meta.partition_config(topic, partition)
            if version != replica.config_version:
                continue  # applied metadata and the replica disagree only within one call
            step = next_step(voters, learners, self.meta.target(topic, partition), self.meta.members,
                             replica.caught_up(now_s), replica.in_contact(now_s), self.node_id)
            if step is None:
                continue
            command = {"op": "reassign", "topic": topic, "partition": partition, "version": version,
                       "replicas": step[0], "learners": step[1]}
            deadline = now_s + self.config.request_timeout_s
            self._reassigning[key] = deadline
            log.info("%s/%d: proposing replicas %s, learners %s (from %s, %s)", topic, partition,
                     step[0], step[1], voters, learners)
            # Applied (as a step, or refused by the compare-and-set) or failed: free to propose again.
            self.core.agreement.propose(command, now_s, deadline,
                                        lambda error, key=key: self._reassigning.pop(key, None))

    def serve_replica(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        highest = max(body.get(name, 0) for name in _EPOCH_FIELDS)
        if highest > MAX_EPOCH:
            self.core.count_invalid(message.sender)
            raise ProtocolError(f"{message.type} names leader epoch {highest}, beyond the highest a replica can "
                                f"follow ({MAX_EPOCH}); dropped")
        state = self.partitions.get((body["topic"], body["partition"]))
        if state is None:
            return  # not (yet) a replica here: the sender retries on its next heartbeat
        state.replica.handle(message.sender, message.type, body, message.payloads, now_s)

    def on_lead_heard(self, topic: str, partition: int, sender: str, config_version: int) -> None:
        """A heartbeat says ``sender`` leads ``topic/partition`` in replica configuration
        ``config_version``: if that is newer than ours, our configuration is out of date (the
        partition moved, or was rebuilt while this node was away): our replica stops leading and
        campaigning while that leader's heartbeats keep coming (``Replica.superseded``)."""
        state = self.partitions.get((topic, partition))
        if state is not None and sender != self.node_id and config_version > state.replica.config_version:
            state.replica.superseded(sender, config_version, self.core.now_s)

    def current_leader(self, topic: str, partition: int) -> str | None:
        """Best knowledge of a partition's leader: our own replica's, else the heartbeats'."""
        state = self.partitions.get((topic, partition))
        if (state is not None and state.replica.leader is not None
                and not self.core.mesh.known_dead(state.replica.leader)):
            return state.replica.leader
        return self.core.mesh.hinted_leader(topic, partition)

    def apply_retention(self, key: Any, now_s: float) -> None:
        """The ``retention`` timer: drop what each ``delete`` topic's retention no longer keeps, and
        compact one partition of a ``compact`` topic."""
        now_ms = self.core.wall_clock_ms()
        compactable = []
        for (topic, partition), state in sorted(self.partitions.items()):
            config = self.meta.topics[topic]
            if config.cleanup_policy == "compact":
                compactable.append((topic, partition))
                continue
            removed = state.log.apply_retention(now_ms, config.retention_bytes, config.retention_ms)
            if removed:
                log.info("retention removed %d records from %s/%d", removed, topic, partition)
        if compactable:
            after = [k for k in compactable if self._last_compacted is None or k > self._last_compacted]
            self._compact((after or compactable)[0], now_ms)
        self.out.schedule(now_s + self.config.retention_check_interval_s, "retention", None)

    def _compact(self, key: tuple[str, int], now_ms: int) -> None:
        """Compact one partition's log below its high watermark (never what a failover could take back)."""
        self._last_compacted = key
        state = self.partitions[key]
        config = self.meta.topics[key[0]]
        try:
            result = state.log.compact(state.high_watermark, now_ms, config.delete_retention_ms)
        except MeshqError as exc:
            log.error("%s/%d: compaction failed: %s", key[0], key[1], exc)
            return
        if result.segments_rewritten:
            state.compacted()
            counters = self.core.counters
            counters["compaction_records_removed"] = counters.get("compaction_records_removed", 0) + result.records_removed
            log.info("compaction removed %d records (%d bytes) from %s/%d", result.records_removed,
                     result.bytes_removed, key[0], key[1])

    def under_replicated(self) -> int:
        """Partitions led here whose in-sync replicas are fewer than their assigned replicas."""
        now_s = self.core.now_s
        return sum(1 for state in self.partitions.values()
                   if state.replica.is_leader and len(state.replica.in_sync(now_s)) < len(state.replica.replicas))

    def leads(self) -> list[list]:
        """``[topic, partition, epoch, log end offset, config version]`` of each partition led here
        (heartbeats)."""
        return [[topic, partition, state.replica.epoch, state.log.end_offset, state.replica.config_version]
                for (topic, partition), state in sorted(self.partitions.items()) if state.replica.is_leader]
