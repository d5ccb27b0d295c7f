"""A calling thread's producer and one synchronous produce's retries
(meshq.core.client.direct), driven by hand."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.client.direct import (
    DONE,
    FAILED,
    PAUSING,
    READY,
    REFRESHING,
    RETRY_PAUSE_S,
    WAITING,
    ThreadProducer,
    answer_of,
    leader_silent,
    silent_leader_error,
)
from meshq.core.hashing import partition_for_key
from meshq.errors import (
    NotEnoughReplicasError,
    NotLeaderError,
    OutOfOrderSequenceError,
    ProducerFencedError,
    ProtocolError,
    TimeoutError,
    UsageError,
)

RECORD = (None, b"value", None, 1_000)


def producer(seed: int = 1) -> ThreadProducer:
    return ThreadProducer(random.Random(seed))


def call(thread: ThreadProducer, deadline_s: float = 10.0, partition: int = 0):
    started = thread.start("t", partition, RECORD, "quorum", deadline_s, request_timeout_s=2.0, max_bytes=1 << 20)
    assert started is not None
    return started


def test_each_thread_draws_its_producer_id_from_the_rng_it_is_handed():
    assert producer(1).producer_id == producer(1).producer_id != producer(2).producer_id
    assert 0 <= producer(1).producer_id < 1 << 62


def test_partitions_by_key_sticky_keyless_and_checked_when_asked_for():
    thread = producer()
    assert thread.partition_for("t", b"k", None, 8) == partition_for_key(b"k", 8)
    first = thread.partition_for("t", None, None, 3)
    assert [thread.partition_for("t", None, None, 3) for _ in range(3)] == [(first + i) % 3 for i in (1, 2, 3)]
    assert thread.partition_for("t", None, 2, 3) == 2
    with pytest.raises(UsageError, match="partition 3 does not exist"):
        thread.partition_for("t", None, 3, 3)


def test_the_batch_carries_the_threads_id_epoch_and_sequence_and_large_ones_are_not_for_this_path():
    thread = producer()
    header = batch_format.parse_header(call(thread).data)
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (thread.producer_id, 0, 0)
    assert thread.start("t", 0, (None, b"x" * 2000, None, 0), "quorum", 10.0, 2.0, max_bytes=1000) is None


def test_an_acknowledged_call_advances_the_sequence():
    thread = producer()
    first = call(thread)
    request_id, body = first.attempt(now_s=1.0)
    assert first.state == WAITING and first.wait_until_s == 3.0 and first.expects(request_id)
    assert body == {"topic": "t", "partition": 0, "acks": "quorum", "timeout_ms": 9000}
    assert first.answered(41, now_s=1.1) == 41 and first.state == DONE
    assert thread.sequences == {("t", 0): 1} and thread.produced == 1 and thread.retries == 0
    second = call(thread)
    assert batch_format.parse_header(second.data).base_sequence == 1
    assert second.attempt(now_s=2.0)[0] == request_id + 1
    assert not second.expects(request_id), "an answer to an earlier call is not this call's"


def test_a_retriable_error_pauses_refreshes_and_sends_the_same_bytes_again():
    thread = producer()
    produce = call(thread)
    first_id, _ = produce.attempt(now_s=1.0)
    assert produce.answered(NotLeaderError("moved"), now_s=1.2) is None
    assert produce.state == PAUSING and produce.pause_until_s == pytest.approx(1.2 + RETRY_PAUSE_S)
    produce.resume()
    assert produce.state == REFRESHING
    produce.refreshed()
    assert produce.state == READY
    data = produce.data
    second_id, body = produce.attempt(now_s=1.3)
    assert produce.data is data and body["timeout_ms"] == 8700 and thread.retries == 1
    assert produce.expects(first_id) and produce.expects(second_id), "a late answer to the first attempt counts"
    assert produce.answered(5, now_s=1.4) == 5 and thread.sequences == {("t", 0): 1}


def test_no_answer_refreshes_without_a_pause_and_the_deadline_reports_an_unknown_fate():
    thread = producer()
    produce = call(thread, deadline_s=3.0)
    produce.attempt(now_s=0.0)
    assert produce.wait_until_s == 2.0
    assert produce.answered(None, now_s=2.0) is None and produce.state == REFRESHING
    produce.refreshed()
    produce.attempt(now_s=2.5)
    assert produce.wait_until_s == 3.0, "never past the call's deadline"
    produce.answered(None, now_s=3.0)
    with pytest.raises(TimeoutError, match="may or may not be stored. Last error: no answer"):
        produce.check_deadline(3.0)
    assert produce.state == FAILED


def test_a_call_that_never_reached_a_leader_reports_not_enough_replicas():
    produce = call(producer(), deadline_s=0.1)
    produce.check_deadline(0.0)
    produce.no_leader(now_s=0.08)
    assert produce.state == PAUSING and produce.pause_until_s == pytest.approx(0.1), "the pause ends at the deadline"
    produce.resume()
    with pytest.raises(NotEnoughReplicasError, match="nothing was sent"):
        produce.check_deadline(0.1)


def test_an_attempt_the_transport_refused_is_tried_again_without_a_refresh():
    produce = call(producer())
    produce.attempt(now_s=1.0)
    produce.unsent(NotLeaderError("not connected"), now_s=1.0)
    assert produce.state == PAUSING
    produce.resume()
    assert produce.state == READY


def test_a_non_retriable_answer_is_raised():
    produce = call(producer())
    produce.attempt(now_s=0.0)
    with pytest.raises(ProducerFencedError):
        produce.answered(ProducerFencedError("fenced"), now_s=0.1)
    assert produce.state == FAILED


@pytest.mark.parametrize("error", [OutOfOrderSequenceError("gap"), silent_leader_error("t", 0)])
def test_out_of_order_sequence_and_a_silent_leader_are_retried_after_a_refresh(error):
    produce = call(producer())
    produce.attempt(now_s=0.0)
    assert produce.answered(error, now_s=0.1) is None and produce.last_error is error
    produce.resume()
    assert produce.state == REFRESHING


def test_a_failed_call_starts_a_new_epoch_and_says_whether_the_metadata_is_stale():
    thread = producer()
    done = call(thread)
    done.attempt(0.0)
    done.answered(0, 0.1)
    unknown = call(thread)
    unknown.attempt(0.2)
    assert unknown.fail(TimeoutError("no answer")) is True
    assert thread.epoch == 1 and thread.sequences == {}, "the unknown batch is fenced by a new epoch"
    header = batch_format.parse_header(call(thread).data)
    assert (header.producer_epoch, header.base_sequence) == (1, 0)
    assert call(thread).fail(ProducerFencedError("fenced")) is False and thread.epoch == 2
    assert call(thread).fail(KeyboardInterrupt()) is True, "interrupted: its fate is unknown too"


def test_inputs_out_of_turn_are_our_bug():
    produce = call(producer())
    with pytest.raises(AssertionError):
        produce.answered(1, now_s=0.0)
    produce.attempt(0.0)
    with pytest.raises(AssertionError):
        produce.attempt(0.0)


def test_answers_read_as_an_offset_or_the_error_the_leader_reports():
    def message(type_: str, body: dict) -> wire.Message:
        return wire.Message(type_, "n1", 1, body)

    assert answer_of(message("produce_ok", {"topic": "t", "partition": 0, "base_offset": 9})) == 9
    error = answer_of(message("error", {"code": "not_leader", "message": "moved"}))
    assert isinstance(error, NotLeaderError) and str(error) == "moved"
    assert isinstance(answer_of(message("fetch_ok", {})), ProtocolError)


def test_a_leader_is_silent_when_unknown_or_no_longer_alive():
    members = {"n1": SimpleNamespace(state="alive"), "n2": SimpleNamespace(state="suspect")}
    assert leader_silent(None, "c1", members)
    assert leader_silent("n2", "c1", members)
    assert not leader_silent("n1", "c1", members)
    assert not leader_silent("n3", "c1", members), "not in the member table yet: unknown is not silent"
    assert not leader_silent("c1", "c1", members) and not leader_silent("n2", "c1", None)
