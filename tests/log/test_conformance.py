"""One contract, two implementations: every test here runs on MemoryStorage and FileStorage."""

from __future__ import annotations

import random

import pytest

from meshq.core.batch import decode_records, iter_batches, parse_header
from meshq.errors import InvalidTopicError, OffsetOutOfRangeError, UsageError
from meshq.log import LogStore, Storage
from tests.log.helpers import batch_for, fill, make_batch, read_all


def test_both_implementations_satisfy_the_protocols(harness):
    storage = harness.open()
    assert isinstance(storage, Storage)
    assert isinstance(storage.open_log("t", 0), LogStore)


def test_new_log_is_empty(harness):
    log = harness.open().open_log("orders", 3)
    assert (log.start_offset, log.end_offset, log.size_bytes, log.synced_offset) == (0, 0, 0, 0)
    assert log.read(0, 1024) == b""
    assert log.offset_for_timestamp(0) == 0
    assert log.recovery == []
    assert (log.topic, log.partition) == ("orders", 3)


def test_append_and_read_round_trip_with_dense_offsets(harness):
    log = harness.open().open_log("orders", 0)
    batches = fill(log, 20, seed=1)
    expected_offset = 0
    for batch in batches:
        header = parse_header(batch)
        assert header.base_offset == expected_offset
        expected_offset = header.next_offset
    assert log.end_offset == expected_offset
    assert log.size_bytes == sum(len(batch) for batch in batches)
    for offset in range(log.end_offset):
        assert log.read(offset, 0) == batch_for(batches, offset)
    records = decode_records(log.read(0, 1 << 20), "orders", 0)
    assert [record.offset for record in records] == list(range(log.end_offset))
    assert records[0].key == b"k0"


def test_append_returns_the_header(harness):
    log = harness.open().open_log("t", 0)
    batch = make_batch(0, 3, timestamp_ms=5_000)
    header = log.append(batch, now_ms=5_000)
    assert header == parse_header(batch)
    assert header.next_offset == 3 == log.end_offset


@pytest.mark.parametrize("base_offset", [1, 5, -1])
def test_append_rejects_a_batch_not_at_the_log_end(harness, base_offset):
    log = harness.open().open_log("t", 0)
    fill(log, 2)
    end, size = log.end_offset, log.size_bytes
    batch = make_batch(0)
    batch = bytes(batch[:0]) + (end + base_offset).to_bytes(8, "big", signed=True) + batch[8:]
    with pytest.raises(UsageError, match="not the log end offset"):
        log.append(batch)
    assert (log.end_offset, log.size_bytes) == (end, size)


def test_append_rejects_malformed_bytes(harness):
    log = harness.open().open_log("t", 0)
    batch = make_batch(0, 2)
    with pytest.raises(UsageError):
        log.append(b"\x00" * 10)
    with pytest.raises(UsageError, match="declares"):
        log.append(batch[:-1])
    with pytest.raises(UsageError, match="declares"):
        log.append(batch + b"x")
    assert (log.end_offset, log.size_bytes) == (0, 0)


def test_read_respects_max_bytes_in_whole_batches(harness):
    log = harness.open().open_log("t", 0)
    batches = [make_batch(0, 2, value_size=50)]
    for _ in range(4):
        batches.append(make_batch(parse_header(batches[-1]).next_offset, 2, value_size=50))
    for batch in batches:
        log.append(batch)
    one, two = len(batches[0]), len(batches[0]) + len(batches[1])
    assert log.read(0, 0) == batches[0]  # always at least one whole batch
    assert log.read(0, one - 1) == batches[0]
    assert log.read(0, one) == batches[0]
    assert log.read(0, two - 1) == batches[0]
    assert log.read(0, two) == batches[0] + batches[1]
    assert log.read(1, two) == batches[0] + batches[1]  # starts with the batch holding offset 1
    assert log.read(3, 1 << 20) == b"".join(batches[1:])
    assert log.read(log.end_offset - 1, 1 << 20) == batches[-1]


def test_read_out_of_range(harness):
    log = harness.open().open_log("t", 0)
    fill(log, 3)
    end = log.end_offset
    assert log.read(end, 100) == b""
    with pytest.raises(OffsetOutOfRangeError, match=f"valid offsets are 0 to {end}"):
        log.read(end + 1, 100)
    with pytest.raises(OffsetOutOfRangeError, match="offset -1 is out of range"):
        log.read(-1, 100)
    with pytest.raises(UsageError):
        log.read(0, -1)


