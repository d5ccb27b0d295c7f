"""Batched request/reply in the ``rpc`` room: several requests in one ``rpc_batch``, a worker
handed several jobs at once (``RunHandlers``), their answers in one ``rpc_batch_ok`` — and every
request still gets exactly its own reply or error."""

from __future__ import annotations

from meshq.core import wire
from meshq.core.events import HandlerDone, HandlersDone, RequestReceived, RpcRequest, RpcRequests
from meshq.core.rpc.room import BATCH_MAX, DISPATCH_AHEAD
from meshq.errors import OutcomeUnknownError, RemoteError, TimeoutError
from tests.core.rooms.conftest import Net
from tests.core.rooms.test_rpc import formed, serve


def ask_many(net: Net, node_id: str, payloads: list[bytes], service: str = "echo",
             timeouts_s: list[float] | None = None) -> list[int]:
    """One ``RpcRequests`` (what the runtime makes of pipelined ``request_async`` calls); the tokens."""
    h = net[node_id]
    requests = []
    for index, payload in enumerate(payloads):
        timeout_s = timeouts_s[index] if timeouts_s else 5.0
        requests.append(RpcRequest(service, payload, h.clock.now_s + timeout_s, waiter=f"{node_id}-{payload!r}"))
    h.handle(RpcRequests(tuple(requests)))
    net.pump()
    return [request.waiter for request in requests]


def finish_all(net: Net, node_id: str, raise_for: bytes = b"", expired: bytes = b"") -> None:
    """The workers of ``node_id`` run every job they are handed until none is left: each echoes,
    raises for ``raise_for``, finds ``expired`` past its deadline; one ``HandlersDone`` per worker."""
    h = net[node_id]
    while h.workers:
        effect = h.workers.pop(0)
        for job in effect.jobs:
            h.jobs.remove(job)
        outcomes = []
        for job in effect.jobs:
            if job.payload == expired:
                outcomes.append(HandlerDone(job.job_id, None, expired=True))
            elif job.payload == raise_for:
                outcomes.append(HandlerDone(job.job_id, None, "ValueError", f"bad {job.payload!r}", 0.001))
            else:
                outcomes.append(HandlerDone(job.job_id, job.payload, elapsed_s=0.001))
        h.handle(HandlersDone(tuple(outcomes)))
        net.pump()


def test_a_batch_travels_as_one_message_and_each_request_gets_its_own_answer():
    net = formed("n1", "n2")
    serve(net, "n1")
    since = net.clock.now_s
    payloads = [b"p%d" % i for i in range(10)]
    tokens = ask_many(net, "n2", payloads)
    assert len(net.sent("n2", "rpc_batch", since)) == 1 and net.sent("n2", "rpc_request", since) == []
    assert [len(w.jobs) for w in net["n1"].workers] == [10]  # concurrency 1: one worker, all ten handed at once
    finish_all(net, "n1", raise_for=b"p3")
    assert len(net.sent("n1", "rpc_batch_ok", since)) == 1
    for token, payload in zip(tokens, payloads):
        if payload == b"p3":
            error = net["n2"].failed[token]
            assert isinstance(error, RemoteError) and error.error_message == "bad b'p3'"
        else:
            assert net["n2"].resolved[token] == payload
    report = net["n1"].core.rpc.report()["services"][0]
    assert (report["served"], report["errors"], report["running"], report["in_flight"]) == (9, 1, 0, 0)
    assert net["n2"].core.rpc.outstanding == {} and net["n2"].core.out.pending == {}


def test_least_outstanding_counts_each_request_of_a_batch():
    net = formed("n1", "n2", "n3")
    serve(net, "n1")
    serve(net, "n2")
    since = net.clock.now_s
    tokens = ask_many(net, "n3", [bytes([i]) for i in range(6)])
    assert net["n3"].core.rpc.outstanding == {"n1": 3, "n2": 3}
    assert sorted(dst for _t, dst in net.sent("n3", "rpc_batch", since)) == ["n1", "n2"]
    finish_all(net, "n1")
    finish_all(net, "n2")
    assert sorted(net["n3"].resolved[t] for t in tokens) == [bytes([i]) for i in range(6)]


def test_a_batch_larger_than_a_message_is_split():
    net = formed("n1", "n2")
    serve(net, "n1", concurrency=4)
    since = net.clock.now_s
    tokens = ask_many(net, "n2", [b"%d" % i for i in range(BATCH_MAX + 5)])
    assert len(net.sent("n2", "rpc_batch", since)) == 2  # BATCH_MAX to a message
    finish_all(net, "n1")
    assert all(net["n2"].resolved[t] == b"%d" % i for i, t in enumerate(tokens))


def test_a_batch_is_cut_at_max_frame_bytes():
    net = Net("n1", "n2", max_frame_bytes=4096, batch_max_bytes=4096)
    net.form()
    serve(net, "n1")
    since = net.clock.now_s
    tokens = ask_many(net, "n2", [bytes([i]) * 1000 for i in range(10)])
    assert len(net.sent("n2", "rpc_batch", since)) == 3  # 4 + 4 + 2 requests of 1,000 bytes
    assert [len(w.jobs) for w in net["n1"].workers] == [4]
    finish_all(net, "n1")  # the answers: 4 (the first worker's), then 4 + 2 (the second's six)
    assert all(net["n2"].resolved[t] == bytes([i]) * 1000 for i, t in enumerate(tokens))
    assert len(net.sent("n1", "rpc_batch_ok", since)) == 3


