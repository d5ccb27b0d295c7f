"""Synchronous produce from the caller's thread: each thread's producer and each call's retries.

Theory of operation
-------------------
``Node.produce`` may send its one record straight to a remote partition leader from the
calling thread (``meshq.io.direct`` does the sockets, polls and sleeps; the simulator's
``meshq.testing.sim.threads`` does the same with its network and clock). Everything that
decides what to send, when to send it again and what the caller is told is here, as pure
state, so both run the same decisions:

* **Each thread is its own idempotent producer** (``ThreadProducer``): a producer id drawn
  from the ``random.Random`` it is handed, an epoch, its own sequence per partition, the
  partition its next keyless record goes to per topic (sticky, moving on each call, as the
  runtime's producer does), request ids, and counts. The leader's ordinary duplicate and gap
  checks apply to it unchanged; the request is the ordinary ``produce`` message.
* **One call is a state machine** (``DirectCall``), driven by its shell:

  ==========  ===========================================  ==========  ===========================
  state       input                                        next        effect
  ==========  ===========================================  ==========  ===========================
  ready       ``attempt`` (the shell found a leader)       waiting     a new request id, the same
                                                                       bytes; wait until
                                                                       ``wait_until_s``
  ready       ``no_leader``                                pausing     then a refresh
  waiting     ``answered(base offset)``                    done        the sequence advances
  waiting     ``answered(error)``, not retriable           failed      raised to the caller
  waiting     ``answered(error)``, retriable, or the       pausing     then a refresh
              leader went silent (``silent_leader_error``)
  waiting     ``answered(None)``: nothing by               refreshing
              ``wait_until_s``
  waiting     ``unsent(error)``: the transport refused it  pausing     then ready (no refresh)
              or lost it (the connection dropped while
              the call waited: ``meshq.io.direct``)
  pausing     ``resume`` (at ``pause_until_s``)            refreshing  or ready
  refreshing  ``refreshed`` (the metadata refresh ended,   ready       (its outcome does not
              whatever its outcome)                                    matter: the next attempt
                                                                       reports what is wrong)
  any live    ``check_deadline`` at or past the deadline   failed      ``final_produce_error``
  ==========  ===========================================  ==========  ===========================

  Retries re-send the same bytes (same producer id, epoch and sequence) so the leader stores
  them at most once, to whichever node the metadata names as leader after the refresh. A
  pause of ``RETRY_PAUSE_S`` follows an error answer (the cluster is changing); an attempt
  waits at most ``request_timeout_s`` and never past the call's deadline.
* **A call that ends without an acknowledgement starts a new producer epoch** (``fail``):
  leaders fence the old epoch, so a batch whose fate is unknown can never be stored behind
  later ones (as the runtime's producer does; KIP-360). When it ended on a retriable error or
  something that is not a ``MeshqError`` (a timeout, an interrupt), ``fail`` says the topic's
  metadata is stale: the next call to it refreshes first.
"""

from __future__ import annotations

import random
from typing import Any

from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.client.producer import final_produce_error, produce_retriable
from meshq.core.hashing import partition_for_key
from meshq.errors import MeshqError, NotLeaderError, ProtocolError, UsageError, error_from_code

RETRY_PAUSE_S = 0.05  # pause before a retry after an error answer (the cluster is changing)
LIVENESS_CHECK_S = 0.05  # how often a waiting call looks at its leader's liveness

READY = "ready"
WAITING = "waiting"
PAUSING = "pausing"
REFRESHING = "refreshing"
DONE = "done"
FAILED = "failed"


class ThreadProducer:
    """One calling thread's idempotent producer: identity, numbering, partition choice."""

    __slots__ = ("rng", "producer_id", "epoch", "sequences", "sticky", "request_id", "produced", "retries")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.producer_id = rng.getrandbits(62)
        self.epoch = 0
        self.sequences: dict[tuple[str, int], int] = {}  # (topic, partition) -> the next batch's sequence
        self.sticky: dict[str, int] = {}  # topic -> the partition its next keyless record goes to
        self.request_id = 0
        self.produced = 0  # records acknowledged through this thread
        self.retries = 0  # attempts after the first

    def new_epoch(self) -> None:
        """Fence whatever was sent before: leaders require a new epoch to start at sequence 0."""
        self.epoch += 1
        self.sequences.clear()

    def partition_for(self, topic: str, key: bytes | None, partition: int | None, partitions: int) -> int:
        """The partition a record goes to: the one asked for (checked), its key's, or the sticky one."""
        if partition is not None:
            if not 0 <= partition < partitions:
                raise UsageError(f"partition {partition} does not exist; {topic!r} has {partitions}")
            return partition
        if key is not None:
            return partition_for_key(key, partitions)
        chosen = self.sticky.get(topic)
        if chosen is None:
            chosen = self.rng.randrange(partitions)
        self.sticky[topic] = (chosen + 1) % partitions
        return chosen

    def start(self, topic: str, partition: int, record: tuple, acks: str, deadline_s: float,
              request_timeout_s: float, max_bytes: int) -> DirectCall | None:
        """One call producing ``record``: its batch numbered now; None when the batch is larger
        than ``max_bytes`` (not for this path)."""
        sequence = self.sequences.get((topic, partition), 0)
        data = batch_format.encode_batch([record], producer_id=self.producer_id, producer_epoch=self.epoch,
                                         base_sequence=sequence)
        if len(data) > max_bytes:
            return None
        return DirectCall(self, topic, partition, acks, data, sequence, deadline_s, request_timeout_s)


