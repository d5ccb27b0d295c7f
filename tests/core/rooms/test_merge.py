"""Two clusters of the same name that meet merge when one of them holds nothing (issue #19 item 7, and the
start-up race of two clusters formed from one seed; ``Formation._maybe_merge``, metadata ``dissolve``).

Groups A (a1, a2) and B (b1, b2, b3) form apart (each knows only its own nodes), then meet: a1 discovers b1.
A cluster that holds nothing gives itself up to one that holds something, or, when both hold nothing, to the
one whose formation sorts first (here A's: its founder a1 sorts before b1). A one-member group resets at once;
a larger one commits a ``dissolve`` in its own log first, and a voter that missed that commit gives the group up
on its own once the rest left it. ``MergeLosesNothingChecker`` runs after every step: no node that held a topic
or grant ever leaves its formation; the mutation test lets a group that holds a topic dissolve and shows the
checker failing.
"""

from __future__ import annotations

import logging

import pytest

from meshq.config import TopicConfig
from meshq.core.cluster.formation import Formation
from meshq.core.events import CreateTopic, PeerDiscovered
from meshq.core.metadata import MetadataState
from meshq.testing.checks import Violation
from meshq.testing.cluster_checks import MergeLosesNothingChecker
from tests.core.harness import CoreHarness
from tests.core.rooms.conftest import Net, create_topic

A, B = ("a1", "a2"), ("b1", "b2", "b3")


def form_apart() -> Net:
    net = Net(*A, *B)
    for group in (A, B):
        for node_id in group:
            for other in group:
                if other != node_id:
                    net[node_id].handle(PeerDiscovered(net[other].core.mesh.self_info()))
    net.run_until(lambda: all(len(net[n].core.raft.voters) == len(g) and net[n].core.raft.leader
                              for g in (A, B) for n in g), 30)
    assert net["a1"].core.raft.formation != net["b1"].core.raft.formation
    return net


def meet(net: Net, checker: MergeLosesNothingChecker, within_s: float = 60.0) -> float:
    """a1 discovers b1; run (checking every node after each step) until every node is a voter of one
    formation that all five share. Returns the seconds it took."""
    net["a1"].handle(PeerDiscovered(net["b1"].core.mesh.self_info()))
    everyone = set(A + B)

    def merged() -> bool:
        for node_id in everyone:
            checker.check(node_id, net[node_id].core)
        rafts = [net[n].core.raft for n in everyone]
        return (len({raft.formation for raft in rafts}) == 1
                and all(set(raft.voters) == everyone and raft.leader for raft in rafts))

    return net.run_until(merged, within_s)


def create(net: Net, node_id: str, name: str, partitions: int, replication_factor: int) -> None:
    """Create a topic through ``node_id`` and run until it is agreed on every node."""
    token = net[node_id].command(CreateTopic(TopicConfig(name, partitions, replication_factor)))
    net.run_until(lambda: token in net[node_id].resolved or token in net[node_id].failed, 10)
    assert token in net[node_id].resolved, net[node_id].failed.get(token)
    net.run_until(lambda: all(name in h.core.topics for h in net.nodes.values()), 10)


def test_two_clusters_that_hold_nothing_merge_into_the_one_whose_formation_sorts_first():
    net = form_apart()
    formation_a, formation_b = net["a1"].core.raft.formation, net["b1"].core.raft.formation
    checker = MergeLosesNothingChecker()
    took = meet(net, checker)
    assert net["b3"].core.raft.formation == formation_a, "B (its formation sorts last) gave itself up"
    assert sorted(checker.given_up) == [(n, formation_b) for n in B] and took < 30
    create(net, "b2", "t", 3, 3)  # the merged cluster serves: a topic over all five


