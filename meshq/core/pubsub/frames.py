"""The pub/sub data frames: how a published message travels from one node to another.

Theory of operation
-------------------
Data goes over the PUB/SUB sockets, addressed to one node: the first frame starts with
``b"M" + node_id + b"\\x00"`` and each node's SUB subscribes to that prefix for its own id
(plus ``b"\\x96"``, the first byte of every control message: ``meshq.core.wire`` headers are
6-element msgpack arrays). ZeroMQ filters on the publisher's side, so a frame addressed to
a node reaches that node only, and a paused or slow subscriber only fills its own queue at
the publisher (its high-water mark: the frames beyond it are dropped for it alone).

Messages to one node travel in batches (one message is a batch of one), two frames each::

    [prefix + seq (8 bytes, big-endian) + meta, payloads]

``meta`` is a msgpack array ``[source, entries]``: the publishing node, and per message
``[subject, queues, headers, size]`` — the queue groups for which the receiving node was
picked (``None``: none), the headers (``None`` or a map of str to bytes) and the size of its
data. ``payloads`` is every message's data, concatenated. ``seq`` numbers the first message
of the batch: a publisher numbers the messages it sends to each node from 1, so a receiver
sees a gap as messages dropped on the way (high-water marks), counted per peer; a smaller
number means the publisher restarted.

With keys, a frame's prefix also names the key of the node it is addressed to:
``b"M" + key + node_id + b"\\x00"`` (``keyed_data_prefix``; ``key`` is the z85 CURVE public key the
node listens with, ``KEY_BYTES`` long: the cluster key for a storage node, a client node's own).
A keyed node's PUB is an XPUB that takes a data subscription only from a connection whose
CURVE key is the one its prefix names (``may_subscribe``; ``meshq.io.xpub`` applies it), so a
trusted key cannot subscribe to the data addressed to another key. The runtime adds and strips
the key; the room sees the unkeyed prefix either way.

Nothing received is trusted: ``decode`` checks every field (and the subject's rules) and
raises ``ProtocolError``; the caller drops and counts the frame.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from meshq.core.pubsub.subjects import validate_queue, validate_subject
from meshq.errors import InvalidSubjectError, ProtocolError, UsageError

DATA_MARK = b"M"
CONTROL_PREFIX = b"\x96"  # every wire.encode header: a msgpack fixarray of 6
_SEQ = struct.Struct(">Q")
MAX_META_BYTES = 1024 * 1024
MAX_BATCH_MESSAGES = 4096  # messages in one batch (a sender keeps far fewer: meshq.io.pubsub)
_MAX_HEADERS = 64


def data_prefix(node_id: str) -> bytes:
    """The first bytes of every data frame addressed to ``node_id`` (its SUB subscribes to them)."""
    return DATA_MARK + node_id.encode() + b"\x00"


KEY_BYTES = 40  # a z85 CURVE public key


def keyed_data_prefix(node_id: str, key: bytes) -> bytes:
    """The first bytes of every data frame addressed to ``node_id`` in a keyed cluster: ``key`` (z85, the key
    ``node_id`` listens with) comes first, so a subscription can be judged by it alone (``may_subscribe``)."""
    if len(key) != KEY_BYTES:
        raise UsageError(f"a CURVE public key in z85 is {KEY_BYTES} bytes, not {len(key)}")
    return add_key(data_prefix(node_id), key)


def add_key(first: bytes, key: bytes) -> bytes:
    """A batch's first frame (it starts with ``data_prefix``) as sent in a keyed cluster: ``key`` after the mark."""
    return DATA_MARK + key + first[1:]


def strip_key(first: bytes) -> bytes:
    """The inverse of ``add_key``: the first frame as the room reads it (the unkeyed prefix)."""
    return DATA_MARK + first[1 + KEY_BYTES:]


def may_subscribe(topic: bytes, key: bytes | None) -> bool:
    """Whether a keyed PUB takes a subscription to ``topic`` from a connection CURVE verified with ``key`` (z85;
    None: unknown): the control messages are for every member; data only when ``topic`` starts with the prefix
    of ``key`` itself (the key has a fixed length, so such a topic matches no frame addressed to another key)."""
    if topic[:1] == CONTROL_PREFIX:
        return True
    return key is not None and len(key) == KEY_BYTES and topic.startswith(DATA_MARK + key)


