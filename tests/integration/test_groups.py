"""Consumer groups in one process (issue #14 item 1): two members of a group on one node split
the partitions, a closed member's partitions go to the other at once, status shows members."""

from __future__ import annotations

import time

import pytest

import meshq
from meshq.errors import RebalanceError


@pytest.fixture
def node(tmp_path):
    with meshq.Node(cluster="it", data_dir=tmp_path / "data", mdns=False, partitions=2) as n:
        yield n


def poll_until(consumers, condition, timeout_s: float = 15.0, records: list | None = None) -> list:
    """Poll every consumer until ``condition()`` holds; every record polled is added to ``records``
    (returned)."""
    records = [] if records is None else records
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, [c.assignment() for c in consumers]
        for c in consumers:
            records.extend(c.poll(timeout=0.05))
    return records


def test_two_members_split_the_partitions_and_a_closed_ones_go_to_the_other(node):
    node.create_topic("t", partitions=4)
    for i in range(40):
        node.produce("t", f"{i}".encode(), key=f"{i}".encode())
    a = node.consumer("t", group="g")
    b = node.consumer("t", group="g")
    seen: list = []
    poll_until([a, b], lambda: a.assignment() and b.assignment()
               and sorted(a.assignment() + b.assignment()) == [0, 1, 2, 3], records=seen)
    group = next(g for g in node.status()["groups"] if g["group"] == "g")
    assert (group["mode"], group["state"]) == ("stream", "stable")
    assert {m["member"]: m["partitions"] for m in group["members"]} == {
        a.member_id: a.assignment(), b.member_id: b.assignment()}
    b.close()  # commits and leaves: a takes every partition without waiting for a session to end
    poll_until([a], lambda: a.assignment() == [0, 1, 2, 3], timeout_s=5.0, records=seen)
    poll_until([a], lambda: len({r.value for r in seen}) == 40, records=seen)
    a.close()


def test_a_member_that_does_not_poll_through_a_rebalance_is_removed_and_its_commit_refused(node):
    node.create_topic("t", partitions=2)
    node.produce("t", b"x", partition=0)
    a = node.consumer("t", group="g", auto_commit=False)
    seen: list = []
    poll_until([a], lambda: seen, records=seen)
    assert [r.value for r in seen] == [b"x"]
    # b's join starts a rebalance; a does not poll, so it never lets go: the coordinator removes
    # it when the rebalance's deadline (one session) passes, and b gets every partition
    b = node.consumer("t", group="g", auto_commit=False)
    records: list = []
    poll_until([b], lambda: b.assignment() == [0, 1], records=records)
    with pytest.raises(RebalanceError):
        a.commit()  # its generation is over: the record it returned is read again by b
    poll_until([b], lambda: records, records=records)
    assert [r.value for r in records] == [b"x"]
    poll_until([a, b], lambda: a.assignment() and b.assignment())  # a rejoins at its next poll
    a.close()
    b.close()
