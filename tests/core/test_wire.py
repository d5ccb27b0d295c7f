"""The wire codec (meshq.core.wire): round trips, and a decoder that trusts nothing.

``decode`` is the one gate every byte from the network passes; the contract tested here is
that it returns a valid ``Message`` or raises ``ProtocolError`` — never any other exception —
whatever the frames hold.
"""

from __future__ import annotations

import copy
import math
import threading
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshq.config import PROTOCOL_VERSION
from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.errors import ProtocolError

CLUSTER = "default"
SENDER = "node-a"

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

BATCH = batch_format.encode_batch([(b"k", b"v", {"h": b"1"}, 1_700_000_000_000), (None, b"w", None, 1_700_000_000_005)])

MEMBER = {"node_id": "node-a", "address": "tcp://127.0.0.1:7450", "role": "storage", "state": "alive"}
MEMBER_INFO = {"node_id": "node-b", "address": "tcp://127.0.0.1:7451", "pub_address": "tcp://127.0.0.1:7452",
               "role": "storage", "incarnation": 1_700_000_000_000}
TOPIC_CONFIG = {"name": "orders", "partitions": 2, "replication_factor": 1, "retention_bytes": None,
                "retention_ms": 604_800_000, "cleanup_policy": "delete", "delete_retention_ms": 86_400_000}
TOPIC_META = {
    "config": TOPIC_CONFIG,
    "partitions": [
        {"partition": 0, "leader": "node-a", "replicas": ["node-a"], "in_sync": ["node-a"], "high_watermark": 42},
        {"partition": 1, "leader": None, "replicas": [], "in_sync": [], "high_watermark": 0},
    ],
}
OFFSET_ENTRY = {"topic": "orders", "partition": 1, "offset": 3}