Entry = tuple  # (subject, queues or None, headers or None, data)


def encode_batch(prefix: bytes, first_seq: int, source: str, entries: list) -> list[bytes]:
    """The two frames carrying ``entries`` (``(subject, queues, headers, data)`` each) to a node."""
    meta = msgpack.packb([source, [[subject, queues, headers, len(data)] for subject, queues, headers, data in entries]],
                         use_bin_type=True)
    payloads = entries[0][3] if len(entries) == 1 else b"".join([entry[3] for entry in entries])
    return [prefix + _SEQ.pack(first_seq) + meta, payloads]


_valid_subjects: set[str] = set()  # subjects seen valid (dropped wholesale when large)


def decode_batch(frame: bytes, prefix_len: int, payloads: bytes) -> tuple[int, str, list]:
    """``(first_seq, source, entries)`` of a batch whose prefix is ``prefix_len`` bytes long, each
    entry ``(subject, queues, headers, data)``; raises ``ProtocolError`` on any defect."""
    meta_bytes = frame[prefix_len + 8:]
    if len(frame) < prefix_len + 9 or len(meta_bytes) > MAX_META_BYTES:
        raise ProtocolError(f"pub/sub data frame of {len(frame)} bytes is malformed")
    (first_seq,) = _SEQ.unpack_from(frame, prefix_len)
    try:
        meta = msgpack.unpackb(meta_bytes, raw=False, use_list=True, strict_map_key=True,
                               max_str_len=len(meta_bytes), max_bin_len=len(meta_bytes),
                               max_array_len=MAX_BATCH_MESSAGES, max_map_len=_MAX_HEADERS, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"pub/sub meta does not decode: {type(exc).__name__}") from None
    if type(meta) is not list or len(meta) != 2 or type(meta[0]) is not str or type(meta[1]) is not list:
        raise ProtocolError("pub/sub meta is not [source, entries]")
    source, described = meta
    if not 0 < len(source) <= 64 or not described:
        raise ProtocolError("pub/sub meta: bad source or no message")
    entries = []
    offset = 0
    valid = _valid_subjects
    for item in described:
        if type(item) is not list or len(item) != 4:
            raise ProtocolError("pub/sub meta: an entry is not [subject, queues, headers, size]")
        subject, queues, headers, size = item
        if subject not in valid:
            if type(subject) is not str:
                raise ProtocolError("pub/sub meta: subject is not a string")
            try:
                validate_subject(subject)
            except InvalidSubjectError as exc:
                raise ProtocolError(f"pub/sub meta: {exc}") from None
            if len(valid) >= 4096:
                valid.clear()
            valid.add(subject)
        if queues is not None:
            if type(queues) is not list or not queues:
                raise ProtocolError("pub/sub meta: queues is not a list")
            try:
                for queue in queues:
                    validate_queue(queue)
            except InvalidSubjectError as exc:
                raise ProtocolError(f"pub/sub meta: {exc}") from None
        if headers is not None and (type(headers) is not dict
                                    or any(type(v) is not bytes for v in headers.values())):
            raise ProtocolError("pub/sub meta: headers are not a map of str to bytes")
        if type(size) is not int or size < 0 or offset + size > len(payloads):
            raise ProtocolError("pub/sub meta: sizes do not add up to the payload frame")
        entries.append((subject, queues, headers, payloads[offset:offset + size] if len(described) > 1 else payloads))
        offset += size
    if offset != len(payloads):
        raise ProtocolError("pub/sub meta: sizes do not add up to the payload frame")
    return first_seq, source, entries


def check_headers(headers: Any) -> dict[str, bytes] | None:
    """The headers of a publish as sent (str keys, bytes values), or None; raises on other types."""
    if not headers:
        return None
    if not isinstance(headers, dict) or len(headers) > _MAX_HEADERS:
        raise UsageError(f"headers must be a dict of at most {_MAX_HEADERS} entries (str -> bytes)")
    out = {}
    for key, value in headers.items():
        if not isinstance(key, str):
            raise UsageError(f"header names must be str, not {type(key).__name__}")
        if isinstance(value, str):
            value = value.encode()
        elif isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        elif type(value) is not bytes:
            raise UsageError(f"header {key!r}: values must be bytes (or str), not {type(value).__name__}")
        out[key] = value
    return out

