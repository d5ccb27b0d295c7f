"""Two formed clusters of the same name that meet stay apart (issue #19 item 7; ``Formation.foreign``).

Two 3-node meshes A and B of the same name form apart (each knows only its own nodes), each creates topic ``t``
(RF 3) and acknowledges writes with acks=quorum; then they meet (discovery introduces one to the other), and a
partial partition cuts B's metadata and partition leader ``b1`` off from the rest of B while it still reaches A:
the situation in which, before the rule, ``b1`` asked A's leader to admit it again, took A's metadata log and
named A's nodes as learners of B's partition. ``ClustersApartChecker`` runs after every step; the mutation test
turns the rule off and shows the checker failing.
"""

from __future__ import annotations

import pytest

from meshq.core.cluster.formation import Formation
from meshq.core.events import PeerDiscovered
from meshq.testing.checks import Violation
from meshq.testing.cluster_checks import ClustersApartChecker
from tests.core.rooms.conftest import Net, create_topic

A, B = ("a1", "a2", "a3"), ("b1", "b2", "b3")


def introduce_within(net: Net, group: tuple[str, ...]) -> None:
    for node_id in group:
        for other in group:
            if other != node_id:
                net[node_id].handle(PeerDiscovered(net[other].core.mesh.self_info()))


def two_meshes_meet(checked_s: float = 40.0) -> tuple[Net, ClustersApartChecker]:
    net = Net(*A, *B)
    introduce_within(net, A)
    introduce_within(net, B)
    net.run_until(lambda: all(len(net[n].core.raft.voters) == 3 and net[n].core.raft.leader for n in A + B), 30)
    formations = {n: net[n].core.raft.formation for n in A + B}
    assert len({formations[n] for n in A}) == 1 and len({formations[n] for n in B}) == 1
    assert formations["a1"] != formations["b1"], "two clusters formed apart carry different formations"
    checker = ClustersApartChecker(formations)
    create_topic(net["a1"], "t", 1, 3, net=net)
    create_topic(net["b1"], "t", 1, 3, net=net)
    net.run(3.0)  # the partitions elect their leaders
    for group in (A, B):
        outcomes = [net[group[0]].produce("t", [f"{group[0]}-{i}".encode()], acks="quorum", partition=0)
                    for i in range(5)]
        net.run_until(lambda outcomes=outcomes: all(o.results or o.errors for o in outcomes), 10)
        assert all(o.results for o in outcomes), [outcome.errors for outcome in outcomes]
    net["a1"].handle(PeerDiscovered(net["b1"].core.mesh.self_info()))  # their networks are joined
    blocked = {("b1", "b2"), ("b1", "b3"), ("b2", "b1"), ("b3", "b1")}
    link_up = net._link_up
    net._link_up = lambda src, dst: link_up(src, dst) and (src, dst) not in blocked  # type: ignore[method-assign]
    end_s = net.clock.now_s + checked_s
    while net.clock.now_s < end_s:
        net.run(0.25)
        for node_id in A + B:
            checker.check(node_id, net[node_id].core)
        if net.clock.now_s > end_s - checked_s / 2:
            net._link_up = link_up  # type: ignore[method-assign]  # healed for the second half
    return net, checker


def test_two_formed_meshes_of_one_name_that_meet_stay_apart_and_keep_serving():
    net, checker = two_meshes_meet()
    assert checker.checks > 0
    for group in (A, B):
        for node_id in group:
            core = net[node_id].core
            assert sorted(core.raft.voters) == sorted(group)
            assert sorted(core.members.alive_ids()) == sorted(group), "a node of the other cluster is no member"
        assert net[group[0]].core.counters.get("foreign_refused", 0) > 0
    for group in (A, B):  # each still acknowledges quorum writes, in its own log
        leader = next(n for n in group if net[n].core.partitions[("t", 0)].replica.is_leader)
        before = {n: net[n].core.partitions[("t", 0)].replica.high_watermark for n in A + B}
        outcome = net[leader].produce("t", [b"after"], acks="quorum", partition=0)
        net.run_until(lambda outcome=outcome: bool(outcome.results or outcome.errors), 10)
        assert outcome.results and not outcome.errors, outcome.errors
        net.run(1.0)  # the followers learn the new high watermark
        for node_id in A + B:
            grew = net[node_id].core.partitions[("t", 0)].replica.high_watermark > before[node_id]
            assert grew == (node_id in group), (node_id, group)


def test_the_checker_fails_without_the_rule(monkeypatch):
    # every layer off: peers of another formation taken in as members, their raft messages taken, and their
    # leaders asked to admit a leaderless voter again
    monkeypatch.setattr(Formation, "foreign", lambda self, summary: False)
    monkeypatch.setattr(Formation, "refuses_raft", lambda self, sender, formation: False)
    any_leader = Formation.named_leaders
    monkeypatch.setattr(Formation, "named_leaders", lambda self, formation=None: any_leader(self))
    with pytest.raises(Violation):
        two_meshes_meet()


def test_a_trivial_cluster_still_gives_itself_up_to_a_formed_one():
    net = Net("n1", "n2")
    create_topic(net["n2"], "keep", 1)
    leader = net.form()
    assert leader.core.node_id == "n2" and sorted(net["n1"].core.raft.voters) == ["n1", "n2"]
    assert net["n1"].core.raft.formation == net["n2"].core.raft.formation
