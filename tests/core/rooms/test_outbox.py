"""The ``out`` room (meshq.core.outbox.Outbox), driven directly with a stub dispatch."""

from __future__ import annotations

import pytest

from meshq.core import wire
from meshq.core.events import Connect, Disconnect, Reply, Send
from meshq.core.outbox import LocalRoute, Outbox, PendingRequest
from meshq.errors import NotEnoughReplicasError, NotLeaderError, ProtocolError, TimeoutError


class Recorder:
    """What a request's callbacks were told."""

    def __init__(self) -> None:
        self.replies: list[wire.Message] = []
        self.errors: list = []

    def on_reply(self, message: wire.Message) -> None:
        self.replies.append(message)

    def on_error(self, error) -> None:
        self.errors.append(error)


@pytest.fixture
def served() -> list:
    return []


@pytest.fixture
def out(served) -> Outbox:
    return Outbox("c", "me", lambda route, message, now_s: served.append((route, message, now_s)))


def ask(out: Outbox, peer: str = "p", type_: str = "status", now_s: float = 10.0, timeout_s: float = 2.0,
        body: dict | None = None) -> Recorder:
    recorder = Recorder()
    out.request(peer, type_, body or {}, (), now_s, timeout_s, recorder.on_reply, recorder.on_error)
    return recorder


def reply_to(out: Outbox, request_id: int, type_: str = "status_ok", body: dict | None = None) -> None:
    out.on_reply(wire.Message(type_, "p", request_id, body if body is not None else {"status": {}}), 11.0)


def test_effects_are_handed_over_once_in_the_order_they_were_emitted(out):
    out.emit("first")
    out.emit("second")
    assert out.take() == ["first", "second"]
    assert out.take() == []


def test_timers_come_due_earliest_first_and_equal_deadlines_in_the_order_they_were_set(out):
    out.schedule(5.0, "b", 1)
    out.schedule(3.0, "a", 2)
    out.schedule(5.0, "c", 3)
    assert out.next_deadline() == 3.0
    assert list(out.due(4.9)) == [("a", 2)]
    assert out.next_deadline() == 5.0
    due = []
    for kind, key in out.due(5.0):
        due.append((kind, key))
        if kind == "b":
            out.schedule(4.0, "set-meanwhile", 4)  # already due: included in the same pass
    assert due == [("b", 1), ("set-meanwhile", 4), ("c", 3)]
    assert out.next_deadline() is None


def test_a_request_is_encoded_to_its_peer_and_settled_by_its_reply_once(out):
    recorder = ask(out, body={})
    (send,) = out.take()
    assert isinstance(send, Send) and send.peer == "p"
    sent = wire.decode(send.frames, "c")
    assert (sent.type, sent.sender) == ("status", "me")
    reply_to(out, sent.request_id)
    reply_to(out, sent.request_id)  # a duplicate reply changes nothing
    assert len(recorder.replies) == 1 and recorder.errors == []
    out.expire(sent.request_id)  # its timer fires later: nothing left to fail
    assert recorder.errors == [] and out.pending == {}


def test_a_late_reply_from_another_node_to_a_reused_request_id_is_not_taken_for_the_answer(out):
    # Request ids start again at 1 when a node restarts: an answer to a request of the previous
    # run can arrive with the id of a new one (simulator seed 2 with the shared workload).
    recorder = ask(out, peer="p")
    (send,) = out.take()
    request_id = wire.decode(send.frames, "c").request_id
    out.on_reply(wire.Message("raft_propose_ok", "q", request_id, {}), 11.0)
    assert recorder.replies == [] and request_id in out.pending
    reply_to(out, request_id)
    assert len(recorder.replies) == 1 and out.pending == {}


