"""Public value types: a stored record and the metadata of an acknowledged produce."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class RecordMetadata(NamedTuple):
    """Where an acknowledged record was stored."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Record:
    """A record read from a partition."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes] = field(default_factory=dict)
    timestamp_ms: int = 0
