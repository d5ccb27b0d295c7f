"""Pub/sub in the simulator: subscribers and publishers on every node, data over the simulated network.

Theory of operation
-------------------
With ``SimOptions.pubsub`` on, each node holds a few subscriptions drawn from a small set of
patterns (``*``, ``>``, literals) and queue groups, made through the core's own
``AddSubscription`` and made again after every restart (a new incarnation starts with none,
as a restarted process does); during the fault phase some are closed and reopened, so
interest keeps changing. Every ``STEP_S`` a live node publishes a message to a subject drawn
from a small set. What happens to it is what ``meshq.io.pubsub`` does, on the same pure
core: ``PubSub.plan`` picks the local subscriptions and the nodes, ``PubSub.batch`` frames
one batch per node, the network carries it on a data channel that behaves as ZeroMQ over
TCP does — messages on one link arrive in order and never twice, but may be lost (drops,
cuts, a SUB not connected yet) — and the target's ``PubSub.received`` / ``deliveries`` pick
its subscriptions. A paused node takes its data when it resumes, in order.

Every delivery is reported to ``PubSubChecker`` (``meshq.testing.pubsub_checks``), which checks as
it goes that each subscription gets each publisher's messages in order, never twice, only
when its pattern matches, and that a queue group never gets a message twice. In the liveness
phase, once the cluster converged and every node knows every other node's interest, each
live node publishes a probe to every subject; the run is done when every probe reached every
matching subscription and exactly one member of each matching queue group.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from meshq.core.events import AddSubscription, RemoveSubscription, Resolve
from meshq.core.pubsub.room import ADVERT_KIND

if TYPE_CHECKING:
    from meshq.testing.sim.node import SimNode
    from meshq.testing.sim.simulation import Simulation

STEP_S = 0.05
PATTERNS = ("s.a", "s.*", "s.>", "s.*.x", ">", "t.*", "s.a.x")
QUEUES = (None, None, None, "q1", "q2")
SUBJECTS = ("s.a", "s.b", "s.a.x", "s.b.x", "t.c", "u")
PROBE_GRACE_S = 5.0  # after the probes went out, how long they may take (no faults any more)


class SimPubSub:
    """The pub/sub workload of one run (see the module docstring)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.rng = random.Random(f"pubsub-{sim.options.seed}")
        self.checker = sim.checker.pubsub
        self.plans: dict[str, list[tuple[str, str | None]]] = {
            node_id: [(self.rng.choice(PATTERNS), self.rng.choice(QUEUES)) for _ in range(self.rng.randint(1, 3))]
            for node_id in sorted(sim.nodes)}
        self.active: dict[str, dict[int, tuple[str, str | None]]] = {}  # node -> sub id -> (pattern, queue)
        self.subscribed_incarnation: dict[str, int] = {}
        self.next_sub_id = 0
        self.published: dict[str, int] = {}  # node -> messages it published (this run)
        self.probes_sent_s: float | None = None
        self.done = False

    def start(self) -> None:
        self.sim.at(0.5, "pubsub", None)

    # ------------------------------------------------------------------ the periodic step
    def step(self) -> None:
        sim = self.sim
        for node_id in sorted(sim.nodes):
            node = sim.nodes[node_id]
            if node.core is not None and node.paused_until_s <= sim.now_s:
                self._ensure_subscriptions(node)
        if sim.faulting:
            self._churn()
            self._publish_random()
        elif self.probes_sent_s is None:
            if sim.checker.converged and self._interest_converged():
                self._send_probes()
        elif not self.done:
            if self.checker.probes_complete():
                self.done = True
            elif sim.now_s - self.probes_sent_s > PROBE_GRACE_S:
                self.checker.fail_probes()
        sim.at(sim.now_s + STEP_S, "pubsub", None)

    def _ensure_subscriptions(self, node: SimNode) -> None:
        if self.subscribed_incarnation.get(node.node_id) == node.incarnation:
            return
        self.subscribed_incarnation[node.node_id] = node.incarnation
        self.active[node.node_id] = {}
        for pattern, queue in self.plans[node.node_id]:
            self._subscribe(node, pattern, queue)

    def _subscribe(self, node: SimNode, pattern: str, queue: str | None) -> None:
        self.next_sub_id += 1
        sub_id = self.next_sub_id
        key = (node.node_id, node.incarnation, sub_id)
        active = self.active[node.node_id]

        def settled(effect: Any) -> None:
            if isinstance(effect, Resolve):
                active[sub_id] = (pattern, queue)
                self.checker.on_subscribed(key, pattern, queue, self.sim.now_s)

        self.sim.feed(node, AddSubscription(sub_id, pattern, queue, None, waiter=settled))

    def _churn(self) -> None:
        """Now and then a node closes one of its subscriptions and opens it again."""
        if self.rng.random() > 0.05:
            return
        sim = self.sim
        live = [n for n in sorted(self.active) if sim.nodes[n].core is not None and self.active[n]
                and sim.nodes[n].paused_until_s <= sim.now_s]
        if not live:
            return
        node = sim.nodes[self.rng.choice(live)]
        sub_id = self.rng.choice(sorted(self.active[node.node_id]))
        pattern, queue = self.active[node.node_id].pop(sub_id)
        self.checker.on_closed((node.node_id, node.incarnation, sub_id))
        sim.feed(node, RemoveSubscription(sub_id, waiter=lambda effect: None))
        self._subscribe(node, pattern, queue)

    # ------------------------------------------------------------------ publishing
    def _live_publishers(self) -> list[SimNode]:
        sim = self.sim
        return [sim.nodes[n] for n in sorted(sim.nodes)
                if sim.nodes[n].core is not None and sim.nodes[n].paused_until_s <= sim.now_s]

    def _publish_random(self) -> None:
        publishers = self._live_publishers()
        if publishers:
            self.publish(self.rng.choice(publishers), self.rng.choice(SUBJECTS), probe=False)

    def publish(self, node: SimNode, subject: str, probe: bool) -> None:
        """``node`` publishes one message, carried out as the I/O shell does."""
        sim = self.sim
        assert node.core is not None
        count = self.published[node.node_id] = self.published.get(node.node_id, 0) + 1
        message_id = f"{node.node_id}/{node.incarnation}/{count}"
        self.checker.on_published(message_id, (node.node_id, node.incarnation), count, subject, probe)
        room = node.core.pubsub
        local, nodes = room.plan(subject)
        for sub_id in local:
            self.checker.on_delivered((node.node_id, node.incarnation, sub_id), message_id)
        grouped = isinstance(nodes, dict)
        for target in nodes:
            queues = (nodes[target] or None) if grouped else None  # type: ignore[index]
            frames = room.batch(target, [(subject, queues, None, message_id.encode())])
            sim.network.send_data(node, target, frames)

    def on_data(self, node: SimNode, frames: list) -> None:
        """A batch arrived at ``node`` (up and not paused)."""
        assert node.core is not None
        room = node.core.pubsub
        try:
            _source, entries = room.received(frames[0], frames[1])
        except Exception as exc:  # a batch the real shell would drop and count: never from a healthy peer
            from meshq.testing.checks import Violation

            raise Violation(f"{node.node_id} could not decode a pub/sub batch: {exc}") from None
        for subject, queues, _headers, data in entries:
            for sub_id in room.deliveries(subject, queues):
                self.checker.on_delivered((node.node_id, node.incarnation, sub_id), data.decode())

    # ------------------------------------------------------------------ liveness
    def _interest_converged(self) -> bool:
        """Every live node routes by every other live node's current interest."""
        sim = self.sim
        live = [n for n in self._live_publishers()]
        live_ids = {n.node_id for n in live}
        for node in live:
            assert node.core is not None
            gone = set(node.core.pubsub._remote_entries) - live_ids
            if gone:
                return False  # it still routes to a node that left or is down (not yet seen dead)
            own = node.core.pubsub.interest()
            if own != node.core.adverts.local.get(ADVERT_KIND):
                return False  # an advert of its own is still waiting to go out
            if len(self.active.get(node.node_id, {})) != len(self.plans[node.node_id]):
                return False
            wanted = frozenset((p, q, c) for p, q, c in own or [])
            for other in live:
                if other is node:
                    continue
                assert other.core is not None
                if other.core.pubsub._remote_entries.get(node.node_id, frozenset()) != wanted:
                    return False
        return bool(live) and sim.now_s >= 0.0

    def _send_probes(self) -> None:
        self.probes_sent_s = self.sim.now_s
        self.checker.expect_probes()
        for node in self._live_publishers():
            for subject in SUBJECTS:
                self.publish(node, subject, probe=True)
