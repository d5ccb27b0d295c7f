"""Permissions in a simulated run: grants and revokes agreed through the metadata group under faults.

Theory of operation
-------------------
With ``SimOptions.acl`` on, every 50-300 ms of the fault phase a random client asks (``AclChange``,
through whichever storage node it reaches, which proposes to the metadata leader) to grant or
revoke one of a few ``(name, permission, pattern)`` grants: a grant when the run's last
acknowledged state of that grant is "absent", else a revoke; at most one change per grant is in
flight, so acknowledged changes of one grant are ordered. The outcome is recorded. (The simulated
network carries no key identity, so the requests reach the nodes as an unkeyed node's: what is
simulated is the agreement on grants and their way to the client nodes, not the checks, which
room tests and the multi-process test cover.) Every node runs with a public key (``key_of``) and
each storage node is told the client nodes' keys and names (``TrustedNames``, as its runtime
reads ``cluster/trusted/``), so client nodes ask for the peer grants (``acl_view``) as keyed
ones do.

``AclChecker`` checks:

* after every event, each storage node's grants are exactly those of the committed metadata
  log at the index it has applied (``Checker.acl_history``): every node applies the same
  commands in the same order to the same grants;
* at the end, on every live storage node that applied the whole log, each grant whose last
  change was acknowledged (and no later change of it is unsettled) is held as that change left
  it: an acknowledged grant or revoke is never lost;
* after every event, each client node's view of the peer grants (``request``/``serve``, and with
  ``SimOptions.acl_pubsub`` ``publish``/``subscribe``, which pub/sub checks with) is that
  of some prefix of the committed log — a view never holds what the cluster did not agree — and
  it names the trusted keys as the storage nodes were told;
* at the end, each live client node that has run ``VIEW_SETTLE_S`` since the last committed
  change and since it booted holds the final peer grants: a grant change reaches client nodes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshq.core.acl import PEER_PERMISSIONS
from meshq.core.events import AclChange, Resolve, TrustedNames
from meshq.errors import UsageError
from meshq.testing.checks import Violation

if TYPE_CHECKING:
    from meshq.testing.sim.simulation import Simulation

GRANTS = (("bob", "produce", "orders.>"), ("bob", "consume", "orders.*"), ("carol", "admin", ">"),
          ("carol", "request", "billing.>"), ("bob", "serve", "billing.*"))
PUBSUB_GRANTS = (("bob", "publish", "events.>"), ("carol", "subscribe", "events.*"))  # with SimOptions.acl_pubsub
CLUSTER_KEY = "C" * 40
VIEW_SETTLE_S = 3.0  # a client node asks for the view every second: by then it has the latest one


def peer_view(listing: list[dict]) -> list[dict]:
    """What a client node's view holds of a grant listing: the permissions client nodes check."""
    return [grant for grant in listing if grant["permission"] in PEER_PERMISSIONS]


@dataclass
class AclCall:
    action: str
    grant: tuple[str, str, str]
    outcome: str = "pending"  # pending | ok | failed


