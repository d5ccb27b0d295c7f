"""The repair room: a damaged batch on one replica is found by the scrub and written back from
a member of the replica set that holds it intact; with no intact copy it stays lost."""

from __future__ import annotations

import pytest

from meshq.core import batch as batch_format
from meshq.core.status import merge_status
from meshq.errors import CorruptLogError
from meshq.log.memory import MemoryStorage
from tests.core.rooms.conftest import Net, create_topic

SEGMENT_BYTES = 600


def _cluster(**config) -> Net:
    net = Net()
    for node_id in ("n1", "n2", "n3"):
        net.add(node_id, storage=MemoryStorage(segment_bytes=SEGMENT_BYTES), **config)
    net.form()
    create_topic(net["n1"], "t", 1, 3, net=net)
    net.run_until(lambda: all(("t", 0) in net[n].core.partitions for n in net.nodes)
                  and net["n1"].core.host.current_leader("t", 0) is not None, within_s=10.0)
    for index in range(30):
        outcome = net["n1"].produce("t", [b"value-%03d" % index * 4], partition=0, acks="all")
        net.run_until(lambda: outcome.results or outcome.errors, within_s=10.0)  # noqa: B023 - waited on at once
        assert not outcome.errors, outcome.errors
    net.run_until(lambda: all(net[n].core.partitions[("t", 0)].high_watermark == 30 for n in net.nodes),
                  within_s=10.0)
    return net


def _flip(net: Net, node_id: str, segment_index: int = 0, batch_index: int = 1) -> int:
    """Flip a bit in a batch of a sealed segment of ``node_id``'s log; return its base offset."""
    segment = net[node_id].storage._disks[("t", 0)].segments[segment_index]  # the simulated disk
    data = bytearray(segment.batches[batch_index])
    data[batch_format.HEADER_SIZE + 2] ^= 0x08
    segment.batches[batch_index] = bytes(data)
    return segment.headers[batch_index].base_offset


def _log(net: Net, node_id: str):
    return net[node_id].core.partitions[("t", 0)].log


def test_scrub_finds_damage_on_a_follower_and_a_peer_repairs_it():
    net = _cluster()
    leader = net["n1"].core.host.current_leader("t", 0)
    follower = next(n for n in ("n1", "n2", "n3") if n != leader)
    assert len(_log(net, follower).segment_base_offsets) > 2
    offset = _flip(net, follower)
    net.run_until(lambda: _log(net, follower).corrupt_batches_repaired == 1, within_s=10.0)
    log = _log(net, follower)
    assert (log.corrupt_batches_detected, log.corrupt_batches_repaired) == (1, 1)
    assert log.lost_offsets == []
    assert log.read(0, 1 << 20) == _log(net, leader).read(0, 1 << 20)  # byte-identical to the leader's
    assert ("repair_fetch" in {kind for _t, src, _dst, kind, _ok in net.log if src == follower})
    assert batch_format.parse_header(log.read(offset, 0)).base_offset == offset
    # status: per partition on each node, summed over the replicas in the merged view
    reports = {n: net[n].core.status.local_status() for n in net.nodes}
    [mine] = [p for topic in reports[follower]["topics"] if topic["name"] == "t" for p in topic["partitions"]]
    assert (mine["corrupt_batches_detected"], mine["corrupt_batches_repaired"]) == (1, 1)
    merged = merge_status(reports, leader)
    [entry] = [p for topic in merged["topics"] if topic["name"] == "t" for p in topic["partitions"]]
    assert (entry["corrupt_batches_detected"], entry["corrupt_batches_repaired"]) == (1, 1)
    assert entry["lost_offsets"] == []


def test_damage_on_every_replica_stays_lost_and_is_never_served():
    net = _cluster()
    offsets = {_flip(net, node_id) for node_id in net.nodes}
    assert len(offsets) == 1
    (offset,) = offsets
    net.run(5.0)
    for node_id in net.nodes:
        log = _log(net, node_id)
        assert log.corrupt_batches_detected == 1 and log.corrupt_batches_repaired == 0
        assert [first for first, _last in log.lost_offsets] == [offset]
        with pytest.raises(CorruptLogError, match=f"offsets {offset} to"):
            log.read(offset, 1 << 20)


def test_with_the_scrub_off_damage_is_found_and_repaired_only_once_read():
    net = _cluster(scrub_rate_mb_s=0)
    leader = net["n1"].core.host.current_leader("t", 0)
    follower = next(n for n in ("n1", "n2", "n3") if n != leader)
    offset = _flip(net, follower)
    net.run(5.0)
    assert _log(net, follower).corrupt_batches_detected == 0  # nothing read it yet
    with pytest.raises(CorruptLogError):
        _log(net, follower).read(offset, 1 << 20)  # a read finds it: lost, then repaired
    net.run_until(lambda: _log(net, follower).corrupt_batches_repaired == 1, within_s=10.0)
    assert _log(net, follower).read(0, 1 << 20) == _log(net, leader).read(0, 1 << 20)
