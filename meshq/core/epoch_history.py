"""A replica's epoch history: which leader epoch stored which part of the partition's log.

Theory of operation
-------------------
Kafka calls it the leader-epoch cache (KIP-101). The history is a list of ``[epoch,
start_offset]`` pairs, ascending in both: the records from ``start_offset`` up to the next
entry's start were stored by the leader of ``epoch``. It answers the two questions the
replication protocol asks of a log — "which epoch stored offset *n*" (``epoch_at``, sent as
``prev_epoch`` with every append and compared by the follower) and "how complete is this log"
(``last_epoch``, compared before a vote is granted) — and where the run of the epoch holding
an offset begins (``run_start``, the follower's restart hint after a mismatch).

It only grows at the end and is only cut from the end:

* ``begin(epoch, start)`` adds an epoch newer than the last one: a stored batch of a newer
  epoch, or the zero-length *marker* a new leader writes at its end offset where Raft would
  append a no-op (a follower adopts the marker once its log equals the leader's up to it).
* ``truncate(offset)`` drops every entry starting at or past ``offset`` when the log is cut
  back there (or when markers adopted at that offset conflict with an older epoch's batch);
  ``clear()`` forgets all of it when the log restarts past the leader's retention.
* ``reconcile`` rebuilds it after a restart from the persisted list and the epochs the log's
  batch headers show: the log may have lost a tail or hold batches whose entry was not saved.
* ``trim()`` keeps the newest ``MAX_HISTORY`` entries before the list is persisted.

The object is persisted as its plain list (``entries``) and compares equal to that list, so
tests and checkers can treat ``replica.history`` as the list they saved. It is pure data: no
I/O, no time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

MAX_HISTORY = 512


class EpochHistory:
    """Ascending ``[epoch, start_offset]`` pairs of one replica's log. See the module docstring."""

    __slots__ = ("entries",)

    def __init__(self, entries: list[list[int]] | None = None) -> None:
        self.entries: list[list[int]] = [] if entries is None else entries

    @classmethod
    def reconcile(cls, persisted: Iterable, end_offset: int, batch_epochs: Iterable[tuple[int, int]]) -> EpochHistory:
        """Merge the persisted history with what the log's batch headers show.

        The log may have lost a tail (torn write, power loss) or hold batches whose epoch entry
        was not saved yet: entries past ``end_offset`` are dropped, epochs seen in batches added.
        """
        merged: dict[int, int] = {}
        for entry in persisted:
            epoch, start = int(entry[0]), int(entry[1])
            if start <= end_offset:
                merged[epoch] = min(start, merged.get(epoch, start))
        for epoch, start in batch_epochs:
            merged[epoch] = min(start, merged.get(epoch, start))
        entries: list[list[int]] = []
        for epoch in sorted(merged):
            start = merged[epoch]
            if entries and start < entries[-1][1]:
                continue  # inconsistent leftover of a truncation; the batches are the truth
            entries.append([epoch, start])
        return cls(entries)

    # ------------------------------------------------------------------ queries
    @property
    def last_epoch(self) -> int:
        return self.entries[-1][0] if self.entries else 0

    def epoch_at(self, offset: int) -> int:
        """Epoch of the leader that stored the record at ``offset`` (0 before any history)."""
        return self._entry_at(offset)[0]

    def run_start(self, offset: int) -> int:
        """First offset of the epoch run that holds ``offset`` (0 before any history)."""
        return self._entry_at(offset)[1]

    def _entry_at(self, offset: int) -> tuple[int, int]:
        """``(epoch, start)`` of the last entry starting at or before ``offset``, else ``(0, 0)``."""
        found = (0, 0)
        for epoch, start in self.entries:
            if start > offset:
                break
            found = (epoch, start)
        return found

    # ------------------------------------------------------------------ changes
    def begin(self, epoch: int, start: int) -> bool:
        """Add ``epoch`` from ``start`` if it is newer than the last epoch; whether it was added."""
        if epoch <= self.last_epoch:
            return False
        self.entries.append([epoch, start])
        return True

    def truncate(self, offset: int) -> bool:
        """Drop the entries that start at or past ``offset``; whether any was dropped."""
        kept = [entry for entry in self.entries if entry[1] < offset]
        if len(kept) == len(self.entries):
            return False
        self.entries = kept
        return True

    def clear(self) -> None:
        self.entries = []

    def trim(self) -> None:
        """Keep only the newest ``MAX_HISTORY`` entries (what is persisted)."""
        if len(self.entries) > MAX_HISTORY:
            del self.entries[: len(self.entries) - MAX_HISTORY]

    # ------------------------------------------------------------------ the list it stands for
    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EpochHistory):
            return self.entries == other.entries
        if isinstance(other, list):
            return self.entries == other
        return NotImplemented

    def __repr__(self) -> str:
        return f"EpochHistory({self.entries!r})"
