"""The storage boundary: one partition's log (``LogStore``) and a data directory (``Storage``).

Theory of operation
-------------------
A partition log holds record batches (``meshq.core.batch``) back to back. Offsets start at
0, ascend and are never reused: ``start_offset`` is the first offset still held (it
advances when retention deletes old segments), ``end_offset`` is the offset the next
appended record gets. They are dense but for two kinds of gap: records compaction removed
(``compact``; the batch after such a gap is marked ``COMPACTED_GAP``) and records damaged
on disk (``lost_offsets``), which are never served: a read of them raises
``CorruptLogError`` naming the offsets. The caller verifies and stamps each batch before appending it; the
log checks the header again before writing and the CRC of every batch it reads back, so
damaged bytes are never served.

A log is split into segments; only the newest (the *active* segment) is written to.
Retention deletes whole sealed segments from the oldest. ``truncate_to`` cuts the end
(replication uses it to drop a divergent tail).

The protocols themselves belong to the core (``meshq.core.ports``: the core defines what it
needs, the adapters here implement it); ``meshq.log`` re-exports them. Two implementations share
one conformance suite (``tests/log``): ``MemoryLog`` (the
in-memory twin, also the simulated disk of the simulator) and ``SegmentedLog`` (files).
Neither is thread-safe: the node's runtime thread owns its logs.
"""

from __future__ import annotations

import msgpack

from meshq.core.batch import BatchHeader, gap_allowed, parse_header
from meshq.errors import ConfigError, InvalidTopicError, ProtocolError, UsageError

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
DEFAULT_SEGMENT_MS = 24 * 60 * 60 * 1000  # as NodeConfig.segment_ms
DEFAULT_INDEX_INTERVAL_BYTES = 4096
MAX_NAME_LENGTH = 200


def check_options(segment_bytes: int, segment_ms: int, index_interval_bytes: int) -> None:
    """Raise ``ConfigError`` unless the storage options are usable."""
    for name, value in (
        ("segment_bytes", segment_bytes),
        ("segment_ms", segment_ms),
        ("index_interval_bytes", index_interval_bytes),
    ):
        if type(value) is not int or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_min_free_bytes(min_free_bytes: int) -> None:
    """Raise ``ConfigError`` unless the free-space reserve is usable."""
    if type(min_free_bytes) is not int or min_free_bytes < 0:
        raise ConfigError(f"min_free_bytes must be a non-negative integer (0: no reserve), got {min_free_bytes!r}")


def check_log_name(topic: str, partition: int) -> None:
    """Raise ``InvalidTopicError`` unless the pair is safe to use as a directory name."""
    if type(topic) is not str or not topic or len(topic) > MAX_NAME_LENGTH:
        raise InvalidTopicError(f"topic name must be 1 to {MAX_NAME_LENGTH} characters, got {topic!r}")
    if topic.startswith(".") or any(ch in topic for ch in "/\\\0") or not topic.isprintable():
        raise InvalidTopicError(f"topic name {topic!r} may not start with '.' or hold '/', '\\' or control characters")
    if type(partition) is not int or partition < 0:
        raise InvalidTopicError(f"partition must be a non-negative integer, got {partition!r}")


def check_meta_name(name: str) -> None:
    """Raise ``UsageError`` unless ``name`` is safe to use as a file name."""
    if type(name) is not str or not name or len(name) > MAX_NAME_LENGTH:
        raise UsageError(f"meta name must be 1 to {MAX_NAME_LENGTH} characters, got {name!r}")
    if name.startswith(".") or any(ch in name for ch in "/\\\0") or not name.isprintable():
        raise UsageError(f"meta name {name!r} may not start with '.' or hold '/', '\\' or control characters")


def check_read_args(offset: int, max_bytes: int) -> None:
    if type(offset) is not int:
        raise UsageError(f"offset must be an integer, got {offset!r}")
    if type(max_bytes) is not int or max_bytes < 0:
        raise UsageError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")


def out_of_range_message(topic: str, partition: int, offset: int, start_offset: int, end_offset: int) -> str:
    return (
        f"offset {offset} is out of range for {topic}-{partition}: "
        f"valid offsets are {start_offset} to {end_offset} (the log end)"
    )


def encode_meta(name: str, value: dict) -> bytes:
    """msgpack bytes of a metadata document (``UsageError`` when it cannot be encoded)."""
    if type(value) is not dict:
        raise UsageError(f"meta {name!r} must be a dict, got {type(value).__name__}")
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UsageError(f"meta {name!r} cannot be stored: {exc}") from None


def decode_meta(data: bytes) -> dict:
    """The document encoded by ``encode_meta`` (raises ``ValueError`` on bad bytes)."""
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ValueError(str(exc)) from None
    if type(value) is not dict:
        raise ValueError(f"holds a {type(value).__name__}, not a dict")
    return value


def check_append_batch(batch: bytes, end_offset: int, name: str) -> BatchHeader:
    """The header of a batch about to be appended at ``end_offset``, or ``UsageError``."""
    try:
        header = parse_header(batch)
    except ProtocolError as exc:
        raise UsageError(f"cannot append to {name}: {exc}") from None
    if header.size != len(batch):
        raise UsageError(f"cannot append to {name}: batch declares {header.size} bytes but holds {len(batch)}")
    if header.base_offset != end_offset and not (header.base_offset > end_offset and gap_allowed(header)):
        raise UsageError(
            f"cannot append to {name}: batch base offset {header.base_offset} is not the log end offset {end_offset}"
            f" (only a batch marked COMPACTED_GAP, copied from a compacted log, may start past it)"
        )
    return header
