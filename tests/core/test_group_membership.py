"""The coordinator's pure group state (meshq.core.partitions.coordinator.GroupMembership)."""

from __future__ import annotations

import itertools

import pytest

from meshq.core.partitions.coordinator import GroupMembership, Member, assign_range
from meshq.errors import RebalanceError, StaleGenerationError, UnknownMemberError

SESSION_S = 4.0
SEQ = itertools.count()  # join numbers: growing for every member (each join is a fresh one)


def group(**kwargs) -> GroupMembership:
    return GroupMembership("g", SESSION_S, **kwargs)


def stable_with(g: GroupMembership, *members: str, now_s: float = 0.0, partitions: int = 6) -> None:
    """Join ``members`` and let each rejoin until the group is stable."""
    for m in members:
        g.join(m, "t", partitions, now_s, seq=next(SEQ))
    for m in members:
        g.join(m, "t", partitions, now_s, seq=next(SEQ))
    assert g.state == "stable"


def test_the_first_member_gets_every_partition_at_once():
    g = group(generation=1_000_000)
    answer = g.join("a", "t", 6, 0.0, seq=next(SEQ))
    assert (answer.state, answer.generation, answer.partitions) == ("stable", 1_000_001, [0, 1, 2, 3, 4, 5])


def test_a_new_member_starts_a_rebalance_that_completes_only_when_every_member_rejoined():
    g = group()
    g.join("a", "t", 6, 0.0, seq=next(SEQ))
    first = g.generation
    answer = g.join("b", "t", 6, 1.0, seq=next(SEQ))
    assert (answer.state, g.state, g.generation) == ("rebalancing", "rebalancing", first)
    assert g.assignment == {"a": [0, 1, 2, 3, 4, 5]}  # a still holds them until it lets go
    assert g.heartbeat("a", 1.5) == ("rebalancing", first)  # a learns of it at its next heartbeat
    assert g.join("b", "t", 6, 1.6, seq=next(SEQ)).state == "rebalancing"  # b waits for a
    answer = g.join("a", "t", 6, 2.0, seq=next(SEQ))  # a let go and rejoined: the new generation goes out
    assert (answer.state, answer.generation, answer.partitions) == ("stable", first + 1, [0, 1, 2])
    assert g.join("b", "t", 6, 2.1, seq=next(SEQ)).partitions == [3, 4, 5]


def test_assignment_is_range_over_sorted_member_ids_and_deterministic():
    members = {m: Member(m, "t", 6, 0.0, True) for m in ("c", "a", "b")}
    assert assign_range(members) == {"a": [0, 1], "b": [2, 3], "c": [4, 5]}
    members = {m: Member(m, "t", 5, 0.0, True) for m in ("a", "b", "c", "d", "e", "f", "g")}
    assignment = assign_range(members)
    assert sorted(p for ps in assignment.values() for p in ps) == [0, 1, 2, 3, 4]
    assert sum(1 for ps in assignment.values() if not ps) == 2  # more members than partitions: some idle


def test_members_of_different_topics_split_each_topic_among_themselves():
    members = {"a": Member("a", "t", 4, 0.0, True), "b": Member("b", "u", 2, 0.0, True),
               "c": Member("c", "t", 4, 0.0, True)}
    assert assign_range(members) == {"a": [0, 1], "b": [0, 1], "c": [2, 3]}


def test_a_member_whose_session_ends_is_evicted_and_the_others_rebalance():
    g = group()
    stable_with(g, "a", "b")
    generation = g.generation
    g.heartbeat("a", 3.0)
    assert g.expire(3.9) == []
    assert g.expire(4.0) == ["b"]  # b's last join was at 0.0
    assert g.state == "rebalancing" and g.generation == generation
    assert g.assignment == {"a": [0, 1, 2]}  # the evicted member's partitions are no longer held
    assert g.join("a", "t", 6, 4.1, seq=next(SEQ)).partitions == [0, 1, 2, 3, 4, 5]
    assert g.generation == generation + 1


def test_a_member_that_does_not_rejoin_within_the_session_of_a_rebalance_is_removed():
    g = group()
    stable_with(g, "a", "b")
    g.join("c", "t", 6, 10.0, seq=next(SEQ))  # rebalance begins at 10.0
    for t in (11.0, 12.0, 13.0, 14.0):  # b heartbeats but never rejoins (its user code never polls)
        g.heartbeat("b", t)
        g.join("a", "t", 6, t, seq=next(SEQ))
        g.join("c", "t", 6, t, seq=next(SEQ))
    assert g.state == "rebalancing"
    assert g.next_deadline() == 14.0
    assert g.expire(14.0) == ["b"]
    assert g.state == "stable" and set(g.assignment) == {"a", "c"}


def test_a_leave_rebalances_at_once_and_the_last_leave_empties_the_group():
    g = group()
    stable_with(g, "a", "b")
    assert g.leave("b", 1.0) is True
    assert g.state == "rebalancing"
    assert g.join("a", "t", 6, 1.1, seq=next(SEQ)).partitions == [0, 1, 2, 3, 4, 5]
    assert g.leave("b", 1.2) is False
    assert g.leave("a", 1.3) is True
    assert (g.state, g.members, g.assignment) == ("empty", {}, {})


def test_a_commit_from_a_stale_generation_or_an_unknown_member_is_refused_with_a_rebalance_error():
    g = group()
    stable_with(g, "a", "b")
    generation = g.generation
    g.check_commit("a", generation, [("t", 0), ("t", 2)])
    with pytest.raises(StaleGenerationError, match="generation"):
        g.check_commit("a", generation - 1, [("t", 0)])
    with pytest.raises(StaleGenerationError, match="does not hold t/3"):
        g.check_commit("a", generation, [("t", 3)])  # b's partition
    with pytest.raises(UnknownMemberError, match="not a member"):
        g.check_commit("z", generation, [("t", 0)])
    assert issubclass(StaleGenerationError, RebalanceError) and RebalanceError.retriable


