"""The simulator's ``corrupt`` fault (SPEC §3.6, "a node never trusts a frame"): during the fault
phase a message may arrive damaged — its header cut short or random, or a bit flipped in a record
batch — as a broken or hostile peer could send it. Every checker must still hold (nothing
acknowledged lost, no gap, replicas agree, ...), and no core may raise.

Swarm runs never draw the fault, so the pinned traces (test_trace_pins.py) do not move."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshq.core import batch as batch_format
from meshq.core.client.consumer import ConsumerState
from meshq.testing.sim.options import SimOptions
from meshq.testing.sim.simulation import Simulation

pytestmark = pytest.mark.timeout(120)


def run(seed: int, corrupt: float = 0.03):
    options = SimOptions.swarm(seed)
    return Simulation(replace(options, faults=replace(options.faults, corrupt=corrupt))).run()


@pytest.mark.parametrize("seed", [1, 3, 6, 9, 12, 14])
def test_damaged_frames_break_no_invariant(seed):
    result = run(seed)
    assert result.ok, "\n".join(str(v) for v in result.violations)
    assert result.stats.get("corrupted", 0) > 0  # the fault did happen


def test_swarm_never_draws_the_corrupt_fault():
    assert all(SimOptions.swarm(seed).faults.corrupt == 0.0 for seed in range(200))


def test_the_simulator_catches_a_consumer_that_lets_a_damaged_fetch_escape(monkeypatch):
    """Seed 0 damages a fetch answer: a consumer that decodes it without dropping the damage
    (what it did before) raises out of the core, which the simulator reports. (It was seed 3 until the
    metadata group's messages began to carry their formation: frames of other sizes move which one the
    fault damages.)"""

    def unguarded(self, spec, data):
        self._busy.discard(spec.partition)
        records = batch_format.decode_records(data, self.topic, spec.partition, spec.offset) if data else []
        if records:
            self.buffer.extend(records)
            self.fetch_positions[spec.partition] = records[-1].offset + 1
        return records

    monkeypatch.setattr(ConsumerState, "on_fetched", unguarded)
    result = run(0)
    assert not result.ok
    assert any("CorruptLogError" in str(v) for v in result.violations), result.violations
