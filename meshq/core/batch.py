"""Record batch format: the same bytes travel on the wire and sit in the log.

Theory of operation
-------------------
A producer encodes its records into one batch. The leader verifies the batch once
(header bounds, CRC, record structure), stamps the base offset and leader epoch into the
header — both live *outside* the CRC so stamping does not recompute it — and appends the
bytes to its log unchanged. Followers and consumers receive the very same bytes. Per-record
Python work happens only at the two ends (encode in the producer, decode in the consumer);
every node in between handles whole batches.

Layout (big-endian)::

    offset  size  field
    0       8     base_offset        (stamped by the leader)
    8       4     batch_length       bytes that follow this field
    12      4     leader_epoch       (stamped by the leader)
    16      1     magic              BATCH_MAGIC
    17      4     crc                CRC-32 of bytes [21, end)
    21      2     attributes         reserved, 0
    23      4     last_offset_delta  record_count - 1
    27      8     first_timestamp_ms
    35      8     max_timestamp_ms
    43      8     producer_id        -1 when not idempotent
    51      2     producer_epoch     -1 when not idempotent
    53      4     base_sequence      -1 when not idempotent
    57      4     record_count
    61      ...   records: msgpack array of [timestamp_delta_ms, key, value, headers]

``key`` is bytes or nil, ``value`` bytes, ``headers`` nil or a map of str to bytes.
Readers accept records with extra trailing fields (room for later versions).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import msgpack

from meshq.core.records import Record
from meshq.errors import CorruptLogError, MessageTooLargeError, ProtocolError

BATCH_MAGIC = 2
HEADER = struct.Struct(">qIiBIhiqqqhii")
HEADER_SIZE = HEADER.size  # 61
_LENGTH_PREFIX = 12  # base_offset + batch_length
_CRC_START = 21
_OFFSET_EPOCH = struct.Struct(">q4xi")  # base_offset, skip batch_length, leader_epoch
MAX_RECORDS_PER_BATCH = 1_000_000
DEFAULT_MAX_BATCH_BYTES = 16 * 1024 * 1024

NO_PRODUCER_ID = -1
NO_SEQUENCE = -1
#: attributes bit: an at-most-once (acks=none) batch; the leader accepts sequence gaps and drops
#: anything at or below the last sequence it stored (no duplicates, order kept, losses allowed).
AT_MOST_ONCE = 0x1


class BatchHeader(NamedTuple):
    """The fixed header of one batch."""

    base_offset: int
    batch_length: int
    leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    first_timestamp_ms: int
    max_timestamp_ms: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    record_count: int

    @property
    def size(self) -> int:
        """Total bytes of the batch, header included."""
        return _LENGTH_PREFIX + self.batch_length

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.record_count

    @property
    def last_sequence(self) -> int:
        return self.base_sequence + self.record_count - 1 if self.base_sequence >= 0 else NO_SEQUENCE


# A record as the producer hands it over: (key, value, headers, timestamp_ms).
RecordTuple = tuple[bytes | None, bytes, dict[str, bytes] | None, int]


def encode_batch(
    records: Sequence[RecordTuple],
    *,
    producer_id: int = NO_PRODUCER_ID,
    producer_epoch: int = -1,
    base_sequence: int = NO_SEQUENCE,
    base_offset: int = 0,
    leader_epoch: int = 0,
    attributes: int = 0,
) -> bytes:
    """Encode records into one batch (offsets relative to ``base_offset``)."""
    count = len(records)
    if count == 0:
        raise ValueError("a batch holds at least one record")
    if count > MAX_RECORDS_PER_BATCH:
        raise MessageTooLargeError(f"{count} records in one batch; at most {MAX_RECORDS_PER_BATCH}")
    first_ts = records[0][3]
    max_ts = first_ts
    packed = []
    for key, value, headers, ts in records:
        if ts > max_ts:
            max_ts = ts
        packed.append((ts - first_ts, key, value, headers or None))
    body = msgpack.packb(packed, use_bin_type=True)
    tail = struct.pack(
        ">hiqqqhii", attributes, count - 1, first_ts, max_ts, producer_id, producer_epoch, base_sequence, count
    ) + body
    crc = zlib.crc32(tail)
    head = struct.pack(">qIiBI", base_offset, len(tail) + 9, leader_epoch, BATCH_MAGIC, crc)
    return head + tail


def parse_header(buf: bytes | bytearray | memoryview, pos: int = 0) -> BatchHeader:
    """Parse and bounds-check the header at ``pos``; does not verify the CRC.

    Raises ``ProtocolError`` when the header is impossible (short, bad magic, bad counts).
    """
    if len(buf) - pos < HEADER_SIZE:
        raise ProtocolError(f"batch header truncated: {len(buf) - pos} of {HEADER_SIZE} bytes")
    header = BatchHeader._make(HEADER.unpack_from(buf, pos))
    if header.magic != BATCH_MAGIC:
        raise ProtocolError(f"unknown batch magic {header.magic} (expected {BATCH_MAGIC})")
    if header.batch_length < HEADER_SIZE - _LENGTH_PREFIX:
        raise ProtocolError(f"batch length {header.batch_length} shorter than its header")
    if not 1 <= header.record_count <= MAX_RECORDS_PER_BATCH:
        raise ProtocolError(f"batch record count {header.record_count} out of range")
    if header.last_offset_delta != header.record_count - 1:
        raise ProtocolError("batch last_offset_delta does not match its record count")
    if header.base_offset < 0:
        raise ProtocolError(f"negative base offset {header.base_offset}")
    return header


def crc_ok(buf: bytes | bytearray | memoryview, pos: int, header: BatchHeader) -> bool:
    """True when the batch's stored CRC matches its bytes."""
    end = pos + header.size
    return zlib.crc32(memoryview(buf)[pos + _CRC_START : end]) == header.crc


