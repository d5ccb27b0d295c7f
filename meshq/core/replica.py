"""Replication of one partition among its replica set: leader epochs, high watermark, fencing.

Theory of operation
-------------------
The replicas of a partition (its agreed assignment) run a Raft-style protocol whose log is
the partition's record log and whose index is the record offset; the Raft term is the
*leader epoch*, stamped into every batch header by the leader that first stored it.

* **Epochs are granted by a majority of the replica set.** A follower that hears nothing from
  a leader for an election timeout first asks for pre-votes (granted only by replicas that
  also lost their leader, so a returning node cannot depose a healthy one), then for votes in
  epoch + 1. A vote goes only to a candidate whose log is at least as complete, compared as
  ``(last_epoch, end_offset)``. Epoch and vote are persisted before any reply depends on them.
* **Epoch history instead of a no-op entry.** Every replica keeps ``history``: ascending
  ``[epoch, start_offset]`` pairs (Kafka's leader-epoch cache, KIP-101; an ``EpochHistory``,
  see ``meshq.core.epoch_history``). A new leader appends ``[epoch, its end offset]`` — a
  zero-length marker standing where Raft would append a no-op. A follower adopts the marker
  only once its log equals the leader's up to that offset. The leader advances the high
  watermark only to offsets that a majority holds *at or past its own marker* (Raft §5.4.2,
  "commit only entries of the current term"), so a record from an older epoch is committed
  only once a majority also carries the newer epoch that protects it.
* **Appends are checked and fenced.** ``repl_append`` carries the epoch, the offset and epoch
  of the record just before its batches, the leader's high watermark and epoch start. A
  follower refuses stale epochs (the stale leader learns the newer epoch from the refusal and
  steps down), refuses a mismatch at the previous offset (answering with a hint where to
  restart), and truncates only from the first batch whose epoch differs — the divergence
  point — and never below its high watermark with ``fsync=always``. With ``interval`` or
  ``never`` a power loss of a majority may take back committed records: a leader of a newer
  epoch elected without them holds the one history, and a replica that kept them gives them up
  (high watermark back to the divergence point, logged at ERROR) rather than fork the log.
* **Leases.** A leader accepts writes only while a majority of the replica set answered it
  within the election timeout, and steps down after twice that (check-quorum). A leader that
  was paused finds its lease expired on waking and acknowledges nothing.
* **Replication is pipelined:** up to ``MAX_IN_FLIGHT`` appends per follower, each carrying
  whole batches (the batch bytes the leader stored, byte for byte). A lost append shows as a
  mismatch or as silence; either resets the follower's position to what it acknowledged. What
  the leader knows of each follower, and who is in sync, caught up or in contact, is kept in
  ``followers`` (``meshq.core.followers``).
* **Preferred leader.** The first replica of the assignment (the ring owner) leads when it is
  up and caught up: a leader hands leadership to it (``repl_timeout_now``) once it has matched
  the whole log.
* **A slow leader steps aside.** Appends and their answers carry round-trip probes that feed the
  node's ``PeerLatency`` (``meshq.core.partitions.latency``). A follower that finds its leader far
  slower than its other peers asks it to step aside (``repl_step_aside``); the leader hands over
  to that follower (writes paused, ``repl_timeout_now`` once it holds the whole log) if it is in
  sync and the leader's own round trips to it agree. No leader hands over to a slow preferred
  replica.
* **Configuration changes.** The replica set (voters, learners, and a configuration version)
  comes from the agreed metadata and changes one step at a time (``metadata.next_step``): the
  voter set differs from the previous one by at most one member, so a majority of the old set
  and one of the new set always overlap. Every message carries the sender's version; a replica
  refuses votes and appends from a sender with an older version, and the leader proposes the
  next step only when the current one is *established* — a majority of the current voters
  said they know its version and hold everything the leader held when it adopted it. Then no
  candidate using a configuration two steps old can win a majority, so at most one leader per
  epoch exists across the two configurations that can be live at once, and every committed
  record lives on a majority of each. Learners receive appends like followers but neither vote
  nor count towards the high watermark, a lease or ``in_sync``.

All messages are one-way; replies are new messages, so loss, duplication and reordering are
harmless (checked by epochs and offsets). The class is pure: time comes in as ``now_s``,
randomness from the ``rng`` it is given, I/O goes out through the callbacks.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from meshq.core import batch as batch_format
from meshq.core.epoch_history import EpochHistory
from meshq.core.followers import FollowerProgress, Followers
from meshq.errors import CorruptLogError, DiskFullError, ProtocolError, StorageFullError

log = logging.getLogger("meshq.replica")

FOLLOWER = "follower"
PRE_CANDIDATE = "pre_candidate"
CANDIDATE = "candidate"
LEADER = "leader"

# Allowed role transitions (anything else is a bug).
TRANSITIONS = {
    FOLLOWER: {PRE_CANDIDATE, CANDIDATE, FOLLOWER},  # CANDIDATE directly on a leadership hand-off
    PRE_CANDIDATE: {CANDIDATE, FOLLOWER, PRE_CANDIDATE},
    CANDIDATE: {LEADER, FOLLOWER, PRE_CANDIDATE},
    LEADER: {FOLLOWER},
}

MAX_APPEND_BYTES = 1024 * 1024
MAX_IN_FLIGHT = 8
HW_SAVE_INTERVAL_S = 1.0
LEASE_FRACTION = 0.75


def persisted_name(topic: str, partition: int) -> str:
    """Name under which a replica's epoch, vote, history and high watermark are stored."""
    return f"replica.{topic}.{partition}"


