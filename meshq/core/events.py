"""Inputs the core consumes and effects it asks its runtime to carry out.

The core never performs I/O itself (the log is reached through the injected
``LogStore``/``Storage`` protocols, whose durability step is still an effect). The real
runtime (``meshq.io.runtime``) and the simulator (``meshq.testing``) are the two
executors of these effects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshq.core.wire import Message
from meshq.errors import MeshqError


# ------------------------------------------------------------------ inputs
@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A request arrived on our ROUTER; ``route`` is an opaque handle for the reply."""

    route: Any
    message: Message


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """A reply arrived on the DEALER connected to ``peer``."""

    peer: str
    message: Message


@dataclass(frozen=True, slots=True)
class EventReceived:
    """A message published by a peer (heartbeat, goodbye) arrived on our SUB socket."""

    message: Message


@dataclass(frozen=True, slots=True)
class PeerDiscovered:
    """Discovery (mDNS) found a node of our cluster: ``info`` is a member-info map."""

    info: dict


@dataclass(frozen=True, slots=True)
class LogsSynced:
    """The runtime completed the fsync asked for by ``SyncLogs``."""

    keys: frozenset[tuple[str, int]]


@dataclass(slots=True)
class Command:
    """A local API call. ``waiter`` is an opaque token resolved through ``Resolve``/``Fail``."""

    kind: str
    args: dict
    waiter: Any = None


@dataclass(slots=True)
class ProduceCommand:
    """Records to produce; ``waiter`` (or None) learns each record's fate by index."""

    topic: str
    records: list  # list[RecordTuple]: (key, value, headers, timestamp_ms)
    waiter: Any
    partition: int | None = None
    acks: str = "quorum"
    deadline_s: float = 0.0


# ------------------------------------------------------------------ effects
@dataclass(frozen=True, slots=True)
class Connect:
    """Open a DEALER (and later SUB) to ``endpoint`` for the peer key ``peer``."""

    peer: str
    endpoint: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    peer: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Connect our SUB socket to a peer's PUB endpoint."""

    endpoint: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    endpoint: str


@dataclass(frozen=True, slots=True)
class Publish:
    """Send frames on our PUB socket (every subscriber receives them)."""

    frames: list


@dataclass(frozen=True, slots=True)
class Send:
    """Send frames to a peer over its DEALER."""

    peer: str
    frames: list


@dataclass(frozen=True, slots=True)
class Reply:
    """Send frames back over the ROUTER to the request's route."""

    route: Any
    frames: list


@dataclass(frozen=True, slots=True)
class Resolve:
    waiter: Any
    result: Any


@dataclass(frozen=True, slots=True)
class Fail:
    waiter: Any
    error: MeshqError


@dataclass(frozen=True, slots=True)
class ResolveProduce:
    """Tell ``waiter`` that the records at ``indexes`` of its command were stored (or failed).

    ``records[i]`` is the record at ``indexes[i]``; it was stored at ``base_offset + i``
    (``base_offset`` is -1 when unknown, with acks=none).
    """

    waiter: Any
    indexes: Sequence[int]
    records: list
    topic: str
    partition: int
    base_offset: int
    error: MeshqError | None = None


@dataclass(frozen=True, slots=True)
class SyncLogs:
    """fsync these partition logs, then feed back ``LogsSynced``."""

    keys: frozenset[tuple[str, int]]
