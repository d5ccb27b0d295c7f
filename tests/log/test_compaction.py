"""Compaction (``LogStore.compact``) and lost offset ranges, on both stores."""

from __future__ import annotations

import random

import pytest

from meshq.core.batch import COMPACTED_GAP, decode_records, encode_batch, iter_batches, parse_header, stamp
from meshq.errors import CorruptLogError, UsageError
from tests.log.helpers import read_readable

HOUR_MS = 3600 * 1000


def append_records(log, records, now_ms=1_000):
    """Append each (key, value, timestamp_ms) as a one-record batch; return their offsets."""
    offsets = []
    for key, value, timestamp_ms in records:
        batch = stamp(encode_batch([(key, value, None, timestamp_ms)]), log.end_offset, 0)
        offsets.append(log.append(batch, now_ms=now_ms).base_offset)
    return offsets


def served(log):
    """``{offset: (key, value)}`` of every record the log serves."""
    return {r.offset: (r.key, r.value) for r in decode_records(read_readable(log), "t", 0)}


def test_keeps_the_latest_record_per_key_and_the_offsets(harness):
    log = harness.open(segment_bytes=1_000).open_log("t", 0)
    rng = random.Random(1)
    written = [(f"k{rng.randrange(20)}".encode(), rng.randbytes(8), 5_000) for _ in range(400)]
    append_records(log, written)
    end = log.end_offset
    before = served(log)
    active_base = log.segment_base_offsets[-1]
    result = log.compact(end, 10_000, HOUR_MS)
    assert result.records_removed > 300 and result.segments_rewritten > 0
    after = served(log)
    assert log.end_offset == end  # offsets are never reused
    latest = {}
    for offset, (key, _value) in sorted(before.items()):
        latest[key] = offset
    for offset, record in after.items():
        assert before[offset] == record  # the same record at the same offset
    for offset, record in before.items():
        if offset >= active_base or latest[record[0]] == offset:
            assert after[offset] == record  # the active segment and every key's latest record stay
        else:
            assert offset not in after
    # A reader starting in a removed record gets the next kept one; gaps are marked in the batches.
    gap = next(o for o in range(log.start_offset, end) if o not in after)
    first = parse_header(log.read(gap, 1))
    assert first.base_offset > gap and first.attributes & COMPACTED_GAP
    # Nothing new to do: the next call is cheap and changes nothing.
    assert log.compact(end, 10_000, HOUR_MS).records_removed == 0
    # It survives a restart, and the log stays appendable.
    log = harness.restart().open_log("t", 0)
    assert served(log) == after and log.end_offset == end
    assert append_records(log, [(b"k1", b"new", 6_000)]) == [end]


def test_never_compacts_at_or_above_the_limit(harness):
    log = harness.open(segment_bytes=500).open_log("t", 0)
    append_records(log, [(b"same", bytes([i]) * 8, 1_000) for i in range(100)])
    before = served(log)
    limit = log.segment_base_offsets[1]  # only the first segment lies below it
    log.compact(limit, 2_000, HOUR_MS)
    after = served(log)
    assert {o: r for o, r in before.items() if o >= limit} == {o: r for o, r in after.items() if o >= limit}
    # below the limit only the latest record below it counts: later ones could still be taken back
    assert [o for o in after if o < limit] == [limit - 1]


def test_tombstones_go_after_delete_retention(harness):
    log = harness.open(segment_bytes=400).open_log("t", 0)
    append_records(log, [(b"a", b"1", 1_000), (b"b", b"1", 1_000), (b"a", b"", 2_000)])
    append_records(log, [(b"pad", bytes(20), 3_000) for _ in range(40)])
    end = log.end_offset
    log.compact(end, 2_000 + HOUR_MS - 1, HOUR_MS)
    assert (b"a", b"") in served(log).values() and (b"b", b"1") in served(log).values()
    log.compact(end, 2_001 + HOUR_MS, HOUR_MS)  # now the tombstone is old enough: key a is gone
    keys = {key for key, _value in served(log).values()}
    assert b"a" not in keys and b"b" in keys
    log.compact(end, 10**12, None)  # None: tombstones are kept forever (nothing left to drop here)
    assert b"b" in {key for key, _value in served(log).values()}


def test_a_follower_copies_compacted_batches_with_their_gaps(harness):
    storage = harness.open(segment_bytes=600)
    leader, follower = storage.open_log("t", 0), storage.open_log("t", 1)
    append_records(leader, [(f"k{i % 5}".encode(), bytes([i]), 1_000) for i in range(200)])
    leader.compact(leader.end_offset, 2_000, HOUR_MS)
    offset = leader.start_offset
    if offset > 0:  # compaction emptied the first segments: a follower restarts there (replica.py)
        follower.restart_at(offset)
    while offset < leader.end_offset:
        data = leader.read(offset, 4096)
        for position, header in iter_batches(data):
            follower.append(data[position:position + header.size])
            offset = header.next_offset
    assert follower.end_offset == leader.end_offset
    assert served(follower) == served(leader)
    follower.sync()
    follower = harness.restart().open_log("t", 1)
    assert served(follower) == {o: r for o, r in served(harness.storage.open_log("t", 0)).items()}


