"""Formation: a storage node joins the formed cluster of its name, or forms it.

Theory of operation
-------------------
Every heartbeat and hello answer carries a summary of the sender's metadata group
(``summary``: formed or not, its leader, its size, whether it is trivial, whether the
sender could form one); this room keeps the latest of each peer (``peer_clusters``) and,
at every heartbeat and on news, decides (``tick``):

* a node that is a voter of a formed group stays, but gives up a *trivial* group (one
  member, no topic) when it meets another formed group of the same name (the higher leader
  id yields when both are trivial, so exactly one side moves), and asks to be admitted
  again when it hears no leader while peers name one (its log may hold a configuration the
  cluster dropped);
* a node that knows of a formed group (a peer says so, or its own log has a term) asks to
  join it (``raft_join``) through the best candidate: the leader it follows, the leaders
  peers name, those peers, the voters its log names, any live storage node; each time
  ``2 × election_timeout_s`` pass unanswered it moves one candidate on, and after a full
  round asks its seeds again;
* otherwise, after ``bootstrap_wait_s`` (mDNS) or once every seed answered, the lowest
  node id among the unformed storage nodes it knows forms a one-member group; it first waits
  (a bounded time) for any live lower-id storage node whose state it does not know yet, which
  may be forming at that moment (``_defer_to_lower``).
"""

from __future__ import annotations

import logging
from typing import Any

from meshq.core.membership import DEAD, LEFT
from meshq.core.raft import LEADER
from meshq.core.room import Room

log = logging.getLogger("meshq.core")


