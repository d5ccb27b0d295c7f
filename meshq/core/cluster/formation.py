"""Formation: a storage node joins the formed cluster of its name, or forms it.

Theory of operation
-------------------
Every heartbeat and hello answer (and a formed node's hello) carries a summary of the sender's
metadata group (``summary``: formed or not, its leader, its size, its formation, whether it
holds nothing, whether it is trivial, whether the sender could form one); this room keeps the
latest of each peer (``peer_clusters``) and, at every heartbeat and on news, decides (``tick``):

* a node that is a voter of a formed group stays, but a group that *holds nothing* (no topic,
  no grant: its log has only membership changes) gives itself up when it meets another formed
  group of the same name that outranks it: one that holds something, or, when both hold
  nothing, one whose formation sorts first (a fixed order both sides see alike, so exactly one
  side moves; ``_maybe_merge``). A one-member group resets at once; a larger one through its
  log: its leader proposes ``dissolve`` (after which no leader proposes anything), every member
  applying it waits (the leader one election timeout, so its followers learn the commit) and
  resets (``_maybe_dissolved``), and from then on drops the raft messages of the group it left
  (each carries its sender's formation: ``refuses_raft``). A voter that hears no leader for
  ``3 × election_timeout_s`` gives the group up alone when that loses nothing: a majority of its
  voters left (it missed the commit) and its committed log holds nothing, or its whole log holds
  nothing and it knows a group it yields to (``_abandon_dead_group``). Until it is gone, a group
  that yields takes no state (``giving_up``: ``Agreement`` refuses every change but membership)
  and learns no clients from gossip, and the group it yields to leaves its nodes out of gossip
  (``unannounced``), so clients stay with the group that stays. A voter also asks to be
  admitted again when it hears no leader while peers of its own formation name one (its log may
  hold a configuration the cluster dropped);
* a node that knows of a formed group (a peer says so, or its own log has a term) asks to
  join it (``raft_join``) through the best candidate: the leader it follows, the leaders
  peers name, those peers, the voters its log names, any live storage node (never a voter of
  a group it gave up); each time ``2 × election_timeout_s`` pass unanswered it moves one
  candidate on, and after a full round asks its seeds again. A non-voter whose log belongs to a
  group nobody it hears is in any more starts afresh (``_learner_of_gone_group``);
* otherwise, after ``bootstrap_wait_s`` (mDNS) or once every seed answered, the lowest
  node id among the unformed storage nodes it knows forms a one-member group; it first waits
  (a bounded time) for any live lower-id storage node whose state it does not know yet, which
  may be forming at that moment (``_defer_to_lower``). A node that just gave a group up forms
  none for ``max(10 × election_timeout_s, bootstrap_wait_s)``: it waits to hear the group it
  yielded to.
"""

from __future__ import annotations

import logging
from typing import Any

from meshq.core.membership import DEAD, LEFT
from meshq.core.raft import LEADER
from meshq.core.room import Room

log = logging.getLogger("meshq.core")

