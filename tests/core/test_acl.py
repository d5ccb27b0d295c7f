"""Unit tests of the permission rules (meshq.core.acl) and their place in the metadata state machine."""

from __future__ import annotations

import pytest

from meshq.core.acl import ADMIN, CLUSTER, MAX_GRANTS, Acl, authorize, require_admin, require_node, validate_grant
from meshq.core.metadata import MetadataState
from meshq.errors import AuthorizationError, MeshqError, UsageError


def grant(name: str, permission: str, pattern: str, action: str = "grant") -> dict:
    return {"op": "acl", "action": action, "name": name, "permission": permission, "pattern": pattern}


@pytest.mark.parametrize(("pattern", "topic", "allowed"), [
    ("orders.>", "orders.eu", True), ("orders.>", "orders.eu.paris", True), ("orders.>", "orders", False),
    ("orders.*", "orders.eu", True), ("orders.*", "orders.eu.paris", False), ("orders", "orders", True),
    ("orders", "orders2", False), (">", "anything", True), ("*.eu", "orders.eu", True)])
def test_a_grant_matches_topics_with_the_subject_wildcard_rules(pattern, topic, allowed):
    acl = Acl()
    assert acl.apply(grant("alice", "produce", pattern))
    assert acl.allows("alice", "produce", topic) is allowed
    assert not acl.allows("alice", "consume", topic)  # a grant is per permission
    assert not acl.allows("bob", "produce", topic)  # and per client


def test_grant_and_revoke_are_idempotent_and_listed_sorted():
    acl = Acl()
    assert acl.apply(grant("bob", "consume", "b.>"))
    assert acl.apply(grant("alice", "produce", "a.>"))
    assert not acl.apply(grant("alice", "produce", "a.>"))  # already held
    assert acl.listing() == [{"name": "alice", "permission": "produce", "pattern": "a.>"},
                             {"name": "bob", "permission": "consume", "pattern": "b.>"}]
    assert acl.apply(grant("alice", "produce", "a.>", "revoke"))
    assert not acl.apply(grant("alice", "produce", "a.>", "revoke"))  # nothing left to revoke
    assert not acl.allows("alice", "produce", "a.x")
    assert acl.count == 1 and acl.listing() == [{"name": "bob", "permission": "consume", "pattern": "b.>"}]


@pytest.mark.parametrize(("name", "permission", "pattern"), [
    ("al ice", "produce", "a"), ("@cluster", "produce", "a"), ("admin", "produce", "a"), ("alice", "write", "a"),
    ("alice", "produce", "a.>.b"), ("alice", "produce", "a..b"), ("alice", "produce", ""), ("", "produce", "a")])
def test_a_malformed_grant_is_refused_with_the_rule_and_changes_nothing(name, permission, pattern):
    with pytest.raises(UsageError):
        validate_grant(name, permission, pattern)
    acl = Acl()
    assert not acl.apply(grant(name, permission, pattern))
    assert acl.listing() == [] and acl.count == 0


def test_grants_stop_at_the_bound():
    acl = Acl()
    for i in range(MAX_GRANTS):
        assert acl.apply(grant("alice", "produce", f"t{i}"))
    assert not acl.apply(grant("alice", "produce", "one-more"))
    assert acl.count == MAX_GRANTS


def test_who_is_checked_admin_and_storage_nodes_hold_everything_unkeyed_nodes_check_nothing():
    acl = Acl()
    acl.apply(grant("alice", "produce", "orders.>"))
    for caller in (None, CLUSTER, ADMIN):
        authorize(acl, caller, "admin", "anything")
    authorize(acl, "alice", "produce", "orders.eu")
    with pytest.raises(AuthorizationError) as refused:
        authorize(acl, "alice", "produce", "payments")
    assert isinstance(refused.value, MeshqError) and not refused.value.retriable
    text = str(refused.value)
    assert "'alice'" in text and "produce" in text and "'payments'" in text and "meshq acl grant alice" in text
    with pytest.raises(AuthorizationError, match="only the admin key"):
        require_admin("alice", "grant permissions")
    require_admin(ADMIN, "x"), require_admin(CLUSTER, "x"), require_admin(None, "x")
    with pytest.raises(AuthorizationError, match="only a node holding the cluster key"):
        require_node(ADMIN, "raft_append")
    require_node(CLUSTER, "raft_append"), require_node(None, "raft_append")


def test_the_metadata_applies_acl_commands_in_log_order_and_a_replay_gives_the_same_grants():
    log = [grant("alice", "produce", "orders.>"), grant("bob", "consume", ">"), {"op": "noop"},
           grant("alice", "produce", "orders.>", "revoke"), grant("alice", "consume", "orders.*"),
           grant("x y", "produce", "a")]  # malformed: skipped by every node alike
    first, replayed = MetadataState(), MetadataState()
    for index, command in enumerate(log):
        first.apply(index, command)
    for index, command in enumerate(log):
        replayed.apply(index, command)
    assert first.acl.listing() == replayed.acl.listing() == [
        {"name": "alice", "permission": "consume", "pattern": "orders.*"},
        {"name": "bob", "permission": "consume", "pattern": ">"}]


@pytest.mark.parametrize("a, b, common", [
    ("orders.>", "orders.eu", True), ("orders.>", "orders", False), ("orders.*", "orders.eu.x", False),
    ("*.eu", "orders.*", True), (">", "a.b.c", True), ("a.b", "a.c", False), ("a.*.c", "a.b.>", True),
    ("a.b.>", "a.*", False), ("a", "a", True), ("a.*", "*.b", True)])
def test_pattern_overlap(a, b, common):
    from meshq.core.acl import overlaps

    assert overlaps(a, b) is common and overlaps(b, a) is common


def test_subscribe_grants_cover_a_pattern_if_they_share_a_subject():
    from meshq.core.acl import Acl

    grants = Acl()
    grants.apply({"action": "grant", "name": "bob", "permission": "subscribe", "pattern": "orders.eu.>"})
    assert grants.allows_some("bob", "subscribe", "orders.>")  # can receive orders.eu.x
    assert not grants.allows_some("bob", "subscribe", "orders.us.*")
    assert not grants.allows_some("bob", "publish", "orders.eu.x")
    assert grants.allows_some("admin", "subscribe", "anything")
