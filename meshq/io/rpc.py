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
from meshq.errors import ProtocolError, UsageError
from meshq.io.runtime import _NOBLOCK, _send, new_socket

log = logging.getLogger("meshq.rpc")

# A worker running several jobs hands back what it has whenever this long passed since it last
# did, so a reply waits at most about this long (plus one handler) for the jobs after it.
_HAND_BACK_S = 0.001


_RCVTIMEO = int(zmq.RCVTIMEO)


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
        if service.desk is not None:
            service.desk.stop(cancel=False)
            self._retired.append(service)
        elif service.pool is not None:
            service.pool.shutdown(wait=False)
            self._retired.append(service)

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
                except Exception as exc:
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
            if isinstance(result, Exception):
                raise result
            if type(result) is not bytes:
                result = self._as_reply(service.name, result)
            if len(result) > self.max_frame_bytes:
                done = HandlerDone(job_id, None, "MessageTooLargeError",
                                   f"the reply of {len(result)} bytes exceeds max_frame_bytes ({self.max_frame_bytes})",
                                   time.perf_counter() - started)
            else:
                done = HandlerDone(job_id, result, elapsed_s=time.perf_counter() - started)
        except Exception as exc:
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
    TCP for callers and to ``inproc`` for ``_waker``, a DEALER through which other threads (the
    runtime's, with jobs; an API thread, withdrawing) wake it with an empty message. The waker is
    used under ``_wake_lock`` (a socket may change threads behind a lock) and closed by the desk's
    thread when it ends."""

    _ids = iter(range(1, 1 << 62))

    def __init__(self, workers: ServiceWorkers, service: _Service, setup: DeskSetup) -> None:
        self.workers = workers
        self.service = service
        self.desk = Desk(service.name, setup.node_id, setup.cluster)
        self.linger_s = setup.linger_s
        self.sock = new_socket(setup.context, zmq.ROUTER, workers.max_frame_bytes)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        inproc = f"inproc://meshq-desk-{id(self)}-{next(self._ids)}"
        try:
            self.sock.bind(f"tcp://{setup.host}:*")
            port = self.sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
            self.sock.bind(inproc)
        except zmq.ZMQError as exc:
            self.sock.close(0)
            raise UsageError(f"cannot bind a socket for {service.name!r} on {setup.host} ({exc})") from None
        self.endpoint = f"tcp://{setup.advertised_host}:{port}"
        self._waker: zmq.Socket | None = setup.context.socket(zmq.DEALER)
        self._waker.setsockopt(zmq.LINGER, 0)
        self._waker.setsockopt(zmq.SNDHWM, 16)  # (a wake-up pending is enough: more are dropped)
        self._waker.connect(inproc)
        self._wake_lock = threading.Lock()
        self.jobs: deque = deque()
        self.stopping = False  # withdrawn: run the queued jobs, refuse what waits at the desk, end
        self.cancelled = False  # the node stops: drop the queued jobs too
        self.thread = threading.Thread(target=self._run, name=f"meshq-desk-{_safe(service.name)}", daemon=True)
        self.thread.start()

    def queue(self, effect: RunHandlers) -> None:
        """Jobs from the core (runtime thread): run between the desk's own requests."""
        if self.stopping:
            raise RuntimeError("the service was withdrawn")
        self.jobs.append(effect)
        self._wake()

    def stop(self, cancel: bool) -> None:
        self.cancelled = self.cancelled or cancel
        self.stopping = True
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._waker is not None:
                try:
                    self._waker.send(b"", _NOBLOCK)
                except zmq.ZMQError:
                    pass  # wake-ups are pending already (it reads them all) or the context is closing

    def _run(self) -> None:
        sock, desk, jobs, workers, service = self.sock, self.desk, self.jobs, self.workers, self.service
        now_s = workers.now_s
        recv = sock.recv_multipart
        timeout_ms = -1  # the socket's RCVTIMEO: -1 (wait for good) unless counts wait to be told or it closes
        closing_s = None  # withdrawn: when the socket closes (it answers not_serving until then)
        try:
            while True:
                want = -1 if not desk.pending_report() else int(REPORT_S * 1000)
                if closing_s is not None:
                    left_ms = max(1, int((closing_s - now_s()) * 1000) + 1)
                    want = left_ms if want < 0 else min(want, left_ms)
                if want != timeout_ms:
                    sock.setsockopt(_RCVTIMEO, want)
                    timeout_ms = want
                try:
                    frames = recv()
                except zmq.Again:
                    frames = None
                if frames is not None and (len(frames) != 2 or frames[1]):  # (an empty frame: a wake-up)
                    self._take(frames, now_s)
                while jobs and not self.cancelled:
                    workers._work(service, jobs.popleft())
                command = desk.report(now_s())
                if command is not None:
                    workers._submit(command)
                if self.stopping and (not jobs or self.cancelled):
                    if self.cancelled or closing_s is None:
                        closing_s = now_s() + (0.0 if self.cancelled else self.linger_s)
                    if now_s() >= closing_s:
                        break
        except Exception:  # (a bug: say so; callers then time out rather than hang for good)
            log.exception("the desk of %r stopped", service.name)
        finally:
            self._close(now_s)

    def _take(self, frames: list, now_s: Callable[[], float]) -> None:
        """One message from the desk's socket: admitted, run and answered (or refused, or dropped)."""
        desk = self.desk
        if len(frames) < 2:
            desk.invalid += 1
            return
        try:
            message = wire.decode(frames[1:], desk.cluster)
        except ProtocolError:
            desk.invalid += 1
            return
        now = now_s()
        verdict, value = desk.admit(message, now)
        if verdict is DROP:
            return
        if verdict is REFUSE or self.stopping:
            answer = value if verdict is REFUSE else desk.refusal(
                message.request_id, "not_serving", f"{desk.service!r} is no longer served on {desk.node_id}")
        else:
            if now >= value:
                done = HandlerDone(0, None, expired=True)
            else:
                started = time.perf_counter()
                try:
                    result = self.service.handler(message.payloads[0])
                except Exception as exc:
                    result = exc
                done = self.workers._outcome(self.service, 0, result, started)
            answer = desk.answer(message.request_id, done)
            if answer is None:
                return
        _send(self.sock, [frames[0], *answer])  # (dropped if the caller is gone or not reading: it times out)

    def _close(self, now_s: Callable[[], float]) -> None:
        """Withdrawn or stopping: answer ``not_serving`` to what waits at the desk, tell the counts, close."""
        self.stopping = True
        with self._wake_lock:
            waker, self._waker = self._waker, None
        if waker is not None:
            waker.close(0)
        try:
            while True:
                try:
                    frames = self.sock.recv_multipart(_NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) != 2 or frames[1]:
                    self._take(frames, now_s)
            self.sock.close(linger=200)  # (the refusals just sent still leave)
        except zmq.ZMQError:
            pass
        command = self.desk.report(now_s(), force=True)
        if command is not None:
            self.workers._submit(command)
        leftovers = list(self.jobs)
        self.jobs.clear()
        if leftovers and not self.cancelled:  # (a job queued after the loop's last look)
            for effect in leftovers:
                self.workers._work(self.service, effect)


__all__ = ["DeskSetup", "ServiceWorkers"]