#: One valid (body, payloads) per message type. Must name every type in wire.SCHEMAS.
EXAMPLES: dict[str, tuple[dict, tuple[bytes, ...]]] = {
    "hello": ({"member": MEMBER_INFO, "formed": True, "leader": "node-a", "size": 3, "trivial": False,
               "can_form": False, "formation": "node-a.18bcfe56800", "empty": True}, ()),
    "hello_ok": ({"member": MEMBER_INFO, "members": [MEMBER_INFO, dict(MEMBER_INFO, node_id="node-c", role="client")],
                  "formed": True, "leader": "node-a", "size": 3, "trivial": False, "can_form": False,
                  "formation": "node-a.18bcfe56800", "empty": False}, ()),
    "heartbeat": ({"member": MEMBER_INFO, "members": [MEMBER_INFO], "formed": False, "leader": None, "term": 3,
                   "size": 0, "trivial": False, "can_form": False, "leads": [["orders", 2, 7]], "adverts": 4,
                   "formation": "", "empty": False}, ()),
    "goodbye": ({"node_id": "node-b", "incarnation": 1_700_000_000_000}, ()),
    "advert": ({"node_id": "node-b", "incarnation": 1_700_000_000_000, "version": 4,
                "adverts": {"subs": [["sensors.*.temp", None]], "services": {"echo": {"idempotent": True}}}}, ()),
    "advert_get": ({}, ()),
    "advert_ok": ({"node_id": "node-b", "incarnation": 1_700_000_000_000, "version": 0, "adverts": {}}, ()),
    "raft_vote": ({"term": 4, "candidate": "node-b", "last_index": -1, "last_term": 0, "pre_vote": True,
                  "formation": "node-a.18bcfe56800"}, ()),
    "raft_vote_ok": ({"term": 4, "granted": False, "pre_vote": True, "voter": "node-a", "for_term": 5,
                     "formation": "node-a.18bcfe56800"}, ()),
    "raft_append": ({"term": 4, "leader": "node-a", "prev_index": 9, "prev_term": 3, "commit": 9,
                     "entries": [[4, b"\x81\xa2op\xa4noop"], [4, b""]], "formation": "node-a.18bcfe56800"}, ()),
    "raft_append_ok": ({"term": 4, "success": True, "match_index": 11, "follower": "node-b", "hint": 0,
                       "formation": ""}, ()),
    "repl_vote": ({"topic": "orders", "partition": 1, "epoch": 3, "cv": 2, "candidate": "node-b", "last_epoch": 2,
                   "end_offset": 40, "pre_vote": True}, ()),
    "repl_vote_ok": ({"topic": "orders", "partition": 1, "epoch": 3, "cv": 2, "voter": "node-a", "granted": True,
                      "pre_vote": False, "for_epoch": 3}, ()),
    "repl_append": ({"topic": "orders", "partition": 1, "epoch": 3, "cv": 2, "leader": "node-a", "prev_offset": -1,
                     "prev_epoch": 0, "hw": 0, "epoch_start": 0, "log_start": 0, "ts": 12.5, "echo": 12.25,
                     "held": 0.01, "lag": 0.08}, (BATCH,)),
    "repl_append_ok": ({"topic": "orders", "partition": 1, "epoch": 3, "cv": 2, "follower": "node-b", "ok": False,
                        "match_end": -1, "hint": 12, "ts": 40.0, "echo": 12.5}, ()),
    "repl_timeout_now": ({"topic": "orders", "partition": 1, "epoch": 3, "cv": 2}, ()),
    "repl_step_aside": ({"topic": "orders", "partition": 1, "epoch": 3, "cv": 2}, ()),
    "raft_join": ({"member": MEMBER_INFO}, ()),
    "raft_propose": ({"command": msgpack.packb({"op": "create_topic"})}, ()),
    "raft_propose_ok": ({"index": 12}, ()),
    "leave": ({"node_id": "node-a"}, ()),
    "leave_ok": ({"state": "draining", "assigned": 7}, ()),
    "metadata": ({"topics": ["orders"], "auto_create": True}, ()),
    "metadata_ok": ({"members": [MEMBER], "topics": [TOPIC_META]}, ()),
    "create_topic": ({"config": TOPIC_CONFIG, "if_not_exists": False}, ()),
    "acl_change": ({"action": "grant", "name": "alice", "permission": "produce", "pattern": "orders.>"}, ()),
    "acl_change_ok": ({"changed": True}, ()),
    "acl_list": ({}, ()),
    "acl_list_ok": ({"grants": [{"name": "alice", "permission": "produce", "pattern": "orders.>"}]}, ()),
    "acl_view": ({}, ()),
    "acl_view_ok": ({"grants": [{"name": "alice", "permission": "serve", "pattern": "svc.>"}],
                     "names": {"A" * 40: "alice"}}, ()),
    "create_topic_ok": ({"topic": TOPIC_META, "created": True}, ()),
    "produce": ({"topic": "orders", "partition": 1, "acks": "quorum", "timeout_ms": 5000}, (BATCH,)),
    "produce_ok": ({"topic": "orders", "partition": 1, "base_offset": 10, "duplicate": False}, ()),
    "fetch": ({"topic": "orders", "partition": 0, "offset": 5, "max_bytes": 1 << 20, "max_wait_ms": 500}, ()),
    "fetch_ok": ({"topic": "orders", "partition": 0, "high_watermark": 42, "log_start_offset": 0}, (BATCH,)),
    "repair_fetch": ({"topic": "orders", "partition": 0, "first": 5, "last": 9}, ()),
    "repair_fetch_ok": ({"topic": "orders", "partition": 0}, (BATCH,)),
    "list_offsets": ({"topic": "orders", "partition": 0, "timestamp_ms": -2}, ()),
    "list_offsets_ok": ({"offset": 7}, ()),
    "offset_commit": ({"group": "billing", "offsets": [OFFSET_ENTRY]}, ()),
    "offset_commit_ok": ({}, ()),
    "join_group": ({"group": "billing", "topic": "orders", "member": "c1-0a1b2c3d", "partitions": 6}, ()),
    "join_group_ok": ({"state": "stable", "generation": 1_000_001, "partitions": [0, 1],
                       "session_timeout_ms": 4000}, ()),
    "group_heartbeat": ({"group": "billing", "member": "c1-0a1b2c3d", "generation": 1_000_001}, ()),
    "group_heartbeat_ok": ({"state": "rebalancing", "generation": 1_000_001}, ()),
    "leave_group": ({"group": "billing", "member": "c1-0a1b2c3d"}, ()),
    "leave_group_ok": ({"left": True}, ()),
    "offset_fetch": ({"group": "billing", "topic": "orders"}, ()),
    "offset_fetch_ok": ({"offsets": [OFFSET_ENTRY]}, ()),
    "share_fetch": ({"group": "workers", "topic": "jobs", "partition": 0, "member": "n1/abc", "max_records": 500,
                     "max_wait_ms": 500, "ack_timeout_ms": 30_000, "max_deliveries": 5}, ()),
    "share_fetch_ok": ({"topic": "jobs", "partition": 0, "index": b"\0" * 7 + b"\5" + b"\0\0\0\1"}, (BATCH,)),
    "share_ack": ({"group": "workers", "topic": "jobs", "partition": 0, "member": "n1/abc"},
                  (b"\0" * 7 + b"\5" + b"\0" + b"\0" * 4,)),
    "share_ack_ok": ({"stale": b"\0" * 7 + b"\5"}, ()),
    "status": ({}, ()),
    "status_ok": ({"status": {"cluster": "default", "counters": {"frames_invalid": 0},
                              "mixed": [1, -2.5, None, True, b"raw", "text", {"deep": [[{}]]}]}}, ()),
    "error": ({"code": "unknown_topic", "message": "topic 'x' does not exist", "retriable": False,
               "leader": None}, ()),
    "rpc_request": ({"service": "billing.invoice", "incarnation": 1_700_000_000_000, "timeout_ms": 1000}, (b"req",)),
    "rpc_reply": ({}, (b"reply",)),
    "rpc_batch": ({"service": "billing.invoice", "incarnation": 1_700_000_000_000, "ids": [7, 8],
                   "timeouts_ms": [1000, 900], "sizes": [1, 1]}, (b"ab",)),
    "rpc_batch_ok": ({"ids": [7, 8], "errors": [None, ["raised", "ValueError", "bad"]], "sizes": [1, 0]}, (b"a",)),
    "rpc_error": ({"reason": "raised", "error_type": "KeyError", "message": "'x'"}, ()),
}

TYPES = sorted(EXAMPLES)


# ---------------------------------------------------------------- helpers
def raw_header(version: Any = PROTOCOL_VERSION, cluster: Any = CLUSTER, sender: Any = SENDER, type_: Any = "status",
               request_id: Any = 1, body: Any = None) -> bytes:
    """Pack a header without any schema check (encode() refuses invalid bodies)."""
    return msgpack.packb([version, cluster, sender, type_, request_id, {} if body is None else body],
                         use_bin_type=True)


def example_frames(type_: str, request_id: int = 7) -> list[bytes]:
    body, payloads = EXAMPLES[type_]
    return wire.encode(CLUSTER, SENDER, type_, request_id, copy.deepcopy(body), payloads)


