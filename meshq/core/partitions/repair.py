"""Self-healing storage: scrub the local replicas, fetch damaged batches again from a peer.

Theory of operation
-------------------
A damaged batch (a CRC failure in a segment: bit rot, a torn sector) is found three ways:
when the log is opened (recovery), when a read reaches it (fetch, replication), and by the
*scrub* this room runs. Whichever finds it, the log remembers its offsets as *lost*
(``LogStore.lost_offsets``): never served, never handed out again (``meshq.log.logstate``).

Scrub: every ``SCRUB_TICK_S`` the room CRC-checks up to ``scrub_rate_mb_s`` x the tick of
sealed segments, one partition after another in turn, in slices of at most ``SCRUB_SLICE``
bytes (``LogStore.scrub``): the node's serving loop is never held for longer than a slice
takes to read. ``scrub_rate_mb_s=0`` turns the scrub off (reads and recovery still detect).

Repair: at the same tick, each local replica with lost offsets below its high watermark asks
one other member of its replica set for them (``repair_fetch``: topic, partition, first and
last offset of the range), one request per partition at a time, trying the members in turn.
Offsets below the high watermark are committed: every replica that holds them holds the same
CRC-valid batches (a CRC-valid batch is byte-identical across replicas), so the answer is
checked (CRC) and written back into place (``LogStore.repair``): offsets and bytes are those
of the peer. A peer answers only with its own intact batches below its own high watermark,
and an empty answer when it has none; when no member has an intact copy (replication
factor 1, or all damaged) the offsets stay lost, reported by status and metrics, and a
consumer reading them gets ``CorruptLogError`` naming them, never wrong data.
"""

from __future__ import annotations

import logging
from typing import Any

from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.room import Room
from meshq.errors import MeshqError, StorageError, UnknownTopicError

log = logging.getLogger("meshq.core.repair")

SCRUB_TICK_S = 0.5
SCRUB_SLICE = 256 * 1024  # bytes one scrub step reads at most
REPAIR_MAX_BYTES = 4 * 1024 * 1024  # bytes one repair answer carries at most
REPAIR_TIMEOUT_S = 5.0


class Repair(Room):
    """Scrub local replicas; repair their lost offsets from a peer (see the module docstring)."""

    SERVES = {"repair_fetch": "serve_repair_fetch"}
    TIMERS = {"scrub": "tick"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self._cursor: dict[tuple[str, int], int] = {}  # where the scrub goes on, per partition
        self._last_scrubbed: tuple[str, int] | None = None
        self._in_flight: set[tuple[str, int]] = set()  # partitions with a repair request out
        self._peer_turn: dict[tuple[str, int], int] = {}  # which member of the replica set to ask next
        self.scrubbed_bytes = 0

    def start(self, now_s: float) -> None:
        self.out.schedule(now_s + SCRUB_TICK_S, "scrub", None)

    # -- the tick ----------------------------------------------------------------------

    def tick(self, key: Any, now_s: float) -> None:
        if self.core.stopped:
            return
        self.scrub(int(self.config.scrub_rate_mb_s * SCRUB_TICK_S * 1024 * 1024))
        for partition_key in sorted(self.core.host.partitions):
            self._ask_for_repair(partition_key, now_s)
        self.out.schedule(now_s + SCRUB_TICK_S, "scrub", None)

    def scrub(self, budget: int) -> None:
        """CRC-check about ``budget`` bytes of sealed segments, partitions in turn."""
        keys = sorted(self.core.host.partitions)
        if not keys or budget <= 0:
            return
        after = [k for k in keys if self._last_scrubbed is None or k > self._last_scrubbed]
        order = after + [k for k in keys if k not in after]
        for key in order:
            if budget <= 0:
                return
            state = self.core.host.partitions[key]
            offset = self._cursor.get(key, 0)
            step = min(budget, SCRUB_SLICE)
            try:
                next_offset = state.log.scrub(offset, step)
            except MeshqError as exc:
                log.error("%s/%d: scrub failed: %s", key[0], key[1], exc)
                continue
            self._cursor[key] = next_offset
            self._last_scrubbed = key
            self.scrubbed_bytes += step
            budget -= step

    # -- asking --------------------------------------------------------------------------

    def _ask_for_repair(self, key: tuple[str, int], now_s: float) -> None:
        state = self.core.host.partitions.get(key)
        if state is None or state.replica is None or key in self._in_flight:
            return
        limit = state.high_watermark
        wanted = [(first, last) for first, last in state.log.lost_offsets
                  if first < limit and last >= state.log.start_offset]
        if not wanted:
            return
        peers = [node for node in state.replica.replicas if node != self.node_id]
        if not peers:
            return  # replication factor 1: nobody else holds the offsets; they stay lost
        turn = self._peer_turn.get(key, 0)
        peer = peers[turn % len(peers)]
        self._peer_turn[key] = turn + 1
        first, last = wanted[0]
        last = min(last, limit - 1)
        self._in_flight.add(key)
        body = {"topic": key[0], "partition": key[1], "first": first, "last": last}

        def on_reply(message: wire.Message) -> None:
            self._in_flight.discard(key)
            self._write_back(key, peer, message.payloads[0] if message.payloads else b"")

        def on_error(error: MeshqError) -> None:
            self._in_flight.discard(key)
            log.info("%s/%d: %s could not repair offsets %d to %d: %s", key[0], key[1], peer, first, last, error)

        self.out.request(peer, "repair_fetch", body, (), now_s, REPAIR_TIMEOUT_S, on_reply, on_error)

    def _write_back(self, key: tuple[str, int], peer: str, data: bytes) -> None:
        state = self.core.host.partitions.get(key)
        if state is None or not data:
            return  # gone meanwhile, or the peer has no intact copy: the next tick asks another member
        try:
            repaired = state.log.repair(data)
        except StorageError as exc:
            log.error("%s/%d: writing repaired batches failed: %s", key[0], key[1], exc)
            return
        if repaired:
            log.warning("%s/%d: repaired %d damaged batches from %s's copy", key[0], key[1], repaired, peer)

    # -- answering -----------------------------------------------------------------------

    def serve_repair_fetch(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        key = (body["topic"], body["partition"])
        state = self.core.host.partitions.get(key)
        if state is None:
            raise UnknownTopicError(f"{key[0]}/{key[1]}: no replica here to repair from; ask another member "
                                    "of the replica set")
        first, last = body["first"], body["last"]
        limit = min(last + 1, state.high_watermark, state.log.end_offset)
        parts: list[bytes] = []
        total = 0
        offset = max(first, state.log.start_offset)
        while offset < limit and total < REPAIR_MAX_BYTES:
            try:
                data = state.log.read(offset, REPAIR_MAX_BYTES - total)
            except MeshqError:
                break  # damaged or lost here too: answer with what is intact before it
            if not data:
                break
            for position, header in batch_format.iter_batches(data, verify_crc=False):
                if header.next_offset > limit:
                    offset = limit
                    break
                parts.append(data[position : position + header.size])
                total += header.size
                offset = header.next_offset
        payload = b"".join(parts)
        self.out.reply(route, message.request_id, "repair_fetch_ok", {"topic": key[0], "partition": key[1]},
                       (payload,) if payload else ())
