"""A slow leader in the simulator (issue #19 item 10): one node's link gets 100 ms slower each
way while it leads; it must hand its partitions over within the slow rule's bound
(``SlowLeaderChecker``), losing nothing acknowledged, and the checker must fail without the rule."""

from __future__ import annotations

import logging

import pytest

from meshq.testing.sim.options import FaultOptions, SimOptions
from meshq.testing.sim.simulation import Simulation

pytestmark = pytest.mark.timeout(300)

SEEDS = range(3)


def run(seed: int, faults: FaultOptions | None = None, produce_interval_s: float = 0.05):
    logging.getLogger("meshq").setLevel(logging.CRITICAL)
    options = SimOptions(seed=seed, nodes=3, partitions=4, acks=("quorum", "leader"), fault_s=24.0,
                         slow_link=("n1", 8.0, 22.0, 0.1), faults=faults or FaultOptions(),
                         produce_interval_s=produce_interval_s)
    simulation = Simulation(options)
    return simulation, simulation.run()


def test_a_slow_leader_hands_its_partitions_over_within_the_bound():
    for seed in SEEDS:
        simulation, result = run(seed)
        assert result.ok, (seed, result.violations)
        assert result.stats["lost"] == 0 and result.stats["acked"] > 0
        summary = simulation.slow_leader.summary()
        assert summary["slow_led"] >= 1 and summary["slow_handed_off"] == summary["slow_led"], summary


def test_with_message_loss_and_duplicates_too():
    # (the rule judges commits — at least 3 per two election timeouts — and lost messages slow
    # the clients down, so these runs produce more often; with a trickle the hand-off comes later)
    for seed in SEEDS:
        simulation, result = run(seed, FaultOptions(drop=0.01, duplicate=0.01), produce_interval_s=0.02)
        assert result.ok, (seed, result.violations)
        summary = simulation.slow_leader.summary()
        assert summary["slow_led"] >= 1 and summary["slow_handed_off"] == summary["slow_led"], summary


def test_the_checker_catches_a_slow_leader_that_keeps_leading(monkeypatch):
    monkeypatch.setattr("meshq.core.replica.leader_slow", lambda latencies, holds: False)
    for seed in SEEDS:
        _simulation, result = run(seed)
        assert not result.ok and "still leads" in str(result.violations[0]), (seed, result.violations)