def test_commits_of_the_current_generation_are_accepted_while_the_members_let_go():
    g = group()
    stable_with(g, "a", "b")
    generation = g.generation
    g.join("c", "t", 6, 1.0, seq=next(SEQ))
    g.check_commit("a", generation, [("t", 1)])  # a commits before it lets go: still its partition
    g.join("a", "t", 6, 1.1, seq=next(SEQ))
    g.join("b", "t", 6, 1.2, seq=next(SEQ))
    with pytest.raises(StaleGenerationError):
        g.check_commit("a", generation, [("t", 1)])  # the generation moved on


def test_a_new_coordinator_completes_no_rebalance_before_its_fence():
    g = group(generation=3_000_000, fence_until_s=14.0)
    assert g.join("a", "t", 6, 10.0, seq=next(SEQ)).state == "rebalancing"
    assert g.next_deadline() == 14.0
    g.expire(13.9)
    assert g.join("a", "t", 6, 13.9, seq=next(SEQ)).state == "rebalancing"  # asks again while it waits
    g.expire(14.0)
    assert (g.state, g.generation) == ("stable", 3_000_001)
    assert g.join("a", "t", 6, 14.1, seq=next(SEQ)).partitions == [0, 1, 2, 3, 4, 5]


def test_a_heartbeat_of_an_unknown_member_is_refused():
    g = group()
    with pytest.raises(UnknownMemberError):
        g.heartbeat("a", 0.0)


def test_a_member_changing_its_partition_count_rebalances():
    g = group()
    stable_with(g, "a")
    generation = g.generation
    assert g.join("a", "t", 8, 1.0, seq=next(SEQ)).partitions == list(range(8))
    assert g.generation == generation + 1



def test_a_join_delayed_past_the_answer_that_handed_out_the_partitions_does_not_count_as_a_rejoin():
    """Seed 241 (heavy pauses): a's join #5 is held by a paused coordinator; a gives up on it, joins
    again (#6) and is handed every partition; then b starts a rebalance and a's delayed #5 arrives.
    It was sent before a held anything, so it shows nothing about a having let go."""
    g = group()
    assert g.join("a", "t", 6, 0.0, seq=6).partitions == [0, 1, 2, 3, 4, 5]
    generation = g.generation
    g.join("b", "t", 6, 1.0, seq=0)  # rebalance begins
    assert g.join("a", "t", 6, 1.1, seq=5).state == "rebalancing"  # the delayed join
    assert not g.members["a"].rejoined and g.state == "rebalancing" and g.generation == generation
    assert g.assignment["a"] == [0, 1, 2, 3, 4, 5]  # a still holds them
    assert g.join("a", "t", 6, 1.2, seq=6).state == "rebalancing"  # a duplicate of the handing join: neither
    assert g.join("b", "t", 6, 1.3, seq=1).state == "rebalancing"  # b waits for a
    assert g.heartbeat("a", 1.4) == ("rebalancing", generation)  # a learns of it, lets go, joins again
    answer = g.join("a", "t", 6, 1.5, seq=7)
    assert (answer.state, answer.generation, answer.partitions) == ("stable", generation + 1, [0, 1, 2])


def test_a_join_without_an_order_counts_as_a_rejoin_only_of_a_member_that_holds_nothing():
    g = group()
    g.join("a", "t", 6, 0.0)  # no seq (a member that names no order): handed every partition
    g.join("b", "t", 6, 1.0)  # b holds nothing of this generation: its join counts
    assert g.members["b"].rejoined
    assert g.join("a", "t", 6, 1.1).state == "rebalancing" and not g.members["a"].rejoined
    g.heartbeat("b", 4.5)
    assert g.expire(5.0) == ["a"]  # never shown to have let go: removed at the rebalance deadline
    assert (g.state, g.assignment) == ("stable", {"b": [0, 1, 2, 3, 4, 5]})


def test_a_member_handed_nothing_in_this_generation_rejoins_with_any_join():
    g = group()
    g.join("a", "t", 1, 0.0, seq=0)
    g.join("b", "t", 1, 0.1, seq=0)
    g.join("a", "t", 1, 0.2, seq=1)
    assert g.assignment == {"a": [], "b": [0]}
    assert g.join("a", "t", 1, 0.3, seq=2).partitions == []  # a is told: nothing for it
    assert g.join("b", "t", 1, 0.3, seq=1).partitions == [0]
    g.join("c", "t", 1, 1.0, seq=0)  # rebalance
    g.join("a", "t", 1, 1.1, seq=0)  # an old join of a: a holds nothing, so it counts anyway
    g.join("b", "t", 1, 1.1, seq=0)  # an old join of b, which holds t/0: it does not
    assert g.members["a"].rejoined and not g.members["b"].rejoined


def test_handed_out_partitions_are_forgotten_when_the_generation_moves_on():
    g = group()
    g.join("a", "t", 6, 0.0, seq=3)
    assert g.members["a"].handed_seq == 3
    g.join("b", "t", 6, 1.0, seq=0)
    g.join("a", "t", 6, 1.1, seq=4)  # a let go and rejoined: the generation moves on
    assert g.members["a"].handed_seq == 4  # its join #4 was answered with its new partitions
    assert g.members["b"].handed_seq is None  # b not told yet
    assert g.join("b", "t", 6, 1.2, seq=1).partitions == [3, 4, 5]
    assert g.members["b"].handed_seq == 1
