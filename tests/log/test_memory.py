"""The memory twin as a simulated disk: crash() is power loss, capacity_bytes a full disk."""

from __future__ import annotations

import pytest

from meshq.core.batch import parse_header
from meshq.errors import DiskFullError, UsageError
from meshq.log import MemoryStorage
from tests.log.helpers import fill, make_batch, read_all


def test_crash_drops_what_was_not_synced():
    storage = MemoryStorage(segment_bytes=300)
    log = storage.open_log("t", 0)
    synced = fill(log, 10, seed=1)
    log.sync()
    fill(log, 20, seed=2)  # rolls several segments, never synced
    storage.crash()
    with pytest.raises(UsageError, match="closed"):
        log.append(make_batch(log.end_offset))
    log = storage.open_log("t", 0)
    assert log.end_offset == log.synced_offset == parse_header(synced[-1]).next_offset
    assert read_all(log) == b"".join(synced)
    assert log.segment_base_offsets[-1] <= log.end_offset


def test_crash_keeps_a_truncation():
    storage = MemoryStorage()
    log = storage.open_log("t", 0)
    batches = fill(log, 10, seed=3)
    log.sync()
    cut = parse_header(batches[4]).base_offset
    log.truncate_to(cut)
    storage.crash()
    assert read_all(storage.open_log("t", 0)) == b"".join(batches[:4])


def test_crash_of_a_never_synced_log_leaves_it_empty():
    storage = MemoryStorage()
    fill(storage.open_log("t", 0), 5)
    storage.crash()
    log = storage.open_log("t", 0)
    assert (log.start_offset, log.end_offset, log.size_bytes) == (0, 0, 0)


def test_capacity_makes_the_disk_full():
    storage = MemoryStorage(capacity_bytes=1_000)
    log = storage.open_log("t", 0)
    fill(log, 5, seed=4, value_size=20)
    state = (log.end_offset, log.size_bytes)
    with pytest.raises(DiskFullError):
        log.append(make_batch(log.end_offset, value_size=2_000))
    assert (log.end_offset, log.size_bytes) == state
    assert storage.used_bytes == log.size_bytes


def test_delete_log_kills_the_open_handle():
    storage = MemoryStorage()
    log = storage.open_log("t", 0)
    fill(log, 2)
    storage.delete_log("t", 0)
    with pytest.raises(UsageError):
        log.read(0, 10)
    assert storage.logs() == []


def test_closed_storage_refuses_work():
    storage = MemoryStorage()
    storage.close()
    with pytest.raises(UsageError):
        storage.open_log("t", 0)