class AclChecker:
    """The grant invariants (see the module docstring)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.checks = 0
        self.view_checks = 0
        self._seen = 0  # acl_history entries seen so far
        self._views: set[tuple] = {()}  # the peer views of every committed prefix (the empty one too)
        self.changed_s = 0.0  # when the last committed change was seen
        self.booted_s: dict[str, float] = {}

    def _agreed(self) -> set[tuple]:
        history = self.sim.checker.acl_history
        while self._seen < len(history):
            self._views.add(_key(peer_view(history[self._seen][1])))
            self._seen += 1
            self.changed_s = self.sim.now_s
        return self._views

    def expected_at(self, applied_index: int) -> list[dict]:
        """The grants of the committed log up to ``applied_index``."""
        listing: list[dict] = []
        for index, grants in self.sim.checker.acl_history:
            if index > applied_index:
                break
            listing = grants
        return listing

    def after_event(self, touched: set[str], names: dict[str, str]) -> None:
        agreed = self._agreed()
        for node_id in sorted(touched):
            core = self.sim.nodes[node_id].core
            if core is not None and core.raft is None and core.access.view is not None:
                self.view_checks += 1
                view = core.access.view.listing()
                if _key(view) not in agreed:
                    raise Violation(f"{node_id}: its view of the peer grants {view} is no committed state of them")
                if core.access.names != names:
                    raise Violation(f"{node_id}: its view names the keys {core.access.names}, the storage nodes "
                                    f"were told {names}")
            if core is None or core.raft is None:
                continue
            self.checks += 1
            held, applied = core.meta.acl.listing(), core.meta.applied_index
            if applied < len(self.sim.checker.committed) and held != self.expected_at(applied):
                raise Violation(f"{node_id}: grants {held} at metadata index {applied}, but the committed log "
                                f"gives {self.expected_at(applied)}")

    def at_end(self, calls: list[AclCall]) -> None:
        self._agreed()
        final = peer_view(self.expected_at(len(self.sim.checker.committed)))
        for node_id, node in sorted(self.sim.nodes.items()):
            core = node.core
            if core is None or core.raft is not None or node.role != "client":
                continue
            since = max(self.changed_s, self.booted_s.get(node_id, 0.0))
            if self.sim.now_s - since < VIEW_SETTLE_S:
                continue
            view = core.access.view.listing() if core.access.view is not None else None
            if view != final:
                raise Violation(f"{node_id}: {self.sim.now_s - since:.1f} s after the last grant change its view "
                                f"of the peer grants is {view}, not {final}")
        last: dict[tuple[str, str, str], AclCall] = {}
        for call in calls:
            last[call.grant] = call
        committed = len(self.sim.checker.committed) - 1
        for node_id, node in sorted(self.sim.nodes.items()):
            core = node.core
            if core is None or core.raft is None or core.meta.applied_index < committed:
                continue
            for grant, call in sorted(last.items()):
                if call.outcome != "ok":
                    continue
                held = core.meta.acl.has(*grant)
                if held != (call.action == "grant"):
                    raise Violation(f"{node_id}: the acknowledged {call.action} of {grant} is lost: the grant is "
                                    f"{'held' if held else 'absent'} at the end")


class AclWorkload:
    """Grant and revoke during the faults (see the module docstring)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.rng = random.Random(sim.options.seed * 7919 + 17)  # its own: the other workloads draw as before
        self.calls: list[AclCall] = []
        self.held: dict[tuple[str, str, str], bool] = {}  # the last acknowledged state of each grant
        self.pending: set[tuple[str, str, str]] = set()
        self.checker = AclChecker(sim)

    def step(self) -> None:
        sim = self.sim
        clients = sorted(n for n, node in sim.nodes.items() if node.role == "client" and node.up and node.runs_workload)
        grants = GRANTS + PUBSUB_GRANTS if sim.options.acl_pubsub else GRANTS
        free = [grant for grant in grants if grant not in self.pending]
        if not clients or not free:
            return
        client = sim.nodes[self.rng.choice(clients)]
        grant = self.rng.choice(free)
        call = AclCall("revoke" if self.held.get(grant) else "grant", grant)
        self.calls.append(call)
        self.pending.add(grant)

        def settle(effect: Any) -> None:
            self.pending.discard(grant)
            call.outcome = "ok" if isinstance(effect, Resolve) else "failed"
            if call.outcome == "ok":
                self.held[grant] = call.action == "grant"
            elif isinstance(effect.error, UsageError):  # a revoke of a grant a timed-out revoke already took
                self.held[grant] = False
            sim.log(f"acl {call.action} {' '.join(grant)} {call.outcome}")

        sim.feed(client, AclChange(call.action, *grant, deadline_s=sim.now_s + 2.0, waiter=settle))

    def key_of(self, node: Any) -> str:
        """The public key ``node`` runs with: the cluster's for a storage node, its own for a client node."""
        return CLUSTER_KEY if node.role != "client" else (node.node_id + "k" * 40)[:40]

    def names(self) -> dict[str, str]:
        """The trusted client keys and their holders' names (``c1`` is ``client-c1``)."""
        return {self.key_of(node): f"client-{node.node_id}" for node in self.sim.nodes.values()
                if node.role == "client"}

    def on_boot(self, node: Any) -> None:
        self.checker.booted_s[node.node_id] = self.sim.now_s
        if node.role != "client":
            self.sim.feed(node, TrustedNames(self.names()))

    def at_end(self) -> None:
        self.checker.at_end(self.calls)

    def summary(self) -> dict:
        return {"acl_changes": len(self.calls), "acl_acked": sum(c.outcome == "ok" for c in self.calls),
                "acl_checks": self.checker.checks, "acl_view_checks": self.checker.view_checks}


def _key(listing: list[dict]) -> tuple:
    return tuple((grant["name"], grant["permission"], grant["pattern"]) for grant in listing)
