"""Carry out a generator of I/O steps, blocking or on asyncio.

Theory of operation
-------------------
Client logic that both the blocking API and ``meshq.aio`` run (the stream consumer's control
flow, the direct producer's retries) is written once, as a generator that *yields* the I/O it
needs (a step: a command to call, a Future to wait for, a socket exchange) and is *sent* the
outcome. A driver carries the steps out: ``drive`` with blocking calls on the calling thread,
``drive_async`` with awaits on the running loop. An exception a step raised is thrown into the
generator at the ``yield`` that asked for it, so the logic handles it like a plain call's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any

Steps = Generator[Any, Any, Any]


def drive(steps: Steps, do: Callable[[Any], Any]) -> Any:
    """Run ``steps`` to its end, carrying out each step with ``do``; its return value."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value
        try:
            value, error = do(step), None
        except BaseException as exc:  # thrown into the generator at its yield
            value, error = None, exc


async def drive_async(steps: Steps, do: Callable[[Any], Awaitable[Any]]) -> Any:
    """``drive`` on asyncio: ``do`` is awaited."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value
        try:
            value, error = await do(step), None
        except BaseException as exc:
            value, error = None, exc