def set_path(value: Any, path: tuple, new: Any) -> Any:
    """Return a deep copy of ``value`` with the item at ``path`` replaced (or deleted when new is _DELETE)."""
    out = copy.deepcopy(value)
    target = out
    for step in path[:-1]:
        target = target[step]
    if new is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = new
    return out


_DELETE = object()


def rejects(frames: list[bytes]) -> ProtocolError:
    """Decode must fail with exactly ProtocolError (or its InvalidRequest: the envelope was readable)."""
    try:
        message = wire.decode(frames, CLUSTER)
    except ProtocolError as exc:
        assert type(exc) in (ProtocolError, wire.InvalidRequest)
        return exc
    raise AssertionError(f"decoded a frame that should be refused: {message!r}")


def packed(value: Any) -> bytes:
    # Compare through msgpack so NaN in free-form status values compares equal to itself.
    return msgpack.packb(value, use_bin_type=True)


def assert_valid_message(message: wire.Message) -> None:
    """A decoded message satisfies its schema and survives encode -> decode unchanged."""
    assert isinstance(message, wire.Message)
    schema = wire.SCHEMAS[message.type]
    assert schema.min_payloads <= len(message.payloads) <= schema.max_payloads
    assert all(type(p) is bytes for p in message.payloads)
    assert type(message.sender) is str and 1 <= len(message.sender) <= 64
    assert type(message.request_id) is int and 0 <= message.request_id < 1 << 63
    again = wire.decode(wire.encode(CLUSTER, message.sender, message.type, message.request_id, message.body,
                                    message.payloads), CLUSTER)
    assert (again.type, again.sender, again.request_id, again.payloads) == (
        message.type, message.sender, message.request_id, message.payloads)
    assert packed(again.body) == packed(message.body)


def decode_or_protocol_error(frames: list[bytes]) -> None:
    try:
        message = wire.decode(frames, CLUSTER)
    except ProtocolError as exc:
        assert type(exc) in (ProtocolError, wire.InvalidRequest)
        return
    assert_valid_message(message)


