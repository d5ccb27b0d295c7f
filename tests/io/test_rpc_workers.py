"""The serving side's worker pools (meshq.io.rpc.ServiceWorkers): one RunHandlers is one worker
running its jobs in order, the deadline checked before each, the outcomes handed back together
(or every ``_HAND_BACK_S`` when handlers are slow)."""

from __future__ import annotations

import threading
import time

import pytest

from meshq.core.events import HandlersDone, RunHandler, RunHandlers
from meshq.io.rpc import _HAND_BACK_S, ServiceWorkers

pytestmark = pytest.mark.timeout(30)


class Collect:
    def __init__(self, expected: int) -> None:
        self.commands: list = []
        self.expected = expected
        self.all_in = threading.Event()

    def __call__(self, command) -> None:
        self.commands.append(command)
        if sum(len(c.outcomes) for c in self.commands) >= self.expected:
            self.all_in.set()


def run(handler, jobs, concurrency: int = 1) -> list[HandlersDone]:
    collect = Collect(len(jobs))
    workers = ServiceWorkers(collect, 1 << 20)
    workers.add("svc", handler, concurrency)
    try:
        workers.run(RunHandlers("svc", tuple(jobs)))
        assert collect.all_in.wait(10)
    finally:
        workers.close()
    assert all(type(c) is HandlersDone for c in collect.commands)
    return collect.commands


def test_one_worker_runs_its_jobs_in_order_and_hands_back_one_answer_each():
    seen = []

    def handler(payload: bytes) -> bytes:
        seen.append((threading.current_thread().name, payload))
        if payload == b"bad":
            raise KeyError("bad")
        return payload.upper()

    now = time.monotonic()
    jobs = [RunHandler(1, "svc", b"a", now + 10), RunHandler(2, "svc", b"bad", now + 10),
            RunHandler(3, "svc", b"late", now - 1), RunHandler(4, "svc", b"c", now + 10)]
    commands = run(handler, jobs)
    assert len(commands) == 1  # quick handlers: one hand-back for the lot
    outcomes = {o.job_id: o for o in commands[0].outcomes}
    assert [o.job_id for o in commands[0].outcomes] == [1, 2, 3, 4]
    assert outcomes[1].reply == b"A" and outcomes[4].reply == b"C"
    assert (outcomes[2].reply, outcomes[2].error_type) == (None, "KeyError")
    assert outcomes[3].expired and outcomes[3].reply is None  # its caller had given up: not run
    assert [p for _t, p in seen] == [b"a", b"bad", b"c"] and len({t for t, _p in seen}) == 1


def test_slow_handlers_hand_back_as_they_go():
    def handler(payload: bytes) -> bytes:
        time.sleep(3 * _HAND_BACK_S)
        return payload

    now = time.monotonic()
    commands = run(handler, [RunHandler(i, "svc", b"%d" % i, now + 10) for i in range(1, 5)])
    assert len(commands) >= 2  # replies are not held back until the last job is done
    assert [o.job_id for c in commands for o in c.outcomes] == [1, 2, 3, 4]


def test_a_withdrawn_service_answers_every_job():
    collect = Collect(2)
    workers = ServiceWorkers(collect, 1 << 20)
    workers.run(RunHandlers("gone", (RunHandler(1, "gone", b"x"), RunHandler(2, "gone", b"y"))))
    assert [(o.job_id, o.error_type) for o in collect.commands[0].outcomes] == [(1, "LookupError"),
                                                                               (2, "LookupError")]
