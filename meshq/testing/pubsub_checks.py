"""Pub/sub's invariants, checked in the simulator as messages are delivered (runs with
``SimOptions.pubsub``; ``meshq.testing.sim.pubsub`` reports to it, ``Checker`` owns it).

A subscription gets each publisher's messages in the order published and never twice, only
messages whose subject matches its pattern, never after it was closed; a queue group never
gets a message twice (across all its members on every node). Liveness: once the cluster has
converged and interest has propagated, a probe published by every node to every subject
reaches every matching subscription, and exactly one member of every matching queue group.
"""

from __future__ import annotations

from typing import Any

from meshq.core.pubsub.subjects import matches
from meshq.testing.checks import Violation


class PubSubChecker:
    """Pub/sub's invariants (see the module docstring); ``meshq.testing.sim.pubsub`` reports to it.

    Subscriptions are keyed ``(node, incarnation, sub id)``, publishers ``(node, incarnation)``;
    a message is named by its id and numbered per publisher from 1."""

    def __init__(self, sim: Any) -> None:
        self.sim = sim
        self.subs: dict[tuple, tuple[str, str | None]] = {}
        self.closed: set[tuple] = set()
        self.messages: dict[str, tuple[tuple, int, str]] = {}  # id -> (publisher, number, subject)
        self.last_from: dict[tuple, int] = {}  # (subscription, publisher) -> number of the last one it got
        self.got: set[tuple[tuple, str]] = set()
        self.queue_got: dict[tuple[str, str], tuple] = {}  # (message, queue group) -> the member that got it
        self.probes: dict[str, tuple[frozenset, frozenset]] = {}  # probe id -> (subscriptions, queue groups)
        self.counts = {"pubsub_published": 0, "pubsub_delivered": 0, "pubsub_subscriptions": 0}

    def on_subscribed(self, key: tuple, pattern: str, queue: str | None, now_s: float) -> None:
        self.subs[key] = (pattern, queue)
        self.counts["pubsub_subscriptions"] += 1

    def on_closed(self, key: tuple) -> None:
        self.closed.add(key)

    def expect_probes(self) -> None:
        """The probes are about to be published: from now on each one is expected everywhere it matches."""

    def _active(self) -> list[tuple]:
        nodes = self.sim.nodes
        return [key for key in sorted(self.subs) if key not in self.closed
                and nodes[key[0]].core is not None and nodes[key[0]].incarnation == key[1]]

    def on_published(self, message_id: str, publisher: tuple, number: int, subject: str, probe: bool) -> None:
        self.messages[message_id] = (publisher, number, subject)
        self.counts["pubsub_published"] += 1
        if probe:
            plain, groups = set(), set()
            for key in self._active():
                pattern, queue = self.subs[key]
                if matches(pattern, subject):
                    if queue is None:
                        plain.add(key)
                    else:
                        groups.add(queue)
            self.probes[message_id] = (frozenset(plain), frozenset(groups))

    def on_delivered(self, key: tuple, message_id: str) -> None:
        self.counts["pubsub_delivered"] += 1
        where = f"{message_id} delivered to subscription {key}"
        if key not in self.subs:
            raise Violation(f"pub/sub: {where}, which was never subscribed")
        if key in self.closed:
            raise Violation(f"pub/sub: {where} after it was closed")
        if message_id not in self.messages:
            raise Violation(f"pub/sub: {where}, but nobody published it")
        publisher, number, subject = self.messages[message_id]
        pattern, queue = self.subs[key]
        if not matches(pattern, subject):
            raise Violation(f"pub/sub: {where}: its subject {subject!r} does not match {pattern!r}")
        if (key, message_id) in self.got:
            raise Violation(f"pub/sub: {where} twice")
        self.got.add((key, message_id))
        last = self.last_from.get((key, publisher))
        if last is not None and number <= last:
            raise Violation(f"pub/sub: {where} after message {last} of the same publisher: out of order")
        self.last_from[(key, publisher)] = number
        if queue is not None:
            other = self.queue_got.setdefault((message_id, queue), key)
            if other != key:
                raise Violation(f"pub/sub: {where}, but queue group {queue!r} already got it at {other}")

    def _missing(self) -> list[str]:
        missing = []
        for message_id in sorted(self.probes):
            plain, groups = self.probes[message_id]
            for key in sorted(plain):
                if (key, message_id) not in self.got:
                    missing.append(f"{message_id} -> {key}")
            for queue in sorted(groups):
                if (message_id, queue) not in self.queue_got:
                    missing.append(f"{message_id} -> queue group {queue}")
        return missing

    def probes_complete(self) -> bool:
        return bool(self.probes) and not self._missing()

    def waiting_for(self) -> str:
        if not self.probes:
            return "were never sent: interest did not converge (or the cluster did not)"
        missing = self._missing()
        return f"not delivered: {len(missing)} (first: {missing[:3]})"

    def fail_probes(self) -> None:
        raise Violation(f"liveness: pub/sub probes {self.waiting_for()}")

    def summary(self) -> dict:
        return dict(self.counts)
