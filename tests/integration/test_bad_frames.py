"""A real node under hostile input (SPEC §3.6): junk never crashes, stalls or changes it.

Each test starts a ``meshq.Node`` on 127.0.0.1, produces a few acknowledged records, attacks
it through a raw pyzmq DEALER (or a fake seed ROUTER), and then checks that the node still
serves produce and fetch, that the acknowledged records are unchanged, and that frames which
fail decoding were counted in ``frames_invalid``.

Ordering trick: ZeroMQ keeps the order of messages on one connection and the node drains its
ROUTER in order, so a ``status`` request sent after the junk on the same DEALER is answered
only after every junk frame was handled; its reply carries the counters. Elsewhere tests wait
on a condition with a deadline; the one fixed wait (raft_join) lets election timeouts pass.


"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq

import meshq
from meshq.config import PROTOCOL_VERSION
from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.errors import ProtocolError
from tests.core.test_wire import EXAMPLES as WIRE_EXAMPLES
from tests.procs import TIME_SCALE

pytestmark = pytest.mark.timeout(60)

CLUSTER = "default"
MAX_FRAME_BYTES = 1024 * 1024
BATCH_MAX_BYTES = 64 * 1024  # the node refuses batches above twice this
STOP_JOIN_S = 30.0 * TIME_SCALE  # a stopped node's runtime thread ends in milliseconds; a loaded CI machine needs slack
TOPIC = "base"
REPLY_TIMEOUT_MS = 5000


# ---------------------------------------------------------------- fixtures and helpers
def start_node(data_dir: Any, **options: Any) -> meshq.Node:
    node = meshq.Node(data_dir=data_dir, mdns=False, partitions=2, replication_factor=1,
                      max_frame_bytes=MAX_FRAME_BYTES, batch_max_bytes=BATCH_MAX_BYTES, **options)
    return node.start()


def stop_node(node: meshq.Node) -> None:
    name = f"meshq-{node.core.node_id}" if node.core is not None else None
    node.stop(timeout=STOP_JOIN_S)  # returns as soon as the runtime thread ended
    leaked = [t.name for t in threading.enumerate() if t.name == name and t.is_alive()]
    assert not leaked, f"runtime thread still running {STOP_JOIN_S:.0f} s after stop: {leaked}"


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.term()  # every socket was closed with linger 0, so this cannot block


@pytest.fixture
def node(tmp_path) -> Iterator[meshq.Node]:
    node = start_node(tmp_path / "data")
    try:
        yield node
    finally:
        stop_node(node)


@pytest.fixture
def acked(node) -> list[tuple[Any, bytes, bytes]]:
    """Records produced and acknowledged before the attack: [(metadata, key, value)]."""
    out = []
    for i in range(12):
        key, value = b"key-%d" % i, b"value-%d" % i
        out.append((node.produce(TOPIC, value, key=key, acks="leader"), key, value))
    assert {m.partition for m, _, _ in out} == {0, 1}
    return out


def unchecked_frames(type_: str, body: dict, request_id: int, sender: str = "raw-client") -> list[bytes]:
    return [msgpack.packb([PROTOCOL_VERSION, CLUSTER, sender, type_, request_id, body], use_bin_type=True)]


class RawClient:
    """A DEALER speaking the wire protocol by hand."""

    def __init__(self, context: zmq.Context, address: str) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 10_000)
        self.sock.connect(address)
        self._next_id = 1000

    def close(self) -> None:
        self.sock.close(0)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def send_request(self, type_: str, body: dict, payloads: tuple = (), request_id: int | None = None,
                     cluster: str = CLUSTER) -> int:
        if request_id is None:
            self._next_id += 1
            request_id = self._next_id
        self.send(wire.encode(cluster, "raw-client", type_, request_id, body, payloads))
        return request_id

    def send_unchecked(self, type_: str, body: dict, request_id: int) -> int:
        """Send a message without encode()'s schema check (as a hostile peer would)."""
        self.send(unchecked_frames(type_, body, request_id))
        return request_id

    def receive(self, timeout_ms: int = REPLY_TIMEOUT_MS) -> wire.Message:
        assert self.sock.poll(timeout_ms), "no reply from the node"
        return wire.decode(self.sock.recv_multipart(), CLUSTER)

    def request(self, type_: str, body: dict, payloads: tuple = (),
                timeout_ms: int = REPLY_TIMEOUT_MS) -> wire.Message:
        request_id = self.send_request(type_, body, payloads)
        reply = self.receive(timeout_ms)
        assert reply.request_id == request_id, f"reply {reply} does not answer request {request_id}"
        return reply

    def status(self, timeout_ms: int = REPLY_TIMEOUT_MS) -> dict:
        """The node's status, answered after everything sent before it was handled."""
        reply = self.request("status", {}, timeout_ms=timeout_ms)
        assert reply.type == "status_ok", reply
        return reply.body["status"]

    def replies_until_status(self, timeout_ms: int = REPLY_TIMEOUT_MS) -> tuple[list[wire.Message], dict]:
        """Ask for status; return the replies that arrived before it (to earlier requests) and the status."""
        request_id = self.send_request("status", {})
        earlier = []
        while True:
            reply = self.receive(timeout_ms)
            if reply.request_id == request_id:
                assert reply.type == "status_ok", reply
                return earlier, reply.body["status"]
            earlier.append(reply)

    def assert_no_reply(self, timeout_ms: int = 200) -> None:
        assert not self.sock.poll(timeout_ms), f"unexpected reply {self.sock.recv_multipart()!r}"


