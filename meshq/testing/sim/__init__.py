"""A deterministic simulator of whole meshq clusters (``python -m meshq.testing.sim``).

The simulator itself is in ``simulation.py``; this package re-exports its public names.
"""

from __future__ import annotations

from meshq.testing.sim.cli import main
from meshq.testing.sim.options import FaultOptions, SimOptions
from meshq.testing.sim.simulation import SimResult, Simulation, run_seed

__all__ = ["FaultOptions", "SimOptions", "SimResult", "Simulation", "main", "run_seed"]
