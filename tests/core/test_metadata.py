"""Unit tests of the metadata state machine's reassignment rules (meshq.core.metadata)."""

from __future__ import annotations

import random

import pytest

from meshq.config import TopicConfig
from meshq.core.metadata import (
    REBUILD_EPOCH_CEILING,
    REBUILD_EPOCH_GAP,
    MetadataState,
    describe_rebuild,
    next_step,
    one_step,
)
from meshq.core.partitions.host import MAX_EPOCH
from meshq.core.ring import HashRing

MEMBERS = {n: {"address": f"tcp://127.0.0.1:{i}", "pub_address": ""} for i, n in enumerate("abcde")}


def state_with(members: list[str], replicas: list[list[str]]) -> MetadataState:
    meta = MetadataState()
    meta.apply(0, {"op": "config", "members": {m: MEMBERS[m] for m in members}})
    config = TopicConfig(name="t", partitions=len(replicas), replication_factor=3)
    meta.apply(1, {"op": "create_topic", "config": config.to_wire(), "assignment": replicas})
    return meta


def reassign(meta: MetadataState, version: int, replicas: list[str], learners: list[str]):
    return meta.apply(meta.applied_index + 1, {"op": "reassign", "topic": "t", "partition": 0, "version": version,
                                               "replicas": replicas, "learners": learners})


def test_reassign_is_a_compare_and_set_on_the_version():
    meta = state_with(["a", "b", "c", "d"], [["a", "b", "c"]])
    assert reassign(meta, 0, ["a", "b", "c"], ["d"]) == ("t", 0)
    assert meta.partition_config("t", 0) == (["a", "b", "c"], ["d"], 1)
    # the same step again (a retried proposal) and a step from an old version change nothing
    assert reassign(meta, 0, ["a", "b", "c", "d"], []) is None
    assert meta.partition_config("t", 0) == (["a", "b", "c"], ["d"], 1)
    assert reassign(meta, 1, ["a", "b", "c", "d"], []) == ("t", 0)
    assert meta.partition_config("t", 0) == (["a", "b", "c", "d"], [], 2)


@pytest.mark.parametrize("replicas, learners, why", [
    (["a", "d", "e"], [], "two voters swapped at once"),
    (["a"], [], "two voters dropped at once"),
    ([], [], "no voters"),
    (["a", "b", "c", "x"], [], "a voter that is not a member"),
    (["a", "b", "c"], ["x"], "a learner that is not a member"),
    (["a", "b", "c"], ["c"], "a learner that is also a voter"),
    (["a", "a", "b"], [], "a repeated voter"),
])
def test_reassign_refuses_anything_but_one_step(replicas, learners, why):
    meta = state_with(["a", "b", "c", "d", "e"], [["a", "b", "c"]])
    assert reassign(meta, 0, replicas, learners) is None, why
    assert meta.partition_config("t", 0) == (["a", "b", "c"], [], 0)


def test_one_step_allows_reordering_and_a_single_change():
    assert one_step(["a", "b", "c"], ["c", "b", "a"], [], MEMBERS)
    assert one_step(["a", "b", "c"], ["a", "b"], [], MEMBERS)
    assert one_step(["a", "b", "c"], ["a", "b", "c", "d"], [], MEMBERS)
    # a removed member may be dropped (it is no longer in the membership), not added
    assert one_step(["a", "b", "x"], ["a", "b"], [], MEMBERS)
    assert not one_step(["a", "b"], ["a", "b", "x"], [], MEMBERS)


def test_a_leaving_member_leaves_the_ring_but_stays_a_member():
    meta = state_with(["a", "b", "c", "d"], [["a", "b", "c"]])
    members = {m: dict(MEMBERS[m]) for m in "abcd"}
    members["d"]["leaving"] = True
    meta.apply(meta.applied_index + 1, {"op": "config", "members": members})
    assert "d" in meta.members and "d" not in meta.ring
    config = TopicConfig(name="u", partitions=16, replication_factor=3)
    assert all("d" not in replicas for replicas in meta.assign(config))


