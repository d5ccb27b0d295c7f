"""Invariant checkers for the simulator: after every event, at the end, and for liveness.

Safety (after every event):
* at most one metadata leader per Raft term;
* every node's committed metadata prefix agrees with every other node's;
* a node's commit index never goes back (it is persisted, so not even across restarts);
* at most one leader per partition and leader epoch, and a leader's log holds every offset
  committed in earlier epochs (leader completeness);
* a replica's high watermark never goes back while it runs (a copy deleted because the partition
  moved away, and created afresh when it moves back, is a new replica), outside the power-loss
  window of fsync != always (a replica holding records that a majority lost with power gives
  them up to follow the newer leader);
* every reassign step the metadata commits changes a partition's voter set by at most one member;
* a committed offset cannot be lost by an election: the voters whose copy falls short of the
  leader's high watermark are fewer than a majority, both of the leader's voters and of the
  newest agreed voters (a voter with no copy cannot vote; a down node's disk counts) — checked
  whenever a leader's high watermark advances and whenever a node deletes its copy of a
  partition that moved away; learners never count;
* committed batches never change: once a leader's high watermark covers a batch, every later
  leader commits the same bytes at that offset (outside the power-loss window of fsync != always).

Routing hints (``meshq.testing.hint_checks.LeaderHintChecker``, every 0.1 s of simulated time):
once a node's heartbeats have had time to reach another node over a quiet network, the other
node's leader hint never names it for a partition it no longer leads.

Consumers (as they read): no gap or reordering within a partition; committed group offsets
never go below a commit acknowledged before the read that no concurrent, lower commit may have
overtaken (outside the power-loss window).

History (at the end, Jepsen "total queue" style):
* lost: a guaranteed acknowledged record is not at the partition and offset it was acknowledged with
  in the final leader's log. Guaranteed means acks quorum or all, or acks=leader when no new
  leader was elected for that partition after the acknowledgement (a failover may take back
  what only the old leader held: the documented meaning of acks=leader); and the record was
  not in the unsynced tail of a node at the moment it lost power (the loss window of
  fsync=interval; a process kill loses nothing: appends reach the page cache first);
* replicas agree: every replica of the final agreed replica set (voters and learners) holds a
  copy and no node outside that set still holds one; and what each copy serves as committed is
  a prefix of one log: its batches below its own high watermark are byte-identical to the
  leader's (same offsets, epochs and CRCs), under every fsync mode and after any power losses
  (``check_committed_prefix``);
* unexpected: a stored value that no client ever produced;
* duplicated: a value stored twice (the idempotent producer must prevent it);
* order: one client's records in one partition are stored in the order they were produced,
  per producer stream (its idempotent stream, and its at-most-once stream for acks=none);
* metadata: every acknowledged topic creation is in the agreed metadata;
* reads: everything a consumer saw is still in the log (outside the power-loss window).

Pub/sub (``meshq.testing.pubsub_checks.PubSubChecker``, as messages are delivered, in runs with
``SimOptions.pubsub``) and shared subscriptions (``meshq.testing.shared_checks.SharedChecker``)
have their own modules.

Dropped connections (runs with ``FaultOptions.disconnect_s``): a node told its connection to a
peer dropped keeps no request it had pending there (``after_disconnect``).

Liveness (after the faults stop): every joiner joined, a node asked to leave gone, every other
node up, one metadata leader, every node agreeing on the voters and seeing every storage node alive,
every partition of every topic where the ring over the final membership places it (voters ==
target, in order, no learners), every partition of the test topic led with all its replicas in
sync, and no produce still pending — within the liveness budget.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshq.core import batch as batch_format
from meshq.core.metadata import MetadataState
from meshq.core.raft import LEADER
from meshq.errors import CorruptLogError

TOPIC_NAME = "events"
# A slow or starved node (SimOptions.slow / starve) must lead, at the window's end, no partition it has led this long:
# its followers learn the lag of its timers or their round trips to it from every partition they share, and ask
# on the first append that echoes one of their answers; the hand-off takes about an election timeout (1 s) more
SLOW_SETTLE_S = 3.0


class Violation(AssertionError):
    """An invariant failed; the message says which and where."""


class Checker:
    def __init__(self, sim: Any) -> None:
        self.sim = sim
        self.leaders_by_term: dict[int, str] = {}
        self.committed: list[tuple[int, Any]] = []
        self.checked_commit: dict[str, int] = {}
        # node -> (topic, partition) -> (the PartitionState seen, its high watermark): a replica is
        # one PartitionState; a deleted and recreated copy (or a restart) starts a new one
        self.high_watermarks: dict[str, dict[tuple[str, int], tuple[Any, int]]] = {}
        self.meta = MetadataState()  # the committed metadata entries, applied as every node applies them
        self.acl_history: list[tuple[int, list[dict]]] = []  # (index, grants after it) of each committed acl entry
        self.new_steps: list[tuple[str, int]] = []  # reassign steps committed since the simulator looked
        from meshq.testing.cluster_checks import MergeLosesNothingChecker  # (these import Violation from here)
        from meshq.testing.hint_checks import LeaderHintChecker
        from meshq.testing.pubsub_checks import PubSubChecker
        from meshq.testing.space_checks import SpaceChecker

        self.pubsub = PubSubChecker(sim)
        self.space = SpaceChecker()
        self.merges = MergeLosesNothingChecker()
        # SimOptions.apart: the formation of n1's cluster, and each other one's (leaders, committed, checked commit)
        self.primary_formation: str | None = None
        self.other_groups: dict[str, tuple[dict, list, dict]] = {}

        self.hints = LeaderHintChecker(sim)
        self.counts = {"reassign_steps": 0, "timeout_removals": 0, "leave_removals": 0, "member_additions": 0,
                       "rebuilds": 0}
        # (topic, partition) -> the start offset of its last rebuild (every replica was removed for good)
        self.rebuilt: dict[tuple[str, int], int] = {}
        self.power_losses: list[float] = []
        self.power_lost_values: set[bytes] = set()
        self.disk_lost_values: set[bytes] = set()
        self.damaged_partitions: set[int] = set()  # partitions of the test topic with a flipped bit
        self.damaged_batches: list[tuple[str, int, int]] = []  # (node, partition, base offset) of each flip
        # (consumer member, partition) -> the offset its next record must have
        self.consumer_next: dict[tuple[int, int], int] = {}
        self.liveness_started_s: float | None = None
        self.converged = False
        self.converged_s: float | None = None
        self.history: dict[str, int] = {}
        self._next_convergence_check_s = 0.0
        self.partition_leaders: dict[tuple[str, int, int], str] = {}  # (topic, partition, epoch) -> node
        self.elections: dict[tuple[str, int], list[float]] = {}  # when each new partition leader appeared
        # (topic, partition) -> (leader, since) of each new epoch's leader, in order (SimOptions.slow / starve: hand-backs)
        self.leaderships: dict[tuple[str, int], list[tuple[str, float]]] = {}
        # (topic, partition) -> {base_offset: (next_offset, epoch, crc)} of every committed batch seen
        self.committed_batches: dict[tuple[str, int], dict[int, tuple[int, int, int]]] = {}
        self.committed_upto: dict[tuple[str, int], int] = {}
        # (topic, partition) -> {leader epoch: the highest high watermark its leader reached}
        self.committed_in_epoch: dict[tuple[str, int], dict[int, int]] = {}

    # ------------------------------------------------------------------ hooks
    def on_ack(self, attempt: Any, now_s: float) -> None:
        attempt.acked_s = now_s

    def before_crash(self, node: Any, power: bool) -> None:
        self.high_watermarks.pop(node.node_id, None)  # a restarted replica relearns it from its leader
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

    def on_consumed(self, partition: int, offset: int, records: list, member: int = 0) -> None:
        """Consumer ``member`` fetched ``records`` asking for ``offset``: no gap, no reordering, within
        the fetch and from the records it saw before (a member restarts only as a new member)."""
        expected = self.consumer_next.get((member, partition))
        if expected is not None and records[0].offset != expected:
            raise Violation(f"consumer member {member} saw {TOPIC_NAME}/{partition} go from offset {expected - 1} "
                            f"to {records[0].offset} (a gap or a repeat)")
        self.consumer_next[(member, partition)] = records[-1].offset + 1
        if records[0].offset != offset:
            raise Violation(f"consumer asked {TOPIC_NAME}/{partition} for offset {offset} and got "
                            f"{records[0].offset} first (a gap)")
        for before, after in zip(records, records[1:]):
            if after.offset != before.offset + 1:
                raise Violation(f"consumer saw {TOPIC_NAME}/{partition} jump from {before.offset} to {after.offset}")

    def rebuilt_start(self, partition: int, offset: int, member: int) -> int | None:
        """A consumer's fetch at ``offset`` was out of range: where a real consumer's reset to the
        earliest offset lands if the partition was rebuilt past ``offset`` (None: not that case).
        The consumer continues there: the offsets below were lost, which the rebuild reported."""
        start = self.rebuilt.get((TOPIC_NAME, partition))
        if start is None or offset >= start:
            return None
        self.consumer_next[(member, partition)] = start
        return start

    def on_committed_read(self, committed: dict[int, int], acked: dict[int, int]) -> None:
        """A group member read the committed offsets: none may be below ``acked``, the commits
        acknowledged before the read was sent that no concurrent commit of a lower offset by
        the same member may have overtaken."""
        for partition, offset in sorted(acked.items()):
            if self.power_losses and self.sim.options.fsync != "always":
                return  # a power loss may take back a commit made within the fsync interval
            if committed.get(partition, 0) < offset:
                raise Violation(f"committed offset of {TOPIC_NAME}/{partition} went back from {offset} "
                                f"to {committed.get(partition, 0)}")

    def before_disk_damage(self, partition: int, batch: bytes, node_id: str | None = None) -> None:
        """A bit is about to flip in this stored batch: with one copy its records are lost."""
        self.damaged_partitions.add(partition)
        if node_id is not None:
            self.damaged_batches.append((node_id, partition, batch_format.parse_header(batch).base_offset))
        for record in batch_format.decode_records(batch, TOPIC_NAME, partition):
            self.disk_lost_values.add(record.value)

    def start_liveness(self, now_s: float) -> None:
        self.liveness_started_s = now_s

    # ------------------------------------------------------------------ safety, after every event
    def after_disconnect(self, node: Any, peer: str, waiting: list[int]) -> None:
        """``node`` was told its connection to ``peer`` dropped while requests ``waiting`` were pending there: none
        of them may still wait (a request or its answer lost with a connection would wait out its timeout)."""
        pending = node.core.out.pending
        still = [request_id for request_id in waiting if request_id in pending]
        if still:
            kinds = sorted({pending[request_id].type for request_id in still})
            raise Violation(f"{node.node_id}: {len(still)} request(s) to {peer} ({', '.join(kinds)}) still wait after "
                            "its connection dropped; they would wait out their timeout")

    def after_event(self, touched: Iterable[str] | None = None) -> None:
        """Check the nodes an event may have changed (``touched``: their ids; None: every node)."""
        sim = self.sim
        for node_id in sorted(sim.nodes if touched is None else touched):
            node = sim.nodes[node_id]
            core = node.core
            if core is None or core.raft is None:
                continue
            raft = core.raft
            self.merges.check(node_id, core)
            if sim.options.apart is not None and self._other_group(node_id, raft):
                pass  # a second cluster of the name (SimOptions.apart), checked on its own
            else:
                self._check_metadata(node_id, raft, self.leaders_by_term, self.committed, self.checked_commit,
                                     self._check_committed_command)
            self.space.check(node_id, core, sim.now_s)
            marks = self.high_watermarks.setdefault(node_id, {})
            for key, state in core.partitions.items():
                high_watermark = state.high_watermark
                seen_state, seen = marks.get(key, (state, 0))
                if seen_state is state and high_watermark < seen and not self.power_window():
                    # (within the power-loss window of fsync != always a replica that kept records a
                    # majority lost with power gives them up and follows the newer leader's history)
                    raise Violation(f"{node_id}: high watermark of {key[0]}/{key[1]} went back from "
                                    f"{seen} to {high_watermark}")
                marks[key] = (state, high_watermark)
                replica = state.replica
                if replica is not None and replica.is_leader:
                    self._check_partition_leader(node_id, key[0], key[1], replica)
            if len(marks) > len(core.partitions):
                for key in sorted(set(marks) - set(core.partitions)):
                    del marks[key]  # the partition moved away and this copy was deleted
                    leader = self._partition_leader(*key)
                    if leader is not None:
                        self._check_committed_is_held(leader.node_id, key[0], key[1],
                                                      leader.core.partitions[key].replica,
                                                      f"after {node_id} deleted its copy")
        self.hints.after_event(touched)
        if (self.liveness_started_s is not None and not self.converged
                and sim.now_s >= self._next_convergence_check_s):
            self._next_convergence_check_s = sim.now_s + 0.05  # a cheap cadence; convergence is not instant anyway
            if self._is_converged():
                self.converged = True
                self.converged_s = sim.now_s - self.liveness_started_s

    @staticmethod
    def _check_metadata(node_id: str, raft: Any, leaders_by_term: dict, committed: list, checked_commit: dict,
                        on_committed: Any) -> None:
        """One metadata group's safety on ``node_id``: one leader per term, a commit index that never goes back,
        and every committed entry the same on every node (each new one handed to ``on_committed``)."""
        if raft.role == LEADER:
            holder = leaders_by_term.setdefault(raft.term, node_id)
            if holder != node_id:
                raise Violation(f"two metadata leaders in term {raft.term}: {holder} and {node_id}")
        previous = checked_commit.get(node_id, -1)
        if raft.commit_index < previous:
            raise Violation(f"{node_id}: commit index went back from {previous} to {raft.commit_index}")
        for index in range(previous + 1, raft.commit_index + 1):
            entry = raft.entries[index]
            if index < len(committed):
                if committed[index] != entry:
                    raise Violation(f"{node_id}: committed entry {index} is {entry}, "
                                    f"another node committed {committed[index]}")
            else:
                committed.append(entry)
                if on_committed is not None:
                    on_committed(index, entry[1])
        checked_commit[node_id] = raft.commit_index

    def _other_group(self, node_id: str, raft: Any) -> bool:
        """With ``SimOptions.apart``: whether ``node_id`` is not (yet) in n1's cluster. Each other formation is
        checked by ``_check_metadata`` on state of its own; a node that gives one up starts afresh in the next."""
        formation = raft.formation
        if node_id == "n1" and formation and self.primary_formation is None:
            self.primary_formation = formation
        if formation == self.primary_formation:
            return False
        if formation:
            leaders, committed, checked = self.other_groups.setdefault(formation, ({}, [], {}))
            self._check_metadata(node_id, raft, leaders, committed, checked, None)
        return True

    def _check_committed_command(self, index: int, command: dict) -> None:
        """A metadata entry was committed (each seen once, in log order): apply it to a replay of
        the agreed metadata, and require every reassign step it applied to change the voter set
        by at most one member (checked here on its own, not by the metadata's rule)."""
        meta = self.meta
        before = {node: dict(info) for node, info in meta.members.items()}
        voters_before = ({t: [list(v) for v in a] for t, a in meta.assignments.items()}
                         if command.get("op") == "reassign" else {})
        changed = meta.apply(index, command)
        if command.get("op") == "acl":
            self.acl_history.append((index, meta.acl.listing()))
        if command.get("op") == "rebuild":
            if changed is not None:
                self._check_rebuild(index, changed, command["start"])
            return
        if command.get("op") == "config":
            for node_id in sorted(set(before) - set(meta.members)):
                kind = "leave_removals" if before[node_id].get("leaving") else "timeout_removals"
                self.counts[kind] += 1
            self.counts["member_additions"] += len(set(meta.members) - set(before))
        if isinstance(changed, tuple):
            topic, partition = changed
            old, new = set(voters_before[topic][partition]), set(meta.assignments[topic][partition])
            if len(old ^ new) > 1 or not new:
                raise Violation(f"metadata entry {index} moves {topic}/{partition} from voters {sorted(old)} "
                                f"to {sorted(new)} in one step (a majority of each must overlap)")
            self.counts["reassign_steps"] += 1
            self.new_steps.append((topic, partition))

    def _check_rebuild(self, index: int, key: tuple[str, int], start: int) -> None:
        """A partition every replica of which was removed for good is rebuilt from ``start``: no
        offset any copy of it ever held (on any node's disk, dead ones included: a kill loses
        nothing appended) may be handed out again, nor any below an earlier rebuild's start."""
        for node_id, node in sorted(self.sim.nodes.items()):
            disk = node.storage._disks.get(key) if node.storage is not None else None
            if disk is not None:
                end = disk.segments[-1].end_offset if disk.segments else 0
                if end > start:
                    raise Violation(f"metadata entry {index} rebuilds {key[0]}/{key[1]} from offset {start}, but "
                                    f"{node_id}'s copy handed out offsets up to {end - 1}: they would "
                                    f"be handed out twice")
        if start < self.rebuilt.get(key, 0):
            raise Violation(f"metadata entry {index} rebuilds {key[0]}/{key[1]} from offset {start}, below the "
                            f"start {self.rebuilt[key]} of its previous rebuild")
        self.rebuilt[key] = start
        self.counts["rebuilds"] += 1

    def _check_partition_leader(self, node_id: str, topic: str, partition: int, replica: Any) -> None:
        holder = self.partition_leaders.get((topic, partition, replica.epoch))
        key = (topic, partition)
        by_epoch = self.committed_in_epoch.setdefault(key, {})
        if holder is None:
            self.partition_leaders[(topic, partition, replica.epoch)] = node_id
            self.elections.setdefault((topic, partition), []).append(self.sim.now_s)
            self.leaderships.setdefault(key, []).append((node_id, self.sim.now_s))
            # Leader completeness: what leaders of earlier epochs committed (a leader of an older
            # epoch than theirs may still win late, with votes granted long ago: it is stale, and
            # learns so from the first answer).
            needed = max((end for epoch, end in by_epoch.items() if epoch < replica.epoch), default=0)
            if (replica.log.end_offset < needed and not self.power_window()
                    and not (topic == TOPIC_NAME and partition in self.damaged_partitions)):
                raise Violation(f"{node_id} leads {topic}/{partition} in epoch {replica.epoch} with a log ending at "
                                f"{replica.log.end_offset}, but earlier epochs committed offsets up to {needed} "
                                f"(voters {replica.replicas}, configuration {replica.config_version})")
        elif holder != node_id:
            raise Violation(f"two leaders of {topic}/{partition} in epoch {replica.epoch}: {holder} and {node_id}")
        high_watermark = replica.high_watermark
        if high_watermark > by_epoch.get(replica.epoch, 0):
            by_epoch[replica.epoch] = high_watermark
        upto = self.committed_upto.get(key, 0)
        if high_watermark <= upto:
            return
        self._check_committed_is_held(node_id, topic, partition, replica, "as its high watermark advanced")
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
                if before is not None and before != entry and not self.power_window():
                    raise Violation(f"{node_id}: committed batch of {topic}/{partition} at {header.base_offset} "
                                    f"changed from (end, epoch, crc) {before} to {entry}")
                known[header.base_offset] = entry
                offset = header.next_offset
        self.committed_upto[key] = high_watermark

    def _check_committed_is_held(self, node_id: str, topic: str, partition: int, replica: Any, when: str) -> None:
        """No majority of the leader's voters, nor of the newest agreed voters, can elect a leader
        without the leader's high watermark: the voters whose copy falls short of it (a voter
        without a copy cannot vote) are fewer than a majority."""
        if self.power_window() or (topic == TOPIC_NAME and partition in self.damaged_partitions):
            return  # unsynced or damaged copies may legitimately fall short
        high_watermark = replica.high_watermark
        configurations = [list(replica.replicas)]
        if topic in self.meta.topics:
            configurations.append(list(self.meta.replicas(topic, partition)))
        for voters in configurations:
            ends = {v: self._copy_end(v, (topic, partition)) for v in voters}
            short = sorted(v for v, end in ends.items() if end is not None and end < high_watermark)
            if len(short) >= len(voters) // 2 + 1:
                raise Violation(f"{node_id} leads {topic}/{partition} with high watermark {high_watermark}, but a "
                                f"majority of the voters {voters} can elect a leader without it: {short} hold less "
                                f"({', '.join(f'{v} up to {ends[v]}' for v in short)}), {when}")

    def _copy_end(self, node_id: str, key: tuple[str, int]) -> int | None:
        """Where ``node_id``'s copy of a partition ends (its log, or its disk while it is down);
        None if it has none."""
        node = self.sim.nodes.get(node_id)
        if node is None or node.storage is None or node.departed:
            return None
        if node.core is not None:
            state = node.core.partitions.get(key)
            return state.log.end_offset if state is not None else None
        disk = node.storage._disks.get(key)  # the simulated disk: what survives until the restart
        return disk.segments[-1].end_offset if disk is not None and disk.segments else None

    def power_window(self) -> bool:
        """True when a power loss may have taken back acknowledged data (fsync != always)."""
        return bool(self.power_losses) and self.sim.options.fsync != "always"

    def _is_converged(self) -> bool:
        return self.waiting_for() is None

    def waiting_for(self) -> str | None:
        """What the cluster has not reached yet in the liveness phase, or None once converged."""
        sim = self.sim
        joiners = sorted(n.node_id for n in sim.nodes.values() if n.role == "storage" and not n.booted)
        if joiners:
            return f"{joiners[0]} has not joined"
        if sim.options.leave is not None and not sim.nodes[sim.options.leave[0]].departed:
            return f"{sim.options.leave[0]} has not left"
        present = [n for n in sim.nodes.values() if not n.departed]
        storage = [n for n in present if n.role == "storage"]
        down = sorted(n.node_id for n in present if n.core is None)
        if down:
            return f"{down[0]} is down"
        leaders = [n for n in storage if n.core.raft.role == LEADER]
        if len(leaders) != 1:
            return f"{len(leaders)} metadata leaders"
        voters = sorted(leaders[0].core.raft.voters)
        if voters != sorted(n.node_id for n in storage):
            return f"the metadata voters are {voters}"
        leader_raft = leaders[0].core.raft
        leader_commit = leader_raft.commit_index
        if leader_commit != leader_raft.last_index:
            return "the metadata leader has uncommitted entries"
        meta = leaders[0].core.meta
        if sorted(meta.members) != voters:
            return f"the applied membership is {sorted(meta.members)}"
        for node in storage:
            raft = node.core.raft
            if sorted(raft.voters) != voters or raft.commit_index != leader_commit:
                return f"{node.node_id} has not applied the metadata up to {leader_commit}"
        for node in present:
            missing = set(voters) - {node.node_id} - set(node.core.members.alive_ids("storage"))
            if missing:
                return f"{node.node_id} does not see {sorted(missing)} alive"
        for topic in sorted(meta.topics):
            for partition in range(meta.topics[topic].partitions):
                if topic == TOPIC_NAME and partition in self.damaged_partitions:
                    # A learner cannot copy past a damaged batch of the leader (no repair from
                    # another replica): the move may never complete.
                    continue
                replicas, learners, version = meta.partition_config(topic, partition)
                target = meta.target(topic, partition)
                if learners or replicas != target:
                    return (f"{topic}/{partition} is not at its ring placement {target}: voters {replicas}, "
                            f"learners {learners} (configuration {version})")
        for partition in range(sim.options.partitions):
            leader = self._partition_leader(TOPIC_NAME, partition)
            if leader is None:
                return f"{TOPIC_NAME}/{partition} has no leader"
            replica = leader.core.partitions[(TOPIC_NAME, partition)].replica
            if sim.stats["bitflips"]:
                # A damaged batch on the leader cannot be sent to a follower that lacks it (repair
                # from another replica is not implemented): require a leader only. (After power
                # losses replicas re-converge to one history under every fsync mode: required.)
                continue
            in_sync = replica.in_sync(sim.now_s)
            if len(in_sync) != len(replica.replicas) or replica.high_watermark != replica.log.end_offset:
                return (f"{TOPIC_NAME}/{partition} led by {leader.node_id} has in sync {in_sync} of "
                        f"{replica.replicas}, high watermark {replica.high_watermark} of {replica.log.end_offset}")
        if sim.pending_attempts:
            return f"{sim.pending_attempts} produces pending"
        return self._unrepaired()

    def _unrepaired(self) -> str | None:
        """Repair: a batch damaged on one replica that another live replica holds intact, below
        the damaged replica's high watermark, is served again by it byte-identically (a damaged
        batch is never served: its read raises until then)."""
        from meshq.errors import CorruptLogError

        nodes = self.sim.nodes
        for node_id, partition, base in self.damaged_batches:
            node = nodes[node_id]
            state = node.core.partitions.get((TOPIC_NAME, partition)) if node.core is not None else None
            if state is None or state.replica is None or not state.log.start_offset <= base < state.high_watermark:
                continue  # not held here any more, trimmed, or not yet known committed here
            intact = None
            for other_id in sorted(nodes):
                other = nodes[other_id]
                held = other.core.partitions.get((TOPIC_NAME, partition)) if other.core is not None else None
                if other_id == node_id or held is None or not held.log.start_offset <= base < held.log.end_offset:
                    continue
                try:
                    data = held.log.read(base, 0)
                except CorruptLogError:
                    continue
                if data and batch_format.parse_header(data).base_offset == base:
                    intact = data
                    break
            if intact is None:
                continue  # no intact copy anywhere: the offsets stay lost (reads raise)
            try:
                mine = state.log.read(base, 0)
            except CorruptLogError:
                return f"{node_id}: the damaged batch of {TOPIC_NAME}/{partition} at {base} is not repaired yet"
            if mine != intact:
                return (f"{node_id}: the batch of {TOPIC_NAME}/{partition} at {base} differs from the intact "
                        f"copy after repair")
        return None

    def led_by(self, node_id: str, since_s: float | None = None) -> int:
        """How many replicated partitions (more than one voter) ``node_id`` leads now (only those it has led since
        ``since_s`` or earlier, if given)."""
        core = self.sim.nodes[node_id].core
        if core is None:
            return 0
        return sum(1 for state in core.partitions.values()
                   if state.replica is not None and state.replica.is_leader and len(state.replica.replicas) > 1
                   and (since_s is None or state.replica.leader_since_s <= since_s))

    def after_slow(self, node_id: str, start_s: float, how: str) -> None:
        """The end of ``SimOptions.slow`` or ``starve`` (slow since ``start_s``): the node leads nothing it has led
        for ``SLOW_SETTLE_S`` or longer (``meshq.core.partitions.latency``: its followers ask it to step aside),
        and took over no partition from another leader once slow for ``SLOW_SETTLE_S`` (nobody hands leadership
        to a node it finds slow). A leadership it won as first leader just before the end (a partition the
        workload created then) may not have had its followers' requests yet."""
        options = self.sim.options
        if options.faults.any or options.joins_s or options.leave or options.outage:
            return  # other faults may leave it the only leader possible: the safety checkers still run
        now = self.sim.now_s
        led = self.led_by(node_id, now - SLOW_SETTLE_S)
        if led:
            raise Violation(f"slow leader: {node_id} still leads {led} replicated partition(s) after {now - start_s:.0f} "
                            f"s with {how}, each for {SLOW_SETTLE_S:.0f} s or more; a leader far slower than its "
                            "replicas must hand leadership over")
        taken = sorted(f"{topic}/{partition}" for (topic, partition), history in self.leaderships.items()
                       for i, (leader, since) in enumerate(history)
                       if i > 0 and leader == node_id and start_s + SLOW_SETTLE_S <= since <= now)
        if taken:
            raise Violation(f"slow leader: {node_id}, with {how}, took over {len(taken)} partition(s) from other "
                            f"leaders while slow ({', '.join(taken[:5])}); no leader may hand leadership to a "
                            "replica it finds slow")

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
                            f"({pending} produces still pending): {self.waiting_for()}")
        leader = next(n for n in sim.nodes.values()
                      if n.role == "storage" and n.core is not None and n.core.raft.role == LEADER)
        agreed = leader.core.meta
        agreed_topics = set(agreed.topics)
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
            self._check_replicas_agree(partition, leader, agreed)
        produced = {a.value: a for a in sim.attempts}
        lost = []
        exempt_leader_acks = 0
        lost_to_rebuild = 0
        for attempt in sim.attempts:
            if attempt.outcome != "ok" or attempt.acks == "none" or not self._guaranteed(attempt):
                continue
            if attempt.offset < self.rebuilt.get((TOPIC_NAME, attempt.partition), 0):
                lost_to_rebuild += 1  # every copy of it was removed for good: what a rebuild reports lost
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
                        "leader_acks_taken_back": exempt_leader_acks,
                        **({"lost_to_rebuild": lost_to_rebuild} if lost_to_rebuild else {})}
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

    def _check_replicas_agree(self, partition: int, leader: Any, agreed: Any) -> None:
        """Every replica of the final agreed replica set holds a copy whose batches below the
        leader's high watermark equal the leader's; no other node keeps a copy."""
        key = (TOPIC_NAME, partition)
        voters, learners, version = agreed.partition_config(*key)
        replicas = set(voters) | set(learners)
        for node_id in sorted(self.sim.nodes):
            node = self.sim.nodes[node_id]
            if node.core is None or node.role != "storage" or node.core.meta.applied_index != agreed.applied_index:
                continue  # (a node still applying the last steps creates or deletes its copy then)
            if node_id in replicas and key not in node.core.partitions:
                raise Violation(f"{node_id} is a replica of {TOPIC_NAME}/{partition} (configuration {version}: "
                                f"voters {voters}, learners {learners}) but holds no copy")
            if node_id not in replicas and key in node.core.partitions:
                raise Violation(f"{node_id} still holds a copy of {TOPIC_NAME}/{partition}, which moved to "
                                f"{voters} (configuration {version})")
        self.check_committed_prefix(partition, leader)

    def check_committed_prefix(self, partition: int, leader: Any) -> None:
        """What each replica serves as committed is a prefix of one log — the leader's: every batch
        a copy holds below its own high watermark is in the leader's log, the same (end, epoch,
        crc), and no copy counts as committed more than the leader's log holds. This holds under
        every fsync mode, after any power losses (they may lose records, never fork the log)."""
        key = (TOPIC_NAME, partition)
        leader_state = leader.core.partitions[key]
        reference = self._batch_headers(leader_state.log, leader_state.log.end_offset)
        leader_start = leader_state.log.start_offset
        for node_id in sorted(self.sim.nodes):
            node = self.sim.nodes[node_id]
            if node.core is None or node.role != "storage" or key not in node.core.partitions:
                continue
            state = node.core.partitions[key]
            high_watermark = state.high_watermark
            if high_watermark > leader_state.log.end_offset:
                raise Violation(f"{node_id} serves {TOPIC_NAME}/{partition} as committed up to {high_watermark}, "
                                f"past the end {leader_state.log.end_offset} of the leader {leader.node_id}'s log")
            for base, entry in sorted(self._batch_headers(state.log, high_watermark).items()):
                if base < leader_start:
                    continue  # removed from the leader's log by retention since
                if reference.get(base) != entry:
                    raise Violation(f"{node_id} serves the batch of {TOPIC_NAME}/{partition} at {base} as committed "
                                    f"with (end, epoch, crc) {entry}, the leader {leader.node_id} holds "
                                    f"{reference.get(base)}: two histories")

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
        out.update({name: count for name, count in self.counts.items() if count})
        if self.merges.given_up:
            out["clusters_given_up"] = len(self.merges.given_up)
        if self.other_groups:
            out["other_formations"] = len(self.other_groups)
        if self.converged_s is not None:
            out["converged_s"] = round(self.converged_s, 3)
        return out
