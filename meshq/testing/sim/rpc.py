"""Request/reply in a simulated run: services on the storage nodes, callers on the clients.

Theory of operation
-------------------
With ``SimOptions.rpc`` on, every storage node serves two services each time it boots (a
restarted process serves again, as a real one would): ``idem`` (declared idempotent) and
``once`` (not), with a concurrency drawn per run. Their handler is the simulator: a
``RunHandlers`` effect is one worker's jobs, each one *execution* (recorded, by node and
payload) after the other, each finished after a simulated handling time by feeding
``HandlerDone`` back to the same incarnation of the node (a node killed meanwhile never
answers). Payloads ending in ``!`` make the handler raise.

Every 20-80 ms during the faults a random client asks one of the services with a payload no
one used before (``r1``, ``r2``...) and a deadline of 0.3-3 s; the outcome (the reply, or the
error) is a ``RpcCall``. One time in four it asks 2-6 at once, with deadlines of their own,
as one ``RpcRequests`` (what the runtime makes of pipelined ``request_async`` calls): they
travel as ``rpc_batch`` messages and come back in ``rpc_batch_ok`` ones. Once the cluster has converged, a probe to each service must succeed.

``RpcChecker`` checks, as outcomes come and at the end:

* every request gets at most one outcome;
* a reply is the one to its own request (the handler answers ``ok:<payload>``: any other reply
  was delivered to the wrong request), and only a request that was executed gets a reply;
* a ``RemoteError`` only for a payload whose handler raised;
* a request to ``once`` (not idempotent) is never executed twice;
* liveness: after convergence, the probes succeed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshq.core.events import HandlerDone, HandlersDone, Resolve, RpcRequest, RpcRequests, RunHandlers, ServeService
from meshq.errors import RemoteError
from meshq.testing.checks import Violation

if TYPE_CHECKING:
    from meshq.testing.sim.node import SimNode
    from meshq.testing.sim.simulation import Simulation

SERVICES = {"idem": True, "once": False}  # name -> idempotent


@dataclass
class RpcCall:
    """One request as its client saw it."""

    service: str
    payload: bytes
    client: str
    outcome: str = "pending"  # pending | ok | failed
    error: str = ""
    reply: bytes = b""


class RpcChecker:
    """The request/reply invariants (see the module docstring)."""

    def __init__(self) -> None:
        self.executions: dict[bytes, int] = {}  # payload -> times a handler ran it
        self.calls: dict[bytes, RpcCall] = {}

    def on_execute(self, service: str, payload: bytes) -> None:
        count = self.executions.get(payload, 0) + 1
        self.executions[payload] = count
        if count > 1 and not SERVICES[service]:
            raise Violation(f"request {payload.decode()} to the non-idempotent service {service!r} was executed "
                            f"{count} times")

    def on_outcome(self, call: RpcCall, effect: Any) -> None:
        if call.outcome != "pending":
            raise Violation(f"request {call.payload.decode()} got a second outcome ({type(effect).__name__} after "
                            f"{call.outcome})")
        if isinstance(effect, Resolve):
            call.outcome, call.reply = "ok", effect.result
            if effect.result != b"ok:" + call.payload:
                raise Violation(f"request {call.payload.decode()} got the reply {effect.result!r}: a reply to "
                                "another request")
            if not self.executions.get(call.payload):
                raise Violation(f"request {call.payload.decode()} got a reply but was never executed")
            return
        call.outcome, call.error = "failed", f"{type(effect.error).__name__}: {effect.error}"
        if isinstance(effect.error, RemoteError) and not call.payload.endswith(b"!"):
            raise Violation(f"request {call.payload.decode()} failed with RemoteError but its handler never raises")

    def summary(self) -> dict:
        calls = self.calls.values()
        return {"rpc_calls": len(self.calls), "rpc_ok": sum(1 for c in calls if c.outcome == "ok"),
                "rpc_executions": sum(self.executions.values())}


class RpcWorkload:
    """Services, callers and probes of request/reply in one run (see the module docstring)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.checker = RpcChecker()
        self.concurrency = sim.rng.choice([1, 2, 4])
        # bursts and hand-backs draw from their own stream, so the run's other draws stay those
        # it made before batches existed (a schedule is only reshuffled by what batching changes)
        self.batch_rng = random.Random(f"rpc-batches-{sim.options.seed}")
        self._count = 0
        self.probes: list[RpcCall] | None = None

    def on_boot(self, node: SimNode) -> None:
        """A storage node (re)started: it serves both services again."""
        if node.role != "storage":
            return
        for name, idempotent in sorted(SERVICES.items()):
            self.sim.feed(node, ServeService(name, idempotent, self.concurrency))

    def run(self, node: SimNode, effect: RunHandlers) -> None:
        """One worker's jobs: run one after the other, each after a simulated handling time; the
        outcomes go back as ``HandlersDone``, each one alone or held for the next (a real worker
        hands back what it has every millisecond), all of them after the last job."""
        self._run_next(node.node_id, node.incarnation, effect.jobs, ())

    def _run_next(self, node_id: str, incarnation: int, jobs: tuple, held: tuple) -> None:
        sim = self.sim
        node = sim.nodes[node_id]
        while jobs and jobs[0].deadline_s <= sim.now_s:  # its caller gave up: the worker skips it
            held += (HandlerDone(jobs[0].job_id, None, expired=True),)
            jobs = jobs[1:]
        if not jobs:
            if held:
                sim.feed(node, HandlersDone(held))
            return
        job = jobs[0]
        self.checker.on_execute(job.service, job.payload)
        sim.log(f"rpc run {job.payload.decode()} on {node_id}")
        sim.at(sim.now_s + sim.rng.uniform(0.0005, 0.05), "rpc_done", (node_id, incarnation, jobs, held))

    def done(self, node_id: str, incarnation: int, jobs: tuple, held: tuple) -> None:
        node = self.sim.nodes[node_id]
        if node.incarnation != incarnation or node.core is None:
            return  # it crashed while handling: nobody answers
        job = jobs[0]
        if job.payload.endswith(b"!"):
            held += (HandlerDone(job.job_id, None, "ValueError", "asked to raise", 0.01),)
        else:
            held += (HandlerDone(job.job_id, b"ok:" + job.payload, elapsed_s=0.01),)
        if len(jobs) == 1 or self.batch_rng.random() < 0.5:
            self.sim.feed(node, HandlersDone(held))
            held = ()
        if len(jobs) > 1 and node.incarnation == incarnation and node.core is not None:
            self._run_next(node_id, incarnation, jobs[1:], held)

    def step(self) -> None:
        """A random client asks one service."""
        sim = self.sim
        clients = sorted(n for n, node in sim.nodes.items() if node.role == "client" and node.up)
        if clients:
            raise_it = sim.rng.random() < 0.05
            client, service = sim.nodes[sim.rng.choice(clients)], sim.rng.choice(sorted(SERVICES))
            if self.batch_rng.random() < 0.25:
                rng = self.batch_rng
                burst = [(sim.rng.uniform(0.3, 3.0), raise_it)] + [
                    (rng.uniform(0.3, 3.0), rng.random() < 0.05) for _ in range(rng.randint(1, 5))]
                self.ask_many(client, service, burst)
            else:
                self.ask(client, service, sim.rng.uniform(0.3, 3.0), raise_it)

    def ask(self, client: SimNode, service: str, timeout_s: float, raise_it: bool = False) -> RpcCall:
        request, call = self._request(client, service, timeout_s, raise_it)
        self.sim.feed(client, request)
        return call

    def ask_many(self, client: SimNode, service: str, burst: list[tuple[float, bool]]) -> list[RpcCall]:
        """Several requests at once: ``burst`` is (timeout, raise it?) per request."""
        made = [self._request(client, service, timeout_s, raise_it) for timeout_s, raise_it in burst]
        self.sim.log(f"rpc burst of {len(made)} from {client.node_id}")
        self.sim.feed(client, RpcRequests(tuple(request for request, _call in made)))
        return [call for _request, call in made]

    def _request(self, client: SimNode, service: str, timeout_s: float, raise_it: bool) -> tuple[RpcRequest, RpcCall]:
        self._count += 1
        payload = f"r{self._count}{'!' if raise_it else ''}".encode()
        call = RpcCall(service, payload, client.node_id)
        self.checker.calls[payload] = call
        sim = self.sim

        def settle(effect: Any) -> None:
            self.checker.on_outcome(call, effect)
            sim.log(f"rpc {payload.decode()} {call.outcome} {call.error[:60]}")

        return RpcRequest(service, payload, sim.now_s + timeout_s, settle), call

    def send_probes(self) -> None:
        """Liveness: once converged, a request to each service from c1 must succeed."""
        client = self.sim.nodes["c1"]
        self.probes = [self.ask(client, name, 5.0) for name in sorted(SERVICES)]
        self.sim.log("rpc probes sent")

    @property
    def probes_done(self) -> bool:
        return self.probes is not None and all(p.outcome != "pending" for p in self.probes)

    def liveness_violation(self) -> Violation | None:
        if self.probes is None:
            return None
        failed = [p for p in self.probes if p.outcome != "ok"]
        if failed:
            return Violation(f"liveness: the request/reply probe to {failed[0].service!r} after convergence did not "
                             f"succeed ({failed[0].outcome}: {failed[0].error})")
        return None
