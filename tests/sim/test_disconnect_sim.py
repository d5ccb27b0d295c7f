"""Dropped connections in the simulator: a link cut for ``FaultOptions.disconnect_s`` tells both ends
``PeerDisconnected`` (as the runtime's drop monitor does, meshq.io.dropwatch), and the core fails the requests
pending on that peer as retriable instead of letting them wait out their timeout (``Outbox.fail_requests_to``).
Runs with partitions pass every checker with it on (the retries store nothing twice), and the checker of the
rule (``Checker.after_disconnect``) catches a core that ignores the drop."""

from __future__ import annotations

import pytest

from meshq.core.outbox import Outbox
from meshq.testing.sim import failing_runs, run_seed

pytestmark = pytest.mark.timeout(600)

DROPS = {"disconnect_s": 1.0}  # the runtime's heartbeat timeout (meshq.io.runtime.HEARTBEAT_TIMEOUT_MS)
# Seeds among the first 40 whose swarm draws 3+ nodes and partitions at 0.2/s, and whose cuts last past
# disconnect_s (25 has none); each drops connections with requests pending (4-16 times a run)
SEEDS = (8, 10, 14, 17, 28, 36)


@pytest.mark.parametrize("seed", SEEDS)
def test_runs_with_dropped_connections_pass_every_checker(seed):
    result = run_seed(seed, faults=DROPS)
    assert result.ok, (f"{result.summary()}\noptions: {result.options}\n{result.violations[0]}\n"
                       f"replay: run_seed({seed}, faults={DROPS})")
    assert result.stats.get("disconnects", 0) > 0


def test_the_same_seed_with_dropped_connections_gives_the_same_trace():
    first, second = run_seed(SEEDS[0], faults=DROPS), run_seed(SEEDS[0], faults=DROPS)
    assert first.trace_digest == second.trace_digest
    assert any("connection to" in line and "dropped" in line for line in first.trace)


def test_checker_catches_a_core_that_lets_requests_wait_on_a_dropped_connection(monkeypatch):
    # Broken variant: a dropped connection changes nothing; its requests wait for their timeout.
    real = Outbox.fail_requests_to
    monkeypatch.setattr(Outbox, "fail_requests_to",
                        lambda self, peer, state: None if state == "disconnected" else real(self, peer, state))
    assert failing_runs(SEEDS, "still wait after its connection dropped", faults=DROPS), \
        "requests left waiting on a dropped connection went unnoticed"
