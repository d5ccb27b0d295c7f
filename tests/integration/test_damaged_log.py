"""Issue #19 item 2 on a real node: a damaged batch inside a partition's log is not a torn tail."""

from __future__ import annotations

import os

import pytest

import meshq
from meshq.core.batch import HEADER_SIZE, iter_batches

pytestmark = pytest.mark.timeout(90)


def partition_entry(node, topic):
    for entry in node.status()["topics"]:
        if entry["name"] == topic:
            return entry["partitions"][0]
    raise AssertionError(f"{topic} missing from status")


def test_a_flipped_byte_in_the_6th_of_10_batches_loses_only_that_batch(tmp_path):
    data_dir = tmp_path / "data"
    options = dict(cluster="dmg", data_dir=data_dir, mdns=False, replication_factor=1, fsync="always")
    with meshq.Node(**options) as node:
        node.create_topic("t", partitions=1, replication_factor=1)
        offsets = [node.produce("t", f"v{i}".encode(), partition=0).offset for i in range(10)]
    assert offsets == list(range(10))
    directory = os.path.join(data_dir, "topics", "t-0")
    [segment] = [name for name in os.listdir(directory) if name.endswith(".log")]
    path = os.path.join(directory, segment)
    data = bytearray(open(path, "rb").read())
    sixth = [position for position, header in iter_batches(bytes(data)) if header.base_offset == 5]
    assert sixth, "each produce is its own batch"
    data[sixth[0] + HEADER_SIZE + 2] ^= 0x20  # inside the 6th batch's records
    open(path, "wb").write(data)

    for _restart in range(2):  # a second restart still knows the lost offsets
        with meshq.Node(**options) as node:
            entry = partition_entry(node, "t")
            assert entry["lost_offsets"] == [[5, 5]] and entry["end_offset"] == 10
            consumer = node.consumer("t", start=6)
            records = []
            while len(records) < 4:
                records.extend(consumer.poll(timeout=2))
            assert [(r.offset, r.value) for r in records] == [(i, f"v{i}".encode()) for i in range(6, 10)]
            consumer.close()
            consumer = node.consumer("t", start="earliest")
            seen = []
            with pytest.raises(meshq.CorruptLogError, match="offsets 5 to 5 are unreadable.*Seek to offset 6"):
                for _poll in range(20):
                    seen.extend(r.offset for r in consumer.poll(timeout=2))
            assert seen == [0, 1, 2, 3, 4]  # never wrong data, and the error names the offsets
            consumer.close()
    with meshq.Node(**options) as node:
        assert node.produce("t", b"next", partition=0).offset == 10  # offset 5 is never handed out twice
