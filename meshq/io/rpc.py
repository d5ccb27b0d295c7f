"""The I/O shell of request/reply's serving side: each service's handler and worker threads.

Theory of operation
-------------------
The core's ``rpc`` room decides which request runs when (``concurrency``, the queue, refusals)
and hands a worker its jobs with a ``RunHandlers`` effect (one or more jobs, at most
``concurrency`` of these out per service). The runtime thread passes it here (``run``): it is
queued to the service's own pool of ``concurrency`` worker threads, so a slow handler never
holds up the runtime thread or another service. The worker runs the jobs one after the other:
a job whose deadline has passed (``now_s``: the node's clock) is skipped unrun (its caller has
given up); otherwise it calls the handler (bytes in; bytes, or str encoded as UTF-8, out) and
times it. It feeds the outcomes back to the core as one ``HandlersDone`` command (one wake-up
of the runtime thread for the lot) — or, when handlers are slow, what it has every
``_HAND_BACK_S``, so no reply waits long for the jobs after it; the core sends the replies,
those to one caller together.
A handler that raises, returns anything else, or returns a reply larger than
``max_frame_bytes`` gives the caller a ``RemoteError`` naming the error's type and message.

Handlers are registered before the core advertises the service (``add``) and dropped after it
withdrew it (``remove``); the pool of a withdrawn service lets its running handlers finish.

**Desks** (``meshq.core.rpc.desk``). A service served with ``concurrency=1`` by a plain function,
on a node without CURVE keys, gets one worker thread of its own (``_DeskThread``) instead of a
pool: that thread binds a ROUTER (the desk; ``add`` returns its endpoint, which the core
advertises), takes ``rpc_request``s from callers sending from their own threads and answers them
on the same socket, and runs the jobs the core hands it between them (``run`` queues them and
wakes it with an empty message on the same socket, through ``inproc``). What it decides (which requests run, what the answers say,
the counts it tells the core every ``REPORT_S``) is the pure ``Desk``'s. Withdrawn, it finishes
its queued jobs and keeps its socket open for ``DeskSetup.linger_s`` more (two heartbeat
intervals: by then every caller has learnt the withdrawal from the adverts), answering
``not_serving`` to whatever reaches it — so a caller tries another instance at once rather than
wait out its timeout — then ends. When the node stops, it ends at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import zmq

from meshq.core import wire
from meshq.core.events import HandlerDone, HandlersDone, RunHandlers
from meshq.core.rpc.desk import DROP, REFUSE, REPORT_S, Desk
from meshq.core.rpc.room import QUEUE_LIMIT
from meshq.errors import ProtocolError, UsageError
from meshq.io.sockets import EVENTS, NOBLOCK, POLLIN, RCVTIMEO, new_socket, send_frames

log = logging.getLogger("meshq.rpc")

# A worker running several jobs hands back what it has whenever this long passed since it last
# did, so a reply waits at most about this long (plus one handler) for the jobs after it.
_HAND_BACK_S = 0.001


@dataclass(frozen=True)
class DeskSetup:
    """What a desk's socket needs: the node's zmq context, where to bind (``host``) and the host
    callers reach this node at (``advertised_host``), and the node's cluster and id for the frames."""

    context: zmq.Context
    host: str
    advertised_host: str
    cluster: str
    node_id: str
    linger_s: float = 1.0  # a withdrawn desk answers ``not_serving`` this long before it closes


class _Service:
    __slots__ = ("name", "handler", "pool", "loop", "desk")

    def __init__(self, name: str, handler: Callable[[bytes], Any], concurrency: int,
                 loop: asyncio.AbstractEventLoop | None = None, pooled: bool = True) -> None:
        self.name = name
        self.handler = handler
        self.loop = loop  # a coroutine handler runs on this event loop, no worker threads
        self.desk: _DeskThread | None = None  # its one worker, with a socket of its own (module docstring)
        self.pool = None if loop is not None or not pooled else ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix=f"meshq-serve-{_safe(name)}")


