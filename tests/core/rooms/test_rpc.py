"""The ``rpc`` room (meshq.core.rpc.room): services offered through adverts, requests to them."""

from __future__ import annotations

import random

import pytest

from meshq.core.events import HandlerDone, RpcRequest, ServeService, UnserveService
from meshq.core.rpc.names import MAX_SERVICE_BYTES, validate_service_name
from meshq.core.rpc.room import QUEUE_LIMIT, choose
from meshq.errors import (
    NoRespondersError,
    OutcomeUnknownError,
    RemoteError,
    TimeoutError,
    UsageError,
)
from tests.core.rooms.conftest import Net, fire_due_timers, flush


def serve(net: Net, node_id: str, service: str = "echo", **options) -> None:
    token = net[node_id].command(ServeService(service, **options))
    assert net[node_id].resolved.get(token, "missing") is None, net[node_id].failed.get(token)
    net.run(0.1)  # the advert goes out


def ask(net: Net, node_id: str, payload: bytes = b"hi", service: str = "echo", timeout_s: float = 5.0) -> int:
    h = net[node_id]
    token = h.command(RpcRequest(service, payload, h.clock.now_s + timeout_s))
    net.pump()
    return token


def finish(net: Net, node_id: str, reply: bytes | None = None, error: tuple[str, str] | None = None,
           index: int = 0) -> None:
    """Complete the handler job ``index`` of ``node_id`` (echo its payload unless told otherwise)."""
    h = net[node_id]
    job = h.jobs.pop(index)
    if error is not None:
        h.handle(HandlerDone(job.job_id, None, error[0], error[1], 0.001))
    else:
        h.handle(HandlerDone(job.job_id, job.payload if reply is None else reply, elapsed_s=0.002))
    net.pump()


def formed(*node_ids: str) -> Net:
    net = Net(*node_ids)
    net.form()
    return net


# ------------------------------------------------------------------ pure helpers
def test_choose_takes_the_least_outstanding_and_breaks_ties_with_the_rng():
    offers = {"a": False, "b": False, "c": False}
    assert choose(offers, {"a": 2, "b": 1, "c": 3}, set(), random.Random(1)) == "b"
    assert choose(offers, {"a": 0, "b": 1}, {"a", "c"}, random.Random(1)) == "b"
    assert choose(offers, {}, {"a", "b", "c"}, random.Random(1)) is None
    picks = {choose(offers, {}, set(), random.Random(seed)) for seed in range(50)}
    assert picks == {"a", "b", "c"}  # ties spread, not always the first


@pytest.mark.parametrize("name, rule", [
    ("", "empty"), ("a..b", "empty token"), (".a", "empty token"), ("a.", "empty token"),
    ("a.*", "wildcard"), ("a.>", "wildcard"), ("a b", "whitespace"), ("x" * (MAX_SERVICE_BYTES + 1), "at most"),
    (b"echo", "str"),
])
def test_bad_service_names_are_refused_naming_the_rule(name, rule):
    with pytest.raises(ValueError, match=rule):
        validate_service_name(name)


def test_good_service_names_pass():
    for name in ("echo", "billing.invoice.v2", "x" * MAX_SERVICE_BYTES, "grüße.dienst"):
        assert validate_service_name(name) == name


# ------------------------------------------------------------------ through the mesh
def test_a_request_reaches_the_instance_and_its_reply_comes_back():
    net = formed("n1", "n2")
    serve(net, "n1")
    assert net["n2"].core.rpc.instances("echo") == {"n1": False}
    token = ask(net, "n2", b"ping")
    assert [job.service for job in net["n1"].jobs] == ["echo"]
    finish(net, "n1", reply=b"pong")
    assert net["n2"].resolved[token] == b"pong"
    report = net["n1"].core.rpc.report()
    assert report["services"][0]["served"] == 1 and report["services"][0]["p50_ms"] == 2.0


def test_a_node_can_serve_itself():
    net = formed("n1")
    serve(net, "n1")
    token = ask(net, "n1", b"self")
    finish(net, "n1")
    assert net["n1"].resolved[token] == b"self"


def test_a_handler_that_raised_gives_remote_error_with_type_and_message():
    net = formed("n1", "n2")
    serve(net, "n1")
    token = ask(net, "n2")
    finish(net, "n1", error=("KeyError", "'missing'"))
    error = net["n2"].failed[token]
    assert isinstance(error, RemoteError)
    assert (error.error_type, error.error_message, error.node_id) == ("KeyError", "'missing'", "n1")
    assert net["n1"].core.rpc.report()["services"][0]["errors"] == 1


def test_no_instance_anywhere_fails_at_once():
    net = formed("n1", "n2")
    net.run(1.5)  # past the startup grace
    token = ask(net, "n2", service="nobody.home")
    assert isinstance(net["n2"].failed[token], NoRespondersError)
    assert "nobody.home" in str(net["n2"].failed[token])


