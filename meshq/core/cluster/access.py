"""Access: who may do what, checked where a request is served, and the grants changed and listed.

Theory of operation
-------------------
The grants are agreed metadata (``MetadataState.acl``, rules in ``meshq.core.acl``). The root
hands every request from a peer to ``serve`` with the caller's identity set (``core.caller``:
the ZAP ``User-Id`` the runtime read, ``None`` without keys and for this node's own requests).
Serving rooms ask this room, before they change or return anything:

* ``check(permission, resource)`` — a topic, subject or service permission;
* ``check_admin(what)`` — cluster administration (grants, ``leave``): the admin key only;
* ``check_node(message_type)`` — called by the root for every message only storage nodes send
  each other (``NODE_ONLY``: Raft, replication, repair), so a client key cannot forge them.

A refusal raises ``AuthorizationError``, which the root turns into an ``error`` reply (code
``authorization``, not retriable) before anything was stored or proposed.

Only storage nodes hold the grants: a client node enforces nothing (its callers' requests are
checked by the storage node that serves them). The admin's side: ``AclChange`` / ``AclList``
go to any storage node, which checks the admin key and proposes ``{"op": "acl", ...}`` to the
metadata group (``agreement.propose``), answering once it is applied there.
"""

from __future__ import annotations

from typing import Any

from meshq.core import acl, wire
from meshq.core.events import AclChange, AclList, Fail, Resolve
from meshq.core.room import Room
from meshq.errors import MeshqError, NodeStoppedError, NotLeaderError, TimeoutError, UsageError

NODE_ONLY = frozenset({"raft_vote", "raft_vote_ok", "raft_append", "raft_append_ok", "raft_join", "raft_propose",
                       "repl_vote", "repl_vote_ok", "repl_append", "repl_append_ok", "repl_timeout_now",
                       "repair_fetch"})
RETRY_S = 0.05  # no storage node known yet: ask again this often until the deadline


class Access(Room):
    """Permission checks and the grants' administration (see the module docstring)."""

    SERVES = {"acl_change": "serve_change", "acl_list": "serve_list"}
    COMMANDS = {AclChange: "run", AclList: "run"}
    TIMERS = {"acl_retry": "_retry"}

    # ------------------------------------------------------------------ checks (storage nodes)
    def check(self, permission: str, resource: str) -> None:
        """Refuse (``AuthorizationError``) unless the current caller holds ``permission`` on ``resource``."""
        caller = self.core.caller
        if caller is not None and self.core.is_storage:
            acl.authorize(self.core.meta.acl, caller, permission, resource)

    def check_admin(self, what: str) -> None:
        acl.require_admin(self.core.caller, what)

    def check_node(self, message_type: str) -> None:
        """Refuse a client key sending a message only storage nodes send each other (``NODE_ONLY``)."""
        if message_type in NODE_ONLY:
            acl.require_node(self.core.caller, message_type)

    def require_node(self, what: str) -> None:
        """Refuse ``what`` (e.g. a ``hello`` claiming the storage role) unless the caller holds the cluster key."""
        acl.require_node(self.core.caller, what)

    # ------------------------------------------------------------------ serving the admin
    def serve_change(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        self.check_admin(f"{body['action']} permissions")
        if not self.core.is_storage:
            raise NotLeaderError(f"node {self.node_id} is a client and holds no permissions")
        name, permission, pattern = acl.validate_grant(body["name"], body["permission"], body["pattern"])
        if body["action"] == "grant":
            acl.refuse_unenforced(permission)
        granted = self.core.meta.acl.has(name, permission, pattern)
        if body["action"] == "grant" and granted:
            self.out.reply(route, message.request_id, "acl_change_ok", {"changed": False})
            return
        if body["action"] == "revoke" and not granted:
            raise UsageError(f"client {name!r} holds no grant {permission} {pattern!r}, nothing to revoke; "
                             f"`meshq acl list` shows the grants")
        command = {"op": "acl", "action": body["action"], "name": name, "permission": permission, "pattern": pattern}

        def done(error: MeshqError | None) -> None:
            if error is not None:
                self.out.reply_error(route, message.request_id, error)
            else:
                self.out.reply(route, message.request_id, "acl_change_ok", {"changed": True})

        self.core.agreement.propose(command, now_s, now_s + self.config.request_timeout_s, done)

    def serve_list(self, route: Any, message: wire.Message, now_s: float) -> None:
        self.check_admin("list permissions")
        if not self.core.is_storage:
            raise NotLeaderError(f"node {self.node_id} is a client and holds no permissions")
        self.out.reply(route, message.request_id, "acl_list_ok", {"grants": self.core.meta.acl.listing()})

    # ------------------------------------------------------------------ the admin's side (local API)
    def run(self, command: AclChange | AclList, now_s: float) -> None:
        if self.core.stopped:
            self.out.emit(Fail(command.waiter, NodeStoppedError("the node is stopped")))
            return
        if command.deadline_s is None:
            command.deadline_s = now_s + self.config.request_timeout_s
        try:
            self._send(command, now_s)
        except MeshqError as exc:
            self.out.emit(Fail(command.waiter, exc))

    def _retry(self, command: AclChange | AclList, now_s: float) -> None:
        self.run(command, now_s)

    def _send(self, command: AclChange | AclList, now_s: float) -> None:
        if isinstance(command, AclChange):
            if command.action not in ("grant", "revoke"):
                raise UsageError(f"acl action {command.action!r}: give 'grant' or 'revoke'")
            name, permission, pattern = acl.validate_grant(command.name, command.permission, command.pattern)
            if command.action == "grant":
                acl.refuse_unenforced(permission)
            type_, body = "acl_change", {"action": command.action, "name": name, "permission": permission,
                                         "pattern": pattern}
            convert: Any = lambda message: message.body["changed"]  # noqa: E731
        else:
            type_, body = "acl_list", {}
            convert = lambda message: message.body["grants"]  # noqa: E731
        peer = self.core.client.any_storage_peer()
        deadline_s = command.deadline_s
        assert deadline_s is not None
        if peer is None:
            if now_s + RETRY_S < deadline_s:
                self.out.schedule(now_s + RETRY_S, "acl_retry", command)
                return
            raise TimeoutError("no storage node is reachable: check --seed / mDNS, and that a `meshq node` is running")
        self.out.request(peer, type_, body, (), now_s, max(0.001, deadline_s - now_s),
                         lambda m: self.out.emit(Resolve(command.waiter, convert(m))),
                         lambda e: self.out.emit(Fail(command.waiter, e)))