class DirectCall:
    """One synchronous produce's retries (see the module docstring's table)."""

    __slots__ = ("producer", "topic", "partition", "acks", "data", "sequence", "deadline_s", "request_timeout_s",
                 "state", "request_ids", "last_error", "wait_until_s", "pause_until_s", "_refresh_after_pause")

    def __init__(self, producer: ThreadProducer, topic: str, partition: int, acks: str, data: bytes, sequence: int,
                 deadline_s: float, request_timeout_s: float) -> None:
        self.producer = producer
        self.topic = topic
        self.partition = partition
        self.acks = acks
        self.data = data  # the bytes every attempt sends
        self.sequence = sequence
        self.deadline_s = deadline_s
        self.request_timeout_s = request_timeout_s
        self.state = READY
        self.request_ids: set[int] = set()  # every attempt's: an answer to any of them counts
        self.last_error: MeshqError | None = None  # the last attempt's (None: it got no answer)
        self.wait_until_s = deadline_s
        self.pause_until_s = deadline_s
        self._refresh_after_pause = True

    # ------------------------------------------------------------------ inputs
    def check_deadline(self, now_s: float) -> None:
        """Raise what the caller is told once the deadline has come (the call has failed)."""
        if now_s >= self.deadline_s and self.state not in (DONE, FAILED):
            self.state = FAILED
            raise final_produce_error(self.topic, self.partition, len(self.request_ids), self.last_error)

    def attempt(self, now_s: float) -> tuple[int, dict]:
        """Send the batch (again): the request id and ``produce`` body to send, with ``data``."""
        self._expect(READY)
        self.producer.request_id += 1
        self.request_ids.add(self.producer.request_id)
        if len(self.request_ids) > 1:
            self.producer.retries += 1
        self.state = WAITING
        self.wait_until_s = min(self.deadline_s, now_s + self.request_timeout_s)
        body = {"topic": self.topic, "partition": self.partition, "acks": self.acks,
                "timeout_ms": max(1, int((self.deadline_s - now_s) * 1000))}
        return self.producer.request_id, body

    def expects(self, request_id: int) -> bool:
        """Whether an answer with ``request_id`` is to this call (else: a late one to an earlier call)."""
        return request_id in self.request_ids

    def no_leader(self, now_s: float) -> None:
        """No leader to send to: pause, refresh the metadata, try again."""
        self._expect(READY)
        self._pause(NotLeaderError(f"no known leader for {self.topic}/{self.partition}"), now_s, refresh=True)

    def unsent(self, error: MeshqError, now_s: float) -> None:
        """The transport refused the attempt (not connected yet, closing) or lost it (its connection
        dropped while the call waited): pause, try again (no refresh: the leader is not known to be gone)."""
        self._expect(WAITING)
        self._pause(error, now_s, refresh=False)

    def answered(self, answer: int | MeshqError | None, now_s: float) -> int | None:
        """The attempt's outcome: a base offset (returned: the call is done), an error (raised
        when not retriable) or None (no answer by ``wait_until_s``)."""
        self._expect(WAITING)
        if type(answer) is int:
            self.state = DONE
            self.producer.sequences[(self.topic, self.partition)] = self.sequence + 1
            self.producer.produced += 1
            return answer
        self.last_error = answer  # type: ignore[assignment]
        if answer is None:
            self.state = REFRESHING
            return None
        assert isinstance(answer, MeshqError), answer
        if not produce_retriable(answer):
            self.state = FAILED
            raise answer
        self._pause(answer, now_s, refresh=True)
        return None

    def resume(self) -> None:
        """The pause is over."""
        self._expect(PAUSING)
        self.state = REFRESHING if self._refresh_after_pause else READY

    def refreshed(self) -> None:
        """The metadata refresh ended (whatever its outcome)."""
        self._expect(REFRESHING)
        self.state = READY

    def fail(self, error: BaseException) -> bool:
        """The call ends without an acknowledgement (``error`` goes to the caller): its fate is
        unknown, so a new epoch fences it. Returns whether the topic's metadata is stale."""
        assert self.state != DONE, "an acknowledged call cannot fail"
        self.state = FAILED
        self.producer.new_epoch()
        return not isinstance(error, MeshqError) or produce_retriable(error)

    # ------------------------------------------------------------------ internals
    def _pause(self, error: MeshqError, now_s: float, refresh: bool) -> None:
        self.last_error = error
        self.state = PAUSING
        self.pause_until_s = min(now_s + RETRY_PAUSE_S, max(now_s, self.deadline_s))
        self._refresh_after_pause = refresh

    def _expect(self, state: str) -> None:
        assert self.state == state, f"{self.topic}/{self.partition}: {self.state}, not {state}"


def answer_of(message: wire.Message) -> int | MeshqError:
    """What a leader's answer to a ``produce`` says: the base offset, or the error it reports."""
    if message.type == "produce_ok":
        return message.body["base_offset"]
    if message.type == "error":
        return error_from_code(message.body["code"], message.body["message"])
    return ProtocolError(f"unexpected answer {message.type!r} to a produce")


def silent_leader_error(topic: str, partition: int) -> NotLeaderError:
    """What a call waiting on a leader that went silent answers itself (retriable: elsewhere)."""
    return NotLeaderError(f"the leader of {topic}/{partition} went silent; retrying elsewhere")


def leader_silent(leader: str | None, own_id: str, members: Any) -> bool:
    """Whether the node named as leader is seen suspect or dead in this node's member table."""
    if leader is None:
        return True
    if leader == own_id or members is None:
        return False
    member = members.get(leader)
    # (not in the member table yet: unknown is not silent; the runtime's producer waits too)
    return member is not None and member.state != "alive"
