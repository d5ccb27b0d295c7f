"""The ``mesh`` room (meshq.core.mesh.gossip.Mesh): hello, heartbeats, liveness, seeds."""

from __future__ import annotations

from meshq.core import wire
from meshq.core.events import Disconnect, EventReceived, PeerDiscovered, Unsubscribe
from meshq.errors import NotLeaderError
from tests.core.harness import CoreHarness
from tests.core.rooms.conftest import Net, advance, create_topic, heartbeat, member_info, sent_of


def states(h: CoreHarness) -> dict[str, str]:
    return {m.node_id: m.state for m in h.core.members.members.values() if m.node_id != h.core.node_id}


def test_hello_is_answered_with_our_member_info_and_gossip_and_links_the_sender(lone):
    peer = member_info("peer", 7000)
    lone.connects.clear()
    reply = lone.request("hello", {"member": peer})
    assert reply.type == "hello_ok"
    assert reply.body["member"] == lone.core.mesh.self_info()
    assert [m["node_id"] for m in reply.body["members"]] == ["n1", "peer"]
    assert reply.body["formed"] is True and reply.body["leader"] == "n1"
    assert states(lone) == {"peer": "alive"}
    assert [c.peer for c in lone.connects] == ["peer"]


def test_a_heartbeat_not_from_the_member_it_describes_is_counted_and_dropped(lone):
    lone.handle(heartbeat(member_info("victim", 7000), sender="forger"))
    assert lone.core.counters["frames_invalid"] == 1
    assert states(lone) == {}


def test_an_event_of_another_type_is_counted_and_dropped(lone):
    lone.handle(EventReceived(wire.Message("hello", "x", 0, {"member": member_info("x", 7000)})))
    assert lone.core.counters["frames_invalid"] == 1
    assert states(lone) == {}


def test_gossip_links_and_greets_members_never_heard_from():
    h = CoreHarness("n1")
    a, b = member_info("a", 7000), member_info("b", 7010)
    h.connects.clear()
    h.handle(heartbeat(a, members=[a, b]))
    assert states(h) == {"a": "alive", "b": "joining"}
    assert [c.peer for c in h.connects] == ["a", "b"]
    # b is new; a does not list us, so we introduce ourselves to it too
    assert sorted(peer for peer, _message in sent_of(h, "hello")) == ["a", "b"]


def test_a_peer_that_does_not_list_us_is_greeted_at_most_once_a_second(lone):
    a = member_info("a", 7000)
    greeted = []
    for _ in range(15):  # a heartbeat every 0.1 s for 1.5 s, none of them listing n1
        lone.handle(heartbeat(a))
        greeted.append(len(sent_of(lone, "hello", clear=True)))
        lone.advance(0.1)
    assert greeted == [1] + [0] * 9 + [1] + [0] * 4


def test_a_silent_member_turns_suspect_then_dead_then_is_forgotten_and_unlinked():
    h = CoreHarness("n1", failure_timeout_s=1.0, member_timeout_s=3.0)
    a = member_info("a", 7000)
    h.handle(heartbeat(a))
    errors = []
    h.core.out.request("a", "status", {}, (), h.clock.now_s, 10.0, lambda m: None, errors.append)
    h.advance(0.5)
    assert states(h) == {"a": "suspect"}
    assert len(errors) == 1 and isinstance(errors[0], NotLeaderError) and "a is suspect" in str(errors[0])
    h.advance(0.5)
    assert states(h) == {"a": "dead"}
    h.advance(2.5)
    assert states(h) == {"a": "dead"}
    effects = advance(h, 0.5)  # member_timeout_s after it died
    assert states(h) == {}
    assert Disconnect("a") in effects and Unsubscribe(a["pub_address"]) in effects
    assert "a" not in h.core.peer_endpoints


def test_a_goodbye_marks_a_member_left_and_only_a_newer_incarnation_brings_it_back(lone):
    a = member_info("a", 7000, incarnation=5)
    lone.handle(heartbeat(a))
    lone.handle(EventReceived(wire.Message("goodbye", "a", 0, {"node_id": "a", "incarnation": 4})))
    assert states(lone) == {"a": "alive"}  # an older incarnation's goodbye
    lone.handle(EventReceived(wire.Message("goodbye", "a", 0, {"node_id": "a", "incarnation": 5})))
    assert states(lone) == {"a": "left"}
    lone.handle(heartbeat(a))  # a late heartbeat from before the goodbye
    assert states(lone) == {"a": "left"}
    lone.handle(heartbeat(member_info("a", 7000, incarnation=6)))  # restarted
    assert states(lone) == {"a": "alive"}


