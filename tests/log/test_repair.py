"""Issue #19 item 1 at the log: the scrub finds a damaged batch in a sealed segment, and
``repair`` writes a replica's intact copy back into place, byte-identical."""

from __future__ import annotations

import os
import random

import pytest

from meshq.core.batch import HEADER_SIZE, parse_header
from meshq.errors import CorruptLogError
from meshq.log import FileStorage
from tests.log.helpers import make_batch
from tests.log.test_segmented import _pick_flip_position, segment_paths, write_log

SEGMENT_BYTES = 800


def _scrub_all(log, max_bytes: int = 300) -> None:
    """One whole pass over the sealed segments, in slices of ``max_bytes``."""
    offset = log.start_offset
    while True:
        offset = log.scrub(offset, max_bytes)
        if offset == log.start_offset:
            return


def _flip(path: str, position: int) -> None:
    data = bytearray(open(path, "rb").read())
    data[position] ^= 0x40
    open(path, "wb").write(data)


def _sealed_batch(tmp_path, batches):
    """A batch in the middle of the second segment, and its file and byte position there."""
    path = segment_paths(tmp_path)[1]
    base = int(os.path.basename(path)[:20])
    in_segment = [b for b in batches if parse_header(b).base_offset >= base]
    position = len(in_segment[0])
    return in_segment[1], path, position


def test_scrub_detects_and_repair_restores_the_same_bytes(tmp_path):
    batches = write_log(tmp_path, 40, seed=1, segment_bytes=SEGMENT_BYTES)
    damaged, path, position = _sealed_batch(tmp_path, batches)
    header = parse_header(damaged)
    original = open(path, "rb").read()
    storage = FileStorage(tmp_path, segment_bytes=SEGMENT_BYTES)
    log = storage.open_log("t", 0)
    _flip(path, position + HEADER_SIZE + 2)  # under the running log, as a bit rot would
    assert log.corrupt_batches_detected == 0
    _scrub_all(log)
    assert log.corrupt_batches_detected == 1
    assert log.lost_offsets == [(header.base_offset, header.last_offset)]
    with pytest.raises(CorruptLogError, match=f"offsets {header.base_offset} to {header.last_offset}"):
        log.read(header.base_offset, 1 << 20)
    _scrub_all(log)
    assert log.corrupt_batches_detected == 1  # a known lost range is not counted twice
    # The repair answer may carry more than the gap: only the lost offsets are written.
    assert log.repair(b"".join(batches)) == 1
    assert log.corrupt_batches_repaired == 1 and log.lost_offsets == []
    assert open(path, "rb").read() == original
    assert log.read(header.base_offset, 0) == damaged
    storage.close()
    storage = FileStorage(tmp_path, segment_bytes=SEGMENT_BYTES)
    log = storage.open_log("t", 0)
    assert log.lost_offsets == [] and log.recovery == []
    assert log.read(0, 1 << 30) == b"".join(batches)
    storage.close()


def test_damage_found_on_restart_is_repaired_into_place(tmp_path):
    batches = write_log(tmp_path, 40, seed=2, segment_bytes=SEGMENT_BYTES)
    damaged, path, position = _sealed_batch(tmp_path, batches)
    header = parse_header(damaged)
    original = open(path, "rb").read()
    _flip(path, position + HEADER_SIZE + 1)
    storage = FileStorage(tmp_path, segment_bytes=SEGMENT_BYTES)
    log = storage.open_log("t", 0)
    _scrub_all(log)  # recovery checks only the active segment's CRCs; the scrub finds the rest
    assert log.corrupt_batches_detected == 1
    assert log.lost_offsets == [(header.base_offset, header.last_offset)]
    assert log.repair(damaged) == 1
    assert open(path, "rb").read() == original
    assert log.read(0, 1 << 30) == b"".join(batches)
    assert (log.corrupt_batches_detected, log.corrupt_batches_repaired) == (1, 1)
    storage.close()


