"""The simulation's root: it builds one run's nodes and collaborators and runs its event loop.

Theory of operation
-------------------
``Simulation`` builds the nodes (``SimNode``: storage nodes n1..nN, joiners after them, clients
c1.., and g1, g2 for the consumer group's members), the ``Network``, the ``FaultInjector``, the ``Workload``, the ``SimConsumer``, the
clients' ``CallingThread``s and the ``Checker``, all sharing its one ``random.Random(seed)``, its clock ``now_s`` and its queue.
The queue is a heap of ``(time, sequence, kind, data)``: events at the same time run in the
order they were queued. Each event is one of

* ``deliver`` (the network hands a message to its target), ``timer`` (a core's next deadline),
  ``input`` (a held-back input or a ``LogsSynced``), ``restart``, ``join`` — node and core;
* ``fault``, ``outage`` — the fault injector; ``produce``, ``create_topic``, ``leave``,
  ``consume`` — the clients; the periodic ones queue their next turn; ``direct`` — a client's
  calling thread (``CallingThread``: a synchronous produce sent from the thread itself);
* ``group`` — the consumer group's members (``SimGroup``) take their next step;
* ``meet`` — the two groups of ``SimOptions.apart`` can reach each other: one discovers the other;
* ``liveness`` — the fault phase ends: heal, resume and restart everything.

Booting a node builds a fresh ``NodeCore`` with a random stream drawn from the run's and a
wall clock offset by the node's clock jumps; ``_apply`` carries out its effects (messages to
the network, sockets, fsyncs of the memory log, settling waiters) and arms its next timer. A
core that reports it has left is stopped for good, as the runtime stops it.

After every event the checkers look at the nodes whose core ran, and a reassign step that
just committed gives the step nemesis its chance. Once the liveness phase has converged, the
workload sends its probes; once they all succeed and the consumers have read every partition
up to its high watermark (``GroupChecker.waiting_for``), the consumer reads the group's
commits back, and the run ends — or at ``fault_s + liveness_s``, with the checkers' history
check.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from meshq.config import NodeConfig
from meshq.core.events import (
    Connect,
    Disconnect,
    Fail,
    LogsSynced,
    PeerDisconnected,
    PeerDiscovered,
    Publish,
    Reply,
    Resolve,
    ResolveProduce,
    RunHandlers,
    Send,
    Subscribe,
    SyncLogs,
    Unsubscribe,
)
from meshq.core.node import NodeCore
from meshq.log.memory import MemoryStorage
from meshq.testing.checks import Checker, Violation
from meshq.testing.sim.acl import AclWorkload
from meshq.testing.sim.faults import FaultInjector
from meshq.testing.sim.group import NODES as GROUP_NODES
from meshq.testing.sim.group import SimGroup
from meshq.testing.sim.network import Network
from meshq.testing.sim.node import SimNode
from meshq.testing.sim.options import CLUSTER, WALL_BASE_MS, SimOptions
from meshq.testing.sim.pubsub import SimPubSub
from meshq.testing.sim.rpc import RpcWorkload
from meshq.testing.sim.shared import SharedWorkload
from meshq.testing.sim.threads import CallingThread
from meshq.testing.sim.workload import Attempt, SimConsumer, Workload


@dataclass
class SimResult:
    options: SimOptions
    ok: bool
    violations: list[Violation]
    trace: list[str]
    stats: dict[str, Any]

    @property
    def trace_digest(self) -> str:
        return hashlib.sha256("\n".join(self.trace).encode()).hexdigest()[:16]

    def summary(self) -> str:
        verdict = "ok" if self.ok else f"FAILED ({len(self.violations)} violations)"
        return f"seed {self.options.seed}: {verdict}; {self.stats}"


class Simulation:
    """One run: builds the nodes, network, fault injector, workload, consumer and checkers; ``run`` runs it."""

    def __init__(self, options: SimOptions, record_trace: bool = True) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.now_s = 0.0
        self.queue: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.trace: list[str] = []
        self.record_trace = record_trace
        self.touched: set[str] = set()  # nodes whose core ran during the current event: the checkers look at them
        self.faulting = True
        self.stats = {"events": 0, "delivered": 0, "dropped": 0, "duplicated": 0, "kills": 0, "power": 0,
                      "pauses": 0, "partitions": 0, "clock_jumps": 0, "bitflips": 0, "joins": 0, "leaves": 0,
                      "outages": 0}
        self.nodes: dict[str, SimNode] = {}
        self.network = Network(self)
        self.fault_injector = FaultInjector(self)
        for node_id in options.storage_ids:
            self._add_node(node_id, "storage")
        for i in range(options.clients):
            self._add_node(f"c{i + 1}", "client")
        for node_id in GROUP_NODES if options.group_members else ():
            self._add_node(node_id, "client")
            self.nodes[node_id].runs_workload = False
        self.workload = Workload(self)
        self.consumer = SimConsumer(self)
        self.group = SimGroup(self)
        self.progress_waiting: str | None = "not converged"  # what the consumers have yet to read
        self.threads: dict[str, CallingThread] = {}
        for i in range(options.clients):
            stale: set[str] = set()  # shared by the client's threads, as in the real node
            for n in range(options.calling_threads):
                thread = CallingThread(self, f"c{i + 1}", n + 1, stale)
                self.threads[thread.key] = thread
        self.checker = Checker(self)
        self.shared = SharedWorkload(self) if options.shared else None
        self.pubsub = SimPubSub(self) if options.pubsub else None
        self._held_data: dict[tuple[str, int], list] = {}  # (node, incarnation) -> pub/sub batches held while paused
        self.rpc = RpcWorkload(self) if options.rpc else None  # request/reply, when the run has it
        self.acl = AclWorkload(self) if options.acl else None  # grants and revokes, when the run has them

    # ------------------------------------------------------------------ what the checkers read
    @property
    def attempts(self) -> list[Attempt]:
        """Every value the clients produced, in order, with its outcome."""
        return self.workload.attempts

    @property
    def pending_attempts(self) -> int:
        """How many produced values have no outcome yet."""
        return self.workload.pending_attempts

    @property
    def topic_creations(self) -> list[dict]:
        """Every topic the clients tried to create, with its outcome."""
        return self.workload.topic_creations

    # ------------------------------------------------------------------ setup
    def _add_node(self, node_id: str, role: str) -> None:
        storage = MemoryStorage(segment_bytes=4096) if role == "storage" else None
        node = SimNode(node_id, role, storage)
        self.nodes[node_id] = node
        self.network.attach(node)

    def _config(self, node: SimNode) -> NodeConfig:
        first = "n1"
        seeds: tuple[str, ...] = () if node.node_id == first else (f"{first}:1",)
        if node.node_id in self.options.storage_ids[self.options.nodes:]:
            # A joiner is told of every first node, as an operator would list the cluster's
            # nodes: with only n1, a joiner would wait for it forever if it left, and with a
            # node that has not joined yet as its only seed, it could form a cluster of its own.
            seeds = tuple(f"{n}:1" for n in self.options.storage_ids[:self.options.nodes])
        apart = self.options.apart_ids
        if node.node_id in apart:  # a group of its own (SimOptions.apart): each given the others as seeds
            seeds = tuple(f"{n}:1" for n in apart if n != node.node_id)
        elif apart and node.role == "client":
            # The clients are n1's group's, given its whole seed list: cut off from it while the other group is
            # the only one they could reach, they would otherwise have no way back once n1 left.
            seeds = tuple(f"{n}:1" for n in self.options.storage_ids[:self.options.nodes] if n not in apart)
        return NodeConfig(cluster=CLUSTER, node_id=node.node_id, role=node.role,  # type: ignore[arg-type]
                          data_dir="/sim" if node.role == "storage" else None, seeds=seeds, mdns=False,
                          replication_factor=self.options.replication_factor, partitions=self.options.partitions,
                          fsync=self.options.fsync,  # type: ignore[arg-type]
                          request_timeout_s=2.0, member_timeout_s=self.options.member_timeout_s,
                          retention_check_interval_s=5.0)

    def _boot(self, node: SimNode) -> None:
        node.connections.clear()
        node.subscriptions.clear()
        node.incarnation += 1
        rng = random.Random(self.rng.getrandbits(64))
        core = NodeCore(self._config(node), node.node_id, node.storage, rng,
                        lambda n=node: int(self.now_s * 1000) + WALL_BASE_MS + n.wall_offset_ms)
        node.core = core
        self.touched.add(node.node_id)
        if not node.booted and node.node_id in self.options.storage_ids[self.options.nodes:]:
            self.stats["joins"] += 1
            self.log(f"join {node.node_id}")
        node.booted = True
        self.log(f"boot {node.node_id}")
        # with grants, every node is keyed (a public key, and the storage nodes' trusted clients): client nodes
        # then learn the peer grants (acl_view) as keyed ones do; the requests still carry no identity
        public_key = self.acl.key_of(node) if self.acl is not None else ""
        self._apply(node, core.start(node.endpoint, self.now_s, node.pub_endpoint, public_key))
        if self.acl is not None:
            self.acl.on_boot(node)
        if self.rpc is not None:
            self.rpc.on_boot(node)

    # ------------------------------------------------------------------ event queue
    def at(self, when_s: float, kind: str, data: Any) -> None:
        """Queue an event at ``when_s``; events at the same time run in the order queued."""
        self.seq += 1
        heapq.heappush(self.queue, (when_s, self.seq, kind, data))

    def log(self, text: str) -> None:
        """Add a line, stamped with the simulated time, to the trace (if recorded)."""
        if self.record_trace:
            self.trace.append(f"{self.now_s:.6f} {text}")

    def _arm_timer(self, node: SimNode) -> None:
        if node.core is None:
            return
        deadline = node.core.next_deadline()
        if deadline is not None and deadline < node.timer_at_s:
            node.timer_at_s = deadline
            self.at(max(deadline, self.now_s), "timer", (node.node_id, node.incarnation))

    # ------------------------------------------------------------------ effects
    def _apply(self, node: SimNode, effects: list) -> None:
        for effect in effects:
            kind = type(effect)
            if kind is Send:
                self.network.send(node, effect.peer, effect.frames)
            elif kind is Reply:
                self.network.reply(node, effect.route, effect.frames)
            elif kind is Publish:
                self.network.publish(node, effect.frames)
            elif kind is Connect:
                node.connections[effect.peer] = effect.endpoint
            elif kind is Disconnect:
                node.connections.pop(effect.peer, None)
            elif kind is Subscribe:
                node.subscriptions.add(effect.endpoint)
            elif kind is Unsubscribe:
                node.subscriptions.discard(effect.endpoint)
            elif kind is SyncLogs:
                assert node.core is not None
                for key in sorted(effect.keys):
                    state = node.core.partitions.get(key)
                    if state is not None:
                        state.log.sync()
                self.at(self.now_s, "input", (node.node_id, node.incarnation, LogsSynced(effect.keys)))
            elif kind is ResolveProduce:
                effect.waiter.settle(effect.indexes, effect.records, effect.topic, effect.partition,
                                     effect.base_offset, effect.error)
            elif kind in (Resolve, Fail):
                callback = effect.waiter
                if callable(callback):
                    callback(effect)
            elif kind is RunHandlers and self.rpc is not None:
                self.rpc.run(node, effect)
            else:
                raise AssertionError(f"unknown effect {effect!r}")
        self._arm_timer(node)

    def feed(self, node: SimNode, event: Any) -> None:
        """Hand an input to a node's core (held back while it is paused) and carry out its effects."""
        if node.core is None:
            return
        if node.paused_until_s > self.now_s:
            self.at(node.paused_until_s, "input", (node.node_id, node.incarnation, event))
            return
        self.touched.add(node.node_id)
        if type(event) is PeerDisconnected:
            waiting = [rid for rid, request in node.core.out.pending.items() if request.peer == event.peer]
            effects = node.core.handle(event, self.now_s)
            self.checker.after_disconnect(node, event.peer, waiting)
        else:
            effects = node.core.handle(event, self.now_s)
        self._apply(node, effects)
        self._after_core(node)

    def take_data(self, node: SimNode, frames: list) -> None:
        """A pub/sub batch arrived at ``node``: taken now, or when it resumes (in order) if paused."""
        if node.core is None or self.pubsub is None:
            return
        held = self._held_data.setdefault((node.node_id, node.incarnation), [])
        if node.paused_until_s > self.now_s or held:
            # Held in one queue per node and taken in arrival order: a batch that arrives while
            # earlier ones wait (the pause was extended) must not overtake them.
            if not held:
                self.at(node.paused_until_s, "data", (node.node_id, node.incarnation))
            held.append(frames)
            return
        self.touched.add(node.node_id)
        self.pubsub.on_data(node, frames)

    def _take_held_data(self, node: SimNode) -> None:
        """The ``data`` event: a paused node resumed; it takes its held batches in order."""
        held = self._held_data.pop((node.node_id, node.incarnation), [])
        if node.core is None or self.pubsub is None:
            return
        if node.paused_until_s > self.now_s:  # paused again meanwhile: wait for that pause too
            self._held_data[(node.node_id, node.incarnation)] = held
            self.at(node.paused_until_s, "data", (node.node_id, node.incarnation))
            return
        self.touched.add(node.node_id)
        for frames in held:
            self.pubsub.on_data(node, frames)

    def _after_core(self, node: SimNode) -> None:
        """A node that has left stops at once, as the runtime stops it."""
        if node.core is not None and node.core.has_left and not node.departed:
            self._depart(node)

    def _depart(self, node: SimNode) -> None:
        """The node has left: stop it as the runtime does, for good."""
        assert node.core is not None
        self._apply(node, node.core.stop(self.now_s))
        self.checker.before_crash(node, power=False)
        node.core = None
        node.timer_at_s = float("inf")
        node.incarnation += 1  # whatever was queued for it is void
        node.departed = True
        self.stats["leaves"] += 1
        self.log(f"left {node.node_id}: stopped for good")

    # ------------------------------------------------------------------ main loop
    def run(self) -> SimResult:
        started = time.monotonic()
        options = self.options
        joiners = options.storage_ids[options.nodes:]
        for node_id in sorted(self.nodes):
            if node_id not in joiners:
                self._boot(self.nodes[node_id])
        fault_end = options.fault_s
        end = fault_end + options.liveness_s
        for node_id, when_s in zip(joiners, options.joins_s):
            self.at(when_s, "join", node_id)
        if options.leave is not None:
            self.at(options.leave[1], "leave", None)
        if options.outage is not None:
            self.at(options.outage[1], "outage", None)
        if options.apart is not None:
            self.at(options.apart[1], "meet", None)
        if options.slow is not None:
            self.at(options.slow[1], "slow", "start")
            self.at(options.slow[2], "slow", "end")
        if options.starve is not None:
            self.at(options.starve[1], "starve", "start")
            self.at(options.starve[2], "starve", "end")
        self.checker.after_event()
        self.at(0.1, "fault", None)
        self.at(1.0, "produce", None)
        self.at(1.5, "create_topic", None)
        self.at(2.0, "consume", None)
        self.at(2.0, "group", None)
        if self.shared is not None:
            self.at(1.0, "shared", None)
        for thread in self.threads.values():
            thread.start()
        if self.pubsub is not None:
            self.pubsub.start()
        if self.rpc is not None:
            self.at(1.2, "rpc", None)
        if self.acl is not None:
            self.at(1.3, "acl", None)
        self.at(fault_end, "liveness", None)
        violations: list[Violation] = []
        while self.queue:
            when, _seq, kind, data = heapq.heappop(self.queue)
            if when > end:
                break
            self.now_s = when
            self.stats["events"] += 1
            if self.stats["events"] > options.max_events:
                recent = sorted(collections.Counter(" ".join(line.split()[1:3]) for line in self.trace[-10_000:])
                                .items(), key=lambda item: (-item[1], item[0]))[:3]
                violations.append(Violation(f"runaway: more than {options.max_events} events by {self.now_s:.3f} s "
                                            f"(a message storm?); lately most often: {recent}"))
                break
            self.touched.clear()
            try:
                self._event(kind, data, fault_end)
                self.checker.after_event(self.touched)
                self.group.checker.after_event()
                if self.shared is not None:
                    self.shared.checker.on_clock()
                if self.acl is not None:
                    self.acl.checker.after_event(self.touched, self.acl.names())
                if self.checker.new_steps:
                    self.fault_injector.step_nemesis()
            except Violation as violation:
                violations.append(violation)
                break
            except Exception as exc:  # the core raised: always a bug, reported with the seed
                import traceback

                where = "".join(traceback.format_exception(exc)[-3:]).strip()
                violations.append(Violation(f"the core raised {type(exc).__name__}: {exc}\n{where}"))
                break
            if self.checker.converged and self.workload.probes is None:
                self.workload.send_probes()
                if self.rpc is not None:  # once every node has had a heartbeat to re-advertise
                    self.at(self.now_s + 1.0, "rpc_probes", None)
            probes_ok = self.workload.probes is not None and all(a.outcome == "ok" for a in self.workload.probes)
            if probes_ok and self.progress_waiting is not None:
                self.progress_waiting = self.group.checker.waiting_for()
            if probes_ok and self.progress_waiting is None:
                self.consumer.read_commits_at_the_end()
            if (self.workload.probes is not None and all(a.outcome == "ok" for a in self.workload.probes)
                    and self.consumer.final_read == "done" and (self.shared is None or self.shared.finished())
                    and (self.pubsub is None or self.pubsub.done) and (self.rpc is None or self.rpc.probes_done)):
                break
        probes = self.workload.probes
        if not violations and probes is not None and not all(a.outcome == "ok" for a in probes):
            failed = [a for a in probes if a.outcome != "ok"]
            violations.append(Violation(f"liveness: {len(failed)} of {len(probes)} probe writes after "
                                        f"convergence did not succeed ({failed[0].outcome}: {failed[0].error})"))
        if not violations and probes is not None and self.progress_waiting is not None:
            violations.append(Violation(f"liveness: the consumers made no progress to the end of every partition "
                                        f"after convergence: {self.progress_waiting}"))
        if not violations and self.rpc is not None:
            problem = self.rpc.liveness_violation()
            if problem is None and probes is not None and not self.rpc.probes_done:
                problem = Violation("liveness: the request/reply probes after convergence got no outcome")
            if problem is not None:
                violations.append(problem)
        if not violations and probes is not None and self.consumer.final_read != "done":
            violations.append(Violation("liveness: the group's committed offsets could not be read back after "
                                        "convergence"))
        if not violations and probes is not None and self.shared is not None and not self.shared.finished():
            violations.append(Violation("liveness: the shared group did not finish every job (acked or "
                                        "dead-lettered) after convergence"))
        if not violations and self.pubsub is not None and not self.pubsub.done:
            violations.append(Violation(f"liveness: pub/sub probes {self.checker.pubsub.waiting_for()}"))
        if not violations:
            try:
                self.checker.at_end(self.now_s >= end)
                if self.shared is not None:
                    self.shared.at_end()
                if self.acl is not None:
                    self.acl.at_end()
            except Violation as violation:
                violations.append(violation)
        self.stats["sim_s"] = round(self.now_s, 3)
        self.stats["wall_s"] = round(time.monotonic() - started, 3)
        self.stats.update(self.checker.summary())
        self.stats.update(self.group.checker.summary())
        if self.pubsub is not None:
            self.stats.update(self.checker.pubsub.summary())
        self.stats["consumed"] = sum(len(v) for v in self.consumer.seen.values())
        self.stats["commits_acked"] = len(self.consumer.acked_commits)
        self.stats["consumer_restarts"] = self.consumer.generation
        if self.shared is not None:
            self.stats.update(self.shared.checker.summary())
            self.stats["shared_jobs"] = len(self.shared.jobs)
        if self.rpc is not None:
            self.stats.update(self.rpc.checker.summary())
        if self.acl is not None:
            self.stats.update(self.acl.summary())
        if self.threads:
            threads = self.threads.values()
            self.stats["direct_produces"] = sum(t.producer.produced for t in threads)
            self.stats["direct_retries"] = sum(t.producer.retries for t in threads)
            self.stats["direct_failed"] = sum(t.counts["failed"] for t in threads)
            self.stats["direct_through_runtime"] = sum(t.counts["through_runtime"] for t in threads)
        return SimResult(options, not violations, violations, self.trace, self.stats)

    def _event(self, kind: str, data: Any, fault_end: float) -> None:
        if kind == "deliver":
            self.network.deliver(*data)
        elif kind == "timer":
            node_id, incarnation = data
            node = self.nodes[node_id]
            if node.core is None or node.incarnation != incarnation:
                return
            node.timer_at_s = float("inf")
            if node.paused_until_s > self.now_s:
                self.at(node.paused_until_s, "timer", data)
                node.timer_at_s = node.paused_until_s
                return
            self.touched.add(node_id)
            self._apply(node, node.core.on_timer(self.now_s))
            self._after_core(node)
        elif kind == "pubsub":
            assert self.pubsub is not None
            self.pubsub.step()
        elif kind == "data":
            node_id, incarnation = data
            node = self.nodes[node_id]
            if node.incarnation == incarnation:
                self._take_held_data(node)
            else:
                self._held_data.pop((node_id, incarnation), None)  # it restarted: what its SUB held is gone
        elif kind == "input":
            node_id, incarnation, event = data
            node = self.nodes[node_id]
            if node.incarnation == incarnation:
                self.feed(node, event)
        elif kind == "restart":
            node_id, incarnation = data
            node = self.nodes[node_id]
            if (node.core is None and node.incarnation == incarnation and not node.departed
                    and self.now_s >= node.down_until_s):
                self._boot(node)
        elif kind == "join":
            node = self.nodes[data]
            if not node.booted:
                self._boot(node)
        elif kind == "leave":
            self.workload.leave_step()
        elif kind == "outage":
            self.fault_injector.start_outage()
        elif kind == "meet":
            # The two groups of SimOptions.apart can reach each other: as mDNS on one LAN, a node of each group sees
            # one of the other every 2 s (a single sighting is lost with a node that restarts or a link cut then).
            apart = self.options.apart_ids
            ours = [node for node_id, node in sorted(self.nodes.items()) if node_id in apart and node.core is not None]
            theirs = [node for node_id, node in sorted(self.nodes.items()) if node.role == "storage"
                      and node_id not in apart and node.core is not None]
            if ours and theirs:
                a, b = self.rng.choice(ours), self.rng.choice(theirs)
                self.log(f"meet: {a.node_id} and {b.node_id} discover each other")
                self.feed(a, PeerDiscovered(b.core.mesh.self_info()))
                if b.core is not None and a.core is not None:
                    self.feed(b, PeerDiscovered(a.core.mesh.self_info()))
            self.at(self.now_s + 2.0, "meet", None)
        elif kind == "slow":
            assert self.options.slow is not None
            node_id = self.options.slow[0]
            if data == "start":
                self.stats["slow_led_at_start"] = self.checker.led_by(node_id)
                self.log(f"slow {node_id}: +{self.options.slow[3] * 1000:.0f} ms per message to or from it")
            else:
                self.log(f"slow {node_id}: over")
                _node, start, end, extra = self.options.slow
                self.checker.after_slow(node_id, start, f"{extra * 1000:.0f} ms more per message than its peers")
        elif kind == "starve":
            assert self.options.starve is not None
            node_id, start, end, stopped, running = self.options.starve
            node = self.nodes[node_id]
            if data == "end":
                self.log(f"starve {node_id}: over")
                self.checker.after_slow(node_id, start,
                                        f"its CPU for {running * 1000:.0f} ms of every {(stopped + running) * 1000:.0f}")
            else:
                if data == "start":
                    self.stats["slow_led_at_start"] = self.checker.led_by(node_id)
                    self.log(f"starve {node_id}: paused {stopped * 1000:.0f} ms, then running {running * 1000:.0f} ms, "
                             "over and over")
                if self.now_s + stopped + running < end:
                    if node.core is not None:
                        node.paused_until_s = max(node.paused_until_s, self.now_s + stopped)
                    self.at(self.now_s + stopped + running, "starve", "cycle")
        elif kind == "disconnect":
            self.network.disconnect(*data)
        elif kind == "disk_free":
            self.fault_injector.free_disk(data)
        elif kind == "fault":
            if self.faulting:
                self.fault_injector.step()
                self.at(self.now_s + 0.1, "fault", None)
        elif kind == "produce":
            if self.now_s < fault_end:
                self.workload.produce_step()
                self.at(self.now_s + self.options.produce_interval_s, "produce", None)
        elif kind == "rpc":
            if self.now_s < fault_end and self.rpc is not None:
                self.rpc.step()
                self.at(self.now_s + self.rng.uniform(0.02, 0.08), "rpc", None)
        elif kind == "rpc_done":
            if self.rpc is not None:
                self.rpc.done(*data)
        elif kind == "rpc_probes":
            if self.rpc is not None and self.rpc.probes is None:
                self.rpc.send_probes()
        elif kind == "direct":
            self.threads[data[0]].on_event(data[1])
        elif kind == "consume":
            # on through the liveness phase: it must reach the end of every partition after the faults
            if self.consumer.final_read == "not asked":
                self.consumer.step()
                self.at(self.now_s + 0.1, "consume", None)
        elif kind == "group":
            if not self.options.group_members:
                return
            self.group.step()
            self.at(self.now_s + 0.1, "group", None)
        elif kind == "shared":
            assert self.shared is not None
            self.shared.step(fault_end)
            self.at(self.now_s + 0.1, "shared", None)
        elif kind == "acl":
            assert self.acl is not None
            if self.now_s < fault_end:
                self.acl.step()
                self.at(self.now_s + self.acl.rng.uniform(0.05, 0.3), "acl", None)
        elif kind == "create_topic":
            if self.now_s < fault_end:
                self.workload.create_topic_step()
                self.at(self.now_s + self.rng.uniform(0.2, 0.8), "create_topic", None)
        elif kind == "liveness":
            self.faulting = False
            self.network.heal()
            self.log("liveness phase: heal all, resume all, restart all")
            for node_id in sorted(self.nodes):
                node = self.nodes[node_id]
                node.paused_until_s = 0.0
                node.down_until_s = 0.0
                if node.core is None and not node.departed:
                    self._boot(node)
            for node_id in sorted(self.checker.space.full_disks):
                self.fault_injector.free_disk(node_id)
            self.checker.start_liveness(self.now_s)


