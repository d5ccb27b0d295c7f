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
    21      2     attributes         AT_MOST_ONCE (0x1), CONTROL (0x2), COMPACTED_GAP (0x4)
    23      4     last_offset_delta  record_count - 1
    27      8     first_timestamp_ms
    35      8     max_timestamp_ms
    43      8     producer_id        -1 when not idempotent
    51      2     producer_epoch     -1 when not idempotent
    53      4     base_sequence      -1 when not idempotent
    57      4     record_count
    61      ...   records: msgpack array of exactly 4 columns (below)

The records are stored column by column, so that encoding and the leader's check run at C
speed instead of doing Python work per record. The body is one msgpack array of exactly
four elements, ``[ts_deltas, keys, values, headers]``; N is ``record_count``:

    column     encoding
    ts_deltas  nil when every record's timestamp equals first_timestamp_ms, otherwise an
               array of N ints (timestamp_ms - first_timestamp_ms, may be negative)
    keys       nil when no record has a key, otherwise an array of N (bin or nil)
    values     an array of N bin (always present)
    headers    nil when no record has headers, otherwise an array of N (nil or a map of
               str to bin; nil and an empty map both read back as ``{}``)

The encoder writes nil for a column whenever it can (all timestamps equal, all keys nil,
no headers); readers also accept the array form of those cases (e.g. an array of N nils).
Anything else is refused with ``ProtocolError``: a column count other than 4, an empty
array or any array whose length is not N, nil for ``values``, elements of the wrong type
(``bool`` is not an int, str is not bin), non-str header keys, or trailing bytes.
Magic 2 (one ``[ts_delta, key, value, headers]`` array per record) is no longer read.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from functools import partial
from itertools import chain, repeat, starmap
from typing import NamedTuple

import msgpack

from meshq.core.records import Record
from meshq.errors import CorruptLogError, MessageTooLargeError, ProtocolError

BATCH_MAGIC = 3  # 2 was one array per record; 3 is columnar (no released data used 2)
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
#: attributes bit: a control batch, written by a partition's leader into the partition's own log
#: (shared-subscription state: deliveries, acks, dead letters; ``meshq.core.partitions.shared``). It
#: replicates, fences and survives failover like data, but readers of records skip it: the
#: offsets it takes are gaps in what consumers see. Clients may not produce one.
CONTROL = 0x2
#: attributes bit: compaction removed the records between the previous batch of the log and this
#: one, so this batch's base offset may lie past the previous batch's end (a gap). Inside the CRC:
#: a gap without it is damage. Set only by compaction; replicas copy it with the batch's bytes.
COMPACTED_GAP = 0x4



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


def gap_allowed(header: BatchHeader) -> bool:
    """Whether records before this batch may be missing because compaction removed them."""
    return bool(header.attributes & COMPACTED_GAP)


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
    keys, values, headers, timestamps = zip(*records)
    first_ts = max_ts = timestamps[0]
    if timestamps.count(first_ts) == count:
        ts_deltas = None
    else:
        max_ts = max(timestamps)
        ts_deltas = list(map(first_ts.__rsub__, timestamps))  # timestamp - first_ts, per record
    if keys.count(None) == count:
        keys = None
    if any(headers):  # an empty dict counts as no headers
        headers = [h or None for h in headers]
    else:
        headers = None
    body = msgpack.packb((ts_deltas, keys, values, headers), use_bin_type=True)
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
        if header.magic == 2:
            raise ProtocolError(
                f"batch magic 2 (the per-record layout) is no longer supported; this version reads only "
                f"magic {BATCH_MAGIC} (columnar records)"
            )
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


_NONE_TYPE = type(None)
_INT_ONLY = frozenset((int,))
_BYTES_ONLY = frozenset((bytes,))
_KEY_TYPES = frozenset((bytes, _NONE_TYPE))
_HEADERS_TYPES = frozenset((dict, _NONE_TYPE))
_STR_ONLY = frozenset((str,))


