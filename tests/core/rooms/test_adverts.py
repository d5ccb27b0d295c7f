"""The ``adverts`` room (meshq.core.mesh.adverts): what each node offers, known everywhere."""

from __future__ import annotations

from tests.core.rooms.conftest import Net, flush


def offer(net: Net, node_id: str, kind: str, value: object) -> None:
    h = net[node_id]
    h.core.adverts.set(kind, value, net.clock.now_s)
    flush(h)
    net.pump()


def test_a_change_is_published_and_every_peer_sees_it_at_once():
    net = Net("n1", "n2", "n3")
    net.form()
    offer(net, "n1", "services", {"echo": {"idempotent": False}})
    for node_id in ("n1", "n2", "n3"):
        assert net[node_id].core.adverts.of("services") == {"n1": {"echo": {"idempotent": False}}}
    offer(net, "n1", "services", None)  # within PUBLISH_GAP_S of the first: goes out a moment later
    net.run(0.05)
    assert all(net[n].core.adverts.of("services") == {} for n in ("n1", "n2", "n3"))


def test_a_peer_that_missed_the_publish_pulls_the_map_when_a_heartbeat_names_a_newer_version():
    net = Net("n1", "n2")
    net.form()
    net.cut("n2")
    offer(net, "n1", "subs", ["a.>"])  # the publish is lost
    assert net["n2"].core.adverts.of("subs") == {}
    net.heal()
    since_s = net.clock.now_s
    net.run_until(lambda: net["n2"].core.adverts.of("subs") == {"n1": ["a.>"]}, within_s=3.0)
    assert [dst for _t, dst in net.sent("n2", "advert_get", since_s)] == ["n1"]


def test_changes_made_together_go_out_in_one_publish():
    net = Net("n1", "n2")
    net.form()
    adverts = net["n1"].core.adverts
    offer(net, "n1", "subs", ["x.0"])  # the first change goes out at once
    published = adverts.counters["published"]
    for i in range(1, 100):
        adverts.set("subs", [f"x.{j}" for j in range(i + 1)], net.clock.now_s)
    flush(net["n1"])
    assert adverts.counters["published"] == published  # coalesced: waiting for the gap
    net.run(0.05)
    assert adverts.counters["published"] == published + 1
    assert net["n2"].core.adverts.of("subs")["n1"] == [f"x.{j}" for j in range(100)]


def test_a_silent_node_is_left_out_while_suspect_and_its_map_dropped_once_dead():
    net = Net("n1", "n2", "n3")
    net.form()
    offer(net, "n3", "services", {"rpc": {}})
    watched: list[str] = []
    net["n1"].core.adverts.watch("services", watched.append)
    net.cut("n3")
    failure_timeout_s = net["n1"].config.failure_timeout_s
    net.run(failure_timeout_s / 2 + 0.3)
    assert net["n1"].core.adverts.of("services") == {}
    assert net["n1"].core.adverts.of("services", include_suspect=True) == {"n3": {"rpc": {}}}
    assert watched == ["n3"], "its watchers are told when what `of` shows changes: at suspect..."
    net.run(failure_timeout_s / 2 + 0.3)
    assert "n3" not in net["n1"].core.adverts.remote and watched == ["n3", "n3"], "... and when it is dropped"
    net.heal("n3")
    net.run_until(lambda: "n3" in net["n1"].core.adverts.of("services"), within_s=5.0)
    assert watched[2:] and set(watched) == {"n3"}, "and when it is back"


def test_a_restarted_node_with_nothing_to_offer_replaces_what_its_last_life_offered():
    net = Net("n1", "n2")
    net.form()
    offer(net, "n2", "subs", ["a"])
    adverts = net["n1"].core.adverts
    known = adverts.remote["n2"]
    adverts.note_version("n2", known.incarnation + 1, 0, net.clock.now_s)
    assert adverts.of("subs") == {}


def test_an_advert_that_claims_another_sender_is_dropped_and_counted():
    net = Net("n1", "n2")
    net.form()
    before = net["n1"].core.counters["frames_invalid"]
    from meshq.core import wire
    from meshq.core.events import EventReceived

    forged = wire.Message("advert", "n2", 0, {"node_id": "n9", "incarnation": 1, "version": 1, "adverts": {"s": 1}})
    net["n1"].handle(EventReceived(forged))
    assert net["n1"].core.counters["frames_invalid"] == before + 1
    assert "n9" not in net["n1"].core.adverts.remote
