"""A deterministic simulator of whole meshq clusters (``python -m meshq.testing.sim``).

Theory of operation
-------------------
The simulator runs N real ``meshq.core.node.NodeCore`` objects — the very code the real
node's runtime runs — in one thread, on a simulated clock, network and disk, all driven
by one ``random.Random(seed)``. Nothing reads the wall clock or the global random, and
every set that reaches the output is sorted, so one seed always replays the same run
(``trace_digest``).

* **Membership.** Declared per run in ``SimOptions``: extra storage nodes boot in the middle of
  the run and join the formed cluster (``joins_s``); one node is asked to leave, as ``meshq
  leave`` does through a client (c1) or ``Node.leave()`` on the node itself — the ``leave``
  command, again every 0.5 s until the answer is ``left`` — and is stopped for good the moment
  its core says it has left, as the runtime does (``leave``); one node is killed for longer than a
  short ``member_timeout_s``, so the metadata leader removes it and its partitions are copied
  elsewhere, and it later comes back and rejoins (``outage``). Each change moves partitions to
  their ring placement through ``reassign`` steps; a run must end with every partition there.
  Right after a step commits, the simulator now and then crashes a replica of that partition
  (the step nemesis), since a configuration change is most fragile then.

After every event the checkers run (``meshq.testing.checks``); after the fault phase a liveness
phase heals everything and requires the cluster to converge (every partition where the ring
over the final membership places it); the run ends with a
Jepsen-style history check: acknowledged records lost, unexpected records present,
records duplicated.

Where things are, each module with its own theory of operation:

* ``options.py`` — what a run is: ``SimOptions``, ``FaultOptions``, the swarm draws;
* ``node.py`` — ``SimNode``, one simulated host: core, disk, sockets, what faults left on it;
* ``network.py`` — ``Network``: routing, latency, drop, duplication, partitions;
* ``faults.py`` — ``FaultInjector``: crashes, power loss, partial writeback, pauses, bit flips,
  clock jumps, the outage and the step nemesis;
* ``workload.py`` — ``Workload`` (producers, topics, leave, probes) and ``SimConsumer``;
* ``threads.py`` — ``CallingThread``: a client thread whose ``Node.produce`` goes straight to
  the leader, running the real ``meshq.core.client.direct`` (retries, epochs, refreshes);
* ``simulation.py`` — ``Simulation``, the root that builds the others and runs the event loop;
  ``SimResult``; ``run_seed``; ``failing_runs`` (for mutation tests);
* ``cli.py`` — ``main``, the command line (``__main__.py`` calls it).
"""

from __future__ import annotations

from meshq.testing.sim.cli import main
from meshq.testing.sim.options import FaultOptions, SimOptions
from meshq.testing.sim.simulation import SimResult, Simulation, failing_runs, run_seed

__all__ = ["FaultOptions", "SimOptions", "SimResult", "Simulation", "failing_runs", "main", "run_seed"]
