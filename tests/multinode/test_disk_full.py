"""Issue #19 item 8 on 3 `meshq node` processes: one node's data disk (a tmpfs) fills. Partitions it
follows keep acknowledging acks=quorum writes with the other two, it falls out of their in-sync
replicas; partitions it leads refuse writes with StorageFullError; once space returns it accepts
writes and catches up by itself, and nothing acknowledged is lost. Needs root (the tmpfs)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

import meshq
from tests.multinode.helpers import node_id, start_all, view, wait_agreement, wait_until

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs as one node's data disk needs root"),
]

# Leaders follow the ring, and node ids are random: with 3 partitions the full node led all of them in
# about one run in 27 (seen in CI). With 8 that is (1/3)**8, and the test needs a followed partition.
PARTITIONS = 8


def partitions(client) -> dict[int, dict]:
    for topic in client.status(timeout=5.0)["topics"]:
        if topic["name"] == "t":
            return {p["partition"]: p for p in topic["partitions"]}
    return {}


def fill_disk(path: str) -> None:
    with open(path, "wb") as file:
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError:
            pass


def test_a_full_follower_falls_out_of_sync_writes_go_on_and_it_recovers(mesh):
    options = ["--min-free-bytes", str(256 * 1024), "--replication-factor", "3"]
    first = mesh.new(extra=options)
    second = mesh.new(seeds=[first], extra=options)
    third = mesh.new(seeds=[first], extra=options)
    os.makedirs(third.data_dir)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", third.data_dir], check=True)
    client = None
    try:
        start_all([first, second, third])
        wait_agreement([first, second, third], 60.0)
        full_id = node_id(third)
        client = meshq.Node(cluster=mesh.cluster, role="client", seeds=[n.seed for n in (first, second, third)],
                            mdns=False).start()
        client.create_topic("t", partitions=PARTITIONS, replication_factor=3)
        wait_until(lambda: all(len(p["in_sync"] or ()) == 3 for p in partitions(client).values())
                   and len(partitions(client)) == PARTITIONS, 60.0, "every replica in sync")
        acknowledged: dict[tuple[int, int], bytes] = {}

        def produce(partition: int, value: bytes) -> None:
            metadata = client.produce("t", value, partition=partition, acks="quorum", timeout=10)
            acknowledged[(partition, metadata.offset)] = value

        for partition in range(PARTITIONS):
            for index in range(20):
                produce(partition, b"before-%d-%d" % (partition, index))

        fill_disk(os.path.join(third.data_dir, "filler"))
        wait_until(lambda: (view(third) or {}).get("storage_full") is True, 30.0, f"{full_id} reports storage_full")
        leaders = {p: entry["leader"] for p, entry in partitions(client).items()}
        followed = [p for p, leader in leaders.items() if leader != full_id]
        led = [p for p, leader in leaders.items() if leader == full_id]
        assert followed, f"{full_id} leads every partition: {leaders}"
        value = b"x" * 2000
        for partition in followed:  # quorum with the two others
            for index in range(50):
                produce(partition, value + b"-%d-%d" % (partition, index))
        for partition in led:
            try:
                metadata = client.produce("t", b"refused", partition=partition, acks="quorum", timeout=10)
            except meshq.StorageFullError as exc:
                assert "storage is full" in str(exc)
                continue
            # Accepted: only a leader other than the full node may have done that (leadership can
            # move between reading the leaders and producing; the client is redirected to the new one).
            wait_until(lambda: partitions(client)[partition]["leader"] != full_id, 10.0,  # noqa: B023
                       f"{full_id} still leads t/{partition}, yet a record for it was acknowledged")
            acknowledged[(partition, metadata.offset)] = b"refused"
        wait_until(lambda: all(full_id not in (partitions(client)[p]["in_sync"] or [full_id]) for p in followed), 30.0,
                   f"{full_id} out of the in-sync replicas of {followed}")
        members = {m["node_id"]: m for m in client.status(timeout=5.0)["members"]}
        assert members[full_id]["storage_full"] is True

        os.unlink(os.path.join(third.data_dir, "filler"))  # space returns
        wait_until(lambda: (view(third) or {}).get("storage_full") is False, 30.0, f"{full_id} accepts writes again")
        deadline = time.monotonic() + 30
        for partition in range(PARTITIONS):
            while True:
                try:
                    produce(partition, b"after-%d" % partition)
                    break
                except meshq.MeshqError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        wait_until(lambda: all(len(p["in_sync"] or ()) == 3 for p in partitions(client).values()), 60.0,
                   "every replica back in sync")

        read: dict[tuple[int, int], bytes] = {}
        consumer = client.consumer("t", start="earliest")
        deadline = time.monotonic() + 60
        while not set(acknowledged) <= set(read) and time.monotonic() < deadline:
            for record in consumer.poll(timeout=1.0, max_records=1000):
                read[(record.partition, record.offset)] = record.value
        consumer.close()
        lost = [key for key, value in acknowledged.items() if read.get(key) != value]
        assert lost == [], f"{len(lost)} acknowledged records lost or changed, e.g. {lost[:5]}"
    finally:
        if client is not None:
            client.stop()
        third.kill()
        subprocess.run(["umount", "-l", third.data_dir], check=False)
