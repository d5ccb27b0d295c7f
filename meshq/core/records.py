"""Public value types: a stored record and the metadata of an acknowledged produce."""

from __future__ import annotations

from typing import NamedTuple


class RecordMetadata(NamedTuple):
    """Where an acknowledged record was stored."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


class _RecordFields(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]
    timestamp_ms: int


class Record(_RecordFields):
    """A record read from a partition (immutable; ``headers`` defaults to a new empty dict).

    A named tuple, so that a consumer builds a fetch's records at C speed
    (``batch.decode_records``: ``tuple.__new__`` mapped over the columns, no Python call per
    record); read it by attribute: ``rec.topic .partition .offset .key .value .headers
    .timestamp_ms``.
    """

    __slots__ = ()

    def __new__(cls, topic: str, partition: int, offset: int, key: bytes | None, value: bytes,
                headers: dict[str, bytes] | None = None, timestamp_ms: int = 0) -> Record:
        return tuple.__new__(cls, (topic, partition, offset, key, value, {} if headers is None else headers,
                                   timestamp_ms))
