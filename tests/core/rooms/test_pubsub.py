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


def publish(net: Net, src: str, subject: str) -> dict[str, list[int]]:
    """Carry one publish out by hand as the I/O shell does: {node: local subscriptions reached}."""
    local, sends = net[src].core.pubsub.prepare(subject, None)
    reached = {src: local} if local else {}
    for node, frame in sends:
        room = net[node].core.pubsub
        assert frame.startswith(room.prefix)
        source, subject_got, queues, _headers = room.received(frame)
        assert (source, subject_got) == (src, subject)
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
    local, sends = net["n1"].core.pubsub.prepare("a.b", None)
    assert local == [1] and sends == []


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
    local, sends = net["n1"].core.pubsub.prepare("jobs", None)
    unsubscribe(net, "n2", 1)
    room = net["n2"].core.pubsub
    _source, subject, queues, _headers = room.received(sends[0][1])
    assert queues == ["w"] and room.deliveries(subject, queues) == []
    assert room.counters["undeliverable"] == 1


def test_gaps_in_a_peers_sequence_numbers_are_counted_as_dropped():
    net = Net("n1", "n2")
    net.form()
    subscribe(net, "n2", 1, "a")
    framed = [net["n1"].core.pubsub.prepare("a", None)[1][0][1] for _ in range(10)]
    room = net["n2"].core.pubsub
    for frame in framed[:3] + framed[7:]:  # frames 4-7 lost at a high-water mark
        room.received(frame)
    assert (room.peers["n1"].received, room.peers["n1"].dropped) == (6, 4)
    assert net["n1"].core.pubsub.peers["n2"].sent == 10


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
    bad = [room.prefix, room.prefix + b"\x00" * 8 + b"\xc1",
           frames.encode(room.prefix, 1, frames.encode_meta("n2", "a.*", None, None)),  # a wildcard subject
           frames.encode(room.prefix, 1, b"\x93\x01\x02\x03")]
    for frame in bad:
        with pytest.raises(ProtocolError):
            room.received(frame)
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
