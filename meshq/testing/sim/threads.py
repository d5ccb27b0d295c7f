"""Calling threads: synchronous produces a client sends from a thread of its own.

Theory of operation
-------------------
In the real node ``Node.produce`` sends its record to a remote partition leader from the
calling thread, on that thread's own connection (``meshq.io.direct``). ``CallingThread`` is
such a thread on a client node, running the same pure code (``meshq.core.client.direct``): a
``ThreadProducer`` numbers its one-record batches and each call's ``DirectCall`` decides when
to send, wait, pause, refresh or give up. What the real shell does with sockets, polls and
sleeps, this one does with the simulated network and clock:

* A call reads the client core's metadata, peer addresses and member table, as the real
  thread reads the runtime's dictionaries, and sends the ordinary ``produce`` request from
  the client node on a connection of its own (``Network.send_on``, key ``thread:<client>:<n>``).
  The leader's core answers the route it was given, so the reply comes back on that key and is
  handed here (``on_reply``), not to the client's core.
* Waiting is a ``direct`` event every ``LIVENESS_CHECK_S`` until the attempt's
  ``wait_until_s``; each looks at the leader's liveness in the client's member table. Pauses
  are ``direct`` events too; an event queued before the call moved on is void (``_token``).
* A metadata refresh is the ``GetMetadata(refresh=True, auto_create=False)`` command fed to
  the client's core, as the real thread asks its runtime.
* An answer to the call that arrives while it does not wait on that leader's connection stays
  queued there, as in a socket nobody reads, and is read when the call next waits on it; a
  late answer to an earlier call is dropped, as the real shell drops it.
* Where the fast path does not apply (``acks=none``; the client knows no metadata for the
  topic, or no connected remote leader), the thread does what ``Node.produce`` does: it hands
  the record to the client core's producer (``ProduceCommand``) and waits for its outcome.
  (The real shell also takes that path while records of the node are buffered or in flight in
  its runtime producer, to keep one thread's records in order; here the other producers of
  the client are other threads, so that guard is not modelled.)

A caller whose call failed produces its next record to the same partition (as an application
trying again with its next record would), so that a batch whose fate is unknown is followed by
another batch of the same thread there. Each record sent directly is an ``Attempt`` of the
thread's own producer stream ``<client>/t<n>`` (the order check is per stream; records that
went through the runtime are the client's), settled ok at the offset acknowledged or failed;
so the history check requires every acknowledged record in the log exactly once at that
offset, through drops, duplicates, partitions and crashes. A call that fails marks the topic
stale for every thread of its client (the real shell shares that set too). The thread's draws
(acks, keys, partitions, deadlines, pauses between calls, its producer id) come from a
``random.Random`` of its own, seeded from the run's seed, so they move no other draw of the
run; a seed whose runs have no calling threads replays exactly as before.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshq.core import wire
from meshq.core.client.direct import (
    DONE,
    LIVENESS_CHECK_S,
    PAUSING,
    REFRESHING,
    WAITING,
    DirectCall,
    ThreadProducer,
    answer_of,
    leader_silent,
    silent_leader_error,
)
from meshq.core.events import GetMetadata, ProduceCommand
from meshq.errors import MeshqError
from meshq.testing.sim.options import CLUSTER, TOPIC, WALL_BASE_MS
from meshq.testing.sim.workload import Attempt, ProduceWaiter

if TYPE_CHECKING:
    from meshq.core.node import NodeCore
    from meshq.testing.sim.simulation import Simulation

CALL_TIMEOUTS_S = (0.5, 1.0, 5.0)  # short deadlines (fates left unknown), and Node.produce's default
KEYS = 3  # a thread's keys: most of its records go to a few partitions, so sequences run deep there
BETWEEN_CALLS_S = (0.01, 0.1)
MAX_QUEUED = 16  # answers kept per connection while the call does not read it


class CallingThread:
    """One client thread calling ``Node.produce`` again and again (see the module docstring)."""

    def __init__(self, sim: Simulation, client: str, index: int, stale: set[str]) -> None:
        self.sim = sim
        self.client = client
        self.key = f"thread:{client}:{index}"
        self.stream = f"{client}/t{index}"
        self.rng = random.Random(f"thread-{sim.options.seed}-{client}-{index}")
        self.producer = ThreadProducer(self.rng)
        self.stale = stale  # topics whose next call refreshes first: shared by the client's threads
        self.call: DirectCall | None = None
        self.attempt: Attempt | None = None
        self.endpoint: str | None = None  # where the next attempt goes (None: ask the metadata)
        self.leader: str | None = None  # the node the current attempt went to: the connection read
        self.queued: dict[str, list[wire.Message]] = {}  # node -> answers to this call not read yet
        self.again: int | None = None  # the partition of a call that just failed: the next one goes there
        self.counts = {"through_runtime": 0, "failed": 0}
        self._token = 0
        sim.network.open(self.key, self.on_reply)

    def start(self) -> None:
        """The first call comes when the clients' other producers start."""
        self._wake_at(self.rng.uniform(1.0, 1.5))

    # ------------------------------------------------------------------ inputs
    def on_event(self, token: int) -> None:
        """A ``direct`` event: the next call's turn, the end of a pause, or a look while waiting."""
        if token != self._token:
            return  # queued before the call moved on
        call, now_s = self.call, self.sim.now_s
        if call is None:
            self._turn()
        elif call.state == PAUSING:
            self._carry_on(call.resume)
        elif call.state == WAITING:
            core = self._core()
            if now_s >= call.wait_until_s:
                self._carry_on(lambda: call.answered(None, now_s))
            elif leader_silent(core.client.leader_of(call.topic, call.partition), self.client, core.members):
                self._carry_on(lambda: call.answered(silent_leader_error(call.topic, call.partition), now_s))
            else:
                self._wake_at(min(call.wait_until_s, now_s + LIVENESS_CHECK_S))

    def on_reply(self, source: str, message: wire.Message) -> None:
        """An answer on this thread's connection to ``source``."""
        call = self.call
        if call is None or not call.expects(message.request_id):
            return  # a late answer to an earlier call
        if call.state != WAITING or source != self.leader:
            queue = self.queued.setdefault(source, [])
            queue.append(message)
            del queue[:-MAX_QUEUED]
            return
        self._carry_on(lambda: call.answered(answer_of(message), self.sim.now_s))

    # ------------------------------------------------------------------ one call
    def _turn(self) -> None:
        sim = self.sim
        if sim.now_s >= sim.options.fault_s:
            return  # the calls stop with the faults, as the other producers do
        timeout_s = self.rng.choice(CALL_TIMEOUTS_S)
        acks = self.rng.choice(sim.options.acks)
        if acks != "none" and TOPIC in self.stale:
            # The last call to the topic ended without an answer: ask for its metadata first.
            self.stale.discard(TOPIC)
            self._refresh(sim.now_s + timeout_s, lambda: self._begin(timeout_s, acks))
        else:
            self._begin(timeout_s, acks)

    def _begin(self, timeout_s: float, acks: str) -> None:
        """``DirectProducer.try_produce``: straight to the leader, or else through the runtime."""
        sim, core = self.sim, self._core()
        key = f"{self.stream}-k{self.rng.randrange(KEYS)}".encode() if self.rng.random() < 0.5 else None
        asked = self.rng.randrange(sim.options.partitions) if self.rng.random() < 0.2 else None
        if self.again is not None:  # the caller got an error and tries that partition again
            asked, self.again = self.again, None
        record = (key, sim.workload.next_value(), None, WALL_BASE_MS + int(sim.now_s * 1000))
        meta = core.metadata.get(TOPIC)
        if acks == "none" or meta is None:
            self._through_runtime(record, asked, acks, timeout_s)  # (the first produce to a topic, ...)
            return
        partition = self.producer.partition_for(TOPIC, key, asked, meta["config"].partitions)
        self.endpoint = self._leader_endpoint(core, partition, first=True)
        call = self.producer.start(TOPIC, partition, record, acks, sim.now_s + timeout_s,
                                   core.config.request_timeout_s, core.config.batch_max_bytes)
        if self.endpoint is None or call is None:
            self._through_runtime(record, asked, acks, timeout_s)  # no connected remote leader
            return
        self.call, self.attempt = call, self._attempt(record, acks, self.stream)
        sim.log(f"{record[1].decode()} direct from {self.stream} to {partition}")
        self._carry_on(lambda: None)

    def _through_runtime(self, record: tuple, partition: int | None, acks: str, timeout_s: float) -> None:
        """Where the fast path does not apply, ``Node.produce`` hands the record to the runtime's
        producer (this client's own stream) and waits for it: so does the thread."""
        self.counts["through_runtime"] += 1
        attempt = self._attempt(record, acks, self.client)
        self.sim.feed(self.sim.nodes[self.client], ProduceCommand(
            TOPIC, [record], _Answered(self, attempt), partition, acks, self.sim.now_s + timeout_s))

    def _attempt(self, record: tuple, acks: str, stream: str) -> Attempt:
        attempt = Attempt(record[1], acks, stream)
        self.sim.workload.attempts.append(attempt)
        self.sim.workload.pending_attempts += 1
        return attempt

    def _carry_on(self, step: Callable[[], Any]) -> None:
        """Feed one input to the call (``step``), then carry out what it decides until it waits
        for something: a wake-up, an answer, a refresh (``DirectProducer._send_until_answered``)."""
        call = self.call
        assert call is not None
        sim = self.sim
        try:
            base_offset = step()
            while call.state != DONE:
                now_s = sim.now_s
                call.check_deadline(now_s)
                if call.state in (PAUSING, WAITING):
                    self._wake_at(call.pause_until_s if call.state == PAUSING
                                  else min(call.wait_until_s, now_s + LIVENESS_CHECK_S))
                    return
                if call.state == REFRESHING:
                    self.endpoint = None
                    self._refresh(call.deadline_s, lambda: self._carry_on(call.refreshed))
                    return
                if self.endpoint is None:
                    self.endpoint = self._leader_endpoint(self._core(), call.partition, first=False)
                    if self.endpoint is None:
                        call.no_leader(now_s)
                        continue
                base_offset = self._send(call)
        except MeshqError as exc:
            if call.fail(exc):
                self.stale.add(TOPIC)
            self.counts["failed"] += 1
            self.again = call.partition
            self._settle(call, -1, exc)
            return
        self._settle(call, base_offset, None)

    def _send(self, call: DirectCall) -> int | None:
        """One attempt on the connection to the leader, then what already waits on it."""
        assert self.endpoint is not None
        request_id, body = call.attempt(self.sim.now_s)
        self.leader = self.sim.network.node_at(self.endpoint)
        self.sim.network.send_on(self.sim.nodes[self.client], self.key, self.endpoint,
                                 wire.encode(CLUSTER, self.client, "produce", request_id, body, (call.data,)))
        self.endpoint = None  # after this attempt, the next goes where the metadata says then
        queued = self.queued.pop(self.leader or "", [])
        while queued and call.state == WAITING:
            base_offset = call.answered(answer_of(queued.pop(0)), self.sim.now_s)
            if base_offset is not None:
                return base_offset
        return None

    def _settle(self, call: DirectCall, base_offset: int, error: MeshqError | None) -> None:
        assert self.attempt is not None
        waiter = ProduceWaiter(self.sim.workload, [self.attempt])
        waiter.settle([0], None, TOPIC, call.partition, base_offset, error)
        self.call = self.attempt = self.endpoint = self.leader = None
        self.queued.clear()
        self.next_turn()

    def next_turn(self) -> None:
        """The call has returned to the caller, who calls again after a while."""
        self._wake_at(self.sim.now_s + self.rng.uniform(*BETWEEN_CALLS_S))

    # ------------------------------------------------------------------ the client node
    def _core(self) -> NodeCore:
        core = self.sim.nodes[self.client].core
        assert core is not None, "clients are never crashed or paused"
        return core

    def _leader_endpoint(self, core: NodeCore, partition: int, first: bool) -> str | None:
        """``DirectProducer._leader_endpoint``: the metadata's leader, if connected."""
        leader = core.client.leader_of(TOPIC, partition)
        if leader is None:
            return None
        if leader == self.client:
            return None if first else self.sim.nodes[self.client].endpoint
        return core.peer_endpoints.get(leader)

    def _refresh(self, deadline_s: float, then: Callable[[], None]) -> None:
        """Ask the client's core for fresh metadata; ``then`` once it answers, whatever it says."""
        sim = self.sim
        if deadline_s <= sim.now_s:
            then()
            return
        self._token += 1  # nothing else wakes the thread meanwhile
        token = self._token

        def answered(_effect: Any) -> None:
            if token == self._token:
                then()

        sim.feed(sim.nodes[self.client], GetMetadata(TOPIC, refresh=True, auto_create=False, deadline_s=deadline_s,
                                                     waiter=answered))

    def _wake_at(self, when_s: float) -> None:
        self._token += 1
        self.sim.at(when_s, "direct", (self.key, self._token))


class _Answered(ProduceWaiter):
    """The waiter of a call that went through the runtime: the thread calls again once it returns."""

    def __init__(self, thread: CallingThread, attempt: Attempt) -> None:
        super().__init__(thread.sim.workload, [attempt])
        self.thread = thread

    def settle(self, indexes, records, topic, partition, base_offset, error) -> None:
        super().settle(indexes, records, topic, partition, base_offset, error)
        self.thread.next_turn()
