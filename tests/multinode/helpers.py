"""Helpers for multi-process tests: start `meshq node` processes, read each node's own view, wait for agreement."""

from __future__ import annotations

import concurrent.futures
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from meshq.core.batch import HEADER_SIZE, decode_records, iter_batches, parse_header, stamp
from meshq.core.hashing import partition_for_key
from meshq.errors import MeshqError
from meshq.log.segmented import SegmentedLog
from tests.multinode.probe import try_node_status
from tests.procs import REAP_DEADLINE_S, START_DEADLINE_S, NodeProcess

# (test node id, label, seconds): measurements printed in the terminal summary by the conftests
TIMINGS: list[tuple[str, str, float]] = []


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1,
               detail: Callable[[], str] | None = None) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` (and ``detail()``,
    e.g. every node's view) at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() >= deadline:
            suffix = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{suffix}")
        time.sleep(interval_s)


class Mesh:
    """The `meshq node` processes of one test, all in cluster ``self.cluster`` unless told otherwise."""

    def __init__(self, root: str, cluster: str) -> None:
        self.root = root
        self.cluster = cluster
        self.nodes: list[NodeProcess] = []
        self._lock = threading.Lock()
        self._count = 0

    def new(self, *, cluster: str | None = None, mdns: bool = False, seeds: Iterable[NodeProcess | str] = (),
            extra: list[str] | None = None) -> NodeProcess:
        """A node process object (not started) with a fresh data directory."""
        with self._lock:
            self._count += 1
            name = f"n{self._count}"
        seed_args: list[str] = []
        for seed in seeds:
            seed_args += ["--seed", seed.seed if isinstance(seed, NodeProcess) else seed]
        node = NodeProcess(f"{self.root}/{name}", cluster=cluster or self.cluster, extra=[*seed_args, *(extra or [])],
                           log_path=f"{self.root}/{name}.log",
                           mdns_interface="127.0.0.1" if mdns else None)  # mDNS always pinned to loopback
        with self._lock:
            self.nodes.append(node)
        return node

    def start(self, count: int = 1, **kwargs: Any) -> list[NodeProcess]:
        """Start ``count`` nodes at the same time (each in its own thread); returns them once all are ready."""
        nodes = [self.new(**kwargs) for _ in range(count)]
        start_all(nodes)
        return nodes

    def kill_all(self) -> None:
        for node in self.nodes:
            try:
                node.kill()
            except Exception:  # keep going: every other node must still be killed
                pass


def start_all(nodes: list[NodeProcess]) -> None:
    """Start (or restart) every node concurrently; raise the first start failure."""
    errors: list[BaseException] = []

    def run(node: NodeProcess) -> None:
        try:
            node.start()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(node,), name=f"start-{node.port}") for node in nodes]
    for thread in threads:
        thread.start()
    # each start ends by itself within its own deadline (ready line, or killed and reaped): this is a backstop
    deadline = time.monotonic() + START_DEADLINE_S + 2 * REAP_DEADLINE_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if errors:
        raise errors[0]
    assert not stuck, f"starting nodes still under way {START_DEADLINE_S + 2 * REAP_DEADLINE_S:.0f} s later: {stuck}"


def node_id(node: NodeProcess) -> str:
    return node.ready["node_id"]


def view(node: NodeProcess, timeout_s: float = 2.0) -> dict | None:
    """This node's own status (not merged with anyone's), or None if it does not answer."""
    return try_node_status(node.seed, node.cluster, timeout_s)


def member_states(status: dict) -> dict[str, str]:
    return {m["node_id"]: m["state"] for m in status["members"]}


def agreement(nodes: list[NodeProcess], expected_ids: set[str] | None = None) -> dict[str, dict] | None:
    """Every node's view if all of them agree on the membership, else None.

    Agreement: each node's metadata has exactly ``expected_ids`` as voters and the same
    (non-null) leader, its ring is over the same members, and it sees every other
    expected node as alive.
    """
    expected = expected_ids if expected_ids is not None else {node_id(n) for n in nodes}
    views: dict[str, dict] = {}
    for node in nodes:
        status = view(node)
        if status is None or "metadata" not in status:
            return None
        meta = status["metadata"]
        if set(meta["voters"]) != expected or meta["leader"] is None:
            return None
        if set(status.get("ring", {}).get("members", [])) != expected:
            return None
        states = member_states(status)
        if any(states.get(other) != "alive" for other in expected):
            return None
        views[status["node_id"]] = status
    leaders = {v["metadata"]["leader"] for v in views.values()}
    return views if len(leaders) == 1 else None


def describe(nodes: list[NodeProcess]) -> str:
    """A compact dump of every node's view, for assertion messages."""
    lines = []
    for node in nodes:
        status = view(node)
        if status is None:
            lines.append(f"{node.seed}: no answer")
            continue
        meta = status.get("metadata", {})
        lines.append(f"{status['node_id']} @ {node.seed}: voters={meta.get('voters')} leader={meta.get('leader')} "
                     f"term={meta.get('term')} members={member_states(status)}")
    return "\n".join(lines)


def wait_agreement(nodes: list[NodeProcess], timeout_s: float, expected_ids: set[str] | None = None) -> dict:
    try:
        return wait_until(lambda: agreement(nodes, expected_ids), timeout_s, "one agreed membership", 0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{describe(nodes)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Replication: writers that record every attempt, the checks after a fault, and replica logs compared on disk.
# Shared by tests/multinode/test_replication.py and tests/netns/test_split.py (whose writers run in namespaces).
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One produce call and its outcome, as the test saw it."""

    writer: str
    seq: int  # per writer, in the order the calls were made (async: submitted)
    value: bytes
    started_s: float  # time.monotonic() (system-wide on Linux, so comparable across processes)
    ended_s: float
    partition: int | None  # where it was stored; None when the call raised
    offset: int | None
    error: str | None  # "ErrorClass: message" when the call raised

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def error_type(self) -> str | None:
        return None if self.error is None else self.error.split(":", 1)[0]

    def to_json(self) -> dict:
        return {"writer": self.writer, "seq": self.seq, "value": self.value.decode(), "started_s": self.started_s,
                "ended_s": self.ended_s, "partition": self.partition, "offset": self.offset, "error": self.error}

    @classmethod
    def from_json(cls, data: dict) -> Attempt:
        return cls(data["writer"], data["seq"], data["value"].encode(), data["started_s"], data["ended_s"],
                   data["partition"], data["offset"], data["error"])


#: error types a write may legitimately end with while the cluster is faulty (SPEC §3.1, §4.1)
RETRIABLE_ERRORS = ("NotEnoughReplicasError", "TimeoutError", "NotLeaderError", "NoRespondersError")
#: prefix of the error text of a call whose Future never settled (the product must settle it within its timeout)
HUNG = "Hung"


class WriteLog:
    """Every value a test produced (or tried to) and every attempt's outcome; thread-safe."""

    def __init__(self, on_attempt: Callable[[Attempt], None] | None = None) -> None:
        self._lock = threading.Lock()
        self.attempts: list[Attempt] = []
        self.produced: set[bytes] = set()
        self._on_attempt = on_attempt

    def sent(self, value: bytes) -> None:
        with self._lock:
            self.produced.add(value)

    def record(self, attempt: Attempt) -> None:
        with self._lock:
            self.produced.add(attempt.value)
            self.attempts.append(attempt)
        if self._on_attempt is not None:
            self._on_attempt(attempt)

    def snapshot(self) -> list[Attempt]:
        with self._lock:
            return list(self.attempts)

    def acks_since(self, since_s: float, partition: int | None = None) -> int:
        """Acknowledged attempts that started at or after ``since_s`` (in ``partition`` if given)."""
        return sum(1 for a in self.snapshot()
                   if a.ok and a.started_s >= since_s and (partition is None or a.partition == partition))

    def last_error(self) -> str | None:
        errors = [a.error for a in self.snapshot() if a.error]
        return errors[-1] if errors else None

    def first_ack_after(self, since_s: float, partition: int) -> float | None:
        """Seconds from ``since_s`` to the end of the first acknowledged attempt in ``partition`` started after it."""
        ends = [a.ended_s for a in self.snapshot() if a.ok and a.partition == partition and a.started_s >= since_s]
        return min(ends) - since_s if ends else None

    def longest_ack_gap_s(self, partition: int) -> float:
        """The longest time ``partition`` went without an acknowledgement (between its first and last one)."""
        ends = sorted(a.ended_s for a in self.snapshot() if a.ok and a.partition == partition)
        return max((b - a for a, b in zip(ends, ends[1:])), default=0.0)

    def error_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.snapshot():
            if a.error_type:
                counts[a.error_type] = counts.get(a.error_type, 0) + 1
        return dict(sorted(counts.items()))


def _error_text(exc: BaseException) -> str:
    """"Name: message"; the bare class name only for meshq's own errors (``builtins.TimeoutError`` stays apart)."""
    cls = type(exc)
    name = cls.__name__ if cls.__module__.startswith("meshq") else f"{cls.__module__}.{cls.__qualname__}"
    return f"{name}: {exc}"


class SyncWriter(threading.Thread):
    """Produces unique values with ``produce`` (synchronous, acks=quorum by default) until stopped.

    After an error it sends the same value again (as an at-least-once application would) until it is
    acknowledged, so a value may be stored twice (counted as a duplicate, never a failure).
    """

    def __init__(self, client: Any, topic: str, name: str, log: WriteLog, *, partition: int | None = None,
                 keys: list[bytes] | None = None, acks: str = "quorum", timeout_s: float = 5.0,
                 pause_s: float = 0.003, error_pause_s: float = 0.05) -> None:
        super().__init__(name=f"test-writer-{name}", daemon=True)
        self.client, self.topic, self.writer, self.log = client, topic, name, log
        self.partition, self.keys, self.acks = partition, keys, acks
        self.timeout_s, self.pause_s, self.error_pause_s = timeout_s, pause_s, error_pause_s
        self.stopping = threading.Event()

    def run(self) -> None:
        seq = 0
        index = 0
        while not self.stopping.is_set():
            value = b"%s-%07d" % (self.writer.encode(), index)
            key = self.keys[index % len(self.keys)] if self.keys else None
            self.log.sent(value)
            while not self.stopping.is_set():
                started = time.monotonic()
                try:
                    md = self.client.produce(self.topic, value, key=key, partition=self.partition, acks=self.acks,
                                             timeout=self.timeout_s)
                except Exception as exc:  # MeshqError expected while faulty; anything else is reported by the check
                    self.log.record(Attempt(self.writer, seq, value, started, time.monotonic(), None, None,
                                            _error_text(exc)))
                    seq += 1
                    self.stopping.wait(self.error_pause_s)
                    continue
                self.log.record(Attempt(self.writer, seq, value, started, time.monotonic(), md.partition, md.offset,
                                        None))
                seq += 1
                break
            index += 1
            if self.pause_s:
                self.stopping.wait(self.pause_s)

    def stop(self) -> None:
        self.stopping.set()


class AsyncWriter(SyncWriter):
    """Like ``SyncWriter`` but pipelined: rounds of ``window`` ``produce_async`` calls, then waits for all of them.

    Values that failed are sent again in a later round (new attempts, later ``seq``).
    """

    def __init__(self, *args: Any, window: int = 50, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.window = window

    def run(self) -> None:
        seq = 0
        index = 0
        resend: list[tuple[bytes, bytes | None]] = []
        while not self.stopping.is_set():
            round_: list[tuple[int, bytes, float, Any]] = []
            for _ in range(self.window):
                if resend:
                    value, key = resend.pop(0)
                else:
                    value = b"%s-%07d" % (self.writer.encode(), index)
                    key = self.keys[index % len(self.keys)] if self.keys else None
                    index += 1
                    self.log.sent(value)
                started = time.monotonic()
                try:
                    future = self.client.produce_async(self.topic, value, key=key, partition=self.partition,
                                                       acks=self.acks, timeout=self.timeout_s)
                except Exception as exc:
                    self.log.record(Attempt(self.writer, seq, value, started, time.monotonic(), None, None,
                                            _error_text(exc)))
                    resend.append((value, key))
                else:
                    round_.append((seq, value, started, (future, key)))
                seq += 1
            for attempt_seq, value, started, (future, key) in round_:
                try:
                    md = future.result(max(0.0, started + self.timeout_s + 20 - time.monotonic()))
                except MeshqError as exc:  # first: meshq.TimeoutError is also a builtins/concurrent TimeoutError
                    error = _error_text(exc)
                except concurrent.futures.TimeoutError:
                    error = f"{HUNG}: produce_async future not settled {self.timeout_s + 20:.0f} s after its call"
                except Exception as exc:
                    error = _error_text(exc)
                else:
                    self.log.record(Attempt(self.writer, attempt_seq, value, started, time.monotonic(),
                                            md.partition, md.offset, None))
                    continue
                self.log.record(Attempt(self.writer, attempt_seq, value, started, time.monotonic(), None, None, error))
                resend.append((value, key))
            if resend:
                self.stopping.wait(self.error_pause_s)
            elif self.pause_s:
                self.stopping.wait(self.pause_s)


def keys_covering(partitions: int, per_partition: int = 2, prefix: bytes = b"key") -> list[bytes]:
    """``per_partition`` keys for each of ``partitions`` partitions (keyed writers then reach every partition)."""
    keys: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
    index = 0
    while any(len(found) < per_partition for found in keys.values()):
        key = b"%s-%04d" % (prefix, index)
        found = keys[partition_for_key(key, partitions)]
        if len(found) < per_partition:
            found.append(key)
        index += 1
        assert index < 100_000, "no keys found for some partition"
    return [key for p in range(partitions) for key in keys[p]]


@dataclass
class WriteCheck:
    """What the drain found, compared with what the writers were told."""

    acked: int = 0
    records: int = 0
    lost: list[str] = field(default_factory=list)  # acknowledged, not at its acknowledged position
    unexpected: list[str] = field(default_factory=list)  # read back, never produced by the test
    duplicates: int = 0  # extra copies of a value (the test re-sent it after an error)
    duplicate_examples: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # a writer's acknowledged values out of order in a partition
    idempotence: list[str] = field(default_factory=list)  # a value stored more times than it was sent
    offsets: list[str] = field(default_factory=list)  # gaps, reorders, positions read twice, short drains
    bad_errors: list[str] = field(default_factory=list)  # errors outside MeshqError, or futures never settled
    stored_unacked: int = 0  # values stored though every attempt raised (allowed: an error means "maybe")
    # values stored more often than their calls that succeeded or raised TimeoutError/NotEnoughReplicasError (which
    # may come after the leader's append): so a call that raised another error (NotLeaderError, ...) did store its
    # record (reported, not failed)
    stored_despite_error: list[str] = field(default_factory=list)
    error_counts: dict[str, int] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        for label, items in (("LOST acknowledged writes", self.lost), ("UNEXPECTED records", self.unexpected),
                             ("ORDER violations", self.order), ("OFFSET problems", self.offsets),
                             ("IDEMPOTENCE violations (stored more often than sent)", self.idempotence),
                             ("BAD errors", self.bad_errors)):
            if items:
                out.append(f"{label} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        return out

    def summary(self) -> str:
        return (f"acked={self.acked} records={self.records} lost={len(self.lost)} unexpected={len(self.unexpected)} "
                f"duplicates={self.duplicates} stored_unacked={self.stored_unacked} order_violations={len(self.order)} "
                f"offset_problems={len(self.offsets)} stored_despite_other_error={len(self.stored_despite_error)} "
                f"errors={self.error_counts}")

    def errors_beyond_the_contract(self) -> dict[str, int]:
        """MeshqErrors other than the two SPEC §3.1 names for "could not reach the acks level in time" (reported)."""
        return {name: count for name, count in self.error_counts.items()
                if name not in ("NotEnoughReplicasError", "TimeoutError") and _is_meshq_error_name(name)}


def check_writes(attempts: Iterable[Attempt], produced: set[bytes], records: list[Any],
                 high_watermarks: dict[int, int] | None = None) -> WriteCheck:
    """Compare drained ``records`` (partition, offset, value) with the writers' attempts.

    Fails (in ``problems()``) on: an acknowledged value not read back at its acknowledged position; a record whose
    value no writer produced; one writer's acknowledged values in one partition stored out of the order they were
    sent; offsets of a partition not dense from 0 in delivery order (or not reaching ``high_watermarks``); a position
    delivered twice; an error that is not a ``MeshqError`` or a call that never returned. Counts duplicates.
    """
    attempts = list(attempts)
    check = WriteCheck(records=len(records))
    got: dict[tuple[int, int], bytes] = {}
    where: dict[bytes, list[tuple[int, int]]] = {}
    per_partition: dict[int, list[int]] = {}
    for r in records:
        position = (r.partition, r.offset)
        if position in got:
            check.offsets.append(f"position {position} delivered twice")
        got[position] = r.value
        where.setdefault(r.value, []).append(position)
        per_partition.setdefault(r.partition, []).append(r.offset)
    for partition, offsets in sorted(per_partition.items()):
        if offsets != list(range(len(offsets))):
            first_bad = next(i for i, o in enumerate(offsets) if o != i)
            check.offsets.append(f"partition {partition}: offsets not dense from 0 in order "
                                 f"(at index {first_bad}: {offsets[max(0, first_bad - 3):first_bad + 3]})")
    for partition, high_watermark in sorted((high_watermarks or {}).items()):
        count = len(per_partition.get(partition, []))
        if count != high_watermark:
            check.offsets.append(f"partition {partition}: drained {count} records, high watermark {high_watermark}")
    acked = [a for a in attempts if a.ok]
    check.acked = len(acked)
    acked_values = set()
    for a in acked:
        acked_values.add(a.value)
        position = (a.partition, a.offset)
        if got.get(position) != a.value:
            elsewhere = where.get(a.value, [])
            check.lost.append(f"{a.value.decode()} acked at {position} (writer {a.writer} seq {a.seq}); "
                              f"that position holds {got.get(position)!r}; the value is at {elsewhere or 'no position'}")
    calls: dict[bytes, int] = {}
    maybe_stored: dict[bytes, int] = {}
    outcomes: dict[bytes, list[str]] = {}
    for a in attempts:
        calls[a.value] = calls.get(a.value, 0) + 1
        if a.error_type in (None, "TimeoutError", "NotEnoughReplicasError"):  # both may follow the leader's append
            maybe_stored[a.value] = maybe_stored.get(a.value, 0) + 1
        outcomes.setdefault(a.value, []).append(f"{a.error_type or 'ok'}@{a.ended_s:.2f}")
    for value, positions in where.items():
        if value not in produced:
            check.unexpected.append(f"{value!r} at {positions[:3]}")
        if value in produced and len(positions) > maybe_stored.get(value, 0):
            check.stored_despite_error.append(f"{value.decode()} stored {len(positions)} times at {positions}; calls "
                                              f"ended {outcomes.get(value, [])}")
        if value in produced and len(positions) > 1:
            check.duplicates += len(positions) - 1
            if len(check.duplicate_examples) < 5:
                check.duplicate_examples.append(f"{value.decode()} at {positions} after calls ending "
                                                f"{outcomes.get(value, [])}")
            # the idempotent producer's own retries never store a record twice: one call, at most one copy
            if len(positions) > calls.get(value, 0):
                check.idempotence.append(f"{value.decode()} stored {len(positions)} times at {positions} but sent "
                                         f"in {calls.get(value, 0)} produce call(s)")
    check.stored_unacked = sum(1 for value in where if value in produced and value not in acked_values)
    by_writer_partition: dict[tuple[str, int], list[Attempt]] = {}
    for a in acked:
        by_writer_partition.setdefault((a.writer, a.partition), []).append(a)
    for (writer, partition), items in sorted(by_writer_partition.items()):
        items.sort(key=lambda a: a.seq)
        for before, after in zip(items, items[1:]):
            if after.offset <= before.offset:
                check.order.append(f"writer {writer} partition {partition}: {before.value.decode()} (seq {before.seq}) "
                                   f"acked at offset {before.offset}, later {after.value.decode()} (seq {after.seq}) "
                                   f"at offset {after.offset}")
    for a in attempts:
        if a.error is None:
            continue
        name = a.error_type or ""
        if name.startswith(HUNG) or not _is_meshq_error_name(name):
            check.bad_errors.append(f"{a.writer} seq {a.seq} {a.value.decode()}: {a.error}")
    counts: dict[str, int] = {}
    for a in attempts:
        if a.error_type:
            counts[a.error_type] = counts.get(a.error_type, 0) + 1
    check.error_counts = dict(sorted(counts.items()))
    return check


def _is_meshq_error_name(name: str) -> bool:
    import meshq.errors

    cls = getattr(meshq.errors, name, None)
    return isinstance(cls, type) and issubclass(cls, meshq.errors.MeshqError)


# -- partition state as the nodes report it ------------------------------------------------------------------------


def partitions_of(status: dict, topic: str) -> dict[int, dict]:
    return {p["partition"]: p for t in status.get("topics", []) if t["name"] == topic for p in t["partitions"]}


def replication_state(nodes: list[NodeProcess], topic: str, replication_factor: int = 3) -> dict[int, dict] | None:
    """Each partition of ``topic`` as its leader reports it, or None until it is settled.

    Settled: every node answers, every node names the same (non-null) leader for each partition, and that leader's
    own view has every one of ``replication_factor`` replicas in sync.
    """
    views: dict[str, dict[int, dict]] = {}
    for node in nodes:
        status = view(node)
        if status is None:
            return None
        views[status["node_id"]] = partitions_of(status, topic)
    if not all(views.values()) or len({tuple(sorted(v)) for v in views.values()}) != 1:
        return None
    state: dict[int, dict] = {}
    for partition in sorted(next(iter(views.values()))):
        leaders = {v[partition]["leader"] for v in views.values()}
        if len(leaders) != 1 or None in leaders:
            return None
        leader = leaders.pop()
        if leader not in views:
            return None
        mine = views[leader][partition]
        if len(mine["replicas"]) != replication_factor or set(mine["in_sync"]) != set(mine["replicas"]):
            return None
        state[partition] = mine
    return state


def describe_partitions(nodes: list[NodeProcess], topic: str) -> str:
    """Every node's own view of ``topic``'s partitions, for assertion messages."""
    lines = []
    for node in nodes:
        status = view(node)
        if status is None:
            lines.append(f"{node.seed}: no answer")
            continue
        parts = partitions_of(status, topic)
        text = ", ".join(f"p{p}: leader={d.get('leader')} epoch={d.get('epoch', '?')} role={d.get('role', '?')} "
                         f"in_sync={d.get('in_sync')} hw={d.get('high_watermark')} end={d.get('end_offset', '?')}"
                         for p, d in sorted(parts.items()))
        lines.append(f"{status['node_id']} @ {node.seed}: {text or 'topic unknown'}")
    return "\n".join(lines)


def wait_partition_acks(log: WriteLog, nodes: list[NodeProcess], topic: str, partitions: list[int], since_s: float,
                        count: int, timeout_s: float, what: str) -> None:
    """Wait until every partition of ``partitions`` has ``count`` acknowledged writes started after ``since_s``;
    on timeout, say what each got, the writers' errors and every node's view."""
    try:
        wait_until(lambda: all(log.acks_since(since_s, p) >= count for p in partitions), timeout_s, what, 0.1)
    except AssertionError as exc:
        got = {p: log.acks_since(since_s, p) for p in partitions}
        raise AssertionError(f"{exc}: acknowledged per partition {got}, errors {log.error_counts()}, "
                             f"last error {log.last_error()!r}\n{describe_partitions(nodes, topic)}") from None


def stop_cleanly(nodes: list[NodeProcess]) -> list[str]:
    """SIGTERM each node in turn and wait until it exits by itself (``NodeProcess.stop``: a deadline sized for a
    loaded machine); one problem per node that did not exit with code 0, saying how long it was given."""
    problems = []
    for node in nodes:
        result = node.stop()
        if not result.clean:
            problems.append(f"node {node_id(node)} did not stop cleanly: {result}; end of its log:\n"
                            f"{node.log_text()[-3000:]}")
    return problems


def stop_writers(writers: list[Any], join_s: float = 60.0, check: bool = True) -> None:
    """Stop the writer threads and wait for them; with ``check``, fail if one is still blocked."""
    for writer in writers:
        writer.stop()
    for writer in writers:
        writer.join(join_s)
    stuck = [w.name for w in writers if w.is_alive()]
    assert not check or not stuck, f"writers still blocked {join_s:.0f} s after being stopped: {stuck}"


def wait_replication_settled(nodes: list[NodeProcess], topic: str, timeout_s: float,
                             min_high_watermarks: dict[int, int] | None = None,
                             replication_factor: int = 3) -> dict[int, dict]:
    """Wait until ``replication_state`` is settled, each high watermark has reached ``min_high_watermarks``
    and two polls in a row (0.5 s apart) show the same high watermarks; returns the leaders' partition views."""
    minimum = min_high_watermarks or {}
    deadline = time.monotonic() + timeout_s
    previous: dict[int, int] | None = None
    last: dict[int, dict] | None = None
    first_look: str | None = None
    halfway_s = time.monotonic() + timeout_s / 2
    halfway_look: str | None = None
    while time.monotonic() < deadline:
        if first_look is None:
            first_look = describe_partitions(nodes, topic)
        if halfway_look is None and time.monotonic() >= halfway_s:
            halfway_look = describe_partitions(nodes, topic)
        last = replication_state(nodes, topic, replication_factor)
        if last is not None:
            marks = {p: d["high_watermark"] for p, d in last.items()}
            if all(marks.get(p, 0) >= m for p, m in minimum.items()) and marks == previous:
                return last
            previous = marks
        else:
            previous = None
        time.sleep(0.5)
    reached = {p: d["high_watermark"] for p, d in (last or {}).items()}
    raise AssertionError(f"replication of {topic} did not settle within {timeout_s} s (every replica in sync, one "
                         f"leader everywhere, high watermarks >= the acknowledged offsets {minimum}, last seen "
                         f"{reached or 'unsettled'}); each node's own view at the start of the wait:\n"
                         f"{first_look}\nhalfway:\n{halfway_look}\nat the end:\n{describe_partitions(nodes, topic)}")


def drain(client: Any, topic: str, high_watermarks: dict[int, int], timeout_s: float) -> list[Any]:
    """Read ``topic`` from the earliest offset (no group) until every partition reaches its high watermark,
    then one more short poll (anything past the high watermark shows up there and fails the check)."""
    def open_consumer():
        try:
            return client.consumer(topic, start="earliest", timeout=5)
        except MeshqError:
            return None

    consumer = wait_until(open_consumer, 30, f"a consumer of {topic}", 0.5)
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while (any(consumer.position(p) < hw for p, hw in high_watermarks.items())
               and time.monotonic() < deadline):
            try:
                records.extend(consumer.poll(timeout=0.5, max_records=10_000))
            except MeshqError:
                time.sleep(0.2)
        records.extend(consumer.poll(timeout=1.0, max_records=10_000))
    finally:
        consumer.close()
    return records


def check_topic_after_writes(client: Any, nodes: list[NodeProcess], topic: str, log: WriteLog, settle_timeout_s: float,
                             replication_factor: int = 3) -> tuple[WriteCheck, list[str], dict[int, dict]]:
    """After the writers stopped: wait until every replica is in sync and the high watermarks cover every
    acknowledged write, drain the topic, compare it with ``log``, then stop ``nodes`` (SIGTERM: they must exit 0) and
    compare every replica's log on disk below the high watermark. Returns the check, every problem found (empty
    when all is well) and the leaders' partition views."""
    attempts = log.snapshot()
    acked_end: dict[int, int] = {}
    for a in attempts:
        if a.ok:
            acked_end[a.partition] = max(acked_end.get(a.partition, 0), a.offset + 1)
    state = wait_replication_settled(nodes, topic, timeout_s=settle_timeout_s, min_high_watermarks=acked_end,
                                     replication_factor=replication_factor)
    high_watermarks = {p: d["high_watermark"] for p, d in state.items()}
    records = drain(client, topic, high_watermarks, timeout_s=60)
    check = check_writes(attempts, log.produced, records, high_watermarks)
    problems = check.problems()
    problems += stop_cleanly(nodes)  # SIGTERM: a clean stop flushes and exits 0
    logs, replica_problems = check_replicas_identical({node_id(n): n.data_dir for n in nodes}, topic, state)
    problems += replica_problems
    problems += check_logs_hold_records(logs, topic, records, high_watermarks)
    return check, problems, state


# -- replica logs on disk ------------------------------------------------------------------------------------------


@dataclass
class ReplicaLog:
    """The whole batches of one replica covering offsets [0, end_offset), read from a stopped node's data dir."""

    node_id: str
    batches: list[bytes]
    log_end_offset: int
    recovery: list[str]  # what opening the (copied) log had to repair; empty after a clean stop


def partition_dir(data_dir: str, topic: str, partition: int) -> str:
    """Where a node keeps one partition's segment files (``meshq.log.segmented`` layout)."""
    return os.path.join(data_dir, "topics", f"{topic}-{partition}")


def partitions_on_disk(data_dir: str, topic: str) -> set[int]:
    """The partitions of ``topic`` that a node keeps a directory for."""
    root = os.path.join(data_dir, "topics")
    prefix = f"{topic}-"
    names = os.listdir(root) if os.path.isdir(root) else []
    return {int(name[len(prefix):]) for name in names if name.startswith(prefix) and name[len(prefix):].isdigit()}


def read_replica_log(data_dir: str, topic: str, partition: int, end_offset: int, node_id: str = "?") -> ReplicaLog:
    """Whole batches holding offsets [0, ``end_offset``) of one replica, byte for byte as stored.

    The partition directory is copied first and the copy opened with ``SegmentedLog`` (recovery, CRC checks and
    all): opening runs recovery, which may cut a torn tail, and the node's own files stay untouched as evidence.
    """
    source = partition_dir(data_dir, topic, partition)
    if not os.path.isdir(source):
        raise AssertionError(f"replica {node_id} ({data_dir}) holds no log for {topic}-{partition}")
    with tempfile.TemporaryDirectory(prefix="meshq-replica-") as scratch:
        copy = os.path.join(scratch, f"{topic}-{partition}")
        shutil.copytree(source, copy)
        log = SegmentedLog(copy, topic, partition)
        try:
            recovery = [f"{r}" for r in log.recovery]
            if log.start_offset != 0:
                raise AssertionError(f"replica {node_id}: {topic}-{partition} starts at offset {log.start_offset}, "
                                     f"not 0")
            if log.end_offset < end_offset:
                raise AssertionError(f"replica {node_id}: {topic}-{partition} holds offsets up to "
                                     f"{log.end_offset - 1} only, below the high watermark {end_offset}")
            batches: list[bytes] = []
            offset = 0
            while offset < end_offset:
                data = log.read(offset, 1 << 20)
                progressed = False
                for position, header in iter_batches(data):
                    if header.base_offset >= end_offset:
                        break
                    if header.base_offset != offset:
                        raise AssertionError(f"replica {node_id}: {topic}-{partition} batch at {header.base_offset} "
                                             f"where offset {offset} was expected")
                    batches.append(bytes(data[position:position + header.size]))
                    offset = header.next_offset
                    progressed = True
                if not progressed:
                    raise AssertionError(f"replica {node_id}: {topic}-{partition} read at offset {offset} returned "
                                         f"no whole batch")
            return ReplicaLog(node_id, batches, log.end_offset, recovery)
        finally:
            log.close()


def _batch_label(batch: bytes) -> str:
    header = parse_header(batch)
    return (f"base_offset={header.base_offset} epoch={header.leader_epoch} records={header.record_count} "
            f"bytes={header.size} crc={header.crc:08x} producer={header.producer_id}/{header.base_sequence}")


def compare_replicas(logs: list[ReplicaLog], topic: str, partition: int) -> list[str]:
    """Differences between replica logs of one partition (empty when they are byte-identical)."""
    problems = []
    reference = logs[0]
    for other in logs[1:]:
        if other.batches == reference.batches:
            continue
        count = min(len(other.batches), len(reference.batches))
        index = next((i for i in range(count) if other.batches[i] != reference.batches[i]), count)
        ref_label = _batch_label(reference.batches[index]) if index < len(reference.batches) else "no batch"
        other_label = _batch_label(other.batches[index]) if index < len(other.batches) else "no batch"
        problems.append(f"{topic}-{partition}: replicas {reference.node_id} and {other.node_id} differ at batch "
                        f"#{index} ({reference.node_id}: {ref_label}; {other.node_id}: {other_label}); "
                        f"{len(reference.batches)} vs {len(other.batches)} batches below the high watermark")
    return problems


def check_replicas_identical(data_dirs: dict[str, str], topic: str, partitions: dict[int, dict]
                             ) -> tuple[dict[int, list[ReplicaLog]], list[str]]:
    """Read every replica of every partition (``partitions``: {p: {"replicas", "high_watermark", "leader"}}) from
    ``data_dirs`` ({node_id: data dir} of STOPPED nodes); returns the logs (leader first) and the differences."""
    logs: dict[int, list[ReplicaLog]] = {}
    problems: list[str] = []
    for partition, info in sorted(partitions.items()):
        high_watermark = info["high_watermark"]
        order = sorted(info["replicas"], key=lambda nid: nid != info.get("leader"))  # leader first
        replica_logs = []
        for replica in order:
            if replica not in data_dirs:
                problems.append(f"{topic}-{partition}: replica {replica} is not one of the test's nodes")
                continue
            try:
                replica_logs.append(read_replica_log(data_dirs[replica], topic, partition, high_watermark, replica))
            except AssertionError as exc:
                problems.append(str(exc))
        logs[partition] = replica_logs
        if len(replica_logs) > 1:
            problems.extend(compare_replicas(replica_logs, topic, partition))
    return logs, problems


def check_logs_hold_records(logs: dict[int, list[ReplicaLog]], topic: str, records: list[Any],
                            high_watermarks: dict[int, int]) -> list[str]:
    """The leader's stored batches below each high watermark decode to exactly the drained records."""
    problems = []
    drained: dict[int, list[tuple[int, bytes]]] = {}
    for r in records:
        drained.setdefault(r.partition, []).append((r.offset, r.value))
    for partition, replica_logs in sorted(logs.items()):
        if not replica_logs:
            continue
        high_watermark = high_watermarks[partition]
        stored = [(r.offset, r.value) for r in decode_records(b"".join(replica_logs[0].batches), topic, partition)
                  if r.offset < high_watermark]
        mine = sorted(drained.get(partition, []))
        if stored != mine:
            differ = next((i for i, (a, b) in enumerate(zip(stored, mine)) if a != b), min(len(stored), len(mine)))
            problems.append(f"{topic}-{partition}: the log on disk of {replica_logs[0].node_id} ({len(stored)} records "
                            f"below the high watermark {high_watermark}) differs from what the consumer read "
                            f"({len(mine)} records) at index {differ}")
    return problems


def append_torn_tail(data_dir: str, topic: str, partition: int, rng: random.Random, kind: str) -> tuple[str, int]:
    """Append a torn tail to the newest segment of a (stopped) replica: ``kind`` is "partial" (the first bytes of a
    copy of the last batch, stamped with the next offset) or "garbage" (random bytes). Returns (file, bytes)."""
    directory = partition_dir(data_dir, topic, partition)
    segments = sorted(name for name in os.listdir(directory) if name.endswith(".log"))
    if not segments:
        raise AssertionError(f"{directory} holds no segment to tear")
    newest = os.path.join(directory, segments[-1])
    last_batch: bytes | None = None
    for name in reversed(segments):
        with open(os.path.join(directory, name), "rb") as f:
            content = f.read()
        whole = list(iter_batches(content))
        if whole:
            position, header = whole[-1]
            last_batch = stamp(content[position:position + header.size], header.next_offset, header.leader_epoch)
            break
    if kind == "partial" and last_batch is not None:
        tail = last_batch[:rng.randrange(HEADER_SIZE, len(last_batch))]
    else:
        tail = rng.randbytes(rng.randrange(1, 300))
    with open(newest, "ab") as f:
        f.write(tail)
    return newest, len(tail)


def keygen(*args: str) -> None:
    """``meshq keygen ARGS`` (a key set, or ``DIR --client NAME``); fails the test with its stderr."""
    from tests.procs import run_cli

    done = run_cli("keygen", *args, timeout_s=60)
    assert done.returncode == 0, done.stderr.decode()


def keyed_mesh(mesh: Any, *clients: str) -> tuple[Any, str, list]:
    """(mesh, key set dir, 3 keyed storage nodes, RF 3, 2 partitions); ``clients`` are added with
    ``keygen --client`` while the nodes run (a key granted later is accepted without restarts)."""
    import os

    keys = os.path.join(mesh.root, "keys")
    keygen(keys)
    extra = ["--keys", os.path.join(keys, "cluster"), "--replication-factor", "3", "--partitions", "2"]
    first = mesh.start(1, extra=extra)
    nodes = first + mesh.start(2, seeds=first, extra=extra)
    for name in clients:
        keygen(keys, "--client", name)
    return mesh, keys, nodes


def keyed_client(mesh: Any, nodes: Iterable[Any], keys_dir: str) -> Any:
    """A started and ready client node with the client keys in ``keys_dir``, seeded with ``nodes``."""
    import meshq

    node = meshq.Node(cluster=mesh.cluster, role="client", mdns=False, seeds=[n.seed for n in nodes], keys=keys_dir)
    node.start()
    try:
        node.wait_ready(timeout=30)
    except BaseException:
        node.stop()
        raise
    return node


def received(subscription: Any, data: bytes, wait_s: float = 0.3) -> bool:
    """True once ``subscription`` delivers a message carrying ``data``; False when nothing more arrives
    within ``wait_s`` (a pub/sub subscription of an embedded node)."""
    try:
        while True:
            if subscription.recv(timeout=wait_s).data == data:
                return True
    except MeshqError:
        return False