def test_a_gap_is_refused_unless_compaction_made_it(harness):
    log = harness.open().open_log("t", 0)
    append_records(log, [(b"k", b"v", 1_000)])
    with pytest.raises(UsageError, match="not the log end offset"):
        log.append(stamp(encode_batch([(b"k", b"v", None, 1_000)]), 5, 0))
    log.append(stamp(encode_batch([(b"k", b"v", None, 1_000)], attributes=COMPACTED_GAP), 5, 0))
    assert log.end_offset == 6


def test_a_crc_failure_found_on_read_is_remembered_as_lost(harness):
    log = harness.open().open_log("t", 0)
    append_records(log, [(b"k", bytes([i]) * 30, 1_000) for i in range(5)])
    if harness.kind == "memory":
        segment = harness.storage._disks[("t", 0)].segments[0]  # reach in, as the simulator does
        damaged = bytearray(segment.batches[2])
        damaged[-3] ^= 0x10
        segment.batches[2] = bytes(damaged)
    else:
        path = f"{harness.directory}/topics/t-0/{0:020d}.log"
        data = bytearray(open(path, "rb").read())
        size = parse_header(bytes(data)).size
        data[3 * size - 3] ^= 0x10  # all five batches have the same size
        open(path, "wb").write(data)
    assert log.read(0, 1 << 20) == log.read(0, 1 << 20)  # serves offsets 0..1, stops before the damage
    with pytest.raises(CorruptLogError, match="offsets 2 to 2 are unreadable"):
        log.read(2, 1 << 20)
    assert log.lost_offsets == [(2, 2)]
    assert sorted(served(log)) == [0, 1, 3, 4]
    assert log.end_offset == 5


def test_shrinks_many_updates_to_about_one_record_per_key(harness):
    """Issue #19 item 5: 200,000 updates of 1,000 keys (smaller segments keep it quick)."""
    log = harness.open(segment_bytes=256 * 1024).open_log("t", 0)
    rng = random.Random(7)
    batch_records = 1_000
    for start in range(0, 200_000, batch_records):
        records = [(b"key-%d" % rng.randrange(1_000), b"value-%d" % (start + i), None, 1_000 + start)
                   for i in range(batch_records)]
        log.append(stamp(encode_batch(records), log.end_offset, 0), now_ms=1_000)
    end = log.end_offset
    log.compact(end, 10_000, HOUR_MS)
    kept = served(log)
    in_active = sum(1 for offset in kept if offset >= log.segment_base_offsets[-1])
    assert len(kept) - in_active <= 1_000  # the sealed segments hold at most one record per key
    assert len(kept) <= 1_000 + batch_records * 2
    assert log.end_offset == end


def test_an_idempotent_producers_last_batch_is_kept_whole(harness):
    log = harness.open(segment_bytes=500).open_log("t", 0)
    sequence = 0
    for i in range(3):  # producer 7 writes three batches of two records, then falls silent
        batch = encode_batch([(b"a", b"p%d" % i, None, 1_000), (b"b", b"p%d" % i, None, 1_000)],
                             producer_id=7, producer_epoch=0, base_sequence=sequence)
        log.append(stamp(batch, log.end_offset, 0))
        sequence += 2
    last_base = log.end_offset - 2
    append_records(log, [(b"a", b"later", 2_000) for _ in range(30)])  # supersedes key a
    log.compact(log.end_offset, 3_000, HOUR_MS)
    kept = served(log)
    assert kept[last_base] == (b"a", b"p2") and kept[last_base + 1] == (b"b", b"p2")
    header = parse_header(log.read(last_base, 1))
    assert (header.producer_id, header.base_sequence, header.last_sequence) == (7, 4, 5)
    assert last_base - 2 not in kept  # the producer's earlier batches are compacted as usual


def test_the_producer_table_is_rebuilt_past_lost_offsets(harness):
    from meshq.core.partition import PartitionState

    log = harness.open().open_log("t", 0)
    for sequence in range(4):
        batch = encode_batch([(b"k", bytes([sequence]) * 30, None, 1_000)], producer_id=3, producer_epoch=0,
                             base_sequence=sequence)
        log.append(stamp(batch, log.end_offset, 2))
    if harness.kind == "memory":
        segment = harness.storage._disks[("t", 0)].segments[0]  # reach in, as the simulator does
        damaged = bytearray(segment.batches[1])
        damaged[-3] ^= 0x10
        segment.batches[1] = bytes(damaged)
    else:
        path = f"{harness.directory}/topics/t-0/{0:020d}.log"
        data = bytearray(open(path, "rb").read())
        data[2 * parse_header(bytes(data)).size - 3] ^= 0x10
        open(path, "wb").write(data)
    with pytest.raises(CorruptLogError):
        log.read(1, 1 << 20)
    state = PartitionState("t", 0, log)
    assert [batch[1] for batch in state.producers[3].batches] == [0, 2, 3]  # sequences after the damage too
    assert state.batch_epochs == [(2, 0)]