@pytest.fixture
def client(node, context) -> Iterator[RawClient]:
    raw = RawClient(context, node.address)
    try:
        yield raw
    finally:
        raw.close()


def invalid_count(status: dict) -> int:
    return status["counters"]["frames_invalid"]


def high_watermarks(status: dict, topic: str = TOPIC) -> list[int]:
    for entry in status["topics"]:
        if entry["name"] == topic:
            return [p["high_watermark"] for p in entry["partitions"]]
    raise AssertionError(f"topic {topic} not in status")


def topic_names(status: dict) -> list[str]:
    return sorted(entry["name"] for entry in status["topics"])


def consume_all(node: meshq.Node, topic: str, count: int, timeout_s: float = 15.0) -> list:
    records: list = []
    consumer = node.consumer(topic, start="earliest")
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < count and time.monotonic() < deadline:
            records.extend(consumer.poll(timeout=0.5))
    finally:
        consumer.close()
    return records


def assert_healthy(node: meshq.Node, acked: list) -> None:
    """The node still produces and serves fetches, and acknowledged records are unchanged."""
    fresh = node.produce(TOPIC, b"after-attack", key=b"after", acks="leader", timeout=5.0)
    records = consume_all(node, TOPIC, len(acked) + 1)
    by_position = {(r.partition, r.offset): (r.key, r.value) for r in records}
    for metadata, key, value in acked:
        assert by_position.get((metadata.partition, metadata.offset)) == (key, value), metadata
    assert by_position[(fresh.partition, fresh.offset)] == (b"after", b"after-attack")
    assert len(records) == len(acked) + 1, "records appeared that nobody acknowledged"


def produce_body(topic: str = TOPIC, partition: int = 0, acks: str = "leader") -> dict:
    return {"topic": topic, "partition": partition, "acks": acks, "timeout_ms": 5000}


def batch_with_valid_crc(records: Any, count: int) -> bytes:
    """A batch whose CRC is right but whose records body is whatever we say (as encode_batch builds it)."""
    body = msgpack.packb(records, use_bin_type=True)
    tail = struct.pack(">hiqqqhii", 0, count - 1, 1, 1, -1, -1, -1, count) + body
    return struct.pack(">qIiBI", 0, len(tail) + 9, 0, batch_format.BATCH_MAGIC, zlib.crc32(tail)) + tail


def good_batch(value: bytes = b"v", **kwargs: Any) -> bytes:
    return batch_format.encode_batch([(b"k", value, None, 1_700_000_000_000)], **kwargs)


def wait_for(condition: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.01)


# ---------------------------------------------------------------- positive control
def test_raw_client_can_produce_and_the_record_is_consumed(node, acked, client):
    batch = good_batch(b"raw", producer_id=4242, producer_epoch=0, base_sequence=0)
    reply = client.request("produce", produce_body(partition=1), (batch,))
    assert reply.type == "produce_ok" and reply.body["duplicate"] is False
    retry = client.request("produce", produce_body(partition=1), (batch,))
    assert retry.type == "produce_ok" and retry.body == dict(reply.body, duplicate=True)
    records = consume_all(node, TOPIC, len(acked) + 1)
    assert (1, reply.body["base_offset"], b"k", b"raw") in {(r.partition, r.offset, r.key, r.value) for r in records}


# ---------------------------------------------------------------- frames that fail decoding
def test_random_bytes_frames_are_dropped_and_counted(node, acked, client):
    rng = random.Random(1234)
    messages = []
    for _ in range(300):
        frames = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(rng.randrange(1, 4))]
        with pytest.raises(ProtocolError):  # deterministic: every one of these is invalid
            wire.decode(frames, CLUSTER)
        messages.append(frames)
    before = invalid_count(client.status())
    for frames in messages:
        client.send(frames)
    status = client.status()  # the first reply: nothing was answered to the junk
    assert invalid_count(status) == before + len(messages)
    assert high_watermarks(status) == high_watermarks(node.status())
    assert_healthy(node, acked)


