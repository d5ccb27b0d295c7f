"""The mesh: who is out there, who is alive, and how they learn of each other.

Theory of operation
-------------------
Each node keeps a ``MemberTable`` (``meshq.core.membership``) of every node it knows, with
its liveness. It learns of nodes from discovery (mDNS), from its seeds, and from gossip: a
heartbeat published on PUB every ``heartbeat_interval_s`` carries this node's member info,
the members it knows, a summary of its metadata group (for formation) and the partitions it
leads (routing hints), so one seed is enough. A node it learns of is linked: a DEALER for
requests and a SUB for its events, and greeted with ``hello``, whose answer carries the same
summary and gossip. A member silent for ``failure_timeout_s`` turns suspect, then dead
(requests waiting on it fail with a retriable error); after ``member_timeout_s`` it is
forgotten and unlinked. A client that knows no live storage node asks its seeds again, with
capped, jittered exponential backoff.
"""

from __future__ import annotations

import logging
from typing import Any

from meshq.config import parse_host_port
from meshq.core import wire
from meshq.core.events import Publish, Subscribe, Unsubscribe
from meshq.core.membership import Member, MemberTable
from meshq.core.room import Room
from meshq.errors import MeshqError

log = logging.getLogger("meshq.core")

# A client that knows no live storage node asks its seeds again after this long, doubling up to
# the cap (each wait jittered by ±25% with the core's rng, so clients cut off together spread out).
_SEED_RETRY_MIN_S = 0.25
_SEED_RETRY_MAX_S = 0.5
# Refused (node id, address) pairs logged once each, at most this many (a flood of spoofed records cannot grow memory).
_REFUSED_LOGGED = 256


