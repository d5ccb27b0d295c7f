"""The producer: records into batches, batches to partition leaders, exactly once in the log.

Theory of operation
-------------------
A ``ProduceCommand`` waits for its topic's metadata (``core.client``), then its records are
split by partition (a stable hash of the key; keyless records stick to one partition per
command, moving on each time) and cut into batches of at most ``batch_max_records`` /
``batch_max_bytes``. Each batch carries this node's producer id, epoch and a per-partition
sequence number, so a leader stores a retried batch once. At most
``max_in_flight_per_partition`` batches are in flight per partition, and never more than
the leader's dedupe window (``PRODUCER_WINDOW``) past the oldest unsettled one, so a retry
always falls inside it. A retriable failure (leader moved, silent, no majority) re-sends the
same bytes after a metadata refresh until the batch's deadline, except that a ``not_leader``
answer naming the leader (a hand-off, a node that knows who leads) is followed at once: the
batch goes to the named node without the refresh (the first time at once, then
``HINT_RETRY_S`` later), at most ``MAX_HINT_FOLLOWS`` times in a row; a batch that fails for good
starts a new producer epoch and renumbers what was never sent (batches already sent under
the old numbering have an unknown fate and fail too, as in Kafka's KIP-360). ``acks=none``
batches use a separate, gap-tolerant producer id and are never retried.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from meshq.config import TopicConfig, refuse_reserved_topic, validate_topic_name
from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.client.metadata import METADATA_RETRY_S
from meshq.core.events import InCoreWaiter, ProduceCommand, ResolveProduce
from meshq.core.hashing import partition_for_key
from meshq.core.partition import PRODUCER_WINDOW
from meshq.core.room import Room
from meshq.errors import (
    MeshqError,
    MessageTooLargeError,
    NodeStoppedError,
    NotEnoughReplicasError,
    NotLeaderError,
    TimeoutError,
    UnknownTopicError,
    UsageError,
    error_code,
)

# A not_leader answer that names the leader is followed without a metadata refresh (a partition's
# leadership moved: a preferred-leader hand-off, a failover the answering node already knows of).
# The first follow goes at once: a node answers so only once it knows who leads (a produce that
# reaches a partition's replica while its leadership moves waits there for the outcome). Later
# ones wait HINT_RETRY_S: two nodes naming each other (views not yet agreed) settle meanwhile.
# After MAX_HINT_FOLLOWS in a row the refresh path takes over (a hint that went stale).
HINT_RETRY_S = 0.02
MAX_HINT_FOLLOWS = 5


@dataclass(slots=True)
class OutBatch:
    """A batch the producer is sending: kept until acknowledged or failed."""

    topic: str
    partition: int
    records: list
    indexes: Any  # Sequence[int]: positions of these records in the command's record list
    waiter: Any
    acks: str
    deadline_s: float
    base_sequence: int
    data: bytes = b""
    attempts: int = 0
    settled: bool = False
    hint_follows: int = 0  # not_leader hints followed in a row (see _follow_hint)


@dataclass(slots=True)
class ProducerPartition:
    next_sequence: int = 0
    next_at_most_once: int = 0
    queue: deque = field(default_factory=deque)
    in_flight: int = 0  # requests awaiting a reply
    # Sequenced batches in first-send order, from the oldest one not yet settled (acknowledged or
    # failed) on. The leader remembers a producer's last PRODUCER_WINDOW batches, so new sends
    # stop while this holds that many: a retry always falls inside the leader's dedupe window.
    sent_log: deque = field(default_factory=deque)


class Producer(Room):
    """This node's idempotent producer (see the module docstring)."""

    COMMANDS = {ProduceCommand: "produce"}
    TIMERS = {"produce_retry": "_resume"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.producer_id = core.rng.getrandbits(62)
        self.producer_epoch = 0
        self.at_most_once_id = core.rng.getrandbits(62)
        self.producer_partitions: dict[tuple[str, int], ProducerPartition] = {}
        self.sticky: dict[str, int] = {}  # topic -> the partition its next keyless records go to

    def stop(self, error: NodeStoppedError) -> None:
        """Fail every batch still queued."""
        for pp in self.producer_partitions.values():
            while pp.queue:
                self._fail_batch(pp.queue.popleft(), error, restart=False)

    def _settle(self, effect: ResolveProduce) -> None:
        """Tell a command's waiter the fate of some of its records: the runtime's, or a room's."""
        if type(effect.waiter) is InCoreWaiter:
            effect.waiter.callback(effect)
        else:
            self.out.emit(effect)

    def produce(self, command: ProduceCommand, now_s: float) -> None:
        if self.core.stopped:
            self._fail_records(command, NodeStoppedError("the node is stopped"))
            return
        try:
            validate_topic_name(command.topic)
            refuse_reserved_topic(command.topic)  # meshq's own topics take no produce
        except MeshqError as exc:
            self._fail_records(command, exc)
            return

        def ready(error: MeshqError | None) -> None:
            if error is not None:
                self._fail_records(command, error)
                return
            if command.topic not in self.core.client.metadata:
                # Another waiter's retry dropped the metadata again before this one ran: wait again.
                self.core.client.with_metadata(command.topic, self.core.now_s, command.deadline_s, ready)
                return
            self._enqueue_records(command, self.core.now_s)

        self.core.client.with_metadata(command.topic, now_s, command.deadline_s, ready)

    def _fail_records(self, command: ProduceCommand, error: MeshqError) -> None:
        if command.waiter is not None:
            self._settle(ResolveProduce(command.waiter, range(len(command.records)), command.records,
                                         command.topic, -1, -1, error))

    def _enqueue_records(self, command: ProduceCommand, now_s: float) -> None:
        get_key, get_value, get_headers = itemgetter(0), itemgetter(1), itemgetter(2)
        sizes: dict[int, int] = {}  # id(headers dict) -> estimated bytes (produce_batch shares one dict)

        def header_size(headers: Any) -> int:
            if not headers:
                return 0
            size = sizes.get(id(headers))
            if size is None:
                try:
                    size = sum(len(k.encode()) + len(v) + 10 for k, v in headers.items())
                except (AttributeError, TypeError):
                    size = 0  # not str -> bytes: encode_batch or the leader refuses the batch
                sizes[id(headers)] = size
            return size

        keyless = False
        config: TopicConfig = self.core.client.metadata[command.topic]["config"]
        records = command.records
        groups: dict[int, tuple[list, Any]]
        if command.partition is not None:
            if not 0 <= command.partition < config.partitions:
                self._fail_records(command, UsageError(
                    f"partition {command.partition} does not exist; {command.topic!r} has {config.partitions}"))
                return
            groups = {command.partition: (records, range(len(records)))}
        else:
            keyless_partition = self.sticky.get(command.topic)
            if keyless_partition is None:
                keyless_partition = self.core.rng.randrange(config.partitions)
            self.sticky[command.topic] = (keyless_partition + 1) % config.partitions
            if list(map(get_key, records)).count(None) == len(records):  # one pass at C speed
                keyless = True
                groups = {keyless_partition: (records, range(len(records)))}
            else:
                groups = {}
                for index, record in enumerate(records):
                    key = record[0]
                    partition = keyless_partition if key is None else partition_for_key(key, config.partitions)
                    group = groups.get(partition)
                    if group is None:
                        group = groups[partition] = ([], [])
                    group[0].append(record)
                    group[1].append(index)
        limit_records = self.config.batch_max_records
        limit_bytes = self.config.batch_max_bytes - 1024
        for partition, (part_records, part_indexes) in sorted(groups.items()):
            pp = self.producer_partitions.get((command.topic, partition))
            if pp is None:
                pp = self.producer_partitions[(command.topic, partition)] = ProducerPartition()
            start = 0
            total = len(part_records)
            # Size estimate per record: value + key + header bytes + 16 (msgpack framing). A whole
            # window is summed at C speed; the per-record loop runs only where a split is needed.
            while start < total:
                end = min(total, start + limit_records)
                window = part_records if (start, end) == (0, total) else part_records[start:end]
                size = sum(map(len, map(get_value, window))) + 16 * (end - start)
                if not keyless:
                    size += sum(map(len, filter(None, map(get_key, window))))
                with_headers = any(map(get_headers, window))
                if with_headers:
                    size += sum(map(header_size, map(get_headers, window)))
                if size > limit_bytes:
                    end, size = start, 0
                    while end < total and end - start < limit_records:
                        record = part_records[end]
                        size += (len(record[1]) + (len(record[0]) if record[0] else 0)
                                 + (header_size(record[2]) if with_headers else 0) + 16)
                        if size > limit_bytes and end > start:
                            break
                        end += 1
                chunk = part_records[start:end] if (start, end) != (0, total) else part_records
                if command.acks == "none":
                    # Fire and forget is never retried, so a lost batch must not leave a gap that
                    # blocks later ones: its own producer id and a gap-tolerant sequence.
                    out = OutBatch(command.topic, partition, chunk, part_indexes[start:end], command.waiter,
                                   command.acks, command.deadline_s, batch_format.NO_SEQUENCE)
                    out.data = batch_format.encode_batch(
                        chunk, producer_id=self.at_most_once_id, producer_epoch=0,
                        base_sequence=pp.next_at_most_once, attributes=batch_format.AT_MOST_ONCE)
                    pp.next_at_most_once += len(chunk)
                else:
                    out = OutBatch(command.topic, partition, chunk, part_indexes[start:end], command.waiter,
                                   command.acks, command.deadline_s, pp.next_sequence)
                    pp.next_sequence += len(chunk)
                    out.data = batch_format.encode_batch(
                        chunk, producer_id=self.producer_id, producer_epoch=self.producer_epoch,
                        base_sequence=out.base_sequence,
                    )
                if len(out.data) > self.config.batch_max_bytes * 2:
                    self._fail_batch(out, _too_large(len(out.data), self.config.batch_max_bytes * 2))
                else:
                    pp.queue.append(out)
                start = end
            self._pump((command.topic, partition), now_s)

    def _pump(self, key: tuple[str, int], now_s: float) -> None:
        pp = self.producer_partitions[key]
        window = min(self.config.max_in_flight_per_partition, PRODUCER_WINDOW)
        while pp.queue and pp.in_flight < window:
            out = pp.queue[0]
            if out.deadline_s <= now_s:
                pp.queue.popleft()
                self._fail_batch(out, TimeoutError(
                    f"produce to {out.topic}/{out.partition} did not complete before its deadline"))
                continue
            while pp.sent_log and pp.sent_log[0].settled:
                pp.sent_log.popleft()
            if out.attempts == 0 and out.acks != "none" and len(pp.sent_log) >= window:
                break  # never run more than the leader's dedupe window past an unsettled batch
            leader = self.core.client.leader_of(*key)
            if leader is None or (leader != self.node_id and leader not in self.out.peer_endpoints):
                self._retry_later(out, pp, NotLeaderError(f"no known leader for {key[0]}/{key[1]}"), now_s,
                                  requeue=False)
                return
            pp.queue.popleft()
            self._send_batch(out, leader, pp, now_s)

    def _send_batch(self, out: OutBatch, leader: str, pp: ProducerPartition, now_s: float) -> None:
        body = {"topic": out.topic, "partition": out.partition, "acks": out.acks,
                "timeout_ms": max(0, int((out.deadline_s - now_s) * 1000))}
        out.attempts += 1
        if out.acks == "none":
            self.out.send_oneway(leader, "produce", body, (out.data,), now_s)
            if out.waiter is not None:
                self._settle(ResolveProduce(out.waiter, out.indexes, out.records, out.topic,
                                             out.partition, -1))
            return
        pp.in_flight += 1
        if out.attempts == 1:
            pp.sent_log.append(out)
        key = (out.topic, out.partition)

        def on_reply(message: wire.Message) -> None:
            pp.in_flight -= 1
            out.settled = True
            if out.waiter is not None:
                self._settle(ResolveProduce(out.waiter, out.indexes, out.records, out.topic,
                                             out.partition, message.body["base_offset"]))
            self._pump(key, self.core.now_s)

        def on_error(error: MeshqError) -> None:
            pp.in_flight -= 1
            if self.core.stopped:
                self._fail_batch(out, error)
                return
            superseded = batch_format.parse_header(out.data).producer_epoch != self.producer_epoch
            if not superseded and self._follow_hint(out, pp, leader, error, self.core.now_s):
                return
            if error.retriable:
                # The leader may have moved (not_leader, silence, no majority): whatever happens
                # to this batch, the next send to this topic asks for fresh metadata first.
                self.core.client.forget(out.topic)
            if superseded:
                # Superseded by a newer epoch: a retry would only be fenced. Its fate is unknown.
                self._fail_batch(out, TimeoutError(
                    "the producer started a new epoch while this batch was unanswered; its fate is unknown "
                    "(it may or may not be stored)"), restart=False)
                self._pump(key, self.core.now_s)
                return
            self._retry_later(out, pp, error, self.core.now_s, requeue=True)

        timeout_s = max(0.001, min(self.config.request_timeout_s, out.deadline_s - now_s))
        self.out.request(leader, "produce", body, (out.data,), now_s, timeout_s, on_reply, on_error)

    def _follow_hint(self, out: OutBatch, pp: ProducerPartition, sent_to: str, error: MeshqError,
                     now_s: float) -> bool:
        """A ``not_leader`` answer that names another node we can reach: note it as the partition's leader and
        send the batch there (at once the first time, then ``HINT_RETRY_S`` later), without a metadata refresh
        (module docstring). False when the answer names nobody usable, the batch has followed
        ``MAX_HINT_FOLLOWS`` hints in a row or its deadline is too close: the caller takes the refresh path
        (the caller checks the batch's epoch first)."""
        hint = error.leader if isinstance(error, NotLeaderError) else None
        if (hint is None or hint == sent_to or out.hint_follows >= MAX_HINT_FOLLOWS
                or now_s + HINT_RETRY_S >= out.deadline_s
                or (hint != self.node_id and hint not in self.out.peer_endpoints)):
            out.hint_follows = 0
            return False
        out.hint_follows += 1
        self.core.client.note_leader(out.topic, out.partition, hint)
        self._requeue(out, pp)
        self.out.schedule(now_s + (0.0 if out.hint_follows == 1 else HINT_RETRY_S), "produce_retry", out)
        return True

    @staticmethod
    def _requeue(out: OutBatch, pp: ProducerPartition) -> None:
        """Put a batch that will be sent again back in its queue, ordered by sequence (the leader sees no gap)."""
        position = 0
        while position < len(pp.queue) and pp.queue[position].base_sequence < out.base_sequence:
            position += 1
        pp.queue.insert(position, out)

    def _retry_later(self, out: OutBatch, pp: ProducerPartition, error: MeshqError, now_s: float,
                     requeue: bool) -> None:
        """Retry a batch (same sequence numbers) after a metadata refresh, or fail it at its deadline."""
        retriable = produce_retriable(error)
        if not retriable or now_s + METADATA_RETRY_S >= out.deadline_s:
            if not requeue:
                pp.queue.popleft()
            self._fail_batch(out, final_produce_error(out.topic, out.partition, out.attempts, error)
                             if retriable else error)
            self._pump((out.topic, out.partition), now_s)
            return
        if requeue:
            self._requeue(out, pp)
        self.core.client.forget(out.topic)
        self.out.schedule(now_s + METADATA_RETRY_S, "produce_retry", out)

    def _resume(self, out: OutBatch, now_s: float) -> None:
        """The ``produce_retry`` timer of batch ``out``: refresh the topic's metadata, then send
        again what waits in its partition's queue (or fail it all if the topic is gone)."""
        key = (out.topic, out.partition)
        pp = self.producer_partitions[key]

        def after(error: MeshqError | None) -> None:
            if error is not None and not error.retriable:
                while pp.queue:
                    self._fail_batch(pp.queue.popleft(), error, restart=False)
                self._restart_sequences(pp)
            else:
                self._pump(key, now_s)

        self.core.client.with_metadata(out.topic, now_s, out.deadline_s, after)

    def _fail_batch(self, out: OutBatch, error: MeshqError, restart: bool = True) -> None:
        out.settled = True
        if out.waiter is not None:
            self._settle(ResolveProduce(out.waiter, out.indexes, out.records, out.topic,
                                         out.partition, -1, error))
        pp = self.producer_partitions.get((out.topic, out.partition))
        if restart and pp is not None and not self.core.stopped:
            self._restart_sequences(pp)

    def _restart_sequences(self, pp: ProducerPartition | None = None) -> None:
        """A batch failed for good, so its sequence range may or may not be stored: every later
        batch would meet a gap at the leader. Start a new producer epoch — leaders require a new
        epoch to start at sequence 0 and fence older epochs — and renumber, in every partition,
        what was never sent. Batches sent before under the old numbering have an unknown fate;
        renumbering them could store them twice, so they fail too (as in Kafka's KIP-360)."""
        self.producer_epoch += 1
        for _key, partition_state in sorted(self.producer_partitions.items()):
            keep: deque = deque()
            sequence = 0
            queued, partition_state.queue = partition_state.queue, deque()
            for out in queued:
                if out.base_sequence == batch_format.NO_SEQUENCE:
                    keep.append(out)  # acks=none: not sequenced
                    continue
                if out.attempts > 0:
                    self._fail_batch(out, TimeoutError(
                        "an earlier batch failed and the producer started a new epoch; this batch was sent "
                        "before and its fate is unknown (it may or may not be stored)"), restart=False)
                    continue
                out.base_sequence = sequence
                out.data = batch_format.encode_batch(out.records, producer_id=self.producer_id,
                                                     producer_epoch=self.producer_epoch, base_sequence=sequence)
                sequence += len(out.records)
                keep.append(out)
            partition_state.queue = keep
            partition_state.next_sequence = sequence


def produce_retriable(error: MeshqError) -> bool:
    """Whether a failed produce is sent again (same sequence numbers) after a metadata refresh."""
    return error.retriable or isinstance(error, UnknownTopicError) or error_code(error) == "out_of_order_sequence"


def final_produce_error(topic: str, partition: int, attempts: int, error: MeshqError | None) -> MeshqError:
    """What a produce that ran out of time reports: ``TimeoutError`` when an attempt reached a
    leader (its fate is unknown: it may be stored), ``NotEnoughReplicasError`` when no leader of
    the partition could be reached at all. The last retriable error (None: no answer at all) is
    kept in the message."""
    where = f"{topic}/{partition}"
    if isinstance(error, (TimeoutError, NotEnoughReplicasError)):
        return error
    if attempts == 0 and isinstance(error, NotLeaderError):
        return NotEnoughReplicasError(
            f"no leader of {where} could be reached before the deadline (a majority of its replicas may be "
            f"down or cut off); nothing was sent. Last error: {error}")
    return TimeoutError(
        f"produce to {where} was not acknowledged before its deadline; it may or may not be stored. "
        f"Last error: {error or 'no answer'}")


def _too_large(size: int, limit: int) -> MeshqError:
    return MessageTooLargeError(f"a record batch of {size} bytes exceeds the limit of {limit}; send smaller records")
