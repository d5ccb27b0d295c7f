"""Test tooling importable by users: the deterministic cluster simulator and its checkers.

``from meshq.testing import Simulation, SimOptions, run_seed``; run it with
``python -m meshq.testing.sim --seed N`` or ``--seeds K``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FaultOptions", "SimOptions", "SimResult", "Simulation", "Violation", "run_seed"]


def __getattr__(name: str) -> Any:
    # Lazy: importing meshq.testing (say, for Violation) does not load the simulator.
    if name in ("FaultOptions", "SimOptions", "SimResult", "Simulation", "run_seed"):
        from meshq.testing import sim

        return getattr(sim, name)
    if name == "Violation":
        from meshq.testing.checks import Violation

        return Violation
    raise AttributeError(name)
