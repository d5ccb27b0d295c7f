"""The deterministic simulator: a fixed seed set, reproducibility, and checkers that can fail."""

from __future__ import annotations

import pytest

from meshq.core import partition as partition_module
from meshq.core import replica as replica_module
from meshq.core.node import NodeCore
from meshq.core.raft import RaftNode
from meshq.testing.sim import SimOptions, Simulation, run_seed

CI_SEEDS = range(200)


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_seed(seed):
    result = run_seed(seed)
    assert result.ok, (f"{result.summary()}\noptions: {result.options}\n{result.violations[0]}\n"
                       f"replay: python -m meshq.testing.sim --seed {seed}")


def test_the_same_seed_gives_the_same_trace():
    first, second = run_seed(17), run_seed(17)
    assert first.trace == second.trace and first.trace_digest == second.trace_digest
    assert len(first.trace) > 10
    assert run_seed(18).trace_digest != first.trace_digest


def test_swarm_draws_different_shapes():
    shapes = {(o.nodes, o.partitions, o.fsync, o.acks) for o in map(SimOptions.swarm, range(50))}
    assert len(shapes) > 10


def failing_seeds(seeds, **overrides) -> list[int]:
    return [seed for seed in seeds if not run_seed(seed, **overrides).ok]


def test_checkers_catch_a_leader_that_acknowledges_before_fsync(monkeypatch):
    # Broken variant: with fsync=always, acknowledge at once instead of after the group-commit sync,
    # and expose unsynced records to readers. A power loss must then lose acknowledged records.
    def ack_now(self, route, message, now_s):
        body = message.body
        state = self._leader_state(body["topic"], body["partition"])
        data = message.payloads[0]
        from meshq.core import batch as batch_format

        header = batch_format.verify_batch(data)
        base_offset, duplicate = state.append(data, header, self.wall_clock_ms())
        self._reply(route, message.request_id, "produce_ok", {"topic": state.topic, "partition": state.partition,
                                                              "base_offset": base_offset, "duplicate": duplicate})

    monkeypatch.setattr(NodeCore, "_serve_produce", ack_now)
    monkeypatch.setattr(partition_module.PartitionState, "high_watermark",
                        property(lambda self: self.log.end_offset))
    seeds = [s for s in CI_SEEDS if SimOptions.swarm(s).fsync == "always" and SimOptions.swarm(s).faults.power_rate]
    assert failing_seeds(seeds[:25]), "acking before fsync went unnoticed"


def test_checkers_catch_a_leader_without_producer_dedupe(monkeypatch):
    # Broken variant: the leader forgets idempotent producers, so retries are stored twice.
    monkeypatch.setattr(partition_module.PartitionState, "check_duplicate", lambda self, header: None)
    seeds = [s for s in CI_SEEDS if SimOptions.swarm(s).faults.duplicate or SimOptions.swarm(s).faults.drop]
    assert failing_seeds(seeds[:30]), "duplicates from retries went unnoticed"


def test_checkers_catch_a_metadata_leader_that_commits_without_a_majority(monkeypatch):
    # Broken variant: the metadata leader counts itself as a quorum, so a leader cut off from the
    # others "commits" entries the majority never saw. The committed-prefix checker must notice.
    monkeypatch.setattr(RaftNode, "quorum", lambda self: 1)
    seeds = [s for s in CI_SEEDS if SimOptions.swarm(s).nodes >= 3]
    assert failing_seeds(seeds[:20]), "commits without a majority went unnoticed"


def test_a_simulation_is_importable_and_configurable_by_users():
    result = Simulation(SimOptions(seed=5, nodes=3, partitions=2, fault_s=3.0, liveness_s=10.0)).run()
    assert result.ok, result.violations
    assert result.stats["acked"] > 0 and result.stats["lost"] == 0


def test_checkers_catch_a_partition_leader_that_commits_without_a_majority(monkeypatch):
    # Broken variant: a partition leader counts itself as a majority of its replica set, so it
    # acknowledges acks=quorum records that only it holds; a failover must then lose them.
    monkeypatch.setattr(replica_module.Replica, "quorum", property(lambda self: 1))
    seeds = [s for s in CI_SEEDS if SimOptions.swarm(s).nodes >= 3 and "quorum" in SimOptions.swarm(s).acks
             and SimOptions.swarm(s).faults.kill_rate]
    assert failing_seeds(seeds[:25]), "partition commits without a majority went unnoticed"


def test_checkers_catch_votes_for_a_candidate_with_a_shorter_log(monkeypatch):
    # Broken variant: replicas vote without comparing logs, so a replica that missed committed
    # records can win an election and truncate them away on the others.
    original = replica_module.Replica._on_vote

    def careless_vote(self, sender, body, now_s):
        original(self, sender, {**body, "last_epoch": 1 << 30, "end_offset": 1 << 40}, now_s)

    monkeypatch.setattr(replica_module.Replica, "_on_vote", careless_vote)
    seeds = [s for s in CI_SEEDS if SimOptions.swarm(s).nodes >= 3 and SimOptions.swarm(s).faults.kill_rate]
    assert failing_seeds(seeds[:30]), "elections that lose committed records went unnoticed"

