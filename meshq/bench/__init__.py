"""``meshq bench produce``, ``replication`` and ``rebalance``: producer throughput, latency, failover, partition moves.

Theory of operation
-------------------
``run_bench`` (run.py) runs one scenario and prints its report. Each module has the details at
its top and imports only modules listed before it here, so there is no import cycle:

- errors.py: ``BenchError``, the run cannot go on or failed verification
- stats.py: latency percentiles, the median of repeated runs
- cpu.py: per-thread and whole-machine CPU, from /proc (``machine_busy``)
- targets.py: the targets (PASS/MISS, never asserted) and the lists of what failed
- console.py: progress lines and the pieces the renderers share
- procs.py: child processes: one ``meshq node``, a cluster of them
- status.py: reading ``client.status()``, waiting until a cluster is ready
- produce.py: the meshq producer loops; ``bench produce`` against one node
- baseline.py: the raw pyzmq DEALER->ROUTER floor
- load.py: the producer that writes during partition moves
- failover.py: kill -9 of a partition leader, timed
- replication.py: ``--nodes`` replicated nodes at ``acks=leader`` and ``quorum``, then failover
- rebalance.py: preload, a join and a leave
- report.py: the reports as rich tables
- run.py: arguments, scenarios, exit status
"""

from meshq.bench.cpu import machine_busy
from meshq.bench.run import run_bench

__all__ = ["machine_busy", "run_bench"]
