"""Request/reply in the simulator: services on storage nodes under faults, and checkers that can fail."""

from __future__ import annotations

import pytest

from meshq.core.events import Fail
from meshq.core.rpc import room as rpc_room
from meshq.core.rpc.room import Rpc
from meshq.errors import NotLeaderError
from meshq.testing.sim import SimOptions, failing_runs, run_seed

RPC_SEEDS = range(40)


def faulty(seed: int) -> bool:
    faults = SimOptions.swarm(seed).faults
    return bool(faults.kill_rate or faults.pause_rate or faults.partition_rate or faults.power_rate)


@pytest.mark.parametrize("seed", RPC_SEEDS)
def test_rpc_seed(seed):
    result = run_seed(seed, rpc=True)
    assert result.ok, (f"{result.summary()}\noptions: {result.options}\n{result.violations[0]}\n"
                       f"replay: python -m meshq.testing.sim --seed {seed} --rpc")
    assert result.stats["rpc_ok"] > 0


def test_the_same_seed_gives_the_same_trace_with_rpc():
    first, second = run_seed(3, rpc=True), run_seed(3, rpc=True)
    assert first.trace_digest == second.trace_digest
    assert any(" rpc run " in line for line in first.trace)


def test_checkers_catch_a_non_idempotent_request_sent_again(monkeypatch):
    # Broken variant: a request whose instance went silent is retried whatever the service declared.
    real = Rpc._failed

    def retry_everything(self, call, instance, error):
        call.idempotent = True
        real(self, call, instance, error)

    monkeypatch.setattr(Rpc, "_failed", retry_everything)
    assert failing_runs([s for s in RPC_SEEDS if faulty(s)][:20], rpc=True), "running a request twice went unnoticed"


def test_checkers_catch_a_server_that_runs_a_duplicated_request_twice(monkeypatch):
    # Broken variant: the server forgets the requests it has seen, so a duplicated message runs twice.
    monkeypatch.setattr(rpc_room, "SEEN_LIMIT", 0)
    seeds = [s for s in RPC_SEEDS if SimOptions.swarm(s).faults.duplicate][:20]
    assert failing_runs(seeds, rpc=True), "a duplicated request that ran twice went unnoticed"


def test_checkers_catch_a_reply_given_to_another_request(monkeypatch, rpc=True):
    # Broken variant: replies are handed out in arrival order, not to the request they answer.
    real = Rpc._answered
    replies: list = []

    def crossed(self, call, instance, message):
        if message.type == "rpc_reply" and replies:
            previous = replies.pop()
            replies.append(message)
            message = previous
        elif message.type == "rpc_reply":
            replies.append(message)
        real(self, call, instance, message)

    monkeypatch.setattr(Rpc, "_answered", crossed)
    assert failing_runs(list(RPC_SEEDS)[:5], rpc=True), "a reply delivered to the wrong request went unnoticed"


def test_checkers_catch_a_request_with_two_outcomes(monkeypatch):
    # Broken variant: a request whose instance went silent is failed and retried both.
    real = Rpc._failed

    def fail_and_retry(self, call, instance, error):
        if isinstance(error, NotLeaderError) and call.idempotent:
            self.out.emit(Fail(call.waiter, error))
        real(self, call, instance, error)

    monkeypatch.setattr(Rpc, "_failed", fail_and_retry)
    assert failing_runs([s for s in RPC_SEEDS if faulty(s)][:20], rpc=True), "a second outcome went unnoticed"


def test_checkers_catch_a_server_that_leaks_worker_slots(monkeypatch):
    # Broken variant: a finished handler never gives its worker back, so the service stalls for good.
    real = Rpc._finish

    def leak(self, outcomes, now_s):
        jobs = [self._jobs.get(done.job_id) for done in outcomes]
        real(self, outcomes, now_s)
        for job in jobs:
            if job is not None:
                job.served.workers += 1  # (workers with jobs: what bounds handing out more)

    monkeypatch.setattr(Rpc, "_finish", leak)
    assert failing_runs(list(RPC_SEEDS)[:5], rpc=True), "a stalled service went unnoticed by the liveness check"


def test_checkers_catch_a_batch_whose_answers_are_matched_to_the_wrong_requests(monkeypatch):
    # Broken variant: the caller matches the answers of an rpc_batch_ok to its request ids shifted by one.
    real = Rpc._split_answers

    def shifted(self, message):
        ids = list(message.body["ids"])
        if len(ids) > 1:
            ids = ids[1:] + ids[:1]
        return real(self, type(message)(message.type, message.sender, message.request_id, {**message.body, "ids": ids},
                                        message.payloads))

    monkeypatch.setattr(Rpc, "_split_answers", shifted)
    assert failing_runs(list(RPC_SEEDS)[:5], contains="a reply to another request", rpc=True), \
        "a batch answer delivered to the wrong request went unnoticed"