def all_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a nested list/dict structure (the root excluded)."""
    out = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return out
    for key, child in items:
        out.append(prefix + (key,))
        out.extend(all_paths(child, prefix + (key,)))
    return out


# ---------------------------------------------------------------- round trips
def test_examples_cover_every_message_type():
    assert set(EXAMPLES) == set(wire.SCHEMAS)


@pytest.mark.parametrize("type_", TYPES)
def test_round_trip_of_every_message_type(type_):
    body, payloads = EXAMPLES[type_]
    frames = wire.encode(CLUSTER, SENDER, type_, 12345, copy.deepcopy(body), payloads)
    assert len(frames) == 1 + len(payloads)
    assert frames[1:] == list(payloads)
    message = wire.decode(frames, CLUSTER)
    assert message == wire.Message(type_, SENDER, 12345, body, tuple(payloads))


@pytest.mark.parametrize("type_", TYPES)
def test_header_layout_is_a_six_element_array(type_):
    header = msgpack.unpackb(example_frames(type_, request_id=99)[0], raw=False)
    assert header == [PROTOCOL_VERSION, CLUSTER, SENDER, type_, 99, EXAMPLES[type_][0]]


@pytest.mark.parametrize("type_", TYPES)
def test_payload_frame_counts(type_):
    schema = wire.SCHEMAS[type_]
    body = EXAMPLES[type_][0]
    for count in range(0, schema.max_payloads + 3):
        frames = [raw_header(type_=type_, body=body)] + [b"payload-%d" % i for i in range(count)]
        if schema.min_payloads <= count <= schema.max_payloads:
            assert wire.decode(frames, CLUSTER).payloads == tuple(frames[1:])
        else:
            assert "payload frames" in str(rejects(frames))


def test_payload_counts_of_the_types_that_carry_batches():
    assert (wire.SCHEMAS["produce"].min_payloads, wire.SCHEMAS["produce"].max_payloads) == (1, 1)
    assert (wire.SCHEMAS["fetch_ok"].min_payloads, wire.SCHEMAS["fetch_ok"].max_payloads) == (0, 1)
    carriers = sorted(t for t, s in wire.SCHEMAS.items() if s.max_payloads)
    assert carriers == ["fetch_ok", "produce", "repair_fetch_ok", "repl_append", "rpc_batch", "rpc_batch_ok",
                        "rpc_reply", "rpc_request", "share_ack", "share_fetch_ok"]
    for type_ in ("rpc_batch", "rpc_batch_ok"):  # every request (answer) in one frame, back to back
        assert (wire.SCHEMAS[type_].min_payloads, wire.SCHEMAS[type_].max_payloads) == (1, 1)
    for type_ in ("rpc_request", "rpc_reply"):  # exactly one: the request or the reply
        assert (wire.SCHEMAS[type_].min_payloads, wire.SCHEMAS[type_].max_payloads) == (1, 1)
    assert (wire.SCHEMAS["repl_append"].min_payloads, wire.SCHEMAS["repl_append"].max_payloads) == (0, 1)


def test_a_batch_answer_item_error_must_be_reason_type_message():
    good = EXAMPLES["rpc_batch_ok"][0]
    for bad in (["raised", "ValueError"], ["exploded", "", ""], "raised", [None, "", ""]):
        frames = [raw_header(type_="rpc_batch_ok", body={**good, "errors": [None, bad]}), b"a"]
        assert "errors[1]" in str(rejects(frames))


def test_empty_fetch_reply_has_no_payload():
    frames = wire.encode(CLUSTER, SENDER, "fetch_ok", 1, EXAMPLES["fetch_ok"][0], ())
    assert wire.decode(frames, CLUSTER).payloads == ()


def test_decode_accepts_frame_like_buffers():
    frames = example_frames("produce")
    message = wire.decode([memoryview(frames[0]), bytearray(frames[1])], CLUSTER)
    assert message.payloads == (frames[1],) and type(message.payloads[0]) is bytes


def test_request_id_zero_and_maximum_are_valid():
    assert wire.decode([raw_header(request_id=0)], CLUSTER).request_id == 0
    assert wire.decode([raw_header(request_id=(1 << 63) - 1)], CLUSTER).request_id == (1 << 63) - 1


def test_encode_refuses_a_body_that_breaks_its_schema():
    # Sending an invalid body is our own bug; encode checks it when CHECK_OUTGOING is on (the
    # tests switch it on: tests/conftest.py).
    assert wire.CHECK_OUTGOING
    with pytest.raises(ProtocolError):
        wire.encode(CLUSTER, SENDER, "list_offsets_ok", 1, {"offset": -1})


def test_outgoing_check_is_off_unless_asked_for():
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "MESHQ_CHECK_OUTGOING"}
    code = "from meshq.core import wire; print(wire.CHECK_OUTGOING)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    env["MESHQ_CHECK_OUTGOING"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


# ---------------------------------------------------------------- forward compatibility
@pytest.mark.parametrize("type_", TYPES)
def test_unknown_extra_body_fields_are_ignored(type_):
    body, payloads = EXAMPLES[type_]
    extended = dict(copy.deepcopy(body), future_field=[1, 2, {"x": b"y"}], another={"nested": None})
    message = wire.decode([raw_header(type_=type_, body=extended), *payloads], CLUSTER)
    assert message.body == body


def test_unknown_extra_fields_in_nested_structs_are_ignored():
    body = copy.deepcopy(EXAMPLES["metadata_ok"][0])
    body["members"][0]["zone"] = "rack-1"
    body["topics"][0]["config"]["compression"] = "zstd"
    body["topics"][0]["partitions"][0]["observers"] = ["node-x"]
    assert wire.decode([raw_header(type_="metadata_ok", body=body)], CLUSTER).body == EXAMPLES["metadata_ok"][0]


# ---------------------------------------------------------------- header rejections
def test_empty_message_is_rejected():
    rejects([])


@pytest.mark.parametrize("version", [0, 2, PROTOCOL_VERSION + 100, -1, "1", b"\x01", 1.0, True, None, [1]])
def test_wrong_version_is_rejected(version):
    rejects([raw_header(version=version)])


@pytest.mark.parametrize("cluster", ["other", "", "Default", b"default", None, 0, ["default"]])
def test_other_cluster_is_rejected(cluster):
    rejects([raw_header(cluster=cluster)])


@pytest.mark.parametrize("type_", ["", "nope", "HELLO", "hello ", b"hello", 3, None, ["hello"], {"t": "hello"}])
def test_unknown_type_is_rejected(type_):
    rejects([raw_header(type_=type_)])


@pytest.mark.parametrize("sender", ["", "s" * 65, b"node-a", 5, None, ["node-a"]])
def test_bad_sender_is_rejected(sender):
    rejects([raw_header(sender=sender)])


@pytest.mark.parametrize("request_id", [-1, 1 << 63, (1 << 64) - 1, True, 1.0, "1", None, b"\x01"])
def test_bad_request_id_is_rejected(request_id):
    rejects([raw_header(request_id=request_id)])


@pytest.mark.parametrize("header", [
    {"version": 1}, 1, "header", b"header", None, 1.5, True,
    [PROTOCOL_VERSION, CLUSTER, SENDER, "status", 1],
    [PROTOCOL_VERSION, CLUSTER, SENDER, "status", 1, {}, {}],
    [],
])
def test_header_that_is_not_a_six_element_array_is_rejected(header):
    rejects([msgpack.packb(header, use_bin_type=True)])


@pytest.mark.parametrize("body", [None, [], "body", 0, b"", [{}]])
def test_body_that_is_not_a_map_is_rejected(body):
    rejects([msgpack.packb([PROTOCOL_VERSION, CLUSTER, SENDER, "status", 1, body], use_bin_type=True)])


@pytest.mark.parametrize("frame", [
    b"", b"\xc1", b"\x96", b"\x96\x01", b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff" + b"a" * 8,
    raw_header() + b"\x00",  # trailing bytes after one complete object
    raw_header()[:-1],  # truncated
    b"\x96\x01\xa7default\xa6node-a\xa6status\x01\x81\xa1a\xc4\xff",  # bin length beyond the frame
    b"\x96\x01\xa2\xff\xfe\xa6node-a\xa6status\x01\x80",  # invalid UTF-8 in a str
])
def test_bytes_that_are_not_one_msgpack_object_are_rejected(frame):
    rejects([frame])


def test_oversize_header_frame_is_rejected_before_unpacking():
    exc = rejects([b"\x00" * (wire.MAX_HEADER_BYTES + 1)])
    assert "exceeds" in str(exc)
    # A well-formed header that is merely too large is refused the same way.
    big = raw_header(type_="status_ok", body={"status": b"x" * wire.MAX_HEADER_BYTES})
    assert len(big) > wire.MAX_HEADER_BYTES
    rejects([big])


def test_header_at_the_size_limit_is_accepted():
    filler = wire.MAX_HEADER_BYTES - len(raw_header(type_="status_ok", body={"status": b""})) - 4
    frame = raw_header(type_="status_ok", body={"status": b"x" * filler})
    assert len(frame) <= wire.MAX_HEADER_BYTES
    assert len(wire.decode([frame], CLUSTER).body["status"]) == filler


def test_too_many_frames_are_rejected():
    header = raw_header(type_="produce", body=EXAMPLES["produce"][0])
    exc = rejects([header] + [BATCH] * (wire.MAX_PAYLOAD_FRAMES + 1))
    assert "frames" in str(exc)
    # At the frame limit the per-type payload count decides.
    rejects([header] + [BATCH] * wire.MAX_PAYLOAD_FRAMES)


def test_array_and_map_length_limits():
    rejects([raw_header(type_="status_ok", body={"status": [0] * (wire._MAX_ITEMS + 1)})])
    rejects([raw_header(type_="status_ok", body={"status": {str(i): 0 for i in range(wire._MAX_ITEMS + 1)}})])
    # a declared length far beyond the frame
    rejects([b"\x96\x01\xa7default\xa6node-a\xa9status_ok\x01\x81\xa6status\xdd\x7f\xff\xff\xff"])


# ---------------------------------------------------------------- ext types and map keys
@pytest.mark.parametrize("value", [
    msgpack.ExtType(1, b""), msgpack.ExtType(1, b"x"), msgpack.ExtType(127, b"\x00" * 16),
    msgpack.Timestamp(0, 0), msgpack.Timestamp(1 << 40, 999),
])
@pytest.mark.parametrize("where", ["status_value", "body_field", "sender", "request_id", "version"])
def test_ext_types_are_rejected_everywhere(value, where):
    if where == "status_value":
        frame = raw_header(type_="status_ok", body={"status": {"nested": [value]}})
    elif where == "body_field":
        frame = raw_header(type_="list_offsets_ok", body={"offset": value})
    elif where == "sender":
        frame = raw_header(sender=value)
    elif where == "request_id":
        frame = raw_header(request_id=value)
    else:
        frame = raw_header(version=value)
    rejects([frame])


@pytest.mark.parametrize("body", [
    {1: "x"}, {-1: 0}, {1.5: 0}, {None: 0}, {True: 0}, {("a",): 0},
])
def test_non_string_map_keys_are_rejected(body):
    rejects([raw_header(type_="status_ok", body=body)])
    rejects([raw_header(type_="status_ok", body={"status": {"inner": body}})])


def test_bytes_keys_do_not_stand_in_for_field_names():
    rejects([raw_header(type_="list_offsets_ok", body={b"offset": 3})])


# ---------------------------------------------------------------- body rejections
# fields a sender may leave out (wire.Default): an addition to a message type that older senders lack
OPTIONAL_FIELDS = {("heartbeat", "adverts"), ("heartbeat", "formation"), ("hello_ok", "formation"), ("error", "leader"),
                   ("heartbeat", "empty"), ("hello_ok", "empty"), ("raft_vote", "formation"),
                   ("raft_vote_ok", "formation"), ("raft_append", "formation"), ("raft_append_ok", "formation"),
                   *(("hello", name) for name in ("formed", "leader", "size", "trivial", "can_form", "formation", "empty")),
                   ("repl_append", "ts"), ("repl_append", "echo"), ("repl_append", "held"), ("repl_append", "lag"),
                   ("repl_append_ok", "ts"), ("repl_append_ok", "echo")}
FIELD_CASES = [(type_, name) for type_ in TYPES for name in sorted(EXAMPLES[type_][0])
               if (type_, name) not in OPTIONAL_FIELDS]


@pytest.mark.parametrize(("type_", "field"), FIELD_CASES)
def test_every_missing_field_is_rejected(type_, field):
    body, payloads = EXAMPLES[type_]
    exc = rejects([raw_header(type_=type_, body=set_path(body, (field,), _DELETE)), *payloads])
    assert "missing" in str(exc)


def _wrong_type(value: Any) -> Any:
    if value is None or type(value) in (str, bytes):
        return 12345
    if type(value) is bool:
        return 1  # an int is not a bool
    if type(value) is int:
        return str(value)
    if type(value) is list:
        return {"not": "a list"}
    return ["not", "a", "map"]


@pytest.mark.parametrize(("type_", "field"), [c for c in FIELD_CASES if c != ("status_ok", "status")])
def test_every_field_with_a_wrong_type_is_rejected(type_, field):
    body, payloads = EXAMPLES[type_]
    rejects([raw_header(type_=type_, body=set_path(body, (field,), _wrong_type(body[field]))), *payloads])


RANGE_CASES = [
    ("produce", ("partition",), -1), ("produce", ("partition",), 10_000), ("produce", ("partition",), True),
    ("produce", ("partition",), 1.0), ("produce", ("acks",), "most"), ("produce", ("acks",), 1),
    ("produce", ("timeout_ms",), -1), ("produce", ("timeout_ms",), (1 << 31) + 1), ("produce", ("topic",), ""),
    ("produce", ("topic",), "t" * 201), ("produce", ("topic",), b"orders"),
    ("fetch", ("offset",), -1), ("fetch", ("offset",), (1 << 62) + 1), ("fetch", ("max_bytes",), 0),
    ("fetch", ("max_bytes",), (1 << 30) + 1), ("fetch", ("max_wait_ms",), -5), ("fetch", ("offset",), 2**64 - 1),
    ("fetch", ("offset",), float("nan")),
    ("list_offsets", ("timestamp_ms",), -3), ("list_offsets", ("timestamp_ms",), (1 << 62) + 1),
    ("hello", ("member", "node_id"), "n" * 65), ("hello", ("member", "node_id"), ""),
    ("hello", ("member", "role"), "admin"), ("hello", ("member", "address"), "a" * 301),
    ("hello", ("member", "address"), ""), ("hello", ("member", "pub_address"), ""),
    ("hello", ("member", "address"), "not-an-endpoint"), ("hello", ("member", "address"), "tcp://host"),
    ("hello", ("member", "address"), "tcp://host:0"), ("hello", ("member", "address"), "tcp://host:65536"),
    ("hello", ("member", "address"), "tcp://host:123456"), ("hello", ("member", "address"), "ipc:///tmp/x"),
    ("hello", ("member", "address"), "tcp://a b:1"),
    ("hello", ("member", "address"), "tcp://" + "h" * 256 + ":1"), ("hello", ("member", "pub_address"), "inproc://x"),
    ("hello", ("member", "incarnation"), -1), ("hello", ("member",), None),
    ("hello_ok", ("members", 0, "role"), "witness"), ("hello_ok", ("members", 1, "incarnation"), 1.5),
    ("hello_ok", ("members",), [MEMBER_INFO] * 1001), ("hello_ok", ("members", 0), "node-a"),
    ("hello_ok", ("leader",), ""), ("hello_ok", ("formed",), "yes"),
    ("heartbeat", ("term",), -1), ("heartbeat", ("member", "pub_address"), "p" * 301),
    ("heartbeat", ("members", 0, "node_id"), None), ("heartbeat", ("leads", 0), ["orders", 2]),
    ("heartbeat", ("leads", 0, 2), -1), ("heartbeat", ("leads", 0, 2), 1 << 31),
    ("repl_vote", ("epoch",), -1), ("repl_vote", ("end_offset",), -1), ("repl_vote", ("candidate",), ""),
    ("repl_vote_ok", ("granted",), None), ("repl_append", ("prev_offset",), -2),
    ("repl_append", ("epoch",), 1 << 31), ("repl_append_ok", ("match_end",), -2),
    ("repl_append_ok", ("hint",), -1), ("repl_timeout_now", ("partition",), -1),
    ("repl_append", ("ts",), -2.0), ("repl_append", ("held",), -0.5), ("repl_append", ("lag",), -2.0), ("repl_append_ok", ("echo",), "soon"),
    ("repl_step_aside", ("epoch",), -1),
    ("goodbye", ("incarnation",), -1), ("goodbye", ("node_id",), ""),
    ("raft_vote", ("term",), -1), ("raft_vote", ("last_index",), -2), ("raft_vote", ("candidate",), ""),
    ("raft_vote", ("pre_vote",), 0),
    ("raft_vote_ok", ("for_term",), -1), ("raft_vote_ok", ("granted",), None),
    ("raft_append", ("prev_index",), -2), ("raft_append", ("commit",), -2), ("raft_append", ("term",), 1 << 63),
    ("raft_append", ("entries",), [[4, b"x"]] * 257), ("raft_append", ("entries", 0), [4]),
    ("raft_append", ("entries", 0), [4, b"x", b"y"]), ("raft_append", ("entries", 0), [4, "text"]),
    ("raft_append", ("entries", 0), [-1, b"x"]), ("raft_append", ("entries", 0), {"term": 4, "command": b"x"}),
    ("raft_append", ("entries", 0), b"x"),
    ("raft_append_ok", ("match_index",), -2), ("raft_append_ok", ("hint",), -1),
    ("raft_join", ("member", "role"), "voter"),
    ("raft_propose", ("command",), "text"), ("raft_propose", ("command",), None),
    ("raft_propose_ok", ("index",), -1),
    ("repl_vote", ("cv",), -1), ("repl_append", ("cv",), 1 << 31), ("repl_append_ok", ("cv",), None),
    ("leave", ("node_id",), ""), ("leave_ok", ("state",), "gone"), ("leave_ok", ("assigned",), -1),
    ("metadata", ("topics",), "orders"), ("metadata", ("topics", 0), ""), ("metadata", ("auto_create",), 1),
    ("metadata", ("auto_create",), None),
    ("create_topic", ("config", "partitions"), 0), ("create_topic", ("config", "partitions"), 10_001),
    ("create_topic", ("config", "replication_factor"), 17), ("create_topic", ("config", "retention_bytes"), 0),
    ("create_topic", ("config", "retention_ms"), -1), ("create_topic", ("config", "cleanup_policy"), "shred"),
    ("create_topic", ("config",), None), ("create_topic", ("config", "name"), "x" * 201),
    ("metadata_ok", ("topics", 0, "partitions", 0, "leader"), ""),
    ("metadata_ok", ("topics", 0, "partitions", 0, "replicas"), ["n"] * 17),
    ("metadata_ok", ("topics", 0, "partitions", 0, "high_watermark"), -1),
    ("metadata_ok", ("topics", 0, "config", "name"), 5), ("metadata_ok", ("topics", 0, "partitions"), None),
    ("create_topic_ok", ("created",), "yes"), ("create_topic_ok", ("topic", "config", "partitions"), -1),
    ("produce_ok", ("base_offset",), -1), ("produce_ok", ("duplicate",), 0),
    ("fetch_ok", ("log_start_offset",), -1), ("fetch_ok", ("high_watermark",), 1 << 63),
    ("list_offsets_ok", ("offset",), -1),
    ("offset_commit", ("offsets", 0, "offset"), -1), ("offset_commit", ("offsets", 0, "partition"), 10_000),
    ("offset_commit", ("offsets", 0), ["orders", 0, 3]), ("offset_commit", ("group",), ""),
    ("offset_fetch_ok", ("offsets", 0, "topic"), None),
    ("error", ("code",), ""), ("error", ("code",), "c" * 65), ("error", ("message",), "m" * 4097),
    ("error", ("retriable",), None),
]


@pytest.mark.parametrize(("type_", "path", "value"), RANGE_CASES, ids=[
    f"{t}:{'.'.join(map(str, p))}={str(v)[:12]}" for t, p, v in RANGE_CASES])
def test_fields_out_of_type_or_range_are_rejected(type_, path, value):
    body, payloads = EXAMPLES[type_]
    rejects([raw_header(type_=type_, body=set_path(body, path, value)), *payloads])


@pytest.mark.parametrize("field", ["address", "pub_address"])
def test_endpoint_with_a_trailing_newline_is_rejected(field):
    body = set_path(EXAMPLES["hello"][0], ("member", field), "tcp://host:1\n")
    rejects([raw_header(type_="hello", body=body)])


BOUNDARY_CASES = [
    ("produce", ("partition",), 9_999), ("produce", ("partition",), 0), ("produce", ("topic",), "t" * 200),
    ("produce", ("timeout_ms",), 1 << 31), ("produce", ("acks",), "none"),
    ("fetch", ("offset",), 1 << 62), ("fetch", ("max_bytes",), 1 << 30), ("fetch", ("max_wait_ms",), 0),
    ("list_offsets", ("timestamp_ms",), -1), ("list_offsets", ("timestamp_ms",), 1 << 62),
    ("hello", ("member", "node_id"), "n" * 64), ("hello", ("member", "address"), "tcp://" + "h" * 255 + ":65535"),
    ("hello", ("member", "address"), "tcp://[::1]:1"), ("hello", ("member", "pub_address"), "tcp://10.0.0.1:7451"),
    ("hello", ("member", "incarnation"), 0), ("hello_ok", ("members",), []), ("hello_ok", ("leader",), None),
    ("raft_append", ("entries",), [[0, b""]] * 256), ("raft_append", ("entries",), []),
    ("raft_append", ("prev_index",), -1), ("raft_append", ("commit",), -1), ("raft_vote", ("last_index",), -1),
    ("metadata", ("topics",), None),
    ("error", ("message",), "m" * 4096), ("error", ("message",), ""),
    ("create_topic", ("config", "replication_factor"), 16), ("create_topic", ("config", "retention_bytes"), 1 << 62),
]


@pytest.mark.parametrize(("type_", "path", "value"), BOUNDARY_CASES)
def test_fields_at_their_limits_are_accepted(type_, path, value):
    body, payloads = EXAMPLES[type_]
    changed = set_path(body, path, value)
    assert wire.decode([raw_header(type_=type_, body=changed), *payloads], CLUSTER).body == changed


def _nested(depth: int, leaf: Any = 1, as_map: bool = False) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"k": value} if as_map else [value]
    return value


@pytest.mark.parametrize("as_map", [False, True])
def test_status_values_nested_deeper_than_the_limit_are_rejected(as_map):
    assert wire.decode([raw_header(type_="status_ok", body={"status": _nested(8, as_map=as_map)})], CLUSTER)
    rejects([raw_header(type_="status_ok", body={"status": _nested(9, as_map=as_map)})])
    rejects([raw_header(type_="status_ok", body={"status": _nested(200, as_map=as_map)})])


@pytest.mark.parametrize("depth", [2_000, 5_000, 200_000])
def test_msgpack_deeper_than_the_unpacker_stack_is_rejected(depth):
    # Built by hand: msgpack.packb itself refuses this depth.
    prefix = b"\x96\x01\xa7default\xa6node-a\xa9status_ok\x01\x81\xa6status"
    rejects([prefix + b"\x91" * depth + b"\x01"])
    rejects([b"\x91" * depth + b"\xc0"])
    rejects([b"\x81\xa1k" * depth + b"\xc0"])


def deep_list(depth: int) -> bytes:
    """A msgpack list nested ``depth`` deep (below the unpacker's stack limit of 1024)."""
    return b"\x91" * depth + b"\x01"


def _str(text: str) -> bytes:
    return msgpack.packb(text)


#: Header frames with one element replaced by a list nested 1000 deep. msgpack unpacks it
#: (its stack limit is 1024), a check refuses it, and the error message is built from it.
DEEP_VALUE_FRAMES = {
    "version": b"\x96" + deep_list(1000) + _str(CLUSTER) + _str(SENDER) + _str("status") + b"\x01\x80",
    "cluster": b"\x96\x01" + deep_list(1000) + _str(SENDER) + _str("status") + b"\x01\x80",
    "sender": b"\x96\x01" + _str(CLUSTER) + deep_list(1000) + _str("status") + b"\x01\x80",
    "type": b"\x96\x01" + _str(CLUSTER) + _str(SENDER) + deep_list(1000) + b"\x01\x80",
    "request_id": b"\x96\x01" + _str(CLUSTER) + _str(SENDER) + _str("status") + deep_list(1000) + b"\x80",
    "body": b"\x96\x01" + _str(CLUSTER) + _str(SENDER) + _str("status") + b"\x01" + deep_list(1000),
    "request_field": b"\x96\x01" + _str(CLUSTER) + _str(SENDER) + _str("list_offsets") + b"\x01\x83"
    + _str("topic") + deep_list(1000) + _str("partition") + b"\x00" + _str("timestamp_ms") + b"\x00",
    "status_value": b"\x96\x01" + _str(CLUSTER) + _str(SENDER) + _str("status_ok") + b"\x01\x81"
    + _str("status") + deep_list(1000),
}


def _decode_on_a_fresh_thread(frames: list[bytes]) -> BaseException | None:
    """Decode the way the runtime does: on its own thread, with a shallow stack."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            wire.decode(frames, CLUSTER)
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever escaped
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    return outcome[0]


def test_deep_value_frames_are_well_formed_msgpack():
    for frame in DEEP_VALUE_FRAMES.values():
        assert type(msgpack.unpackb(frame, raw=False)) is list


@pytest.mark.parametrize("where", sorted(DEEP_VALUE_FRAMES))
def test_values_nested_just_below_the_unpacker_limit_are_rejected_with_protocol_error(where):
    error = _decode_on_a_fresh_thread([DEEP_VALUE_FRAMES[where]])
    assert type(error) in (ProtocolError, wire.InvalidRequest), repr(error)[:200]


# ---------------------------------------------------------------- property tests
@FUZZ
@given(header=st.binary(max_size=2048), payloads=st.lists(st.binary(max_size=32), max_size=3))
def test_arbitrary_bytes_give_a_message_or_protocol_error(header, payloads):
    decode_or_protocol_error([header, *payloads])


@FUZZ
@given(type_=st.sampled_from(TYPES), frame_count=st.integers(0, wire.MAX_PAYLOAD_FRAMES + 4))
def test_arbitrary_frame_counts_give_a_message_or_protocol_error(type_, frame_count):
    decode_or_protocol_error([example_frames(type_)[0]] + [BATCH] * frame_count)


def _apply_byte_edits(frame: bytes, edits: list[tuple[str, float, int]]) -> bytes:
    data = bytearray(frame)
    for op, where, value in edits:
        position = min(int(where * len(data)), max(len(data) - 1, 0))
        if op == "flip" and data:
            data[position] ^= value or 0x01
        elif op == "set" and data:
            data[position] = value
        elif op == "insert":
            data.insert(position, value)
        elif op == "delete" and data:
            del data[position]
    return bytes(data)


BYTE_EDITS = st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete"]),
              st.floats(0.0, 1.0, allow_nan=False), st.integers(0, 255)),
    min_size=1, max_size=4,
)


@FUZZ
@given(type_=st.sampled_from(TYPES), edits=BYTE_EDITS)
def test_byte_mutations_of_valid_frames_give_a_message_or_protocol_error(type_, edits):
    frames = example_frames(type_)
    decode_or_protocol_error([_apply_byte_edits(frames[0], edits), *frames[1:]])


INTERESTING_INTS = st.sampled_from([
    -(1 << 63), -3, -2, -1, 0, 1, 2, 9_999, 10_000, 10_001, 1 << 31, (1 << 31) + 1, 1 << 62, (1 << 62) + 1,
    (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
])
MSGPACK_LEAVES = (
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | INTERESTING_INTS | st.floats()
    | st.text(max_size=20) | st.sampled_from(["", "storage", "client", "none", "quorum", "delete", "x" * 300])
    | st.binary(max_size=20) | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4))
)
MSGPACK_VALUES = st.recursive(
    MSGPACK_LEAVES,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5) | st.binary(max_size=4), children, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(type_=st.sampled_from(TYPES), data=st.data())
def test_one_field_mutated_to_a_random_value_gives_a_message_or_protocol_error(type_, data):
    frames = example_frames(type_)
    header = msgpack.unpackb(frames[0], raw=False)
    path = data.draw(st.sampled_from(all_paths(header)), label="path")
    new = data.draw(MSGPACK_VALUES, label="value")
    mutated = set_path(header, path, new)
    try:
        frame = msgpack.packb(mutated, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):  # e.g. NaN dict keys or depth: not a frame a peer could send
        return
    decode_or_protocol_error([frame, *frames[1:]])


@FUZZ
@given(type_=st.sampled_from(TYPES), data=st.data())
def test_one_field_deleted_or_added_gives_a_message_or_protocol_error(type_, data):
    frames = example_frames(type_)
    header = msgpack.unpackb(frames[0], raw=False)
    paths = [p for p in all_paths(header) if len(p) > 1]  # inside the body
    if not paths:
        return
    path = data.draw(st.sampled_from(paths), label="path")
    if data.draw(st.booleans(), label="delete"):
        mutated = set_path(header, path, _DELETE)
    else:
        key = data.draw(st.text(max_size=12), label="key")
        parent = path[:-1]
        target = header
        for step in parent:
            target = target[step]
        if not isinstance(target, dict):
            return
        mutated = set_path(header, parent + (key,), data.draw(MSGPACK_VALUES, label="value"))
    decode_or_protocol_error([msgpack.packb(mutated, use_bin_type=True), *frames[1:]])


def test_valid_message_check_handles_nan_in_status():
    message = wire.decode([raw_header(type_="status_ok", body={"status": [float("nan")]})], CLUSTER)
    assert math.isnan(message.body["status"][0])
    assert_valid_message(message)


def test_a_heartbeat_from_a_sender_that_predates_adverts_reads_as_version_0():
    body = dict(EXAMPLES["heartbeat"][0])
    del body["adverts"]
    frames = wire.encode("c", "node-b", "heartbeat", 0, body)
    assert wire.decode(frames, "c").body["adverts"] == 0
