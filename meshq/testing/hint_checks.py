"""Leader hints settle, checked in the simulator (issue #19; ``Checker`` runs it after every event).

Once a node's heartbeats have had time to reach another node over a quiet network, the other
node's leader hint never names it for a partition it no longer leads. Precisely: a hint of node
N that names X (and that N's ``hinted_leader`` returns: X is alive to N) for a partition X does
not lead while X runs is a violation when, for ``settle_s`` (two heartbeat intervals plus twice
the largest latency), X has not changed its leadership of that partition or restarted, N has
been subscribed to X, neither was paused, and the network dropped nothing (a cut drops the
heartbeats that cross it). Checked every 0.1 s of simulated time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshq.testing.checks import Violation


class LeaderHintChecker:
    """Leader hints settle (see the module docstring): a node whose heartbeats
    reach another node is never named by its hint for a partition it stopped leading."""

    CHECK_INTERVAL_S = 0.1

    def __init__(self, sim: Any) -> None:
        self.sim = sim
        self.led: dict[str, set[tuple[str, int]]] = {}  # node -> the partitions it led when last looked at
        self.lead_changed_s: dict[tuple[str, tuple[str, int]], float] = {}  # (node, partition) -> when
        self.subscribed: dict[str, dict[str, float]] = {}  # node -> pub endpoint -> since when
        self.pause_end_s: dict[str, float] = {}  # node -> the latest end of a pause seen
        self.dropped = 0
        self.last_drop_s = float("-inf")
        self.next_check_s = 0.0
        self.hints_checked = 0  # hints that had settled (so had to name a leader) when checked
        self.stale: tuple[str, tuple[str, int], str] | None = None  # (node, partition, named) of a violation
        # A node's heartbeats, seen by their count (``Mesh.heartbeats_sent``) changing: a restarted node
        # publishes its first one only once it is up (more than a heartbeat interval after its restart),
        # so a hint is timed from the first heartbeat its node sent after the lead changed.
        self.heartbeats: dict[str, tuple[int, int]] = {}  # node -> (id of its core, heartbeats sent)
        self.unheard: dict[str, set[tuple[str, int]]] = {}  # node -> lead changes no heartbeat followed yet
        self.first_heartbeat_s: dict[tuple[str, tuple[str, int]], float] = {}  # (node, partition) -> when

    def settle_s(self, heartbeat_interval_s: float) -> float:
        return 2 * heartbeat_interval_s + 2 * self.sim.options.faults.latency_s[1]

    def after_event(self, touched: Iterable[str] | None) -> None:
        sim = self.sim
        now_s = sim.now_s
        for node_id in sorted(sim.nodes if touched is None else touched):
            node = sim.nodes[node_id]
            core = node.core
            led = set() if core is None else {key for key, state in core.partitions.items()
                                              if state.replica is not None and state.replica.is_leader}
            before = self.led.get(node_id, set())
            if led != before:
                for key in led ^ before:
                    self.lead_changed_s[(node_id, key)] = now_s
                    self.first_heartbeat_s.pop((node_id, key), None)
                self.unheard.setdefault(node_id, set()).update(led ^ before)
                self.led[node_id] = led
            if core is not None:
                sent = (id(core), core.mesh.heartbeats_sent)
                if self.heartbeats.get(node_id) != sent:
                    self.heartbeats[node_id] = sent
                    for key in self.unheard.pop(node_id, ()):
                        self.first_heartbeat_s[(node_id, key)] = now_s
            since = self.subscribed.setdefault(node_id, {})
            if len(since) != len(node.subscriptions) or not since.keys() <= node.subscriptions:
                self.subscribed[node_id] = {endpoint: since.get(endpoint, now_s)
                                            for endpoint in node.subscriptions}
        for node_id, node in sim.nodes.items():
            if node.paused_until_s > self.pause_end_s.get(node_id, 0.0):
                self.pause_end_s[node_id] = node.paused_until_s
        if sim.stats["dropped"] != self.dropped:
            self.dropped = sim.stats["dropped"]
            self.last_drop_s = now_s
        if now_s < self.next_check_s:
            return
        self.next_check_s = now_s + self.CHECK_INTERVAL_S
        for node_id in sorted(sim.nodes):
            node = sim.nodes[node_id]
            if node.core is not None and node.paused_until_s <= now_s:
                self._check(node, now_s)

    def _check(self, node: Any, now_s: float) -> None:
        sim = self.sim
        settle_s = self.settle_s(node.core.config.heartbeat_interval_s)
        if now_s < self.last_drop_s + settle_s:
            return
        mesh = node.core.mesh
        for key, (epoch, named) in sorted(mesh.leader_hints.items(), key=lambda item: item[0]):
            if named is None or mesh.hinted_leader(*key) != named:
                continue
            other = sim.nodes.get(named)
            core = other.core if other is not None else None
            if core is None:
                continue  # down: it sends nothing, and a node learns it is dead by the failure timeout
            subscribed_s = self.subscribed.get(node.node_id, {}).get(other.pub_endpoint)
            if subscribed_s is None:
                continue  # its heartbeats do not reach this node
            changed_s = self.lead_changed_s.get((named, key))
            heartbeat_s = None if changed_s is None else self.first_heartbeat_s.get((named, key))
            if changed_s is not None and heartbeat_s is None:
                continue  # no heartbeat of it since it stopped leading: nothing told this node yet
            since_s = max(self.last_drop_s, heartbeat_s or float("-inf"), subscribed_s,
                          self.pause_end_s.get(node.node_id, 0.0), self.pause_end_s.get(named, 0.0))
            if now_s < since_s + settle_s:
                continue
            self.hints_checked += 1
            state = core.partitions.get(key)
            if state is not None and state.replica is not None and state.replica.is_leader:
                continue
            self.stale = (node.node_id, key, named)
            raise Violation(f"{node.node_id}: its leader hint for {key[0]}/{key[1]} names {named} (epoch {epoch}), "
                            f"which does not lead it (since {self.lead_changed_s.get((named, key), 0.0):.3f} s) "
                            f"although {named}'s heartbeats have reached {node.node_id} over a quiet network "
                            f"since {since_s:.3f} s")
