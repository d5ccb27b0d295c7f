"""Liveness of every known node (storage and client): this node's *local* view.

Theory of operation
-------------------
Every node publishes a heartbeat on its PUB socket every ``heartbeat_interval_s``; every
message received from a node (heartbeat, request or reply) counts as hearing from it.
A node we have not heard from for half of ``failure_timeout_s`` becomes *suspect*, for the
whole of it *dead*; hearing from it again makes it *alive* (a restarted node carries a
higher ``incarnation``). A node that announced its departure is *left*. Nodes we only know
of (from discovery or gossip) but never heard from are *joining*. Dead, left and joining
entries are forgotten after ``member_timeout_s``.

Addresses: only the node itself moves a live member. What a node says of itself in its own
heartbeat or hello (``heard``) is first-hand; an mDNS record or a peer's gossip (``learn``) is
second-hand, and anyone on the LAN can announce an mDNS record naming any node id. So a
second-hand record may give a member a new address only while that member is not alive or
suspect (never heard, dead or left); one naming another address for an alive or suspect
member, whatever incarnation it claims, is refused and counted (``refused_readdress``). An
address known only second-hand (``confirmed`` false) gives way to the first one the node
itself speaks from, even at a lower incarnation, so a record that claimed a node's id while
the node was away cannot keep it once it is back.

This view drives connections and failure detection. The storage membership that the ring
and topic assignments are computed from is *not* this view: it is agreed through the
metadata Raft group (``meshq.core.raft``), and changed only by a majority.
"""

from __future__ import annotations

from dataclasses import dataclass

JOINING = "joining"
ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
LEFT = "left"

HEARD = "heard"
SILENT_HALF = "silent_half"
SILENT = "silent"
LEAVE = "leave"

# (state, event) -> next state. Events not listed leave the state unchanged.
TRANSITIONS: dict[tuple[str, str], str] = {
    (JOINING, HEARD): ALIVE,
    (ALIVE, SILENT_HALF): SUSPECT,
    (ALIVE, SILENT): DEAD,
    (SUSPECT, HEARD): ALIVE,
    (SUSPECT, SILENT): DEAD,
    (DEAD, HEARD): ALIVE,
    (JOINING, LEAVE): LEFT,
    (ALIVE, LEAVE): LEFT,
    (SUSPECT, LEAVE): LEFT,
    (DEAD, LEAVE): LEFT,
}


@dataclass(slots=True)
class Member:
    node_id: str
    address: str  # ROUTER endpoint, tcp://host:port
    pub_address: str  # PUB endpoint
    role: str
    incarnation: int
    state: str = JOINING
    last_heard_s: float = float("-inf")
    changed_s: float = 0.0
    key: str = ""  # a client's CURVE public key (wire.MEMBER_INFO), "" when unknown or not used
    confirmed: bool = False  # the node itself spoke to us from ``address`` (see the module docstring)

    def to_wire(self) -> dict:
        info = {"node_id": self.node_id, "address": self.address, "pub_address": self.pub_address,
                "role": self.role, "incarnation": self.incarnation}
        if self.key:
            info["key"] = self.key
        return info

    def summary(self) -> dict:
        return {"node_id": self.node_id, "address": self.address, "role": self.role, "state": self.state}


