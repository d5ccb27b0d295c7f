"""Consumer groups: committed offsets, stored in the mesh like any partition.

Theory of operation
-------------------
A group's offsets live in one partition of the internal compacted topic
``__consumer_offsets`` (chosen by a stable hash of the group name); that partition's leader
is the group's coordinator. A commit is a record batch appended to that partition and
acknowledged like ``acks=quorum`` records, so a failover cannot rewind a group; the leader
also keeps the latest offset per (group, topic, partition) in memory, rebuilt from the log
whenever it takes over leadership of an offsets partition and dropped when it loses it. Reads
(``offset_fetch``) are answered only under a valid lease, as writes are: a leader that was paused
or cut off may already be deposed without knowing it, and its offsets would miss the commits made
since (a committed offset seen to go back).
Group membership (who reads which partitions) is the sibling room ``coordinator``
(``meshq.core.partitions.coordinator``); a commit that names a member is checked there first.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import msgpack

from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.cluster.agreement import OFFSETS_TOPIC
from meshq.core.hashing import stable_hash64
from meshq.core.room import Room
from meshq.errors import CorruptLogError

log = logging.getLogger("meshq.core")

MAX_COMMITTERS = 100_000  # (committer, partition) entries whose latest commit order is kept, per node


class Groups(Room):
    """Committed offsets of consumer groups (see the module docstring)."""

    SERVES = {"offset_commit": "serve_offset_commit", "offset_fetch": "serve_offset_fetch"}

    def __init__(self, core: Any) -> None:
        super().__init__(core)
        self.group_offsets: dict[tuple[str, str, int], int] = {}  # (group, topic, partition) -> offset
        # (group, committer node, its incarnation, topic, partition) -> the committer's latest seq applied
        # oldest first; an OrderedDict so evicting the oldest is O(1) (see Rpc._seen)
        self.applied_seq: OrderedDict[tuple[str, str, int, str, int], int] = OrderedDict()

    def serve_offset_commit(self, route: Any, message: wire.Message, now_s: float) -> None:
        group = message.body["group"]
        for topic in sorted({entry["topic"] for entry in message.body["offsets"]}):
            self.core.access.check("consume", topic)
        state = self.core.server.leader_state(OFFSETS_TOPIC, self.offsets_partition(group))
        if message.body.get("member") is not None:  # a group member's commit: it must hold these partitions
            self.core.coordinator.check_commit(
                group, message.body["member"], message.body.get("generation", -1),
                [(entry["topic"], entry["partition"]) for entry in message.body["offsets"]])
        entries = message.body["offsets"]
        if not entries:
            self.out.reply(route, message.request_id, "offset_commit_ok", {})
            return
        self.core.server.check_lease(state, now_s)
        seq = message.body.get("seq")
        if seq is not None:
            # An attempt of a commit delayed on the wire past a later commit of the same committer (its
            # retry was answered, then the next commit was made) must not take the offsets back: each
            # entry a later commit of this committer already set is superseded, and not stored.
            committer = (group, message.sender, message.body.get("session", 0))
            entries = [e for e in entries
                       if self.applied_seq.get((*committer, e["topic"], e["partition"]), -1) <= seq]
        records = []
        now_ms = self.core.wall_clock_ms()
        for entry in entries:
            key = msgpack.packb([group, entry["topic"], entry["partition"]])
            records.append((key, msgpack.packb(entry["offset"]), None, now_ms))
        if records:
            data = batch_format.encode_batch(records)
            self.core.space.append(state, data, batch_format.parse_header(data), now_ms, now_s)
            self.core.server.on_appended(state, now_s)
        for entry in entries:
            self.group_offsets[(group, entry["topic"], entry["partition"])] = entry["offset"]
            if seq is not None:
                key = (*committer, entry["topic"], entry["partition"])
                self.applied_seq.pop(key, None)  # re-inserted last: the oldest entries go first
                self.applied_seq[key] = seq
        while len(self.applied_seq) > MAX_COMMITTERS:
            self.applied_seq.popitem(last=False)

        # Committed offsets are as durable as acks=quorum records: a failover cannot rewind a group.
        self.core.server.wait_for_acks(state, state.log.end_offset, "quorum", now_s + self.config.request_timeout_s,
                                       self.out.answer(route, message.request_id, "offset_commit_ok", {}))

    def serve_offset_fetch(self, route: Any, message: wire.Message, now_s: float) -> None:
        group, topic = message.body["group"], message.body["topic"]
        self.core.access.check("consume", topic)
        state = self.core.server.leader_state(OFFSETS_TOPIC, self.offsets_partition(group))
        # Like a write, a read needs the lease: a leader that was paused or cut off may have been
        # deposed without knowing it yet, and its offsets miss every commit made since — answering
        # from them would take acknowledged commits back.
        self.core.server.check_lease(state, now_s)
        offsets = [
            {"topic": t, "partition": p, "offset": o}
            for (g, t, p), o in sorted(self.group_offsets.items())
            if g == group and t == topic
        ]
        self.out.reply(route, message.request_id, "offset_fetch_ok", {"offsets": offsets})

    def offsets_partition(self, group: str) -> int:
        config = self.core.agreement.meta.topics.get(OFFSETS_TOPIC) or self.core.catalog.offsets_topic_config()
        return stable_hash64(group.encode()) % config.partitions

    def on_leadership(self, key: tuple[str, int], gained: bool) -> None:
        """This node started or stopped leading partition ``key``: load or drop its groups' offsets."""
        if key[0] != OFFSETS_TOPIC:
            return
        self.core.coordinator.on_leadership(key[1], gained, self.core.now_s)
        if gained:
            self._replay(key)
        else:
            for group_key in [k for k in self.group_offsets if self.offsets_partition(k[0]) == key[1]]:
                del self.group_offsets[group_key]
            for seq_key in [k for k in self.applied_seq if self.offsets_partition(k[0]) == key[1]]:
                del self.applied_seq[seq_key]

    def lag_report(self) -> list[dict]:
        """Each group's committed offsets with the partition's high watermark as this node sees it,
        and its members, generation and state where this node coordinates it (empty elsewhere)."""
        groups: dict[str, dict] = {}
        membership = self.core.coordinator.report()

        def entry_of(group: str) -> dict:
            if group not in groups:
                members = membership.get(group, {"generation": 0, "state": "empty", "members": []})
                groups[group] = {"group": group, "mode": "stream", **members, "partitions": []}
            return groups[group]

        for group in membership:
            entry_of(group)
        for (group, topic, partition), committed in sorted(self.group_offsets.items()):
            state = self.core.host.get((topic, partition))
            high_watermark = state.high_watermark if state else committed
            entry = entry_of(group)
            entry["partitions"].append({
                "topic": topic, "partition": partition, "committed": committed,
                "high_watermark": high_watermark, "lag": max(0, high_watermark - committed),
            })
        return [groups[g] for g in sorted(groups)]

    def _replay(self, key: tuple[str, int]) -> None:
        """Rebuild the committed offsets stored in partition ``key`` from its log (a compacted topic)."""
        state = self.core.host.get(key)
        if state is None:
            return
        topic, partition = key
        offset = state.log.start_offset
        skipped = 0
        while offset < state.log.end_offset:
            try:
                data = state.log.read(offset, 16 * 1024 * 1024)
            except CorruptLogError as exc:
                log.error("%s/%d: committed offsets replayed only up to offset %d: %s",
                          topic, partition, offset, exc)
                break
            if not data:
                break
            for record in batch_format.decode_records(data, topic, partition, offset):
                offset = record.offset + 1
                commit = _as_commit(record)
                if commit is None:
                    skipped += 1
                    continue
                self.group_offsets[commit[0]] = commit[1]
        if skipped:
            log.warning("%s/%d: %d stored records are not offset commits; skipped", topic, partition, skipped)


def _as_commit(record: Any) -> tuple[tuple[str, str, int], int] | None:
    """``((group, topic, partition), offset)`` of a stored commit; None for any other record
    (older releases let a plain produce write the offsets topic)."""
    try:
        key = msgpack.unpackb(record.key) if record.key is not None else None
        offset = msgpack.unpackb(record.value)
    except Exception:  # msgpack raises several unrelated types on bad input
        return None
    if (not isinstance(key, list) or len(key) != 3 or not isinstance(key[0], str) or not isinstance(key[1], str)
            or type(key[2]) is not int or type(offset) is not int):
        return None
    return (key[0], key[1], key[2]), offset