class Replica:
    """This node's replica of one partition. See the module docstring."""

    def __init__(self, node_id: str, state: Any, replicas: list[str], persisted: dict | None,
                 rng: random.Random, send: Callable[[str, str, dict, tuple], None],
                 save: Callable[[dict], None], request_sync: Callable[[], None],
                 on_change: Callable[[], None], on_follower_append: Callable[[], None],
                 wall_clock_ms: Callable[[], int], *, election_timeout_s: float, heartbeat_interval_s: float,
                 replica_lag_s: float, fsync_always: bool, learners: list[str] | None = None,
                 config_version: int = 0, space: Any = None, copy_throttle: Any = None,
                 latency: Any = None) -> None:
        self.node_id = node_id
        self.state = state  # PartitionState: log, producer table, parked fetches, waiters
        self.log = state.log
        self.topic = state.topic
        self.partition = state.partition
        persisted = persisted or {}
        if int(persisted.get("cv", -1)) > config_version:
            # What this replica knew before a restart wins over an older configuration met while
            # the metadata log is replayed: knowledge of the replica set never goes back.
            replicas, learners = persisted["voters"], persisted["learners"]
            config_version = int(persisted["cv"])
        self.replicas = list(replicas)  # the voters; the first is the preferred leader
        self.learners = list(learners or [])  # copy the log, never vote or count
        self.config_version = config_version
        self._config_end = 0  # leader: own log end when this configuration was adopted
        self._seen_cv = config_version  # the newest configuration version any message carried
        # no campaign before this: a heartbeat named a leader of this partition in a newer configuration
        self._superseded_until_s = float("-inf")
        self.rng = rng
        self._send = send
        self._save = save
        self._request_sync = request_sync
        self._on_change = on_change
        self._on_follower_append = on_follower_append
        self._wall_clock_ms = wall_clock_ms
        self.election_timeout_s = election_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.fsync_always = fsync_always
        self._space = space  # refuses new batches while the storage is full (``partitions.space``)
        self._copy_throttle = copy_throttle  # the node's budget for copies to catching-up replicas (``throttle``)
        self._latency = latency  # the node's round trips to its peers (``partitions.latency``); None: not measured
        self.epoch: int = int(persisted.get("epoch", 0))
        self.voted_for: str | None = persisted.get("voted_for")
        self.history = EpochHistory.reconcile(persisted.get("history", []), self.log.end_offset, state.batch_epochs)
        self.high_watermark: int = min(int(persisted.get("hw", 0)), self.log.end_offset)
        self.high_watermark = max(self.high_watermark, self.log.start_offset)
        self._saved_hw = self.high_watermark
        self._saved_hw_s = float("-inf")
        self.role = FOLLOWER
        self._logged: dict[str, int] = {}  # how often each peer-triggered log line came (_log_limited)
        self.leader: str | None = None
        self.leader_since_s = 0.0
        self.epoch_start = 0
        self.followers = Followers(node_id, replica_lag_s)  # leader: progress of the other members
        self.votes: set[str] = set()
        self.election_deadline_s = float("inf")
        self.heartbeat_deadline_s = float("inf")
        self.last_leader_contact_s = float("-inf")
        # (leader, epoch, verified end) of an acknowledgement waiting for a local sync
        self._pending_ack: tuple[str, int, int] | None = None
        self._next_transfer_s = float("-inf")  # leader: no new hand-off attempt before this
        self._transfer_until_s = float("-inf")  # leader: no writes while handing leadership over
        self._transfer_to: str | None = None  # leader: hand over to it once it holds the whole log (writes paused)
        self._next_step_aside_s = float("-inf")  # follower: no new request that a slow leader step aside before this
        self._step_aside_asks: dict[str, float] = {}  # leader: follower -> when it last asked us to step aside
        state.replica = self

    # ------------------------------------------------------------------ persistence
    def _persist(self) -> None:
        self.history.trim()
        self._save({"epoch": self.epoch, "voted_for": self.voted_for, "history": self.history.entries,
                    "hw": self.high_watermark, "cv": self.config_version, "voters": self.replicas,
                    "learners": self.learners})
        self._saved_hw = self.high_watermark

    # ------------------------------------------------------------------ queries
    @property
    def quorum(self) -> int:
        return len(self.replicas) // 2 + 1

    @property
    def members(self) -> list[str]:
        """Voters and learners: everyone the leader sends the log to."""
        return self.replicas + [n for n in self.learners if n not in self.replicas]

    @property
    def is_leader(self) -> bool:
        return self.role == LEADER

    def handing_off(self, now_s: float) -> bool:
        return self.role == LEADER and now_s < self._transfer_until_s

    @property
    def transfer_until_s(self) -> float:
        """Leader: the end of the current hand-off's write pause (in the past when none is under way)."""
        return self._transfer_until_s

    @property
    def last_epoch(self) -> int:
        return self.history.last_epoch

    def epoch_at(self, offset: int) -> int:
        """Epoch of the leader that stored the record at ``offset`` (0 before any history)."""
        return self.history.epoch_at(offset)

    def _own_match(self) -> int:
        # With fsync=always only what is on disk counts: a power loss cannot take it back.
        return self.log.synced_offset if self.fsync_always else self.log.end_offset

    def next_deadline(self) -> float:
        return self.heartbeat_deadline_s if self.role == LEADER else self.election_deadline_s

    def lease_valid(self, now_s: float) -> bool:
        """Leader only: safe to take writes — a majority answered recently and no hand-off is under way.

        Followers grant no pre-vote for ``election_timeout_s`` after hearing from the leader, so
        no rival can be elected while a majority answered within a shorter window; the margin
        covers the time an answer spends on the wire.
        """
        if self.role != LEADER or now_s < self._transfer_until_s:
            return False
        return self.followers.heard_from_majority(now_s, LEASE_FRACTION * self.election_timeout_s,
                                                  self.replicas, self.quorum)

    def in_sync(self, now_s: float) -> list[str]:
        """Replicas that hold (nearly) everything the leader holds; leader only, else []."""
        if self.role != LEADER:
            return []
        return self.followers.in_sync(now_s, self.replicas, self.epoch_start, self.log.end_offset)

    def _peer_in_sync(self, peer: str, now_s: float) -> bool:
        """``peer in self.in_sync(now_s)`` for one follower (not the leader itself), without building the list."""
        return self.role == LEADER and self.followers.is_in_sync(peer, now_s, self.replicas, self.epoch_start,
                                                                 self.log.end_offset)

    def config_established(self) -> bool:
        """Leader only: a majority of the current voters said they know this configuration's
        version and hold the log up to where the leader adopted it (the gate for the next step)."""
        if self.role != LEADER:
            return False
        return self.followers.established(self.replicas, self.config_version, self._config_end, self.quorum)

    def caught_up(self, now_s: float) -> set[str]:
        """Leader only: replicas (voters or learners) in contact within ``replica_lag_s`` that hold
        everything committed and what the leader held ``replica_lag_s`` ago — a CRC-checked copy,
        since a follower acknowledges only batches it verified and stored."""
        if self.role != LEADER:
            return set()
        return self.followers.caught_up(now_s, self.high_watermark, self.epoch_start, self.log.end_offset)

    def in_contact(self, now_s: float) -> set[str]:
        """Leader only: replicas that answered within ``replica_lag_s``."""
        if self.role != LEADER:
            return set()
        return self.followers.in_contact(now_s)

    def set_config(self, replicas: list[str], learners: list[str], version: int, now_s: float) -> None:
        """Adopt a newer agreed configuration (ignored if not newer)."""
        if version <= self.config_version:
            return
        self.replicas, self.learners, self.config_version = list(replicas), list(learners), version
        self._config_end = self.log.end_offset
        self._persist()  # before any message carries the new version
        if self.role == LEADER:
            if self.node_id not in self.replicas:
                # Dropped from the voters: ask the most complete voter in contact to campaign at
                # once (Raft's leadership transfer), then follow.
                successor = self.followers.most_complete_voter(now_s, self.replicas)
                if successor is not None:
                    log.info("%s/%d: %s left the replica set; handing leadership to %s", self.topic,
                             self.partition, self.node_id, successor)
                    body = self._key_body(epoch=self.epoch, cv=self.config_version)
                    self._send(successor, "repl_timeout_now", body, ())
                self._step_down(self.epoch, now_s, None)
                return
            for peer in self.followers.track(self.members, self.log.end_offset, now_s):
                self._replicate_to(peer, self.followers[peer], now_s, heartbeat=True)
            self._advance_high_watermark()
        elif self.role != FOLLOWER and self.node_id not in self.replicas:
            self._step_down(self.epoch, now_s, None)
        if self.node_id not in self.replicas:
            self.election_deadline_s = float("inf")
        elif self.election_deadline_s == float("inf"):
            self._reset_election_timer(now_s)
        self._on_change()

    def superseded(self, leader: str, config_version: int, now_s: float) -> None:
        """``leader`` leads this partition in a newer configuration than ours (heard from its
        heartbeat): ours is out of date — the partition moved or was rebuilt while this node was
        away, e.g. a sole replica removed for good that came back with its old copy. Stop leading,
        and do not campaign for two election timeouts: each heartbeat of that leader (every
        ``heartbeat_interval_s``) renews it, so while it leads we never do, and a forged or stale
        heartbeat silences us for a bounded time only (a heartbeat is not proof enough to wait
        for a configuration that may never come)."""
        if config_version <= self.config_version:
            return
        self._superseded_until_s = max(self._superseded_until_s, now_s + 2 * self.election_timeout_s)
        if self.role != FOLLOWER:
            log.warning("%s/%d: %s leads it in configuration %d, newer than ours (%d); %s stops leading while "
                        "that leader's heartbeats come", self.topic, self.partition, leader, config_version,
                        self.config_version, self.node_id)
            self._step_down(self.epoch, now_s, None)

    def reached(self, acks: str, needed: int, now_s: float) -> bool:
        """Whether a record ending at ``needed`` (exclusive) has reached ``acks``."""
        if acks == "leader":
            return self._own_match() >= needed
        if self.high_watermark < needed:
            return False
        if acks == "all":
            in_sync = set(self.in_sync(now_s))
            return all(f.match_end >= needed for peer, f in self.followers.items() if peer in in_sync)
        return True

    # ------------------------------------------------------------------ lifecycle
    def _become(self, role: str) -> None:
        assert role in TRANSITIONS[self.role], f"replica: {self.role} -> {role} is not a valid transition"
        self.role = role

    def _reset_election_timer(self, now_s: float) -> None:
        if self.node_id not in self.replicas:
            self.election_deadline_s = float("inf")  # a learner (or a dropped voter) never campaigns
            return
        self.election_deadline_s = now_s + self.election_timeout_s * (1.0 + self.rng.random())

    def start(self, now_s: float) -> None:
        self._reset_election_timer(now_s)
        if self.node_id not in self.replicas:
            self.election_deadline_s = float("inf")
        elif len(self.replicas) == 1 or self.replicas[0] == self.node_id:
            # Sole replica, or the preferred leader (of a new partition, or restarting): campaign at
            # once. Pre-votes are refused while a leader is heard from, so this deposes no one.
            self.election_deadline_s = now_s

    def _step_down(self, epoch: int, now_s: float, leader: str | None) -> None:
        changed = epoch > self.epoch
        if changed:
            self.epoch = epoch
            self.voted_for = None
        was_leader = self.role == LEADER
        if self.role != FOLLOWER:
            self._become(FOLLOWER)
        self.followers.clear()
        self.leader = leader
        if self.node_id in self.replicas:
            self._reset_election_timer(now_s)
        else:
            self.election_deadline_s = float("inf")
        if changed:
            self._persist()
        if was_leader or changed:
            self._on_change()

    # ------------------------------------------------------------------ timers
    def on_timer(self, now_s: float) -> None:
        if self.role == LEADER:
            if now_s < self.heartbeat_deadline_s:
                return
            if self._latency is not None:
                self._latency.note_lag(now_s - self.heartbeat_deadline_s, now_s)  # (a starved CPU runs it late)
            self.heartbeat_deadline_s = now_s + self.heartbeat_interval_s
            self.followers.sample_end(now_s, self.log.end_offset)
            if not self.followers.heard_from_majority(now_s, 2 * self.election_timeout_s, self.replicas, self.quorum):
                log.warning("%s/%d: leader %s of epoch %d lost contact with a majority of %s; stepping down",
                            self.topic, self.partition, self.node_id, self.epoch, self.replicas)
                self._step_down(self.epoch, now_s, None)
                return
            for peer, f in sorted(self.followers.items()):
                if f.in_flight and now_s - f.last_contact_s > 2 * self.heartbeat_interval_s:
                    # Appends or their answers were lost (or the follower is down): stop counting
                    # them; the heartbeat's answer tells where to resume.
                    f.in_flight = 0
                if now_s - f.last_send_s >= self.heartbeat_interval_s * 0.9:
                    self._replicate_to(peer, f, now_s, heartbeat=True)
            self._maybe_transfer(now_s)
            self._maybe_save_hw(now_s)
            return
        self._maybe_save_hw(now_s)
        if now_s >= self.election_deadline_s:
            if self._seen_cv > self.config_version or now_s < self._superseded_until_s:
                # Our configuration is out of date (the metadata will bring the new one): a
                # campaign could only disturb the replicas that already use it.
                self._reset_election_timer(now_s)
            elif self.node_id in self.replicas:
                self._campaign(now_s, pre_vote=True)
            else:
                self.election_deadline_s = float("inf")  # a learner (or a dropped voter) never campaigns

    def _maybe_save_hw(self, now_s: float) -> None:
        if self.high_watermark > self._saved_hw and now_s - self._saved_hw_s >= HW_SAVE_INTERVAL_S:
            self._saved_hw_s = now_s
            self._persist()

    def _maybe_transfer(self, now_s: float) -> None:
        preferred = self.replicas[0] if self.replicas else None
        if preferred is None or preferred == self.node_id or now_s < self._next_transfer_s:
            return
        f = self.followers.get(preferred)
        if f is None or now_s - self.leader_since_s < 2 * self.election_timeout_s:
            return
        if self._preferred_is_slow(preferred, now_s):
            return  # it would be a slow leader (``partitions.latency``): not until its link is fast again
        # Only once the preferred replica said it knows this configuration (``cv``): before it has applied the
        # change that made it preferred it ignores the hand-off, and the writes refused meanwhile (below) would
        # wait the whole election timeout for nothing — the longest stalls a join cost producers.
        if (f.match_end == self.log.end_offset and now_s - f.last_contact_s <= self.heartbeat_interval_s * 2
                and f.cv >= self.config_version):
            self._hand_over(preferred, now_s, "(the preferred replica)", logging.INFO)

    def _preferred_is_slow(self, preferred: str, now_s: float) -> bool:
        return self._latency is not None and self._latency.slow(preferred, now_s)

    def _hand_over(self, successor: str, now_s: float, why: str, level: int) -> None:
        """Raft's leadership transfer to ``successor``, a voter in sync: at once if it holds the whole log,
        else as soon as it does (writes are paused meanwhile, so it catches up within a round trip)."""
        # A hand-off can still fail (the message was lost, the successor lost its campaign): try
        # again a while later.
        self._next_transfer_s = now_s + 4 * self.election_timeout_s
        # Stop taking writes, so none is acknowledged by a leader that the successor is about to
        # depose. Resume if the hand-off fails (or the successor does not catch up in time).
        self._transfer_until_s = now_s + self.election_timeout_s
        log.log(level, "%s/%d: handing leadership to %s %s", self.topic, self.partition, successor, why)
        self._transfer_to = successor
        self._maybe_send_timeout_now(successor, now_s)

    def _maybe_send_timeout_now(self, peer: str, now_s: float) -> None:
        f = self.followers.get(peer)
        if (self._transfer_to == peer and now_s < self._transfer_until_s and f is not None
                and f.match_end == self.log.end_offset):
            self._transfer_to = None
            self._send(peer, "repl_timeout_now", self._key_body(epoch=self.epoch, cv=self.config_version), ())

    def _on_step_aside(self, sender: str, body: dict, now_s: float) -> None:
        """A follower finds us slow (``partitions.latency``): hand leadership to it if it is in sync, knows our
        configuration, and we have evidence of our own: our round trips to it are slow too, or our own timers
        run late (a starved CPU: we run only in bursts, and what we send in one is answered within it, so our
        round trips look fast), or a majority of the other voters asked within ``4 × election_timeout_s``."""
        if (self.role != LEADER or body["epoch"] != self.epoch or sender not in self.replicas
                or sender == self.node_id or now_s < self._transfer_until_s or self._latency is None):
            return
        starved = self._latency.starved(now_s)
        if not starved and self._latency.slow(sender, now_s):
            # We find the asker itself far slower than our other peers: it is the slow one (a starved node hears
            # us only between its pauses, and finds us slow): never hand leadership to it, and its request does
            # not count towards a majority. (A starved leader's own round trips are late at random, so they do
            # not count against an asker.)
            return
        self._step_aside_asks[sender] = now_s
        f = self.followers.get(sender)
        if f is None or not self._peer_in_sync(sender, now_s) or f.cv < self.config_version:
            return
        others = [peer for peer in self.replicas if peer != self.node_id]
        asked = sum(1 for peer in others if now_s - self._step_aside_asks.get(peer, float("-inf"))
                    <= 4 * self.election_timeout_s)
        if self._latency.link_slow(sender, now_s):
            why = f"(our round trip to it is {self._latency.rtt(sender, now_s) * 1000:.0f} ms: it finds this leader slow)"
        elif starved:
            why = "(our own timers run late, and it finds this leader slow)"
        elif asked >= len(others) // 2 + 1:
            why = f"({asked} of our {len(others)} followers find this leader slow)"
        else:
            return
        self._step_aside_asks.clear()
        # (an operator's concern, unlike the routine hand-off to a preferred replica: WARNING)
        self._hand_over(sender, now_s, why, logging.WARNING)

    # ------------------------------------------------------------------ elections
    def _key_body(self, **fields: Any) -> dict:
        return {"topic": self.topic, "partition": self.partition, **fields}

    def _campaign(self, now_s: float, pre_vote: bool) -> None:
        if pre_vote:
            self._become(PRE_CANDIDATE)
            target = self.epoch + 1
        else:
            self._become(CANDIDATE)
            self._reset_election_timer(now_s)  # first: a persist that fails (disk full) retries later
            self.epoch += 1
            self.voted_for = self.node_id
            self._persist()
            target = self.epoch
        self.leader = None
        self.votes = {self.node_id}
        if pre_vote:
            self._reset_election_timer(now_s)
        if len(self.votes) >= self.quorum:
            self._won(now_s, pre_vote)
            return
        body = self._key_body(epoch=target, candidate=self.node_id, last_epoch=self.last_epoch,
                              end_offset=self.log.end_offset, pre_vote=pre_vote, cv=self.config_version)
        for peer in sorted(self.replicas):
            if peer != self.node_id:
                self._send(peer, "repl_vote", body, ())

    def _won(self, now_s: float, pre_vote: bool) -> None:
        if pre_vote:
            self._campaign(now_s, pre_vote=False)
            return
        self._become(LEADER)
        self.leader = self.node_id
        self.leader_since_s = now_s
        self._step_aside_asks.clear()
        self.epoch_start = self.log.end_offset
        self._config_end = max(self._config_end, self.epoch_start)
        self.history.begin(self.epoch, self.epoch_start)
        self._persist()
        self.followers.start_epoch(self.members, self.epoch_start, now_s)
        log.info("%s/%d: %s leads epoch %d from offset %d (high watermark %d)", self.topic, self.partition,
                 self.node_id, self.epoch, self.epoch_start, self.high_watermark)
        if self.fsync_always and self.log.synced_offset < self.log.end_offset:
            self._request_sync()
        for peer, f in sorted(self.followers.items()):
            self._replicate_to(peer, f, now_s, heartbeat=True)
        self.heartbeat_deadline_s = now_s + self.heartbeat_interval_s
        self._advance_high_watermark()
        self._on_change()

    def _log_limited(self, kind: str, level: int, message: str, *args: Any) -> None:
        """Log a line a peer's message causes the 1st, 1000th, 2000th, ... time: frames sent by a
        broken or hostile peer cannot flood the log (and it still shows how often they came)."""
        count = self._logged[kind] = self._logged.get(kind, 0) + 1
        if count == 1 or count % 1000 == 0:
            log.log(level, message + ("" if count == 1 else f" ({count} times so far)"), *args)

    def handle(self, sender: str, type_: str, body: dict, payloads: tuple, now_s: float) -> None:
        self._seen_cv = max(self._seen_cv, body["cv"])
        if type_ == "repl_append":
            self._on_append(sender, body, payloads[0] if payloads else b"", now_s)
        elif type_ == "repl_append_ok":
            self._on_append_ok(sender, body, now_s)
        elif type_ == "repl_vote":
            self._on_vote(sender, body, now_s)
        elif type_ == "repl_vote_ok":
            self._on_vote_ok(sender, body, now_s)
        elif type_ == "repl_step_aside":
            self._on_step_aside(sender, body, now_s)
        elif type_ == "repl_timeout_now":
            if (body["epoch"] == self.epoch and self.role == FOLLOWER and self.leader == sender
                    and self.node_id in self.replicas and body["cv"] == self.config_version):
                self._campaign(now_s, pre_vote=False)

    def _on_vote(self, sender: str, body: dict, now_s: float) -> None:
        epoch, candidate, pre_vote = body["epoch"], body["candidate"], body["pre_vote"]
        up_to_date = (body["last_epoch"], body["end_offset"]) >= (self.last_epoch, self.log.end_offset)
        # A candidate with an older configuration than ours may be counting a majority of a set
        # that no longer decides; a replica that is not a voter (a learner) grants nothing.
        eligible = (candidate in self.replicas and candidate == sender and self.node_id in self.replicas
                    and body["cv"] >= self.config_version)
        if pre_vote:
            heard_recently = (self.role == LEADER
                              or now_s - self.last_leader_contact_s < self.election_timeout_s)
            granted = eligible and epoch > self.epoch and up_to_date and not heard_recently
        else:
            if epoch > self.epoch:
                self._step_down(epoch, now_s, None)
            granted = (eligible and epoch == self.epoch and up_to_date
                       and self.voted_for in (None, candidate))
            if granted and self.voted_for != candidate:
                self.voted_for = candidate
                self._persist()
            if granted:
                self._reset_election_timer(now_s)
        self._send(sender, "repl_vote_ok", self._key_body(epoch=self.epoch, voter=self.node_id, granted=granted,
                                                          pre_vote=pre_vote, for_epoch=epoch,
                                                          cv=self.config_version), ())

    def _on_vote_ok(self, sender: str, body: dict, now_s: float) -> None:
        if body["pre_vote"]:
            if self.role != PRE_CANDIDATE or body["for_epoch"] != self.epoch + 1:
                return
            if body["epoch"] > self.epoch and not body["granted"]:
                self._step_down(body["epoch"], now_s, None)
                return
        else:
            if body["epoch"] > self.epoch:
                self._step_down(body["epoch"], now_s, None)
                return
            if self.role != CANDIDATE or body["for_epoch"] != self.epoch:
                return
        if body["granted"] and body["voter"] == sender and sender in self.replicas:
            self.votes.add(sender)
            if len(self.votes) >= self.quorum:
                self._won(now_s, body["pre_vote"])

    # ------------------------------------------------------------------ follower
    def _truncate(self, offset: int, epoch: int) -> bool:
        """Cut the log back to ``offset`` (a divergence point) for the leader of ``epoch``; False if
        that would cut committed data.

        With ``fsync=always`` committed data is on the disks of a majority and survives any power
        loss, so a leader that disagrees below our high watermark is a bug: refuse. With
        ``fsync=interval`` or ``never`` a power loss of a majority may take back committed
        records (the documented loss window): a leader of a *newer* epoch elected without them
        holds the one history the replicas go on with, and a replica that kept them must give
        them up and follow it — refusing would leave it diverged for good. Its high watermark
        goes back to the divergence point, loudly.
        """
        if offset < self.high_watermark and not self.fsync_always and epoch > self.history.epoch_at(offset):
            log.error("%s/%d: the leader of epoch %d does not hold offsets %d to %d that this replica counted as "
                      "committed (lost by a power loss within the fsync window); truncating to %d and following it",
                      self.topic, self.partition, epoch, offset, self.high_watermark - 1, offset)
            self.high_watermark = offset
        if offset < self.high_watermark:
            log.error("%s/%d: refusing to truncate to %d below the high watermark %d (a leader of epoch %d "
                      "disagrees with committed data)", self.topic, self.partition, offset, self.high_watermark,
                      self.epoch)
            return False
        log.info("%s/%d: truncating from %d to %d (divergence with the leader of epoch %d)", self.topic,
                 self.partition, self.log.end_offset, offset, self.epoch)
        self.state.truncate(offset)
        self.history.truncate(offset)
        return True

    def _on_append(self, sender: str, body: dict, data: bytes, now_s: float) -> None:
        epoch, leader = body["epoch"], body["leader"]
        probe = body.get("ts", -1.0)  # the leader's clock, echoed in our answer (a round-trip probe); -1: none
        latency = self._latency
        echo = body.get("echo", -1.0)
        if echo >= 0 and latency is not None:  # our clock from an earlier answer: a round trip
            latency.note(sender, now_s - echo - body.get("held", 0.0), now_s)
        lag = body.get("lag", -1.0)
        if lag >= 0 and latency is not None:  # how late the leader's timers run
            latency.note_peer_lag(sender, lag, now_s)
        if (epoch < self.epoch or leader != sender or sender not in self.replicas
                or body["cv"] < self.config_version):
            # Not our leader: a stale epoch, or a leader still using an older configuration (it
            # learns the newer version from this answer and cannot count it).
            self._reply_append(sender, False, -1, self.log.end_offset, probe, now_s)
            return
        if epoch == self.epoch and self.role == LEADER:
            self._log_limited("two_leaders", logging.ERROR, "%s/%d: two leaders in epoch %d (%s and %s)",
                              self.topic, self.partition, epoch, self.node_id, sender)
            return
        # The sender leads this epoch (or a newer one than ours): follow it.
        if epoch > self.epoch or self.role != FOLLOWER:
            self._step_down(epoch, now_s, leader)
        if self.leader != leader:
            self.leader = leader
            self._on_change()
        self.last_leader_contact_s = now_s
        self._reset_election_timer(now_s)
        if (echo >= 0 and latency is not None and now_s >= self._next_step_aside_s
                and self.node_id in self.replicas and latency.slow(leader, now_s)):
            # Our leader is far slower than our other peers (its round trips, or the lag of its timers): ask it to
            # hand leadership to us. Only on an append carrying an echo: the leader has then had an answer of ours
            # this epoch, so it may count us in sync (a request it must refuse would start our wait for nothing).
            self._next_step_aside_s = now_s + 4 * self.election_timeout_s
            self._log_limited("step_aside", logging.WARNING, "%s/%d: the leader %s is slow (round trip %.0f ms, its "
                              "timers %.0f ms late: far above our other peers'); asking it to step aside", self.topic,
                              self.partition, leader, (latency.rtt(leader, now_s) or 0.0) * 1000,
                              (latency.peer_lag(leader, now_s) or 0.0) * 1000)
            self._send(leader, "repl_step_aside", self._key_body(epoch=self.epoch, cv=self.config_version), ())
        prev = body["prev_offset"]
        end = self.log.end_offset
        if prev >= end and prev + 1 == body["log_start"] > end:
            # What we miss was deleted by the leader's retention: drop our (older) records and
            # continue from the leader's log start, as its own retention would have.
            log.warning("%s/%d: the leader %s no longer has offsets %d..%d; restarting this copy at %d",
                        self.topic, self.partition, sender, end, prev, body["log_start"])
            self.state.restart_at(body["log_start"])
            self.history.clear()
            self.high_watermark = max(self.high_watermark, self.log.start_offset)
            self._persist()
            end = self.log.end_offset
        if prev >= end:
            self._reply_append(sender, False, -1, end, probe, now_s)
            return
        if prev >= self.log.start_offset and self.epoch_at(prev) != body["prev_epoch"]:
            # (with fsync != always our high watermark may stand past the divergence point: see _truncate)
            floor = self.high_watermark if self.fsync_always else self.log.start_offset
            hint = max(self.history.run_start(prev), floor, self.log.start_offset)
            self._reply_append(sender, False, -1, min(hint, prev), probe, now_s)
            return
        matched_end = prev + 1
        history_changed = False
        appended = False
        now_ms = self._wall_clock_ms()
        try:
            for pos, header in batch_format.iter_batches(data):
                if header.base_offset != matched_end and not (
                        header.base_offset > matched_end and batch_format.gap_allowed(header)):
                    # (a batch after records the leader's compaction removed may start later)
                    raise ProtocolError(f"batch at {header.base_offset} does not follow offset {matched_end - 1}")
                if header.base_offset < self.log.end_offset:
                    if self.epoch_at(header.base_offset) == header.leader_epoch:
                        matched_end = header.next_offset  # already stored (a duplicate or a resend)
                        continue
                    if not self._truncate(header.base_offset, epoch):
                        return
                    history_changed = True
                if self.last_epoch > header.leader_epoch and self.history.truncate(header.base_offset):
                    # Markers of newer epochs that we adopted at this offset are not in the
                    # leader's log (it has an older epoch's batch here): they conflict with it.
                    history_changed = True
                batch = bytes(data[pos:pos + header.size])
                if self._space is not None:
                    self._space.refuse_writes(self.topic, self.partition)
                self.state.append_replicated(batch, header, now_ms)
                appended = True
                if self.history.begin(header.leader_epoch, header.base_offset):
                    history_changed = True
                matched_end = header.next_offset
        except (CorruptLogError, ProtocolError) as exc:
            self._log_limited("bad_append", logging.WARNING, "%s/%d: dropped a bad append from %s: %s",
                              self.topic, self.partition, sender, exc)
            return
        except StorageFullError as exc:
            # Our disk is full: keep what was stored, tell the leader where our log ends. We stay
            # in contact but fall behind, so we leave the in-sync replicas; the others carry acks.
            if isinstance(exc, DiskFullError) and self._space is not None:
                self._space.note_full(str(exc), now_s)
            log.debug("%s/%d: cannot take batches from %s: %s", self.topic, self.partition, sender, exc)
            if history_changed:
                self._persist()
            if appended:
                self._on_follower_append()
            self._reply_append(sender, False, -1, self.log.end_offset, probe, now_s)
            return
        if self.last_epoch < epoch and matched_end >= body["epoch_start"]:
            # Our log equals the leader's up to where its epoch begins: anything we hold past that
            # point is from an older epoch and conflicts with the leader's (zero-length) marker.
            if self.log.end_offset > body["epoch_start"]:
                if not self._truncate(body["epoch_start"], epoch):
                    return
            self.history.begin(epoch, body["epoch_start"])
            history_changed = True
        if body["hw"] > self.high_watermark:
            self.high_watermark = max(self.high_watermark, min(body["hw"], matched_end))
        if history_changed:
            self._persist()  # before the answer that lets the leader count this log
        else:
            self._maybe_save_hw(now_s)
        if appended:
            self._on_follower_append()
        if self.fsync_always and self.log.synced_offset < matched_end:
            # Confirm later only what was checked against this leader (and is then synced).
            pending = self._pending_ack
            verified = matched_end
            if pending is not None and pending[:2] == (sender, epoch):
                verified = max(verified, pending[2])
            self._pending_ack = (sender, epoch, verified)
            self._request_sync()
            matched_end = min(matched_end, self.log.synced_offset)
        self._reply_append(sender, True, matched_end, self.log.end_offset, probe, now_s)

    def _reply_append(self, leader: str, ok: bool, match_end: int, hint: int, probe: float = -1.0,
                      now_s: float = 0.0) -> None:
        body = self._key_body(epoch=self.epoch, follower=self.node_id, ok=ok, match_end=match_end, hint=max(0, hint),
                              cv=self.config_version)
        if probe >= 0:
            # echo the leader's clock (its round trip), and give ours (echoed back: our round trip)
            body["echo"] = probe
            body["ts"] = now_s
        self._send(leader, "repl_append_ok", body, ())

    def on_synced(self, now_s: float) -> None:
        """The log was synced: a leader may commit more, a follower may confirm more."""
        if self.role == LEADER:
            self._advance_high_watermark()
        elif self._pending_ack is not None:
            leader, epoch, verified = self._pending_ack
            self._pending_ack = None
            if epoch == self.epoch and leader == self.leader:
                self._reply_append(leader, True, min(verified, self.log.synced_offset), self.log.end_offset)

    # ------------------------------------------------------------------ leader
    def on_local_append(self, now_s: float) -> None:
        """The leader stored a new batch: send it on."""
        for peer, f in sorted(self.followers.items()):
            self._replicate_to(peer, f, now_s)
        self._advance_high_watermark()

    def _on_append_ok(self, sender: str, body: dict, now_s: float) -> None:
        if body["epoch"] > self.epoch:
            self._step_down(body["epoch"], now_s, None)
            return
        if self.role != LEADER or body["epoch"] != self.epoch or body["follower"] != sender:
            return
        f = self.followers.get(sender)
        if f is None or body["cv"] > self.config_version:
            return  # a follower that knows a newer configuration does not count for this one
        f.answered(body["cv"], now_s)
        if self._latency is not None:
            echo, ts = body.get("echo", -1.0), body.get("ts", -1.0)
            if echo >= 0:  # our clock from a probe: a round trip
                self._latency.note(sender, now_s - echo, now_s)
            if ts >= 0:  # the follower's clock, to echo in our next append to it
                f.peer_ts, f.peer_ts_at = ts, now_s
        resend = True
        if body["ok"]:
            f.matched(body["match_end"], self.log.end_offset)
            self._advance_high_watermark()
            if self._transfer_to == sender:
                self._maybe_send_timeout_now(sender, now_s)
        else:
            # Resend at once only on progress; otherwise the next heartbeat retries (no ping-pong
            # with a follower that cannot take what we send).
            resend = f.refused(body["hint"])
        if resend and f.next_offset < self.log.end_offset:
            # (a follower behind our log start gets the log from its start: it restarts its copy there)
            self._replicate_to(sender, f, now_s)
        if self.state.waiting_for_all:
            self._on_change()  # an acks=all waiter may be complete now

    def _replicate_to(self, peer: str, f: FollowerProgress, now_s: float, heartbeat: bool = False) -> None:
        end = self.log.end_offset
        # A follower that stopped answering (down, cut off, paused) gets only empty heartbeats:
        # data sent into a dead link would queue in the transport and flood it on the heal.
        silent = now_s - f.last_contact_s > 2 * self.heartbeat_interval_s
        if silent and not heartbeat:
            return
        while heartbeat or (f.next_offset < end and f.in_flight < MAX_IN_FLIGHT):
            start = f.next_offset
            data = b""
            next_offset = start
            budget = MAX_APPEND_BYTES
            throttle = self._copy_throttle
            catching_up = (start < end and not silent and throttle is not None and not throttle.unlimited
                           and not self._peer_in_sync(peer, now_s))
            if catching_up:
                # A replica catching up (a rebalance's new copy, a follower far behind) shares the
                # node's copy rate; in-sync followers never wait for it, so live writes keep their pace.
                budget = throttle.grant(now_s, MAX_APPEND_BYTES, (peer, self.topic, self.partition))
                if budget == 0 and not heartbeat:
                    return  # out of tokens: the next heartbeat sends more
            if start < end and not silent and budget > 0:
                from_offset = max(start, self.log.start_offset)
                recent = self.state.read_recent(from_offset, budget)
                if recent is not None:
                    data, start, next_offset = recent
                else:
                    try:
                        data = self.log.read(from_offset, budget)
                    except CorruptLogError as exc:
                        log.error("%s/%d: cannot replicate from offset %d to %s: %s", self.topic, self.partition,
                                  start, peer, exc)
                        if not heartbeat:
                            return  # retry what cannot be read at the next heartbeat, not on every answer
                        data = b""
                if data and recent is None:
                    first = batch_format.parse_header(data)
                    # past ``from_offset`` when compaction removed the records in between
                    start = min(first.base_offset, from_offset)
                    next_offset = start
                    for _pos, header in batch_format.iter_batches(data, verify_crc=False):
                        next_offset = header.next_offset
                if catching_up and data:
                    throttle.charge(now_s, len(data))
            prev = start - 1
            body = self._key_body(epoch=self.epoch, leader=self.node_id, prev_offset=prev,
                                  prev_epoch=self.epoch_at(prev) if prev >= 0 else 0, hw=self.high_watermark,
                                  epoch_start=self.epoch_start, cv=self.config_version,
                                  log_start=self.log.start_offset)
            if self._latency is not None:
                f.add_probe(body, now_s, self.heartbeat_interval_s, self.election_timeout_s, self._latency)
            self._send(peer, "repl_append", body, (data,) if data else ())
            f.next_offset = next_offset
            f.in_flight += 1
            f.last_send_s = now_s
            heartbeat = False
            if not data:
                break

    def _advance_high_watermark(self) -> None:
        if self.role != LEADER:
            return
        matches = sorted([self._own_match()] + [max(0, f.match_end) for peer, f in self.followers.items()
                                                 if peer in self.replicas], reverse=True)
        if len(matches) < self.quorum:
            return
        candidate = matches[self.quorum - 1]
        if candidate >= self.epoch_start and candidate > self.high_watermark:
            self.high_watermark = candidate
            self._on_change()