def test_leader_hints_keep_the_newest_epoch_and_name_only_a_live_leader():
    h = CoreHarness("n1", failure_timeout_s=1.0)
    h.handle(heartbeat(member_info("a", 7000), leads=[["t", 0, 3]]))
    h.handle(heartbeat(member_info("b", 7010), leads=[["t", 0, 2]]))  # an older epoch: ignored
    assert h.core.mesh.hinted_leader("t", 0) == "a"
    assert h.core.mesh.hinted_leader("t", 1) is None
    h.advance(1.0)
    h.handle(heartbeat(member_info("b", 7010)))
    assert h.core.mesh.hinted_leader("t", 0) is None  # a is dead


def test_a_heartbeat_that_no_longer_lists_a_partition_withdraws_the_hint_naming_its_sender():
    h = CoreHarness("n1")
    a, b = member_info("a", 7000), member_info("b", 7010)
    h.handle(heartbeat(a, leads=[["t", 0, 3], ["t", 1, 3]]))
    h.handle(heartbeat(b, leads=[["t", 2, 5]]))
    h.handle(heartbeat(a, leads=[["t", 1, 3]]))  # a stepped down from t/0 (or handed it over)
    assert h.core.mesh.hinted_leader("t", 0) is None
    assert h.core.mesh.hinted_leader("t", 1) == "a"  # still listed
    assert h.core.mesh.hinted_leader("t", 2) == "b"  # named another node: a's heartbeat says nothing of it
    assert h.core.host.current_leader("t", 0) is None
    h.handle(heartbeat(a, leads=[]))
    assert h.core.mesh.hinted_leader("t", 1) is None and h.core.mesh.hinted_leader("t", 2) == "b"


def test_a_withdrawn_hint_keeps_its_epoch_as_a_floor_that_only_a_newer_epoch_passes():
    h = CoreHarness("n1")
    a, b, c = member_info("a", 7000), member_info("b", 7010), member_info("c", 7020)
    h.handle(heartbeat(a, leads=[["t", 0, 3]]))
    h.handle(heartbeat(a, leads=[]))
    h.handle(heartbeat(a, leads=[["t", 0, 3]]))  # a late or duplicated heartbeat from before the step-down
    assert h.core.mesh.hinted_leader("t", 0) is None
    h.handle(heartbeat(b, leads=[["t", 0, 2]]))  # a stale minority leader of an older epoch
    assert h.core.mesh.hinted_leader("t", 0) is None
    h.handle(heartbeat(c, leads=[["t", 0, 4]]))  # the new leader
    assert h.core.mesh.hinted_leader("t", 0) == "c"
    h.handle(heartbeat(a, leads=[]))  # a no longer leads it, but the hint names c: untouched
    assert h.core.mesh.hinted_leader("t", 0) == "c"
    h.handle(heartbeat(a, leads=[["t", 0, 5]]))  # a elected again
    assert h.core.mesh.hinted_leader("t", 0) == "a"
    h.handle(heartbeat(c, leads=[]))  # c's step-down from epoch 4 says nothing of a's epoch 5
    assert h.core.mesh.hinted_leader("t", 0) == "a"


def test_a_non_replica_storage_node_stops_naming_a_leader_that_stepped_down_in_a_minority():
    net = Net("n1", "n2", "n3", "n4")
    net.form()
    create_topic(net.leader(), "t", 1, 3, net=net)
    replicas = net.leader().core.meta.assignments["t"][0]
    outsider = net[next(n for n in sorted(net.nodes) if n not in replicas)]

    def leader_of_t0() -> str | None:
        leaders = [n for n in replicas if ("t", 0) in net[n].core.partitions
                   and net[n].core.partitions[("t", 0)].replica.is_leader]
        return leaders[0] if leaders else None

    net.run_until(lambda: leader_of_t0() is not None and outsider.core.host.current_leader("t", 0) == leader_of_t0(),
                  within_s=10.0)
    old_leader = leader_of_t0()
    net.cut(*[n for n in replicas if n != old_leader])  # the leader keeps only the outsider
    net.run_until(lambda: leader_of_t0() is None, within_s=10.0)  # its lease ran out: it stepped down
    net.run(1.0)  # two heartbeats of the old leader, which no longer list t/0
    assert outsider.core.mesh.liveness(old_leader) == "alive"
    assert outsider.core.host.current_leader("t", 0) is None
    assert outsider.core.mesh.leader_hints[("t", 0)][1] is None


def test_a_seed_that_does_not_answer_is_greeted_again_half_a_second_after_each_timeout():
    h = CoreHarness("n1", seeds=("127.0.0.1:9100",))
    assert [peer for peer, _ in sent_of(h, "hello", clear=True)] == ["seed:127.0.0.1:9100"]
    h.advance(2.0)  # the hello times out; its retry is set for half a second later
    assert sent_of(h, "hello") == []
    h.advance(0.5)
    assert [peer for peer, _ in sent_of(h, "hello")] == ["seed:127.0.0.1:9100"]


