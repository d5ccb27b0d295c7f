"""A dropped connection (``PeerDisconnected``, from the runtime's drop monitor, meshq.io.dropwatch): the requests
pending on that peer fail as retriable at once (``Outbox.fail_requests_to``), so a produce whose request was
lost with the connection is sent again instead of waiting out its timeout, and is stored once."""

from __future__ import annotations

from meshq.core.events import PeerDisconnected
from tests.core.rooms.conftest import Net, create_topic, records_of


def lost_produce(report_drop: bool) -> tuple[Net, object, str]:
    net = Net("n1", "n2", "n3", request_timeout_s=30.0)
    create_topic(net.form(), "t", 1, 3, net=net)
    client = net.add("c1", role="client", data_dir=None)
    net.introduce()
    net.run(1.0)
    assert client.produce("t", [b"warm"], acks="leader", partition=0) is not None
    net.run(0.5)
    leader = client.core.client.leader_of("t", 0)
    net.cut(leader)  # shorter than the failure detector's timeout: the leader stays alive to the client
    outcome = client.produce("t", [b"x"], acks="leader", partition=0, timeout_s=20.0)
    net.run(0.2)
    net.heal()
    assert not outcome.results and not outcome.errors
    assert any(request.peer == leader for request in client.core.out.pending.values())
    if report_drop:
        client.handle(PeerDisconnected(leader))
    net.run(3.0)
    return net, outcome, leader


def test_a_produce_lost_with_its_connection_is_sent_again_when_the_drop_is_reported():
    net, outcome, leader = lost_produce(report_drop=True)
    assert outcome.errors == [] and len(outcome.results) == 1
    assert records_of(net[leader], "t", 0).count(b"x") == 1


def test_without_the_report_the_lost_produce_waits_for_its_timeout():
    net, outcome, _leader = lost_produce(report_drop=False)
    assert not outcome.results and not outcome.errors  # still waiting, 3 s later (request timeout 30 s)