_LEFT_META = "formations_left"  # the storage meta record of the formations this node gave up



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
        # after giving a group up: each of its voters not yet heard to have left it, and that group's formation
        # (never asked to admit us), the formations it gave up (refuses_raft); and until when this node forms no
        # group of its own (it gave one up to join another)
        self._left_peers: dict[str, str] = {}
        # formation -> wall clock (ms) when this node gave it up; kept on disk (a restart must not take a late message
        # of it into an empty log) until the node is a voter of another group, or long enough that the group it left,
        # if alive, removed it as a silent voter (then it would only be asked back as a new node)
        self._left_formations: dict[str, int] | None = None
        self._no_forming_until_s = 0.0
        self._dissolved_seen_s: float | None = None  # when this node first saw its group's dissolve applied

    def note_summary(self, node_id: str, role: str, summary: dict) -> None:
        """``node_id`` told us about its metadata group (a heartbeat or hello answer)."""
        self.peer_clusters[node_id] = {
            "role": role,
            **{field: summary[field] for field in ("formed", "leader", "size", "trivial", "can_form")},
            "formation": summary.get("formation", ""), "empty": summary.get("empty", False),
        }
        if node_id in self._left_peers and self.peer_clusters[node_id]["formation"] != self._left_peers[node_id]:
            del self._left_peers[node_id]  # it gave the group up too

    def refuses_raft(self, sender: str, formation: str) -> bool:
        """Whether a metadata-group message ``sender`` sent tagged with ``formation`` is dropped: our log belongs to
        another formation, or we have none yet and gave that one up. So no log ever takes entries, terms or votes
        of another group (two groups' first entries share term 1: Raft's log matching alone would splice them),
        not even a message of the group we left that arrives late. A message without a formation (an older
        sender) is judged by what its sender last said about its group."""
        raft = self.core.agreement.raft
        ours = raft.formation if raft is not None else ""
        if not formation:
            cluster = self.peer_clusters.get(sender)
            if sender in self._left_peers:
                return True
            formation = cluster["formation"] if cluster is not None and cluster["formed"] else ""
        if not formation:
            return False
        if ours:
            return formation != ours
        left_ms = self._left().get(formation)
        return left_ms is not None and self.core.wall_clock_ms() - left_ms < 2_000 * self.config.member_timeout_s

    def _left(self) -> dict[str, int]:
        """The formations this node gave up (see ``_left_formations``), read from disk once."""
        if self._left_formations is None:
            stored = self.core.storage.read_meta(_LEFT_META) if self.core.storage is not None else None
            left = (stored or {}).get("left", {})
            self._left_formations = {str(f): int(ms) for f, ms in left.items()} if isinstance(left, dict) else {}
        return self._left_formations

    def _keep_left(self, left: dict[str, int]) -> None:
        self._left_formations = left
        self.core.storage.write_meta(_LEFT_META, {"left": left})

    def forget(self, node_id: str) -> None:
        self.peer_clusters.pop(node_id, None)

    def named_leaders(self, formation: str | None = None) -> list[str]:
        """The metadata leaders formed peers name (other than us), sorted; only those of ``formation`` if given."""
        return sorted({c["leader"] for c in self.peer_clusters.values()
                       if c["formed"] and c["leader"] and c["leader"] != self.node_id
                       and (formation is None or c["formation"] in (formation, ""))})

    def summary(self) -> dict:
        """What this node tells others about its metadata group (formation and merging use it)."""
        raft = self.core.agreement.raft
        formed = raft is not None and raft.formed and raft.is_member
        return {"formed": formed, "leader": raft.leader if raft is not None else None,
                "size": len(raft.voters) if formed else 0, "trivial": formed and self._trivial_cluster(),
                "can_form": raft is not None and not formed and not self.core.mesh.waiting_for_seeds(),
                "formation": raft.formation if formed and raft is not None else "",
                "empty": formed and self._holds_nothing()}

    def formation(self) -> str:
        """The identity of our formed cluster ("" when we are not a voter of one, or are a client)."""
        raft = self.core.agreement.raft
        return raft.formation if raft is not None and raft.formed and raft.is_member else ""

    def foreign(self, summary: dict) -> bool:
        """True when a peer's summary (heartbeat, hello answer) says it is a voter of another formed cluster of
        our name while we are a voter of ours: its formation differs. Such a peer is refused (docs/operations.md,
        "Two clusters of the same name"), except while either cluster holds nothing: then one side gives itself
        up (``_maybe_merge``) and the two become one."""
        ours = self.formation()
        theirs = summary.get("formation", "")
        if not ours or not summary.get("formed") or not theirs or theirs == ours:
            return False
        # Either side holds nothing: they meet, and one gives itself up (``_maybe_merge``); until then the one that
        # does refuses to take any state (``Agreement._merging``), so nothing it held is lost with it.
        return not self._holds_nothing() and not summary.get("empty", False) and not summary.get("trivial", False)

    def unannounced(self) -> frozenset[str]:
        """Storage nodes our gossip leaves out while we know of another formed group of our name: its voters that
        give themselves up to ours, and every storage node whose group we have not heard yet (it may be one of
        theirs). So our clients learn of such a node only once it is known to be one of us, and never write to a
        group about to go. (With one group in sight, nothing is left out.)"""
        ours = self.formation()
        members = self.core.mesh.members
        if not ours or members is None:
            return frozenset()
        others = {peer: cluster for peer, cluster in self.peer_clusters.items()
                  if cluster["formed"] and cluster["formation"] and cluster["formation"] != ours}
        if not others:
            return frozenset()
        unknown = {peer for peer, member in members.members.items()
                   if member.role == "storage" and peer != self.node_id and peer not in self.peer_clusters}
        empty = self._holds_nothing()
        return frozenset(unknown | {peer for peer, cluster in others.items()
                                    if not (empty and self._outranked_by(cluster, ours))})

    def giving_up(self) -> bool:
        """Our formed group holds nothing and we know of another formed group of our name it gives itself up to."""
        return self._outranking_peer() is not None

    def _holds_nothing(self, committed_only: bool = False) -> bool:
        """Our metadata group holds nothing: no topic, grant or rebuild applied, and its log (or only its
        committed part) has nothing but membership changes. Giving it up loses nothing."""
        raft = self.core.agreement.raft
        if raft is None or not self.core.agreement.meta.holds_nothing():
            return False
        first = raft.first_content_index
        return first is None or (committed_only and first > raft.commit_index)

    def _trivial_cluster(self) -> bool:
        """A one-member cluster that holds nothing."""
        raft = self.core.agreement.raft
        return raft is not None and list(raft.voters) == [self.node_id] and self._holds_nothing()

    def tick(self, now_s: float) -> None:
        """Join a formed cluster, form one, or give up a trivial one (see the module docstring)."""
        raft = self.core.agreement.raft
        if raft is None or self.core.stopped or self.core.leave.leaving:
            return  # a leaving node never asks to be admitted again (a restart may: it is a new start)
        assert self.core.mesh.members is not None
        if raft.is_member:
            self._join_skipped, self._join_asked_since_s = 0, None
            if self._left_peers or self._left():  # a voter of a group again: its log's formation judges messages now
                self._left_peers = {}
                self._keep_left({})
            if self._maybe_dissolved(now_s) or self._maybe_merge(now_s) or self._abandon_dead_group(now_s):
                return
            self._ask_readmission(now_s)
            return
        if self._left_peers and now_s >= self._no_forming_until_s:
            self._left_peers = {}  # (they may be asked again: the group they are in now answers, or no longer names us)
        formed_peers = sorted(p for p, c in self.peer_clusters.items() if c["formed"] and p not in self._left_peers)
        if self._learner_of_gone_group(formed_peers, now_s):
            return
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
        if now_s < self._no_forming_until_s:
            return  # it gave a group up to join another one: wait to hear of that one
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
            if peer and peer != self.node_id and peer not in candidates and peer not in self._left_peers:
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
        leaders = self.named_leaders(raft.formation)  # never another group's: it would splice its log into ours
        if leaders:
            self._next_join_s = now_s + 1.0
            self.core.agreement.send(leaders[0], "raft_join", {"member": self.core.mesh.self_info()})

    def _maybe_merge(self, now_s: float) -> bool:
        """A group that holds nothing and meets another formed group of the same name that outranks it gives
        itself up (see the module docstring). True when this node just reset."""
        raft = self.core.agreement.raft
        if raft is None or raft.sealed_index is not None or not self._holds_nothing():
            return False
        found = self._outranking_peer()
        if found is not None:
            _peer, cluster = found
            ours, theirs, other_leader = raft.formation, cluster["formation"], cluster["leader"]
            if list(raft.voters) == [self.node_id]:
                log.warning("%s formed a separate cluster %r alone; giving it up to join formation %s (led by %s)",
                            self.node_id, self.config.cluster, theirs, other_leader or "nobody yet")
                self._reset_metadata(now_s)
                return True
            if raft.role == LEADER and self.core.agreement.dissolve(theirs, now_s):
                log.warning("cluster %r (formation %s, %d members) holds nothing and met another cluster of that "
                            "name (formation %s, led by %s): giving it up to join that one", self.config.cluster,
                            ours, len(raft.voters), theirs, other_leader or "nobody yet")
        return False

    def _outranking_peer(self) -> tuple[str, dict] | None:
        """(peer, its summary) of the first peer that is a voter of another formed group of our name that our group
        (holding nothing) gives itself up to; None when there is none, or our group holds something."""
        raft = self.core.agreement.raft
        if raft is None or not raft.is_member or not raft.formed:
            return None
        ours = raft.formation
        others = [(peer, cluster) for peer, cluster in sorted(self.peer_clusters.items())
                  if cluster["formed"] and cluster["formation"] and cluster["formation"] != ours
                  and peer not in raft.voters]
        if not others or not self._holds_nothing():
            return None
        # A group holds nothing when any of its nodes says so (a node too old to send `empty` says nothing either way;
        # one that says so a moment late only makes the two stay apart, never both dissolve).
        said_empty = {cluster["formation"] for _peer, cluster in others if cluster["empty"] or cluster["trivial"]}
        for peer, cluster in others:
            if self._outranked_by({**cluster, "empty": cluster["formation"] in said_empty}, ours):
                return peer, cluster
        return None

    def _outranked_by(self, cluster: dict, ours: str) -> bool:
        """Whether our group (holding nothing) gives itself up to a peer's formed group: that group holds something,
        or holds nothing either and its formation sorts before ours (its leader id, from a peer too old to send a
        formation)."""
        if not (cluster["empty"] or cluster["trivial"]):
            return True
        return (cluster["formation"] or cluster["leader"] or "") < (ours or self.node_id)

    def _maybe_dissolved(self, now_s: float) -> bool:
        """Our group's ``dissolve`` is applied here: reset and join the other group. The leader waits one election
        timeout first, so its heartbeats tell every follower the dissolve is committed. True once reset."""
        raft = self.core.agreement.raft
        assert raft is not None
        if self.core.agreement.meta.dissolved is None:
            self._dissolved_seen_s = None
            return False
        if self._dissolved_seen_s is None:
            self._dissolved_seen_s = now_s
        if raft.role == LEADER and now_s - self._dissolved_seen_s < self.config.election_timeout_s:
            return False
        log.warning("%s: cluster %r (formation %s) is given up; joining formation %s", self.node_id,
                    self.config.cluster, raft.formation, self.core.agreement.meta.dissolved or "?")
        self._reset_metadata(now_s)
        return True

    def _learner_of_gone_group(self, formed_peers: list[str], now_s: float) -> bool:
        """A node that is no voter (a learner, or a joiner that got part of a log) and whose log belongs to a group
        nobody it hears is a voter of any more (it gave itself up while we caught up), while other formed groups
        are heard, and no leader of it for ``3 × election_timeout_s``: it starts afresh (a non-voter holds nothing
        of its own) and joins one of those. Its log would refuse their messages otherwise. True once reset."""
        raft = self.core.agreement.raft
        assert raft is not None
        mine = raft.formation
        if (not mine or raft.is_member or not formed_peers
                or now_s - raft.last_leader_contact_s < 3 * self.config.election_timeout_s
                or any(cluster["formation"] == mine for cluster in self.peer_clusters.values() if cluster["formed"])):
            return False
        log.warning("%s: the cluster %r it was catching up with as a learner (formation %s) is gone; starting afresh "
                    "to join formation %s", self.node_id, self.config.cluster, mine,
                    self.peer_clusters[formed_peers[0]]["formation"] or "?")
        self._reset_metadata(now_s)
        return True

    def _abandon_dead_group(self, now_s: float) -> bool:
        """A voter that hears no leader of its group for ``3 × election_timeout_s`` gives the group up on its own
        when either: a majority of its voters say they are in another formation or none (it missed the group's
        dissolve: the group can never commit again) and its committed log holds nothing; or its whole log holds
        nothing and it knows of a group it gives itself up to (its group may never elect again: its other voters
        left or died before it could dissolve). Either way it loses nothing. True once reset."""
        raft = self.core.agreement.raft
        assert raft is not None
        if (raft.role == LEADER or raft.leader is not None or self._leaderless_since_s is None
                or now_s - self._leaderless_since_s < 3 * self.config.election_timeout_s):
            return False
        ours = raft.formation
        # gone: voters that say they are voters of another formed group (not merely unformed: a node leaving,
        # restarting or rejoining says that too)
        gone = [peer for peer in raft.voters if peer != self.node_id and peer in self.peer_clusters
                and self.peer_clusters[peer]["formed"] and self.peer_clusters[peer]["formation"] not in ("", ours)]
        # and what our group's other voters say of it: one that says it holds something outweighs our own log
        held_elsewhere = any(not self.peer_clusters[peer]["empty"] for peer in raft.voters
                             if peer in self.peer_clusters and self.peer_clusters[peer]["formation"] == ours
                             and self.peer_clusters[peer]["formed"])
        if gone and len(raft.voters) - len(gone) < raft.quorum() and self._holds_nothing(committed_only=True):
            log.warning("%s: %d of the %d voters of cluster %r (formation %s) left it and no leader is heard; it "
                        "held nothing: giving it up too", self.node_id, len(gone), len(raft.voters),
                        self.config.cluster, ours)
        elif not held_elsewhere and self.giving_up():
            log.warning("%s: cluster %r (formation %s) holds nothing, met another cluster of that name and has had "
                        "no leader for %.1f s: giving it up to join that one", self.node_id, self.config.cluster,
                        ours, now_s - self._leaderless_since_s)
        else:
            return False
        self._reset_metadata(now_s)
        return True

    def _reset_metadata(self, now_s: float) -> None:
        raft = self.core.agreement.raft
        assert raft is not None
        left = raft.formation
        self._keep_left({**self._left(), left: self.core.wall_clock_ms()})
        for peer in raft.voters:
            if peer != self.node_id and self.peer_clusters.get(peer, {}).get("formation", left) == left:
                self._left_peers[peer] = left
        # It gave this group up to join another: it waits for that one (a follower may not have heard of it
        # yet) rather than form a third, for a bounded time (should that one be gone for good).
        self._no_forming_until_s = now_s + max(10 * self.config.election_timeout_s, self.config.bootstrap_wait_s)
        self._dissolved_seen_s = self._leaderless_since_s = None
        self.core.agreement.reset(now_s)
        self._next_join_s = 0.0
        self.core.mesh.publish_heartbeat()
