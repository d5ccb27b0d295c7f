"""One simulated host: a node's core, its disk, its sockets' state, and what faults did to it.

Theory of operation
-------------------
A ``SimNode`` outlives its core. Its ``storage`` (the memory twin of the log, or None for a
client) is the disk that survives crashes; ``core`` is None while the node is down, and
``incarnation`` counts boots so that a message, timer or restart queued for an earlier
incarnation is void. ``connections`` and ``subscriptions`` are the sockets the core asked
for, cleared at every boot; the network routes by them. ``paused_until_s``,
``wall_offset_ms`` and ``down_until_s`` are where the fault injector leaves a pause, a clock
jump and an outage; ``booted`` and ``departed`` say whether the node is part of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshq.core.node import NodeCore
from meshq.log.memory import MemoryStorage


@dataclass
class SimNode:
    node_id: str
    role: str
    storage: MemoryStorage | None
    core: NodeCore | None = None
    connections: dict[str, str] = field(default_factory=dict)  # peer key -> endpoint
    subscriptions: set[str] = field(default_factory=set)  # pub endpoints
    paused_until_s: float = 0.0
    wall_offset_ms: int = 0
    timer_at_s: float = float("inf")
    incarnation: int = 0
    booted: bool = False  # booted at least once (a joiner waits for its time)
    departed: bool = False  # left the cluster for good (``meshq leave``): never restarted
    down_until_s: float = 0.0  # an outage: restarts before this are held back
    runs_workload: bool = True  # False: a node of the consumer group's members only (no producer there)

    @property
    def present(self) -> bool:
        """Part of the run now: booted once and not departed (up or down)."""
        return self.booted and not self.departed

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.node_id}:1"

    @property
    def pub_endpoint(self) -> str:
        return f"tcp://{self.node_id}:2"

    @property
    def up(self) -> bool:
        return self.core is not None
