"""Leader hints settle (``LeaderHintChecker``): a heartbeat that no longer lists a partition
withdraws the hint naming its sender (``Mesh._withdraw_hints``), so a node holding no replica
stops routing the partition to a leader that stepped down or handed it over.

Every CI seed runs the checker (tests/sim/test_simulation.py). Here: runs where it has work, and
mutation tests showing it fails without the rule."""

from __future__ import annotations

import logging

import pytest

from meshq.core.mesh.gossip import Mesh
from meshq.testing.sim.options import FaultOptions, SimOptions
from meshq.testing.sim.simulation import Simulation

# CI seeds where, without the rule, a client node keeps a hint naming a leader that stepped down
# when its lease ran out in a minority, with no other leader yet: 5 (topic4/0, n2) and 35 (topic0/0, n1).
CLIENT_SEEDS = (5, 35)
# Five storage nodes, RF 3 (two nodes outside every replica set), kills and splits: without the rule
# a storage node outside the replica set keeps naming a leader that stepped down (seed 0: n1 names n5
# for topic2/0; seed 3: n2 names n4 for events/0). Such a node answers metadata and status with it.
STORAGE_SEEDS = (0, 3)


def storage_options(seed: int) -> SimOptions:
    return SimOptions(seed=seed, nodes=5, partitions=8, faults=FaultOptions(kill_rate=0.15, partition_rate=0.05))


def run(options: SimOptions) -> Simulation:
    logging.getLogger("meshq").setLevel(logging.CRITICAL)
    sim = Simulation(options, record_trace=False)
    sim.result = sim.run()  # type: ignore[attr-defined]
    return sim


@pytest.mark.parametrize("options", [SimOptions.swarm(s) for s in CLIENT_SEEDS] + list(map(storage_options,
                                                                                            STORAGE_SEEDS)))
def test_hints_settle_and_the_checker_has_hints_to_check(options):
    sim = run(options)
    assert sim.result.ok, sim.result.violations[:1]
    assert sim.checker.hints.hints_checked > 0


def stale_hint(sim: Simulation) -> tuple[str, tuple[str, int], str]:
    assert not sim.result.ok and "leader hint" in str(sim.result.violations[0]), sim.result.violations[:1]
    assert sim.checker.hints.stale is not None
    holder, key, named = sim.checker.hints.stale
    assert key not in sim.nodes[holder].core.partitions  # it holds no replica of the partition
    return holder, key, named


@pytest.mark.parametrize("seed", CLIENT_SEEDS)
def test_without_the_rule_a_client_keeps_naming_a_leader_that_stepped_down(monkeypatch, seed):
    monkeypatch.setattr(Mesh, "_withdraw_hints", lambda self, sender, listed: None)
    sim = run(SimOptions.swarm(seed))
    holder, key, named = stale_hint(sim)
    assert sim.nodes[holder].role == "client"
    old = sim.nodes[named].core
    assert not (key in old.partitions and old.partitions[key].replica.is_leader)  # it stepped down


@pytest.mark.parametrize("seed", STORAGE_SEEDS)
def test_without_the_rule_a_storage_node_outside_the_replica_set_keeps_naming_the_old_leader(monkeypatch, seed):
    # The rule disabled only where it matters for routing: on storage nodes, for partitions they hold
    # no replica of (a client's hints are not used for routing; a replica routes by its own replica).
    withdraw = Mesh._withdraw_hints

    def only_for_replicas(self, sender, listed):
        if not self.core.is_storage:
            return withdraw(self, sender, listed)
        return withdraw(self, sender, listed | {k for k in self._hinted.get(sender, ()) if k not in self.core.partitions})

    monkeypatch.setattr(Mesh, "_withdraw_hints", only_for_replicas)
    sim = run(storage_options(seed))
    holder, key, named = stale_hint(sim)
    assert sim.nodes[holder].role == "storage"
    assert sim.nodes[holder].core.host.current_leader(*key) == named  # what its metadata answers say