def _working(service: _Service) -> bool:
    """A withdrawn service still has a thread running (its handlers finish)."""
    if service.desk is not None:
        return service.desk.thread.is_alive()
    return any(thread.is_alive() for thread in getattr(service.pool, "_threads", ()))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)[:40]


class ServiceWorkers:
    """Handlers and worker pools of the services this node serves (see the module docstring)."""

    def __init__(self, submit: Callable[[Any], None], max_frame_bytes: int,
                 now_s: Callable[[], float] = time.monotonic, desks: DeskSetup | None = None) -> None:
        self._submit = submit  # hands a command to the runtime thread
        self.now_s = now_s  # the clock of the core's deadlines
        self.max_frame_bytes = max_frame_bytes
        self.desks = desks  # None: no service gets a desk (a node with CURVE keys)
        self._services: dict[str, _Service] = {}
        self._retired: list[_Service] = []
        self._lock = threading.Lock()

    def add(self, name: str, handler: Callable[[bytes], Any], concurrency: int,
            loop: asyncio.AbstractEventLoop | None = None) -> str | None:
        """Register ``handler``; with ``loop`` it is a coroutine function run on that loop (meshq.aio).
        Returns the endpoint of the service's desk, or None when it has none (module docstring)."""
        with self._lock:
            if name in self._services:
                raise UsageError(f"service {name!r} is already served by this node; close its handle (or "
                                 "node.unserve) before serving it again")
            if self.desks is not None and loop is None and concurrency == 1:
                service = _Service(name, handler, 1, None, pooled=False)
                service.desk = _DeskThread(self, service, self.desks)
            else:
                service = _Service(name, handler, concurrency, loop)
            self._services[name] = service
        return service.desk.endpoint if service.desk is not None else None

    def remove(self, name: str) -> None:
        """Drop ``name``'s handler; its running calls finish, then its threads end."""
        with self._lock:
            service = self._services.pop(name, None)
        if service is None:
            return
        self._retired = [old for old in self._retired if _working(old)]  # (ended ones are forgotten)
        if service.desk is not None:
            service.desk.stop(cancel=False)
            self._retired.append(service)
        elif service.pool is not None:
            service.pool.shutdown(wait=False)
            self._retired.append(service)

    def inproc(self, name: str) -> str | None:
        """The ``inproc`` endpoint of ``name``'s desk, for callers on this node (None: no desk here)."""
        service = self._services.get(name)
        return service.desk.inproc if service is not None and service.desk is not None else None

    def run(self, effect: RunHandlers) -> None:
        """Queue ``effect``'s jobs to one worker of its service's pool (runtime thread)."""
        service = self._services.get(effect.service)
        if service is None:  # withdrawn between the core's decision and now: answer, never hang
            self._submit(HandlersDone(tuple(HandlerDone(job.job_id, None, "LookupError",
                                                        f"{effect.service!r} is no longer served here", 0.0)
                                            for job in effect.jobs)))
            return
        try:
            if service.desk is not None:
                service.desk.queue(effect)
            elif service.pool is None:  # dispatched straight to the event loop (the core bounds concurrency)
                asyncio.run_coroutine_threadsafe(self._work_async(service, effect), service.loop)  # type: ignore[arg-type]
            else:
                service.pool.submit(self._work, service, effect)
        except RuntimeError:  # the pool is shutting down, or the loop closed (the node stops)
            self._submit(HandlersDone(tuple(HandlerDone(job.job_id, None, "NodeStoppedError",
                                                        "the serving node is stopping", 0.0)
                                            for job in effect.jobs)))

    def _work(self, service: _Service, effect: RunHandlers) -> None:
        outcomes: list = []
        handler, now_s, perf = service.handler, self.now_s, time.perf_counter
        handed = 0  # jobs whose outcomes went back already
        last = perf()
        try:
            for job in effect.jobs:
                if now_s() >= job.deadline_s:
                    outcomes.append(HandlerDone(job.job_id, None, expired=True))
                    continue
                started = perf()
                try:
                    result = handler(job.payload)
                except BaseException as exc:  # (SystemExit too: the caller is told, the worker goes on)
                    result = exc
                outcomes.append(self._outcome(service, job.job_id, result, started))
                now = perf()
                if now - last > _HAND_BACK_S:  # slow handlers: never hold a reply back long
                    handed += len(outcomes)
                    self._submit(HandlersDone(tuple(outcomes)))
                    outcomes, last = [], now
        finally:  # (every job gets its outcome, even if this thread is interrupted)
            done = {outcome.job_id for outcome in outcomes}
            outcomes += [HandlerDone(job.job_id, None, "NodeStoppedError", "the worker stopped", 0.0)
                         for job in effect.jobs[handed:] if job.job_id not in done]
            if outcomes:
                self._submit(HandlersDone(tuple(outcomes)))

    async def _work_async(self, service: _Service, effect: RunHandlers) -> None:
        outcomes = []
        try:
            for job in effect.jobs:
                if self.now_s() >= job.deadline_s:
                    outcomes.append(HandlerDone(job.job_id, None, expired=True))
                    continue
                started = time.perf_counter()
                try:
                    result = await service.handler(job.payload)
                except Exception as exc:
                    result = exc
                outcomes.append(self._outcome(service, job.job_id, result, started))
        finally:
            done = {outcome.job_id for outcome in outcomes}
            outcomes += [HandlerDone(job.job_id, None, "NodeStoppedError", "the worker stopped", 0.0)
                         for job in effect.jobs if job.job_id not in done]
            self._submit(HandlersDone(tuple(outcomes)))

    def _outcome(self, service: _Service, job_id: int, result: Any, started: float) -> HandlerDone:
        """The ``HandlerDone`` for what the handler returned (or raised: ``result`` is the exception)."""
        try:
            if isinstance(result, BaseException):
                raise result
            if type(result) is not bytes:
                result = self._as_reply(service.name, result)
            if len(result) > self.max_frame_bytes:
                done = HandlerDone(job_id, None, "MessageTooLargeError",
                                   f"the reply of {len(result)} bytes exceeds max_frame_bytes ({self.max_frame_bytes})",
                                   time.perf_counter() - started)
            else:
                done = HandlerDone(job_id, result, elapsed_s=time.perf_counter() - started)
        except BaseException as exc:
            done = HandlerDone(job_id, None, type(exc).__name__, str(exc), time.perf_counter() - started)
        return done

    @staticmethod
    def _as_reply(name: str, result: Any) -> bytes:
        if isinstance(result, str):
            return result.encode()
        if isinstance(result, (bytearray, memoryview)):
            return bytes(result)
        raise TypeError(f"the handler of {name!r} returned {type(result).__name__}; return bytes or str")

    def close(self, timeout_s: float = 5.0) -> None:
        """The node stops: no new calls; wait up to ``timeout_s`` for running handlers."""
        with self._lock:
            services, self._services = list(self._services.values()), {}
        services += self._retired
        self._retired = []
        services = [service for service in services if service.pool is not None or service.desk is not None]
        for service in services:
            if service.desk is not None:
                service.desk.stop(cancel=True)
            else:
                service.pool.shutdown(wait=False, cancel_futures=True)  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        for service in services:
            threads = [service.desk.thread] if service.desk is not None else list(getattr(service.pool, "_threads", ()))
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    log.warning("a handler of %r is still running after the node stopped", service.name)