def test_invalid_frames_are_counted_by_peer_address_in_status_and_metrics(node, acked, client):
    status = client.status()
    before = status["invalid_frames"]
    rng = random.Random(99)
    for _ in range(50):
        client.send([rng.randbytes(rng.randrange(1, 200)) + b"\xc1"])  # 0xc1: never valid msgpack
    after = client.status()["invalid_frames"]
    assert after["total"] == before["total"] + 50
    assert after["by_peer"]["127.0.0.1"] == before["by_peer"].get("127.0.0.1", 0) + 50
    # the merged cluster view (``meshq status --json``) has it per node
    assert node.status()["invalid_frames"][node.core.node_id]["total"] >= after["total"]


def test_empty_and_near_empty_messages_are_dropped_and_counted(node, acked, client):
    junk = [[b""], [b"", b""], [b""] * 70, [b"\x00"], [b"\x90"], [b"\x96"], [b"\xc0"]]
    before = invalid_count(client.status())
    for frames in junk:
        client.send(frames)
    assert invalid_count(client.status()) == before + len(junk)
    assert_healthy(node, acked)


def test_frames_for_another_cluster_or_version_are_dropped_and_counted(node, acked, client):
    before = invalid_count(client.status())
    client.send_request("status", {}, cluster="other-cluster")
    client.send_request("produce", produce_body(), (good_batch(),), cluster="other-cluster")
    for version in (0, PROTOCOL_VERSION + 1, "1"):
        client.send([msgpack.packb([version, CLUSTER, "raw-client", "status", 77, {}])])
    assert invalid_count(client.status()) == before + 5
    assert_healthy(node, acked)


def test_schema_violations_are_dropped_and_counted(node, acked, client):
    junk = [
        [msgpack.packb([PROTOCOL_VERSION, CLUSTER, "raw-client", "produce", 5, produce_body()])],  # no payload
        [msgpack.packb([PROTOCOL_VERSION, CLUSTER, "raw-client", "produce", 5, produce_body(partition=-1)]),
         good_batch()],
        [msgpack.packb([PROTOCOL_VERSION, CLUSTER, "raw-client", "fetch", 5, {"topic": TOPIC}])],
        [msgpack.packb([PROTOCOL_VERSION, CLUSTER, "raw-client", "nope", 5, {}])],
        [msgpack.packb([PROTOCOL_VERSION, CLUSTER, "raw-client", "status", 5, {}, "extra"])],
        [msgpack.packb([PROTOCOL_VERSION, CLUSTER, "raw-client", "status", 5, {1: 2}])],
        [msgpack.packb([PROTOCOL_VERSION, CLUSTER, "raw-client", "status", 5, {"x": msgpack.ExtType(1, b"a")}])],
        [msgpack.packb([PROTOCOL_VERSION, CLUSTER, "raw-client", "status", -5, {}])],
        [b"\x91" * 5000 + b"\xc0"],  # deeper than the unpacker's stack
    ]
    before = invalid_count(client.status())
    for frames in junk:
        client.send(frames)
    # The first four have a readable envelope with request id 5: each is answered with the defect,
    # so a client can tell a bad request from a dead node. The rest cannot be answered.
    errors = [client.receive() for _ in range(4)]
    assert [(e.type, e.request_id, e.body["code"]) for e in errors] == [("error", 5, "protocol")] * 4
    assert [e.body["message"] for e in errors] == [
        "produce carries 0 payload frames; expected 1-1",
        "produce: field partition: expected integer in [0, 9999], got -1",
        "fetch: field partition: missing",
        "unknown message type 'nope'",
    ]
    assert invalid_count(client.status()) == before + len(junk)
    assert_healthy(node, acked)


#: Types a node only ever receives as replies (on its DEALERs) or as events (on its SUB socket).
NOT_REQUESTS = ["hello_ok", "metadata_ok", "create_topic_ok", "produce_ok", "fetch_ok", "list_offsets_ok",
                "offset_commit_ok", "offset_fetch_ok", "status_ok", "error", "raft_propose_ok", "heartbeat", "goodbye"]


def test_reply_and_event_types_sent_as_requests_are_dropped_and_counted(node, acked, client):
    before = invalid_count(client.status())
    sent = []
    for type_ in NOT_REQUESTS:
        body, payloads = WIRE_EXAMPLES[type_]
        sent.append(client.send_request(type_, body, payloads))
    answers = [client.receive() for _ in NOT_REQUESTS]  # each told it is no request
    assert [(a.type, a.request_id, a.body["code"]) for a in answers] == [("error", i, "protocol") for i in sent]
    assert answers[0].body["message"] == "hello_ok is not a request this node answers"
    assert invalid_count(client.status()) == before + len(NOT_REQUESTS)
    assert_healthy(node, acked)


