"""The partition server: produce, fetch and list_offsets on the partitions led here.

Theory of operation
-------------------
Requests for a partition go to its leader. A ``produce`` is checked (leadership, lease: a
leader that has not heard from a majority of its replica set recently refuses every write, so
a stale leader never acknowledges anything), verified (CRC, size), deduplicated by producer
id and sequence, appended, and answered once its records reach the requested ``acks`` level
(``AckWaiter``s, re-checked whenever the replica's high watermark or leadership changes and
at their deadline). A ``fetch`` returns only records below the high watermark; one at the
end waits (``ParkedFetch``, at most ``MAX_PARKED_FETCHES`` per partition) until data arrives
or ``max_wait_ms`` passes.

While leadership of a partition moves, a produce waits where it arrived rather than bouncing
(``ParkedProduce``, at most ``MAX_PARKED_PRODUCES`` per partition, in arrival order): at a
leader handing leadership over (its writes are paused, ``Replica.handing_off``) until the
pause ends, and at a voter that knows no leader (an election is under way, or it just stepped
down) for at most one election timeout. Once the move resolves each is served again as it
came, or, if another node now leads, answered ``not_leader`` naming it, which a producer
follows at once. Without this the answer named a node that did not lead yet, and a producer
paused and asked again: a join's preferred-leader hand-offs cost producers 20–35 ms each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshq.config import refuse_reserved_topic, validate_topic_name
from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.events import SyncLogs
from meshq.core.latency import LatencyHistogram
from meshq.core.metadata import describe_rebuild
from meshq.core.partition import AckWaiter, ParkedFetch, ParkedProduce, PartitionState
from meshq.core.room import Room
from meshq.errors import (
    MeshqError,
    NotEnoughReplicasError,
    NotLeaderError,
    OffsetOutOfRangeError,
    ProtocolError,
    TimeoutError,
    UnknownTopicError,
)

MAX_PARKED_FETCHES = 1024  # per partition; more long polls are answered at once (empty)
MAX_PARKED_PRODUCES = 1024  # per partition; more produces during a leadership move are refused (not_leader)
MAX_FETCH_WAIT_MS = 30_000
EARLIEST = -2
LATEST = -1


class PartitionServer(Room):
    """Requests served by a partition's leader (see the module docstring)."""

    SERVES = {"produce": "serve_produce", "fetch": "serve_fetch", "list_offsets": "serve_list_offsets"}
    TIMERS = {"acks": "expire_waiters", "fetch": "expire_parked", "produce": "release_produces"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # produce requests answered here, per acks level: from their handling to their acknowledgement
        self.produce_latency = {acks: LatencyHistogram() for acks in ("leader", "quorum", "all")}

    def serve_produce(self, route: Any, message: wire.Message, now_s: float) -> None:
        self._produce(route, message, now_s, may_park=True)

    def _produce(self, route: Any, message: wire.Message, now_s: float, may_park: bool) -> None:
        body = message.body
        refuse_reserved_topic(body["topic"])  # before any state is looked at or changed
        self.core.access.check("produce", body["topic"])
        state = self.core.host.get((body["topic"], body["partition"]))
        if may_park and state is not None and self._park(state, route, message, now_s):
            return
        if state is None or not state.replica.is_leader:
            state = self.leader_state(body["topic"], body["partition"])  # (raises: not the leader here)
        self.check_lease(state, now_s)
        data = message.payloads[0]
        header = batch_format.verify_batch(data, self.config.batch_max_bytes * 2)
        if header.attributes & batch_format.CONTROL:
            raise ProtocolError("a produced batch may not carry the CONTROL attribute (only a partition's leader "
                                "writes control batches)")
        base_offset, duplicate = self.core.space.append(state, data, header, self.core.wall_clock_ms(), now_s)
        if duplicate:
            self.core.counters["duplicates_dropped"] += header.record_count
        else:
            self.core.counters["records_produced"] += header.record_count
            self.core.counters["batches_produced"] += 1
            self.on_appended(state, now_s)
        reply = {"topic": state.topic, "partition": state.partition, "base_offset": base_offset, "duplicate": duplicate}
        if body["acks"] == "none":
            # meshq's producer sends these with request id 0 (no answer); a client that gave an
            # id gets the leader's append confirmed at once, as every request with an id is answered.
            self.out.reply(route, message.request_id, "produce_ok", reply)
            return
        # A retry of a stored batch waits like the original: its records may not have reached
        # the acks level yet (the first attempt's answer may have been lost before they did).
        needed = base_offset + header.record_count
        timeout_s = min(body["timeout_ms"] / 1000.0, self.config.request_timeout_s) if body["timeout_ms"] else \
            self.config.request_timeout_s

        answer = self.out.answer(route, message.request_id, "produce_ok", reply)
        histogram = self.produce_latency[body["acks"]]
        core = self.core

        def answer_and_time(error: MeshqError | None) -> None:
            if error is None:  # (time from this request's handling to the handling of what completed it)
                histogram.observe(core.now_s - now_s)
            answer(error)

        self.wait_for_acks(state, needed, body["acks"], now_s + timeout_s, answer_and_time)

    def wait_for_acks(self, state: PartitionState, needed: int, acks: str, deadline_s: float,
                      callback: Callable[[MeshqError | None], None]) -> None:
        """Run ``callback(None)`` once the records below ``needed`` reach ``acks``, else an error."""
        replica = state.replica
        if replica.reached(acks, needed, self.core.now_s):
            callback(None)
            return
        state.waiters.append(AckWaiter(needed, acks, deadline_s, callback))
        self.out.schedule(deadline_s, "acks", state.key)

    def check_waiters(self, state: PartitionState, now_s: float) -> None:
        """Answer the waiters whose records reached their level, failed or timed out."""
        if not state.waiters:
            return
        replica = state.replica
        keep = []
        for waiter in state.waiters:
            if not replica.is_leader:
                waiter.callback(NotLeaderError(
                    f"{self.node_id} stopped leading {state.topic}/{state.partition} before the records reached "
                    f"acks={waiter.acks}; retry (the idempotent producer does not store them twice)",
                    leader=replica.leader))
            elif replica.reached(waiter.acks, waiter.needed, now_s):
                waiter.callback(None)
            elif waiter.deadline_s <= now_s:
                in_sync = replica.in_sync(now_s)
                if len(in_sync) < replica.quorum:
                    waiter.callback(NotEnoughReplicasError(
                        f"acks={waiter.acks} on {state.topic}/{state.partition} needs {replica.quorum} of the "
                        f"replicas {', '.join(replica.replicas)}; only {', '.join(in_sync)} answered in time"))
                else:
                    waiter.callback(TimeoutError(
                        f"records on {state.topic}/{state.partition} did not reach acks={waiter.acks} in time"))
            else:
                keep.append(waiter)
        state.waiters = keep

    def serve_fetch(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        self.core.access.check("consume", body["topic"])
        state = self.leader_state(body["topic"], body["partition"])
        if (body["offset"] >= state.high_watermark and body["max_wait_ms"] > 0
                and len(state.parked_fetches) < MAX_PARKED_FETCHES):
            deadline = now_s + min(body["max_wait_ms"], MAX_FETCH_WAIT_MS) / 1000.0
            state.parked_fetches.append(ParkedFetch(route, message.request_id, body, deadline))
            self.out.schedule(deadline, "fetch", state.key)
            return
        self._answer_fetch(state, route, message.request_id, body)

    # ------------------------------------------------------------------ produces held during a leadership move
    def _park_until(self, state: PartitionState, now_s: float) -> float | None:
        """Until when a produce arriving now waits at this replica of ``state`` (module docstring); None: no wait."""
        replica = state.replica
        if replica.is_leader:
            return replica.transfer_until_s if replica.handing_off(now_s) else None
        if replica.leader is None and self.node_id in replica.replicas:
            return now_s + replica.election_timeout_s
        return None

    def _park(self, state: PartitionState, route: Any, message: wire.Message, now_s: float) -> bool:
        """Hold a produce for the replica ``state`` while its leadership moves (module docstring): True if held."""
        if state.parked_produces:
            self._release_produces(state, now_s)  # those whose wait is over first: arrival order is kept
        until = self._park_until(state, now_s)
        if (until is None and not state.parked_produces) or len(state.parked_produces) >= MAX_PARKED_PRODUCES:
            return False
        if until is None:  # (still behind earlier ones that wait: a later batch must not overtake them)
            until = state.parked_produces[-1].deadline_s
        state.parked_produces.append(ParkedProduce(route, message, until, self.core.caller))
        self.core.counters["produces_parked"] += 1
        self.out.schedule(until, "produce", state.key)
        return True

    def _release_produces(self, state: PartitionState, now_s: float) -> None:
        """Serve or redirect the held produces whose wait is over, oldest first; the rest wait on."""
        replica = state.replica
        parked = state.parked_produces
        state.parked_produces = []
        for index, held in enumerate(parked):
            if replica.is_leader and not replica.handing_off(now_s):
                self._serve_held(held, now_s)
            elif not replica.is_leader and replica.leader is not None:
                self.out.reply_error(held.route, held.message.request_id, NotLeaderError(
                    f"leadership of {state.topic}/{state.partition} moved from {self.node_id} to {replica.leader}; "
                    f"retry there", leader=replica.leader))
            elif held.deadline_s <= now_s:
                self._serve_held(held, now_s)  # (answers not_leader, or not_enough_replicas, as fits)
            else:
                state.parked_produces = parked[index:]
                return

    def _serve_held(self, held: ParkedProduce, now_s: float) -> None:
        core = self.core
        caller, core.caller = core.caller, held.caller  # (a timer, or another peer's message, led here)
        try:
            self._produce(held.route, held.message, now_s, may_park=False)
        except MeshqError as exc:
            self.out.reply_error(held.route, held.message.request_id, exc)
        finally:
            core.caller = caller

    def abandon_parked(self, state: PartitionState) -> None:
        """The copy of ``state`` here is deleted (it moved away): answer everything parked on it."""
        where = f"{state.topic}/{state.partition} moved away from {self.node_id}; refresh metadata"
        for fetch in state.parked_fetches:
            self.out.reply_error(fetch.route, fetch.request_id, NotLeaderError(where))
        state.parked_fetches = []
        for held in state.parked_produces:
            self.out.reply_error(held.route, held.message.request_id, NotLeaderError(where, leader=state.replica.leader))
        state.parked_produces = []

    def release_produces(self, key: tuple[str, int], now_s: float) -> None:
        """The ``produce`` timer of partition ``key``: a held produce's wait is over."""
        state = self.core.host.get(key)
        if state is not None and state.parked_produces:
            self._release_produces(state, now_s)

    def check_lease(self, state: PartitionState, now_s: float) -> None:
        """Refuse (before any state change) a write this leader cannot vouch for.

        A leader whose lease lapsed (a majority of its replica set has not answered within the
        election timeout: it is cut off, or was paused) may already be deposed, so it takes no
        write at any acks level: a stale leader never acknowledges anything.
        """
        replica = state.replica
        if replica.handing_off(now_s):
            raise NotLeaderError(f"{self.node_id} is handing leadership of {state.topic}/{state.partition} to "
                                 f"{replica.replicas[0]}; refresh metadata and retry", leader=replica.replicas[0])
        if not replica.lease_valid(now_s):
            raise NotEnoughReplicasError(
                f"{self.node_id} leads {state.topic}/{state.partition} but has not heard from a majority of its "
                f"replicas ({', '.join(replica.replicas)}) recently; it refuses writes rather than diverge. "
                f"Retry: a leader on the majority side takes over")

    def _answer_fetch(self, state: PartitionState, route: Any, request_id: int, body: dict) -> None:
        offset = body["offset"]
        high_watermark = state.high_watermark
        data = b""
        rebuild = self.core.agreement.meta.rebuilds.get(state.key)
        if rebuild is not None and offset < min(rebuild["start"], state.log.start_offset):
            raise OffsetOutOfRangeError(lost_to_rebuild_message(state.topic, state.partition, offset, rebuild))
        if offset < high_watermark:
            # never more than one frame may carry (max_frame_bytes): a fetch asking for up to 1 GiB
            # would otherwise load that much of the log at once, and its reply would be refused
            # (the connection dropped) by any meshq node or client receiving it
            data = state.log.read(offset, min(body["max_bytes"], self.config.max_frame_bytes))
            if high_watermark < state.log.end_offset:  # only then can the read hold uncommitted batches
                data = _cut_at_offset(data, high_watermark)
            self.core.counters["records_fetched_bytes"] += len(data)
        elif offset > state.log.end_offset:
            raise OffsetOutOfRangeError(
                f"offset {offset} is past the end {state.log.end_offset} of {state.topic}/{state.partition}"
            )
        reply = {"topic": state.topic, "partition": state.partition, "high_watermark": high_watermark,
                 "log_start_offset": state.log.start_offset}
        self.out.reply(route, request_id, "fetch_ok", reply, (data,) if data else ())

    def on_appended(self, state: PartitionState, now_s: float) -> None:
        """The leader stored a batch: replicate it (its readers wait for the high watermark)."""
        self.core.host.mark_dirty(state.key)
        if self.config.fsync == "always":
            self.out.emit(SyncLogs(frozenset([state.key])))
        state.replica.on_local_append(now_s)

    def answer_parked(self, state: PartitionState, fetch: ParkedFetch) -> None:
        try:
            if not state.replica.is_leader:
                raise NotLeaderError(f"{self.node_id} no longer leads {state.topic}/{state.partition}; "
                                     f"refresh metadata")
            self._answer_fetch(state, fetch.route, fetch.request_id, fetch.body)
        except MeshqError as exc:
            self.out.reply_error(fetch.route, fetch.request_id, exc)

    def expire_waiters(self, key: tuple[str, int], now_s: float) -> None:
        """The ``acks`` timer of partition ``key``: answer the waiters whose deadline passed."""
        state = self.core.host.get(key)
        if state is not None:
            self.check_waiters(state, now_s)

    def on_replica_change(self, state: PartitionState) -> None:
        """Leadership or the high watermark of ``state`` changed: answer who waits on it."""
        self.check_waiters(state, self.core.now_s)
        if state.parked_produces:
            self._release_produces(state, self.core.now_s)
        if state.parked_fetches:
            replica = state.replica
            high_watermark = state.high_watermark
            keep = []
            for fetch in state.parked_fetches:  # the high watermark moved (or leadership went): answer now
                if not replica.is_leader or fetch.body["offset"] < high_watermark:
                    self.answer_parked(state, fetch)
                else:
                    keep.append(fetch)
            state.parked_fetches = keep

    def expire_parked(self, key: tuple[str, int], now_s: float) -> None:
        """The ``fetch`` timer of partition ``key``: answer the long polls whose wait is over."""
        state = self.core.host.get(key)
        if state is None:
            return
        keep = []
        for fetch in state.parked_fetches:
            if fetch.deadline_s <= now_s:
                self.answer_parked(state, fetch)
            else:
                keep.append(fetch)
        state.parked_fetches = keep

    def serve_list_offsets(self, route: Any, message: wire.Message, now_s: float) -> None:
        body = message.body
        self.core.access.check("consume", body["topic"])
        state = self.leader_state(body["topic"], body["partition"])
        timestamp_ms = body["timestamp_ms"]
        if timestamp_ms == EARLIEST:
            offset = state.log.start_offset
        elif timestamp_ms == LATEST:
            offset = state.high_watermark
        else:
            offset = min(state.log.offset_for_timestamp(timestamp_ms), state.high_watermark)
        self.out.reply(route, message.request_id, "list_offsets_ok", {"offset": offset})

    def leader_state(self, topic: str, partition: int) -> PartitionState:
        state = self.core.host.get((topic, partition))
        if state is not None and state.replica.is_leader:
            return state
        validate_topic_name(topic)
        if not self.core.is_storage:
            raise NotLeaderError(f"node {self.node_id} is a client and leads no partition")
        config = self.core.agreement.meta.topics.get(topic)
        if config is None:
            raise UnknownTopicError(f"topic {topic!r} does not exist (as far as {self.node_id} knows)")
        if not 0 <= partition < config.partitions:
            raise UnknownTopicError(f"topic {topic!r} has {config.partitions} partitions; {partition} does not exist")
        leader = self.core.host.current_leader(topic, partition)
        raise NotLeaderError(f"{self.node_id} does not lead {topic}/{partition}; its leader is "
                             f"{leader or 'being elected'} (refresh metadata)", leader=leader)


def _cut_at_offset(data: bytes, high_watermark: int) -> bytes:
    """Drop whole batches at or beyond the high watermark (never serve uncommitted records)."""
    end = 0
    for pos, header in batch_format.iter_batches(data, verify_crc=False):
        if header.base_offset >= high_watermark:
            break
        end = pos + header.size
    return data[:end] if end != len(data) else data


def lost_to_rebuild_message(topic: str, partition: int, offset: int, rebuild: dict) -> str:
    """The error a consumer reading below a rebuilt partition's start gets (``metadata.py``, rebuild)."""
    return (f"offset {offset} of {topic}/{partition} is gone: every replica of the partition was removed for "
            f"good and it was rebuilt empty from offset {rebuild['start']} (epoch {rebuild['epoch']}): "
            f"{describe_rebuild(rebuild)}. "
            f"Continue from offset {rebuild['start']} (auto_offset_reset, or seek)")
