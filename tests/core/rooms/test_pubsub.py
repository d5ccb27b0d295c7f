"""The ``pubsub`` room (meshq.core.pubsub.room): local subscriptions, interest, routing, queue groups."""

from __future__ import annotations

from collections import Counter

from meshq.core.events import AddSubscription, RemoveSubscription
from meshq.core.pubsub import frames
from tests.core.rooms.conftest import Net


def subscribe(net: Net, node_id: str, sub_id: int, pattern: str, queue: str | None = None) -> None:
    h = net[node_id]
    token = h.command(AddSubscription(sub_id, pattern, queue))
    assert token in h.resolved, h.failed.get(token)
    net.run(0.05)


def unsubscribe(net: Net, node_id: str, sub_id: int) -> None:
    h = net[node_id]
    token = h.command(RemoveSubscription(sub_id))
    assert token in h.resolved
    net.run(0.05)


def sends(net: Net, src: str, subject: str) -> tuple[list[int], list[tuple[str, list[bytes]]]]:
    """One publish as the I/O shell makes it: local subscriptions, and (node, frames) per node."""
    room = net[src].core.pubsub
    local, nodes = room.plan(subject)
    grouped = isinstance(nodes, dict)
    out = [(node, room.batch(node, [(subject, (nodes[node] or None) if grouped else None, None, b"data")]))
           for node in nodes]
    return list(local), out


def publish(net: Net, src: str, subject: str) -> dict[str, list[int]]:
    """Carry one publish out by hand as the I/O shell does: {node: local subscriptions reached}."""
    local, batches = sends(net, src, subject)
    reached = {src: local} if local else {}
    for node, framed in batches:
        room = net[node].core.pubsub
        assert framed[0].startswith(room.prefix)
        source, entries = room.received(*framed)
        ((subject_got, queues, _headers, data),) = entries
        assert (source, subject_got, data) == (src, subject, b"data")
        reached[node] = room.deliveries(subject_got, queues)
    return reached


def test_interest_reaches_every_node_and_a_publish_goes_only_where_it_matches():
    net = Net("n1", "n2", "n3")
    net.form()
    subscribe(net, "n2", 1, "sensors.*.temp")
    subscribe(net, "n3", 1, "sensors.>")
    subscribe(net, "n1", 7, "sensors.kitchen.temp")
    assert publish(net, "n1", "sensors.kitchen.temp") == {"n1": [7], "n2": [1], "n3": [1]}
    assert publish(net, "n1", "sensors.kitchen.hum") == {"n3": [1]}
    assert publish(net, "n2", "other") == {}
    assert net["n2"].core.pubsub.counters["no_interest"] == 1


def test_a_publisher_with_no_remote_interest_prepares_no_frame():
    net = Net("n1", "n2")
    net.form()
    subscribe(net, "n1", 1, "a.b")
    local, batches = sends(net, "n1", "a.b")
    assert local == [1] and batches == []


def test_closing_withdraws_the_interest_everywhere():
    net = Net("n1", "n2")
    net.form()
    subscribe(net, "n2", 1, "a.>")
    subscribe(net, "n2", 2, "a.>")
    assert publish(net, "n1", "a.x") == {"n2": [1, 2]}
    unsubscribe(net, "n2", 1)
    assert publish(net, "n1", "a.x") == {"n2": [2]}
    unsubscribe(net, "n2", 2)
    assert net["n2"].core.adverts.local == {}
    assert publish(net, "n1", "a.x") == {}


def test_a_queue_group_gets_each_message_once_spread_over_its_members_on_every_node():
    net = Net("n1", "n2", "n3")
    net.form()
    subscribe(net, "n2", 1, "jobs.*", queue="workers")
    subscribe(net, "n3", 1, "jobs.>", queue="workers")
    subscribe(net, "n3", 2, "jobs.>", queue="workers")
    subscribe(net, "n3", 3, "jobs.*")  # a plain subscriber sees every message
    seen: Counter = Counter()
    for _ in range(300):
        reached = publish(net, "n1", "jobs.a")
        members = [(node, sub) for node, subs in reached.items() for sub in subs if (node, sub) != ("n3", 3)]
        assert len(members) == 1, reached
        assert 3 in reached["n3"]
        seen[members[0]] += 1
    assert set(seen) == {("n2", 1), ("n3", 1), ("n3", 2)}
    assert all(count == 100 for count in seen.values()), seen  # weighted by members: round robin