def test_offset_for_timestamp(harness):
    log = harness.open(index_interval_bytes=64).open_log("t", 0)
    # Max timestamps per batch: 100, 300, 200 (producer clocks disagree), 400.
    timestamps = [[100, 90], [300], [150, 200], [400, 400, 399]]
    for batch_timestamps in timestamps:
        log.append(make_batch(log.end_offset, len(batch_timestamps), timestamps_ms=batch_timestamps))
    assert log.offset_for_timestamp(0) == 0
    assert log.offset_for_timestamp(100) == 0
    assert log.offset_for_timestamp(101) == 2
    assert log.offset_for_timestamp(200) == 2
    assert log.offset_for_timestamp(300) == 2
    assert log.offset_for_timestamp(301) == 5
    assert log.offset_for_timestamp(400) == 5
    assert log.offset_for_timestamp(401) == log.end_offset == 8


def test_offset_for_timestamp_across_segments(harness):
    log = harness.open(segment_bytes=400, index_interval_bytes=100).open_log("t", 0)
    batches = fill(log, 60, seed=3)  # timestamps 1000, 1010, ... one per batch
    assert len(log.segment_base_offsets) > 5
    for index in range(0, 60, 7):
        assert log.offset_for_timestamp(1_000 + 10 * index - 5) == parse_header(batches[index]).base_offset
    assert log.offset_for_timestamp(10**12) == log.end_offset


def test_truncate_to_boundary_then_append(harness):
    log = harness.open().open_log("t", 0)
    batches = fill(log, 10, seed=2)
    cut = parse_header(batches[6]).base_offset
    log.truncate_to(cut)
    assert log.end_offset == cut
    assert log.size_bytes == sum(len(batch) for batch in batches[:6])
    assert read_all(log) == b"".join(batches[:6])
    replacement = make_batch(cut, 2, leader_epoch=7)
    log.append(replacement)
    assert log.read(cut, 0) == replacement
    log.truncate_to(log.end_offset)  # a no-op
    log.truncate_to(0)
    assert (log.start_offset, log.end_offset, log.size_bytes) == (0, 0, 0)


def test_truncate_to_rejects_bad_offsets(harness):
    log = harness.open().open_log("t", 0)
    fill(log, 3, max_count=1)
    log.append(make_batch(log.end_offset, 3))
    end = log.end_offset
    for offset in (-1, end + 1, end - 1):
        with pytest.raises(UsageError):
            log.truncate_to(offset)
    assert log.end_offset == end


def test_truncate_across_segments(harness):
    log = harness.open(segment_bytes=300).open_log("t", 0)
    batches = fill(log, 40, seed=4)
    assert len(log.segment_base_offsets) > 4
    target = log.segment_base_offsets[2]
    log.truncate_to(target)
    assert log.end_offset == target
    assert log.segment_base_offsets[-1] == target  # the segment it started is kept, empty
    kept = [batch for batch in batches if parse_header(batch).base_offset < target]
    assert read_all(log) == b"".join(kept)
    more = fill(log, 5, seed=5)
    assert read_all(log) == b"".join(kept + more)


def test_roll_by_size_keeps_segments_under_the_limit(harness):
    log = harness.open(segment_bytes=500).open_log("t", 0)
    batches = fill(log, 50, seed=6)
    bases = log.segment_base_offsets
    assert bases[0] == 0 and bases == sorted(bases) and len(bases) > 5
    boundaries = {parse_header(batch).base_offset for batch in batches}
    assert set(bases) <= boundaries
    assert read_all(log, max_bytes=1 << 20) == b"".join(batches)


def test_roll_by_age(harness):
    log = harness.open(segment_ms=1_000).open_log("t", 0)
    log.append(make_batch(0), now_ms=10_000)
    log.append(make_batch(1), now_ms=10_999)
    assert log.segment_base_offsets == [0]
    log.append(make_batch(2), now_ms=11_000)
    assert log.segment_base_offsets == [0, 2]
    log.append(make_batch(3))  # no time given: no time-based roll
    assert log.segment_base_offsets == [0, 2]


