"""A full disk at the log layer: ENOSPC and EDQUOT in every write leave the log and its state
files consistent, and ``check_space`` measures the free-space reserve (issue 19, item 8)."""

from __future__ import annotations

import errno
import os

import pytest

from meshq.core.batch import encode_batch, stamp
from meshq.errors import ConfigError, DiskFullError, StorageFullError
from meshq.log import FileStorage, MemoryStorage
from meshq.log.fileio import TMP_SUFFIX
from tests.log.helpers import fill, make_batch, read_all


def _fail_writes(monkeypatch, error: int, after: int = 0) -> list:
    """Let ``after`` os.write calls through, then store half of one and fail the next with ``error``."""
    real_write = os.write
    calls = []

    def write(fd, data):
        calls.append(fd)
        if len(calls) <= after:
            return real_write(fd, data)
        if len(calls) == after + 1:
            return real_write(fd, bytes(data)[: max(1, len(data) // 2)])
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "write", write)
    return calls


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT])
def test_a_quota_or_a_full_disk_mid_append_is_undone_and_raises_disk_full(tmp_path, monkeypatch, error):
    storage = FileStorage(tmp_path, min_free_bytes=0)
    log = storage.open_log("t", 0)
    batches = fill(log, 4, seed=3)
    end, size = log.end_offset, log.size_bytes
    batch = make_batch(end, 3, value_size=300)
    _fail_writes(monkeypatch, error)
    with pytest.raises(DiskFullError, match="nothing was stored") as caught:
        log.append(batch)
    monkeypatch.undo()
    assert isinstance(caught.value, StorageFullError)
    assert (log.end_offset, log.size_bytes) == (end, size)
    assert read_all(log) == b"".join(batches)  # still readable, still writable
    log.append(batch)
    storage.close()
    reopened = FileStorage(tmp_path, min_free_bytes=0)
    assert reopened.open_log("t", 0).recovery == []  # nothing torn was left behind
    reopened.close()


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EDQUOT])
def test_a_meta_write_that_finds_the_disk_full_keeps_the_old_version_and_no_tmp_file(tmp_path, monkeypatch, error):
    storage = FileStorage(tmp_path, min_free_bytes=0)
    storage.write_meta("replica.t.0", {"epoch": 3})
    _fail_writes(monkeypatch, error)
    with pytest.raises(DiskFullError, match="previous version is kept"):
        storage.write_meta("replica.t.0", {"epoch": 4, "pad": "x" * 10_000})
    monkeypatch.undo()
    assert storage.read_meta("replica.t.0") == {"epoch": 3}
    assert not [n for n in os.listdir(tmp_path / "meta") if n.endswith(TMP_SUFFIX)]
    storage.write_meta("replica.t.0", {"epoch": 4})
    assert storage.read_meta("replica.t.0") == {"epoch": 4}
    storage.close()


def test_compaction_that_finds_the_disk_full_keeps_the_log_usable(tmp_path, monkeypatch):
    storage = FileStorage(tmp_path, segment_bytes=4096, min_free_bytes=0)
    log = storage.open_log("t", 0)
    for offset in range(40):
        log.append(stamp(encode_batch([(b"k%d" % (offset % 3), b"v" * 300, None, 1_000)]), offset, 0))
    before = read_all(log)
    _fail_writes(monkeypatch, errno.ENOSPC)
    with pytest.raises(DiskFullError):
        log.compact(log.end_offset, 0, None)
    monkeypatch.undo()
    assert read_all(log) == before  # nothing rewritten, nothing failed for good
    log.append(make_batch(log.end_offset, 1, value_size=10))
    result = log.compact(log.end_offset, 0, None)
    assert result.records_removed > 0
    storage.close()


def test_check_space_compares_the_free_space_with_the_reserve(tmp_path):
    roomy = FileStorage(tmp_path / "a", min_free_bytes=0)
    assert roomy.check_space() is None
    roomy.close()
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    tight = FileStorage(tmp_path / "b", min_free_bytes=free * 4 + (1 << 40))
    reason = tight.check_space()
    assert reason is not None and "below the reserve" in reason and "--min-free-bytes" in reason
    tight.close()


def test_the_memory_twin_measures_its_reserve_the_same_way():
    storage = MemoryStorage(capacity_bytes=10_000, min_free_bytes=4_000)
    assert storage.check_space() is None
    log = storage.open_log("t", 0)
    log.append(make_batch(0, 1, value_size=7_000))
    assert "below the reserve" in storage.check_space()
    storage.set_capacity(None)
    assert storage.check_space() is None


@pytest.mark.parametrize("value", [-1, 1.5, "1"])
def test_a_bad_reserve_is_refused(tmp_path, value):
    with pytest.raises(ConfigError, match="min_free_bytes"):
        MemoryStorage(min_free_bytes=value)
    with pytest.raises(ConfigError, match="min_free_bytes"):
        FileStorage(tmp_path, min_free_bytes=value)
