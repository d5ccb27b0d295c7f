"""Shared subscriptions in the deterministic simulator: per-CI seeds, and checkers that can fail.

Each seed runs its swarm-drawn cluster and faults with the shared workload on
(``meshq.testing.sim.shared``); the checkers (``meshq.testing.shared_checks.SharedChecker``) are
then shown to catch a broken leader, one mutation each.
"""

from __future__ import annotations

import pytest

from meshq.core import shared_state
from meshq.core.partitions import shared as shared_module
from meshq.testing.sim import SimOptions, failing_runs, run_seed

SHARED_SEEDS = range(40)


@pytest.mark.parametrize("seed", SHARED_SEEDS)
def test_shared_seed(seed):
    result = run_seed(seed, shared=True)
    assert result.ok, (f"{result.summary()}\noptions: {result.options}\n{result.violations[0]}\n"
                       f"replay: python -c 'from meshq.testing.sim import run_seed; print(run_seed({seed}, shared=True))'")


def test_the_shared_workload_hands_out_and_acks_records():
    result = run_seed(0, shared=True)
    assert result.ok and result.stats["shared_jobs"] > 50
    assert result.stats["shared_deliveries"] > result.stats["shared_jobs"] > 0
    assert result.stats["shared_confirmed"] > 0


def test_checkers_catch_deliveries_beyond_max_deliveries(monkeypatch):
    # Broken variant: the leader never sends a record to the DLQ after its last delivery.
    deliver = shared_state.SharedState.deliver
    monkeypatch.setattr(shared_state.SharedState, "over_limit", lambda self, offset, max_deliveries: False)
    monkeypatch.setattr(shared_state.SharedState, "deliver",
                        lambda self, offsets, member, now_s, timeout_ms, max_deliveries: deliver(
                            self, offsets, member, now_s, timeout_ms, 1 << 30))
    found = failing_runs(range(6), "max_deliveries is 3", shared=True)
    assert found, "a record delivered beyond max_deliveries went unnoticed"


def test_checkers_catch_a_record_handed_out_again_after_its_ack_was_confirmed(monkeypatch):
    # Broken variant: an ack is answered (and confirmed) but the record stays in flight, so its
    # ack timeout hands it out again.
    def ack(self, offset, member):
        flight = self.in_flight.get(offset)
        if flight is None or flight.member != member:
            return False
        self.stats["acked"] += 1
        return True

    monkeypatch.setattr(shared_state.SharedState, "ack", ack)
    found = failing_runs(range(6), "after an ack of delivery", shared=True)
    assert found, "a record handed out again after its ack went unnoticed"


def test_checkers_catch_a_delayed_record_handed_out_early(monkeypatch):
    # Broken variant: the leader ignores meshq-deliver-at.
    monkeypatch.setattr(shared_module, "record_deliver_at", lambda headers: 0)
    seeds = [s for s in range(40) if not SimOptions.swarm(s).faults.clock_jump_rate][:6]
    found = failing_runs(seeds, "before its deliver-at", shared=True)
    assert found, "a delayed record handed out early went unnoticed"


def test_checkers_catch_dead_letters_that_never_reach_the_dlq(monkeypatch):
    # Broken variant: the leader marks records dead without appending them to <topic>.dlq.
    def drop(self, key, group, offsets, records, now_s):
        for offset in offsets:
            group.dead_lettered(offset)

    monkeypatch.setattr(shared_module.Shared, "_send_dead_letters", drop)
    found = failing_runs(range(6), "never acked by a member nor dead-lettered", shared=True)
    assert found, "dead letters that never reach the DLQ went unnoticed"