class _DeskThread:
    """The one worker of a service with a desk (module docstring): its socket, its queue of jobs, its thread.

    The thread waits on one socket only, in a blocking receive (no poller): its ROUTER is bound to
    TCP for callers and to ``inproc`` (``inproc``) for ``_waker``, a DEALER through which other threads
    (the runtime's, with jobs; an API thread, withdrawing) wake it with an empty message, and for
    callers on this node. The waker is used under ``_lock`` (a socket may change threads behind a
    lock) and closed by the desk's thread when it ends; the same lock makes queueing a job and the
    desk's end one or the other, so no job is left without an outcome.

    Requests are stamped when the thread first sees them: before it runs one, it drains what its
    socket holds into ``pending`` (at most ``QUEUE_LIMIT``; more are refused as ``busy``), so a
    request's deadline counts the time it waited behind others, and one whose caller gave up is
    not run."""

    _ids = itertools.count(1)

    def __init__(self, workers: ServiceWorkers, service: _Service, setup: DeskSetup) -> None:
        self.workers = workers
        self.service = service
        self.desk = Desk(service.name, setup.node_id, setup.cluster)
        self.linger_s = setup.linger_s
        self.sock = new_socket(setup.context, zmq.ROUTER, workers.max_frame_bytes)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.inproc = f"inproc://meshq-desk-{id(self)}-{next(self._ids)}"
        try:
            self.sock.bind(f"tcp://{setup.host}:*")
            port = self.sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
            self.sock.bind(self.inproc)
        except zmq.ZMQError as exc:
            self.sock.close(0)
            raise UsageError(f"cannot bind a socket for {service.name!r} on {setup.host} ({exc})") from None
        self.endpoint = f"tcp://{setup.advertised_host}:{port}"
        self._waker: zmq.Socket | None = new_socket(setup.context, zmq.DEALER, workers.max_frame_bytes)
        self._waker.setsockopt(zmq.SNDHWM, 16)  # (a wake-up pending is enough: more are dropped)
        self._waker.connect(self.inproc)
        self._lock = threading.Lock()
        self.jobs: deque = deque()
        self.pending: deque = deque()  # (frames, first seen at) read from the socket, not yet taken
        self.closed = False  # the thread has ended (or is ending): no job is queued any more
        self.stopping = False  # withdrawn: run the queued jobs, refuse what waits at the desk, end
        self.cancelled = False  # the node stops: the queued jobs are answered unrun
        self.thread = threading.Thread(target=self._run, name=f"meshq-desk-{_safe(service.name)}", daemon=True)
        self.thread.start()

    def queue(self, effect: RunHandlers) -> None:
        """Jobs from the core (runtime thread): run between the desk's own requests."""
        with self._lock:
            if self.closed or self.stopping:
                raise RuntimeError("the service was withdrawn")
            self.jobs.append(effect)
        self._wake()

    def stop(self, cancel: bool) -> None:
        self.cancelled = self.cancelled or cancel
        self.stopping = True
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            if self._waker is not None:
                try:
                    self._waker.send(b"", NOBLOCK)
                except zmq.ZMQError:
                    pass  # wake-ups are pending already (it reads them all) or the context is closing

    def _next_job(self) -> RunHandlers | None:
        with self._lock:
            return self.jobs.popleft() if self.jobs and not self.cancelled else None

    def _run(self) -> None:
        sock, desk, workers, service, pending = self.sock, self.desk, self.workers, self.service, self.pending
        now_s = workers.now_s
        timeout_ms = -1  # the socket's RCVTIMEO: -1 (wait for good) unless counts wait to be told or it closes
        closing_s = None  # withdrawn: when the socket closes (it answers not_serving until then)
        try:
            while True:
                try:
                    if not pending and not self.jobs:
                        want = -1 if not desk.pending_report() else int(REPORT_S * 1000)
                        if closing_s is not None:
                            left_ms = max(1, int((closing_s - now_s()) * 1000) + 1)
                            want = left_ms if want < 0 else min(want, left_ms)
                        if want != timeout_ms:
                            sock.setsockopt(RCVTIMEO, want)
                            timeout_ms = want
                        try:
                            self._keep(sock.recv_multipart(), now_s())
                        except zmq.Again:
                            pass
                    self._drain(now_s)
                    job = self._next_job()
                    if job is not None:
                        workers._work(service, job)
                        self._drain(now_s)
                    if pending:
                        self._take(*pending.popleft())
                    command = desk.report(now_s())
                    if command is not None:
                        workers._submit(command)
                    if self.stopping and not pending and (not self.jobs or self.cancelled):
                        if self.cancelled or closing_s is None:
                            closing_s = now_s() + (0.0 if self.cancelled else self.linger_s)
                        if now_s() >= closing_s:
                            break
                except zmq.ContextTerminated:
                    break
                except Exception:  # (a bug: say so, and go on serving)
                    log.exception("the desk of %r failed on a message; it goes on", service.name)
                    time.sleep(0.01)
        finally:
            self._close(now_s)

    def _keep(self, frames: list, seen_s: float) -> None:
        """A message read from the socket: a wake-up (an empty frame) is dropped; a request waits in
        ``pending``, stamped, unless ``QUEUE_LIMIT`` wait already: then it is refused as busy."""
        if len(frames) == 2 and not frames[1]:
            return
        if len(self.pending) < QUEUE_LIMIT:
            self.pending.append((frames, seen_s))
        else:
            self._take(frames, seen_s, busy=True)

    def _drain(self, now_s: Callable[[], float]) -> None:
        sock = self.sock
        while sock.get(EVENTS) & POLLIN:
            self._keep(sock.recv_multipart(NOBLOCK), now_s())

    def _take(self, frames: list, seen_s: float, busy: bool = False) -> None:
        """One request from the desk's socket: admitted, run and answered (or refused, or dropped)."""
        desk = self.desk
        if len(frames) < 2:
            desk.invalid += 1
            return
        try:
            message = wire.decode(frames[1:], desk.cluster)
        except wire.InvalidRequest as exc:  # readable enough to answer what is wrong, as the ROUTER does
            desk.invalid += 1
            if exc.request_id:
                send_frames(self.sock, [frames[0], *desk.bad_request(exc.request_id, exc)])
            return
        except ProtocolError:
            desk.invalid += 1
            return
        verdict, value = desk.admit(message, seen_s)
        if verdict is DROP:
            return
        if verdict is REFUSE:
            answer = value
        elif self.stopping:
            answer = desk.refusal(message.request_id, "not_serving",
                                  f"{desk.service!r} is no longer served on {desk.node_id}")
        elif busy:
            answer = desk.refusal(message.request_id, "busy",
                                  f"{desk.service!r} on {desk.node_id} has {len(self.pending)} requests waiting")
        else:
            if self.workers.now_s() >= value:
                done = HandlerDone(0, None, expired=True)  # its caller gave up while it waited: not run
            else:
                started = time.perf_counter()
                try:
                    result = self.service.handler(message.payloads[0])
                except BaseException as exc:  # (SystemExit too: the caller is told, the desk goes on)
                    result = exc
                done = self.workers._outcome(self.service, 0, result, started)
            answer = desk.answer(message.request_id, done)
            if answer is None:
                return
        send_frames(self.sock, [frames[0], *answer])  # (dropped if the caller is gone or not reading: it times out)

    def _close(self, now_s: Callable[[], float]) -> None:
        """Withdrawn or stopping: answer ``not_serving`` to what waits at the desk, tell the counts, close.
        Every job queued gets its outcome: run (withdrawn) or answered unrun (the node stops)."""
        self.stopping = True
        with self._lock:
            self.closed = True
            waker, self._waker = self._waker, None
            leftovers = list(self.jobs)
            self.jobs.clear()
        if waker is not None:
            waker.close(0)
        try:
            self._drain(now_s)
            while self.pending:
                self._take(*self.pending.popleft())
            self.sock.close(linger=200)  # (the refusals just sent still leave)
        except zmq.ZMQError:
            pass
        command = self.desk.report(now_s(), force=True)
        if command is not None:
            self.workers._submit(command)
        for effect in leftovers:
            if self.cancelled:
                self.workers._submit(HandlersDone(tuple(
                    HandlerDone(job.job_id, None, "NodeStoppedError", "the serving node is stopping", 0.0)
                    for job in effect.jobs)))
            else:
                self.workers._work(self.service, effect)


__all__ = ["DeskSetup", "ServiceWorkers"]