def test_a_late_reply_from_another_node_never_answers_a_request_this_node_sent_itself(out, served):
    # Same reuse of ids: the new incarnation's request to itself must not take a peer's late answer
    # to the old one (it did while requests to self were exempt from the sender check).
    recorder = ask(out, peer="me", type_="status")
    (route, message, _now), = served
    out.on_reply(wire.Message("status_ok", "p", message.request_id, {"status": {}}), 11.0)
    assert recorder.replies == [] and message.request_id in out.pending
    assert out.late_replies == {"status_ok": 1}
    out.reply(route, message.request_id, "status_ok", {"status": {"ours": True}})
    out.drain_local(11.0)
    assert [m.body for m in recorder.replies] == [{"status": {"ours": True}}] and out.pending == {}


def test_a_pending_request_fails_with_timeout_when_its_timer_fires(out):
    recorder = ask(out, peer="p", type_="status", now_s=10.0, timeout_s=2.0)
    assert list(out.due(11.9)) == []
    ((kind, request_id),) = list(out.due(12.0))
    assert kind == "request"
    out.expire(request_id)
    (error,) = recorder.errors
    assert isinstance(error, TimeoutError) and str(error) == "no reply from p to status in time"
    reply_to(out, request_id)  # the late reply is dropped
    assert recorder.replies == []


def test_an_error_reply_is_rebuilt_into_the_error_the_peer_reported(out):
    recorder = ask(out)
    out.on_reply(wire.Message("error", "p", 1, {"code": "not_leader", "message": "ask n2", "retriable": True}), 11.0)
    (error,) = recorder.errors
    assert isinstance(error, NotLeaderError) and str(error) == "ask n2"
    assert recorder.replies == []


def test_a_reply_its_handler_refuses_fails_the_request_instead(out):
    errors = []

    def refuse(message):
        raise ProtocolError("the reply makes no sense")

    out.request("p", "status", {}, (), 10.0, 2.0, refuse, errors.append)
    reply_to(out, 1)
    assert [str(e) for e in errors] == ["the reply makes no sense"] and out.pending == {}


def test_a_request_to_this_node_is_served_unencoded_and_answered_when_the_inbox_is_drained(out, served):
    recorder = ask(out, peer="me", body={"x": 1})
    ((route, message, now_s),) = served
    assert route == LocalRoute(1) and message == wire.Message("status", "me", 1, {"x": 1}) and now_s == 10.0
    out.reply(route, message.request_id, "status_ok", {"status": {"ok": True}})
    assert out.take() == [] and recorder.replies == []  # nothing encoded; answered only at the drain
    out.drain_local(10.0)
    assert [m.body for m in recorder.replies] == [{"status": {"ok": True}}]


def test_request_id_zero_is_one_way_and_never_answered(out, served):
    out.send_oneway("me", "status", {}, (), 10.0)
    ((route, message, _now),) = served
    assert route == LocalRoute(0) and message.request_id == 0
    out.reply(route, 0, "status_ok", {"status": {}})
    out.reply(b"route", 0, "status_ok", {"status": {}})
    out.drain_local(10.0)
    assert out.take() == [] and out.pending == {}


def test_an_error_reply_is_cut_to_what_the_wire_accepts(out):
    out.reply_error(b"route", 5, NotEnoughReplicasError("x" * 10_000))
    (reply,) = out.take()
    assert isinstance(reply, Reply) and reply.route == b"route"
    message = wire.decode(reply.frames, "c")  # a 10 kB message would fail the schema
    assert message.body == {"code": "not_enough_replicas", "message": "x" * 4096, "retriable": True,
                            "leader": None}


def test_connect_opens_a_dealer_only_for_a_new_endpoint_and_disconnect_only_an_open_one(out):
    out.connect("p", "tcp://h:1")
    out.connect("p", "tcp://h:1")
    out.connect("p", "tcp://h:2")  # readdressed
    assert out.take() == [Connect("p", "tcp://h:1"), Connect("p", "tcp://h:2")]
    assert out.disconnect("p") is True and out.disconnect("p") is False
    assert out.take() == [Disconnect("p")] and out.peer_endpoints == {}