class Mesh(Room):
    """Membership, liveness and gossip of one node (see the module docstring)."""

    SERVES = {"hello": "serve_hello"}
    EVENTS = {"heartbeat": "on_heartbeat", "goodbye": "on_goodbye"}
    TIMERS = {"hello_retry": "_hello_again"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.members: MemberTable | None = None  # set by start(): it needs our endpoints
        self._seeds_answered: set[str] = set()
        self._seed_hellos: set[str] = set()  # seeds a fallback hello is waiting on (no retry loop)
        self._seed_retry_s = _SEED_RETRY_MIN_S  # the next fallback wait (see fall_back_to_seeds)
        self._next_seed_hello_s = 0.0
        self._introduced_s: dict[str, float] = {}  # peer -> earliest time to introduce ourselves again
        self._subscribed: set[str] = set()
        self._refused: set[tuple[str, str]] = set()  # (node id, address) second-hand readdresses refused, logged
        # node id -> (incarnation, formation) of storage nodes of another formed cluster of our name (refused)
        self.foreign: dict[str, tuple[int, str]] = {}
        # (topic, partition) -> (epoch, node): leaders announced in heartbeats, for routing; node None:
        # the node last named stopped listing it, and its epoch stays as a floor (see _note_leads)
        self.leader_hints: dict[tuple[str, int], tuple[int, str | None]] = {}
        self._hinted: dict[str, set[tuple[str, int]]] = {}  # node -> the keys whose hint names it (an index)
        self.heartbeats_sent = 0  # (the simulator's LeaderHintChecker times hints from our heartbeats)

    def start(self) -> None:
        """Put ourselves in the member table (``start`` of the root has set our endpoints)."""
        core = self.core
        me = Member(self.node_id, core.endpoint, core.pub_endpoint, self.config.role, core.incarnation,
                    key=core.public_key if self.config.role == "client" else "")
        self.members = MemberTable(me, self.config.failure_timeout_s, self.config.member_timeout_s)

    def greet_seeds(self, now_s: float) -> None:
        for seed in self.config.seeds:
            host, port = parse_host_port(seed)
            self.out.connect(f"seed:{host}:{port}", f"tcp://{host}:{port}")
            self.hello(f"seed:{host}:{port}", now_s)

    def tick(self, now_s: float) -> None:
        """Heartbeat duty: publish ours, age the member table, fall back to the seeds if cut off."""
        assert self.members is not None
        self.publish_heartbeat()
        before = {m.node_id: m.pub_address for m in self.members.members.values()}
        for node_id, state in self.members.tick(now_s):
            if state in ("dead", "forgotten"):
                self.core.adverts.forget(node_id)
            if state == "forgotten":
                self._unlink(node_id, before.get(node_id))
                self.core.formation.forget(node_id)
            else:
                log.info("member %s is %s", node_id, state)
                if state in ("suspect", "dead"):
                    self.out.fail_requests_to(node_id, state)
                if state == "suspect":
                    self.core.adverts.liveness_changed(node_id)
        self.fall_back_to_seeds(now_s)

    def say_goodbye(self) -> None:
        if self.members is not None:
            self.out.emit(Publish(wire.encode(self.config.cluster, self.node_id, "goodbye", 0,
                                              {"node_id": self.node_id, "incarnation": self.core.incarnation})))

    def hinted_leader(self, topic: str, partition: int) -> str | None:
        """The leader heartbeats named for ``topic``/``partition``, if it is alive and still lists it."""
        hint = self.leader_hints.get((topic, partition))
        if hint is not None and hint[1] is not None and self.liveness(hint[1]) == "alive":
            return hint[1]
        return None

    def self_info(self) -> dict:
        assert self.members is not None
        return self.members.members[self.node_id].to_wire()

    def hear(self, sender: str, now_s: float) -> None:
        if self.members is not None and self.members.heard_id(sender, now_s):
            self._now_alive(sender)

    def _now_alive(self, node_id: str) -> None:
        """``node_id`` turned alive: what it offers counts again (``Adverts.of`` shows live nodes only)."""
        log.info("member %s is alive", node_id)
        self.core.adverts.liveness_changed(node_id)

    def learn(self, info: dict, now_s: float) -> None:
        """Know of a node (discovery, gossip, hello): connect to it if it is new."""
        if info["node_id"] == self.node_id or self.members is None:
            return
        if self.members.conflicts(info):
            self._refuse(info)
            return
        if self.is_foreign(info):
            return  # of another cluster of our name: only its own heartbeats are listened to
        if info.get("role") == "client" and info["node_id"] not in self.members and self.core.formation.giving_up():
            return  # our group gives itself up to another: its clients are that group's, never drawn to ours
        member = self.members.learn(info, now_s)
        if member is not None:
            self._link(member)
            self.hello(member.node_id, now_s)

    def _refuse(self, info: dict) -> None:
        """A second-hand record names another address for a live member: counted, logged once per (id, address)."""
        assert self.members is not None
        counters = self.core.counters
        counters["member_records_refused"] = counters.get("member_records_refused", 0) + 1
        key = (info["node_id"], info["address"])
        if key in self._refused or len(self._refused) >= _REFUSED_LOGGED:
            return
        self._refused.add(key)
        log.warning("a record (mDNS or gossip) names member %s at %s, but %s is alive at %s: refused (only a node "
                    "itself moves a live member; check for a host announcing a node id that is taken)",
                    info["node_id"], info["address"], info["node_id"], self.members.members[info["node_id"]].address)

    def _link(self, member: Member) -> None:
        self.out.connect(member.node_id, member.address)
        if member.pub_address not in self._subscribed:
            self._subscribed.add(member.pub_address)
            self.out.emit(Subscribe(member.pub_address))

    def _unlink(self, node_id: str, pub_address: str | None) -> None:
        self.out.disconnect(node_id)
        if pub_address and pub_address in self._subscribed:
            self._subscribed.discard(pub_address)
            self.out.emit(Unsubscribe(pub_address))

    def waiting_for_seeds(self) -> bool:
        """True while a configured seed has not answered (such a node never forms a cluster)."""
        wanted = {f"seed:{host}:{port}" for host, port in map(parse_host_port, self.config.seeds)}
        return not wanted <= self._seeds_answered

    def publish_heartbeat(self) -> None:
        assert self.members is not None
        body = {"member": self.self_info(), "members": self.members.gossip(hidden=self.core.formation.unannounced()), **self.core.formation.summary(),
                "term": self.core.agreement.term(), "leads": self.core.host.leads(),
                "adverts": self.core.adverts.version}
        self.heartbeats_sent += 1
        self.out.emit(Publish(wire.encode(self.config.cluster, self.node_id, "heartbeat", 0, body)))

    def on_heartbeat(self, message: wire.Message, now_s: float) -> None:
        assert self.members is not None
        body = message.body
        if body["member"]["node_id"] != message.sender:
            self.core.count_invalid(message.sender)
            return
        if not self._heard_from(body["member"], body, now_s):
            return  # a node of another cluster of our name: nothing it says is taken
        self._note_leads(message.sender, body["leads"])
        self.core.adverts.note_version(message.sender, body["member"]["incarnation"], body["adverts"], now_s)
        if (not any(info["node_id"] == self.node_id for info in body["members"])
                and now_s >= self._introduced_s.get(message.sender, 0.0)):
            # The sender does not know us (it restarted since we met): introduce ourselves.
            self._introduced_s[message.sender] = now_s + 1.0
            self.hello(message.sender, now_s)
        self.core.formation.tick(now_s)

    def on_goodbye(self, message: wire.Message, now_s: float) -> None:
        assert self.members is not None
        if self.members.leave(message.body["node_id"], message.body["incarnation"], now_s):
            log.info("member %s left", message.body["node_id"])
            self.core.adverts.forget(message.body["node_id"])

    def _note_leads(self, sender: str, leads: list) -> None:
        """Remember which partitions ``sender`` says it leads (routing hints; the leader decides),
        and the log end offsets it reports (``agreement.note_lead``: where a rebuild would start).

        ``leads`` is the complete list of what ``sender`` leads now, so a hint naming ``sender`` for
        a partition it no longer lists is withdrawn: it stepped down (its lease ran out in a
        minority), handed leadership over, or the partition moved. Without this a node holding no
        replica of the partition kept routing it to the old leader until a newer leader's heartbeat
        reached it. The hint's epoch stays as a floor, ``(epoch, None)``, and only a higher epoch
        replaces it: a leader never leads again in an epoch it left, so a late or duplicated
        heartbeat from before the step-down, or a stale leader of an older epoch, cannot bring the
        old name back."""
        listed: set[tuple[str, int]] = set()
        for topic, partition, epoch, *more in leads:
            key = (topic, partition)
            listed.add(key)
            if more:
                end, config_version = more
                self.core.agreement.note_lead(topic, partition, epoch, end)
                if self.core.is_storage:
                    self.core.host.on_lead_heard(topic, partition, sender, config_version)
            known = self.leader_hints.get(key)
            if known is None or epoch > known[0] or (epoch == known[0] and known[1] is not None):
                if known is not None and known[1] is not None and known[1] != sender:
                    self._hinted[known[1]].discard(key)
                self.leader_hints[key] = (epoch, sender)
                self._hinted.setdefault(sender, set()).add(key)
        self._withdraw_hints(sender, listed)

    def _withdraw_hints(self, sender: str, listed: set[tuple[str, int]]) -> None:
        """``sender`` leads exactly ``listed`` now: every hint naming it for another partition keeps
        only its epoch, as a floor (``hinted_leader`` then names nobody for that partition)."""
        named = self._hinted.get(sender)
        if named:
            for key in named - listed:
                self.leader_hints[key] = (self.leader_hints[key][0], None)
            named &= listed

    def _heard_from(self, info: dict, summary: dict | None, now_s: float) -> bool:
        """A node spoke to us directly: mark it alive, link it if new, and take in what it says
        about its metadata group (``summary``: a heartbeat or hello_ok body) and its gossip.
        False when it is refused: a voter of another formed cluster of our name (``_refuse_foreign``)."""
        assert self.members is not None
        if summary is not None and self.core.formation.foreign(summary):
            self._refuse_foreign(info, summary["formation"])
            return False
        if summary is None and self.is_foreign(info):
            return False
        if summary is not None:
            self.foreign.pop(info["node_id"], None)  # it speaks as one of us now (it gave its cluster up)
        learned, changed = self.members.heard(info, now_s)
        if learned is not None:
            self._link(learned)
        if changed:
            self._now_alive(info["node_id"])
        if summary is None:
            return True
        self.core.formation.note_summary(info["node_id"], info["role"], summary)
        for other in summary["members"]:
            self.learn(other, now_s)
        return True

    def is_foreign(self, info: dict) -> bool:
        """``info`` names a node last heard as a voter of another cluster of our name, at no newer incarnation."""
        known = self.foreign.get(info["node_id"])
        return known is not None and info["incarnation"] <= known[0] and self.core.formation.formation() != ""

    def _refuse_foreign(self, info: dict, formation: str) -> None:
        """A voter of another formed cluster of our name spoke to us: it is no member of ours. Drop it from the
        member table (its DEALER closed, its adverts, summary and leader hints forgotten) but keep listening to
        its heartbeats, so that it is taken in once it gives its cluster up. Logged once per node, counted."""
        assert self.members is not None
        node_id = info["node_id"]
        counters = self.core.counters
        counters["foreign_refused"] = counters.get("foreign_refused", 0) + 1
        if node_id not in self.foreign or self.foreign[node_id][1] != formation:
            log.warning("node %s at %s is a voter of another cluster named %r (formation %s; ours is %s): refused, "
                        "the two never exchange members, metadata or partitions. To merge them, see "
                        "docs/operations.md, 'Two clusters of the same name'", node_id, info["address"],
                        self.config.cluster, formation, self.core.formation.formation())
            if len(self.foreign) >= _REFUSED_LOGGED:
                self.foreign.pop(next(iter(self.foreign)))
        self.foreign[node_id] = (info["incarnation"], formation)
        if node_id in self.members and node_id != self.node_id:
            del self.members.members[node_id]
            self.out.disconnect(node_id)
            self.core.adverts.forget(node_id)
            self.core.formation.forget(node_id)
            for key in sorted(self._hinted.pop(node_id, ())):
                del self.leader_hints[key]

    def hello(self, peer: str, now_s: float, retry: bool = True) -> None:
        """Introduce ourselves to ``peer`` (a member, or ``seed:host:port``). A seed that does not
        answer is asked again every 0.5 s, unless ``retry`` is off: then the caller decides when."""
        def on_reply(message: wire.Message) -> None:
            assert self.members is not None
            info = message.body["member"]
            if peer.startswith("seed:"):
                self.out.disconnect(peer)  # a seed's address was only a way in
                self._seeds_answered.add(peer)
                self._seed_hellos.discard(peer)
            if info["node_id"] == self.node_id:
                self.core.formation.tick(self.core.now_s)
                return
            if self._heard_from(info, message.body, self.core.now_s):
                self.core.formation.tick(self.core.now_s)

        def on_error(error: MeshqError) -> None:
            if self.core.stopped or not peer.startswith("seed:"):
                return  # known members are reached by heartbeats anyway
            if not retry:
                self._seed_hellos.discard(peer)
                self.out.disconnect(peer)
                return
            log.info("seed %s did not answer hello (%s); retrying", peer[5:], error)
            self.out.schedule(self.core.now_s + 0.5, "hello_retry", peer)

        body: dict = {"member": self.self_info()}
        summary = self.core.formation.summary()
        if summary["formed"]:
            body.update(summary)  # (see serve_hello)
        self.out.request(peer, "hello", body, (), now_s, 2.0, on_reply, on_error)

    def _hello_again(self, peer: str, now_s: float) -> None:
        """The ``hello_retry`` timer: a seed did not answer our hello; ask it again."""
        self.hello(peer, now_s)

    def hello_seeds_again(self, now_s: float) -> bool:
        """Ask every seed that answered before (and has no fallback hello pending) again: its answer
        brings back its view of the members and of the metadata group. Seeds that never answered
        are still being asked by their first hello's retry loop. False if none was asked."""
        asked = False
        for seed in self.config.seeds:
            host, port = parse_host_port(seed)
            peer = f"seed:{host}:{port}"
            if peer not in self._seeds_answered or peer in self._seed_hellos:
                continue
            self._seed_hellos.add(peer)
            self.out.connect(peer, f"tcp://{host}:{port}")
            self.hello(peer, now_s, retry=False)
            asked = True
        return asked

    def fall_back_to_seeds(self, now_s: float) -> None:
        """A client that knows no live storage node asks its seeds again, with capped exponential
        backoff. Cut off for longer than ``member_timeout_s``, it has forgotten every member and
        they have forgotten it, so without this nobody would ever contact anybody again."""
        if self.core.is_storage or self.core.stopped or not self.config.seeds:
            return
        assert self.members is not None
        if self.members.alive_ids("storage"):
            self._seed_retry_s = _SEED_RETRY_MIN_S
            return
        if now_s < self._next_seed_hello_s or not self.hello_seeds_again(now_s):
            return
        log.info("%s knows no live storage node; asking its seeds again", self.node_id)
        self._next_seed_hello_s = now_s + self._seed_retry_s * (0.75 + 0.5 * self.core.rng.random())
        self._seed_retry_s = min(2 * self._seed_retry_s, _SEED_RETRY_MAX_S)

    def serve_hello(self, route: Any, message: wire.Message, now_s: float) -> None:
        assert self.members is not None
        info = message.body["member"]
        if info.get("role") == "storage":  # only the cluster key may say it is a storage node
            self.core.access.require_node("a hello claiming the storage role")
        if info["node_id"] != self.node_id:
            # A voter of another formed group of our name: take its summary now, not at its first heartbeat (either
            # side may have to give itself up, and one that would must not take state meanwhile). A hello of our
            # own group is taken as before: its heartbeat brings the summary.
            body = message.body
            ours = self.core.formation.formation()
            theirs = body.get("formation", "")
            other = info.get("role") == "storage" and body.get("formed", False) and ours and theirs and theirs != ours
            self._heard_from(info, {**body, "members": []} if other else None, now_s)
        self.out.reply(route, message.request_id, "hello_ok", {
            "member": self.self_info(), "members": self.members.gossip(hidden=self.core.formation.unannounced()), **self.core.formation.summary(),
        })

    def send_to_member(self, peer: str, type_: str, body: dict, payloads: tuple = ()) -> None:
        """A one-way message to a storage member, connecting first if we have not yet (its address
        comes from the metadata group, else from the member table); dropped if it is unknown."""
        if peer not in self.out.peer_endpoints:
            info = self.core.agreement.member_info(peer)
            if info is None:
                member = self.members.get(peer) if self.members is not None else None
                info = {"address": member.address} if member is not None else None
            if info is None:
                return
            self.out.connect(peer, info["address"])
        self.out.send(peer, type_, body, payloads)

    def known_dead(self, node_id: str) -> bool:
        return self.liveness(node_id) == "gone"

    def liveness(self, node_id: str) -> str:
        """``alive`` (ourselves, or alive or suspect in the member table), ``gone`` (dead, left,
        joining) or ``unknown`` (not in the member table)."""
        if node_id == self.node_id:
            return "alive"
        member = self.members.get(node_id) if self.members is not None else None
        if member is None:
            return "unknown"
        return "alive" if member.state in ("alive", "suspect") else "gone"
