"""Invariant checkers for the simulator: after every event, at the end, and for liveness.

Safety (after every event):
* at most one metadata leader per Raft term;
* every node's committed metadata prefix agrees with every other node's;
* a node's commit index never goes back (it is persisted, so not even across restarts);
* at most one leader per partition and leader epoch;
* a replica's high watermark never goes back while it runs;
* committed batches never change: once a leader's high watermark covers a batch, every later
  leader commits the same bytes at that offset (outside the power-loss window of fsync != always).

Consumers (as they read): no gap or reordering within a partition; committed group offsets
never go below an acknowledged commit (outside the power-loss window).

History (at the end, Jepsen "total queue" style):
* lost: a guaranteed acknowledged record is not at the partition and offset it was acknowledged with
  in the final leader's log. Guaranteed means acks quorum or all, or acks=leader when no new
  leader was elected for that partition after the acknowledgement (a failover may take back
  what only the old leader held: the documented meaning of acks=leader); and the record was
  not in the unsynced tail of a node at the moment it lost power (the loss window of
  fsync=interval; a process kill loses nothing: appends reach the page cache first);
* replicas agree: every replica's batches below the final high watermark are byte-identical
  to the leader's (same offsets, epochs and CRCs);
* unexpected: a stored value that no client ever produced;
* duplicated: a value stored twice (the idempotent producer must prevent it);
* order: one client's records in one partition are stored in the order they were produced,
  per producer stream (its idempotent stream, and its at-most-once stream for acks=none);
* metadata: every acknowledged topic creation is in the agreed metadata;
* reads: everything a consumer saw is still in the log (outside the power-loss window).

Liveness (after the faults stop): every node up, one metadata leader, every node agreeing on
the voters and seeing every storage node alive, every partition led with all its replicas in
sync, and no produce still pending — within the liveness budget.
"""

from __future__ import annotations

from typing import Any

from meshq.core import batch as batch_format
from meshq.core.raft import LEADER
from meshq.errors import CorruptLogError

TOPIC_NAME = "events"


class Violation(AssertionError):
    """An invariant failed; the message says which and where."""