def test_a_fresh_node_waits_for_the_adverts_before_saying_no_responders():
    net = Net("n1", "n2")
    token = net["n1"].command(ServeService("echo"))
    net.introduce()
    token = ask(net, "n2")  # n2 has not heard n1's adverts yet
    assert token not in net["n2"].failed
    net.run_until(lambda: net["n1"].jobs, within_s=2.0)
    finish(net, "n1")
    assert net["n2"].resolved[token] == b"hi"


def test_requests_spread_by_least_outstanding():
    net = formed("n1", "n2", "n3")
    serve(net, "n1")
    serve(net, "n2")
    tokens = [ask(net, "n3", bytes([i])) for i in range(6)]
    assert len(net["n1"].jobs) == 1 and len(net["n2"].jobs) == 1  # concurrency 1: the rest queue
    assert net["n3"].core.rpc.outstanding == {"n1": 3, "n2": 3}
    while net["n1"].jobs or net["n2"].jobs:
        for node_id in ("n1", "n2"):
            if net[node_id].jobs:
                finish(net, node_id)
    assert sorted(net["n3"].resolved[t] for t in tokens) == [bytes([i]) for i in range(6)]
    assert net["n3"].core.rpc.outstanding == {}


def test_concurrency_bounds_running_handlers_and_the_queue_is_bounded():
    net = formed("n1", "n2")
    serve(net, "n1", concurrency=2)
    for i in range(2 + QUEUE_LIMIT + 1):
        ask(net, "n2", str(i).encode())
    assert len(net["n1"].jobs) == 2
    served = net["n1"].core.rpc.report()["services"][0]
    assert (served["running"], served["queued"], served["busy"]) == (2, QUEUE_LIMIT, 1)


def test_busy_everywhere_pauses_and_asks_again():
    net = formed("n1", "n2")
    serve(net, "n1")
    tokens = [ask(net, "n2", str(i).encode()) for i in range(QUEUE_LIMIT + 2)]
    last = tokens[-1]
    assert last not in net["n2"].failed and last not in net["n2"].resolved  # refused busy, pausing
    for _ in range(QUEUE_LIMIT + 2):
        net.run_until(lambda: net["n1"].jobs, within_s=1.0)
        finish(net, "n1")
    net.run(0.1)
    assert net["n2"].resolved[last] == str(QUEUE_LIMIT + 1).encode()


def test_a_reply_after_the_timeout_is_dropped_and_counted_never_given_to_a_later_request():
    net = formed("n1", "n2")
    serve(net, "n1", concurrency=2)
    first = ask(net, "n2", b"first", timeout_s=0.5)
    net.run(0.6)
    assert isinstance(net["n2"].failed[first], TimeoutError)
    second = ask(net, "n2", b"second")
    finish(net, "n1", index=0)  # the late reply to "first"
    assert second not in net["n2"].resolved
    assert net["n2"].core.rpc.report()["calls"]["late_replies"] == 1
    finish(net, "n1", index=0)
    assert net["n2"].resolved[second] == b"second"


def test_a_queued_job_whose_caller_gave_up_is_not_run():
    net = formed("n1", "n2")
    serve(net, "n1")
    ask(net, "n2", b"long")
    ask(net, "n2", b"short", timeout_s=0.2)
    net.run(0.3)
    finish(net, "n1")
    assert net["n1"].jobs == []
    assert net["n1"].core.rpc.report()["services"][0]["expired"] == 1


def test_an_idempotent_request_is_retried_on_another_instance_when_its_instance_dies():
    net = formed("n1", "n2", "n3")
    serve(net, "n1", idempotent=True)
    serve(net, "n2", idempotent=True)
    token = ask(net, "n3", b"again", timeout_s=30.0)
    first = "n1" if net["n1"].jobs else "n2"
    other = "n2" if first == "n1" else "n1"
    net.cut(first)
    net.run_until(lambda: net[other].jobs, within_s=10.0)
    net.heal()
    finish(net, other)
    assert net["n3"].resolved[token] == b"again"
    assert net["n3"].core.rpc.report()["calls"]["retries"] == 1


def test_a_request_to_a_dying_instance_of_a_non_idempotent_service_fails_outcome_unknown():
    net = formed("n1", "n2", "n3")
    serve(net, "n1")
    serve(net, "n2")
    token = ask(net, "n3", b"once", timeout_s=30.0)
    first = "n1" if net["n1"].jobs else "n2"
    other = "n2" if first == "n1" else "n1"
    net.cut(first)
    net.run_until(lambda: token in net["n3"].failed, within_s=10.0)
    assert isinstance(net["n3"].failed[token], OutcomeUnknownError)
    assert "outcome is unknown" in str(net["n3"].failed[token])
    assert net[other].jobs == []  # never sent twice