def verify_batch(buf: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> BatchHeader:
    """Fully verify one batch as received from an untrusted peer.

    Checks: exact length, header bounds, CRC, and that the records decode to the declared
    count with the declared types. Raises ``ProtocolError`` (or ``MessageTooLargeError``).
    """
    if len(buf) > max_bytes:
        raise MessageTooLargeError(f"batch of {len(buf)} bytes exceeds the limit of {max_bytes}")
    header = parse_header(buf)
    if header.size != len(buf):
        raise ProtocolError(f"batch declares {header.size} bytes but the frame holds {len(buf)}")
    if not crc_ok(buf, 0, header):
        raise ProtocolError("batch CRC mismatch")
    if header.producer_id >= 0 and (header.base_sequence < 0 or header.producer_epoch < 0):
        raise ProtocolError("an idempotent batch (producer_id >= 0) needs base_sequence and producer_epoch >= 0")
    _decode_body(buf, 0, header)
    return header


def _decode_body(buf: bytes | bytearray | memoryview, pos: int, header: BatchHeader) -> list:
    body = memoryview(buf)[pos + HEADER_SIZE : pos + header.size]
    try:
        records = msgpack.unpackb(
            body,
            use_list=False,
            raw=False,
            strict_map_key=True,
            max_bin_len=len(body),
            max_str_len=len(body),
            max_array_len=max(header.record_count, 64),
            max_map_len=len(body),
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"batch records do not decode: {exc}") from None
    if type(records) is not tuple or len(records) != header.record_count:
        raise ProtocolError("batch record array does not match its record count")
    for record in records:
        if (
            type(record) is not tuple
            or len(record) < 4
            or type(record[0]) is not int
            or (record[1] is not None and type(record[1]) is not bytes)
            or type(record[2]) is not bytes
        ):
            raise ProtocolError("batch holds a malformed record")
        headers = record[3]
        if headers is not None:
            if type(headers) is not dict or not all(
                type(k) is str and type(v) is bytes for k, v in headers.items()
            ):
                raise ProtocolError("batch holds malformed record headers")
    return records


def stamp(batch: bytes | bytearray | memoryview, base_offset: int, leader_epoch: int) -> bytes:
    """Return the batch with its base offset and leader epoch set (CRC unaffected)."""
    out = bytearray(batch)
    struct.pack_into(">q", out, 0, base_offset)
    struct.pack_into(">i", out, 12, leader_epoch)
    return bytes(out)


def iter_batches(buf: bytes | bytearray | memoryview, verify_crc: bool = True) -> Iterator[tuple[int, BatchHeader]]:
    """Yield ``(position, header)`` for each whole batch in a concatenation of batches.

    Raises ``CorruptLogError`` on a bad header or CRC; a trailing partial batch ends the
    iteration silently (a fetch may cut the last batch short).
    """
    view = memoryview(buf)
    pos = 0
    total = len(view)
    while total - pos >= HEADER_SIZE:
        try:
            header = parse_header(view, pos)
        except ProtocolError as exc:
            raise CorruptLogError(f"bad batch header at byte {pos}: {exc}") from None
        if pos + header.size > total:
            return
        if verify_crc and not crc_ok(view, pos, header):
            raise CorruptLogError(f"batch CRC mismatch at byte {pos} (base offset {header.base_offset})")
        yield pos, header
        pos += header.size


def decode_records(
    buf: bytes | bytearray | memoryview, topic: str, partition: int, min_offset: int = 0
) -> list[Record]:
    """Decode every record at or after ``min_offset`` in a concatenation of batches."""
    out: list[Record] = []
    append = out.append
    for pos, header in iter_batches(buf):
        if header.next_offset <= min_offset:
            continue
        try:
            records = _decode_body(buf, pos, header)
        except ProtocolError as exc:
            raise CorruptLogError(str(exc)) from None
        offset = header.base_offset
        first_ts = header.first_timestamp_ms
        for record in records:
            if offset >= min_offset:
                append(Record(topic, partition, offset, record[1], record[2], record[3] or {}, first_ts + record[0]))
            offset += 1
    return out
