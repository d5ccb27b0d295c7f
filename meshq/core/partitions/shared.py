"""Shared (work-queue) subscriptions, served by each partition's leader.

Theory of operation
-------------------
A shared group reads every partition of its topic; any member may get any record. The leader
of each partition owns the group's state there (``meshq.core.shared_state.SharedState``: ack
floor, acked offsets above it, records in flight with their deadlines, delivery counts,
delayed records, dead letters) and answers two requests:

* ``share_fetch`` (a long poll): the leader scans the committed log past what it already
  knows (at most ``SCAN_WINDOW`` ready or in-flight records per group; delayed records only
  cost an index entry), takes up to ``max_records`` ready records by the priority rule,
  records the deliveries (delivery counts, holder, timeout) in **one control batch** appended
  to the partition's own log, and answers once that batch is committed (quorum). So a
  delivery is durable before the member sees the record, and ``max_deliveries`` holds across
  failovers. A fetch that finds nothing ready waits (``MAX_PARKED`` per partition) until
  records arrive, come back, fall due or ``max_wait_ms`` passes.
* ``share_ack``: a batch of (offset, ack | nack | reject, delay) from one member. Acks and
  nacks of records the member holds become one control batch; the answer comes once it is
  committed, so an ack confirmed to a member survives any failover (the record is never
  handed out again). An answer for a record the member does not hold (acked already, not its
  own, or its ack timeout passed and it went back to the queue) changes nothing and is
  counted ``stale``.

Control batches carry the ``CONTROL`` attribute (``meshq.core.batch``): they replicate,
fence and survive failover exactly like data, and every reader of records skips them. A node
that becomes leader of a partition replays its control batches (each group's last snapshot,
written every ``SNAPSHOT_EVERY`` ops, then the ops after it; the read starts at the
partition's first control batch, and a partition no shared group ever read is not read at all)
and rescans the log from each group's ack floor; the records that were in flight get a fresh ack timeout from then.

A record handed out ``max_deliveries`` times and not acked in time, or rejected
(``nack(requeue=False)``), is appended by the leader (through this node's producer) to
``<topic>.dlq``, created on demand with the source topic's partitions and replication factor,
with headers ``meshq-dlq-reason``, ``meshq-original-partition`` and
``meshq-original-offset``; only once that append is acknowledged is the offset marked dead
in the control log, so a dead letter is never lost (a failover in between can append it
twice). One ``share_tick`` timer per partition fires at the earliest ack deadline, delayed
record due time or parked-fetch deadline: nothing polls.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from meshq.config import TopicConfig
from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.events import InCoreWaiter, ProduceCommand, ResolveProduce
from meshq.core.partition import PartitionState
from meshq.core.records import Record
from meshq.core.room import Room
from meshq.core.shared_state import (
    DELIVERY_COUNT_HEADER,
    DLQ_OFFSET_HEADER,
    DLQ_PARTITION_HEADER,
    DLQ_REASON_HEADER,
    REASON_MAX_DELIVERIES,
    SharedState,
    record_deliver_at,
    record_priority,
)
from meshq.errors import CorruptLogError, MeshqError, NotLeaderError, ProtocolError

log = logging.getLogger("meshq.core")

SNAPSHOT_EVERY = 500  # control ops per group between two snapshots (bounds the replay)
SCAN_WINDOW = 20_000  # ready + in-flight records a group keeps in memory per partition
SCAN_READ_BYTES = 4 * 1024 * 1024
MAX_PARKED = 1024
MAX_SHARE_WAIT_MS = 30_000
DLQ_RETRY_S = 1.0
MEMBER_SEEN_S = 60.0  # a member that fetched within this long is listed in status
_ACK = struct.Struct(">qBI")
ACK, NACK, REJECT = 0, 1, 2


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


@dataclass(slots=True)
class ParkedShare:
    route: Any
    request_id: int
    body: dict
    deadline_s: float


class Shared(Room):
    """Shared subscriptions of the partitions led here (see the module docstring)."""

    SERVES = {"share_fetch": "serve_share_fetch", "share_ack": "serve_share_ack"}
    TIMERS = {"share_tick": "on_tick", "share_dlq": "retry_dead_letters"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.states: dict[tuple[str, int], dict[str, SharedState]] = {}
        self.parked: dict[tuple[str, int], list[ParkedShare]] = {}
        self._cache: dict[tuple[str, int, str], dict[int, Record]] = {}  # scanned records not yet handed out
        self._ops: dict[tuple[str, int, str], int] = {}  # ops written since the group's last snapshot
        self._tick_at: dict[tuple[str, int], float] = {}
        self._members: dict[tuple[str, int, str], dict[str, float]] = {}
        self._serving: set[tuple[str, int]] = set()
        self._again: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ leadership
    def on_leadership(self, key: tuple[str, int], gained: bool) -> None:
        """This node started or stopped leading partition ``key``: rebuild or drop its groups."""
        for fetch in self.parked.pop(key, []):
            self.out.reply_error(fetch.route, fetch.request_id, NotLeaderError(
                f"{self.node_id} no longer leads {key[0]}/{key[1]}; refresh metadata"))
        self.states.pop(key, None)
        self._tick_at.pop(key, None)
        for table in (self._cache, self._ops, self._members):
            for stale in [k for k in table if (k[0], k[1]) == key]:
                del table[stale]
        if gained and not key[0].startswith("__"):
            self._replay(key)

    def _replay(self, key: tuple[str, int]) -> None:
        """Rebuild every shared group of ``key`` from the control batches of its log."""
        state = self.core.host.get(key)
        if state is None or state.first_control_offset is None:
            return  # no shared group ever read this partition: nothing to read back
        now_s = self.core.now_s
        groups: dict[str, SharedState] = {}
        offset = max(state.log.start_offset, state.first_control_offset)
        while offset < state.log.end_offset:
            try:
                data = state.log.read(offset, 16 * 1024 * 1024)
            except CorruptLogError as exc:
                log.error("%s/%d: shared-subscription state replayed only up to offset %d: %s",
                          key[0], key[1], offset, exc)
                break
            after = batch_format.next_offset_after(data) if data else None
            if after is None:
                break
            for _base, values in batch_format.decode_control(data, offset):
                for value in values:
                    try:
                        group, op = msgpack.unpackb(value, raw=False, strict_map_key=False)
                    except Exception:  # msgpack raises several unrelated types on bad input
                        log.warning("%s/%d: a control record does not decode; skipped", key[0], key[1])
                        continue
                    if group not in groups:
                        groups[group] = SharedState(group, state.log.start_offset)
                    groups[group].apply(op, now_s)
            offset = after
        if groups:
            self.states[key] = groups
            log.info("%s/%d: shared groups %s rebuilt from the control log", key[0], key[1], ", ".join(sorted(groups)))
            self._schedule(key, now_s)

    def on_replica_change(self, state: PartitionState) -> None:
        """The high watermark of a partition led here moved: parked fetches may have records now."""
        if self.parked.get(state.key):
            self._serve_parked(state.key, self.core.now_s)

    # ------------------------------------------------------------------ requests
    def serve_share_fetch(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        self.core.access.check("consume", body["topic"])
        state = self.core.server.leader_state(body["topic"], body["partition"])
        self.core.server.check_lease(state, now_s)
        group = self._group(state, body["group"])
        self._members.setdefault((*state.key, body["group"]), {})[body["member"]] = now_s
        self._step(state, group, now_s)
        fetch = ParkedShare(route, message.request_id, body,
                            now_s + min(body["max_wait_ms"], MAX_SHARE_WAIT_MS) / 1000.0)
        if self._answer(state, group, fetch, now_s):
            return
        parked = self.parked.setdefault(state.key, [])
        if body["max_wait_ms"] <= 0 or len(parked) >= MAX_PARKED:
            self._answer_empty(state, fetch)
            return
        parked.append(fetch)
        self._schedule(state.key, now_s)

    def serve_share_ack(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        self.core.access.check("consume", body["topic"])
        payload = message.payloads[0]
        if len(payload) % _ACK.size:
            raise ProtocolError(f"share_ack payload of {len(payload)} bytes is not a whole number of "
                                f"{_ACK.size}-byte answers")
        answers = list(_ACK.iter_unpack(payload))
        for _offset, kind, _delay in answers:  # checked before anything changes
            if kind > REJECT:
                raise ProtocolError(f"share_ack answer kind {kind} unknown (0 ack, 1 nack, 2 reject)")
        state = self.core.server.leader_state(body["topic"], body["partition"])
        self.core.server.check_lease(state, now_s)
        group = self._group(state, body["group"])
        member = body["member"]
        now_ms = self.core.wall_clock_ms()
        acked: list[int] = []
        released: list[list[int]] = []
        dead: list[int] = []
        stale: list[int] = []
        for offset, kind, delay_ms in answers:
            if kind == ACK:
                ok = group.ack(offset, member)
                if ok:
                    acked.append(offset)
            elif kind == NACK:
                not_before = now_ms + delay_ms if delay_ms else 0
                ok = group.nack(offset, member, not_before, now_ms)
                if ok and offset in group.dead_pending:  # its last delivery: it goes to the DLQ
                    dead.append(offset)
                elif ok:
                    released.append([offset, not_before])
            else:
                ok = group.reject(offset, member)
                if ok:
                    dead.append(offset)
            if not ok:
                stale.append(offset)
        ops = []
        if acked:
            ops.append(["a", acked])
        if released:
            ops.append(["r", released])
        if dead:
            self._dead_letter(state, group, dead, now_s)
        reply = {"stale": struct.pack(f">{len(stale)}q", *stale)}
        if not ops:
            self.out.reply(route, message.request_id, "share_ack_ok", reply)
        else:
            self._persist(state, group, ops, now_s)
            self.core.server.wait_for_acks(state, state.log.end_offset, "quorum",
                                           now_s + self.config.request_timeout_s,
                                           self.out.answer(route, message.request_id, "share_ack_ok", reply))
        if released:
            self._serve_parked(state.key, now_s)
            self._schedule(state.key, now_s)

    # ------------------------------------------------------------------ handing records out
    def _group(self, state: PartitionState, name: str) -> SharedState:
        groups = self.states.setdefault(state.key, {})
        group = groups.get(name)
        if group is None:
            group = groups[name] = SharedState(name, state.log.start_offset)
            self._ops[(*state.key, name)] = SNAPSHOT_EVERY  # its first control batch holds a snapshot
        return group

    def _step(self, state: PartitionState, group: SharedState, now_s: float) -> None:
        """Bring ``group`` up to date: expired deliveries, due delayed records, newly committed records."""
        for offset in group.expire(now_s):
            self._dead_letter(state, group, [offset], now_s)
        now_ms = self.core.wall_clock_ms()
        group.release_due(now_ms)
        self._scan(state, group, now_ms)

    def _scan(self, state: PartitionState, group: SharedState, now_ms: int) -> None:
        log_ = state.log
        high_watermark = state.high_watermark
        if group.scanned_to < log_.start_offset:  # retention removed records it never handed out
            group.skip_to(log_.start_offset)
        cache = self._cache.setdefault((*state.key, group.group), {})
        topic, partition = state.key
        while group.scanned_to < high_watermark and group.unfinished() < SCAN_WINDOW:
            start = group.scanned_to
            data = log_.read(start, SCAN_READ_BYTES)
            if not data:
                break
            infos: list[tuple[int, int, int]] = []
            skipped: list[int] = []
            end = start
            for pos, header in batch_format.iter_batches(data):
                if header.base_offset >= high_watermark:
                    break
                end = header.next_offset
                if header.next_offset <= start:
                    continue
                if header.attributes & batch_format.CONTROL:
                    skipped.extend(range(max(start, header.base_offset), header.next_offset))
                    continue
                records = batch_format.decode_records(data[pos:pos + header.size], topic, partition, start)
                for record in records:
                    headers = record.headers
                    if headers:
                        deliver_at = record_deliver_at(headers)
                        infos.append((record.offset, record_priority(headers), deliver_at))
                        if deliver_at <= now_ms:
                            cache[record.offset] = record
                    else:
                        infos.append((record.offset, 4, 0))
                        cache[record.offset] = record
            if end <= start:
                break
            group.scan(infos, skipped, end, now_ms)
            for offset in [o for o in cache if o in group.done or o < group.floor]:
                del cache[offset]

    def _load(self, state: PartitionState, group: SharedState, offset: int) -> Record | None:
        record = self._cache.get((*state.key, group.group), {}).pop(offset, None)
        if record is not None:
            return record
        if not state.log.start_offset <= offset < state.log.end_offset:
            return None
        data = state.log.read(offset, 1)
        for record in batch_format.decode_records(data, state.topic, state.partition, offset):
            return record if record.offset == offset else None
        return None

    def _answer(self, state: PartitionState, group: SharedState, fetch: ParkedShare, now_s: float) -> bool:
        """Hand ready records to the fetch's member; False when none is ready."""
        body = fetch.body
        max_deliveries = body["max_deliveries"]
        records: list[Record] = []
        while not records and group.ready_count:
            dead = []
            for offset in group.take(body["max_records"]):
                record = self._load(state, group, offset)
                if record is None:
                    group.forget(offset)  # retention removed it
                elif group.over_limit(offset, max_deliveries):
                    group.to_dead_letter(offset, REASON_MAX_DELIVERIES)
                    dead.append(offset)
                else:
                    records.append(record)
            if dead:
                self._dead_letter(state, group, dead, now_s)
        if not records:
            return False
        entries = group.deliver([r.offset for r in records], body["member"], now_s, body["ack_timeout_ms"],
                                max_deliveries)
        self._persist(state, group, [["d", entries]], now_s)
        counts = [entry[1] for entry in entries]
        data = batch_format.encode_batch([
            (r.key, r.value, {**r.headers, DELIVERY_COUNT_HEADER: str(count).encode()}, r.timestamp_ms)
            for r, count in zip(records, counts)])
        flat = [v for entry in entries for v in entry[:2]]
        index = struct.pack(">" + "qi" * len(entries), *flat)
        reply = {"topic": state.topic, "partition": state.partition, "index": index}

        def answered(error: MeshqError | None) -> None:
            if error is None:
                self.out.reply(fetch.route, fetch.request_id, "share_fetch_ok", reply, (data,))
            else:
                self.out.reply_error(fetch.route, fetch.request_id, error)

        # The deliveries are durable before the member sees the records: max_deliveries holds across failovers.
        self.core.server.wait_for_acks(state, state.log.end_offset, "quorum", now_s + self.config.request_timeout_s,
                                       answered)
        self._schedule(state.key, now_s)
        return True

    def _answer_empty(self, state: PartitionState, fetch: ParkedShare) -> None:
        self.out.reply(fetch.route, fetch.request_id, "share_fetch_ok",
                       {"topic": state.topic, "partition": state.partition, "index": b""})

    def _serve_parked(self, key: tuple[str, int], now_s: float) -> None:
        """Answer the parked fetches of ``key`` that records are ready for (or whose wait is over)."""
        if key in self._serving:  # an append below moved the high watermark: go round once more
            self._again.add(key)
            return
        state = self.core.host.get(key)
        if state is None or not state.replica.is_leader:
            return
        self._serving.add(key)
        try:
            while True:
                self._again.discard(key)
                keep = []
                for fetch in self.parked.pop(key, []):
                    group = self._group(state, fetch.body["group"])
                    self._step(state, group, now_s)
                    if self._answer(state, group, fetch, now_s):
                        continue
                    if fetch.deadline_s <= now_s:
                        self._answer_empty(state, fetch)
                    else:
                        keep.append(fetch)
                if keep:
                    self.parked.setdefault(key, []).extend(keep)
                if key not in self._again or not self.parked.get(key):
                    break
        finally:
            self._serving.discard(key)

    # ------------------------------------------------------------------ persistence
    def _persist(self, state: PartitionState, group: SharedState, ops: list[list], now_s: float) -> None:
        """Append ``ops`` of ``group`` (plus a snapshot when one is due) as one control batch."""
        counter = (*state.key, group.group)
        self._ops[counter] = self._ops.get(counter, 0) + len(ops)
        values = [msgpack.packb([group.group, op], use_bin_type=True) for op in ops]
        if self._ops[counter] >= SNAPSHOT_EVERY:
            values.append(msgpack.packb([group.group, ["s", group.snapshot()]], use_bin_type=True))
            self._ops[counter] = 0
        now_ms = self.core.wall_clock_ms()
        data = batch_format.encode_batch([(None, v, None, now_ms) for v in values],
                                         attributes=batch_format.CONTROL)
        self.core.space.append(state, data, batch_format.parse_header(data), now_ms, now_s)
        self.core.server.on_appended(state, now_s)

    # ------------------------------------------------------------------ timers
    def _schedule(self, key: tuple[str, int], now_s: float) -> None:
        """Keep one ``share_tick`` timer for ``key`` at its earliest deadline."""
        earliest = None
        now_ms = self.core.wall_clock_ms()
        for group in self.states.get(key, {}).values():
            candidates = [group.next_deadline_s()]
            due_ms = group.next_due_ms()
            if due_ms is not None:
                candidates.append(now_s + max(0, due_ms - now_ms) / 1000.0)
            for candidate in candidates:
                if candidate is not None and (earliest is None or candidate < earliest):
                    earliest = candidate
        for fetch in self.parked.get(key, []):
            if earliest is None or fetch.deadline_s < earliest:
                earliest = fetch.deadline_s
        if earliest is None:
            return
        current = self._tick_at.get(key)
        if current is None or earliest < current or current < now_s:
            self._tick_at[key] = earliest
            self.out.schedule(earliest, "share_tick", key)

    def on_tick(self, key: tuple[str, int], now_s: float) -> None:
        """The ``share_tick`` timer: redeliver what timed out, release what fell due, answer parked fetches."""
        if self._tick_at.get(key, now_s + 1.0) <= now_s:
            del self._tick_at[key]
        state = self.core.host.get(key)
        if state is None or not state.replica.is_leader:
            return
        for group in list(self.states.get(key, {}).values()):
            self._step(state, group, now_s)
        self._serve_parked(key, now_s)
        self._schedule(key, now_s)

    # ------------------------------------------------------------------ dead letters
    def _dead_letter(self, state: PartitionState, group: SharedState, offsets: list[int], now_s: float) -> None:
        """Append the records at ``offsets`` (already out of the queue) to ``<topic>.dlq``; mark them
        dead in the control log once that append is acknowledged."""
        records, kept = [], []
        for offset in offsets:
            record = self._load(state, group, offset)
            if record is None:
                group.dead_lettered(offset)  # retention removed it first
                continue
            headers = {k: v for k, v in record.headers.items() if k != DELIVERY_COUNT_HEADER}
            headers[DLQ_REASON_HEADER] = group.dead_pending.get(offset, REASON_MAX_DELIVERIES).encode()
            headers[DLQ_PARTITION_HEADER] = str(state.partition).encode()
            headers[DLQ_OFFSET_HEADER] = str(offset).encode()
            records.append((record.key, record.value, headers, record.timestamp_ms))
            kept.append(offset)
        if records:
            self._send_dead_letters(state.key, group, kept, records, now_s)

    def _send_dead_letters(self, key: tuple[str, int], group: SharedState, offsets: list[int], records: list,
                           now_s: float) -> None:
        topic = dlq_topic(key[0])
        source = self.core.agreement.meta.topics.get(key[0])
        if topic not in self.core.agreement.meta.topics and source is not None:
            config = TopicConfig(name=topic, partitions=source.partitions,
                                 replication_factor=source.replication_factor)

            def created(_message: Any) -> None:
                self._produce_dead_letters(key, group, offsets, records, self.core.now_s)

            def failed(error: MeshqError) -> None:
                log.warning("creating %s failed (%s); retrying", topic, error)
                self.out.schedule(self.core.now_s + DLQ_RETRY_S, "share_dlq", (key, group, offsets, records))

            self.out.request(self.node_id, "create_topic", {"config": config.to_wire(), "if_not_exists": True}, (),
                             now_s, self.config.request_timeout_s, created, failed)
            return
        self._produce_dead_letters(key, group, offsets, records, now_s)

    def _produce_dead_letters(self, key: tuple[str, int], group: SharedState, offsets: list[int], records: list,
                              now_s: float) -> None:
        def settled(effect: ResolveProduce) -> None:
            if self.states.get(key, {}).get(group.group) is not group:
                return  # leadership moved meanwhile: the new leader redelivers and dead-letters again
            done = [offsets[i] for i in effect.indexes]
            if effect.error is not None:
                log.warning("dead-lettering %d records of %s/%d failed (%s); retrying", len(done), key[0], key[1],
                            effect.error)
                self.out.schedule(self.core.now_s + DLQ_RETRY_S, "share_dlq",
                                  (key, group, done, [records[i] for i in effect.indexes]))
                return
            state = self.core.host.get(key)
            if state is None or not state.replica.is_leader:
                return
            reasons = [[offset, group.dead_pending.get(offset, REASON_MAX_DELIVERIES)] for offset in done]
            for offset in done:
                group.dead_lettered(offset)
            try:
                self.core.server.check_lease(state, self.core.now_s)
                self._persist(state, group, [["x", reasons]], self.core.now_s)
            except MeshqError as exc:  # the DLQ holds them; a new leader may append them once more
                log.warning("%s/%d: dead letters not recorded (%s)", key[0], key[1], exc)

        self.core.producer.produce(ProduceCommand(dlq_topic(key[0]), records, InCoreWaiter(settled), None, "quorum",
                                                  now_s + self.config.request_timeout_s), now_s)

    def retry_dead_letters(self, item: tuple, now_s: float) -> None:
        """The ``share_dlq`` timer: try a failed dead-letter append again (while still leading)."""
        key, group, offsets, records = item
        if self.states.get(key, {}).get(group.group) is group:
            self._send_dead_letters(key, group, offsets, records, now_s)

    # ------------------------------------------------------------------ status
    def report(self) -> list[dict]:
        """Each shared group led here, per partition: ack floor, lag, in flight, delayed, counts."""
        groups: dict[str, dict] = {}
        now_s = self.core.now_s
        for key, by_name in sorted(self.states.items()):
            state = self.core.host.get(key)
            high_watermark = state.high_watermark if state is not None else 0
            for name, group in sorted(by_name.items()):
                entry = groups.setdefault(name, {"group": name, "mode": "shared", "members": set(), "partitions": []})
                seen = self._members.get((*key, name), {})
                entry["members"].update(m for m, at in seen.items() if now_s - at <= MEMBER_SEEN_S)
                report = group.report(high_watermark)
                entry["partitions"].append({"topic": key[0], "partition": key[1], "mode": "shared",
                                            "committed": report["ack_floor"], "high_watermark": high_watermark,
                                            **report})
        for entry in groups.values():
            entry["members"] = sorted(entry["members"])
        return list(groups.values())