def test_frame_at_the_size_limit_is_decoded_and_one_above_drops_the_connection(node, acked, client, context):
    before = invalid_count(client.status())
    client.send([b"\xc1" * MAX_FRAME_BYTES])  # allowed by zmq.MAXMSGSIZE, refused by decode
    assert invalid_count(client.status()) == before + 1

    attacker = RawClient(context, node.address)
    try:
        attacker.send([b"\xc1" * (MAX_FRAME_BYTES + 1)])  # zmq drops the connection; decode never sees it
        attacker.send([msgpack.packb([PROTOCOL_VERSION, CLUSTER, "raw-client", "produce", 9, produce_body()]),
                       b"\x00" * (MAX_FRAME_BYTES + 1)])
        # The node kept serving everyone else meanwhile.
        status = client.status()
        assert invalid_count(status) == before + 1
    finally:
        attacker.close()
    assert_healthy(node, acked)


def test_thousands_of_garbage_frames_quickly(node, acked, client):
    rng = random.Random(99)
    count = 5000
    before = invalid_count(client.status())
    started = time.monotonic()
    for _ in range(count):
        client.send([rng.randbytes(rng.randrange(1, 64))])
    status = client.status()
    assert invalid_count(status) == before + count
    assert time.monotonic() - started < 30
    assert_healthy(node, acked)


# ---------------------------------------------------------------- batch-level rejections: an error reply
def _truncated() -> bytes:
    return good_batch()[:-3]


def _wrong_crc() -> bytes:
    data = bytearray(good_batch())
    data[17] ^= 0x5A  # the CRC field
    return bytes(data)


def _flipped_record_byte() -> bytes:
    data = bytearray(good_batch())
    data[-2] ^= 0x01
    return bytes(data)


def _bad_magic() -> bytes:
    data = bytearray(good_batch())
    data[16] = 9
    return bytes(data)