def test_a_duplicated_request_runs_once():
    net = formed("n1", "n2")
    serve(net, "n1", concurrency=4)
    h2 = net["n2"]
    h2.command(RpcRequest("echo", b"x", h2.clock.now_s + 5))
    send = h2.sent[-1]
    h2.sent.append(send)  # the network delivers it twice
    net.pump()
    assert len(net["n1"].jobs) == 1
    assert net["n1"].core.rpc.counters["duplicates_dropped"] == 1


def test_the_duplicate_check_forgets_the_oldest_request_keys_first(monkeypatch):
    monkeypatch.setattr("meshq.core.rpc.room.SEEN_LIMIT", 4)
    net = formed("n1", "n2")
    serve(net, "n1", concurrency=8)
    h2 = net["n2"]
    sends = []
    for index in range(6):
        h2.command(RpcRequest("echo", b"%d" % index, h2.clock.now_s + 5))
        sends.append(h2.sent[-1])
        net.pump()
    assert len(net["n1"].jobs) == 6
    h2.sent.extend(sends[2:])  # the last four are remembered: dropped
    net.pump()
    assert len(net["n1"].jobs) == 6
    assert net["n1"].core.rpc.counters["duplicates_dropped"] == 4
    h2.sent.append(sends[0])  # the oldest was forgotten: it runs again
    net.pump()
    assert len(net["n1"].jobs) == 7


def test_serving_twice_is_a_usage_error_and_unserve_withdraws_the_advert():
    net = formed("n1", "n2")
    serve(net, "n1")
    token = net["n1"].command(ServeService("echo"))
    assert isinstance(net["n1"].failed[token], UsageError)
    token = net["n1"].command(UnserveService("echo"))
    assert net["n1"].resolved[token] is None
    net.run(0.1)
    assert net["n2"].core.rpc.instances("echo") == {}
    token = net["n1"].command(UnserveService("echo"))
    assert isinstance(net["n1"].failed[token], UsageError)


def test_unserve_sends_queued_requests_to_another_instance():
    net = formed("n1", "n2", "n3")
    serve(net, "n1")
    ask(net, "n3", b"a")
    queued = ask(net, "n3", b"b")  # n1 alone serves: one runs, one waits in its queue
    assert net["n1"].core.rpc.report()["services"][0]["queued"] == 1
    serve(net, "n2")
    net["n1"].command(UnserveService("echo"))
    net.pump()
    assert net["n1"].core.rpc.report()["services"] == []
    assert [job.payload for job in net["n2"].jobs] == [b"b"]  # refused unrun at n1, sent to n2
    finish(net, "n2")
    finish(net, "n1")  # the running one still answers
    assert net["n3"].resolved[queued] == b"b" and len(net["n3"].resolved) == 2


def test_a_fresh_node_whose_timeout_ends_in_the_grace_says_no_responders_not_timeout():
    net = Net("n1", "n2")
    net.introduce()
    token = ask(net, "n2", service="nobody", timeout_s=0.2)  # shorter than the startup grace
    assert token not in net["n2"].failed  # waiting for the peers' adverts
    net.run(0.3)
    assert isinstance(net["n2"].failed[token], NoRespondersError)


def test_a_call_parked_while_its_instance_was_still_joining_is_sent_once_that_node_is_alive():
    # The offer arrived while the caller knew its node only second-hand ("joining"): an offer counts only from a
    # live node, so the call parked; it must go out when the node turns alive, not wait for its deadline.
    net = Net("n1", "n2")
    net["n1"].command(ServeService("echo"))
    net.introduce()
    net.pump()  # hellos, then n1's adverts reach n2
    assert net["n2"].core.adverts.knows("n1")
    net["n2"].core.mesh.members.members["n1"].state = "joining"  # as when only gossip had named n1 so far
    token = ask(net, "n2", timeout_s=1.0)
    assert token not in net["n2"].failed and not net["n1"].jobs, "parked: no live instance yet"
    net["n2"].core.mesh.hear("n1", net.clock.now_s)  # n1 speaks to n2 itself
    flush(net["n2"])
    net.pump()
    assert net["n1"].jobs, "sent as soon as its instance is alive"
    finish(net, "n1")
    assert net["n2"].resolved[token] == b"hi"


def test_a_call_never_sent_before_its_deadline_says_no_responders_even_if_an_offer_is_visible_by_then():
    net = Net("n1", "n2")
    net["n1"].command(ServeService("echo"))
    net.introduce()
    net.pump()
    member = net["n2"].core.mesh.members.members["n1"]
    member.state = "joining"
    token = ask(net, "n2", timeout_s=0.5)
    member.state = "alive"  # (without telling anyone: only its deadline wakes the call)
    net["n2"].clock.now_s += 0.5
    fire_due_timers(net["n2"])
    error = net["n2"].failed[token]
    assert isinstance(error, NoRespondersError) and "within the timeout" in str(error), error
    assert not net["n1"].jobs
