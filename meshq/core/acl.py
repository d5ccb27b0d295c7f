"""Permissions per client key: the grants, their rules, and the one check every serving room calls.

Theory of operation
-------------------
A *grant* is ``(name, permission, pattern)``: client ``name`` (as given to ``meshq keygen
--client``) may do ``permission`` on every topic, subject or service the pattern matches.
Patterns follow the pub/sub rules (``meshq.core.pubsub.subjects``): dot-separated tokens, ``*``
one token, ``>`` the rest (one or more tokens), and are matched with the same ``matches``.

=============================  =========================  ======================================
permission                     on                         needed for
=============================  =========================  ======================================
``produce``                    topic                      produce
``consume``                    topic                      fetch, list_offsets, offsets, groups,
                                                          shared subscriptions
``admin``                      topic                      create a topic (also auto-creation)
``publish`` / ``subscribe``    subject                    pub/sub (checked by the nodes that send
                                                          and receive the data: docs/protocol.md)
``request`` / ``serve``        service                    request/reply (see docs/protocol.md)
=============================  =========================  ======================================

Grants live in the agreed metadata (``MetadataState.acl``): ``{"op": "acl", "action":
"grant"|"revoke", "name", "permission", "pattern"}`` commands, applied in log order on every
storage node, so every node holds the same grants, and a restart replays them.

Who asks (``caller``) is what the runtime read from the request's ZAP ``User-Id``: a client's
name, ``CLUSTER`` for a peer holding the cluster key (a storage node: fully trusted), or
``None`` when the node has no keys (nothing to check: without keys there is no identity) and
for the node's own requests to itself. The client ``admin`` holds every permission.
"""

from __future__ import annotations

import re
from typing import Any

from meshq.core.pubsub.subjects import matches, validate_pattern
from meshq.errors import AuthorizationError, InvalidSubjectError, UsageError

ADMIN = "admin"  # the client made by ``meshq keygen DIR``: every permission
CLUSTER = "@cluster"  # the identity of a peer holding the cluster key ('@' is not allowed in client names)
UNKNOWN = "@unknown"  # a keyed request without a User-Id (cannot happen on CURVE): no grant names it
KEY_PREFIX = "@key:"  # a trusted key that is no client of ``trusted/`` (a client member, seen by a client node)
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PERMISSIONS: dict[str, str] = {"produce": "topic", "consume": "topic", "admin": "topic",
                               "publish": "subject", "subscribe": "subject",
                               "request": "service", "serve": "service"}
MAX_GRANTS = 10_000  # per cluster: bounds the metadata a grant can grow
# Permissions client nodes check among themselves (``meshq.core.cluster.access``: the storage nodes serve
# client nodes these grants and the names of the trusted client keys, ``acl_view``): request/reply between
# client nodes, and pub/sub data, which flows between any two nodes without a storage node on its path.
PEER_PERMISSIONS = ("request", "serve", "publish", "subscribe")


def overlaps(a: str, b: str) -> bool:
    """Whether two valid patterns match at least one common subject (``*``: one token, ``>``: one or more)."""
    ta, tb = a.split("."), b.split(".")
    i = 0
    while i < len(ta) and i < len(tb):
        x, y = ta[i], tb[i]
        if x == ">" or y == ">":
            return True  # (each side has at least one token left here, which '>' takes with the rest)
        if x != y and x != "*" and y != "*":
            return False
        i += 1
    return len(ta) == len(tb)


def validate_grant(name: Any, permission: Any, pattern: Any) -> tuple[str, str, str]:
    """``(name, permission, pattern)`` if they form a valid grant, else ``UsageError`` naming the rule."""
    if not isinstance(name, str) or not CLIENT_NAME.fullmatch(name):
        raise UsageError(f"client name {name!r}: give the NAME used with `meshq keygen DIR --client NAME` "
                         f"(1-64 letters, digits, '.', '_' or '-')")
    if name == ADMIN:
        raise UsageError("the client 'admin' holds every permission already; grants to it are not kept")
    if permission not in PERMISSIONS:
        raise UsageError(f"unknown permission {permission!r}: give one of {', '.join(PERMISSIONS)}")
    try:
        validate_pattern(pattern)
    except InvalidSubjectError as exc:
        raise UsageError(f"{exc} (a {PERMISSIONS[permission]} pattern follows the subject rules: e.g. "
                         f"'orders.>', 'orders.*', 'orders')") from None
    return name, permission, pattern