def drive(voters, learners, target, members, rounds=20, dead=(), leader=None):
    """Apply next_step until it has nothing left to do, every replica caught up at once
    (except ``dead``); returns the configurations seen. Checks one_step on every step."""
    seen = [(list(voters), list(learners))]
    leader = leader or voters[0]
    for _ in range(rounds):
        alive = {n for n in voters + learners if n not in dead}
        step = next_step(voters, learners, target, members, caught_up=alive, in_contact=alive, self_id=leader)
        if step is None:
            return seen
        assert one_step(voters, step[0], step[1], members), (voters, step)
        voters, learners = step
        seen.append((list(voters), list(learners)))
        if leader not in voters:
            raise AssertionError(f"the leader {leader} dropped itself: {seen}")
        if voters[0] != leader and leader not in target:
            leader = voters[0]  # the hand-off to the preferred replica
    raise AssertionError(f"no fixed point after {rounds} steps: {seen}")


def test_a_join_adds_a_learner_promotes_it_then_drops_the_replaced_replica():
    seen = drive(["a", "b", "c"], [], ["d", "a", "b"], MEMBERS)
    assert seen == [
        (["a", "b", "c"], []),
        (["a", "b", "c"], ["d"]),          # d copies the log without voting
        (["d", "a", "b", "c"], []),        # caught up: a voter, first in target order
        (["d", "a", "b"], []),             # every target replica caught up: c goes
    ]


def test_a_dead_removed_member_is_dropped_before_its_replacement_is_added():
    members = {m: MEMBERS[m] for m in "abd"}  # c was removed from the membership
    seen = drive(["a", "b", "c"], [], ["a", "b", "d"], members, dead={"c"})
    assert seen[1] == (["a", "b"], [])
    assert seen[-1] == (["a", "b", "d"], [])


def test_a_leaving_leader_hands_over_before_it_is_dropped():
    # a leads but is leaving: it reorders so b is preferred, and never proposes its own removal
    step = next_step(["a", "b", "c"], [], ["b", "c", "d"], MEMBERS, {"a", "b", "c"}, {"a", "b", "c"}, "a")
    assert step == (["a", "b", "c"], ["d"])
    step = next_step(["a", "b", "c", "d"], [], ["b", "c", "d"], MEMBERS, {"a", "b", "c", "d"},
                     {"a", "b", "c", "d"}, "a")
    assert step == (["b", "c", "d", "a"], [])
    assert next_step(["b", "c", "d", "a"], [], ["b", "c", "d"], MEMBERS, {"a", "b", "c", "d"},
                     {"a", "b", "c", "d"}, "a") is None
    # once b leads, it drops a
    assert next_step(["b", "c", "d", "a"], [], ["b", "c", "d"], MEMBERS, {"a", "b", "c", "d"},
                     {"a", "b", "c", "d"}, "b") == (["b", "c", "d"], [])


def test_a_replica_is_dropped_only_when_every_target_replica_is_caught_up():
    # d is a voter but lagging: c stays
    assert next_step(["d", "a", "b", "c"], [], ["d", "a", "b"], MEMBERS, {"a", "b", "c"}, {"a", "b", "c", "d"},
                     "a") is None
    # a learner that has not caught up is not promoted
    assert next_step(["a", "b", "c"], ["d"], ["d", "a", "b"], MEMBERS, {"a", "b", "c"}, {"a", "b", "c", "d"},
                     "a") is None


def test_unwanted_learners_are_dropped_first():
    members = {m: MEMBERS[m] for m in "abc"}
    assert next_step(["a", "b", "c"], ["d"], ["a", "b", "c"], members, {"a"}, {"a"}, "a") == (["a", "b", "c"], [])