BAD_BATCHES: dict[str, Callable[[], bytes]] = {
    "random_bytes": lambda: random.Random(5).randbytes(500),
    "empty": lambda: b"",
    "truncated": _truncated,
    "trailing_garbage": lambda: good_batch() + b"junk",
    "wrong_crc": _wrong_crc,
    "flipped_record_byte": _flipped_record_byte,
    "bad_magic": _bad_magic,
    "count_mismatch_valid_crc": lambda: batch_with_valid_crc([[0, None, b"v", None]], count=2),
    "value_not_bytes_valid_crc": lambda: batch_with_valid_crc([[0, None, "text", None]], count=1),
    "key_int_valid_crc": lambda: batch_with_valid_crc([[0, 5, b"v", None]], count=1),
    "headers_not_map_valid_crc": lambda: batch_with_valid_crc([[0, None, b"v", [b"h"]]], count=1),
    "record_not_array_valid_crc": lambda: batch_with_valid_crc([7], count=1),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_produce_with_a_bad_batch_gets_a_protocol_error_and_stores_nothing(node, acked, client, case):
    before = client.status()
    reply = client.request("produce", produce_body(partition=0), (BAD_BATCHES[case](),))
    assert reply.type == "error"
    assert reply.body["code"] == "protocol" and reply.body["retriable"] is False
    after = client.status()
    assert invalid_count(after) == invalid_count(before)  # decoded fine: refused by the handler, not counted
    assert high_watermarks(after) == high_watermarks(before)
    assert_healthy(node, acked)


def test_produce_with_an_oversize_batch_gets_too_large(node, acked, client):
    batch = batch_format.encode_batch([(None, b"x" * (2 * BATCH_MAX_BYTES + 1), None, 1)])
    assert len(batch) < MAX_FRAME_BYTES
    before = client.status()
    reply = client.request("produce", produce_body(), (batch,))
    assert reply.type == "error" and reply.body["code"] == "too_large"
    assert high_watermarks(client.status()) == high_watermarks(before)
    assert_healthy(node, acked)


def test_one_way_produce_with_a_bad_batch_gets_no_reply(node, acked, client):
    before = client.status()
    client.send_request("produce", produce_body(acks="none"), (_wrong_crc(),), request_id=0)
    client.send_request("produce", produce_body(acks="none"), (b"junk",), request_id=0)
    client.assert_no_reply()
    after = client.status()
    assert high_watermarks(after) == high_watermarks(before)
    assert invalid_count(after) == invalid_count(before)
    assert_healthy(node, acked)


# ---------------------------------------------------------------- valid frames, hostile requests
def test_invalid_topic_names_get_an_error_and_create_nothing(node, acked, client, tmp_path):
    topics_dir = tmp_path / "data" / "topics"
    dirs_before = sorted(os.listdir(topics_dir))
    names_before = topic_names(client.status())
    hostile = ["bad name", "../escape", "a/b", "..", ".", "__reserved", "nul\x00byte", "ünïcode"]
    for name in hostile:
        # produce never creates a topic: the name is simply not found
        reply = client.request("produce", produce_body(topic=name), (good_batch(),))
        assert reply.type == "error" and reply.body["code"] in ("unknown_topic", "invalid_topic"), (name, reply)
        # metadata with auto_create validates the name
        reply = client.request("metadata", {"topics": [name], "auto_create": True})
        assert reply.type == "error" and reply.body["code"] == "invalid_topic", (name, reply)
        config = {"name": name, "partitions": 1, "replication_factor": 1, "retention_bytes": None,
                  "retention_ms": None, "cleanup_policy": "delete"}
        reply = client.request("create_topic", {"config": config, "if_not_exists": True})
        assert reply.type == "error" and reply.body["code"] == "invalid_topic", (name, reply)
    assert topic_names(client.status()) == names_before
    assert sorted(os.listdir(topics_dir)) == dirs_before
    assert not (tmp_path / "escape").exists() and not (tmp_path / "data" / "escape").exists()
    assert_healthy(node, acked)


def test_requests_for_missing_partitions_and_offsets_get_errors(node, acked, client):
    cases = [
        ("produce", produce_body(topic="missing"), (good_batch(),), "unknown_topic"),
        ("produce", produce_body(partition=9_999), (good_batch(),), "unknown_topic"),
        ("fetch", {"topic": TOPIC, "partition": 0, "offset": 1 << 40, "max_bytes": 1024, "max_wait_ms": 0}, (),
         "offset_out_of_range"),
        ("fetch", {"topic": "missing", "partition": 0, "offset": 0, "max_bytes": 1024, "max_wait_ms": 0}, (),
         "unknown_topic"),
        ("list_offsets", {"topic": TOPIC, "partition": 5, "timestamp_ms": -1}, (), "unknown_topic"),
        ("create_topic", {"config": {"name": TOPIC, "partitions": 7, "replication_factor": 1,
                                     "retention_bytes": None, "retention_ms": None, "cleanup_policy": "delete"},
                          "if_not_exists": False}, (), "invalid_topic"),
    ]
    for type_, body, payloads, code in cases:
        reply = client.request(type_, body, payloads)
        assert reply.type == "error" and reply.body["code"] == code, (type_, body, reply)
    assert len(high_watermarks(client.status())) == 2  # the existing topic was not redefined
    assert_healthy(node, acked)


def test_a_fetch_parked_for_weeks_does_not_block_the_node(node, acked, client):
    end = high_watermarks(client.status())[0]
    request_id = client.send_request("fetch", {"topic": TOPIC, "partition": 0, "offset": end,
                                               "max_bytes": 1 << 20, "max_wait_ms": (1 << 31)})
    client.assert_no_reply()
    assert_healthy(node, acked)
    # New data for partition 0 answers the parked fetch.
    node.produce(TOPIC, b"wake", partition=0, acks="leader")
    reply = client.receive()
    assert reply.request_id == request_id and reply.type == "fetch_ok" and reply.payloads


def test_idempotent_batches_without_a_sequence_are_not_silently_dropped(node, acked, client):
    first = client.request("produce", produce_body(), (good_batch(b"one", producer_id=77, base_sequence=-1),))
    second = client.request("produce", produce_body(), (good_batch(b"two", producer_id=77, base_sequence=-1),))
    if first.type == "error":
        # refusing the inconsistent header is one fix
        assert first.body["code"] == second.body["code"] == "protocol"
    else:
        # storing both is the other: never acknowledge a batch that was not stored
        assert second.type == "produce_ok" and second.body["duplicate"] is False
        assert second.body["base_offset"] == first.body["base_offset"] + 1


# ---------------------------------------------------------------- hostile membership and metadata
def member_info(node_id: str, address: str = "tcp://127.0.0.1:9", pub_address: str = "tcp://127.0.0.1:9",
                role: str = "client", incarnation: int = 1) -> dict:
    return {"node_id": node_id, "address": address, "pub_address": pub_address, "role": role,
            "incarnation": incarnation}


#: Endpoints a peer may claim: not an endpoint at all, or one that passes a pattern but not zmq.
UNUSABLE_ADDRESSES = ["not-an-endpoint", "tcp://[:1", "tcp://host-that-does-not-resolve.invalid:1"]


@pytest.mark.parametrize("bad", ["address", "pub_address"])
@pytest.mark.parametrize("value", UNUSABLE_ADDRESSES)
def test_hello_with_an_unusable_address_does_not_kill_the_node(node, acked, client, bad, value):
    before = invalid_count(client.status())
    info = member_info("evil")
    info[bad] = value
    request_id = client.send_unchecked("hello", {"member": info}, request_id=77)
    earlier, status = client.replies_until_status()
    # Refused by the decoder (dropped, counted, no reply) or answered; never fatal.
    if earlier:
        assert [(r.request_id, r.type) for r in earlier] in ([(request_id, "hello_ok")], [(request_id, "error")])
    else:
        assert invalid_count(status) == before + 1
    assert_healthy(node, acked)


def test_hello_cannot_overwrite_this_nodes_own_membership(node, acked, client):
    me_before = [m for m in node.status()["members"] if m["node_id"] == node.node_id]
    reply = client.request("hello", {"member": member_info(node.node_id, role="client", incarnation=1 << 61)})
    assert reply.type in ("hello_ok", "error")
    assert [m for m in node.status()["members"] if m["node_id"] == node.node_id] == me_before
    assert me_before[0]["role"] == "storage" and me_before[0]["address"] == node.address
    node.produce("fresh-topic", b"x", acks="leader", timeout=5.0)
    assert_healthy(node, acked)


RAFT_APPEND_CASES = ["conflict_at_committed_index", "undecodable_command", "command_not_a_map"]


@pytest.mark.parametrize("case", RAFT_APPEND_CASES)
def test_raft_append_from_a_stranger_does_not_kill_the_node(node, acked, client, case):
    metadata = node.status()["metadata"]
    term, last_index = metadata["term"], metadata["last_index"]
    if case == "conflict_at_committed_index":
        body = {"term": term + 5, "leader": "evil", "prev_index": -1, "prev_term": 0, "commit": 5,
                "entries": [[term + 5, msgpack.packb({"op": "noop"})]]}
    else:
        command = b"\xc1" if case == "undecodable_command" else msgpack.packb([1, 2])
        body = {"term": term + 5, "leader": "evil", "prev_index": last_index, "prev_term": term,
                "commit": last_index + 1, "entries": [[term + 5, command]]}
    client.send_request("raft_append", body, request_id=0)
    reply = client.request("status", {}, timeout_ms=1500)  # handled after the raft_append
    assert reply.type == "status_ok"
    assert_healthy(node, acked)


def test_raft_propose_of_anything_but_create_topic_is_refused(node, acked, client):
    for command in ({"op": "config", "members": {}}, {"op": "noop"}, [1, 2], "create_topic"):
        reply = client.request("raft_propose", {"command": msgpack.packb(command)})
        assert reply.type == "error" and reply.body["code"] == "protocol", (command, reply)
    for raw in (b"", b"\xc1", b"\x81\xa2op"):
        reply = client.request("raft_propose", {"command": raw})
        assert reply.type == "error" and reply.body["code"] == "protocol", (raw, reply)
    assert_healthy(node, acked)


@pytest.mark.parametrize("command", [
    {"op": "create_topic"},
    {"op": "create_topic", "config": [1]},
    {"op": "create_topic", "config": {"name": "x"}},
], ids=["no_config", "config_not_a_map", "config_missing_fields"])
def test_raft_propose_with_a_malformed_command_gets_a_protocol_error(node, acked, client, command):
    request_id = client.send_request("raft_propose", {"command": msgpack.packb(command)})
    earlier, _status = client.replies_until_status(timeout_ms=1500)  # the node is alive either way
    assert [(r.request_id, r.type, r.body.get("code")) for r in earlier] == [(request_id, "error", "protocol")]
    assert_healthy(node, acked)


@pytest.mark.parametrize("name", ["__meta", "__anything"])
def test_reserved_topic_names_cannot_be_created_through_raft_propose(node, acked, client, name):
    config = {"name": name, "partitions": 1, "replication_factor": 1, "retention_bytes": None,
              "retention_ms": None, "cleanup_policy": "delete"}
    reply = client.request("raft_propose", {"command": msgpack.packb({"op": "create_topic", "config": config})})
    assert reply.type == "error" and reply.body["code"] == "invalid_topic", reply
    assert name not in topic_names(client.status())


def test_a_peer_cannot_choose_the_configuration_of_the_offsets_topic(node, acked, client):
    hostile = {"name": "__consumer_offsets", "partitions": 1, "replication_factor": 1, "retention_bytes": 1,
               "retention_ms": 1, "cleanup_policy": "delete"}
    reply = client.request("raft_propose", {"command": msgpack.packb({"op": "create_topic", "config": hostile})})
    assert reply.type == "raft_propose_ok", reply
    offsets = next(t for t in client.status()["topics"] if t["name"] == "__consumer_offsets")
    assert offsets["config"]["partitions"] == node.config.partitions
    assert offsets["config"]["cleanup_policy"] == "compact" and offsets["config"]["retention_bytes"] is None


def test_a_join_request_from_a_node_that_never_answers_does_not_stall_metadata(node, acked, client):
    client.send_request("raft_join", {"member": member_info("evil", role="storage")}, request_id=0)
    client.status()  # handled after the join
    time.sleep(1.5)  # several election timeouts: long enough for the leader to notice it lost its majority
    node.produce("fresh-topic", b"x", acks="leader", timeout=3.0)
    assert_healthy(node, acked)


def deep_frame(type_: str, field: str, depth: int = 1000) -> bytes:
    """A header whose body ``field`` is a list nested ``depth`` deep (msgpack's own stack limit is 1024)."""
    head = msgpack.packb([PROTOCOL_VERSION, CLUSTER, "raw-client", type_, 3, {field: None}])
    assert head.endswith(b"\xc0")
    return head[:-1] + b"\x91" * depth + b"\x01"


@pytest.mark.parametrize(("type_", "field"), [("status_ok", "status"), ("list_offsets_ok", "offset"),
                                              ("fetch", "topic")])
def test_one_deeply_nested_frame_does_not_kill_the_node(node, acked, client, type_, field):
    before = invalid_count(client.status())
    client.send([deep_frame(type_, field)])
    reply_id = client.send_request("status", {})
    assert client.sock.poll(1500), "the node stopped answering"
    refused = wire.decode(client.sock.recv_multipart(), CLUSTER)  # its envelope was readable: answered
    assert (refused.type, refused.request_id, refused.body["code"]) == ("error", 3, "protocol")
    assert client.sock.poll(1500), "the node stopped answering"
    reply = wire.decode(client.sock.recv_multipart(), CLUSTER)
    assert reply.request_id == reply_id
    assert invalid_count(reply.body["status"]) == before + 1
    assert_healthy(node, acked)


# ---------------------------------------------------------------- a hostile seed (the DEALER side)
@pytest.fixture
def fake_seed(context) -> Iterator[tuple[zmq.Socket, str]]:
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    port = int(router.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
    try:
        yield router, f"127.0.0.1:{port}"
    finally:
        router.close(0)


def receive_hello(router: zmq.Socket) -> tuple[bytes, wire.Message]:
    assert router.poll(REPLY_TIMEOUT_MS), "the node did not say hello to its seed"
    identity, *frames = router.recv_multipart()
    message = wire.decode(frames, CLUSTER)
    assert message.type == "hello"
    return identity, message


def answer_hello(router: zmq.Socket, identity: bytes, hello_request: wire.Message, address: str) -> None:
    """A valid hello_ok from the fake seed (as a client-role peer): the node has now heard from
    its only seed, so it may form its own cluster (a node never forms one while a seed is silent)."""
    seed = member_info("seed", address=f"tcp://{address}", pub_address=f"tcp://{address}", role="client")
    router.send_multipart([identity, *wire.encode(CLUSTER, "seed", "hello_ok", hello_request.request_id, {
        "member": seed, "members": [seed], "formed": False, "leader": None, "size": 0, "trivial": False, "can_form": False})])


@pytest.fixture
def seeded_node(tmp_path, fake_seed) -> Iterator[meshq.Node]:
    node = start_node(tmp_path / "seeded", seeds=[fake_seed[1]])
    try:
        yield node
    finally:
        stop_node(node)


@pytest.fixture
def seeded_client(seeded_node, context) -> Iterator[RawClient]:
    # node.status() needs a formed cluster; a raw status request is answered from the local view at once
    raw = RawClient(context, seeded_node.address)
    try:
        yield raw
    finally:
        raw.close()


def test_junk_replies_from_a_seed_are_dropped_and_counted(seeded_node, seeded_client, fake_seed):
    router, address = fake_seed
    identity, hello_request = receive_hello(router)
    rng = random.Random(7)
    junk = [[rng.randbytes(rng.randrange(0, 200))] for _ in range(50)]
    for frames in junk:
        with pytest.raises(ProtocolError):
            wire.decode(frames, CLUSTER)
    junk.append(wire.encode("other-cluster", "seed", "hello_ok", hello_request.request_id,
                            WIRE_EXAMPLES["hello_ok"][0]))
    junk.append([b"\x91" * 5000 + b"\xc0"])
    for frames in junk:
        router.send_multipart([identity, *frames])
    # Valid replies the node is not waiting for are ignored (not invalid).
    router.send_multipart([identity, *wire.encode(CLUSTER, "seed", "produce_ok", 999_999,
                                                  {"topic": TOPIC, "partition": 0, "base_offset": 0,
                                                   "duplicate": False})])
    wait_for(lambda: invalid_count(seeded_client.status()) == len(junk), what="junk counted")
    answer_hello(router, identity, hello_request, address)
    metadata = seeded_node.produce(TOPIC, b"still-works", acks="leader")
    records = consume_all(seeded_node, TOPIC, 1)
    assert [(r.partition, r.offset, r.value) for r in records] == [(metadata.partition, metadata.offset,
                                                                    b"still-works")]
    assert invalid_count(seeded_client.status()) == len(junk)


@pytest.mark.parametrize("value", UNUSABLE_ADDRESSES)
def test_a_seed_listing_an_unusable_member_address_does_not_kill_the_node(seeded_node, seeded_client, fake_seed,
                                                                          value):
    router, address = fake_seed
    identity, hello_request = receive_hello(router)
    seed = member_info("seed", address=f"tcp://{address}", pub_address=f"tcp://{address}", role="client")
    ghost = member_info("ghost", address=value, role="storage")
    router.send_multipart([identity, *unchecked_frames("hello_ok", {
        "member": seed, "members": [seed, ghost], "formed": False, "leader": None,
        "size": 0, "trivial": False, "can_form": False}, hello_request.request_id,
        sender="seed")])

    def reply_handled() -> bool:
        # Either the node took the members in, or (a possible fix) refused the reply as invalid.
        status = seeded_client.status(timeout_ms=1500)
        return any(m["node_id"] == "seed" for m in status["members"]) or invalid_count(status) > 0

    wait_for(reply_handled, what="hello_ok handled")
    answer_hello(router, identity, hello_request, address)
    metadata = seeded_node.produce(TOPIC, b"still-works", acks="leader", timeout=5.0)
    assert metadata.offset == 0


# ---------------------------------------------------------------- a hostile publisher (the SUB side)
def test_junk_published_by_a_member_is_dropped_and_counted(node, acked, client, context):
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    try:
        pub_address = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        reply = client.request("hello", {"member": member_info("spy", address=node.address,
                                                                pub_address=pub_address)})
        assert reply.type == "hello_ok"
        before = invalid_count(client.status())
        rng = random.Random(3)
        junk = [[rng.randbytes(rng.randrange(0, 100))] for _ in range(20)]
        junk.append(wire.encode(CLUSTER, "spy", "produce", 0, produce_body(), (good_batch(),)))  # not an event
        junk.append(wire.encode(CLUSTER, "spy", "heartbeat", 0, {  # claims to be another node
            "member": member_info("someone-else"), "members": [], "formed": False, "leader": None, "term": 0,
            "size": 0, "trivial": False, "can_form": False, "leads": []}))
        # PUB/SUB drops what is published before the node's subscription is up: repeat until counted.
        deadline = time.monotonic() + 10
        while invalid_count(client.status()) < before + len(junk):
            assert time.monotonic() < deadline, "junk on the SUB socket was never counted"
            for frames in junk:
                pub.send_multipart(frames)
            time.sleep(0.05)
        status = client.status()
        assert high_watermarks(status) == [sum(1 for m, _, _ in acked if m.partition == p) for p in (0, 1)]
        # (random bytes rarely pass the SUB's prefix filter) the two decoded ones: by the node id they name
        assert status["invalid_frames"]["by_peer"].get("spy", 0) >= 2
    finally:
        pub.close(0)
    assert_healthy(node, acked)


def test_a_core_bug_on_a_bad_request_is_logged_and_counted_not_fatal(node, acked, client, monkeypatch):
    """The runtime's last line of defence logged ``event.message.type``, which a BadRequest (a
    request whose envelope decoded but whose body did not) does not have: the AttributeError in
    the except clause killed the runtime thread, i.e. the node."""
    from meshq.core.events import BadRequest

    real_handle = node.core.handle

    def handle(event, now_s):
        if type(event) is BadRequest:
            raise RuntimeError("a bug in the core")
        return real_handle(event, now_s)

    monkeypatch.setattr(node.core, "handle", handle)
    errors = node.core.counters.get("handler_errors", 0)
    client.send_unchecked("produce", {"topic": TOPIC}, 99)  # readable envelope, body missing fields
    status = client.status()
    assert status["counters"]["handler_errors"] == errors + 1
    assert node.runtime.running  # (a property)
    monkeypatch.undo()
    assert_healthy(node, acked)
