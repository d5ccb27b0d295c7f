"""What a partition log remembers beside its segment files: lost offsets and compacted segments.

Theory of operation
-------------------
Segment files hold nothing but batches; two facts about them cannot be derived from the
bytes and live in ``<log dir>/log-state.msgpack``, written to a ``.tmp`` file, fsynced and
renamed into place before the segment files change:

- ``lost``: offset ranges whose records were damaged on disk (``[first, last, reason]``).
  They are never served (a read raises ``CorruptLogError`` naming them) and never handed out
  again: the log end stays after them. Recovery finds most of them again from the bytes, but
  not all (a batch cut out of a file leaves only a gap), so they are kept here.
- ``compacted``: base offsets of the segments compaction rewrote. A gap between such a segment's
  last record and the next segment is records compaction removed; after any other segment it is
  records lost on disk.
"""

from __future__ import annotations

import os

from meshq.errors import CorruptLogError
from meshq.log.fileio import _fsync_directory, replace_file
from meshq.log.store import decode_meta, encode_meta

STATE_FILE = "log-state.msgpack"

LostRange = tuple[int, int, str]  # first offset, last offset (inclusive), why


def read_log_state(directory: str, log_name: str) -> tuple[list[LostRange], set[int]]:
    """The lost ranges and compacted segment bases stored in ``directory`` (none if absent)."""
    path = os.path.join(directory, STATE_FILE)
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return [], set()
    try:
        value = decode_meta(data)
        lost = [(int(first), int(last), str(reason)) for first, last, reason in value.get("lost", [])]
        compacted = {int(base) for base in value.get("compacted", [])}
    except (ValueError, TypeError) as exc:
        raise CorruptLogError(
            f"{log_name}: {path} is damaged ({exc}); move it away to open the log (its lost offset ranges "
            f"are then found again from the segment files where they still can be)"
        ) from None
    return merge_lost(lost), compacted


def write_log_state(directory: str, lost: list[LostRange], compacted: set[int]) -> None:
    """Replace the state file atomically and durably (raises ``OSError``)."""
    data = encode_meta(STATE_FILE, {"lost": [list(entry) for entry in lost], "compacted": sorted(compacted)})
    replace_file(os.path.join(directory, STATE_FILE), data)
    _fsync_directory(directory)


def merge_lost(ranges: list[LostRange]) -> list[LostRange]:
    """Sorted, with overlapping or touching ranges joined (the first reason kept)."""
    merged: list[LostRange] = []
    for first, last, reason in sorted(ranges):
        if first > last:
            continue
        if merged and first <= merged[-1][1] + 1:
            previous = merged[-1]
            merged[-1] = (previous[0], max(previous[1], last), previous[2])
        else:
            merged.append((first, last, reason))
    return merged


def clip_lost(ranges: list[LostRange], start_offset: int, end_offset: int) -> list[LostRange]:
    """The parts of ``ranges`` within ``[start_offset, end_offset)``."""
    out = []
    for first, last, reason in ranges:
        first, last = max(first, start_offset), min(last, end_offset - 1)
        if first <= last:
            out.append((first, last, reason))
    return out


def remove_lost(ranges: list[LostRange], first: int, last: int) -> list[LostRange]:
    """``ranges`` without the offsets ``first`` to ``last`` (inclusive): they were repaired."""
    out: list[LostRange] = []
    for start, end, reason in ranges:
        if end < first or start > last:
            out.append((start, end, reason))
            continue
        if start < first:
            out.append((start, first - 1, reason))
        if end > last:
            out.append((last + 1, end, reason))
    return out


def lost_range_at(ranges: list[LostRange], offset: int) -> LostRange | None:
    for entry in ranges:
        if entry[0] <= offset <= entry[1]:
            return entry
    return None


def next_lost_start(ranges: list[LostRange], offset: int) -> int | None:
    """First offset of the first lost range starting after ``offset``."""
    for first, _last, _reason in ranges:
        if first > offset:
            return first
    return None


def lost_message(topic: str, partition: int, entry: LostRange) -> str:
    first, last, reason = entry
    return (
        f"{topic}/{partition}: offsets {first} to {last} are unreadable ({reason}); they are never served. "
        f"Seek to offset {last + 1} to skip them"
    )
