"""Consumer groups in the simulator: each group checker (meshq.testing.group_checks) can fail.

Each test breaks one rule on purpose and requires some seed among the first CI seeds to
fail with the violation that rule's checker reports (the per-CI seeds themselves run in
``test_simulation.py::test_seed``)."""

from __future__ import annotations

from meshq.core.client.consumer import ConsumerState
from meshq.core.client.requests import Requests
from meshq.core.partitions.coordinator import GroupMembership
from meshq.errors import RebalanceError
from meshq.testing.sim import failing_runs, run_seed


def test_the_members_of_a_run_join_rebalance_and_hand_out_records():
    result = run_seed(0)
    assert result.ok, result.violations[:1]
    assert result.stats["group_assignments"] >= 3 and result.stats["group_handed_out"] > 0
    assert any("group: m3" in line and "leaves" in line for line in result.trace)


def test_checker_catches_a_coordinator_that_assigns_before_every_member_rejoined(monkeypatch):
    # Broken variant: a rebalance completes as soon as anyone joins, while the other members
    # still hold their partitions of the previous generation.
    monkeypatch.setattr(GroupMembership, "_all_rejoined", lambda self: True)
    assert failing_runs(range(10), "group members overlap"), "an overlapping assignment went unnoticed"


def test_checker_catches_a_member_that_keeps_fetching_revoked_partitions(monkeypatch):
    # Broken variant: letting go drops nothing, so the member goes on fetching and handing out
    # the partitions it gave back.
    monkeypatch.setattr(ConsumerState, "revoke", lambda self, partitions: None)
    assert failing_runs(range(10), "without holding it"), "a member reading revoked partitions went unnoticed"


def test_checker_catches_a_consumer_that_never_follows_a_moved_leader(monkeypatch):
    # Broken variant (the bug of issue #14): a routed command that meets a moved leader keeps the
    # topic's cached metadata, so a consumer's fetches (sent without retries) keep asking the old
    # leader. After convergence the consumers must still read every partition to its end.
    def keep_metadata(self, call, error):
        from meshq.core.events import Fail

        if isinstance(error, RebalanceError) or not call.retry or not error.retriable or self.core.stopped \
                or self.core.now_s + 0.2 >= call.deadline_s:
            self.out.emit(Fail(call.command.waiter, error))
            return
        self.out.schedule(self.core.now_s + 0.2, "routed_retry", call)

    monkeypatch.setattr(Requests, "_routed_retry_or_fail", keep_metadata)
    assert failing_runs(range(40), "made no progress"), "a consumer stuck on an old leader went unnoticed"


def test_a_members_node_killed_during_the_faults_is_replaced_and_the_group_still_converges():
    for seed in range(10):
        result = run_seed(seed)
        if any(line.endswith("kill g2") for line in result.trace):
            assert result.ok, result.violations[:1]
            assert any("group: m4 holds" in line for line in result.trace)
            return
    raise AssertionError("no run among the first 10 seeds killed a member's node")
