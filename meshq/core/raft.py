"""Raft for the cluster's metadata: the agreed storage membership and topic assignments.

Theory of operation
-------------------
One ``RaftNode`` per storage node runs the metadata group. Its voters are the members of
the latest ``config`` entry in its log — appended, not necessarily committed (the
single-server membership change of Ongaro's dissertation, §4.1). Safety rules kept here:

* A leader changes the configuration only after it has committed an entry of its own term
  (it appends a no-op when elected) and while no other config entry is uncommitted; each
  change adds or removes exactly one member. This avoids the known single-server-change bug.
* A leader commits only entries of its current term by counting replicas (§5.4.2).
* Votes are granted only to candidates whose log is at least as up to date (§5.4.1).
* PreVote (§9.6): a node first asks whether it *could* win, with its term unchanged, so a
  node that was cut off and comes back does not depose a healthy leader. Voters refuse
  pre-votes while they hear from a leader.
* Term and vote are persisted (``save_state``) before any message that depends on them is
  sent; entries are appended and synced before they are acknowledged.

Entries are stored in a ``LogStore`` as one-record batches: the batch's ``leader_epoch``
holds the entry's term and its offset is the entry's index (0-based). All messages are
one-way (``send(peer, type, body)``): replies are new messages, which keeps the core free of
request bookkeeping and makes duplicated or reordered delivery harmless (checked by terms
and indexes). A node not in any configuration (fresh) never campaigns; it joins by asking
the leader to add it, or bootstraps a one-member cluster (see ``NodeCore``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from meshq.core import batch as batch_format

log = logging.getLogger("meshq.raft")

MAX_ENTRIES_PER_APPEND = 256

FOLLOWER = "follower"
PRE_CANDIDATE = "pre_candidate"
CANDIDATE = "candidate"
LEADER = "leader"

# Allowed role transitions (anything else is a bug).
TRANSITIONS = {
    FOLLOWER: {PRE_CANDIDATE, FOLLOWER, LEADER},  # LEADER directly only by bootstrap
    PRE_CANDIDATE: {CANDIDATE, FOLLOWER},
    CANDIDATE: {LEADER, FOLLOWER, PRE_CANDIDATE},
    LEADER: {FOLLOWER},
}


# the commands of a log that holds nothing but its membership: configurations, leaders' no-ops, a dissolve
MEMBERSHIP_OPS = frozenset({"config", "noop", "dissolve"})


@dataclass(slots=True)
class Progress:
    """What the leader knows of one follower."""

    next_index: int
    match_index: int = -1
    last_contact_s: float = 0.0
    in_flight_until_s: float = 0.0


def _decode_command(data: bytes) -> dict | None:
    try:
        command = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception:  # msgpack raises several unrelated exception types
        return None
    return command if isinstance(command, dict) and isinstance(command.get("op"), str) else None


def encode_entry(term: int, index: int, command: dict) -> bytes:
    value = msgpack.packb(command, use_bin_type=True)
    return batch_format.encode_batch([(None, value, None, 0)], base_offset=index, leader_epoch=term)


class RaftNode:
    """One member's view of the metadata Raft group."""

    def __init__(self, node_id: str, log_store: Any, persisted: dict | None, rng: random.Random,
                 send: Callable[[str, str, dict], None], apply: Callable[[int, dict], None],
                 save_state: Callable[[dict], None], election_timeout_s: float = 1.0,
                 heartbeat_interval_s: float = 0.15) -> None:
        self.node_id = node_id
        self.log = log_store
        self.rng = rng
        self.send = send
        self.apply_callback = apply
        self.save_state = save_state
        self.election_timeout_s = election_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        persisted = persisted or {}
        self.term: int = persisted.get("term", 0)
        self.voted_for: str | None = persisted.get("voted_for")
        self.role = FOLLOWER
        self.leader: str | None = None
        self.last_applied = -1
        self.entries: list[tuple[int, dict]] = []  # (term, command), position == index
        # the index of the first ``dissolve`` in the log: from it on no leader proposes anything
        # (the group is giving itself up, meshq.core.metadata)
        self.sealed_index: int | None = None
        # the index of the first command that is not membership (config, noop, dissolve): None while the log holds
        # nothing else (meshq.core.cluster.formation gives such a group up when it meets another of its name)
        self.first_content_index: int | None = None
        self._load_entries()
        # A commit index once learned stays true forever (committed entries are never lost),
        # so persisting it lets a restarted node apply its metadata without waiting for a leader.
        self.commit_index = min(persisted.get("commit", -1), self.last_index)
        self.config_index = -1
        self.voters: dict[str, dict] = {}
        self._recompute_config()
        self.progress: dict[str, Progress] = {}
        # Leader-local: nodes receiving the log as non-voters until they catch up (Raft §4.2.1),
        # so a joiner that never answers cannot make the group lose its quorum.
        self.learners: dict[str, dict] = {}
        self.learner_since_s: dict[str, float] = {}
        self.votes: set[str] = set()
        self.election_deadline_s = float("inf")
        self.heartbeat_deadline_s = float("inf")
        self.last_leader_contact_s = float("-inf")
        # callbacks waiting for an index to commit: index -> list of (term, callback(ok))
        self.waiting: dict[int, list[tuple[int, Callable[[bool], None]]]] = {}

    # ------------------------------------------------------------------ persistence
    def _load_entries(self) -> None:
        offset = self.log.start_offset
        while offset < self.log.end_offset:
            data = self.log.read(offset, 1 << 24)
            if not data:
                break
            for pos, header in batch_format.iter_batches(data):
                (record,) = batch_format.decode_records(data[pos:pos + header.size], "__meta", 0)
                self.entries.append((header.leader_epoch, msgpack.unpackb(record.value, raw=False)))
                self._note_seal(len(self.entries) - 1)
                offset = header.next_offset
        assert len(self.entries) == self.log.end_offset

    def _persist_state(self) -> None:
        self.save_state({"term": self.term, "voted_for": self.voted_for, "commit": self.commit_index})

    def _append_local(self, term: int, command: dict) -> int:
        index = len(self.entries)
        assert self.log.end_offset == index
        self.log.append(encode_entry(term, index, command))
        self.entries.append((term, command))
        if command.get("op") == "config":
            self._recompute_config()
        self._note_seal(index)
        return index

    def _note_seal(self, index: int) -> None:
        op = self.entries[index][1].get("op")
        if self.sealed_index is None and op == "dissolve":
            self.sealed_index = index
        if self.first_content_index is None and op not in MEMBERSHIP_OPS:
            self.first_content_index = index

    def _truncate_local(self, index: int) -> None:
        assert index > self.commit_index, f"truncating committed entry {index} (commit {self.commit_index})"
        self.log.truncate_to(index)
        del self.entries[index:]
        self._recompute_config()
        if self.sealed_index is not None and self.sealed_index >= index:
            self.sealed_index = None
        if self.first_content_index is not None and self.first_content_index >= index:
            self.first_content_index = None

    def _recompute_config(self) -> None:
        for index in range(len(self.entries) - 1, -1, -1):
            command = self.entries[index][1]
            if command.get("op") == "config":
                self.config_index = index
                self.voters = dict(command["members"])
                return
        self.config_index = -1
        self.voters = {}

    # ------------------------------------------------------------------ queries
    @property
    def last_index(self) -> int:
        return len(self.entries) - 1

    @property
    def last_term(self) -> int:
        return self.entries[-1][0] if self.entries else 0

    def term_at(self, index: int) -> int:
        return self.entries[index][0] if 0 <= index < len(self.entries) else 0

    @property
    def is_member(self) -> bool:
        return self.node_id in self.voters

    @property
    def formed(self) -> bool:
        return self.config_index >= 0

    @property
    def formation(self) -> str:
        """The identity of the cluster this log belongs to, fixed when it was formed: the ``formation`` of the
        first entry (the founder's one-member configuration), or the founder's node id in a log written before
        formations existed. Two clusters of the same name formed apart never share it. "" before any entry."""
        if not self.entries:
            return ""
        first = self.entries[0][1]
        if first.get("op") != "config":
            return ""
        formation = first.get("formation")
        if isinstance(formation, str) and formation:
            return formation
        return ",".join(sorted(first.get("members", {})))

    def quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def next_deadline(self) -> float:
        if self.role == LEADER:
            return self.heartbeat_deadline_s
        return self.election_deadline_s

    def status(self) -> dict:
        return {"term": self.term, "role": self.role, "leader": self.leader, "commit_index": self.commit_index,
                "last_index": self.last_index, "voters": sorted(self.voters), "formation": self.formation}

    # ------------------------------------------------------------------ role changes
    def _become(self, role: str) -> None:
        assert role in TRANSITIONS[self.role], f"raft: {self.role} -> {role} is not a valid transition"
        self.role = role

    def _reset_election_timer(self, now_s: float) -> None:
        self.election_deadline_s = now_s + self.election_timeout_s * (1.0 + self.rng.random())

    def start(self, now_s: float) -> None:
        self.last_leader_contact_s = float("-inf")
        self._reset_election_timer(now_s)
        self._apply_committed()
        if len(self.voters) == 1 and self.is_member:
            # Sole member: no one to ask; the (pre-)votes are won at once.
            self._start_election(now_s, pre_vote=True)

    def bootstrap(self, now_s: float, member_info: dict, formation: str = "") -> None:
        """Form a new one-member cluster (only for a node with an empty log); ``formation``: its identity
        (see the ``formation`` property; the founder's id when empty)."""
        assert not self.entries and self.term == 0
        self.term = 1
        self.voted_for = self.node_id
        self._persist_state()
        command: dict = {"op": "config", "members": {self.node_id: member_info}}
        if formation:
            command["formation"] = formation
        self._append_local(1, command)
        self.log.sync()
        self._become(LEADER)
        self._on_elected(now_s)

    def _step_down(self, term: int, now_s: float, leader: str | None = None) -> None:
        if term > self.term:
            self.term = term
            self.voted_for = None
            self._persist_state()
        if self.role != FOLLOWER:
            self._become(FOLLOWER)
            self._fail_waiting()
            self.learners.clear()
            self.learner_since_s.clear()
        self.leader = leader
        self._reset_election_timer(now_s)

    def _fail_waiting(self) -> None:
        waiting, self.waiting = self.waiting, {}
        for callbacks in waiting.values():
            for _term, callback in callbacks:
                callback(False)

    # ------------------------------------------------------------------ timers
    def on_timer(self, now_s: float) -> None:
        if self.role == LEADER:
            if now_s >= self.heartbeat_deadline_s:
                if not self._quorum_recently_heard(now_s):
                    # Check-quorum: a leader cut off from the majority steps down rather than
                    # accept proposals that can never commit.
                    log.warning("raft: leader %s lost contact with a majority; stepping down", self.node_id)
                    self._step_down(self.term, now_s)
                    return
                self._broadcast_append(now_s, heartbeat=True)
                self.heartbeat_deadline_s = now_s + self.heartbeat_interval_s
            return
        if now_s >= self.election_deadline_s:
            if self.is_member:
                self._start_election(now_s, pre_vote=True)
            else:
                self._reset_election_timer(now_s)

    def _quorum_recently_heard(self, now_s: float) -> bool:
        window = 2 * self.election_timeout_s
        heard = sum(1 for peer, p in self.progress.items()
                    if peer in self.voters and now_s - p.last_contact_s <= window)
        return heard + (1 if self.is_member else 0) >= self.quorum()

    def _start_election(self, now_s: float, pre_vote: bool) -> None:
        if pre_vote:
            if self.role != PRE_CANDIDATE:
                self._become(PRE_CANDIDATE)
            term = self.term + 1
        else:
            self._become(CANDIDATE)
            self._reset_election_timer(now_s)  # first: a persist that fails (disk full) retries later
            self.term += 1
            self.voted_for = self.node_id
            self._persist_state()
            term = self.term
        self.leader = None
        self.votes = {self.node_id}
        if pre_vote:
            self._reset_election_timer(now_s)
        if len(self.votes) >= self.quorum():
            self._won(now_s, pre_vote)
            return
        body = {"term": term, "candidate": self.node_id, "last_index": self.last_index,
                "last_term": self.last_term, "pre_vote": pre_vote}
        for peer in sorted(self.voters):
            if peer != self.node_id:
                self.send(peer, "raft_vote", body)

    def _won(self, now_s: float, pre_vote: bool) -> None:
        if pre_vote:
            self._start_election(now_s, pre_vote=False)
        else:
            self._become(LEADER)
            self._on_elected(now_s)

    def _on_elected(self, now_s: float) -> None:
        self.leader = self.node_id
        log.info("raft: %s is leader of term %d", self.node_id, self.term)
        self.progress = {peer: Progress(len(self.entries), last_contact_s=now_s)
                         for peer in self.voters if peer != self.node_id}
        self._append_local(self.term, {"op": "noop"})
        self.log.sync()
        self._broadcast_append(now_s, heartbeat=False)
        self.heartbeat_deadline_s = now_s + self.heartbeat_interval_s
        self._advance_commit(now_s)

    # ------------------------------------------------------------------ messages
    def handle(self, sender: str, type_: str, body: dict, now_s: float) -> None:
        handler = _HANDLERS.get(type_)
        if handler is not None:
            handler(self, sender, body, now_s)

    def _on_vote(self, sender: str, body: dict, now_s: float) -> None:
        term, candidate, pre_vote = body["term"], body["candidate"], body["pre_vote"]
        up_to_date = (body["last_term"], body["last_index"]) >= (self.last_term, self.last_index)
        if pre_vote:
            # Refuse while a leader is heard from: a returning node must not disrupt it.
            heard_recently = (self.role == LEADER
                              or now_s - self.last_leader_contact_s < self.election_timeout_s)
            granted = term > self.term and up_to_date and not heard_recently and candidate in self.voters
            self.send(sender, "raft_vote_ok", {"term": self.term, "granted": granted, "pre_vote": True,
                                               "voter": self.node_id, "for_term": term})
            return
        if term > self.term:
            self._step_down(term, now_s)
        granted = (term == self.term and up_to_date and self.voted_for in (None, candidate)
                   and candidate in self.voters)
        if granted:
            self.voted_for = candidate
            self._persist_state()
            self._reset_election_timer(now_s)
        self.send(sender, "raft_vote_ok", {"term": self.term, "granted": granted, "pre_vote": False,
                                           "voter": self.node_id, "for_term": term})

    def _on_vote_ok(self, sender: str, body: dict, now_s: float) -> None:
        if body["pre_vote"]:
            if self.role != PRE_CANDIDATE or body["for_term"] != self.term + 1:
                return
            if body["term"] > self.term and not body["granted"]:
                self._step_down(body["term"], now_s)
                return
        else:
            if body["term"] > self.term:
                self._step_down(body["term"], now_s)
                return
            if self.role != CANDIDATE or body["for_term"] != self.term:
                return
        if body["granted"] and body["voter"] in self.voters:
            self.votes.add(body["voter"])
            if len(self.votes) >= self.quorum():
                self._won(now_s, body["pre_vote"])

    def _on_append(self, sender: str, body: dict, now_s: float) -> None:
        term = body["term"]
        # Decoded first: an append carrying garbage is dropped before its term or leader is believed.
        commands = []
        for _entry_term, command_bytes in body["entries"]:
            command = _decode_command(command_bytes)
            if command is None:
                log.warning("raft: dropped an append from %s carrying an undecodable command", sender)
                return
            commands.append(command)
        if term < self.term:
            self.send(sender, "raft_append_ok", {"term": self.term, "success": False, "match_index": -1,
                                                 "follower": self.node_id, "hint": len(self.entries)})
            return
        if term > self.term or self.role != FOLLOWER:
            self._step_down(term, now_s, body["leader"])
        self.leader = body["leader"]
        self.last_leader_contact_s = now_s
        self._reset_election_timer(now_s)
        prev_index, prev_term = body["prev_index"], body["prev_term"]
        if prev_index >= len(self.entries) or (prev_index >= 0 and self.term_at(prev_index) != prev_term):
            hint = min(prev_index, len(self.entries))
            if 0 <= hint < len(self.entries):
                conflict_term = self.term_at(hint)
                while hint > 0 and self.term_at(hint - 1) == conflict_term and hint - 1 > self.commit_index:
                    hint -= 1
            self.send(sender, "raft_append_ok", {"term": self.term, "success": False, "match_index": -1,
                                                 "follower": self.node_id, "hint": max(0, hint)})
            return
        index = prev_index
        appended = False
        for (entry_term, _bytes), command in zip(body["entries"], commands):
            index += 1
            if index < len(self.entries):
                if self.term_at(index) == entry_term:
                    continue
                if index <= self.commit_index:
                    # A correct leader never contradicts a committed entry; refuse rather than obey.
                    log.error("raft: %s asked to overwrite committed entry %d; ignored", sender, index)
                    return
                self._truncate_local(index)
            self._append_local(entry_term, command)
            appended = True
        if appended:
            self.log.sync()
        match_index = prev_index + len(body["entries"])
        if body["commit"] > self.commit_index:
            # A re-sent append may cover less than we already know committed: never go back.
            self.commit_index = max(self.commit_index, min(body["commit"], match_index))
            self._apply_committed()
        self.send(sender, "raft_append_ok", {"term": self.term, "success": True, "match_index": match_index,
                                             "follower": self.node_id, "hint": match_index + 1})

    def _on_append_ok(self, sender: str, body: dict, now_s: float) -> None:
        if body["term"] > self.term:
            self._step_down(body["term"], now_s)
            return
        if self.role != LEADER or body["term"] != self.term:
            return
        progress = self.progress.get(body["follower"])
        if progress is None:
            return
        progress.last_contact_s = now_s
        progress.in_flight_until_s = 0.0
        if body["success"]:
            if body["match_index"] > progress.match_index:
                progress.match_index = body["match_index"]
            progress.next_index = max(progress.next_index, progress.match_index + 1)
            self._advance_commit(now_s)
        else:
            progress.next_index = max(0, min(progress.next_index - 1, body["hint"]))
        if progress.next_index < len(self.entries):
            self._send_append(body["follower"], progress, now_s)

    # ------------------------------------------------------------------ leader duties
    def _broadcast_append(self, now_s: float, heartbeat: bool) -> None:
        for peer, progress in sorted(self.progress.items()):
            if heartbeat or progress.next_index < len(self.entries):
                self._send_append(peer, progress, now_s, force=heartbeat)

    def _send_append(self, peer: str, progress: Progress, now_s: float, force: bool = False) -> None:
        if not force and progress.in_flight_until_s > now_s:
            return  # one batch of entries in flight per follower; heartbeats still go out
        prev_index = progress.next_index - 1
        end = min(len(self.entries), progress.next_index + MAX_ENTRIES_PER_APPEND)
        entries = [[term, msgpack.packb(command, use_bin_type=True)]
                   for term, command in self.entries[progress.next_index:end]]
        if entries:
            progress.in_flight_until_s = now_s + self.election_timeout_s
        self.send(peer, "raft_append", {"term": self.term, "leader": self.node_id, "prev_index": prev_index,
                                        "prev_term": self.term_at(prev_index), "commit": self.commit_index,
                                        "entries": entries})

    def _advance_commit(self, now_s: float) -> None:
        matches = sorted((p.match_index for peer, p in self.progress.items() if peer in self.voters), reverse=True)
        if self.is_member:
            matches.insert(0, self.last_index)
            matches.sort(reverse=True)
        quorum = self.quorum()
        if len(matches) < quorum:
            return
        candidate = matches[quorum - 1]
        if candidate > self.commit_index and self.term_at(candidate) == self.term:
            self.commit_index = candidate
            self._apply_committed()
            self._broadcast_append(now_s, heartbeat=False)
        if not self.is_member and self.commit_index >= self.config_index:
            # A leader that removed itself steps down once the removal is committed.
            self._step_down(self.term, now_s)

    def _apply_committed(self) -> None:
        if self.last_applied >= self.commit_index:
            return
        while self.last_applied < self.commit_index:
            self.last_applied += 1
            term, command = self.entries[self.last_applied]
            self.apply_callback(self.last_applied, command)
            for entry_term, callback in self.waiting.pop(self.last_applied, []):
                callback(entry_term == term)
        self._persist_state()

    def propose(self, command: dict, now_s: float, on_done: Callable[[bool], None]) -> bool:
        """Append ``command`` as leader; ``on_done(committed)`` is called later. False if not leader,
        or if the log is sealed (a ``dissolve`` is in it: nothing may follow)."""
        if self.role != LEADER or self.sealed_index is not None:
            return False
        if command.get("op") == "config":
            if not self.can_change_config():
                return False
        index = self._append_local(self.term, command)
        self.log.sync()
        if command.get("op") == "config":
            for peer in command["members"]:
                self.learners.pop(peer, None)
                self.learner_since_s.pop(peer, None)
                if peer != self.node_id and peer not in self.progress:
                    self.progress[peer] = Progress(0, last_contact_s=now_s)
            for peer in list(self.progress):
                if peer not in self.voters and peer not in self.learners:
                    del self.progress[peer]
        self.waiting.setdefault(index, []).append((self.term, on_done))
        self._broadcast_append(now_s, heartbeat=False)
        self._advance_commit(now_s)
        return True

    def can_change_config(self) -> bool:
        """One change at a time, and only after committing an entry of this term."""
        return (self.role == LEADER and self.config_index <= self.commit_index
                and self.commit_index >= 0 and self.term_at(self.commit_index) == self.term)

    def silent_voters(self, now_s: float, for_s: float) -> list[str]:
        """Voters the leader has not heard from for ``for_s`` seconds."""
        return sorted(peer for peer, p in self.progress.items()
                      if peer in self.voters and now_s - p.last_contact_s > for_s)

    def add_learner(self, node_id: str, info: dict, now_s: float) -> bool:
        """Leader: start replicating to ``node_id`` as a non-voter. False if not leader or already known."""
        if self.role != LEADER or node_id in self.voters or node_id in self.learners:
            return False
        self.learners[node_id] = dict(info)
        self.learner_since_s[node_id] = now_s
        self.progress[node_id] = Progress(len(self.entries), last_contact_s=now_s)
        self._send_append(node_id, self.progress[node_id], now_s, force=True)
        return True

    def caught_up_learners(self) -> list[str]:
        """Learners whose log reaches the commit index: ready to become voters."""
        return sorted(peer for peer in self.learners
                      if self.progress[peer].match_index >= self.commit_index >= 0)

    def drop_stale_learners(self, now_s: float, after_s: float) -> list[str]:
        """Forget learners that did not catch up within ``after_s``."""
        stale = sorted(peer for peer, since in self.learner_since_s.items()
                       if now_s - since > after_s and peer not in self.caught_up_learners())
        for peer in stale:
            self.drop_learner(peer)
        return stale

    def drop_learner(self, node_id: str) -> None:
        """Stop replicating to learner ``node_id`` (it is never made a voter); nothing if it is none."""
        if node_id in self.learners:
            del self.learners[node_id]
            self.learner_since_s.pop(node_id, None)
            self.progress.pop(node_id, None)


_HANDLERS: dict[str, Callable[[RaftNode, str, dict, float], None]] = {
    "raft_vote": RaftNode._on_vote,
    "raft_vote_ok": RaftNode._on_vote_ok,
    "raft_append": RaftNode._on_append,
    "raft_append_ok": RaftNode._on_append_ok,
}
