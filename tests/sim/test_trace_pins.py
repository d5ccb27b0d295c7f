"""Trace pins: the simulator's trace digest for a fixed set of seeds, recorded before a refactor.

A pure refactor of the core changes no delivered message, no request id, no random draw and
no iteration order, so every pinned seed reproduces its digest byte for byte. A commit that
changes behaviour on purpose re-pins here and says why in its message:

    python -c "from meshq.testing.sim import run_seed; print(run_seed(SEED).trace_digest)"
"""

from __future__ import annotations

import pytest

from meshq.testing.sim import run_seed

# seed -> trace digest. Seeds 0-7 and the first CI seeds with a join, a `meshq leave` and an outage.
PINS = {
    0: "260a748b2225b4d3", 1: "82c398f14062c773", 2: "acda1e50fed8b195", 3: "b27f9427965f08bb",
    4: "34bac47c1f1ee6db", 5: "d84fa3a5970517f6", 6: "b988a9db52c06df5", 7: "c1d48eba67369815",
    8: "b4e9b267645e72e0", 12: "addf75faebacda07", 15: "c8732b9056203261", 16: "40f786a05a217139",
    20: "41b267289ffefddf", 21: "efaba0704ed96a8b", 22: "e7022900b542583b", 25: "dd92a38782d33a62",
    29: "24ae7cb2c8133a66", 37: "acbf4392b5f6c128", 38: "2665cc30fba539ee", 45: "b009cf3cded7c0a2",
}


@pytest.mark.parametrize("seed", sorted(PINS))
def test_pinned_trace(seed):
    result = run_seed(seed)
    assert result.ok, result.violations[:1]
    assert result.trace_digest == PINS[seed], (
        f"seed {seed} no longer reproduces its pinned trace: a refactor changed behaviour "
        f"(replay: python -m meshq.testing.sim --seed {seed})")
