"""A client written from docs/protocol.md alone: pyzmq, msgpack, struct and zlib, no meshq code.

Everything this client sends and reads is built from the documented frames (header array,
message bodies, the record batch layout, the error reply), so a change that makes the doc
wrong fails here. Only the node under test is a meshq.Node.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Iterator

import msgpack
import pytest
import zmq

import meshq

VERSION = 1  # docs/protocol.md: "version" of the header array
TOPIC = "outside"


def make_batch(values: list[bytes], timestamp_ms: int = 1_700_000_000_000) -> bytes:
    """The documented record batch: 61-byte header, then [ts_deltas, keys, values, headers]."""
    records = msgpack.packb([None, None, values, None], use_bin_type=True)
    # from `attributes` (offset 21) on: what the CRC covers
    tail = struct.pack(">hiqqqhii", 0, len(values) - 1, timestamp_ms, timestamp_ms, -1, -1, -1, len(values)) + records
    head = struct.pack(">qIiBI", 0, len(tail) + 9, 0, 3, zlib.crc32(tail))
    return head + tail


def read_values(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, value) of every record in the batches of a fetch_ok payload."""
    out, pos = [], 0
    while pos < len(data):
        base_offset, batch_length = struct.unpack_from(">qI", data, pos)
        end = pos + 12 + batch_length
        assert zlib.crc32(data[pos + 21:end]) == struct.unpack_from(">I", data, pos + 17)[0]
        _ts, _keys, values, _headers = msgpack.unpackb(data[pos + 61:end], raw=False)
        out += [(base_offset + i, v) for i, v in enumerate(values)]
        pos = end
    return out


class Outsider:
    def __init__(self, context: zmq.Context, address: str, cluster: str) -> None:
        self.cluster = cluster
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.next_id = 0

    def send(self, type_: str, body: dict, payloads: tuple = (), request_id: int | None = None) -> int:
        if request_id is None:
            self.next_id += 1
            request_id = self.next_id
        header = msgpack.packb([VERSION, self.cluster, "outsider", type_, request_id, body], use_bin_type=True)
        self.sock.send_multipart([header, *payloads])
        return request_id

    def receive(self) -> tuple[str, int, dict, list[bytes]]:
        assert self.sock.poll(5000), "no reply"
        header, *payloads = self.sock.recv_multipart()
        version, cluster, _sender, type_, request_id, body = msgpack.unpackb(header, raw=False)
        assert (version, cluster) == (VERSION, self.cluster)
        return type_, request_id, body, payloads

    def request(self, type_: str, body: dict, payloads: tuple = ()) -> tuple[str, dict, list[bytes]]:
        request_id = self.send(type_, body, payloads)
        reply_type, reply_id, reply_body, reply_payloads = self.receive()
        assert reply_id == request_id
        return reply_type, reply_body, reply_payloads


@pytest.fixture
def node(tmp_path) -> Iterator[meshq.Node]:
    with meshq.Node(cluster=f"outside-{uuid.uuid4().hex[:8]}", data_dir=tmp_path, mdns=False,
                    replication_factor=1, partitions=2) as n:
        n.wait_ready(10)
        yield n


@pytest.fixture
def outsider(node) -> Iterator[Outsider]:
    context = zmq.Context()
    client = Outsider(context, node.address, node.config.cluster)
    yield client
    client.sock.close(0)
    context.term()


@pytest.mark.timeout(60)
def test_a_client_built_from_the_protocol_doc_produces_fetches_and_reads_status(node, outsider):
    kind, body, _ = outsider.request("create_topic", {"config": {
        "name": TOPIC, "partitions": 2, "replication_factor": 1, "retention_bytes": None, "retention_ms": None,
        "cleanup_policy": "delete"}, "if_not_exists": True})
    assert kind == "create_topic_ok", body
    for _ in range(100):  # the partition's leader is elected a moment after the topic exists
        kind, body, _ = outsider.request("produce", {"topic": TOPIC, "partition": 1, "acks": "leader",
                                                     "timeout_ms": 2000}, (make_batch([b"a", b"b"]),))
        if kind != "error" or not body["retriable"]:
            break
    assert kind == "produce_ok" and body["base_offset"] == 0, body

    # acks=none with a request id: answered once appended
    kind, body, _ = outsider.request("produce", {"topic": TOPIC, "partition": 1, "acks": "none", "timeout_ms": 0},
                                     (make_batch([b"c"]),))
    assert (kind, body["base_offset"]) == ("produce_ok", 2)

    kind, body, payloads = outsider.request("fetch", {"topic": TOPIC, "partition": 1, "offset": 0,
                                                      "max_bytes": 1 << 20, "max_wait_ms": 0})
    assert kind == "fetch_ok" and body["high_watermark"] == 3
    assert read_values(payloads[0]) == [(0, b"a"), (1, b"b"), (2, b"c")]

    kind, body, _ = outsider.request("status", {})
    assert kind == "status_ok"
    (topic,) = [t for t in body["status"]["topics"] if t["name"] == TOPIC]
    assert [p["high_watermark"] for p in topic["partitions"]] == [0, 3]

    # what meshq's own client reads back is what the outsider wrote
    with node.consumer(TOPIC, partitions=[1]) as consumer:
        assert [r.value for r in consumer.poll(timeout=5.0)] == [b"a", b"b", b"c"]


@pytest.mark.timeout(60)
def test_a_bad_request_with_a_readable_envelope_is_answered_with_the_defect(node, outsider):
    kind, body, _ = outsider.request("fetch", {"topic": TOPIC, "offset": 0, "max_bytes": 10, "max_wait_ms": 0})
    assert (kind, body["code"], body["retriable"]) == ("error", "protocol", False)
    assert body["message"] == "fetch: field partition: missing"
    kind, body, _ = outsider.request("no_such_type", {})
    assert (kind, body["code"], body["message"]) == ("error", "protocol", "unknown message type 'no_such_type'")
    outsider.send("status", {}, request_id=0)  # one-way: never answered, not even a status
    kind, body, _ = outsider.request("status", {})
    assert kind == "status_ok"
