"""NodeCore as a root: it registers each room's requests, commands and timers, and dispatches to them."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import meshq.core
from meshq.core import events, wire
from meshq.core.node import NodeCore
from meshq.core.outbox import Outbox
from meshq.core.room import Room
from meshq.errors import ProtocolError, UsageError
from tests.core.harness import CoreHarness

ROOMS = ("mesh", "adverts", "formation", "agreement", "leave", "catalog", "access", "space", "host", "server", "repair", "groups",
         "coordinator", "shared", "client", "producer", "requests", "group_client", "rpc", "status", "pubsub")


def rooms_of(core: NodeCore) -> dict[str, Room]:
    return {name: value for name, value in vars(core).items() if isinstance(value, Room)}


@pytest.fixture(scope="module")
def core() -> NodeCore:
    return CoreHarness("n1").core


class Clashing(Room):
    """A room that claims what an existing room already handles (filled in per test)."""

    def handler(self, *args) -> None:
        raise AssertionError("never dispatched")


@pytest.mark.parametrize(("table", "key"), [("SERVES", "hello"), ("COMMANDS", events.ProduceCommand),
                                           ("TIMERS", "heartbeat")])
def test_register_refuses_a_room_that_claims_what_another_room_handles(table, key):
    core = CoreHarness("n1").core
    room = type("Clash", (Clashing,), {table: {key: "handler"}})(core)
    with pytest.raises(UsageError, match=re.escape(f"{key!r} is already handled by another room")):
        core.register(room)


def test_a_refused_room_registers_none_of_its_entries():
    core = CoreHarness("n1").core
    room = type("Clash", (Clashing,), {"SERVES": {"brand_new": "handler", "hello": "handler"}})(core)
    with pytest.raises(UsageError):
        core.register(room)
    assert "brand_new" not in core._servers


def test_the_core_builds_every_room_and_the_outbox(core):
    assert tuple(rooms_of(core)) == ROOMS
    assert isinstance(core.out, Outbox)
    assert all(room.out is core.out and room.core is core for room in rooms_of(core).values())


@pytest.mark.parametrize("name", ROOMS)
def test_every_entry_a_room_declares_names_a_real_method_and_is_dispatched_to_it(core, name):
    room = rooms_of(core)[name]
    for table, dispatch in ((room.SERVES, core._servers), (room.COMMANDS, core._commands),
                            (room.EVENTS, core._events), (room.TIMERS, core._timers)):
        for key, method_name in table.items():
            method = getattr(room, method_name, None)
            assert callable(method), f"{name}.{method_name} ({key!r}) is not a method"
            inspect.signature(method).bind("key-or-route", *(("message",) if table is room.SERVES else ()), 1.0)
            assert dispatch[key] == method, f"{key!r} is not dispatched to {name}.{method_name}"
    assert all(type_ in wire.SCHEMAS for type_ in room.SERVES), "a served type has no wire schema"
    assert all(type_ in wire.SCHEMAS for type_ in room.EVENTS), "an event type has no wire schema"
    assert all(kind in (*events.COMMANDS, events.ProduceCommand, *events.RPC_COMMANDS, events.HandlerDone,
                           events.HandlersDone, events.DeskServed, events.RpcRequests, events.TrustedNames)
               for kind in room.COMMANDS)


def test_every_timer_kind_a_room_schedules_is_registered(core):
    scheduled = set()
    for path in sorted(Path(meshq.core.__file__).parent.rglob("*.py")):
        for line in path.read_text().splitlines():
            if ".schedule(" in line:
                kind = re.search(r'\.schedule\(.*?"(\w+)"', line)
                assert kind is not None, f"{path.name}: a timer kind that is not a literal: {line.strip()}"
                scheduled.add(kind.group(1))
    assert "wait_ready" in scheduled and "request" in scheduled
    assert scheduled <= set(core._timers), scheduled - set(core._timers)


def test_a_reply_type_sent_as_a_request_is_counted_and_refused_when_it_has_an_id(lone):
    assert lone.request("hello_ok", {}, request_id=0) is None  # one-way: nobody to tell
    reply = lone.request("hello_ok", {})
    assert (reply.type, reply.body["code"]) == ("error", "protocol")
    assert reply.body["message"] == "hello_ok is not a request this node answers"
    assert lone.core.counters["frames_invalid"] == 2


def test_an_error_a_room_raises_is_answered_as_an_error_reply(lone):
    reply = lone.request("fetch", {"topic": "nope", "partition": 0, "offset": 0, "max_bytes": 10, "max_wait_ms": 0})
    assert reply.type == "error" and reply.body["code"] == "unknown_topic"


def test_an_input_the_core_does_not_know_is_refused_naming_it(lone):
    with pytest.raises(UsageError, match="NodeCore cannot handle Disconnect"):
        lone.core.handle(events.Disconnect("x"), lone.clock.now_s)


def test_a_frame_the_runtime_could_not_decode_is_counted(lone):
    lone.core.note_invalid_frame(ProtocolError("garbage"))
    assert lone.core.counters["frames_invalid"] == 1