def test_a_cluster_that_holds_nothing_gives_itself_up_to_one_that_holds_a_topic():
    net = form_apart()
    create_topic(net["b1"], "keep", 2, 3, net=net)
    net.run(2.0)  # its partitions elect leaders
    outcome = net["b1"].produce("keep", [b"r0", b"r1"], acks="quorum", partition=0)
    net.run_until(lambda: bool(outcome.results or outcome.errors), 10)
    assert outcome.results, outcome.errors
    formation_b = net["b1"].core.raft.formation
    checker = MergeLosesNothingChecker()
    meet(net, checker)
    assert net["a1"].core.raft.formation == formation_b
    assert sorted(node for node, _formation in checker.given_up) == list(A)
    assert all(sorted(net[n].core.topics) == ["keep"] for n in A + B)
    leader = next(n for n in B if net[n].core.partitions[("keep", 0)].replica.is_leader)
    assert net[leader].core.partitions[("keep", 0)].replica.high_watermark == 2, "nothing acknowledged is lost"


def test_a_voter_that_missed_the_dissolve_gives_the_group_up_once_the_others_left(caplog):
    caplog.set_level(logging.WARNING, logger="meshq")  # (a simulator run in this process may have silenced it)
    net = form_apart()
    checker = MergeLosesNothingChecker()
    net.cut("b3")  # b3 hears nothing of the dissolve b1 and b2 commit without it
    net["a1"].handle(PeerDiscovered(net["b1"].core.mesh.self_info()))
    net.run_until(lambda: set(net["b1"].core.raft.voters) == {"a1", "a2", "b1", "b2"}, 60)
    assert net["b3"].core.raft.formation != net["a1"].core.raft.formation
    net.heal("b3")
    took = meet(net, checker)
    assert [node for node, _formation in checker.given_up] == ["b3"] and took < 60
    assert "b3: 2 of the 3 voters of cluster 'default'" in caplog.text and "giving it up too" in caplog.text


def test_topics_asked_for_while_a_cluster_dissolves_are_refused_with_a_retry_hint_then_taken_by_the_merged_one():
    net = form_apart()
    net["a1"].handle(PeerDiscovered(net["b1"].core.mesh.self_info()))
    net.run_until(lambda: net["b1"].core.raft.sealed_index is not None, 30)
    token = net["b1"].command(CreateTopic(TopicConfig("late", 1, 1)))
    net.pump()
    error = net["b1"].failed.get(token)
    assert error is not None and "giving itself up" in str(error) and "retry" in str(error)
    meet(net, MergeLosesNothingChecker())
    create(net, "b1", "late", 1, 1)


def test_the_checker_fails_when_a_cluster_holding_a_topic_gives_itself_up(monkeypatch):
    net = form_apart()
    create_topic(net["b1"], "keep", 1, 3, net=net)  # B holds a topic, yet (mutated) dissolves into A
    monkeypatch.setattr(Formation, "_holds_nothing", lambda self, committed_only=False: True)
    monkeypatch.setattr(MetadataState, "holds_nothing", lambda self: True)
    monkeypatch.setattr(Formation, "foreign", lambda self, summary: False)
    with pytest.raises(Violation):
        meet(net, MergeLosesNothingChecker())


def test_a_node_that_gave_its_cluster_up_refuses_its_messages_after_a_restart_until_it_would_be_removed():
    lone = CoreHarness("n1", member_timeout_s=5.0)
    left = lone.core.raft.formation
    lone.core.formation._reset_metadata(lone.clock.now_s)  # as when it gives its cluster up
    assert lone.core.formation.refuses_raft("n2", left) and not lone.core.formation.refuses_raft("n2", "other.1")
    lone.storage.crash()  # and restarts (a seed that never answers keeps it from forming a cluster of its own)
    again = CoreHarness("n1", storage=lone.storage, clock=lone.clock, seeds=("127.0.0.1:9100",), member_timeout_s=5.0)
    assert again.core.raft.formation == "" and again.core.formation.refuses_raft("n2", left), \
        "a late append of the cluster it left must not fill its empty log after a restart"
    again.clock.now_s += 10.1  # two member timeouts: that cluster, if alive, removed it as a silent voter
    assert not again.core.formation.refuses_raft("n2", left)