def _decode_body(
    buf: bytes | bytearray | memoryview, pos: int, header: BatchHeader
) -> tuple[tuple | None, tuple | None, tuple, tuple | None]:
    """Decode and strictly check the record columns: ``(ts_deltas, keys, values, headers)``.

    A nil column comes back as None. Every check runs over whole columns at C speed
    (``set(map(type, column))``); there is no Python loop per record.
    """
    count = header.record_count
    body = memoryview(buf)[pos + HEADER_SIZE : pos + header.size]
    try:
        columns = msgpack.unpackb(
            body,
            use_list=False,
            raw=False,
            strict_map_key=True,
            max_bin_len=len(body),
            max_str_len=len(body),
            max_array_len=max(count, 4),
            max_map_len=len(body),
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(f"batch records do not decode: {exc}") from None
    if type(columns) is not tuple or len(columns) != 4:
        raise ProtocolError("batch records are not an array of 4 columns [ts_deltas, keys, values, headers]")
    ts_deltas, keys, values, headers = columns
    if type(values) is not tuple or len(values) != count:
        raise ProtocolError("batch values column does not match its record count")
    if not set(map(type, values)) <= _BYTES_ONLY:
        raise ProtocolError("batch values column holds a non-bin value")
    if ts_deltas is not None:
        if type(ts_deltas) is not tuple or len(ts_deltas) != count:
            raise ProtocolError("batch timestamp column does not match its record count")
        if not set(map(type, ts_deltas)) <= _INT_ONLY:
            raise ProtocolError("batch timestamp column holds a non-int delta")
    if keys is not None:
        if type(keys) is not tuple or len(keys) != count:
            raise ProtocolError("batch keys column does not match its record count")
        if not set(map(type, keys)) <= _KEY_TYPES:
            raise ProtocolError("batch keys column holds a key that is neither bin nor nil")
    if headers is not None:
        if type(headers) is not tuple or len(headers) != count:
            raise ProtocolError("batch headers column does not match its record count")
        if not set(map(type, headers)) <= _HEADERS_TYPES:
            raise ProtocolError("batch headers column holds headers that are neither a map nor nil")
        maps = list(filter(None, headers))
        if not set(map(type, chain.from_iterable(maps))) <= _STR_ONLY:
            raise ProtocolError("batch holds a header key that is not a str")
        if not set(map(type, chain.from_iterable(map(dict.values, maps)))) <= _BYTES_ONLY:
            raise ProtocolError("batch holds a header value that is not bin")
    return ts_deltas, keys, values, headers


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


_new_record = partial(tuple.__new__, Record)  # Record from a 7-tuple, without a Python-level __new__


def _own_headers(headers: dict[str, bytes] | None) -> dict[str, bytes]:
    return headers or {}


def decode_records(
    buf: bytes | bytearray | memoryview, topic: str, partition: int, min_offset: int = 0
) -> list[Record]:
    """Decode every record at or after ``min_offset`` in a concatenation of batches (control
    batches are skipped: their offsets are gaps)."""
    out: list[Record] = []
    extend = out.extend
    for pos, header in iter_batches(buf):
        if header.next_offset <= min_offset or header.attributes & CONTROL:
            continue
        try:
            columns = _decode_body(buf, pos, header)
        except ProtocolError as exc:
            raise CorruptLogError(str(exc)) from None
        ts_deltas, keys, values, headers = columns
        skip = max(0, min_offset - header.base_offset)
        offsets = range(header.base_offset + skip, header.next_offset)
        first_ts = header.first_timestamp_ms
        if skip:
            values = values[skip:]
            keys = keys[skip:] if keys is not None else None
            ts_deltas = ts_deltas[skip:] if ts_deltas is not None else None
            headers = headers[skip:] if headers is not None else None
        n = len(values)
        key_col = keys if keys is not None else repeat(None, n)
        ts_col = map(first_ts.__add__, ts_deltas) if ts_deltas is not None else repeat(first_ts, n)
        # each record its own headers dict (a caller may change one); built at C speed, no Python call per record
        hdr_col = starmap(dict, repeat((), n)) if headers is None else map(_own_headers, headers)
        extend(map(_new_record, zip(repeat(topic, n), repeat(partition, n), offsets, key_col, values, hdr_col,
                                    ts_col)))
    return out


def decode_control(buf: bytes | bytearray | memoryview, min_offset: int = 0) -> list[tuple[int, list[bytes]]]:
    """``(base_offset, [value, ...])`` of each control batch at or after ``min_offset``."""
    out = []
    for pos, header in iter_batches(buf):
        if header.next_offset <= min_offset or not header.attributes & CONTROL:
            continue
        try:
            values = _decode_body(buf, pos, header)[2]
        except ProtocolError as exc:
            raise CorruptLogError(str(exc)) from None
        out.append((header.base_offset, list(values)))
    return out


def next_offset_after(buf: bytes | bytearray | memoryview) -> int | None:
    """The offset after the last whole batch in ``buf`` (None when it holds none)."""
    end = None
    for _pos, header in iter_batches(buf, verify_crc=False):
        end = header.next_offset
    return end
