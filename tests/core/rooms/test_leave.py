"""The ``leave`` room (meshq.core.cluster.leave): ``meshq leave``, drain, then go."""

from __future__ import annotations

from meshq.core import wire
from tests.core.harness import CoreHarness
from tests.core.rooms.conftest import Net, answers, create_topic, error_of, steps


def ask_leave(h: CoreHarness, node_id: str | None = None) -> wire.Message | None:
    return h.request("leave", {"node_id": node_id or h.core.node_id})


def draining_cluster() -> tuple[Net, CoreHarness]:
    """n1, n2, n3 with a topic of six single-replica partitions, three of them on n3, which was
    just asked to leave (and answered that it is draining them)."""
    net = Net("n1", "n2", "n3")
    leader = net.form()
    create_topic(leader, "t", 6, net=net)
    assert leader.core.meta.assigned_to("n3") == 3
    leaving = net["n3"]
    assert ask_leave(leaving) is None  # answered once the metadata leader answers
    net.pump()
    assert answers(leaving)[77].body == {"state": "draining", "assigned": 3}
    return net, leaving


def test_leave_sent_to_another_node_is_refused_and_changes_nothing(lone):
    assert error_of(ask_leave(lone, "n2")) == (
        "usage", "this is node n1, not n2: send meshq leave to the node that should leave")
    assert not lone.core.leave.leaving and "leaving" not in lone.core.raft.voters["n1"]


def test_a_client_refuses_leave_saying_it_holds_nothing(client):
    assert error_of(ask_leave(client)) == ("not_leader", "node c1 is a client and holds no partitions")


def test_a_leaving_node_is_let_go_once_its_partitions_moved_away_and_then_answers_left():
    net, leaving = draining_cluster()
    leader = net["n1"]
    net.run_until(lambda: leaving.core.leave.has_left, within_s=10.0)
    assert leader.core.meta.assigned_to("n3") == 0
    assert sorted(leader.core.raft.voters) == ["n1", "n2"]
    assert leaving.core.partitions == {}  # every copy handed over, then deleted here
    assert ask_leave(leaving).body == {"state": "left", "assigned": 0}


def test_a_leaving_node_asks_the_metadata_leader_once_a_second_how_far_it_got():
    net, leaving = draining_cluster()
    since_s = net.clock.now_s + 0.01  # after the leave request itself
    net.cut("n3")  # it never hears the answer, so it keeps asking
    net.run(3.6)
    asked = net.sent("n3", "raft_propose", since_s)
    assert [peer for _t, peer in asked] == ["n1"] * len(asked) and len(asked) == 3
    gaps = [later - earlier for (earlier, _), (later, _) in zip(asked, asked[1:])]
    assert all(1.0 <= gap <= 1.2 for gap in gaps), gaps


def test_the_last_member_drains_but_is_never_removed(lone):
    assert ask_leave(lone).body == {"state": "draining", "assigned": 0}
    steps(lone, 3.0)
    assert ask_leave(lone).body == {"state": "draining", "assigned": 0}
    assert list(lone.core.raft.voters) == ["n1"] and not lone.core.leave.has_left


def test_leave_with_no_metadata_leader_known_fails_with_a_retriable_error():
    h = CoreHarness("n9", seeds=("127.0.0.1:9100",))  # never formed, no peer names a leader
    assert error_of(ask_leave(h)) == ("not_leader", "the metadata group has no leader right now; retry")


def test_a_node_let_go_before_it_applied_its_last_drop_steps_deletes_its_leftover_copies():
    # A removed member gets no more of the metadata log, so it may never apply the steps that
    # dropped its last copies (seen in CI: a left node's data dir kept 558 kB). Here n3 skips
    # every step that drops it; once the leader answers "left" it must delete them itself.
    net, leaving = draining_cluster()
    host = leaving.core.host
    applied = host.reconfigure_partition

    def skip_drops(key):
        voters, learners, _version = host.meta.partition_config(*key)
        if "n3" in voters or "n3" in learners or key not in host.partitions:
            applied(key)

    host.reconfigure_partition = skip_drops
    net.run_until(lambda: net["n1"].core.meta.assigned_to("n3") == 0, within_s=10.0)
    assert leaving.core.partitions, "the test needs n3 to still hold copies when it is let go"
    kept = sorted(leaving.core.partitions)
    net.run_until(lambda: leaving.core.leave.has_left, within_s=10.0)
    assert leaving.core.partitions == {}
    assert not set(kept) & set(leaving.storage.logs())


def test_a_node_that_asks_to_join_again_and_is_then_told_to_leave_is_not_made_a_voter():
    # (a left node restarted: a restart asks to join as a new start; its leave is then asked again)
    net, leaving = draining_cluster()
    leader = net["n1"]
    net.run_until(lambda: leaving.core.leave.has_left, within_s=10.0)
    leader.request("raft_join", {"member": leaving.core.mesh.self_info()}, request_id=0)
    assert "n3" in leader.core.raft.learners
    assert leader.core.leave.state_of("n3", net.clock.now_s) == {"state": "left", "assigned": 0}
    assert "n3" not in leader.core.raft.learners
    net.run(3.0)
    assert sorted(leader.core.raft.voters) == ["n1", "n2"]
