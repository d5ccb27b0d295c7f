"""Issue #19 item 8 on a real node: a data disk that fills (a small tmpfs) refuses new records
with StorageFullError, keeps serving reads, loses nothing acknowledged, and accepts writes again
by itself once space returns, without a restart. Needs root (to mount the tmpfs)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

import meshq

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs as the data disk needs root"),
]

VALUE = b"v" * 4000


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted under ``tmp_path``; unmounted however the test ends."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def consume_all(node, count: int) -> list[tuple[int, bytes]]:
    consumer = node.consumer("t", start="earliest")
    seen: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 30
    while len(seen) < count and time.monotonic() < deadline:
        seen.extend((r.offset, r.value) for r in consumer.poll(timeout=1.0, max_records=1000))
    consumer.close()
    return seen


def test_a_full_disk_refuses_writes_serves_reads_and_recovers_by_itself(small_disk):
    filler = small_disk / "filler"
    options = dict(cluster="full", data_dir=small_disk / "data", mdns=False, replication_factor=1,
                   fsync="always", min_free_bytes=128 * 1024, storage_check_interval_s=0.2)
    with meshq.Node(**options) as node:
        node.create_topic("t", partitions=1, replication_factor=1)
        acknowledged: list[tuple[int, bytes]] = []
        for index in range(200):
            acknowledged.append((node.produce("t", VALUE + b"%d" % index, partition=0, timeout=10).offset,
                                 VALUE + b"%d" % index))
        # a filler file eats what is left of the disk, as another program would
        with open(filler, "wb") as file:
            try:
                while True:
                    file.write(b"\0" * 65536)
                    file.flush()
            except OSError:
                pass
        refused = None
        deadline = time.monotonic() + 20
        while refused is None and time.monotonic() < deadline:
            try:
                value = VALUE + b"late"
                acknowledged.append((node.produce("t", value, partition=0, timeout=10).offset, value))
            except meshq.StorageFullError as exc:
                refused = exc
        assert refused is not None, "the node never refused a write on a full disk"
        assert "storage is full" in str(refused) and "Free space" in str(refused)
        status = node.status()
        assert [m["storage_full"] for m in status["members"] if m["node_id"] == status["node_id"]] == [True]
        # reads go on, and hold exactly what was acknowledged
        assert consume_all(node, len(acknowledged)) == acknowledged

        os.unlink(filler)  # space returns: the node notices by itself
        deadline = time.monotonic() + 20
        after = None
        while after is None and time.monotonic() < deadline:
            try:
                after = node.produce("t", b"after", partition=0, timeout=10)
            except meshq.StorageFullError:
                time.sleep(0.1)
        assert after is not None, "writes did not resume once space returned"
        acknowledged.append((after.offset, b"after"))
        assert consume_all(node, len(acknowledged)) == acknowledged
        assert node.status()["storage_full"] is False

    with meshq.Node(**options) as node:  # and after a restart: nothing acknowledged lost, nothing torn
        assert consume_all(node, len(acknowledged)) == acknowledged
