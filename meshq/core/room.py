"""The base of every room of the core: what each one is handed by the root.

A room owns one concern's state (the mesh, formation, partitions, the producer...) and
reaches its siblings through the root that built it (``core.mesh``, ``core.host``...), the
way python-zeroconf's handlers reach the ``Zeroconf`` that built them. It never reaches into
a sibling's dicts: it calls a small method. Time comes in as ``now_s`` on every call and
randomness from ``core.rng``; effects go out through ``core.out`` (``meshq.core.outbox``).

A room that answers requests lists them in ``SERVES`` (message type -> method name), one
that carries out local API calls in ``COMMANDS`` (command type -> method name), one that
takes events published by peers (PUB/SUB) in ``EVENTS`` (message type -> method taking
``(message, now_s)``), and one with timers in ``TIMERS`` (timer kind -> method name taking
``(key, now_s)``): the root registers them all, so a new capability adds a room without editing the dispatch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from meshq.core.node import NodeCore


class Room:
    """One concern of a node's core (see the module docstring)."""

    SERVES: ClassVar[dict[str, str]] = {}
    COMMANDS: ClassVar[dict[type, str]] = {}
    EVENTS: ClassVar[dict[str, str]] = {}
    TIMERS: ClassVar[dict[str, str]] = {}

    def __init__(self, core: NodeCore) -> None:
        self.core = core
        self.config = core.config
        self.node_id = core.node_id
        self.out = core.out
