"""Request/reply: the services this node offers, and the requests it sends to services.

Theory of operation
-------------------
**Offering.** ``ServeService`` adds a service to this node's table and advertises the table
through ``core.adverts`` (kind ``services``: ``{name: [idempotent, concurrency]}``), so
every node learns which nodes offer what within a heartbeat interval. A ``rpc_request`` for a
local service becomes a *job*: at most ``concurrency`` jobs of a service run at once (each
one is a ``RunHandler`` effect: the shell runs the handler in the service's worker pool, off
the runtime thread, and feeds back ``HandlerDone``); up to ``QUEUE_LIMIT`` more wait in
order; beyond that the request is refused as ``busy`` and the caller tries another instance.
A job whose caller has given up (its deadline passed while it waited) is dropped unrun.
A request that arrives twice (same caller, incarnation and request id: a duplicated
message) runs once: the second copy is dropped and counted.

**Batches** (pipelined requests, issue #15). A worker is handed its share of the queue at
once: one ``RunHandlers`` of up to ``DISPATCH_AHEAD`` jobs, which it runs one after the other
(at most ``concurrency`` workers have jobs, so ``concurrency`` still bounds the handlers
running at once); its outcomes come back as ``HandlersDone`` and the worker is free when all
its jobs are done. ``rpc_batch`` carries several requests of one caller (each with its own
id and deadline; admitted one by one exactly as ``rpc_request``); the answers made in one
step to one caller leave together as one ``rpc_batch_ok``, which the caller's outbox takes
apart (``_split_answers``) and matches to the requests one by one. On the asking side
``RpcRequests`` decides each request alone and sends those to one instance as one
``rpc_batch`` (``BATCH_MAX``, ``max_frame_bytes``).

**Asking.** ``RpcRequest`` picks one instance among the live nodes offering the service
(``adverts.of`` leaves out suspect and dead nodes): the one with the fewest requests
outstanding from this node, ties broken with ``core.rng`` (``choose``). Outcomes:

===========================================  ===========================================
what happened                                what the caller gets
===========================================  ===========================================
``rpc_reply``                                its payload
``rpc_error`` ``raised``                     ``RemoteError`` (remote type and message)
``rpc_error`` ``busy`` / ``not_serving``     the request did not run there: another
                                             instance is tried (all busy: a short pause,
                                             then again), until the deadline
the instance turned suspect or dead          idempotent service: another instance is tried;
(``Outbox.fail_requests_to``)                else ``OutcomeUnknownError`` (never sent twice)
no instance anywhere                         ``NoRespondersError`` at once — unless this node
                                             started less than ``grace_s`` ago and has not
                                             heard every peer's adverts yet: it waits for
                                             them (bounded), then decides
the deadline passes                          ``TimeoutError``
===========================================  ===========================================

Request ids come from the outbox and are never reused, so a reply that arrives after its
request ended (timed out, or retried elsewhere) matches nothing: the outbox drops it and
counts it (``late_replies``), and it can never complete a later request.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from meshq.core import wire
from meshq.core.cluster.access import VIEW_WAIT_S
from meshq.core.events import (
    DeskServed,
    Fail,
    HandlerDone,
    HandlersDone,
    Resolve,
    RpcReport,
    RpcRequest,
    RpcRequests,
    RunHandler,
    RunHandlers,
    ServeService,
    UnserveService,
)
from meshq.core.outbox import LocalRoute
from meshq.core.room import Room
from meshq.core.rpc.desk import DESKS, SEEN_LIMIT, SeenKeys, desks_of
from meshq.core.rpc.names import SERVICES, offers_of, validate_service_name
from meshq.errors import (
    AuthorizationError,
    MeshqError,
    MessageTooLargeError,
    NodeStoppedError,
    NoRespondersError,
    NotLeaderError,
    OutcomeUnknownError,
    ProtocolError,
    RemoteError,
    TimeoutError,
    UsageError,
    error_from_code,
)

QUEUE_LIMIT = 1024  # requests waiting per service beyond those running; more are refused as busy
MAX_CONCURRENCY = 1024
BUSY_PAUSE_S = 0.005  # every instance was busy: wait this long before asking again
TIMES_KEPT = 1024  # handler times kept per service for p50/p99
DISPATCH_AHEAD = 128  # jobs handed to one worker at once (it runs them one after the other)
BATCH_MAX = 256  # requests per rpc_batch, answers per rpc_batch_ok sent (and at most max_frame_bytes of them)


@dataclass(slots=True)
class Served:
    """One service offered by this node: its limits, its queue and its counts."""

    name: str
    idempotent: bool
    concurrency: int
    running: int = 0  # jobs handed to workers and not done
    workers: int = 0  # workers with jobs (one RunHandlers each): at most ``concurrency``
    queue: deque = field(default_factory=deque)
    served: int = 0
    errors: int = 0
    busy: int = 0
    expired: int = 0
    times_s: deque = field(default_factory=lambda: deque(maxlen=TIMES_KEPT))
    desk: str | None = None  # the endpoint of its desk (meshq.core.rpc.desk), if it has one
    duplicates: int = 0  # requests its desk dropped as duplicates (the room's own are in ``counters``)


@dataclass(slots=True)
class Job:
    """A request for a local service, waiting for a worker or running."""

    job_id: int
    served: Served
    route: Any
    request_id: int
    payload: bytes
    deadline_s: float
    worker: int = 0  # the RunHandlers it was handed out with


@dataclass(slots=True)
class Call:
    """One ``RpcRequest`` of this node, across its attempts."""

    call_id: int
    service: str
    payload: bytes
    deadline_s: float
    waiter: Any
    avoid: set = field(default_factory=set)  # instances that refused it or went silent
    busy: bool = False  # some instance refused it as busy (worth asking again after a pause)
    lost: str | None = None  # an instance that went silent while it ran there (idempotent: retried)
    instance: str | None = None
    idempotent: bool = False
    attempts: int = 0
    waiting: bool = False  # parked: for adverts (startup), or pausing (every instance busy)


class _Sent:
    """One attempt of a call, in flight at ``instance`` under ``request_id``: its pending entry in
    the outbox (a ``PendingRequest``'s fields, and its callbacks as methods), so that a request
    costs one object here rather than an entry and two closures."""

    __slots__ = ("rpc", "call", "instance", "request_id", "peer", "type", "deadline_s")

    def __init__(self, rpc: Rpc, call: Call, instance: str) -> None:
        self.rpc = rpc
        self.call = call
        self.instance = self.peer = instance
        self.type = "rpc_request"
        self.deadline_s = call.deadline_s
        self.request_id = 0  # once the outbox gave it one

    def on_reply(self, message: wire.Message) -> None:
        self.rpc._in_flight.pop(self.request_id, None)
        self.rpc._answered(self.call, self.instance, message)

    def on_error(self, error: MeshqError) -> None:
        self.rpc._in_flight.pop(self.request_id, None)
        self.rpc._failed(self.call, self.instance, error)


def choose(offers: dict[str, Any], outstanding: dict[str, int], avoid: set, rng: Any) -> str | None:
    """The instance to send to: the fewest outstanding requests, ties broken by ``rng``; None if
    every instance is to be avoided. ``offers`` is keyed by node id, in id order."""
    best: list[str] = []
    least = -1
    for node_id in offers:
        if node_id in avoid:
            continue
        count = outstanding.get(node_id, 0)
        if not best or count < least:
            best, least = [node_id], count
        elif count == least:
            best.append(node_id)
    if not best:
        return None
    return best[0] if len(best) == 1 else best[rng.randrange(len(best))]


# ------------------------------------------------------------------ decisions (shared with the caller-thread path)
PARK = "park"  # wait for adverts (startup) or after "busy" everywhere, until the given time
FAIL = "fail"
RETRY = "retry"
REPLY = "reply"


def when_none(call: Call, any_offer: bool, settled: bool, now_s: float, grace_end_s: float) -> tuple[str, Any]:
    """No instance to send ``call`` to: park until a time, or fail with an error."""
    if not any_offer and not call.avoid and not settled:
        return PARK, min(call.deadline_s, grace_end_s)
    if call.busy:
        call.busy = False
        call.avoid.clear()
        return PARK, min(call.deadline_s, now_s + BUSY_PAUSE_S)
    if call.lost is not None:
        return FAIL, NoRespondersError(
            f"the instance of {call.service!r} on {call.lost} went silent and no other live instance serves it; "
            "start another (node.serve / meshq serve) and retry")
    return FAIL, NoRespondersError(
        f"no live instance serves {call.service!r}: start one (node.serve / meshq serve) or check the service "
        "name and the cluster name")


def when_answered(call: Call, instance: str, message: wire.Message) -> tuple[str, Any]:
    """What an answer from ``instance`` means: the reply's bytes, an error, or another instance to try."""
    if message.type == "rpc_reply":
        return REPLY, message.payloads[0]
    if message.type == "error":  # refused before it ran (e.g. ``authorization``): as the outbox reports it
        body = message.body
        return FAIL, error_from_code(body["code"], body["message"], body.get("leader"))
    if message.type != "rpc_error":
        return FAIL, ProtocolError(f"unexpected answer {message.type!r} to a request")
    body = message.body
    if body["reason"] == "raised":
        return FAIL, RemoteError(
            f"the handler of {call.service!r} on {instance} raised {body['error_type']}: {body['message']}",
            error_type=body["error_type"], error_message=body["message"], service=call.service, node_id=instance)
    call.avoid.add(instance)  # it did not run there: ask another instance
    call.busy = call.busy or body["reason"] == "busy"
    return RETRY, None


def when_silent(call: Call, instance: str) -> tuple[str, Any]:
    """``instance`` went suspect, dead or away with ``call`` in flight: retry (idempotent) or fail."""
    if call.idempotent:
        call.avoid.add(instance)
        call.lost = instance
        return RETRY, None
    return FAIL, OutcomeUnknownError(
        f"the instance of {call.service!r} on {instance} went silent while handling the request: its outcome is "
        "unknown (it may or may not have run). The service is not declared idempotent, so the request was not "
        "sent again; check its effect before retrying, or serve it with idempotent=True")


def timed_out(call: Call, instance: str | None) -> TimeoutError:
    where = f" (instance on {instance})" if instance else ""
    return TimeoutError(f"no reply from service {call.service!r}{where} in time; the request may or may not have run")


class Rpc(Room):
    """Services offered here and requests sent from here (see the module docstring)."""

    SERVES = {"rpc_request": "serve_request", "rpc_batch": "serve_batch"}
    COMMANDS = {ServeService: "cmd_serve", UnserveService: "cmd_unserve", RpcRequest: "cmd_request",
                RpcRequests: "cmd_requests", HandlerDone: "cmd_done", HandlersDone: "cmd_dones",
                RpcReport: "cmd_report", DeskServed: "cmd_desk_served"}
    TIMERS = {"rpc_wait": "_resume"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.served: dict[str, Served] = {}
        self._jobs: dict[int, Job] = {}  # running jobs by id
        self._next_job_id = 1
        self._workers: dict[int, int] = {}  # RunHandlers handed out -> its jobs not done yet
        self._next_worker = 1
        self._answers: dict[Any, list] | None = None  # while answering several: route -> answers to send
        self._group: dict[tuple[str, str], list] | None = None  # while asking several: (instance, service) -> calls
        self._offers: dict[str, dict[str, bool]] = {}  # while asking several: service -> its instances
        # request keys, oldest first (bounded; see SeenKeys: a plain dict's eviction cost 25 µs per
        # request at the limit and halved a serving node's throughput after 65,536 requests)
        self._seen = SeenKeys(SEEN_LIMIT)
        self.outstanding: dict[str, int] = {}  # node id -> requests of this node in flight there
        self._in_flight: dict[int, _Sent] = {}  # request id -> the attempt it carries (call, instance)
        self._calls: dict[int, Call] = {}  # calls parked or pausing, by id
        self._next_serve = 0  # ServeService handed to access.when_own_known, numbered
        self._next_call_id = 1
        # after start, wait at most this long for the peers' adverts before saying "no responders"
        self.grace_s = 2 * self.config.heartbeat_interval_s + 0.1
        self.counters = {"requests": 0, "replies": 0, "remote_errors": 0, "timeouts": 0, "no_responders": 0,
                         "retries": 0, "outcome_unknown": 0, "duplicates_dropped": 0,
                         "batches_sent": 0, "batched_requests": 0}  # rpc_batch messages, and requests in them
        core.adverts.watch(SERVICES, self._offers_changed)
        core.access.watch(self.grants_changed)
        core.out.splitters["rpc_batch_ok"] = self._split_answers

    # ------------------------------------------------------------------ offering
    def cmd_serve(self, command: ServeService, now_s: float) -> None:
        # A keyed client node that has not learnt the grants yet waits (briefly) for them, so that a service its
        # key may not serve is refused now rather than offered and ignored by every peer.
        until_s = now_s + VIEW_WAIT_S
        if command.deadline_s is not None:
            until_s = min(until_s, command.deadline_s)
        self._next_serve += 1
        self.core.access.when_own_known(("rpc_serve", self._next_serve), lambda now: self._serve_now(command, now),
                                        lambda error: self.out.emit(Fail(command.waiter, error)), until_s, now_s)

    def _serve_now(self, command: ServeService, now_s: float) -> None:
        try:
            name = validate_service_name(command.service)
            if not 1 <= command.concurrency <= MAX_CONCURRENCY:
                raise UsageError(f"concurrency must be between 1 and {MAX_CONCURRENCY}, not {command.concurrency}")
            if name in self.served:
                raise UsageError(f"service {name!r} is already served by this node; close its handle (or "
                                 "node.unserve) before serving it again")
            self.core.access.refuse_own("serve", name)  # known refused: said now (peers would ignore the offer)
        except MeshqError as exc:
            self.out.emit(Fail(command.waiter, exc))
            return
        self.served[name] = Served(name, bool(command.idempotent), command.concurrency, desk=command.desk)
        self._advertise(now_s)
        self.out.emit(Resolve(command.waiter, None))

    def cmd_unserve(self, command: UnserveService, now_s: float) -> None:
        served = self.served.pop(command.service, None)
        if served is None:
            self.out.emit(Fail(command.waiter, UsageError(f"this node does not serve {command.service!r}")))
            return
        self._advertise(now_s)
        while served.queue:  # not run here: the caller goes to another instance
            job = served.queue.popleft()
            self._refuse(job.route, job.request_id, "not_serving", f"{served.name!r} is no longer served here")
        self.out.emit(Resolve(command.waiter, None))

    def _advertise(self, now_s: float) -> None:
        table = {name: [s.idempotent, s.concurrency] for name, s in sorted(self.served.items())}
        self.core.adverts.set(SERVICES, table or None, now_s)
        desks = {name: s.desk for name, s in sorted(self.served.items()) if s.desk is not None}
        if desks or self.core.adverts.one(DESKS, self.node_id) is not None:
            self.core.adverts.set(DESKS, desks or None, now_s)

    def serve_request(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        self.core.access.check("request", body["service"])  # where grants are held: storage nodes
        served = self._admit(route, message.sender, body["incarnation"], message.request_id, body["service"],
                             message.payloads[0], body["timeout_ms"], now_s)
        if served is not None:
            self._dispatch(served, now_s)

    def serve_batch(self, route: Any, message: wire.Message, now_s: float) -> None:
        """Several requests in one message: each admitted as if alone, then handed to workers
        together; the refusals go back together (``rpc_batch_ok``)."""
        body = message.body
        ids, timeouts = body["ids"], body["timeouts_ms"]
        payloads = unpack(message.payloads[0], body["sizes"])
        if payloads is None or not len(ids) == len(timeouts) == len(payloads):
            self.core.count_invalid(message.sender)  # a confused peer: nothing to answer each item with
            return
        try:
            self.core.access.check("request", body["service"])  # one service per batch
        except AuthorizationError as exc:
            for request_id in ids:  # each request is refused on its own, as if it came alone
                self.out.reply_error(route, request_id, exc)
            return
        self._answers = {}
        try:
            touched: dict[str, Served] = {}
            for request_id, timeout_ms, payload in zip(ids, timeouts, payloads):
                served = self._admit(route, message.sender, body["incarnation"], request_id, body["service"],
                                     payload, timeout_ms, now_s)
                if served is not None:
                    touched[served.name] = served
            for served in touched.values():
                self._dispatch(served, now_s)
        finally:
            self._send_answers()

    def _admit(self, route: Any, sender: str, incarnation: int, request_id: int, service: str, payload: bytes,
               timeout_ms: int, now_s: float) -> Served | None:
        """Queue one request for its service (None: it is refused, or a duplicate)."""
        if request_id and not self._seen.first_time((sender, incarnation, request_id)):
            self.counters["duplicates_dropped"] += 1
            return None
        served = self.served.get(service)
        if served is None:
            self._refuse(route, request_id, "not_serving", f"{service!r} is not served by {self.node_id}")
            return None
        # what the free workers are about to take does not count against the queue's limit
        if len(served.queue) >= QUEUE_LIMIT + (served.concurrency - served.workers) * DISPATCH_AHEAD:
            served.busy += 1
            self._refuse(route, request_id, "busy", f"{served.name!r} on {self.node_id} has "
                         f"{served.running} requests running and {len(served.queue)} queued")
            return None
        served.queue.append(Job(self._next_job_id, served, route, request_id, payload, now_s + timeout_ms / 1000.0))
        self._next_job_id += 1
        return served

    def _dispatch(self, served: Served, now_s: float) -> None:
        """Hand queued jobs to the free workers of ``served``: each takes its share of the queue,
        at most ``DISPATCH_AHEAD``, in one ``RunHandlers``. A job whose caller has given up (its
        deadline passed while it waited) is dropped unrun (the worker checks again before it runs)."""
        queue = served.queue
        while queue and served.workers < served.concurrency and self.served.get(served.name) is served:
            free = served.concurrency - served.workers
            share = min(DISPATCH_AHEAD, -(-len(queue) // free))
            jobs = []
            while queue and len(jobs) < share:
                job = queue.popleft()
                if job.deadline_s <= now_s:
                    served.expired += 1  # running it would only waste a worker
                    continue
                jobs.append(job)
            if not jobs:
                continue
            worker = self._next_worker
            self._next_worker += 1
            self._workers[worker] = len(jobs)
            served.workers += 1
            served.running += len(jobs)
            runs = []
            for job in jobs:
                job.worker = worker
                self._jobs[job.job_id] = job
                runs.append(RunHandler(job.job_id, served.name, job.payload, job.deadline_s))
            self.out.emit(RunHandlers(served.name, tuple(runs)))

    def cmd_done(self, done: HandlerDone, now_s: float) -> None:
        self._finish((done,), now_s)

    def cmd_dones(self, command: HandlersDone, now_s: float) -> None:
        self._finish(command.outcomes, now_s)

    def _finish(self, outcomes: Any, now_s: float) -> None:
        """Jobs done: answer each (those to one caller together), free their workers, hand out more."""
        self._answers = {}
        try:
            touched: dict[str, Served] = {}
            for done in outcomes:
                job = self._jobs.pop(done.job_id, None)
                if job is None:
                    continue  # (the node restarted its core: nothing waits for it)
                served = job.served
                served.running -= 1
                left = self._workers.pop(job.worker) - 1
                if left:
                    self._workers[job.worker] = left
                else:
                    served.workers -= 1
                touched[served.name] = served
                if done.expired:  # the worker found its caller had given up: not run, no answer
                    served.expired += 1
                    continue
                served.times_s.append(done.elapsed_s)
                if done.reply is not None:
                    served.served += 1
                    self._answer(job.route, job.request_id, done.reply, None)
                else:
                    served.errors += 1
                    self._answer(job.route, job.request_id, b"",
                                 ["raised", done.error_type[:200], done.error_message[:4096]])
            for served in touched.values():
                self._dispatch(served, now_s)
        finally:
            self._send_answers()

    def cmd_desk_served(self, command: DeskServed, now_s: float) -> None:
        """A desk's counts since it last told (meshq.core.rpc.desk): added to its service's."""
        served = self.served.get(command.service)
        if served is None:
            return  # withdrawn meanwhile: its counts went with it
        served.served += command.served
        served.errors += command.errors
        served.expired += command.expired
        served.duplicates += command.duplicates
        served.times_s.extend(command.times_s)
        for _ in range(command.invalid):  # (frames its socket got that were not requests)
            self.core.count_invalid("desk")

    def _refuse(self, route: Any, request_id: int, reason: str, text: str) -> None:
        self._answer(route, request_id, b"", [reason, "", text])

    def _answer(self, route: Any, request_id: int, reply: bytes, error: list | None) -> None:
        """Answer one request: now, or (while answering several) with the others to the same caller."""
        if self._answers is not None and request_id and not isinstance(route, LocalRoute):
            self._answers.setdefault(route, []).append((request_id, reply, error))
        elif error is None:
            self.out.reply(route, request_id, "rpc_reply", {}, (reply,))
        else:
            self.out.reply(route, request_id, "rpc_error", {"reason": error[0], "error_type": error[1],
                                                            "message": error[2]})

    def _send_answers(self) -> None:
        answers, self._answers = self._answers, None
        for route, items in (answers or {}).items():
            for chunk in chunks(items, 1, self.config.max_frame_bytes):
                if len(chunk) == 1:
                    self._answer(route, *chunk[0])
                    continue
                sizes = [len(item[1]) for item in chunk]
                self.out.reply_many(route, "rpc_batch_ok", {"ids": [item[0] for item in chunk],
                                                            "errors": [item[2] for item in chunk], "sizes": sizes},
                                    (b"".join([item[1] for item in chunk]),))

    def _split_answers(self, message: wire.Message) -> list[wire.Message]:
        """An ``rpc_batch_ok``: replies are matched to their requests here (``Outbox.claim``: as
        ``on_reply`` matches one) and resolved at once; the errors it carries are returned, each to
        be matched by the outbox and judged (``when_answered``) as if it came alone."""
        body, sender = message.body, message.sender
        payloads = unpack(message.payloads[0], body["sizes"])
        if payloads is None or not len(body["ids"]) == len(body["errors"]) == len(payloads):
            self.core.count_invalid(sender)
            return []
        answers = []
        claim, in_flight, emit = self.out.claim, self._in_flight, self.out.emit
        replies = 0
        for request_id, error, payload in zip(body["ids"], body["errors"], payloads):
            if error is None:
                sent = in_flight.get(request_id)
                if sent is None:  # not a request of ours in flight: the outbox matches it (late, counted)
                    answers.append(wire.Message("rpc_reply", sender, request_id, {}, (payload,)))
                    continue
                if claim(request_id, sender, "rpc_reply") is None:
                    continue  # not the answer to it (counted as late); ours may still come
                del in_flight[request_id]
                self._release(sent.instance)
                replies += 1
                emit(Resolve(sent.call.waiter, payload))
            else:
                answers.append(wire.Message("rpc_error", sender, request_id,
                                            {"reason": error[0], "error_type": error[1], "message": error[2]}))
        self.counters["replies"] += replies
        return answers

    # ------------------------------------------------------------------ asking
    def instances(self, service: str) -> dict[str, bool]:
        """Live nodes offering ``service`` (this one too) whose key may ``serve`` it (``access.may_node``;
        the offers of others are ignored), in id order: node id -> idempotent."""
        found = {}
        may_node = self.core.access.may_node
        for node_id, value in self.core.adverts.of(SERVICES).items():
            offer = offers_of(value).get(service)
            if (offer is not None and (node_id == self.node_id or node_id in self.out.peer_endpoints)
                    and may_node(node_id, "serve", service)):
                found[node_id] = offer[0]
        return found

    def desk(self, node_id: str, service: str) -> str | None:
        """The endpoint of ``service``'s desk on ``node_id`` (meshq.core.rpc.desk), if it advertises one."""
        return desks_of(self.core.adverts.one(DESKS, node_id)).get(service)

    def explain(self, service: str, error: MeshqError) -> MeshqError:
        """A ``NoRespondersError`` for ``service`` that names the live offers ignored for want of a ``serve``
        grant, if any (else ``error`` itself)."""
        if not isinstance(error, NoRespondersError):
            return error
        access = self.core.access
        try:
            ignored = [node_id for node_id, value in self.core.adverts.of(SERVICES).items()
                       if service in offers_of(value) and not access.may_node(node_id, "serve", service)]
        except RuntimeError:  # (from a caller's thread: a table changed under us) said without the detail
            return error
        if not ignored:
            return error
        names = sorted({access.name_of_node(node_id) or "an unknown key" for node_id in ignored})
        return NoRespondersError(
            f"{error} ({len(ignored)} offer(s) of {service!r} ignored: held by {', '.join(names)}, with no grant "
            f"to serve it; the admin can grant it with `meshq acl grant NAME serve {service}`)")

    def grants_changed(self) -> None:
        """This node's view of who may serve changed: parked calls look again (their timers still run)."""
        for call_id in sorted(self._calls):
            call = self._calls.get(call_id)
            if call is not None and self.instances(call.service):
                del self._calls[call_id]
                call.waiting = False
                self._attempt(call, self.core.now_s)

    def cmd_request(self, command: RpcRequest, now_s: float) -> None:
        if self.core.stopped:
            self.out.emit(Fail(command.waiter, NodeStoppedError("the node is stopped")))
            return
        try:
            validate_service_name(command.service)
            if len(command.payload) > self.config.max_frame_bytes:
                raise MessageTooLargeError(f"request of {len(command.payload)} bytes exceeds max_frame_bytes "
                                           f"({self.config.max_frame_bytes})")
        except MeshqError as exc:
            self.out.emit(Fail(command.waiter, exc))
            return
        deadline_s = command.deadline_s if command.deadline_s is not None else now_s + self.config.request_timeout_s
        call = Call(self._next_call_id, command.service, command.payload, deadline_s, command.waiter)
        self._next_call_id += 1
        self.counters["requests"] += 1
        self._attempt(call, now_s)

    def cmd_requests(self, command: RpcRequests, now_s: float) -> None:
        """Several requests: each decided as if alone (least outstanding counts each one); those to
        the same instance of the same service go out together, ``BATCH_MAX`` to a message."""
        self._group = groups = {}
        self._offers = {}
        try:
            for request in command.requests:
                self.cmd_request(request, now_s)
        finally:
            self._group = None
            self._offers = {}
        for (instance, service), calls in groups.items():
            for chunk in chunks(calls, "payload", self.config.max_frame_bytes):
                self._send(instance, service, chunk, now_s)

    def _attempt(self, call: Call, now_s: float) -> None:
        if self._group is None:
            offers = self.instances(call.service)
        else:  # (deciding several at once: the instances do not change meanwhile)
            offers = self._offers.get(call.service)
            if offers is None:
                offers = self._offers[call.service] = self.instances(call.service)
        if now_s >= call.deadline_s:
            if call.attempts == 0:  # never sent: waited for adverts (docs/guarantees.md: nothing was sent)
                self._fail(call, self.explain(call.service, NoRespondersError(
                    f"no live instance of {call.service!r} became known within the timeout: start one "
                    "(node.serve / meshq serve) or check the service name and the cluster name")), "no_responders")
            else:
                self._fail(call, timed_out(call, None), "timeouts")
            return
        instance = choose(offers, self.outstanding, call.avoid, self.core.rng)
        if instance is None:
            settled = bool(offers) or bool(call.avoid) or self._settled(now_s)
            action, value = when_none(call, bool(offers), settled, now_s, self.core.started_s + self.grace_s)
            if action == PARK:
                self._park(call, value)
            else:
                self._fail(call, self.explain(call.service, value), "no_responders")
            return
        call.instance = instance
        call.idempotent = offers[instance]
        call.attempts += 1
        if call.attempts > 1:
            self.counters["retries"] += 1
        self.outstanding[instance] = self.outstanding.get(instance, 0) + 1
        if self._group is not None and instance != self.node_id:
            self._group.setdefault((instance, call.service), []).append(call)  # sent by cmd_requests
        else:
            self._send(instance, call.service, [call], now_s)

    def _send(self, instance: str, service: str, calls: list, now_s: float) -> None:
        """Send ``calls`` (already counted as outstanding there) to ``instance``: one ``rpc_request``,
        or one ``rpc_batch`` carrying them all; each has its own request id, timer and answer."""
        attempts = [_Sent(self, call, instance) for call in calls]
        incarnation = self.core.incarnation
        if len(calls) == 1:
            call, sent = calls[0], attempts[0]
            body = {"service": service, "incarnation": incarnation,
                    "timeout_ms": max(1, int((call.deadline_s - now_s) * 1000))}
            ids = [self.out.request(instance, "rpc_request", body, (call.payload,), now_s, call.deadline_s - now_s,
                                    sent.on_reply, sent.on_error)]
        else:
            body = {"service": service, "incarnation": incarnation,
                    "timeouts_ms": [max(1, int((call.deadline_s - now_s) * 1000)) for call in calls],
                    "sizes": [len(call.payload) for call in calls]}
            ids = self.out.request_batch(instance, "rpc_batch", body, (b"".join([call.payload for call in calls]),),
                                         attempts)
            self.counters["batches_sent"] += 1
            self.counters["batched_requests"] += len(calls)
        pending = self.out.pending
        for request_id, sent in zip(ids, attempts):
            sent.request_id = request_id
            if request_id in pending:  # (not answered already: a request to this node itself)
                self._in_flight[request_id] = sent

    def _settled(self, now_s: float) -> bool:
        """Whether this node has heard what its peers offer and may serve (or waited long enough since it
        started)."""
        if now_s >= self.core.started_s + self.grace_s:
            return True
        if not self.core.access.settled():
            return False
        members = self.core.mesh.members
        peers = [n for n in members.alive_ids() if n != self.node_id] if members is not None else []
        return bool(peers) and all(self.core.adverts.knows(n) for n in peers)

    def _park(self, call: Call, until_s: float) -> None:
        call.waiting = True
        self._calls[call.call_id] = call
        self.out.schedule(until_s, "rpc_wait", call.call_id)

    def _resume(self, call_id: int, now_s: float) -> None:
        call = self._calls.pop(call_id, None)
        if call is not None:
            call.waiting = False
            self._attempt(call, now_s)

    def _offers_changed(self, node_id: str) -> None:
        """A node's services may have changed: parked calls look again (their timers still run).
        If the node left (said goodbye) or died, what was in flight there will not be answered."""
        members = self.core.mesh.members
        member = members.get(node_id) if members is not None else None
        if node_id != self.node_id and (member is None or member.state not in ("alive", "suspect")):
            for request_id in sorted(r for r, sent in self._in_flight.items() if sent.instance == node_id):
                self.out.fail_pending(request_id, NotLeaderError(f"{node_id} left or died"))
        for call_id in sorted(self._calls):
            call = self._calls[call_id]
            if call.call_id in self._calls and self.instances(call.service):
                del self._calls[call_id]
                call.waiting = False
                self._attempt(call, self.core.now_s)

    def _release(self, instance: str) -> None:
        count = self.outstanding.get(instance, 0) - 1
        if count > 0:
            self.outstanding[instance] = count
        else:
            self.outstanding.pop(instance, None)

    def _answered(self, call: Call, instance: str, message: wire.Message) -> None:
        self._release(instance)
        action, value = when_answered(call, instance, message)
        if action == REPLY:
            self.counters["replies"] += 1
            self.out.emit(Resolve(call.waiter, value))
        elif action == RETRY:
            self._attempt(call, self.core.now_s)
        else:
            self._fail(call, value, "remote_errors" if isinstance(value, RemoteError) else None)

    def _failed(self, call: Call, instance: str, error: MeshqError) -> None:
        self._release(instance)
        if isinstance(error, NotLeaderError):  # the instance went suspect or dead (Outbox.fail_requests_to)
            action, value = when_silent(call, instance)
            if action == RETRY:
                self._attempt(call, self.core.now_s)
            else:
                self._fail(call, value, "outcome_unknown")
        elif isinstance(error, TimeoutError):
            self._fail(call, timed_out(call, instance), "timeouts")
        else:
            self._fail(call, error, None)

    def _fail(self, call: Call, error: MeshqError, counter: str | None) -> None:
        if counter is not None:
            self.counters[counter] += 1
        self.out.emit(Fail(call.waiter, error))

    def stop(self, error: MeshqError) -> None:
        """The node stops: parked calls fail (sent ones fail with the outbox's pending requests)."""
        for call_id in sorted(self._calls):
            self.out.emit(Fail(self._calls[call_id].waiter, error))
        self._calls.clear()

    # ------------------------------------------------------------------ status
    def cmd_report(self, command: RpcReport, now_s: float) -> None:
        self.out.emit(Resolve(command.waiter, self.report()))

    def report(self) -> dict:
        """Services offered here (with counts and handler times), instances known, calls made."""
        services = []
        for name, served in sorted(self.served.items()):
            times = sorted(served.times_s)
            services.append({
                "service": name, "node_id": self.node_id, "idempotent": served.idempotent,
                "concurrency": served.concurrency, "in_flight": served.running + len(served.queue),
                "running": served.running, "queued": len(served.queue), "served": served.served,
                "errors": served.errors, "busy": served.busy, "expired": served.expired,
                "duplicates": served.duplicates, "desk": served.desk,
                "p50_ms": _percentile_ms(times, 0.50), "p99_ms": _percentile_ms(times, 0.99)})
        instances: dict[str, list[str]] = {}
        for node_id, value in self.core.adverts.of(SERVICES).items():
            for name in offers_of(value):
                instances.setdefault(name, []).append(node_id)
        late = self.out.late_replies.get("rpc_reply", 0) + self.out.late_replies.get("rpc_error", 0)
        return {"services": services, "instances": {name: ids for name, ids in sorted(instances.items())},
                "calls": {**self.counters, "in_flight": sum(self.outstanding.values()), "late_replies": late}}


def chunks(items: list, payload: Any, max_bytes: int) -> list[list]:
    """``items`` cut into runs of at most ``BATCH_MAX`` whose payloads (attribute ``payload``, or
    index ``payload``) add up to at most ``max_bytes`` (one alone may be up to ``max_bytes``)."""
    if len(items) == 1:
        return [items]
    runs: list[list] = [[]]
    total = 0
    for item in items:
        size = len(getattr(item, payload) if isinstance(payload, str) else item[payload])
        if runs[-1] and (len(runs[-1]) >= BATCH_MAX or total + size > max_bytes):
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += size
    return runs


def unpack(frame: bytes, sizes: list[int]) -> list[bytes] | None:
    """The payloads packed back to back in ``frame``; None if ``sizes`` do not add up to it."""
    if sum(sizes) != len(frame):
        return None
    payloads = []
    at = 0
    for size in sizes:
        payloads.append(frame[at:at + size])
        at += size
    return payloads


def _percentile_ms(sorted_times_s: list, fraction: float) -> float | None:
    if not sorted_times_s:
        return None
    return round(sorted_times_s[min(len(sorted_times_s) - 1, int(fraction * len(sorted_times_s)))] * 1000, 3)
