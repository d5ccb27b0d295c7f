"""The ``formation`` room (meshq.core.cluster.formation): join, form or merge the metadata group."""

from __future__ import annotations

from tests.core.harness import CoreHarness
from tests.core.rooms.conftest import Net, create_topic, heartbeat, member_info, sent_of, steps


def run(h: CoreHarness, seconds: float, heard: tuple[dict, ...] = ()) -> None:
    """Let ``seconds`` pass while each node of ``heard`` keeps publishing an unformed heartbeat."""
    steps(h, seconds, lambda: [h.handle(heartbeat(info, can_form=True)) for info in heard])


def test_a_node_without_seeds_or_mdns_forms_a_trivial_one_member_group_at_start(lone):
    raft = lone.core.raft
    assert raft.formed and list(raft.voters) == ["n1"] and raft.role == "leader"
    assert lone.core.formation.summary() == {"formed": True, "leader": "n1", "size": 1, "trivial": True,
                                             "can_form": False, "formation": raft.formation, "empty": True}
    assert raft.formation.startswith("n1.")  # the founder's id and the wall clock when it formed
    create_topic(lone, "t")
    assert lone.core.formation.summary()["trivial"] is False  # it now holds something
    assert lone.core.formation.summary()["empty"] is False


def test_a_node_never_forms_a_group_while_a_seed_is_silent():
    h = CoreHarness("n1", seeds=("127.0.0.1:9100",))
    h.advance(10.0)
    assert not h.core.raft.formed
    assert h.core.formation.summary() == {"formed": False, "leader": None, "size": 0, "trivial": False,
                                          "can_form": False, "formation": "", "empty": False}


def test_with_mdns_a_node_waits_bootstrap_wait_s_before_forming():
    h = CoreHarness("n1", mdns=True, bootstrap_wait_s=1.0)
    run(h, 0.9)
    assert not h.core.raft.formed
    run(h, 0.3)
    assert h.core.raft.formed


def test_only_the_lowest_id_among_the_unformed_storage_nodes_forms():
    higher = CoreHarness("n2", mdns=True)
    run(higher, 3.0, heard=(member_info("n1", 7000),))
    assert not higher.core.raft.formed
    lowest = CoreHarness("n1", mdns=True)
    run(lowest, 1.2, heard=(member_info("n2", 7000),))
    assert lowest.core.raft.formed


def test_a_node_outside_the_group_asks_the_leader_its_peers_name_to_admit_it():
    h = CoreHarness("n9", seeds=("127.0.0.1:9100",))  # its seed never answers: it cannot form
    a = member_info("a", 7000)
    h.sent.clear()
    h.handle(heartbeat(a, formed=True, leader="a", size=1))
    assert [(peer, message.body["member"]["node_id"]) for peer, message in sent_of(h, "raft_join")] == [("a", "n9")]
    assert h.core.formation.named_leaders() == ["a"]


def test_two_trivial_groups_that_meet_merge_around_the_lower_leader_id():
    net = Net("n1", "n2")
    leader = net.form()
    assert leader.core.node_id == "n1"
    assert [sorted(h.core.raft.voters) for h in net.nodes.values()] == [["n1", "n2"], ["n1", "n2"]]


def test_a_group_that_holds_a_topic_never_gives_itself_up_even_to_a_lower_id():
    net = Net("n1", "n2")
    create_topic(net["n2"], "keep", 2)
    leader = net.form()
    assert leader.core.node_id == "n2"
    assert sorted(net["n1"].core.topics) == ["keep"] and sorted(net["n1"].core.raft.voters) == ["n1", "n2"]


def test_the_summary_of_a_forgotten_member_is_dropped():
    h = CoreHarness("n1", seeds=("127.0.0.1:9100",), failure_timeout_s=1.0, member_timeout_s=2.0)
    h.handle(heartbeat(member_info("a", 7000), formed=True, leader="a", size=1))
    assert h.core.formation.named_leaders() == ["a"]
    steps(h, 3.5)  # dead after 1 s, forgotten 2 s later
    assert "a" not in h.core.members
    assert h.core.formation.named_leaders() == [] and h.core.formation.peer_clusters == {}


def test_a_node_defers_to_a_lower_id_that_said_hello_before_its_state_is_known():
    """The race behind a CI failure (two clusters formed at once, each joined before they met, so neither is
    trivial any more and they stay apart for good): ``n2`` starts alone with mDNS; ``n1`` starts with ``n2`` as
    its seed and says hello. ``n2`` now knows ``n1`` as a live member but not its metadata state (a hello
    carries none); ``n1`` hears ``n2`` unformed and, the lowest id, forms at once. ``n2`` must not form in that
    window: it waits for ``n1``'s state, and joins ``n1``'s cluster when its heartbeat says it formed."""
    h = CoreHarness("n2", mdns=True, bootstrap_wait_s=1.0)
    lower = member_info("n1", 7000)
    steps(h, 0.8)
    assert h.request("hello", {"member": lower}) is not None
    steps(h, 0.6)  # past bootstrap_wait_s: before the fix n2 formed here
    assert not h.core.raft.formed, "n2 formed while a lower id that said hello may be forming"
    h.sent.clear()
    h.handle(heartbeat(lower, formed=True, leader="n1", size=1, trivial=True))
    assert not h.core.raft.formed
    assert [peer for peer, _message in sent_of(h, "raft_join")] == ["n1"]


def test_a_lower_id_that_stays_unable_to_form_is_waited_for_a_bounded_time():
    """A lower id whose own seeds stay silent never forms (``can_form`` false): after the patience the higher
    id forms anyway, and the lower one joins it once its seeds answer."""
    h = CoreHarness("n2", mdns=True, bootstrap_wait_s=1.0)
    lower = member_info("n1", 7000)
    steps(h, 1.2, lambda: h.handle(heartbeat(lower, can_form=False)))
    assert not h.core.raft.formed
    steps(h, 2.5, lambda: h.handle(heartbeat(lower, can_form=False)))
    assert h.core.raft.formed
