"""Agreement: the metadata Raft group of the storage nodes, and what it agrees on.

Theory of operation
-------------------
The storage membership (which the placement ring is computed from), topic configurations and
partition replica sets are commands in a Raft log (``meshq.core.raft.RaftNode``), applied in
order to a ``MetadataState`` (``meshq.core.metadata``) on every storage node. This room owns
both and:

* proposes commands (``propose``): on the leader directly, elsewhere by asking the leader
  (``raft_propose``) and waiting until the returned index is applied here;
* serves the leader's side: a peer's ``raft_propose`` (create_topic, reassign, leave, acl),
  ``raft_join`` (a joiner is queued, becomes a learner at once, then a voter once caught up:
  one configuration change at a time), and removes a voter silent for ``member_timeout_s``;
* rebuilds lost partitions (``rebuild_lost``, leader only): a partition none of whose voters
  is a member any more (all removed for good) is recreated empty on its ring placement,
  starting past the highest log end offset its leaders reported in their heartbeats
  (``metadata.py``: ``REBUILD_GAP`` or twice the largest growth between two reports; ``note_lead``: every storage node keeps
  them per partition, so a new metadata leader knows them too);
* applies each committed command (``apply``): a topic agreed opens its local replicas, a
  replica-set step reconfigures one (``core.host``), a new configuration makes us meet
  voters we only know from the log;
* gives the group up when it holds nothing and meets another of its name that outranks it
  (``meshq.core.cluster.formation`` decides): the leader proposes ``dissolve``; from the moment
  the group knows it yields, every change but membership is refused (``_merging``), and ``reset``
  forgets the log. Every raft message it sends names its formation (``send``), and one naming
  another is dropped (``serve_raft``).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from typing import Any

import msgpack

from meshq.config import TopicConfig, refuse_reserved_topic
from meshq.core import wire
from meshq.core.metadata import MetadataState, describe_rebuild
from meshq.core.raft import LEADER, RaftNode
from meshq.core.room import Room
from meshq.errors import MeshqError, NotLeaderError, ProtocolError

log = logging.getLogger("meshq.core")

OFFSETS_TOPIC = "__consumer_offsets"
META_TOPIC = "__meta"
# The highest raft term a peer may name: the wire allows up to 1 << 62, and a node must be able
# to send term + 1. A message at the ceiling is refused (one such frame would otherwise freeze
# elections: every vote the node then asked for would break the schema at its peers).
MAX_TERM = (1 << 62) - 1
_TERM_FIELDS = ("term", "for_term", "last_term", "prev_term")
_TAGGED = frozenset({"raft_vote", "raft_vote_ok", "raft_append", "raft_append_ok"})
_MERGING = ("this cluster held nothing and is giving itself up to join another cluster of the same name "
            "(docs/operations.md, 'Two clusters of the same name'); retry in a moment: the merged cluster takes it")


class Agreement(Room):
    """The metadata Raft group and its applied state (see the module docstring)."""

    SERVES = {"raft_vote": "serve_raft", "raft_vote_ok": "serve_raft", "raft_append": "serve_raft",
              "raft_append_ok": "serve_raft", "raft_join": "serve_raft_join", "raft_propose": "serve_raft_propose"}
    TIMERS = {"admit": "_admit_timer"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.meta = MetadataState()
        self.raft: RaftNode | None = None  # storage nodes only, from start()
        self._apply_waiters: list[tuple[int, int, Callable[[], None]]] = []  # (index, seq, callback)
        self._waiter_seq = 0
        self._join_queue: dict[str, dict] = {}  # leader only: storage nodes waiting to be added
        # (topic, partition) -> (highest leader epoch, highest log end offset, largest growth of the
        # end offset between two reports) its leaders reported in heartbeats
        self.known_ends: dict[tuple[str, int], tuple[int, int, int]] = {}
        self._rebuilding: dict[tuple[str, int], float] = {}  # leader: rebuild proposed, until this time

    def start(self, now_s: float) -> None:
        """Open the metadata log and start taking part in the group (storage nodes only)."""
        self._new_raft(self.core.storage.read_meta("raft"), now_s)

    def dissolve(self, into: str, now_s: float) -> bool:
        """Leader of a group that holds nothing: propose giving it up to join formation ``into``."""
        raft = self.raft
        return (raft is not None and raft.sealed_index is None
                and raft.propose({"op": "dissolve", "into": into}, now_s, lambda ok: None))

    def reset(self, now_s: float) -> None:
        """Forget this node's metadata group (a cluster that held nothing giving itself up) and start afresh."""
        assert self.raft is not None
        storage = self.core.storage
        storage.delete_log(META_TOPIC, 0)
        storage.write_meta("raft", {})
        self.meta = MetadataState()
        self._new_raft({}, now_s)

    def _new_raft(self, persisted: dict, now_s: float) -> None:
        storage = self.core.storage
        self.raft = RaftNode(
            self.node_id, storage.open_log(META_TOPIC, 0), persisted, self.core.rng, self.send, self.apply,
            lambda state: storage.write_meta("raft", state),
            election_timeout_s=self.config.election_timeout_s,
            heartbeat_interval_s=self.config.raft_heartbeat_interval_s,
        )
        self.raft.start(now_s)

    def next_deadline(self) -> float | None:
        return self.raft.next_deadline() if self.raft is not None else None

    def on_timer(self, now_s: float) -> None:
        if self.raft is not None and self.raft.next_deadline() <= now_s:
            self.raft.on_timer(now_s)

    def _admit_timer(self, key: Any, now_s: float) -> None:
        """The ``admit`` timer: the previous configuration change committed; admit the next joiner."""
        self.admit_next(now_s)

    def term(self) -> int:
        return self.raft.term if self.raft is not None else 0

    def member_info(self, node_id: str) -> dict | None:
        """What the group knows of storage member ``node_id`` (its addresses), if anything."""
        info = self.raft.voters.get(node_id) if self.raft is not None else None
        if info is None:
            info = self.meta.members.get(node_id)
        return info

    def send(self, peer: str, type_: str, body: dict) -> None:
        if type_ in _TAGGED and self.raft is not None:
            body = {**body, "formation": self.raft.formation}  # the receiver drops another group's (serve_raft)
        self.core.mesh.send_to_member(peer, type_, body)

    def serve_raft(self, route: Any, message: wire.Message, now_s: float) -> None:
        if self.raft is None:
            raise NotLeaderError(f"node {self.node_id} is a client and takes no part in the metadata group")
        if self.core.formation.refuses_raft(message.sender, message.body.get("formation", "")):
            return  # another metadata group's (or one this node gave up): never take its log, term or votes
        body = message.body
        highest = max(body.get(name, 0) for name in _TERM_FIELDS)
        if highest > MAX_TERM:
            self.core.count_invalid(message.sender)
            raise ProtocolError(f"{message.type} names raft term {highest}, beyond the highest a node can "
                                f"follow ({MAX_TERM}); dropped")
        self.raft.handle(message.sender, message.type, body, now_s)
        if self.raft.learners and message.type == "raft_append_ok":
            self.admit_next(now_s)

    def serve_raft_join(self, route: Any, message: wire.Message, now_s: float) -> None:
        raft = self.raft
        if raft is None:
            return
        info = message.body["member"]
        if info["role"] != "storage":
            return
        if self.core.mesh.is_foreign(info):
            return  # a voter of another cluster of our name: it must give its cluster up first (never mix logs)
        if raft.sealed_index is not None:
            return  # this group is giving itself up: the joiner is asked in by the group it joins
        if raft.role != LEADER:
            if raft.leader and raft.leader != self.node_id and raft.leader != message.sender:
                self.send(raft.leader, "raft_join", message.body)
            return
        if info["node_id"] not in raft.voters:
            self._join_queue[info["node_id"]] = info
        self.admit_next(now_s)

    def forget_joiner(self, node_id: str) -> None:
        """Leader: ``node_id`` (not a voter) has left: drop the join it asked for, if it waits to be admitted."""
        self._join_queue.pop(node_id, None)

    def admit_next(self, now_s: float) -> None:
        """Leader: joiners become learners at once; a caught-up learner becomes a voter.

        One configuration change at a time, each right after the previous one commits.
        """
        raft = self.raft
        if raft is None or raft.role != LEADER:
            self._join_queue.clear()
            return
        for node_id in sorted(self._join_queue):
            info = self._join_queue.pop(node_id)
            if raft.add_learner(node_id, {"address": info["address"], "pub_address": info["pub_address"]}, now_s):
                log.info("%s joins as a learner (catching up on the metadata log)", node_id)
        for node_id in raft.drop_stale_learners(now_s, 10 * self.config.election_timeout_s):
            log.warning("%s did not catch up as a learner; dropped (it may ask to join again)", node_id)
        ready = raft.caught_up_learners()
        if ready and raft.can_change_config():
            node_id = ready[0]
            members = dict(raft.voters)
            members[node_id] = raft.learners[node_id]
            # The next admission runs from a timer, never re-entering Raft from its own apply loop.
            if raft.propose({"op": "config", "members": members}, now_s,
                            lambda ok: self.out.schedule(self.core.now_s, "admit", None)):
                log.info("adding %s to the storage membership (%d members)", node_id, len(members))

    def remove_silent_members(self, now_s: float) -> None:
        raft = self.raft
        if raft is None or raft.role != LEADER or not raft.can_change_config():
            return
        for peer in raft.silent_voters(now_s, self.config.member_timeout_s):
            members = {k: v for k, v in raft.voters.items() if k != peer}
            if raft.propose({"op": "config", "members": members}, now_s, lambda ok: None):
                log.warning("removing %s from the storage membership: silent for more than %.0f s",
                            peer, self.config.member_timeout_s)
            return

    def note_lead(self, topic: str, partition: int, epoch: int, end_offset: int) -> None:
        """A heartbeat says its sender leads ``topic/partition`` in ``epoch`` with its log ending
        at ``end_offset``: remember the highest of each, and the largest growth of the end between
        two reports (a rebuilt log starts past what the leader may have handed out since its
        last report reached us)."""
        key = (topic, partition)
        known = self.known_ends.get(key)
        if known is None:  # (the growth before the first report is unknown: the rebuild gap covers it)
            self.known_ends[key] = (epoch, end_offset, 0)
        else:
            self.known_ends[key] = (max(known[0], epoch), max(known[1], end_offset),
                                    max(known[2], end_offset - known[1]))

    def rebuild_lost(self, now_s: float) -> None:
        """Leader: propose a ``rebuild`` of each partition every replica of which was removed for good."""
        raft = self.raft
        if raft is None or raft.role != LEADER or not raft.is_member:
            return
        for key in self.meta.lost_partitions():
            if self._rebuilding.get(key, 0.0) > now_s:
                continue
            topic, partition = key
            command = self.meta.rebuild_command(topic, partition, self.known_ends.get(key))
            deadline = now_s + self.config.request_timeout_s
            self._rebuilding[key] = deadline
            log.error("%s/%d: every replica (%s) was removed for good and no copy is left; rebuilding it empty "
                      "on %s from offset %d, epoch %d: %s", topic, partition,
                      ", ".join(self.meta.replicas(topic, partition)), ", ".join(command["replicas"]),
                      command["start"], command["epoch"], describe_rebuild(command))
            self.propose(command, now_s, deadline, lambda error, key=key: self._rebuilding.pop(key, None))

    def apply(self, index: int, command: dict) -> None:
        changed = self.meta.apply(index, command)
        if isinstance(changed, str) and self.core.is_storage:
            self.core.host.open_partitions(self.meta.topics[changed])
            log.info("topic %s (%d partitions) is agreed", changed, self.meta.topics[changed].partitions)
        elif isinstance(changed, tuple) and self.core.is_storage:
            if command.get("op") == "rebuild":
                rebuild = self.meta.rebuilds[changed]
                log.warning("%s/%d was rebuilt empty on %s from offset %d (epoch %d): %s", changed[0], changed[1],
                            ", ".join(self.meta.replicas(*changed)), rebuild["start"], rebuild["epoch"],
                            describe_rebuild(rebuild))
            self.core.host.reconfigure_partition(changed)
        if command.get("op") == "config":
            for node_id, info in sorted(self.meta.members.items()):
                if node_id != self.node_id and self.core.mesh.members is not None and node_id not in self.core.mesh.members:
                    # A restarted node may know its fellow voters only from the log: meet them.
                    self.core.mesh.learn({"node_id": node_id, "address": info["address"],
                                          "pub_address": info["pub_address"], "role": "storage", "incarnation": 0},
                                         self.core.now_s)
        while self._apply_waiters and self._apply_waiters[0][0] <= index:
            _index, _seq, callback = heapq.heappop(self._apply_waiters)
            callback()

    def propose(self, command: dict, now_s: float, deadline_s: float,
                done: Callable[[MeshqError | None], None]) -> None:
        """Commit ``command`` through the metadata leader; ``done`` runs once it is applied here."""
        raft = self.raft
        if raft is None:
            done(NotLeaderError(f"node {self.node_id} is a client"))
            return
        if self._merging(command):  # (on any member: its leader may not have heard of the other group yet)
            done(NotLeaderError(_MERGING))
            return
        if raft.role == LEADER:
            if command.get("op") == "create_topic" and command.get("assignment") is None:
                config = TopicConfig.from_wire(command["config"])
                command = {**command, "assignment": self.meta.assign(config)}
            accepted = raft.propose(command, now_s, lambda ok: done(None if ok else NotLeaderError(
                "the metadata leader changed before the change committed; retry")))
            if not accepted:
                done(NotLeaderError("the metadata group is busy with a membership change; retry"))
            return
        leader = raft.leader
        if leader is None or leader == self.node_id:
            done(NotLeaderError("the metadata group has no leader yet; retry"))
            return

        def on_reply(message: wire.Message) -> None:
            index = message.body["index"]
            if self.meta.applied_index >= index:
                done(None)
            else:
                self._waiter_seq += 1
                heapq.heappush(self._apply_waiters, (index, self._waiter_seq, lambda: done(None)))

        packed = msgpack.packb(command, use_bin_type=True)
        self.out.request(leader, "raft_propose", {"command": packed}, (), now_s, max(0.05, deadline_s - now_s),
                         on_reply, done)

    def serve_raft_propose(self, route: Any, message: wire.Message, now_s: float) -> None:
        raft = self.raft
        if raft is None or raft.role != LEADER:
            raise NotLeaderError(f"{self.node_id} is not the metadata leader (leader: {raft.leader if raft else None})",
                                 leader=raft.leader if raft is not None and raft.leader != self.node_id else None)
        try:
            command = msgpack.unpackb(message.body["command"], raw=False, strict_map_key=True, max_ext_len=0)
        except Exception:  # msgpack raises several unrelated exception types
            raise ProtocolError("raft_propose command does not decode") from None
        op = command.get("op") if isinstance(command, dict) else None
        if op == "reassign":
            self._propose_for_peer(route, message.request_id, wire.REASSIGN(command, "command"), now_s)
            return
        if op == "acl":
            self._propose_for_peer(route, message.request_id, wire.ACL_COMMAND(command, "command"), now_s)
            return
        if op == "leave":
            if wire.NODE(command.get("node_id"), "command.node_id") != message.sender:
                raise ProtocolError("a node may only ask for itself to leave")
            self.out.reply(route, message.request_id, "leave_ok", self.core.leave.state_of(message.sender, now_s))
            return
        if op != "create_topic":
            raise ProtocolError("a peer may propose only create_topic, reassign, leave or acl")
        config = TopicConfig.from_wire(wire.TOPIC_CONFIG(command.get("config"), "command.config"))
        if config.name == OFFSETS_TOPIC:
            config = self.core.catalog.offsets_topic_config()  # internal: its configuration is ours, never a peer's
        else:
            refuse_reserved_topic(config.name)
        existing = self.meta.topics.get(config.name)
        if existing is not None:
            self.out.reply(route, message.request_id, "raft_propose_ok", {"index": self.meta.applied_index})
            return
        command = {"op": "create_topic", "config": config.to_wire(), "assignment": self.meta.assign(config)}
        self._propose_for_peer(route, message.request_id, command, now_s)

    def _propose_for_peer(self, route: Any, request_id: int, command: dict, now_s: float) -> None:
        """Metadata leader: append a peer's command; answer with its index once committed."""
        raft = self.raft
        assert raft is not None
        reply_index = raft.last_index + 1

        def on_done(ok: bool) -> None:
            if ok:
                self.out.reply(route, request_id, "raft_propose_ok", {"index": reply_index})
            else:
                self.out.reply_error(route, request_id, NotLeaderError("metadata leader changed; retry"))

        if self._merging(command):
            raise NotLeaderError(_MERGING)
        if not raft.propose(command, now_s, on_done):
            raise NotLeaderError("the metadata group cannot take a change right now; retry")

    def _merging(self, command: dict) -> bool:
        """Whether ``command`` (anything but membership) is refused because this group is giving itself up: its
        ``dissolve`` is in the log, or it holds nothing and knows of a group it gives itself up to (so it never
        takes state it would have to give up with it)."""
        raft = self.raft
        return (command.get("op") not in ("config", "noop", "dissolve") and raft is not None
                and (raft.sealed_index is not None or self.core.formation.giving_up()))