class MemberTable:
    """The local liveness view; see the module docstring."""

    def __init__(self, self_member: Member, failure_timeout_s: float, member_timeout_s: float) -> None:
        self.self_id = self_member.node_id
        self_member.state = ALIVE
        self.members: dict[str, Member] = {self_member.node_id: self_member}
        self.failure_timeout_s = failure_timeout_s
        self.member_timeout_s = member_timeout_s
        self.refused_readdress = 0  # second-hand records that named another address for a live member

    def __contains__(self, node_id: str) -> bool:
        return node_id in self.members

    def get(self, node_id: str) -> Member | None:
        return self.members.get(node_id)

    def _event(self, member: Member, event: str, now_s: float) -> bool:
        new_state = TRANSITIONS.get((member.state, event))
        if new_state is None or new_state == member.state:
            return False
        member.state = new_state
        member.changed_s = now_s
        return True

    def conflicts(self, info: dict) -> bool:
        """True when second-hand ``info`` names another address for a member that is alive or suspect: refused
        (see the module docstring)."""
        member = self.members.get(info["node_id"])
        return (member is not None and member.node_id != self.self_id and member.state in (ALIVE, SUSPECT)
                and (member.address, member.pub_address) != (info["address"], info["pub_address"]))

    def learn(self, info: dict, now_s: float, firsthand: bool = False) -> Member | None:
        """Know of a node: second-hand (discovery, gossip), or ``firsthand`` (the node itself, see ``heard``).
        Returns the member if it is new or changed address."""
        node_id = info["node_id"]
        if node_id == self.self_id:
            return None
        member = self.members.get(node_id)
        if member is None:
            member = Member(node_id, info["address"], info["pub_address"], info["role"], info["incarnation"],
                            changed_s=now_s, key=info.get("key", ""), confirmed=firsthand)
            self.members[node_id] = member
            return member
        if not firsthand and self.conflicts(info):
            self.refused_readdress += 1
            return None
        moved = (member.address, member.pub_address) != (info["address"], info["pub_address"])
        if firsthand and not member.confirmed and moved:
            # The node itself speaks from another address than a second-hand record gave it: it wins.
            member.incarnation = info["incarnation"]
            member.address, member.pub_address, member.confirmed = info["address"], info["pub_address"], True
            if info.get("key") and member.role == "client":
                member.key = info["key"]
            if member.state == LEFT:
                member.state, member.changed_s = JOINING, now_s
            return member
        if info["incarnation"] >= member.incarnation and info.get("key") and member.role == "client":
            member.key = info["key"]  # learnt before its key was (a peer without keys, an older version)
        if info["incarnation"] > member.incarnation:
            member.incarnation = info["incarnation"]
            if member.state == LEFT:
                member.state = JOINING
                member.changed_s = now_s
            if moved:
                member.address, member.pub_address, member.confirmed = info["address"], info["pub_address"], firsthand
                return member
        if firsthand and not moved:
            member.confirmed = True
        return None

    def heard(self, info: dict, now_s: float) -> tuple[Member | None, bool]:
        """We heard from the node itself. Returns (member if new/readdressed, state changed?)."""
        learned = self.learn(info, now_s, firsthand=True)
        member = self.members.get(info["node_id"])
        if member is None or member.node_id == self.self_id:
            return None, False
        if member.state == LEFT and info["incarnation"] <= member.incarnation:
            return learned, False  # a late heartbeat from before it said goodbye
        member.last_heard_s = now_s
        return learned, self._event(member, HEARD, now_s)

    def heard_id(self, node_id: str, now_s: float) -> bool:
        """Any message from a known node counts as hearing from it."""
        member = self.members.get(node_id)
        if member is None or member.node_id == self.self_id or member.state == LEFT:
            return False
        member.last_heard_s = now_s
        return self._event(member, HEARD, now_s)

    def leave(self, node_id: str, incarnation: int, now_s: float) -> bool:
        member = self.members.get(node_id)
        if member is None or member.incarnation > incarnation:
            return False
        return self._event(member, LEAVE, now_s)

    def tick(self, now_s: float) -> list[tuple[str, str]]:
        """Apply silence timeouts; returns (node_id, new_state) for every change, sorted."""
        changes = []
        for node_id in sorted(self.members):
            member = self.members[node_id]
            if node_id == self.self_id:
                continue
            silent_s = now_s - member.last_heard_s
            if member.state in (ALIVE, SUSPECT):
                if silent_s >= self.failure_timeout_s and self._event(member, SILENT, now_s):
                    changes.append((node_id, member.state))
                elif silent_s >= self.failure_timeout_s / 2 and self._event(member, SILENT_HALF, now_s):
                    changes.append((node_id, member.state))
            elif member.state in (DEAD, LEFT, JOINING) and now_s - member.changed_s >= self.member_timeout_s:
                del self.members[node_id]
                changes.append((node_id, "forgotten"))
        return changes

    def gossip(self, limit: int = 256, hidden: frozenset[str] = frozenset()) -> list[dict]:
        """Members worth telling others about (not left, not forgotten, not ``hidden``), self first."""
        out = [self.members[self.self_id].to_wire()]
        for node_id in sorted(self.members):
            member = self.members[node_id]
            if (node_id != self.self_id and member.state in (ALIVE, SUSPECT, JOINING) and len(out) < limit
                    and node_id not in hidden):
                out.append(member.to_wire())
        return out

    def alive_ids(self, role: str | None = None) -> list[str]:
        return sorted(m.node_id for m in self.members.values()
                      if m.state in (ALIVE, SUSPECT) and (role is None or m.role == role))

    def summaries(self) -> list[dict]:
        """Every member for status, except clients that are gone: a client that said goodbye (a CLI command that
        ended) or went silent holds nothing, and listing it would only bury the members that matter."""
        return [self.members[n].summary() for n in sorted(self.members)
                if not (self.members[n].role == "client" and self.members[n].state in (LEFT, DEAD))]
