"""Partition placement: a consistent-hash ring with virtual nodes over the storage members.

Theory of operation
-------------------
Every storage member is hashed onto a 64-bit ring ``vnodes`` times: its i-th virtual node
sits at the ``(i % 8)``-th big-endian 64-bit word of ``BLAKE2b-512(f"{member}#{i // 8}")``
(``member_points``; one hash call gives eight independent points). A partition is hashed
to a point of its own, ``stable_hash64(f"{topic}/{partition}".encode())`` (BLAKE2b-64);
both schemes are part of the placement contract: changing either reshuffles every
cluster's data, so ``tests/core/test_ring.py`` pins golden values. Its **owner** (preferred
leader) is the member of the first virtual node clockwise from that point (wrapping past
2**64 - 1 back to 0), and its **replicas** are the owner followed by the next *distinct*
members met walking on clockwise. Two virtual nodes on the same point (a 64-bit collision,
astronomically rare) are ordered by member id, so even that case has one answer.

Why every node computes the same placement: a ``HashRing`` is a pure function of the
*set* of member ids and ``vnodes``. Members are de-duplicated and sorted on construction,
so input order is irrelevant, and every hash is BLAKE2b (``hashlib``, as in
``meshq.core.hashing``), which is identical in every process and on every machine --
never Python's ``hash()``, whose string hashing is salted per process
(``PYTHONHASHSEED``). Given the agreed membership (SPEC 3.5), all nodes therefore agree
on every partition's owner and replicas without exchanging a single message about
placement.

Why virtual nodes: with one point per member, the arcs (and so the partition shares) of
members vary wildly. With ``v`` points per member each member's share is a sum of ``v``
arcs, so its relative spread shrinks like ``1/sqrt(v)``. With ``DEFAULT_VNODES = 256`` the
busiest member's arc share stays within about 1.23x the mean for 3 to 20 members, and its
partition count within 1.3x (``tests/core/test_ring.py``; with few partitions per member
the count is dominated by sampling noise no vnode count can remove), while a 20-member
ring still builds in a few milliseconds.

Movement bound on join and leave: adding member ``m`` inserts only ``m``'s virtual nodes.
A partition's owner changes only if one of those new points now lies between the
partition point and its old owner's point, and then the new owner is ``m`` itself; so on
a join every moved partition moves *to* ``m``, and the expected fraction moved is ``m``'s
share, about ``1/N`` (``N`` = members after the join). Symmetrically, removing ``m``
moves only the partitions ``m`` owned, about ``1/N`` (``N`` = members before), each to
the member that follows it on the ring. No partition moves between two members that were
both present before and after. For replica sets the same argument gives: the clockwise
sequence of distinct members after a join is the old one with ``m`` inserted somewhere,
so a replica set changes only where ``m`` lands among the first ``n`` (it then replaces
the old last replica), roughly ``n/N`` of the partitions; a leave changes only the
replica sets that contained ``m``.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
from collections.abc import Iterable

from meshq.core.hashing import stable_hash64
from meshq.errors import UsageError

DEFAULT_VNODES = 256
_EMPTY_RING_MESSAGE = "no storage members in the ring"
_POINTS_PER_DIGEST = 8
_DIGEST = struct.Struct(">8Q")  # a 64-byte BLAKE2b digest read as eight 64-bit points


def member_points(member: str, vnodes: int) -> list[int]:
    """Ring positions of ``member``'s ``vnodes`` virtual nodes.

    Virtual node ``i`` is the ``i % 8``-th big-endian 64-bit word of
    ``BLAKE2b-512(f"{member}#{i // 8}")``: one hash call yields eight independent points,
    so building a 20-member ring takes a few milliseconds, not tens.
    """
    points: list[int] = []
    for block in range(-(-vnodes // _POINTS_PER_DIGEST)):
        digest = hashlib.blake2b(f"{member}#{block}".encode(), digest_size=64).digest()
        points.extend(_DIGEST.unpack(digest))
    del points[vnodes:]
    return points


def partition_point(topic: str, partition: int) -> int:
    """Ring position of partition ``partition`` of ``topic``."""
    return stable_hash64(f"{topic}/{partition}".encode())


class HashRing:
    """Immutable consistent-hash ring; placement is a pure function of (sorted members, vnodes)."""

    __slots__ = ("_members", "_vnodes", "_points", "_owners")
    _members: tuple[str, ...]
    _vnodes: int
    _points: tuple[int, ...]  # sorted virtual-node positions
    _owners: tuple[str, ...]  # _owners[i] is the member of virtual node _points[i]

    def __init__(self, members: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        if isinstance(members, str):
            raise UsageError("members must be an iterable of node ids, not a single string")
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
            raise UsageError(f"vnodes must be a positive integer, got {vnodes!r}")
        unique: set[str] = set()
        for member in members:
            if not isinstance(member, str) or not member:
                raise UsageError(f"ring members must be non-empty strings, got {member!r}")
            unique.add(member)
        members_sorted = tuple(sorted(unique))
        points: list[int] = []
        point_members: list[str] = []
        for member in members_sorted:
            points.extend(member_points(member, vnodes))
            point_members.extend([member] * vnodes)
        # A stable sort of points laid out in member-id order breaks the (astronomically
        # rare) equal-point tie by member id.
        order = sorted(range(len(points)), key=points.__getitem__)
        # Set once here; __setattr__ refuses any later change.
        object.__setattr__(self, "_members", members_sorted)
        object.__setattr__(self, "_vnodes", vnodes)
        object.__setattr__(self, "_points", tuple(points[i] for i in order))
        object.__setattr__(self, "_owners", tuple(point_members[i] for i in order))
        assert len(self._points) == len(self._owners) == len(members_sorted) * vnodes

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"HashRing is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"HashRing is immutable; cannot delete {name!r}")

    @property
    def members(self) -> tuple[str, ...]:
        """The storage member ids, sorted."""
        return self._members

    @property
    def vnodes(self) -> int:
        """Virtual nodes per member."""
        return self._vnodes

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member: object) -> bool:
        index = bisect.bisect_left(self._members, member) if isinstance(member, str) else -1
        return 0 <= index < len(self._members) and self._members[index] == member

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashRing):
            return NotImplemented
        return self._vnodes == other._vnodes and self._members == other._members

    def __hash__(self) -> int:
        # Stable like everything else here (no salted ``hash()``); collisions only cost speed.
        return stable_hash64("\x00".join((str(self._vnodes), *self._members)).encode())

    def __repr__(self) -> str:
        return f"HashRing(members={list(self._members)!r}, vnodes={self._vnodes})"

    def partition_point(self, topic: str, partition: int) -> int:
        """Ring position of partition ``partition`` of ``topic``."""
        return partition_point(topic, partition)

    def _first_index(self, point: int) -> int:
        """Index of the first virtual node clockwise from ``point`` (inclusive)."""
        if not self._points:
            raise UsageError(_EMPTY_RING_MESSAGE)
        index = bisect.bisect_left(self._points, point)
        return index if index < len(self._points) else 0

    def owner(self, topic: str, partition: int) -> str:
        """The member owning the first virtual node clockwise from the partition's point."""
        return self._owners[self._first_index(partition_point(topic, partition))]

    def owner_at_point(self, point: int) -> str:
        """The member owning the first virtual node clockwise from ring position ``point``."""
        return self._owners[self._first_index(point)]

    def replicas(self, topic: str, partition: int, n: int) -> list[str]:
        """The owner followed by the next distinct members clockwise; length ``min(n, len(self))``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UsageError(f"replica count must be a positive integer, got {n!r}")
        start = self._first_index(partition_point(topic, partition))
        wanted = min(n, len(self._members))
        chosen: list[str] = []
        seen: set[str] = set()
        total = len(self._owners)
        # Bounded: one full turn of the ring visits every member.
        for step in range(total):
            member = self._owners[(start + step) % total]
            if member not in seen:
                seen.add(member)
                chosen.append(member)
                if len(chosen) == wanted:
                    break
        assert len(chosen) == wanted, (chosen, wanted)
        return chosen

    def placement(self, topic: str, partitions: int, n: int) -> list[list[str]]:
        """``replicas(topic, p, n)`` for every partition ``p`` in ``range(partitions)``."""
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 0:
            raise UsageError(f"partitions must be a non-negative integer, got {partitions!r}")
        return [self.replicas(topic, partition, n) for partition in range(partitions)]


def moved_partitions(before: HashRing, after: HashRing, topic: str, partitions: int,
                     n: int = 1) -> list[int]:
    """Partitions whose owner (``n == 1``) or replica set (``n > 1``) differs between two rings."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"replica count must be a positive integer, got {n!r}")
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 0:
        raise UsageError(f"partitions must be a non-negative integer, got {partitions!r}")
    if n == 1:
        return [p for p in range(partitions) if before.owner(topic, p) != after.owner(topic, p)]
    return [p for p in range(partitions)
            if set(before.replicas(topic, p, n)) != set(after.replicas(topic, p, n))]