def test_repair_refuses_damaged_foreign_or_unneeded_batches(tmp_path):
    batches = write_log(tmp_path, 40, seed=3, segment_bytes=SEGMENT_BYTES)
    damaged, path, position = _sealed_batch(tmp_path, batches)
    header = parse_header(damaged)
    _flip(path, position + HEADER_SIZE + 1)
    storage = FileStorage(tmp_path, segment_bytes=SEGMENT_BYTES)
    log = storage.open_log("t", 0)
    _scrub_all(log)
    state_file = os.path.join(log.directory, "log-state.msgpack")
    state = open(state_file, "rb").read()
    bad = bytearray(damaged)
    bad[HEADER_SIZE + 1] ^= 1
    assert log.repair(bytes(bad)) == 0  # fails its CRC: never written
    assert log.repair(batches[0]) == 0  # not lost here
    bigger = make_batch(header.base_offset, header.record_count + 5)
    assert log.repair(bigger) == 0  # reaches past the lost range
    assert log.lost_offsets == [(header.base_offset, header.last_offset)]
    assert open(state_file, "rb").read() == state
    assert log.corrupt_batches_repaired == 0
    storage.close()


@pytest.mark.parametrize("seed", range(12))
def test_random_damage_in_sealed_segments_is_repaired_from_a_copy(tmp_path, seed):
    rng = random.Random(seed)
    batches = write_log(tmp_path, 60, seed=seed, segment_bytes=SEGMENT_BYTES)
    paths = segment_paths(tmp_path)
    storage = FileStorage(tmp_path, segment_bytes=SEGMENT_BYTES)
    log = storage.open_log("t", 0)
    for path in rng.sample(paths[:-1], 2):
        # may hit a header (offsets then uncertain); never the leader epoch, which no CRC covers
        _flip(path, _pick_flip_position(rng, open(path, "rb").read()))
    _scrub_all(log)
    lost = log.lost_offsets
    log.repair(b"".join(batches))
    assert log.corrupt_batches_repaired <= log.corrupt_batches_detected
    if lost and log.corrupt_batches_detected == len(lost):
        assert log.lost_offsets == [] and log.corrupt_batches_repaired == len(lost)
    storage.close()
    # Whatever the damage, after a restart (recovery) and a repair the log is the original.
    storage = FileStorage(tmp_path, segment_bytes=SEGMENT_BYTES)
    log = storage.open_log("t", 0)
    log.repair(b"".join(batches))
    assert log.lost_offsets == []
    assert log.read(0, 1 << 30) == b"".join(batches)
    storage.close()


def test_memory_log_scrub_and_repair_match_the_file_log():
    from meshq.log import MemoryStorage

    storage = MemoryStorage(segment_bytes=SEGMENT_BYTES)
    log = storage.open_log("t", 0)
    batches = [make_batch(log.end_offset + 0, 1)]
    log.append(batches[0])
    while len(log.segment_base_offsets) < 4:
        batches.append(make_batch(log.end_offset, 2, value_size=60))
        log.append(batches[-1])
    disk = storage._disks[("t", 0)]  # the simulated disk: flip a bit as the simulator's fault does
    segment = disk.segments[1]
    damaged = bytearray(segment.batches[1])
    damaged[HEADER_SIZE + 3] ^= 0x10
    segment.batches[1] = bytes(damaged)
    header = segment.headers[1]
    _scrub_all(log)
    assert log.lost_offsets == [(header.base_offset, header.last_offset)]
    assert log.corrupt_batches_detected == 1
    with pytest.raises(CorruptLogError):
        log.read(header.base_offset, 1 << 20)
    assert log.repair(b"".join(batches)) == 1
    assert log.lost_offsets == [] and log.corrupt_batches_repaired == 1
    assert log.read(0, 1 << 30) == b"".join(batches)
    storage.close()
