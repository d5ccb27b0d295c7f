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
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from meshq.core.events import HandlerDone, HandlersDone, RunHandler, RunHandlers
from meshq.errors import UsageError

log = logging.getLogger("meshq.rpc")

# A worker running several jobs hands back what it has whenever this long passed since it last
# did, so a reply waits at most about this long (plus one handler) for the jobs after it.
_HAND_BACK_S = 0.001


class _Service:
    __slots__ = ("name", "handler", "pool", "loop")

    def __init__(self, name: str, handler: Callable[[bytes], Any], concurrency: int,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.name = name
        self.handler = handler
        self.loop = loop  # a coroutine handler runs on this event loop, no worker threads
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)[:40]
        self.pool = None if loop is not None else ThreadPoolExecutor(max_workers=concurrency,
                                                                     thread_name_prefix=f"meshq-serve-{safe}")


class ServiceWorkers:
    """Handlers and worker pools of the services this node serves (see the module docstring)."""

    def __init__(self, submit: Callable[[Any], None], max_frame_bytes: int,
                 now_s: Callable[[], float] = time.monotonic) -> None:
        self._submit = submit  # hands a command to the runtime thread
        self.now_s = now_s  # the clock of the core's deadlines
        self.max_frame_bytes = max_frame_bytes
        self._services: dict[str, _Service] = {}
        self._retired: list[_Service] = []
        self._lock = threading.Lock()

    def add(self, name: str, handler: Callable[[bytes], Any], concurrency: int,
            loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Register ``handler``; with ``loop`` it is a coroutine function run on that loop (meshq.aio)."""
        with self._lock:
            if name in self._services:
                raise UsageError(f"service {name!r} is already served by this node; close its handle (or "
                                 "node.unserve) before serving it again")
            self._services[name] = _Service(name, handler, concurrency, loop)

    def remove(self, name: str) -> None:
        """Drop ``name``'s handler; its running calls finish, then its threads end."""
        with self._lock:
            service = self._services.pop(name, None)
        if service is not None and service.pool is not None:
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
            if service.pool is None:  # dispatched straight to the event loop (the core bounds concurrency)
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
                outcomes.append(self._outcome(service, job, result, started))
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
                outcomes.append(self._outcome(service, job, result, started))
        finally:
            done = {outcome.job_id for outcome in outcomes}
            outcomes += [HandlerDone(job.job_id, None, "NodeStoppedError", "the worker stopped", 0.0)
                         for job in effect.jobs if job.job_id not in done]
            self._submit(HandlersDone(tuple(outcomes)))

    def _outcome(self, service: _Service, effect: RunHandler, result: Any, started: float) -> HandlerDone:
        """The ``HandlerDone`` for what the handler returned (or raised: ``result`` is the exception)."""
        try:
            if isinstance(result, Exception):
                raise result
            if type(result) is not bytes:
                result = self._as_reply(service.name, result)
            if len(result) > self.max_frame_bytes:
                done = HandlerDone(effect.job_id, None, "MessageTooLargeError",
                                   f"the reply of {len(result)} bytes exceeds max_frame_bytes ({self.max_frame_bytes})",
                                   time.perf_counter() - started)
            else:
                done = HandlerDone(effect.job_id, result, elapsed_s=time.perf_counter() - started)
        except Exception as exc:
            done = HandlerDone(effect.job_id, None, type(exc).__name__, str(exc), time.perf_counter() - started)
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
        services = [service for service in services if service.pool is not None]
        for service in services:
            service.pool.shutdown(wait=False, cancel_futures=True)  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        for service in services:
            for thread in list(getattr(service.pool, "_threads", ())):
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    log.warning("a handler of %r is still running after the node stopped", service.name)


__all__ = ["ServiceWorkers"]