@pytest.mark.parametrize("seed", range(30))
def test_random_membership_changes_reach_the_ring_placement_in_single_steps(seed):
    rng = random.Random(seed)
    pool = [f"n{i}" for i in range(7)]
    before = sorted(rng.sample(pool, rng.randint(1, 5)))
    after = sorted(rng.sample(pool, rng.randint(1, 5)))
    members = {n: {"address": n} for n in after}
    rf = rng.randint(1, 3)
    voters = HashRing(before).replicas("t", 0, min(rf, len(before)))
    target = HashRing(after).replicas("t", 0, min(rf, len(after)))
    dead = {n for n in voters if n not in after}
    leader = next((n for n in voters if n not in dead), None)
    if leader is None:
        return  # every replica gone: nothing can move it (documented: the partition is lost)
    seen = drive(list(voters), [], target, members, rounds=40, dead=dead, leader=leader)
    assert seen[-1] == (target, []), seen


GAP = 1 << 24


def rebuild(meta: MetadataState, **changes):
    command = {**meta.rebuild_command("t", 0, (4, 10, 0)), **changes}
    return meta.apply(meta.applied_index + 1, command)


def test_a_partition_is_lost_only_once_none_of_its_voters_is_a_member():
    meta = state_with(["a", "b", "c"], [["a"], ["b", "c"]])
    assert meta.lost_partitions() == []
    meta.apply(meta.applied_index + 1, {"op": "config", "members": {m: MEMBERS[m] for m in ["b", "c", "d"]}})
    assert meta.lost_partitions() == [("t", 0)]
    meta.apply(meta.applied_index + 1, {"op": "config", "members": {m: MEMBERS[m] for m in ["b", "d"]}})
    assert meta.lost_partitions() == [("t", 0)]  # b still holds partition 1


def test_rebuild_starts_past_the_reported_end_above_the_known_epoch_and_says_what_was_lost():
    meta = state_with(["a", "b", "c"], [["a"]])
    meta.apply(meta.applied_index + 1, {"op": "config", "members": {m: MEMBERS[m] for m in ["b", "c"]}})
    command = meta.rebuild_command("t", 0, (4, 10, 3))
    assert (command["first"], command["end"], command["start"], command["epoch"]) == (0, 10, 10 + GAP,
                                                                                      4 + REBUILD_EPOCH_GAP)
    assert command["replicas"] == meta.target("t", 0)
    assert meta.apply(meta.applied_index + 1, command) == ("t", 0)
    assert meta.partition_config("t", 0) == (command["replicas"], [], 1)
    assert meta.rebuilds[("t", 0)] == {"version": 1, "epoch": 4 + REBUILD_EPOCH_GAP, "start": 10 + GAP, "first": 0,
                                       "end": 10}
    assert describe_rebuild(meta.rebuilds[("t", 0)]) == (
        f"offsets 0..9 are lost; offsets 10..{10 + GAP - 1} are lost too if they were handed out after the last report")
    assert meta.lost_partitions() == []
    # the same command again (a retried proposal) changes nothing: the version moved on
    assert meta.apply(meta.applied_index + 1, command) is None


def test_rebuild_starts_past_twice_the_largest_growth_between_reports_when_that_is_more_than_the_gap():
    meta = state_with(["a", "b", "c"], [["a"]])
    meta.apply(meta.applied_index + 1, {"op": "config", "members": {m: MEMBERS[m] for m in ["b", "c"]}})
    assert meta.rebuild_command("t", 0, (4, 10, GAP))["start"] == 10 + 2 * GAP