def run_seed(seed: int, swarm: bool = True, faults: dict | None = None, **overrides: Any) -> SimResult:
    """Run one seed (swarm-drawn options unless ``swarm=False``), with ``overrides`` of its ``SimOptions`` and
    ``faults`` of its ``FaultOptions`` (e.g. ``{"disconnect_s": 1.0}``). Core logging is silenced."""
    logging.getLogger("meshq").setLevel(logging.CRITICAL)
    options = SimOptions.swarm(seed) if swarm else SimOptions(seed=seed)
    if faults:
        options = replace(options, faults=replace(options.faults, **faults))
    if overrides:
        options = replace(options, **overrides)
    return Simulation(options).run()


def failing_runs(seeds: Iterable[int], contains: str = "", stop_at: int | None = 1,
                 **overrides: Any) -> list[tuple[int, str]]:
    """For mutation tests: ``(seed, first violation)`` of the runs of ``seeds`` (``run_seed(seed, **overrides)``,
    in order) that fail with a first violation containing ``contains``, stopping after ``stop_at`` of them
    (``None``: every seed runs). A mutation test needs one such run; the other seeds would only cost CI time."""
    found: list[tuple[int, str]] = []
    for seed in seeds:
        result = run_seed(seed, **overrides)
        if not result.ok and contains in str(result.violations[0]):
            found.append((seed, str(result.violations[0])))
            if stop_at is not None and len(found) >= stop_at:
                break
    return found
