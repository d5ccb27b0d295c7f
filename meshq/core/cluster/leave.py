"""Leave: a storage node hands its partitions over and leaves the membership for good.

Theory of operation
-------------------
``meshq leave`` sends ``leave`` to the node that should go. It marks itself ``leaving`` and
asks the metadata leader (``raft_propose`` with op ``leave``), which marks it leaving in the
configuration: the placement ring leaves it out, so partition leaders move its replicas away
(``core.host`` rebalancing). Once no partition names it, the leader removes it from the
voters (``finish_leaves``). The node cannot see that last step itself (a removed member gets
no more of the metadata log), so while leaving it asks the leader once a second how far it
got (``check_left``); the answer ``left`` sets ``has_left`` and the runtime stops the node.
The request is idempotent: the caller asks again until the answer is ``left``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgpack

from meshq.core import wire
from meshq.core.raft import LEADER
from meshq.core.room import Room
from meshq.errors import MeshqError, NotLeaderError, ProtocolError, UsageError

log = logging.getLogger("meshq.core")


class Leave(Room):
    """This node's leave, and the metadata leader's side of everyone's (see the module docstring)."""

    SERVES = {"leave": "serve_leave"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.leaving = False  # ``meshq leave`` asked this node to hand its partitions over and go
        self.has_left = False  # ... and it has: the runtime stops the node
        self._next_leave_check_s = 0.0

    def finish_leaves(self, now_s: float) -> None:
        """Metadata leader: a leaving member that no partition names any more is removed for good."""
        raft = self.core.agreement.raft
        if raft is None or raft.role != LEADER or not raft.can_change_config():
            return
        for peer, info in sorted(raft.voters.items()):
            if info.get("leaving") and self.core.agreement.meta.assigned_to(peer) == 0 and len(raft.voters) > 1:
                members = {k: v for k, v in raft.voters.items() if k != peer}
                if raft.propose({"op": "config", "members": members}, now_s, lambda ok: None):
                    log.info("%s left: all its partitions moved away; removed from the storage membership", peer)
                return

    def state_of(self, node_id: str, now_s: float) -> dict:
        """Metadata leader: mark ``node_id`` leaving (once) and say how far it got."""
        raft = self.core.agreement.raft
        assert raft is not None and raft.role == LEADER
        if node_id not in raft.voters:
            # Gone, or back after its removal (a restart asks to join as a new start) and then told to leave
            # again: it is not admitted, else it would become a voter of a membership it has left.
            raft.drop_learner(node_id)
            self.core.agreement.forget_joiner(node_id)
            return {"state": "left", "assigned": 0}
        if not self.mark_leaving(node_id, now_s):
            raise NotLeaderError("the metadata group is busy with a membership change; retry")
        return {"state": "draining", "assigned": self.core.agreement.meta.assigned_to(node_id)}

    def serve_leave(self, route: Any, message: wire.Message, now_s: float) -> None:
        """``meshq leave``: hand every partition over, then leave the storage membership for good.

        Idempotent: the caller asks again until the answer is ``left``; the node then stops.
        """
        self.core.catalog.require_storage()
        self.core.access.check_admin("ask a node to leave the cluster")
        if message.body["node_id"] != self.node_id:
            raise UsageError(f"this is node {self.node_id}, not {message.body['node_id']}: "
                             f"send meshq leave to the node that should leave")
        raft = self.core.agreement.raft
        assert raft is not None
        self.leaving = True
        if raft.role == LEADER:
            answer = self.state_of(self.node_id, now_s)
            if answer["state"] == "left":
                self.left()
            self.out.reply(route, message.request_id, "leave_ok", answer)
            return
        if self.has_left:
            self.out.reply(route, message.request_id, "leave_ok", {"state": "left", "assigned": 0})
            return
        if not self.ask(now_s, lambda body: self.out.reply(route, message.request_id, "leave_ok", body),
                        lambda error: self.out.reply_error(route, message.request_id, error)):
            raise NotLeaderError("the metadata group has no leader right now; retry")

    def left(self) -> None:
        """The membership let this node go: delete what it still holds; the runtime then stops it."""
        self.has_left = True
        self.core.host.delete_every_copy()

    def check_left(self, now_s: float) -> None:
        """A leaving node asks the metadata leader, once a second, whether it is out yet, so it
        stops even if nobody asks ``leave`` again. It cannot tell by itself: the leader stops
        replicating the metadata log to a member it removed, so the node may never apply the
        last steps that drained it. (A metadata leader that leaves steps down once its own
        removal commits, and then asks like any other node.)"""
        raft = self.core.agreement.raft
        if not self.leaving or self.has_left or raft is None or raft.role == LEADER or now_s < self._next_leave_check_s:
            return
        self._next_leave_check_s = now_s + 1.0
        self.ask(now_s, lambda body: None, lambda error: None)

    def ask(self, now_s: float, answered: Callable[[dict], None], failed: Callable[[MeshqError], None]) -> bool:
        """Ask the metadata leader (ours, else the one peers name) how far our leave got; a ``left``
        answer sets ``has_left``. False when no leader is known."""
        raft = self.core.agreement.raft
        assert raft is not None
        ours = raft.leader if raft.leader not in (None, self.node_id) else None
        leader = ours
        if leader is not None and now_s - raft.last_leader_contact_s > 2 * self.config.election_timeout_s:
            # A leader we no longer hear from (a node left out of the group keeps the last one it
            # knew): ask the one the peers name, if any.
            leader = None
        if leader is None:
            hinted = self.core.formation.named_leaders()
            leader = hinted[0] if hinted else ours
        if leader is None:
            return False

        def on_reply(reply: wire.Message) -> None:
            if reply.type != "leave_ok":
                failed(ProtocolError(f"unexpected {reply.type} to leave"))
                return
            if reply.body["state"] == "left" and not self.has_left:
                log.info("%s: every partition moved away and the membership let it go; leaving the cluster",
                         self.node_id)
                self.left()
            answered(reply.body)

        packed = msgpack.packb({"op": "leave", "node_id": self.node_id}, use_bin_type=True)
        self.out.request(leader, "raft_propose", {"command": packed}, (), now_s, self.config.request_timeout_s,
                         on_reply, failed)
        return True

    def mark_leaving(self, node_id: str, now_s: float) -> bool:
        """Metadata leader: take ``node_id`` out of the placement ring (it stays a voter until its
        partitions have moved). False if the metadata group cannot change its configuration now."""
        raft = self.core.agreement.raft
        assert raft is not None
        if node_id not in raft.voters:
            return True  # already gone
        if raft.voters[node_id].get("leaving"):
            return True
        if not raft.can_change_config():
            return False
        members = {k: dict(v) for k, v in raft.voters.items()}
        members[node_id]["leaving"] = True
        if raft.propose({"op": "config", "members": members}, now_s, lambda ok: None):
            log.info("%s is leaving: its partitions move to the other members", node_id)
            return True
        return False
