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

Storage nodes hold the grants. Client nodes check among themselves what no storage node sees
(``acl.PEER_PERMISSIONS``: ``request`` and ``serve`` of services a client node offers), with a
*view*: every ``VIEW_REFRESH_S`` a keyed client node asks a storage node ``acl_view`` and gets
the grants of those permissions and the names of the trusted client keys (``names``: z85 public
key -> name, which a storage node's runtime reads from ``cluster/trusted/`` and feeds in as
``TrustedNames``). Every check rests on a key CURVE verified, never on a node id:

* serving (``check``, on a client node): the caller is the ZAP ``User-Id`` ``@key:`` + the
  caller's key; its name is ``names[key]``; ``@cluster`` (a storage node) passes;
* asking (``may_node``, every keyed node): an instance's name is that of the key this node's
  sockets use as the server key to reach it (the cluster key for a storage member — role
  ``storage`` cannot be claimed without the cluster key's secret — a client member's gossiped
  ``key`` otherwise, whose secret the server must hold to answer at all).

A keyed client node without a view yet (it asks from its start, then every second) refuses
callers it cannot name and trusts no client instance; an unkeyed node checks nothing. What
its own grants decide waits for the view, ``VIEW_WAIT_S`` at most (then it goes ahead and the
peers' checks decide): a ``serve`` (``rpc``), a subscription (``pubsub``), and the node's
first ``publish`` (``meshq.io.pubsub``). Rooms hand such work to ``when_own_known``, which runs
it at once when this node can check its own calls, else at the first view (or change of it), or
at the hold's deadline, whichever comes first, and fails it if the node stops before; ``release``
takes back one still held. Rooms with other work for the view (rpc's parked calls) ``watch`` it.
The admin's side: ``AclChange`` / ``AclList``
go to any storage node, which checks the admin key and proposes ``{"op": "acl", ...}`` to the
metadata group (``agreement.propose``), answering once it is applied there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshq.core import acl, wire
from meshq.core.events import AclChange, AclList, Fail, Resolve, TrustedNames
from meshq.core.room import Room
from meshq.errors import AuthorizationError, MeshqError, NodeStoppedError, NotLeaderError, TimeoutError, UsageError

NODE_ONLY = frozenset({"raft_vote", "raft_vote_ok", "raft_append", "raft_append_ok", "raft_join", "raft_propose",
                       "repl_vote", "repl_vote_ok", "repl_append", "repl_append_ok", "repl_timeout_now", "repl_step_aside",
                       "repair_fetch"})
RETRY_S = 0.05  # no storage node known yet: ask again this often until the deadline
VIEW_REFRESH_S = 1.0  # a keyed client node asks a storage node for the peer grants this often
VIEW_FIRST_S = 0.1  # ... and this often until it has them
# a keyed client node without its view yet holds what its own grants decide (serving a service, a
# subscription, the first publish) this long at most, then goes ahead (the peers still check)
VIEW_WAIT_S = 2.0
MAX_NAMES = 10_000  # trusted client keys an acl_view names (wire.SCHEMAS bound; beyond: unnamed, so refused)


class Access(Room):
    """Permission checks and the grants' administration (see the module docstring)."""

    SERVES = {"acl_change": "serve_change", "acl_list": "serve_list", "acl_view": "serve_view"}
    COMMANDS = {AclChange: "run", AclList: "run", TrustedNames: "on_trusted"}
    TIMERS = {"acl_retry": "_retry", "acl_view": "_refresh_view", "acl_hold": "_hold_due"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.names: dict[str, str] = {}  # trusted client key (z85) -> its holder's name
        self.view: acl.Acl | None = None  # a keyed client node: the peer grants, as a storage node last served them
        self._asking = False  # an acl_view in flight
        self._watchers: list[Any] = []  # called (no arguments) when the view changes: rooms holding work for it
        # work waiting for the view (``when_own_known``): the caller's key -> (serial, go, fail), oldest first
        self._holds: dict[Any, tuple[int, Callable[[float], None], Callable[[MeshqError], None]]] = {}
        self._next_hold = 1
        self.counters = {"views": 0, "refused": 0}  # views taken; requests this node refused (any check)

    @property
    def keyed(self) -> bool:
        """Whether this node runs with keys (an unkeyed node has no identities and checks nothing)."""
        return bool(self.core.public_key)

    def start(self, now_s: float) -> None:
        if self.keyed and not self.core.is_storage:
            self.out.schedule(now_s, "acl_view", None)

    # ------------------------------------------------------------------ checks
    def check(self, permission: str, resource: str) -> None:
        """Refuse (``AuthorizationError``) unless the current caller holds ``permission`` on ``resource``: on a
        storage node any permission, on a client node those it serves (``acl.PEER_PERMISSIONS``)."""
        caller = self.core.caller
        if caller is None:
            return
        try:
            if self.core.is_storage:
                acl.authorize(self.core.meta.acl, caller, permission, resource)
            elif permission in acl.PEER_PERMISSIONS and caller != acl.CLUSTER:
                self._check_peer(caller, permission, resource)
        except AuthorizationError:
            self.counters["refused"] += 1
            raise

    def _check_peer(self, caller: str, permission: str, resource: str) -> None:
        name = self.name_of(caller)
        if self.view is None or name is None:
            self.out.schedule(self.core.now_s, "acl_view", "now")  # ask now: it may have been added meanwhile
            raise AuthorizationError(
                f"client node {self.node_id} cannot tell whose key {caller[len(acl.KEY_PREFIX):]} is "
                f"({'it has not learnt the grants yet' if self.view is None else 'no trusted client has it'}): "
                f"client nodes learn the trusted keys and the grants from the storage nodes about every "
                f"{VIEW_REFRESH_S:g} s; retry shortly, and check that the key was added with "
                f"`meshq keygen DIR --client NAME` and copied to cluster/trusted/ of the storage nodes")
        acl.authorize(self.view, name, permission, resource)

    def name_of(self, caller: str) -> str | None:
        """The client name behind a caller: ``@key:K`` is looked up in ``names``; a name is itself."""
        if caller.startswith(acl.KEY_PREFIX):
            return self.names.get(caller[len(acl.KEY_PREFIX):])
        return caller

    def grants(self) -> acl.Acl | None:
        """The grants this node checks with: the agreed ones on a storage node, the view on a client node."""
        return self.core.meta.acl if self.core.is_storage else self.view

    def name_of_node(self, node_id: str) -> str | None:
        """Who holds the key this node reaches ``node_id`` with (see the module docstring); None: unknown."""
        if node_id == self.node_id:
            return acl.CLUSTER if self.core.is_storage else self.names.get(self.core.public_key)
        members = self.core.mesh.members
        member = members.get(node_id) if members is not None else None
        if member is None:
            return None
        if member.role == "storage":
            return acl.CLUSTER
        return self.names.get(member.key) if member.key else None

    def may_node(self, node_id: str, permission: str, resource: str) -> bool:
        """Whether ``node_id`` (by its verified key) may ``permission`` ``resource``; always, without keys."""
        if not self.keyed:
            return True
        name = self.name_of_node(node_id)
        if name == acl.CLUSTER:
            return True
        grants = self.grants()
        return name is not None and grants is not None and grants.allows(name, permission, resource)

    def refuse_own(self, permission: str, resource: str) -> None:
        """``AuthorizationError`` if this client node knows its own key may not ``permission`` ``resource`` (say
        so at once, rather than be ignored by every peer); nothing when it cannot know yet."""
        if not self.keyed or self.core.is_storage or self.view is None:
            return
        name = self.names.get(self.core.public_key)
        if name is not None:
            acl.authorize(self.view, name, permission, resource)

    def refuse_own_some(self, permission: str, pattern: str) -> None:
        """``AuthorizationError`` if this client node knows its own key holds no ``permission`` on any subject
        ``pattern`` matches (a subscription that could never receive anything); nothing when it cannot know."""
        if not self.keyed or self.core.is_storage or self.view is None:
            return
        name = self.names.get(self.core.public_key)
        if name is not None and not self.view.allows_some(name, permission, pattern):
            raise AuthorizationError(
                f"client {name!r} may not {permission} {pattern!r}: no grant of {permission} matches any subject "
                f"of it; the admin can grant it with `meshq acl grant {name} {permission} PATTERN --keys "
                f"DIR/clients/admin`")

    def watch(self, callback: Any) -> None:
        """Call ``callback()`` whenever this client node's view changes (the first one included)."""
        self._watchers.append(callback)

    def when_own_known(self, key: Any, go: Callable[[float], None], fail: Callable[[MeshqError], None],
                       until_s: float, now_s: float) -> None:
        """Run ``go(now_s)`` now if this node can check its own calls (``knows_own``) or is stopped; otherwise hold
        it under ``key`` (unique among the holds) until the first view or a change of it, or ``until_s`` at the
        latest (then it goes ahead and the peers' checks decide). ``fail(error)`` instead if the node stops first."""
        if self.knows_own() or self.core.stopped:
            go(now_s)
            return
        if key in self._holds:
            raise ValueError(f"{key!r} is already held")
        serial = self._next_hold
        self._next_hold += 1
        self._holds[key] = (serial, go, fail)
        self.out.schedule(until_s, "acl_hold", (key, serial))

    def release(self, key: Any, error: MeshqError) -> None:
        """Take back the work held under ``key``, if any: it will not run, and fails with ``error``."""
        held = self._holds.pop(key, None)
        if held is not None:
            held[2](error)

    def _hold_due(self, timer: tuple, now_s: float) -> None:
        key, serial = timer
        held = self._holds.get(key)
        if held is not None and held[0] == serial:  # (not run, released or replaced since)
            del self._holds[key]
            held[1](now_s)

    def _run_holds(self) -> None:
        holds, self._holds = self._holds, {}
        for _serial, go, _fail in holds.values():
            go(self.core.now_s)

    def stop(self, error: MeshqError) -> None:
        """The node stops: held work fails."""
        holds, self._holds = self._holds, {}
        for _serial, _go, fail in holds.values():
            fail(error)

    def stamp(self) -> tuple:
        """Changes whenever a decision of ``may_node`` / ``refuse_own`` may change (the grants or the key names
        were replaced or changed): callers caching decisions compare it."""
        grants = self.grants()
        return id(grants), grants.version if grants is not None else -1, id(self.names)

    def settled(self) -> bool:
        """Whether this node can check its peers (has its view, or needs none)."""
        return not self.keyed or self.core.is_storage or self.view is not None

    def knows_own(self) -> bool:
        """Whether this node can check its own calls (``refuse_own``): it needs no view, or has one that names
        its key (a key just added to cluster/trusted/ is named from the storage nodes' next read of it)."""
        return not self.keyed or self.core.is_storage or (self.view is not None and self.core.public_key in self.names)

    def report(self) -> dict:
        """For status: whether this node checks identities, what it knows of the trusted keys and the peer grants,
        and its counts (``refused``: requests it refused for want of a grant; ``views``: views taken)."""
        grants = self.grants()
        return {"keyed": self.keyed, "trusted_clients": len(self.names),
                "grants": grants.count if grants is not None else None, **self.counters}

    # ------------------------------------------------------------------ the view (client nodes)
    def _refresh_view(self, key: Any, now_s: float) -> None:
        if key is None:  # (the periodic one; an immediate ask, key "now", does not start another period)
            self.out.schedule(now_s + (VIEW_REFRESH_S if self.view is not None else VIEW_FIRST_S), "acl_view", None)
        if self._asking or self.core.stopped:
            return
        peer = self.core.client.any_storage_peer()
        if peer is None:
            return
        self._asking = True

        def answered(message: wire.Message) -> None:
            self._asking = False
            self._take_view(message.body)

        def failed(error: MeshqError) -> None:
            self._asking = False  # the next period asks again

        self.out.request(peer, "acl_view", {}, (), now_s, self.config.request_timeout_s, answered, failed)

    def _take_view(self, body: dict) -> None:
        grants = acl.Acl()
        for grant in body["grants"]:
            if grant["permission"] in acl.PEER_PERMISSIONS:
                grants.apply({"action": "grant", **grant})
        names = dict(body["names"])
        changed = self.view is None or grants.listing() != self.view.listing() or names != self.names
        self.counters["views"] += 1
        if changed:  # (kept otherwise: ``stamp`` tells the caches of decisions taken with them when to go)
            self.view, self.names = grants, names
            self._run_holds()
            for callback in self._watchers:
                callback()

    def serve_view(self, route: Any, message: wire.Message, now_s: float) -> None:
        if not self.core.is_storage:
            raise NotLeaderError(f"node {self.node_id} is a client and holds no permissions")
        grants = [grant for grant in self.core.meta.acl.listing() if grant["permission"] in acl.PEER_PERMISSIONS]
        self.out.reply(route, message.request_id, "acl_view_ok", {"grants": grants, "names": self.names})

    def on_trusted(self, command: TrustedNames, now_s: float) -> None:
        """A storage node's runtime read ``cluster/trusted/`` (keys of clients, by name)."""
        names = {key: name for key, name in sorted(command.names.items())
                 if len(key) == 40 and acl.CLIENT_NAME.fullmatch(name)}
        self.names = dict(list(names.items())[:MAX_NAMES])

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
        granted = self.core.meta.acl.has(name, permission, pattern)
        # A grant this node holds already is proposed all the same (applying it again changes nothing): this
        # node's state may be behind a revoke committed elsewhere, and "already granted" must not be said of a
        # grant the cluster does not hold (simulator seed 6 with acl: a node back from a power loss).
        if body["action"] == "revoke" and not granted:
            raise UsageError(f"client {name!r} holds no grant {permission} {pattern!r}, nothing to revoke; "
                             f"`meshq acl list` shows the grants")
        command = {"op": "acl", "action": body["action"], "name": name, "permission": permission, "pattern": pattern}
        changed = body["action"] == "revoke" or not granted  # (a revoke of a grant not held was refused above)

        def done(error: MeshqError | None) -> None:
            if error is not None:
                self.out.reply_error(route, message.request_id, error)
            else:
                self.out.reply(route, message.request_id, "acl_change_ok", {"changed": changed})

        self.core.agreement.propose(command, now_s, now_s + self.config.request_timeout_s, done)

    def serve_list(self, route: Any, message: wire.Message, now_s: float) -> None:
        self.check_admin("list permissions")
        if not self.core.is_storage:
            raise NotLeaderError(f"node {self.node_id} is a client and holds no permissions")
        # Only the metadata leader that has committed an entry of its term knows every committed grant: another
        # node's state may lag (a node back from a restart applies what it learns from the leader), and a list
        # must never leave out a grant the cluster holds. The asker retries at the leader named here.
        raft = self.core.agreement.raft
        if raft is None or not raft.can_change_config():
            leader = raft.leader if raft is not None and raft.leader != self.node_id else None
            raise NotLeaderError(f"node {self.node_id} is not the metadata leader; ask "
                                 f"{leader or 'the leader once one is elected'}", leader=leader)
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
            type_, body = "acl_change", {"action": command.action, "name": name, "permission": permission,
                                         "pattern": pattern}
            convert: Any = lambda message: message.body["changed"]  # noqa: E731
        else:
            type_, body = "acl_list", {}
            convert = lambda message: message.body["grants"]  # noqa: E731
        peer = command.peer if isinstance(command, AclList) else None
        peer = peer or self.core.client.any_storage_peer()
        if isinstance(command, AclList):
            command.peer = None
        deadline_s = command.deadline_s
        assert deadline_s is not None
        if peer is None:
            if now_s + RETRY_S < deadline_s:
                self.out.schedule(now_s + RETRY_S, "acl_retry", command)
                return
            raise TimeoutError("no storage node is reachable: check --seed / mDNS, and that a `meshq node` is running")
        self.out.request(peer, type_, body, (), now_s, max(0.001, deadline_s - now_s),
                         lambda m: self.out.emit(Resolve(command.waiter, convert(m))),
                         lambda e: self._failed(command, e))

    def _failed(self, command: AclChange | AclList, error: MeshqError) -> None:
        """A list answered by a node that is not the metadata leader is asked again, at the leader it named."""
        now_s = self.core.now_s
        assert command.deadline_s is not None
        if isinstance(command, AclList) and isinstance(error, NotLeaderError) and now_s + RETRY_S < command.deadline_s:
            command.peer = error.leader
            self.out.schedule(now_s + RETRY_S, "acl_retry", command)
            return
        self.out.emit(Fail(command.waiter, error))
