"""Shared helpers of the log tests: batch builders and a harness over both storages."""

from __future__ import annotations

import os
import random

from meshq.core.batch import encode_batch, iter_batches, parse_header, stamp
from meshq.log import FileStorage, MemoryStorage


def make_batch(
    base_offset: int,
    count: int = 1,
    *,
    timestamp_ms: int = 1_000,
    value_size: int = 10,
    rng: random.Random | None = None,
    leader_epoch: int = 0,
    timestamps_ms: list[int] | None = None,
) -> bytes:
    """A verified-looking batch stamped at ``base_offset``, as the leader would append it."""
    rng = rng or random.Random(base_offset)
    if timestamps_ms is None:
        timestamps_ms = [timestamp_ms + index for index in range(count)]
    records = [
        (
            f"k{base_offset + index}".encode(),
            rng.randbytes(value_size),
            {"n": str(base_offset + index).encode()} if index % 2 else None,
            timestamps_ms[index],
        )
        for index in range(count)
    ]
    return stamp(encode_batch(records), base_offset, leader_epoch)


def fill(
    log, batches: int, *, seed: int = 0, max_count: int = 3, value_size: int = 40, start_ms: int = 1_000
) -> list[bytes]:
    """Append ``batches`` random batches; return them in order."""
    rng = random.Random(seed)
    appended = []
    for index in range(batches):
        batch = make_batch(
            log.end_offset,
            rng.randint(1, max_count),
            timestamp_ms=start_ms + 10 * index,
            value_size=rng.randint(0, value_size),
            rng=rng,
        )
        log.append(batch, now_ms=start_ms + 10 * index)
        appended.append(batch)
    return appended


def batch_for(batches: list[bytes], offset: int) -> bytes:
    """The batch holding ``offset``."""
    for batch in batches:
        header = parse_header(batch)
        if header.base_offset <= offset < header.next_offset:
            return batch
    raise KeyError(offset)


def read_all(log, max_bytes: int = 1 << 30) -> bytes:
    """Every byte of the log from its start, read in one call per chunk."""
    out = []
    offset = log.start_offset
    while offset < log.end_offset:
        data = log.read(offset, max_bytes)
        out.append(data)
        last = None
        position = 0
        while position < len(data):
            last = parse_header(data, position)
            position += last.size
        offset = last.next_offset
    return b"".join(out)


class Harness:
    """Opens one kind of storage and 'restarts' it: files close and reopen, memory crashes."""

    def __init__(self, kind: str, directory: str) -> None:
        self.kind = kind
        self.directory = directory
        self.options: dict = {}
        self.storage = None

    def open(self, **options):
        self.options = options
        if self.kind == "memory":
            self.storage = MemoryStorage(**options)
        else:
            self.storage = FileStorage(self.directory, **options)
        return self.storage

    def restart(self):
        """A restart: files close (clean) and reopen; the memory twin crashes (keeps the synced)."""
        if self.kind == "memory":
            self.storage.crash()
        else:
            self.storage.close()
            self.storage = FileStorage(self.directory, **self.options)
        return self.storage

    def close(self) -> None:
        if self.storage is not None and self.kind == "file":
            self.storage.close()


def file_size(path: str) -> int:
    return os.stat(path).st_size


def read_readable(log, max_bytes: int = 1 << 30) -> bytes:
    """Every byte the log serves from its start, stepping over its lost offset ranges."""
    out = []
    offset = log.start_offset
    lost = {first: last for first, last in log.lost_offsets}
    while offset < log.end_offset:
        if offset in lost:
            offset = lost[offset] + 1
            continue
        data = log.read(offset, max_bytes)
        out.append(data)
        for _position, header in iter_batches(data):
            offset = header.next_offset
    return b"".join(out)
