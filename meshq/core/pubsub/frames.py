"""The pub/sub data frames: how a published message travels from one node to another.

Theory of operation
-------------------
Data goes over the PUB/SUB sockets, addressed to one node: the first frame starts with
``b"M" + node_id + b"\\x00"`` and each node's SUB subscribes to that prefix for its own id
(plus ``b"\\x96"``, the first byte of every control message: ``meshq.core.wire`` headers are
6-element msgpack arrays). ZeroMQ filters on the publisher's side, so a frame addressed to
a node reaches that node only, and a paused or slow subscriber only fills its own queue at
the publisher (its high-water mark: the frames beyond it are dropped for it alone).

A message is two frames::

    [prefix + seq (8 bytes, big-endian) + meta, data]

``meta`` is a msgpack array ``[source, subject, queues, headers]``: the publishing node,
the subject, the queue groups for which the receiving node was chosen (``None``: none) and
the headers (``None`` or a map of str to bytes). ``seq`` counts the frames a publisher sent
to that node, from 1: the receiver sees a gap as frames dropped on the way (high-water
marks), counted per peer; a smaller number means the publisher restarted.

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
_MAX_META_BYTES = 64 * 1024
_MAX_HEADERS = 64


def data_prefix(node_id: str) -> bytes:
    """The first bytes of every data frame addressed to ``node_id`` (its SUB subscribes to them)."""
    return DATA_MARK + node_id.encode() + b"\x00"


def encode_meta(source: str, subject: str, queues: list[str] | None, headers: dict[str, bytes] | None) -> bytes:
    return msgpack.packb([source, subject, queues or None, headers or None], use_bin_type=True)


def encode(prefix: bytes, seq: int, meta: bytes) -> bytes:
    """The first frame of a message (the payload is the second)."""
    return prefix + _SEQ.pack(seq) + meta


def decode(frame: bytes, prefix_len: int) -> tuple[int, str, str, list[str] | None, dict[str, bytes] | None]:
    """``(seq, source, subject, queues, headers)`` of a data frame whose prefix is ``prefix_len``
    bytes long; raises ``ProtocolError`` on any defect."""
    meta_bytes = frame[prefix_len + 8:]
    if len(frame) < prefix_len + 9 or len(meta_bytes) > _MAX_META_BYTES:
        raise ProtocolError(f"pub/sub data frame of {len(frame)} bytes is malformed")
    (seq,) = _SEQ.unpack_from(frame, prefix_len)
    try:
        meta = msgpack.unpackb(meta_bytes, raw=False, use_list=True, strict_map_key=True,
                               max_str_len=len(meta_bytes), max_bin_len=len(meta_bytes), max_array_len=_MAX_HEADERS,
                               max_map_len=_MAX_HEADERS, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"pub/sub meta does not decode: {type(exc).__name__}") from None
    if type(meta) is not list or len(meta) != 4:
        raise ProtocolError("pub/sub meta is not a 4-element array")
    source, subject, queues, headers = meta
    if type(source) is not str or not 0 < len(source) <= 64 or type(subject) is not str:
        raise ProtocolError("pub/sub meta: source or subject is not a string")
    try:
        validate_subject(subject)
        if queues is not None:
            if type(queues) is not list or not queues:
                raise ProtocolError("pub/sub meta: queues is not a list")
            for queue in queues:
                validate_queue(queue)
    except InvalidSubjectError as exc:
        raise ProtocolError(f"pub/sub meta: {exc}") from None
    if headers is not None and (type(headers) is not dict or any(type(v) is not bytes for v in headers.values())):
        raise ProtocolError("pub/sub meta: headers are not a map of str to bytes")
    return seq, source, subject, queues, headers


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