class Acl:
    """The grants of one cluster (applied metadata): ``{name: {permission: {pattern}}}``."""

    def __init__(self) -> None:
        self._grants: dict[str, dict[str, set[str]]] = {}
        self.count = 0
        self.version = 0  # changes applied (caches of decisions taken with these grants compare it)

    def apply(self, command: dict) -> bool:
        """Apply one committed ``acl`` command; returns whether anything changed. A malformed one (only a
        hostile or buggy leader could commit it) and a grant beyond ``MAX_GRANTS`` change nothing."""
        try:
            name, permission, pattern = validate_grant(command.get("name"), command.get("permission"),
                                                       command.get("pattern"))
        except UsageError:
            return False
        action = command.get("action")
        patterns = self._grants.get(name, {}).get(permission, set())
        if action == "grant":
            if pattern in patterns or self.count >= MAX_GRANTS:
                return False
            self._grants.setdefault(name, {}).setdefault(permission, set()).add(pattern)
            self.count += 1
            self.version += 1
            return True
        if action == "revoke" and pattern in patterns:
            patterns.discard(pattern)
            self.count -= 1
            self.version += 1
            if not patterns:
                del self._grants[name][permission]
                if not self._grants[name]:
                    del self._grants[name]
            return True
        return False

    def has(self, name: str, permission: str, pattern: str) -> bool:
        """Whether exactly this grant is held (what a revoke can remove)."""
        return pattern in self._grants.get(name, {}).get(permission, ())

    def allows(self, name: str, permission: str, resource: str) -> bool:
        if name == ADMIN:
            return True
        return any(matches(pattern, resource) for pattern in self._grants.get(name, {}).get(permission, ()))

    def allows_some(self, name: str, permission: str, pattern: str) -> bool:
        """Whether a grant of ``permission`` to ``name`` matches some subject ``pattern`` matches (a subscription
        to ``pattern`` can receive anything)."""
        if name == ADMIN:
            return True
        return any(overlaps(grant, pattern) for grant in self._grants.get(name, {}).get(permission, ()))

    def covers(self, name: str, permission: str, pattern: str) -> bool:
        """Whether one grant of ``permission`` to ``name`` matches every subject ``pattern`` matches (a
        subscription needs this: ``subscribe`` on 'a.>' covers 'a.*', 'a.*' does not cover 'a.>')."""
        if name == ADMIN:
            return True
        return any(pattern_covers(grant, pattern) for grant in self._grants.get(name, {}).get(permission, ()))

    def listing(self) -> list[dict]:
        """Every grant, sorted by name, permission, pattern."""
        return [{"name": name, "permission": permission, "pattern": pattern}
                for name in sorted(self._grants) for permission in sorted(self._grants[name])
                for pattern in sorted(self._grants[name][permission])]


def pattern_covers(grant: str, pattern: str) -> bool:
    """Whether every subject ``pattern`` matches is matched by ``grant`` (both valid patterns)."""
    grant_tokens = grant.split(".")
    tokens = pattern.split(".")
    for index, token in enumerate(grant_tokens):
        if token == ">":
            return len(tokens) > index  # the rest: one or more tokens of any kind
        if index >= len(tokens):
            return False
        if tokens[index] == ">":
            return False  # any number of tokens, which one grant token cannot cover
        if token != "*" and token != tokens[index]:
            return False  # (a literal covers only itself; '*' covers a literal or '*')
    return len(tokens) == len(grant_tokens)


def authorize_pattern(acl: Acl, caller: str | None, permission: str, pattern: str) -> None:
    """As ``authorize``, for a pattern (a subscription): one grant must cover all of it."""
    if caller is None or caller == CLUSTER or acl.covers(caller, permission, pattern):
        return
    raise AuthorizationError(
        f"client {caller!r} may not {permission} {pattern!r}: no grant of {permission} covers every subject it "
        f"matches; the admin can grant it with `meshq acl grant {caller} {permission} PATTERN --keys "
        f"DIR/clients/admin` (or subscribe to a narrower pattern)")


def authorize(acl: Acl, caller: str | None, permission: str, resource: str) -> None:
    """Raise ``AuthorizationError`` unless ``caller`` may do ``permission`` on ``resource`` (see the module
    docstring for who ``caller`` is)."""
    if caller is None or caller == CLUSTER or acl.allows(caller, permission, resource):
        return
    kind = PERMISSIONS[permission]
    raise AuthorizationError(
        f"client {caller!r} may not {permission} {kind} {resource!r}: no grant of {permission} matches it; the "
        f"admin can grant it with `meshq acl grant {caller} {permission} PATTERN --keys DIR/clients/admin`")


def require_admin(caller: str | None, what: str) -> None:
    """Raise ``AuthorizationError`` unless ``caller`` is the admin client, a storage node or unkeyed."""
    if caller is None or caller in (CLUSTER, ADMIN):
        return
    raise AuthorizationError(f"client {caller!r} may not {what}: only the admin key (DIR/clients/admin) may; run "
                             f"the command with --keys DIR/clients/admin")


def require_node(caller: str | None, what: str) -> None:
    """Raise ``AuthorizationError`` unless ``caller`` holds the cluster key (or the node is unkeyed): for what only
    storage nodes send each other (Raft, replication, repair; a hello claiming the storage role)."""
    if caller is None or caller == CLUSTER:
        return
    raise AuthorizationError(f"{what}: only a node holding the cluster key (a storage node) may send this; client "
                             f"{caller!r} may not")