def test_a_node_discovered_by_one_side_learns_of_it_from_its_hello_and_heartbeats_keep_both_alive():
    net = Net("a", "b")
    net.introduce("a")  # only a discovers b; b learns a from a's hello
    net.pump()
    assert states(net["a"]) == {"b": "alive"} and states(net["b"]) == {"a": "alive"}
    net.run(10.0)
    assert states(net["a"]) == {"b": "alive"} and states(net["b"]) == {"a": "alive"}
    net.cut("b")
    net.run(3.5)  # failure_timeout_s (3 s) after b's last heartbeat
    assert states(net["a"]) == {"b": "dead"}


def test_discovery_of_ourselves_is_ignored(lone):
    lone.handle(PeerDiscovered(lone.core.mesh.self_info()))
    lone.handle(PeerDiscovered({**member_info("n1", 7000)}))
    assert states(lone) == {}


def test_a_client_cut_off_from_every_storage_node_asks_its_seeds_again_at_least_every_0_625_s(monkeypatch):
    # After a split heals, a client on the minority side that forgot every member is found again
    # only through its seeds: the wait between asks must stay short (issue #19 item 10: the
    # first ack within 1 s of a heal; a 4 s cap made it 6.5 s).
    h = CoreHarness("c1", role="client", seeds=("127.0.0.1:9100",))
    asks: list[float] = []
    monkeypatch.setattr(h.core.mesh, "hello_seeds_again", lambda now_s: asks.append(now_s) or True)
    now = h.clock.now_s
    for step in range(2000):  # 20 s cut off, checked every 10 ms
        h.core.mesh.fall_back_to_seeds(now + step * 0.01)
    gaps = [b - a for a, b in zip(asks, asks[1:])]
    assert len(asks) > 30 and max(gaps) <= 0.625 + 0.01


def addresses(h: CoreHarness) -> dict[str, str]:
    return {m.node_id: m.address for m in h.core.members.members.values() if m.node_id != h.core.node_id}


def test_a_spoofed_record_naming_a_live_member_at_another_address_is_refused_and_counted(lone):
    victim = member_info("victim", 7000, incarnation=5)
    lone.handle(heartbeat(victim))  # the victim itself: alive at 7000
    lone.connects.clear()
    spoof = {**member_info("victim", 9000, incarnation=1 << 60)}  # an mDNS record with a huge incarnation
    for _ in range(3):
        lone.handle(PeerDiscovered(spoof))
        lone.handle(heartbeat(member_info("gossiper", 7100), members=[spoof]))  # the same, second-hand by gossip
    assert addresses(lone)["victim"] == "tcp://127.0.0.1:7000"
    assert lone.core.members.members["victim"].incarnation == 5
    assert not [c for c in lone.connects if c.peer == "victim"], "no new connection towards the spoofed address"
    assert lone.core.counters["member_records_refused"] == 6
    # the victim keeps its place: its own heartbeats still count, at its own address
    lone.advance(2.0)
    lone.handle(heartbeat(victim))
    assert states(lone)["victim"] == "alive" and addresses(lone)["victim"] == "tcp://127.0.0.1:7000"


def test_a_member_restarted_at_a_new_address_moves_when_it_speaks_itself(lone):
    lone.handle(heartbeat(member_info("a", 7000, incarnation=1)))
    moved = member_info("a", 7200, incarnation=2)
    lone.handle(PeerDiscovered(moved))  # second-hand while the old incarnation is still alive: refused
    assert addresses(lone)["a"] == "tcp://127.0.0.1:7000"
    lone.connects.clear()
    lone.handle(heartbeat(moved))  # the node itself, from its new incarnation
    assert addresses(lone)["a"] == "tcp://127.0.0.1:7200"
    assert [c.endpoint for c in lone.connects if c.peer == "a"] == ["tcp://127.0.0.1:7200"]


def test_a_dead_member_may_move_second_hand_but_its_own_voice_wins_over_a_spoof(lone):
    lone.handle(heartbeat(member_info("a", 7000, incarnation=3)))
    lone.advance(3.5)  # failure_timeout_s: dead
    assert states(lone)["a"] == "dead"
    lone.handle(PeerDiscovered(member_info("a", 9000, incarnation=1 << 60)))  # a spoof while it is away
    assert addresses(lone)["a"] == "tcp://127.0.0.1:9000"
    lone.handle(heartbeat(member_info("a", 7000, incarnation=4)))  # back: it speaks itself, at a lower incarnation
    assert addresses(lone)["a"] == "tcp://127.0.0.1:7000" and states(lone)["a"] == "alive"
    lone.handle(PeerDiscovered(member_info("a", 9000, incarnation=1 << 60)))
    assert addresses(lone)["a"] == "tcp://127.0.0.1:7000"
