"""produce_async's per-record futures (meshq.producer.RecordFuture): real Futures that share their
buffer's Condition and build their RecordMetadata lazily.

The first tests drive the Accumulator with a runtime stand-in that only collects what is handed to
it, so each settle is explicit; the last ones use a real in-process node."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import pytest

import meshq
from meshq.core.events import ProduceCommand
from meshq.core.records import RecordMetadata
from meshq.errors import NotEnoughReplicasError
from meshq.producer import Accumulator, RecordFuture

pytestmark = pytest.mark.timeout(60)


class _Clock:
    def now_s(self) -> float:
        return 100.0


class _Runtime:
    """Collects the commands and the linger timers the accumulator hands over."""

    def __init__(self) -> None:
        self.commands: list[ProduceCommand] = []
        self.timers: list = []

    def submit(self, item) -> None:
        self.commands.append(item)

    def call_later(self, delay_s: float, task) -> None:
        self.timers.append(task)


def _accumulator(batch_max_records: int = 1000) -> tuple[Accumulator, _Runtime]:
    runtime = _Runtime()
    return Accumulator(runtime, _Clock(), 0.002, batch_max_records), runtime


def _record(i: int) -> tuple:
    return None, f"v{i}".encode(), None, 1000 + i


def test_each_future_reads_its_own_slot_of_its_stored_batch():
    acc, runtime = _accumulator()
    futures = [acc.append("t", _record(i), None, "quorum", 5.0) for i in range(6)]
    assert all(isinstance(f, cf.Future) and not f.done() for f in futures)
    acc.flush_all()
    (command,) = runtime.commands
    assert [r[1] for r in command.records] == [f"v{i}".encode() for i in range(6)]
    # the runtime split the buffer over two partitions (records without a key, no partition given)
    command.waiter.settle([0, 2, 4], [command.records[i] for i in (0, 2, 4)], "t", 3, 40, None)
    assert [f.done() for f in futures] == [True, False, True, False, True, False]
    assert acc.tracker.outstanding == 1, "half settled: flush() still waits"
    command.waiter.settle([1, 3, 5], [command.records[i] for i in (1, 3, 5)], "t", 5, 7, None)
    assert acc.tracker.outstanding == 0
    assert [f.result(0) for f in futures] == [
        RecordMetadata("t", 3, 40, 1000), RecordMetadata("t", 5, 7, 1001), RecordMetadata("t", 3, 41, 1002),
        RecordMetadata("t", 5, 8, 1003), RecordMetadata("t", 3, 42, 1004), RecordMetadata("t", 5, 9, 1005)]
    assert "RecordMetadata" in repr(futures[0])


def test_an_error_reaches_every_future_of_the_failed_part_only():
    acc, runtime = _accumulator()
    futures = [acc.append("t", _record(i), 1, "quorum", 5.0) for i in range(4)]
    acc.flush_all()
    (command,) = runtime.commands
    error = NotEnoughReplicasError("1 of 3 replicas in sync; acks=quorum needs 2")
    command.waiter.settle([0, 1], command.records[:2], "t", 1, 10, None)
    command.waiter.settle([2, 3], command.records[2:], "t", 1, -1, error)
    assert futures[1].result(0).offset == 11
    for future in futures[2:]:
        assert future.exception(0) is error
        with pytest.raises(NotEnoughReplicasError):
            future.result(0)
    assert acc.tracker.outstanding == 0


def test_wait_as_completed_callbacks_and_cancel_work_on_shared_condition_futures():
    acc, runtime = _accumulator()
    futures = [acc.append("t", _record(i), 0, "leader", 5.0) for i in range(5)]
    called: list = []
    futures[0].add_done_callback(lambda f: called.append(("early", f.result().offset)))
    assert futures[4].cancel() and futures[4].cancelled()
    done, pending = cf.wait(futures[:4], timeout=0)
    assert not done and len(pending) == 4
    with pytest.raises(cf.TimeoutError):
        futures[1].result(timeout=0.01)

    waited: dict = {}

    def waiter() -> None:
        waited["done"], waited["pending"] = cf.wait(futures[:4], timeout=10, return_when=cf.ALL_COMPLETED)
        waited["results"] = [f.result(timeout=10).offset for f in futures[:4]]

    thread = threading.Thread(target=waiter)
    thread.start()
    acc.flush_all()
    (command,) = runtime.commands
    blocked = threading.Event()

    def result_waiter() -> None:
        blocked.set()
        waited["as_completed"] = sorted(f.result().offset for f in cf.as_completed(futures[:4], timeout=10))

    second = threading.Thread(target=result_waiter)
    second.start()
    blocked.wait(5)
    command.waiter.settle(range(5), command.records, "t", 0, 20, None)
    thread.join(10)
    second.join(10)
    assert not thread.is_alive() and not second.is_alive()
    assert len(waited["done"]) == 4 and not waited["pending"]
    assert waited["results"] == waited["as_completed"] == [20, 21, 22, 23]
    assert called == [("early", 20)]
    futures[1].add_done_callback(lambda f: called.append(("late", f.result().offset)))
    assert called[-1] == ("late", 21)
    assert futures[4].cancelled(), "a cancelled record stays cancelled when its batch is stored"
    with pytest.raises(cf.CancelledError):
        futures[4].result(0)
    assert acc.tracker.outstanding == 0


def test_buffers_reach_the_runtime_in_sealing_order_and_flush_counts_them_at_once():
    acc, runtime = _accumulator(batch_max_records=3)
    futures = [acc.append("t", _record(i), 2, "quorum", 5.0) for i in range(7)]
    assert [len(c.records) for c in runtime.commands] == [3, 3], "full buffers are sealed on append"
    assert acc.tracker.outstanding == 2
    runtime.timers[-1]()  # the linger timer of the last buffer fires on the runtime thread
    batch = acc.submit_batch("t", [_record(9)], 2, "quorum", 5.0)
    assert [len(c.records) for c in runtime.commands] == [3, 3, 1, 1]
    assert runtime.commands[2].records[0][1] == b"v6" and runtime.commands[3].records[0][1] == b"v9"
    for command, base in zip(runtime.commands, (0, 3, 6, 7)):
        command.waiter.settle(range(len(command.records)), command.records, "t", 2, base, None)
    assert [f.result(0).offset for f in futures] == list(range(7))
    assert batch.result(0)[0].offset == 7
    assert acc.tracker.outstanding == 0
    assert isinstance(futures[0], RecordFuture)


# --------------------------------------------------------------- a real node


@pytest.fixture
def node(tmp_path):
    with meshq.Node(cluster="pa", data_dir=tmp_path / "data", mdns=False, partitions=4,
                    replication_factor=1) as n:
        yield n


def test_every_future_gets_its_partition_and_offset_in_produce_order(node):
    node.create_topic("many", partitions=4)
    keys = [f"k{i % 7}".encode() for i in range(3000)]
    futures = [node.produce_async("many", f"v{i}".encode(), key=keys[i]) for i in range(3000)]
    node.flush(timeout=20)
    assert all(f.done() for f in futures), "flush() returns once every record is settled"
    metas = [f.result(0) for f in futures]
    by_partition: dict[int, list[int]] = {}
    for meta in metas:
        by_partition.setdefault(meta.partition, []).append(meta.offset)
    for offsets in by_partition.values():
        assert offsets == list(range(len(offsets))), "per partition: dense offsets in produce order"
    stored = {}
    consumer = node.consumer("many")
    while len(stored) < 3000:
        records = consumer.poll(timeout=5)
        assert records, "every acknowledged record is readable"
        stored.update({(r.partition, r.offset): (r.key, r.value) for r in records})
    for i, meta in enumerate(metas):
        assert stored[(meta.partition, meta.offset)] == (keys[i], f"v{i}".encode())


def test_a_failing_batch_fails_every_one_of_its_futures(node):
    node.create_topic("two", partitions=2)
    futures = [node.produce_async("two", b"x", partition=9, timeout=5) for _ in range(2500)]  # > one batch
    node.flush(timeout=20)
    errors = [f.exception(0) for f in futures]
    assert all(isinstance(e, meshq.UsageError) and "partition 9 does not exist" in str(e) for e in errors)
    good = [node.produce_async("two", b"y", partition=0) for _ in range(10)]
    node.flush(timeout=20)
    assert [f.result(0).offset for f in good] == list(range(10)), "the failed records stored nothing"


def test_stop_settles_records_still_buffered(tmp_path):
    n = meshq.Node(cluster="pa2", data_dir=tmp_path / "d", mdns=False, partitions=2, replication_factor=1,
                   linger_s=30.0)
    n.start()
    try:
        n.create_topic("late", partitions=2)
        futures = [n.produce_async("late", f"v{i}".encode(), partition=1) for i in range(20)]
        assert not any(f.done() for f in futures), "30 s linger: still buffered"
    finally:
        n.stop()
    assert [f.result(0).offset for f in futures] == list(range(20)), "stop() flushes what is buffered"