def test_retention_by_bytes_deletes_oldest_sealed_segments(harness):
    log = harness.open(segment_bytes=400).open_log("t", 0)
    batches = fill(log, 40, seed=7)
    bases = log.segment_base_offsets
    before = log.size_bytes
    removed = log.apply_retention(now_ms=0, retention_bytes=before // 2, retention_ms=None)
    assert log.size_bytes <= before // 2
    assert log.start_offset == removed > 0
    assert log.start_offset in bases
    with pytest.raises(OffsetOutOfRangeError, match=f"valid offsets are {log.start_offset} to"):
        log.read(0, 100)
    kept = [batch for batch in batches if parse_header(batch).base_offset >= log.start_offset]
    assert read_all(log) == b"".join(kept)
    # Even a limit of zero never deletes the active segment.
    log.apply_retention(now_ms=0, retention_bytes=0, retention_ms=None)
    assert log.segment_base_offsets == [bases[-1]]
    assert log.start_offset == bases[-1]
    assert log.end_offset == parse_header(batches[-1]).next_offset


def test_retention_by_bytes_keeps_a_log_at_the_limit(harness):
    log = harness.open(segment_bytes=400).open_log("t", 0)
    fill(log, 20, seed=15)
    size = log.size_bytes
    assert log.apply_retention(now_ms=0, retention_bytes=size, retention_ms=None) == 0
    assert log.apply_retention(now_ms=0, retention_bytes=size - 1, retention_ms=None) > 0


def test_retention_by_age_boundary(harness):
    log = harness.open(segment_bytes=200).open_log("t", 0)
    fill(log, 20, seed=16, start_ms=0)
    oldest_max_ms = parse_header(log.read(log.segment_base_offsets[1] - 1, 0)).max_timestamp_ms
    # A segment is deleted only when its newest record is strictly older than now - retention.
    assert log.apply_retention(now_ms=oldest_max_ms + 100, retention_bytes=None, retention_ms=100) == 0
    assert log.apply_retention(now_ms=oldest_max_ms + 101, retention_bytes=None, retention_ms=100) > 0


def test_retention_by_age(harness):
    log = harness.open(segment_bytes=400).open_log("t", 0)
    fill(log, 40, seed=8, start_ms=1_000)  # batch i has timestamps near 1000 + 10 i
    bases = log.segment_base_offsets
    assert log.apply_retention(now_ms=1_000, retention_bytes=None, retention_ms=1_000) == 0
    assert log.apply_retention(now_ms=10**9, retention_bytes=None, retention_ms=None) == 0
    # Everything is older than a day at now = 10**9, but the active segment stays.
    removed = log.apply_retention(now_ms=10**9, retention_bytes=None, retention_ms=86_400_000)
    assert removed == bases[-1] == log.start_offset
    assert log.read(log.start_offset, 0)


def test_retention_by_age_stops_at_the_first_young_segment(harness):
    log = harness.open(segment_bytes=300).open_log("t", 0)
    fill(log, 30, seed=9, start_ms=0)
    bases = log.segment_base_offsets
    # The segment starting at bases[1] holds batches younger than this cutoff.
    read = log.read(bases[1], 0)
    cutoff = parse_header(read).max_timestamp_ms + 1
    log.apply_retention(now_ms=cutoff + 100, retention_bytes=None, retention_ms=100)
    assert log.start_offset in (bases[1], bases[2])
    assert log.start_offset <= bases[2]


def test_reads_span_segments_identically(harness):
    log = harness.open(segment_bytes=256, index_interval_bytes=50).open_log("t", 0)
    batches = fill(log, 30, seed=10)
    rng = random.Random(10)
    for _ in range(50):
        offset = rng.randrange(log.end_offset)
        max_bytes = rng.randrange(2_000)
        data = log.read(offset, max_bytes)
        headers = [header for _, header in iter_batches(data)]
        assert headers[0].base_offset <= offset < headers[0].next_offset
        assert len(headers) == 1 or len(data) <= max_bytes
        start = batches.index(batch_for(batches, offset))
        assert data == b"".join(batches[start : start + len(headers)])
        following = start + len(headers)
        if following < len(batches):
            assert len(data) + len(batches[following]) > max_bytes  # as many as fit


def test_sync_advances_synced_offset(harness):
    log = harness.open().open_log("t", 0)
    batches = fill(log, 3)
    assert log.synced_offset == 0
    log.sync()
    assert log.synced_offset == log.end_offset
    synced = log.synced_offset
    fill(log, 2, seed=1)
    assert log.synced_offset == synced
    second = parse_header(batches[1]).base_offset
    log.truncate_to(second)
    assert log.synced_offset == second


def test_restart_keeps_synced_data(harness):
    storage = harness.open(segment_bytes=300)
    log = storage.open_log("t", 1)
    batches = fill(log, 30, seed=11)
    log.sync()
    bases = log.segment_base_offsets
    storage = harness.restart()
    log = storage.open_log("t", 1)
    assert log.recovery == []
    assert log.start_offset == 0
    assert log.end_offset == log.synced_offset == parse_header(batches[-1]).next_offset
    assert log.segment_base_offsets == bases
    assert read_all(log) == b"".join(batches)
    more = fill(log, 3, seed=12)
    assert read_all(log) == b"".join(batches + more)


def test_restart_after_retention_and_truncation(harness):
    storage = harness.open(segment_bytes=300)
    log = storage.open_log("t", 0)
    batches = fill(log, 40, seed=13)
    log.apply_retention(now_ms=0, retention_bytes=log.size_bytes // 2, retention_ms=None)
    log.truncate_to(log.segment_base_offsets[-1])
    log.sync()
    state = (log.start_offset, log.end_offset, log.size_bytes, log.segment_base_offsets, read_all(log))
    log = harness.restart().open_log("t", 0)
    assert (log.start_offset, log.end_offset, log.size_bytes, log.segment_base_offsets, read_all(log)) == state
    assert state[4] == b"".join(b for b in batches if state[0] <= parse_header(b).base_offset < state[1])


def test_log_emptied_by_retention_keeps_its_offsets(harness):
    storage = harness.open(segment_bytes=200)
    log = storage.open_log("t", 0)
    fill(log, 20, seed=14)
    last_base = log.segment_base_offsets[-1]
    log.truncate_to(last_base)
    log.apply_retention(now_ms=0, retention_bytes=0, retention_ms=None)
    assert log.start_offset == log.end_offset == last_base
    log.sync()
    log = harness.restart().open_log("t", 0)
    assert log.start_offset == log.end_offset == last_base  # offsets are never reused
    log.append(make_batch(last_base))
    assert log.read(last_base, 0) == make_batch(last_base)


def test_open_log_returns_the_open_log(harness):
    storage = harness.open()
    assert storage.open_log("t", 0) is storage.open_log("t", 0)
    assert storage.open_log("t", 0) is not storage.open_log("t", 1)


def test_closed_log_refuses_work(harness):
    storage = harness.open()
    log = storage.open_log("t", 0)
    fill(log, 2)
    log.close()
    log.close()  # idempotent
    with pytest.raises(UsageError, match="closed"):
        log.append(make_batch(0))
    reopened = storage.open_log("t", 0)
    assert reopened is not log
    assert reopened.end_offset > 0


def test_logs_listing_and_delete(harness):
    storage = harness.open()
    for topic, partition in [("b", 1), ("a-b", 10), ("a-b", 2), ("b", 0)]:
        fill(storage.open_log(topic, partition), 1)
    assert storage.logs() == [("a-b", 2), ("a-b", 10), ("b", 0), ("b", 1)]
    storage.delete_log("a-b", 10)
    storage.delete_log("nope", 0)  # deleting a missing log is fine
    assert storage.logs() == [("a-b", 2), ("b", 0), ("b", 1)]
    fresh = storage.open_log("a-b", 10)
    assert fresh.end_offset == 0
    storage = harness.restart()
    assert storage.logs() == [("a-b", 2), ("a-b", 10), ("b", 0), ("b", 1)]


@pytest.mark.parametrize("topic", ["", ".hidden", "a/b", "..", "a\0b", "x" * 201, "tab\there"])
def test_unsafe_topic_names_are_refused(harness, topic):
    storage = harness.open()
    with pytest.raises(InvalidTopicError):
        storage.open_log(topic, 0)


def test_negative_partition_is_refused(harness):
    with pytest.raises(InvalidTopicError):
        harness.open().open_log("t", -1)


def test_meta_round_trip(harness):
    storage = harness.open()
    assert storage.read_meta("membership") is None
    value = {"epoch": 3, "members": ["a", "b"], "blob": b"\x00\xff", 7: {"nested": None}}
    storage.write_meta("membership", value)
    assert storage.read_meta("membership") == value
    storage.write_meta("membership", {"epoch": 4})
    assert storage.read_meta("membership") == {"epoch": 4}
    storage = harness.restart()
    assert storage.read_meta("membership") == {"epoch": 4}


@pytest.mark.parametrize("name", ["", ".x", "a/b", "a\0"])
def test_meta_names_are_checked(harness, name):
    storage = harness.open()
    with pytest.raises(UsageError):
        storage.write_meta(name, {})
    with pytest.raises(UsageError):
        storage.read_meta(name)


def test_meta_must_be_an_encodable_dict(harness):
    storage = harness.open()
    with pytest.raises(UsageError):
        storage.write_meta("m", [1, 2])
    with pytest.raises(UsageError):
        storage.write_meta("m", {"x": object()})
    assert storage.read_meta("m") is None


def test_bad_options_are_refused(harness):
    with pytest.raises(UsageError, match="segment_bytes"):
        harness.open(segment_bytes=0)


def test_restart_at_drops_everything_and_continues_past_the_end_durably(harness):
    log = harness.open(segment_bytes=300).open_log("t", 0)
    fill(log, 20, seed=6)
    end = log.end_offset
    for offset in (end, end - 1, -1, "9"):
        with pytest.raises(UsageError):
            log.restart_at(offset)
    assert log.end_offset == end
    log.restart_at(end + 50)
    assert (log.start_offset, log.end_offset, log.size_bytes) == (end + 50, end + 50, 0)
    assert log.synced_offset == end + 50
    batch = make_batch(end + 50, 3)
    log.append(batch)
    log.sync()
    assert read_all(log) == batch
    log = harness.restart().open_log("t", 0)
    assert (log.start_offset, log.end_offset) == (end + 50, end + 53)
    assert read_all(log) == batch