def test_a_silent_node_leaves_the_queue_group_and_returns_when_heard_again():
    net = Net("n1", "n2", "n3")
    net.form()
    subscribe(net, "n2", 1, "jobs", queue="w")
    subscribe(net, "n3", 1, "jobs", queue="w")
    net.cut("n3")
    net.run(net["n1"].config.failure_timeout_s / 2 + 1.0)  # n3 is suspect at n1
    for _ in range(10):
        assert set(publish(net, "n1", "jobs")) == {"n2"}
    net.heal()
    net.run_until(lambda: net["n1"].core.pubsub.route("jobs").groups[0].members == (("n2", None), ("n3", None)),
                  within_s=3.0)


def test_a_node_picked_for_a_group_it_no_longer_has_counts_the_message_undeliverable():
    net = Net("n1", "n2")
    net.form()
    subscribe(net, "n2", 1, "jobs", queue="w")
    _local, batches = sends(net, "n1", "jobs")
    unsubscribe(net, "n2", 1)
    room = net["n2"].core.pubsub
    _source, ((subject, queues, _headers, _data),) = room.received(*batches[0][1])
    assert queues == ["w"] and room.deliveries(subject, queues) == []
    assert room.counters["undeliverable"] == 1


def test_gaps_in_a_peers_sequence_numbers_are_counted_as_dropped():
    net = Net("n1", "n2")
    net.form()
    subscribe(net, "n2", 1, "a")
    framed = [sends(net, "n1", "a")[1][0][1] for _ in range(6)]
    sender = net["n1"].core.pubsub
    framed.append(sender.batch("n2", [("a", None, None, b"%d" % i) for i in range(4)]))  # messages 7-10
    room = net["n2"].core.pubsub
    for frames_ in framed[:3] + framed[5:]:  # messages 4 and 5 lost at a high-water mark
        room.received(*frames_)
    assert (room.peers["n1"].received, room.peers["n1"].dropped) == (8, 2)
    assert sender.peers["n2"].sent == 10


def test_invalid_interest_from_a_peer_is_dropped_and_counted():
    net = Net("n1", "n2")
    net.form()
    room = net["n1"].core.pubsub
    room._sync("n2", [["a.>.b", None, 1], ["ok.*", None, 1], ["x", "bad queue", 1], "junk", ["y", None, 0]])
    assert room._remote_entries["n2"] == frozenset({("ok.*", None, 1)})
    assert room.counters["interest_invalid"] == 4


def test_a_bad_data_frame_raises_a_protocol_error_and_is_counted():
    import pytest

    from meshq.errors import ProtocolError
    net = Net("n1")
    room = net["n1"].core.pubsub
    good = frames.encode_batch(room.prefix, 1, "n2", [("a", None, None, b"xy"), ("b", ["q"], {"h": b"v"}, b"z")])
    assert room.received(*good) == ("n2", [("a", None, None, b"xy"), ("b", ["q"], {"h": b"v"}, b"z")])
    bad = [(room.prefix, b""), (room.prefix + b"\x00" * 8 + b"\xc1", b""),
           (good[0], good[1] + b"extra"), (good[0], b"x"),  # sizes do not add up
           tuple(frames.encode_batch(room.prefix, 1, "n2", [("a.*", None, None, b"")])),  # a wildcard subject
           tuple(frames.encode_batch(room.prefix, 1, "n2", [("a", ["bad queue"], None, b"")])),
           tuple(frames.encode_batch(room.prefix, 1, "n2", [("a", None, {"h": "text"}, b"")])),
           (frames.encode_batch(room.prefix, 1, "n2", [("a", None, None, b"")])[0][:-4] + b"\x93\x01\x02\x03", b"")]
    for frame, payloads in bad:
        with pytest.raises(ProtocolError):
            room.received(frame, payloads)
    assert room.counters["frames_invalid"] == len(bad)


def test_an_invalid_subscription_command_fails_with_the_rule():
    net = Net("n1")
    h = net["n1"]
    token = h.command(AddSubscription(1, "a..b", None))
    assert "empty token" in str(h.failed[token])
    assert h.core.pubsub.local == {}


def test_status_reports_each_subscription():
    net = Net("n1")
    subscribe(net, "n1", 4, "a.*", queue="q")
    report = net["n1"].core.status.local_status()["pubsub"]["nodes"][0]
    assert report["subscriptions"] == [{"id": 4, "pattern": "a.*", "queue": "q", "delivered": 0, "dropped": 0}]