class Formation(Room):
    """Join, form or merge the metadata group (see the module docstring)."""

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.peer_clusters: dict[str, dict] = {}  # node_id -> its summary (role, formed, leader...)
        self._next_join_s = 0.0
        # a joiner: how many join candidates it moved past, none of them answering, and since when
        # it has asked the current one (see _pick_join_target)
        self._join_skipped = 0
        self._join_asked_since_s: float | None = None
        self._leaderless_since_s: float | None = None
        # a node about to form: since when each lower-id storage node of unknown or not-yet-formable state has
        # been waited for (see _defer_to_lower)
        self._deferred_since: dict[str, float] = {}

    def note_summary(self, node_id: str, role: str, summary: dict) -> None:
        """``node_id`` told us about its metadata group (a heartbeat or hello answer)."""
        self.peer_clusters[node_id] = {
            "role": role,
            **{field: summary[field] for field in ("formed", "leader", "size", "trivial", "can_form")},
        }

    def forget(self, node_id: str) -> None:
        self.peer_clusters.pop(node_id, None)

    def named_leaders(self) -> list[str]:
        """The metadata leaders formed peers name (other than us), sorted."""
        return sorted({c["leader"] for c in self.peer_clusters.values()
                       if c["formed"] and c["leader"] and c["leader"] != self.node_id})

    def summary(self) -> dict:
        """What this node tells others about its metadata group (formation and merging use it)."""
        raft = self.core.agreement.raft
        formed = raft is not None and raft.formed and raft.is_member
        return {"formed": formed, "leader": raft.leader if raft is not None else None,
                "size": len(raft.voters) if formed else 0, "trivial": formed and self._trivial_cluster(),
                "can_form": raft is not None and not formed and not self.core.mesh.waiting_for_seeds(),
                "formation": raft.formation if formed and raft is not None else ""}

    def formation(self) -> str:
        """The identity of our formed cluster ("" when we are not a voter of one, or are a client)."""
        raft = self.core.agreement.raft
        return raft.formation if raft is not None and raft.formed and raft.is_member else ""

    def foreign(self, summary: dict) -> bool:
        """True when a peer's summary (heartbeat, hello answer) says it is a voter of another formed cluster of
        our name while we are a voter of ours: its formation differs. Such a peer is refused (docs/operations.md,
        "Two clusters of the same name"), except while our cluster is trivial: then one side gives itself up
        (``_maybe_merge``) and the two become one."""
        ours = self.formation()
        theirs = summary.get("formation", "")
        if not ours or not summary.get("formed") or not theirs or theirs == ours:
            return False
        return not self._trivial_cluster() and not summary.get("trivial", False)

    def _trivial_cluster(self) -> bool:
        """A one-member cluster that holds no topic: abandoning it loses nothing."""
        raft = self.core.agreement.raft
        return (raft is not None and list(raft.voters) == [self.node_id] and not self.core.agreement.meta.topics
                and not any(command.get("op") == "create_topic" for _term, command in raft.entries))

    def tick(self, now_s: float) -> None:
        """Join a formed cluster, form one, or give up a trivial one (see the module docstring)."""
        raft = self.core.agreement.raft
        if raft is None or self.core.stopped or self.core.leave.leaving:
            return  # a leaving node never asks to be admitted again (a restart may: it is a new start)
        assert self.core.mesh.members is not None
        if raft.is_member:
            self._join_skipped, self._join_asked_since_s = 0, None
            self._maybe_merge(now_s)
            self._ask_readmission(now_s)
            return
        formed_peers = sorted(p for p, c in self.peer_clusters.items() if c["formed"])
        # A term means a formed cluster reached us (a node outside any configuration never
        # campaigns): keep asking to join it, even once every peer of it has been forgotten,
        # and never form a second cluster (nor bootstrap over that term).
        if raft.formed or formed_peers or raft.term > 0:
            if now_s < self._next_join_s:
                return
            self._next_join_s = now_s + 0.3
            target = self._pick_join_target(formed_peers, now_s)
            if target is not None:
                self.core.agreement.send(target, "raft_join", {"member": self.core.mesh.self_info()})
            return
        if self.config.seeds:
            if self.core.mesh.waiting_for_seeds():
                return  # never form a cluster while a seed is silent: it may be the cluster
        elif self.config.mdns and now_s - self.core.started_s < self.config.bootstrap_wait_s:
            return
        unformed_storage = [p for p, c in self.peer_clusters.items() if c["role"] == "storage" and not c["formed"]
                            and c["can_form"] and p in self.core.mesh.members.alive_ids()]
        if all(self.node_id < other for other in unformed_storage) and not self._defer_to_lower(now_s):
            log.info("no formed cluster found; %s forms cluster %r", self.node_id, self.config.cluster)
            # The new cluster's identity (metadata log entry 0): node id and wall clock, never reused.
            raft.bootstrap(now_s, {"address": self.core.endpoint, "pub_address": self.core.pub_endpoint},
                           formation=f"{self.node_id}.{self.core.wall_clock_ms():x}")
            self.core.mesh.publish_heartbeat()  # tell waiting peers at once, not at the next heartbeat

    def _defer_to_lower(self, now_s: float) -> bool:
        """Whether to wait before forming: a live storage node with a lower id whose metadata state we do not
        know yet (it said hello, and a hello carries no summary) or that cannot form yet (its own seeds are
        silent) may be forming right now: it heard us unformed and is the lowest. Forming too would make two
        clusters, and once each is joined neither is trivial and they stay apart for good. Each such node is
        waited for at most ``2 × max(bootstrap_wait_s, heartbeat_interval_s)`` (its heartbeat tells its state within one interval), so a
        lower node stuck on a silent seed holds nobody up for long; it joins us once its seeds answer."""
        members = self.core.mesh.members
        assert members is not None
        pending = {peer for peer in members.alive_ids("storage") if peer < self.node_id
                   and (peer not in self.peer_clusters
                        or not (self.peer_clusters[peer]["formed"] or self.peer_clusters[peer]["can_form"]))}
        for peer in list(self._deferred_since):
            if peer not in pending:
                del self._deferred_since[peer]
        patience_s = 2.0 * max(self.config.bootstrap_wait_s, self.config.heartbeat_interval_s)
        waiting = False
        for peer in pending:
            since = self._deferred_since.setdefault(peer, now_s)
            waiting = waiting or now_s - since < patience_s
        return waiting

    def _join_candidates(self, formed_peers: list[str]) -> list[str]:
        """Whom a joiner may ask to admit it, best first: the leader it last followed, the leader
        the first formed peer names (else that peer), the leaders other formed peers name, those
        peers, the voters its log names, then any live storage node (a follower forwards a join
        to its leader). Members known to be gone come only when there is nobody else."""
        raft = self.core.agreement.raft
        assert raft is not None and self.core.mesh.members is not None
        first = (self.peer_clusters[formed_peers[0]]["leader"] or formed_peers[0]) if formed_peers else None
        ordered = [raft.leader, first, *(self.peer_clusters[p]["leader"] for p in formed_peers), *formed_peers,
                   *sorted(raft.voters), *self.core.mesh.members.alive_ids("storage")]
        candidates: list[str] = []
        for peer in ordered:
            if peer and peer != self.node_id and peer not in candidates:
                candidates.append(peer)
        members = self.core.mesh.members
        reachable = [peer for peer in candidates
                     if peer not in members or members.members[peer].state not in (DEAD, LEFT)]
        return reachable or candidates

    def _pick_join_target(self, formed_peers: list[str], now_s: float) -> str | None:
        """The peer a joiner sends ``raft_join`` to now.

        While a leader appends to us we are being admitted: ask that leader. Otherwise ask the
        best of ``_join_candidates``; each time ``2 × election_timeout_s`` pass without a leader
        answering, move one candidate further (round robin), so a peer that died or left never
        holds a joiner up. After a full round the seeds are asked again: their answers name the
        current leader.
        """
        raft = self.core.agreement.raft
        assert raft is not None
        patience_s = 2 * self.config.election_timeout_s
        if raft.leader and raft.leader != self.node_id and now_s - raft.last_leader_contact_s < patience_s:
            self._join_skipped, self._join_asked_since_s = 0, None
            return raft.leader
        candidates = self._join_candidates(formed_peers)
        if not candidates:
            return None
        if self._join_asked_since_s is None:
            self._join_asked_since_s = now_s
        elif now_s - self._join_asked_since_s >= patience_s:
            silent = candidates[self._join_skipped % len(candidates)]
            self._join_skipped += 1
            self._join_asked_since_s = now_s
            if self._join_skipped % len(candidates) == 0:
                self.core.mesh.hello_seeds_again(now_s)
            log.info("%s: no leader answered its join through %s; asking %s", self.node_id, silent,
                     candidates[self._join_skipped % len(candidates)])
        return candidates[self._join_skipped % len(candidates)]

    def _ask_readmission(self, now_s: float) -> None:
        """A node whose own log says it is a voter, but that hears no leader while heartbeats name
        one elsewhere, may hold an uncommitted config entry the cluster dropped: the leader then
        does not replicate to it and its log is never repaired. Ask that leader to admit it again
        (it comes back as a learner, its log is repaired, and it is promoted)."""
        raft = self.core.agreement.raft
        assert raft is not None
        if raft.role == LEADER or raft.leader is not None:
            self._leaderless_since_s = None
            return
        if self._leaderless_since_s is None:
            self._leaderless_since_s = now_s
            return
        if now_s - self._leaderless_since_s < 3 * self.config.election_timeout_s or now_s < self._next_join_s:
            return
        leaders = self.named_leaders()
        if leaders:
            self._next_join_s = now_s + 1.0
            self.core.agreement.send(leaders[0], "raft_join", {"member": self.core.mesh.self_info()})

    def _maybe_merge(self, now_s: float) -> None:
        """A trivial cluster that meets another formed cluster of the same name gives itself up.

        Only a one-member cluster without topics yields (it has nothing to lose); when both
        are trivial, the one whose leader id is higher yields, so exactly one side moves.
        """
        raft = self.core.agreement.raft
        if raft is None or not self._trivial_cluster():
            return
        for peer, cluster in sorted(self.peer_clusters.items()):
            other_leader = cluster["leader"]
            if not cluster["formed"] or other_leader in (None, self.node_id) or peer in raft.voters:
                continue
            if cluster["trivial"] and other_leader > self.node_id:
                continue
            log.warning("%s formed a separate cluster %r alone; giving it up to join %s's",
                        self.node_id, self.config.cluster, other_leader)
            self._reset_metadata(now_s)
            return

    def _reset_metadata(self, now_s: float) -> None:
        self.core.agreement.reset(now_s)
        self._next_join_s = 0.0
        self.core.mesh.publish_heartbeat()
