"""Compaction of a partition log: keep the latest record per key; the rules both stores share.

Theory of operation
-------------------
``compact`` (``SegmentedLog``, ``MemoryLog``) works only on sealed segments that lie wholly
below a limit the caller gives (the high watermark: records a failover could still take back
never decide what is removed), and decides with an offset map built from every readable
record below that limit (``latest_offsets``): a record is kept when it is its key's latest,
or has no key. A key whose latest record has an empty value (a *tombstone*) keeps it until
it is older than ``delete_retention_ms`` (by its timestamp), then loses it too.

Offsets never change. A batch that keeps every record keeps its bytes; one that loses some is
re-encoded as one batch per run of adjacent kept offsets, with the original leader epoch,
timestamps, headers and producer fields (sequence numbers shifted with the run). A batch that
follows removed records — in its own segment or in earlier ones — is marked
``COMPACTED_GAP`` (inside its CRC), which is what lets a reader, recovery and a replica
copying the batch tell removed records from damage. So that no unmarked gap is left before
the first segment compaction does not touch, the last record of the last compacted segment is
always kept; and each idempotent producer's last batch is kept whole (as Kafka does), so the
producer table rebuilt from the headers on open still knows its last sequence number.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshq.core.batch import COMPACTED_GAP, BatchHeader, decode_records, encode_batch, parse_header
from meshq.core.records import Record


def latest_offsets(
    batches: Iterable[bytes], limit_offset: int, latest: dict[bytes, int], producer_last: dict[int, int]
) -> None:
    """Record in ``latest`` the offset of the last record of each key below ``limit_offset``, and
    in ``producer_last`` the base offset of each idempotent producer's last batch in ``batches``
    (give every batch of the log: a producer's last batch may lie past the limit)."""
    for data in batches:
        header = parse_header(data)
        if header.producer_id >= 0:
            producer_last[header.producer_id] = header.base_offset
        if header.base_offset >= limit_offset:
            continue
        for record in decode_records(data, "", 0):
            if record.offset >= limit_offset:
                break
            if record.key is not None:
                latest[record.key] = record.offset


class SegmentCompaction:
    """Compacts the batches of consecutive segments, one segment at a time (``segment``)."""

    def __init__(self, latest: dict[bytes, int], tombstone_before_ms: int | None,
                 producer_last: dict[int, int] | None = None) -> None:
        self._latest = latest
        self._producer_last = producer_last or {}
        self._tombstone_before_ms = tombstone_before_ms  # None: keep tombstones
        self.records_removed = 0
        self.tombstones_kept = False  # some tombstone may still expire: compact again later
        self._end: int | None = None  # one past the last record kept so far (across segments)
        self._original_end: int | None = None  # one past the last record of the batches seen so far

    def segment(self, base_offset: int, batches: list[bytes], last: bool = False) -> list[bytes]:
        """The batches of the next segment (starting at ``base_offset``; ``last``: the last one
        compacted) with the removable records removed (the very same list when nothing changes)."""
        out: list[bytes] = []
        if self._end is None or self._original_end is None:
            self._end = self._original_end = base_offset
        end, original_end = self._end, self._original_end
        changed = False
        for index, data in enumerate(batches):
            header = parse_header(data)
            records = decode_records(data, "", 0)
            if header.producer_id >= 0 and self._producer_last.get(header.producer_id) == header.base_offset:
                kept = records  # a producer's last batch stays whole: its sequence numbers survive a restart
            else:
                kept = [record for record in records if self._keep(record)]
            if last and index == len(batches) - 1 and (not kept or kept[-1] is not records[-1]):
                kept.append(records[-1])  # no unmarked gap before the segment after this one
            if len(kept) == len(records) and not (header.base_offset > end and end < original_end):
                out.append(data)
            else:
                changed = True
                self.records_removed += len(records) - len(kept)
                for run in _runs(kept):
                    out.append(_encode_run(header, run, gap=run[0].offset > end))
                    end = run[-1].offset + 1
            if kept and len(kept) == len(records):
                end = header.next_offset
            original_end = header.next_offset
        self._end, self._original_end = end, original_end
        return out if changed else batches

    def _keep(self, record: Record) -> bool:
        if record.key is None:
            return True
        if self._latest.get(record.key, record.offset) != record.offset:
            return False  # a later record of the same key supersedes it
        if record.value:
            return True
        if self._tombstone_before_ms is not None and record.timestamp_ms < self._tombstone_before_ms:
            return False
        self.tombstones_kept = True
        return True


def _runs(records: list[Record]) -> list[list[Record]]:
    """``records`` split where their offsets are not adjacent."""
    runs: list[list[Record]] = []
    for record in records:
        if runs and runs[-1][-1].offset + 1 == record.offset:
            runs[-1].append(record)
        else:
            runs.append([record])
    return runs


def _encode_run(header: BatchHeader, run: list[Record], gap: bool) -> bytes:
    """One batch of the adjacent records ``run`` cut from the batch with ``header``."""
    shift = run[0].offset - header.base_offset
    return encode_batch(
        [(record.key, record.value, record.headers or None, record.timestamp_ms) for record in run],
        producer_id=header.producer_id,
        producer_epoch=header.producer_epoch,
        base_sequence=header.base_sequence + shift if header.base_sequence >= 0 else header.base_sequence,
        base_offset=run[0].offset,
        leader_epoch=header.leader_epoch,
        attributes=header.attributes | (COMPACTED_GAP if gap else 0),
    )
