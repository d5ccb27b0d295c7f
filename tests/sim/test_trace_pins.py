"""Trace pins: the simulator's trace digest for a fixed set of seeds, recorded before a refactor.

A pure refactor of the core changes no delivered message, no request id, no random draw and
no iteration order, so every pinned seed reproduces its digest byte for byte. A commit that
changes behaviour on purpose re-pins here and says why in its message (re-pinned when the
simulator's consumer and leave loop became the real ``ConsumerState`` and ``LeaveLoop``, when
the clients' calling threads arrived (the seeds whose runs have them), when a routed call
that fails retriably started dropping its topic's metadata, and when the consumer began reading
the group's commits back after convergence):

    python -c "from meshq.testing.sim import run_seed; print(run_seed(SEED).trace_digest)"
"""

from __future__ import annotations

import pytest

from meshq.testing.sim import run_seed

# seed -> trace digest. Seeds 0-7 and the first CI seeds with a join, a `meshq leave` and an outage.
PINS = {
    0: "d8e64e5d3579c8b3", 1: "3cb96daea762e723", 2: "bf5cf07125d82825", 3: "c0361abfe2c87838",
    4: "70d3b2ed797a2761", 5: "9cfed58c49d88220", 6: "ed166abdcf121869", 7: "8447c34c9d11f7e7",
    8: "6767a22ffe455d30", 12: "c6f2f2be8889e36a", 15: "25e069d68a933226", 16: "07d7400d2cc715f9",
    20: "743e61fa3b3d767e", 21: "3fddf5f8099b9d81", 22: "dfddcf5f6b90de86", 25: "12508165bb8bcd91",
    29: "804cfd7b989e5b67", 37: "5788a7f359ecafc9", 38: "1ccd75e9e293122e", 45: "57e22596f3b586d6",
}


@pytest.mark.parametrize("seed", sorted(PINS))
def test_pinned_trace(seed):
    result = run_seed(seed)
    assert result.ok, result.violations[:1]
    assert result.trace_digest == PINS[seed], (
        f"seed {seed} no longer reproduces its pinned trace: a refactor changed behaviour "
        f"(replay: python -m meshq.testing.sim --seed {seed})")
