"""A service's desk (meshq.core.rpc.desk): what it admits, how it answers, what it tells the room;
and the room's side of it (the ``desks`` advert, ``DeskServed``)."""

from __future__ import annotations

from meshq.core import wire
from meshq.core.events import DeskServed, HandlerDone, ServeService, UnserveService
from meshq.core.rpc.desk import DESKS, DROP, REFUSE, REPORT_S, RUN, Desk, SeenKeys, desks_of
from tests.core.rooms.conftest import Net

CLUSTER = "c"


def request(request_id: int = 7, service: str = "echo", sender: str = "caller", incarnation: int = 1,
            timeout_ms: int = 500, payload: bytes = b"hi") -> wire.Message:
    frames = wire.encode(CLUSTER, sender, "rpc_request", request_id,
                         {"service": service, "incarnation": incarnation, "timeout_ms": timeout_ms}, (payload,))
    return wire.decode(frames, CLUSTER)


# ------------------------------------------------------------------ the pure desk
def test_a_request_runs_once_with_its_callers_deadline():
    desk = Desk("echo", "n1", CLUSTER)
    assert desk.admit(request(timeout_ms=500), now_s=10.0) == (RUN, 10.5)
    assert desk.admit(request(), now_s=10.1) == (DROP, None)  # the same caller, incarnation and id: a duplicate
    assert desk.duplicates == 1
    assert desk.admit(request(incarnation=2), 10.2)[0] == RUN  # restarted caller: ids start again, not a duplicate
    assert desk.admit(request(sender="other"), 10.2)[0] == RUN


def test_a_request_for_another_service_is_refused_as_not_serving():
    desk = Desk("echo", "n1", CLUSTER)
    verdict, frames = desk.admit(request(service="billing"), 0.0)
    assert verdict == REFUSE
    refusal = wire.decode(frames, CLUSTER)
    assert refusal.type == "rpc_error" and refusal.request_id == 7 and refusal.sender == "n1"
    assert refusal.body["reason"] == "not_serving" and "billing" in refusal.body["message"]
    assert desk.refused == 1


def test_what_is_not_a_request_is_dropped_and_counted():
    desk = Desk("echo", "n1", CLUSTER)
    reply = wire.decode(wire.encode(CLUSTER, "x", "rpc_reply", 3, {}, (b"r",)), CLUSTER)
    assert desk.admit(reply, 0.0) == (DROP, None)
    assert desk.admit(request(request_id=0), 0.0) == (DROP, None)  # nothing could be answered
    assert desk.invalid == 2


def test_answers_say_what_the_handler_did():
    desk = Desk("echo", "n1", CLUSTER)
    ok = wire.decode(desk.answer(7, HandlerDone(0, b"out", elapsed_s=0.003)), CLUSTER)
    assert (ok.type, ok.request_id, ok.payloads[0]) == ("rpc_reply", 7, b"out")
    raised = wire.decode(desk.answer(8, HandlerDone(0, None, "ValueError", "bad input", 0.001)), CLUSTER)
    assert raised.type == "rpc_error" and raised.body == {"reason": "raised", "error_type": "ValueError",
                                                          "message": "bad input"}
    assert desk.answer(9, HandlerDone(0, None, expired=True)) is None  # its caller gave up: no answer
    assert (desk.served, desk.errors, desk.expired) == (1, 1, 1)
    assert desk.times_s == [0.003, 0.001]  # an expired job ran no handler: no time


def test_reports_are_spaced_and_carry_what_happened_since_the_last():
    desk = Desk("echo", "n1", CLUSTER)
    assert desk.report(0.0) is None and not desk.pending_report()  # nothing to tell
    desk.answer(1, HandlerDone(0, b"x", elapsed_s=0.002))
    assert desk.pending_report()
    first = desk.report(0.0)
    assert first == DeskServed("echo", 1, 0, 0, 0, 0, 0, (0.002,))
    desk.answer(2, HandlerDone(0, b"x", elapsed_s=0.004))
    assert desk.report(REPORT_S / 2) is None  # too soon after the last one
    assert desk.report(REPORT_S / 2, force=True) == DeskServed("echo", 1, 0, 0, 0, 0, 0, (0.004,))
    assert desk.report(10.0, force=True) is None and not desk.pending_report()  # (counted once only)


def test_seen_keys_forget_the_oldest_first():
    seen = SeenKeys(limit=3)
    assert all(seen.first_time(key) for key in ("a", "b", "c", "d"))  # "a" is forgotten
    assert len(seen) == 3
    assert not seen.first_time("b") and not seen.first_time("d")
    assert seen.first_time("a")  # forgotten, so new again (and "b", now the oldest, is forgotten)
    assert seen.first_time("b")


def test_malformed_desk_adverts_are_left_out():
    assert desks_of({"echo": "tcp://10.0.0.1:5000", "bad": 5, 3: "tcp://x:1", "odd": "ipc:///tmp/x",
                     "long": "tcp://" + "x" * 400}) == {"echo": "tcp://10.0.0.1:5000"}
    assert desks_of(["echo"]) == {} and desks_of(None) == {}


# ------------------------------------------------------------------ the room's side
def test_a_desk_is_advertised_with_its_service_and_withdrawn_with_it():
    net = Net("n1", "n2")
    net.form()
    token = net["n1"].command(ServeService("echo", desk="tcp://127.0.0.1:4000"))
    assert net["n1"].resolved.get(token, "missing") is None
    token = net["n1"].command(ServeService("plain"))  # (a handler pool: no desk)
    net.run(0.5)
    assert net["n2"].core.rpc.desk("n1", "echo") == "tcp://127.0.0.1:4000"
    assert net["n2"].core.rpc.desk("n1", "plain") is None
    assert net["n1"].core.rpc.desk("n1", "echo") == "tcp://127.0.0.1:4000"  # its own, for its own callers
    assert net["n1"].core.rpc.report()["services"][0]["desk"] == "tcp://127.0.0.1:4000"
    net["n1"].command(UnserveService("echo"))
    net.run(0.5)
    assert net["n2"].core.rpc.desk("n1", "echo") is None
    assert net["n2"].core.rpc.instances("plain") == {"n1": False}


def test_no_desk_no_advert():
    net = Net("n1", "n2")
    net.form()
    net["n1"].command(ServeService("plain"))
    net.run(0.5)
    assert net["n1"].core.adverts.one(DESKS, "n1") is None
    assert net["n2"].core.adverts.one(DESKS, "n1") is None


def test_a_desks_counts_add_to_its_services():
    net = Net("n1")
    net.form()
    net["n1"].command(ServeService("echo", desk="tcp://127.0.0.1:4000"))
    net["n1"].handle(DeskServed("echo", 3, 1, 2, 1, 0, 0, (0.001, 0.002, 0.003, 0.004)))
    net["n1"].handle(DeskServed("gone", 5, 0, 0, 0, 0, 0, ()))  # withdrawn meanwhile: nothing to add to
    (service,) = net["n1"].core.rpc.report()["services"]
    assert (service["served"], service["errors"], service["expired"], service["duplicates"]) == (3, 1, 2, 1)
    assert service["p50_ms"] is not None and service["p99_ms"] == 4.0
