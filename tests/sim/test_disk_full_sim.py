"""Disk full in the simulator (issue 19, item 8): a node's disk fills for a while under faults;
nothing acknowledged is lost, a full node's logs do not grow, and it accepts writes again once
space returns. Each checker is shown to fail on a broken variant."""

from __future__ import annotations

import logging

import pytest

from meshq.core.partitions import space
from meshq.core.partitions.space import StorageSpace
from meshq.testing.sim.options import FaultOptions, SimOptions
from meshq.testing.sim.simulation import Simulation

pytestmark = pytest.mark.timeout(300)

SEEDS = range(6)


def run(seed: int):
    logging.getLogger("meshq").setLevel(logging.CRITICAL)
    faults = FaultOptions(disk_full_rate=0.1, kill_rate=0.05 if seed % 2 else 0.0, drop=0.01)
    simulation = Simulation(SimOptions(seed=seed, nodes=3, partitions=4, acks=("quorum", "leader"), faults=faults))
    return simulation, simulation.run()


def failures_until(text: str) -> list:
    """The violations of failing runs over SEEDS, up to the first containing ``text`` (the one a
    mutation test needs; later seeds would only cost CI time)."""
    found = []
    for seed in SEEDS:
        _simulation, result = run(seed)
        if not result.ok:
            found.append(result.violations)
            if text in str(result.violations):
                break
    return found


def test_full_disks_lose_nothing_acknowledged_and_the_nodes_recover():
    filled = 0
    for seed in SEEDS:
        simulation, result = run(seed)
        assert result.ok, (seed, result.violations)
        assert result.stats["lost"] == 0 and result.stats["acked"] > 0
        filled += result.stats.get("disk_full", 0)
        assert simulation.checker.space.full_disks == set()
    assert filled >= len(SEEDS)  # the fault did happen


def test_the_checker_catches_a_full_node_that_keeps_appending(monkeypatch):
    monkeypatch.setattr(StorageSpace, "refuse_writes", lambda self, topic, partition: None)
    failures = failures_until("while its storage was full")
    assert any("while its storage was full" in str(v) for v in failures), failures


def test_the_checker_catches_a_node_that_never_lifts_the_refusal(monkeypatch):
    original = StorageSpace.check

    def sticky(self, key, now_s):
        was_full = self.full
        reason = self.full_reason
        original(self, key, now_s)
        if was_full and not self.full:
            self.full_reason = reason  # broken: never lifts
    monkeypatch.setattr(StorageSpace, "check", sticky)
    failures = failures_until("after space returned")
    assert any("after space returned" in str(v) for v in failures), failures


def test_the_checker_catches_a_full_node_that_rechecks_only_every_interval(monkeypatch):
    # broken: a full node measures free space at the ordinary pace (storage_check_interval_s, 1 s),
    # so it may lift the refusal up to a whole interval after space returned
    monkeypatch.setattr(space, "FULL_RECHECK_S", 1.0)
    failures = failures_until("after space returned")
    assert any("after space returned" in str(v) for v in failures), failures