def test_a_second_rebuild_never_starts_below_the_first_and_says_when_nothing_was_heard():
    meta = state_with(["a", "b", "c", "d"], [["a"]])
    meta.apply(meta.applied_index + 1, {"op": "config", "members": {m: MEMBERS[m] for m in ["b", "c", "d"]}})
    rebuild(meta, replicas=["b"])  # from 10 + GAP
    meta.apply(meta.applied_index + 1, {"op": "config", "members": {m: MEMBERS[m] for m in ["c", "d"]}})
    older = meta.rebuild_command("t", 0, (2, 3, 0))  # an end below the first rebuild's start
    # past the first rebuild's epoch (above the epoch heard of, 2) by the gap
    assert (older["first"], older["end"], older["start"], older["epoch"]) == (10 + GAP, 10 + GAP, 10 + 2 * GAP,
                                                                              4 + 2 * REBUILD_EPOCH_GAP)
    # a command that would hand out offsets again, or reuse an epoch, is refused and changes nothing
    assert meta.apply(meta.applied_index + 1, {**older, "start": 9}) is None
    assert meta.apply(meta.applied_index + 1, {**older, "epoch": 4 + REBUILD_EPOCH_GAP}) is None
    assert meta.apply(meta.applied_index + 1, {**older, "replicas": ["a"]}) is None  # not a member
    assert meta.partition_config("t", 0) == (["b"], [], 1)
    assert meta.apply(meta.applied_index + 1, {**older, "replicas": ["c"]}) == ("t", 0)
    meta.apply(meta.applied_index + 1, {"op": "config", "members": {m: MEMBERS[m] for m in ["d"]}})
    nothing_heard = meta.rebuild_command("t", 0, None)
    assert (nothing_heard["end"], nothing_heard["start"]) == (None, 10 + 3 * GAP)
    assert meta.apply(meta.applied_index + 1, nothing_heard) == ("t", 0)
    assert meta.partition_config("t", 0) == (["d"], [], 3)
    assert describe_rebuild(meta.rebuilds[("t", 0)]).startswith("no leader of it was ever heard from")


def test_a_rebuilt_epoch_leaves_room_for_the_elections_an_old_copy_holds_unheard():
    """The epoch heard of is a floor: the lost copy's node, removed for good, may have been elected
    again after its last report reached us (or never reported), and goes on electing itself on its
    old configuration when it comes back. Had the rebuild started one epoch above, its leader and
    the old copy's met in one epoch (simulator seeds 35, 36, 37, 39 of test_rebuild_sim.py)."""
    meta = state_with(["a", "b", "c"], [["a"]])
    meta.apply(meta.applied_index + 1, {"op": "config", "members": {m: MEMBERS[m] for m in ["b", "c"]}})
    assert meta.rebuild_command("t", 0, None)["epoch"] == REBUILD_EPOCH_GAP  # nothing heard: the copy is at >= 1
    assert meta.rebuild_command("t", 0, (7, 10, 0))["epoch"] == 7 + REBUILD_EPOCH_GAP
    # near the top of the 31-bit epoch space the gap shrinks to what fits: the rebuilt replica must
    # still be able to stand for its epoch + 1, which peers accept up to MAX_EPOCH
    assert REBUILD_EPOCH_CEILING + 1 == MAX_EPOCH
    high = REBUILD_EPOCH_CEILING - 10
    assert meta.rebuild_command("t", 0, (high, 10, 0))["epoch"] == REBUILD_EPOCH_CEILING
    assert meta.rebuild_command("t", 0, (REBUILD_EPOCH_CEILING, 10, 0))["epoch"] == REBUILD_EPOCH_CEILING + 1


def test_a_rebuild_is_refused_while_a_voter_is_still_a_member():
    meta = state_with(["a", "b", "c"], [["a", "b"]])
    meta.apply(meta.applied_index + 1, {"op": "config", "members": {m: MEMBERS[m] for m in ["b", "c"]}})
    command = {"op": "rebuild", "topic": "t", "partition": 0, "version": 0, "replicas": ["c"], "epoch": 1,
               "first": 0, "end": 0, "start": GAP}
    assert meta.apply(meta.applied_index + 1, command) is None
    assert meta.partition_config("t", 0) == (["a", "b"], [], 0) and meta.rebuilds == {}