class Checker:
    def __init__(self, sim: Any) -> None:
        self.sim = sim
        self.leaders_by_term: dict[int, str] = {}
        self.committed: list[tuple[int, Any]] = []
        self.checked_commit: dict[str, int] = {}
        self.high_watermarks: dict[tuple[str, str, int], int] = {}
        self.power_losses: list[float] = []
        self.power_lost_values: set[bytes] = set()
        self.disk_lost_values: set[bytes] = set()
        self.liveness_started_s: float | None = None
        self.converged = False
        self.converged_s: float | None = None
        self.history: dict[str, int] = {}
        self._next_convergence_check_s = 0.0
        self.partition_leaders: dict[tuple[str, int, int], str] = {}  # (topic, partition, epoch) -> node
        self.elections: dict[tuple[str, int], list[float]] = {}  # when each new partition leader appeared
        # (topic, partition) -> {base_offset: (next_offset, epoch, crc)} of every committed batch seen
        self.committed_batches: dict[tuple[str, int], dict[int, tuple[int, int, int]]] = {}
        self.committed_upto: dict[tuple[str, int], int] = {}

    # ------------------------------------------------------------------ hooks
    def on_ack(self, attempt: Any, now_s: float) -> None:
        attempt.acked_s = now_s

    def before_crash(self, node: Any, power: bool) -> None:
        for key in list(self.high_watermarks):
            if key[0] == node.node_id:
                del self.high_watermarks[key]  # a restarted replica relearns it from its leader
        if not power:
            return  # a process kill loses nothing: appends are in the page cache before the ack
        self.power_losses.append(self.sim.now_s)
        if self.sim.options.fsync == "always":
            return
        # Exactly these records may vanish: the unsynced tail of every log on this node.
        for (topic, _partition), state in sorted(node.core.partitions.items()):
            log = state.log
            if topic == "events" and log.synced_offset < log.end_offset:
                data = log.read(log.synced_offset, 1 << 30)
                for record in batch_format.decode_records(data, topic, _partition, log.synced_offset):
                    self.power_lost_values.add(record.value)

    def on_consumed(self, partition: int, offset: int, records: list) -> None:
        """A consumer fetched ``records`` asking for ``offset``: no gap, no reordering."""
        if records[0].offset != offset:
            raise Violation(f"consumer asked {TOPIC_NAME}/{partition} for offset {offset} and got "
                            f"{records[0].offset} first (a gap)")
        for before, after in zip(records, records[1:]):
            if after.offset != before.offset + 1:
                raise Violation(f"consumer saw {TOPIC_NAME}/{partition} jump from {before.offset} to {after.offset}")

    def on_committed_read(self, committed: dict[int, int], acked: dict[int, int]) -> None:
        """A group member read the committed offsets: none may be below an acknowledged commit."""
        for partition, offset in sorted(acked.items()):
            if self.power_losses and self.sim.options.fsync != "always":
                return  # a power loss may take back a commit made within the fsync interval
            if committed.get(partition, 0) < offset:
                raise Violation(f"committed offset of {TOPIC_NAME}/{partition} went back from {offset} "
                                f"to {committed.get(partition, 0)}")

    def before_disk_damage(self, partition: int, batch: bytes) -> None:
        """A bit is about to flip in this stored batch: with one copy its records are lost."""
        for record in batch_format.decode_records(batch, TOPIC_NAME, partition):
            self.disk_lost_values.add(record.value)

    def start_liveness(self, now_s: float) -> None:
        self.liveness_started_s = now_s

    # ------------------------------------------------------------------ safety, after every event
    def after_event(self) -> None:
        sim = self.sim
        for node_id in sorted(sim.nodes):
            node = sim.nodes[node_id]
            core = node.core
            if core is None or core.raft is None:
                continue
            raft = core.raft
            if raft.role == LEADER:
                holder = self.leaders_by_term.setdefault(raft.term, node_id)
                if holder != node_id:
                    raise Violation(f"two metadata leaders in term {raft.term}: {holder} and {node_id}")
            previous = self.checked_commit.get(node_id, -1)
            if raft.commit_index < previous:
                raise Violation(f"{node_id}: commit index went back from {previous} to {raft.commit_index}")
            for index in range(previous + 1, raft.commit_index + 1):
                entry = raft.entries[index]
                if index < len(self.committed):
                    if self.committed[index] != entry:
                        raise Violation(f"{node_id}: committed entry {index} is {entry}, "
                                        f"another node committed {self.committed[index]}")
                else:
                    self.committed.append(entry)
            self.checked_commit[node_id] = raft.commit_index
            for (topic, partition), state in core.partitions.items():
                key = (node_id, topic, partition)
                high_watermark = state.high_watermark
                if high_watermark < self.high_watermarks.get(key, 0):
                    raise Violation(f"{node_id}: high watermark of {topic}/{partition} went back from "
                                    f"{self.high_watermarks[key]} to {high_watermark}")
                self.high_watermarks[key] = high_watermark
                replica = state.replica
                if replica is not None and replica.is_leader:
                    self._check_partition_leader(node_id, topic, partition, replica)
        if (self.liveness_started_s is not None and not self.converged
                and sim.now_s >= self._next_convergence_check_s):
            self._next_convergence_check_s = sim.now_s + 0.05  # a cheap cadence; convergence is not instant anyway
            if self._is_converged():
                self.converged = True
                self.converged_s = sim.now_s - self.liveness_started_s

    def _check_partition_leader(self, node_id: str, topic: str, partition: int, replica: Any) -> None:
        holder = self.partition_leaders.get((topic, partition, replica.epoch))
        if holder is None:
            self.partition_leaders[(topic, partition, replica.epoch)] = node_id
            self.elections.setdefault((topic, partition), []).append(self.sim.now_s)
        elif holder != node_id:
            raise Violation(f"two leaders of {topic}/{partition} in epoch {replica.epoch}: {holder} and {node_id}")
        key = (topic, partition)
        upto = self.committed_upto.get(key, 0)
        high_watermark = replica.high_watermark
        if high_watermark <= upto:
            return
        log = replica.log
        offset = max(upto, log.start_offset)
        known = self.committed_batches.setdefault(key, {})
        while offset < high_watermark:
            try:
                data = log.read(offset, 1 << 20)
            except CorruptLogError:
                offset = self._next_batch_offset(log, offset)
                continue
            if not data:
                break
            for _pos, header in batch_format.iter_batches(data, verify_crc=False):
                if header.base_offset >= high_watermark:
                    break
                entry = (header.next_offset, header.leader_epoch, header.crc)
                before = known.get(header.base_offset)
                if before is not None and before != entry and not self._power_window():
                    raise Violation(f"{node_id}: committed batch of {topic}/{partition} at {header.base_offset} "
                                    f"changed from (end, epoch, crc) {before} to {entry}")
                known[header.base_offset] = entry
                offset = header.next_offset
        self.committed_upto[key] = high_watermark

    def _power_window(self) -> bool:
        """True when a power loss may have taken back acknowledged data (fsync != always)."""
        return bool(self.power_losses) and self.sim.options.fsync != "always"

    def _is_converged(self) -> bool:
        sim = self.sim
        storage = [n for n in sim.nodes.values() if n.role == "storage"]
        if any(n.core is None for n in sim.nodes.values()):
            return False
        leaders = [n for n in storage if n.core.raft.role == LEADER]
        if len(leaders) != 1:
            return False
        voters = sorted(leaders[0].core.raft.voters)
        if voters != sorted(n.node_id for n in storage):
            return False
        leader_commit = leaders[0].core.raft.commit_index
        for node in storage:
            raft = node.core.raft
            if sorted(raft.voters) != voters or raft.commit_index != leader_commit:
                return False
        for node in sim.nodes.values():
            alive = set(node.core.members.alive_ids("storage"))
            if set(voters) - {node.node_id} - alive:
                return False
        for partition in range(sim.options.partitions):
            leader = self._partition_leader(TOPIC_NAME, partition)
            if leader is None:
                return False
            replica = leader.core.partitions[(TOPIC_NAME, partition)].replica
            if sim.stats["bitflips"] or self._power_window():
                # A damaged batch on the leader cannot be sent to a follower that lacks it (repair
                # from another replica is not implemented); and after power losses with fsync !=
                # always a replica may hold committed records the others lost, which it refuses
                # to truncate (never below its high watermark): require a leader only.
                continue
            if (len(replica.in_sync(sim.now_s)) != len(replica.replicas)
                    or replica.high_watermark != replica.log.end_offset):
                return False
        return sim.pending_attempts == 0

    def _most_complete(self, topic: str, partition: int) -> Any:
        """The replica whose log would win an election now (a leadership hand-off may be under way)."""
        best = None
        for node_id in sorted(self.sim.nodes):
            node = self.sim.nodes[node_id]
            state = node.core.partitions.get((topic, partition)) if node.core is not None else None
            replica = state.replica if state is not None else None
            if replica is not None:
                rank = (replica.last_epoch, replica.log.end_offset)
                if best is None or rank > best[0]:
                    best = (rank, node)
        return best[1] if best is not None else None

    def _partition_leader(self, topic: str, partition: int) -> Any:
        """The node leading ``topic/partition`` in the highest epoch, or None."""
        best = None
        for node_id in sorted(self.sim.nodes):
            node = self.sim.nodes[node_id]
            state = node.core.partitions.get((topic, partition)) if node.core is not None else None
            replica = state.replica if state is not None else None
            if replica is not None and replica.is_leader and (best is None or replica.epoch > best[0]):
                best = (replica.epoch, node)
        return best[1] if best is not None else None

    # ------------------------------------------------------------------ end of run
    def at_end(self, reached_end: bool) -> None:
        sim = self.sim
        if not self.converged:
            pending = sum(1 for a in sim.attempts if a.outcome == "pending")
            raise Violation(f"no convergence within {sim.options.liveness_s} s of the liveness phase "
                            f"({pending} produces still pending)")
        leader = next(n for n in sim.nodes.values() if n.role == "storage" and n.core.raft.role == LEADER)
        agreed_topics = set(leader.core.meta.topics)
        for creation in sim.topic_creations:
            if creation["outcome"] == "ok" and creation["name"] not in agreed_topics:
                raise Violation(f"acknowledged topic creation {creation['name']} is not in the agreed metadata")
        stored: dict[tuple[int, int], bytes] = {}
        positions: dict[bytes, list[tuple[int, int]]] = {}
        log_start: dict[int, int] = {}
        for partition in range(sim.options.partitions):
            leader = self._partition_leader(TOPIC_NAME, partition) or self._most_complete(TOPIC_NAME, partition)
            if leader is None:
                raise Violation(f"{TOPIC_NAME}/{partition} has no replica at the end")
            state = leader.core.partitions[(TOPIC_NAME, partition)]
            expected = state.log.start_offset
            log_start[partition] = state.log.start_offset
            records, damaged = self._readable_records(state.log, TOPIC_NAME, partition)
            for record in records:
                if record.offset != expected and expected not in damaged:
                    raise Violation(f"{leader.node_id}: {TOPIC_NAME}/{partition} offsets not dense at {record.offset}")
                expected = record.offset + 1
                stored[(partition, record.offset)] = record.value
                positions.setdefault(record.value, []).append((partition, record.offset))
            self._check_replicas_agree(partition, leader)
        produced = {a.value: a for a in sim.attempts}
        lost = []
        exempt_leader_acks = 0
        for attempt in sim.attempts:
            if attempt.outcome != "ok" or attempt.acks == "none" or not self._guaranteed(attempt):
                continue
            if attempt.acks == "leader" and any(t >= attempt.acked_s for t in
                                                self.elections.get((TOPIC_NAME, attempt.partition), [])):
                if stored.get((attempt.partition, attempt.offset)) != attempt.value:
                    exempt_leader_acks += 1  # taken back by a failover: what acks=leader allows
                continue
            if stored.get((attempt.partition, attempt.offset)) != attempt.value:
                lost.append(attempt)
        for (partition, offset), values in sorted(sim.consumer.seen.items()):
            if offset < log_start.get(partition, 0):
                continue  # removed by retention since: allowed
            for value in sorted(values):
                exempt = self.power_lost_values | self.disk_lost_values
                if value not in exempt and stored.get((partition, offset)) != value:
                    raise Violation(f"a consumer saw {value!r} at {partition}/{offset}, which the log later "
                                    f"took back (now {stored.get((partition, offset))!r})")
        unexpected = sorted(v for v in positions if v not in produced)
        duplicated = sorted(v for v, where in positions.items() if len(where) > 1)
        self.history = {"acked": sum(1 for a in sim.attempts if a.outcome == "ok"),
                        "failed": sum(1 for a in sim.attempts if a.outcome == "failed"),
                        "lost": len(lost), "unexpected": len(unexpected), "duplicated_records": len(duplicated),
                        "leader_acks_taken_back": exempt_leader_acks}
        if lost:
            first = lost[0]
            raise Violation(f"{len(lost)} acknowledged records lost, e.g. {first.value!r} (acks={first.acks}) "
                            f"acknowledged at {first.partition}/{first.offset}, stored there: "
                            f"{stored.get((first.partition, first.offset))!r}")
        if unexpected:
            raise Violation(f"{len(unexpected)} records stored that nobody produced, e.g. {unexpected[0]!r}")
        if duplicated:
            raise Violation(f"{len(duplicated)} records stored twice, e.g. {duplicated[0]!r} at "
                            f"{positions[duplicated[0]]}")
        # Order holds per producer stream: a client's idempotent stream (acks leader/quorum/all)
        # and its at-most-once stream (acks=none) are ordered separately, as in Kafka.
        by_source: dict[tuple[str, int, bool], list[tuple[int, int]]] = {}
        for value, where in positions.items():
            attempt = produced[value]
            partition, offset = where[0]
            stream = (attempt.client, partition, attempt.acks == "none")
            by_source.setdefault(stream, []).append((offset, int(value[1:])))
        for (client, partition, at_most_once), pairs in sorted(by_source.items()):
            numbers = [number for _offset, number in sorted(pairs)]
            if numbers != sorted(numbers):
                kind = "at-most-once" if at_most_once else "idempotent"
                raise Violation(f"{kind} records of {client} in partition {partition} are stored out of order")

    def _check_replicas_agree(self, partition: int, leader: Any) -> None:
        """Every replica's batches below the leader's high watermark equal the leader's."""
        if self._power_window():
            return  # replicas that lost power may hold different (unsynced, lost) batches: allowed
        key = (TOPIC_NAME, partition)
        leader_state = leader.core.partitions[key]
        high_watermark = leader_state.high_watermark
        reference = self._batch_headers(leader_state.log, high_watermark)
        for node_id in sorted(self.sim.nodes):
            node = self.sim.nodes[node_id]
            if node is leader or node.core is None or key not in node.core.partitions:
                continue
            log = node.core.partitions[key].log
            mine = self._batch_headers(log, min(high_watermark, log.end_offset))
            for base, entry in sorted(mine.items()):
                if base in reference and reference[base] != entry:
                    raise Violation(f"{node_id}: batch of {TOPIC_NAME}/{partition} at {base} is (end, epoch, crc) "
                                    f"{entry}, the leader {leader.node_id} holds {reference[base]}")

    @staticmethod
    def _batch_headers(log: Any, upto: int) -> dict[int, tuple[int, int, int]]:
        out: dict[int, tuple[int, int, int]] = {}
        for segment in log._disk.segments:  # the simulated disk: headers even of damaged batches
            for header in segment.headers:
                if header.base_offset < upto:
                    out[header.base_offset] = (header.next_offset, header.leader_epoch, header.crc)
        return out

    def _readable_records(self, log: Any, topic: str, partition: int) -> tuple[list, set[int]]:
        """Every record the log serves, and the offsets where a damaged batch was refused (it
        must raise, never return other bytes)."""
        from meshq.errors import CorruptLogError

        out = []
        damaged: set[int] = set()
        offset = log.start_offset
        while offset < log.end_offset:
            try:
                data = log.read(offset, 1 << 30)
            except CorruptLogError:
                # Served nothing: skip exactly that batch (the simulated disk knows its bounds).
                damaged.add(offset)
                offset = self._next_batch_offset(log, offset)
                continue
            records = batch_format.decode_records(data, topic, partition, offset)
            if not records:
                break
            out.extend(records)
            offset = records[-1].offset + 1
        return out, damaged

    @staticmethod
    def _next_batch_offset(log: Any, offset: int) -> int:
        for segment in log._disk.segments:
            for header in segment.headers:
                if header.base_offset <= offset < header.next_offset:
                    return header.next_offset
        return offset + 1

    def _guaranteed(self, attempt: Any) -> bool:
        """Acknowledged (acks != none), not in the unsynced tail of a node that lost power, and not
        in a batch whose only copy was damaged on disk."""
        return attempt.value not in self.power_lost_values and attempt.value not in self.disk_lost_values

    def summary(self) -> dict:
        out = dict(self.history)
        if self.converged_s is not None:
            out["converged_s"] = round(self.converged_s, 3)
        return out
