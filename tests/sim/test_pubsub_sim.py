"""Pub/sub in the simulator: its invariants hold under faults, and each checker catches a broken core."""

from __future__ import annotations

import pytest

from meshq.core.pubsub import room as room_module
from meshq.testing.sim import failing_runs, run_seed

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("seed", range(8))
def test_pubsub_invariants_hold_under_faults(seed):
    result = run_seed(seed, pubsub=True, fault_s=8.0)
    assert result.ok, (seed, result.violations[:1])
    assert result.stats["pubsub_delivered"] > 0


def test_the_same_seed_gives_the_same_pubsub_trace():
    assert run_seed(3, pubsub=True, fault_s=6.0).trace_digest == run_seed(3, pubsub=True, fault_s=6.0).trace_digest


def first_failure(seeds=range(6)) -> str:
    """The first violation of the first failing run of ``seeds`` (pub/sub on), else ""."""
    found = failing_runs(seeds, pubsub=True, fault_s=6.0)
    return found[0][1] if found else ""


def test_checkers_catch_a_queue_group_delivered_to_every_member(monkeypatch):
    def targets(self):
        local, nodes = list(self.local), {node: [] for node in self.remote}
        for group in self.groups:
            for node, sub_id in group.members:
                if node == self.node_id:
                    local.append(sub_id)
                else:
                    nodes.setdefault(node, []).append(group.queue)
        return local, nodes
    monkeypatch.setattr(room_module.Route, "targets", targets)
    assert "already got it" in first_failure() or "twice" in first_failure()


def test_checkers_catch_deliveries_to_subscriptions_that_do_not_match(monkeypatch):
    original = room_module.PubSub.deliveries

    def deliveries(self, subject, queues):
        return sorted(set(original(self, subject, queues)) | set(self.local))  # every local subscription
    monkeypatch.setattr(room_module.PubSub, "deliveries", deliveries)
    assert "does not match" in first_failure()


def test_checkers_catch_reordered_or_repeated_messages(monkeypatch):
    original = room_module.PubSub.received

    def received(self, frame, payloads):
        source, entries = original(self, frame, payloads)
        self._replay = getattr(self, "_replay", [])
        self._replay.append(entries)
        if len(self._replay) > 3:  # hand an old batch in again: a duplicate, out of order
            return source, entries + self._replay.pop(0)
        return source, entries
    monkeypatch.setattr(room_module.PubSub, "received", received)
    failure = first_failure()
    assert "twice" in failure or "out of order" in failure, failure


def test_checkers_catch_interest_that_never_propagates(monkeypatch):
    monkeypatch.setattr(room_module.PubSub, "_on_interest", lambda self, node_id: None)
    monkeypatch.setattr(room_module.PubSub, "_check_liveness", lambda self, key, now_s: None)
    assert "probes" in first_failure(range(3))