def test_concurrency_bounds_the_workers_and_each_takes_its_share():
    net = formed("n1", "n2")
    serve(net, "n1", concurrency=2)
    tokens = ask_many(net, "n2", [b"%d" % i for i in range(10)])
    assert [len(w.jobs) for w in net["n1"].workers] == [5, 5]
    tokens += ask_many(net, "n2", [b"x%d" % i for i in range(3)])
    assert len(net["n1"].workers) == 2  # both workers busy: the new ones wait in the queue
    assert net["n1"].core.rpc.report()["services"][0]["queued"] == 3
    first = net["n1"].workers.pop(0)
    net["n1"].handle(HandlersDone(tuple(HandlerDone(j.job_id, j.payload) for j in first.jobs)))
    net.pump()
    assert [len(w.jobs) for w in net["n1"].workers] == [5, 3]  # the freed worker takes the queue
    finish_all(net, "n1")
    assert len([t for t in tokens if t in net["n2"].resolved]) == 13


def test_dispatch_ahead_is_bounded():
    net = formed("n1", "n2")
    serve(net, "n1")
    ask_many(net, "n2", [b"%d" % i for i in range(BATCH_MAX)])
    assert [len(w.jobs) for w in net["n1"].workers] == [DISPATCH_AHEAD]
    assert net["n1"].core.rpc.report()["services"][0]["queued"] == BATCH_MAX - DISPATCH_AHEAD


def test_timeouts_inside_a_batch_are_per_request_and_late_answers_are_dropped_and_counted():
    net = formed("n1", "n2")
    serve(net, "n1")
    tokens = ask_many(net, "n2", [b"short", b"long", b"skipped"], timeouts_s=[0.2, 5.0, 0.2])
    net.run(0.3)
    assert isinstance(net["n2"].failed[tokens[0]], TimeoutError)
    assert isinstance(net["n2"].failed[tokens[2]], TimeoutError)
    assert tokens[1] not in net["n2"].failed
    finish_all(net, "n1", expired=b"skipped")  # "short" ran anyway (its answer is late), "skipped" did not
    assert net["n2"].resolved[tokens[1]] == b"long"
    assert tokens[0] not in net["n2"].resolved
    assert net["n2"].core.rpc.report()["calls"]["late_replies"] == 1
    assert net["n1"].core.rpc.report()["services"][0]["expired"] == 1


def test_a_duplicated_batch_runs_once_and_a_malformed_one_is_counted():
    net = formed("n1", "n2")
    serve(net, "n1", concurrency=4)
    h2 = net["n2"]
    h2.handle(RpcRequests(tuple(RpcRequest("echo", b"%d" % i, h2.clock.now_s + 5, waiter=i) for i in range(4))))
    send = h2.sent[-1]
    h2.sent.append(send)  # the network delivers it twice
    net.pump()
    assert len(net["n1"].jobs) == 4
    assert net["n1"].core.rpc.counters["duplicates_dropped"] == 4
    message = wire.decode(send.frames, h2.config.cluster)
    bad = wire.Message("rpc_batch", "n2", 0, {**message.body, "ids": [900, 901]}, message.payloads)
    short = wire.Message("rpc_batch", "n2", 0, {**message.body, "ids": [902, 903, 904, 905],
                                                "sizes": [1, 1, 1, 9]}, message.payloads)
    before = net["n1"].core.counters["frames_invalid"]
    net["n1"].handle(RequestReceived(b"route", bad))
    net["n1"].handle(RequestReceived(b"route", short))  # its sizes do not add up to its payload
    assert net["n1"].core.counters["frames_invalid"] == before + 2 and len(net["n1"].jobs) == 4
    assert net["n1"].replies == [] or all(r.route != b"route" for r in net["n1"].replies)


def test_an_idempotent_batch_is_retried_elsewhere_when_its_instance_dies():
    net = formed("n1", "n2", "n3")
    serve(net, "n1", idempotent=True)
    serve(net, "n2", idempotent=True)
    tokens = ask_many(net, "n3", [b"a", b"b", b"c", b"d"], timeouts_s=[30.0] * 4)
    net.cut("n1")
    net.run_until(lambda: net["n3"].core.rpc.report()["calls"]["retries"] == 2, within_s=10.0)
    net.heal()
    finish_all(net, "n2")
    assert sorted(net["n3"].resolved[t] for t in tokens) == [b"a", b"b", b"c", b"d"]
    assert net["n3"].core.rpc.report()["calls"]["retries"] == 2


def test_a_non_idempotent_batch_to_a_dying_instance_fails_outcome_unknown_per_request():
    net = formed("n1", "n2", "n3")
    serve(net, "n1")
    serve(net, "n2")
    tokens = ask_many(net, "n3", [b"a", b"b", b"c", b"d"], timeouts_s=[30.0] * 4)
    net.cut("n1")
    net.run_until(lambda: sum(t in net["n3"].failed for t in tokens) == 2, within_s=10.0)
    assert all(isinstance(net["n3"].failed[t], OutcomeUnknownError) for t in tokens if t in net["n3"].failed)
    assert len(net["n2"].jobs) == 2  # never sent twice