@pytest.mark.parametrize(("state", "message"), [
    ("dead", "p is dead (silent); status is retried elsewhere"),
    ("disconnected", "p dropped the connection (a request or its answer may be lost with it); status is retried"),
])
def test_a_silent_or_dropped_peer_fails_only_the_requests_waiting_on_it_with_a_retriable_error(out, state, message):
    to_p, to_q = ask(out, peer="p"), ask(out, peer="q")
    out.fail_requests_to("p", state)
    (error,) = to_p.errors
    assert isinstance(error, NotLeaderError) and error.retriable
    assert str(error) == message
    assert to_q.errors == [] and list(out.pending) == [2]


def test_fail_all_fails_every_pending_request_with_the_given_error(out):
    recorders = [ask(out, peer=p) for p in ("p", "q", "me")]
    stopped = TimeoutError("stopping")
    out.fail_all(stopped)
    assert [r.errors for r in recorders] == [[stopped]] * 3 and out.pending == {}


def test_a_reply_of_another_type_under_a_pending_id_is_not_taken_for_its_answer(out):
    # request ids start again when a node restarts: a late reply to its earlier incarnation's
    # request of the same id is not this request's answer (which may still come)
    recorder = ask(out, type_="status")
    request_id = max(out.pending)
    out.on_reply(wire.Message("metadata_ok", "p", request_id, {"members": [], "topics": []}), 10.1)
    assert recorder.replies == [] and request_id in out.pending
    out.on_reply(wire.Message("status_ok", "p", request_id, {"status": {}}), 10.2)
    assert [m.type for m in recorder.replies] == ["status_ok"] and request_id not in out.pending


def test_a_batch_of_requests_has_one_timer_and_each_request_still_times_out_at_its_own_deadline(out):
    recorders = [Recorder() for _ in range(3)]
    body = {"service": "s", "incarnation": 1, "timeouts_ms": [1000, 3000, 2000], "sizes": [0, 0, 0]}
    entries = [PendingRequest(0, "p", "rpc_request", 10.0 + timeout_s, recorder.on_reply, recorder.on_error)
               for timeout_s, recorder in zip((1.0, 3.0, 2.0), recorders)]
    ids = out.request_batch("p", "rpc_batch", body, (b"",), entries)
    assert [entry.request_id for entry in entries] == ids
    assert len(ids) == 3 and ids == list(range(ids[0], ids[0] + 3))
    assert list(out.due(100.0)) == [("requests", (ids[0], 3))]  # one heap entry for the lot, at the earliest
    out.schedule(11.0, "requests", (ids[0], 3))
    out.on_reply(wire.Message("rpc_reply", "p", ids[2], {}, (b"two",)), 10.5)  # answered before its deadline
    for _kind, key in out.due(11.0):
        out.expire_batch(key, 11.0)
    assert [type(e) for e in recorders[0].errors] == [TimeoutError] and recorders[1].errors == []
    assert [m.payloads for m in recorders[2].replies] == [(b"two",)] and recorders[2].errors == []
    assert out.next_deadline() == 13.0  # the one still waiting: looked at again at its own deadline
    for _kind, key in out.due(13.0):
        out.expire_batch(key, 13.0)
    assert [type(e) for e in recorders[1].errors] == [TimeoutError]
    assert out.pending == {} and out.next_deadline() is None


def test_claim_takes_only_the_reply_its_request_expects(out):
    asked = ask(out, type_="status")
    request_id = max(out.pending)
    assert out.claim(request_id, "p", "produce_ok") is None  # not an answer to a status request
    assert out.claim(request_id, "q", "status_ok") is None  # from another peer than it went to
    assert out.late_replies == {"produce_ok": 1, "status_ok": 1}
    assert out.claim(request_id, "p", "status_ok").request_id == request_id
    assert out.pending == {} and out.claim(request_id, "p", "status_ok") is None
    assert asked.replies == [] and asked.errors == []
