"""The ``coordinator`` room (group membership at the coordinator) and the ``group_client`` room
(the member's half, kept alive by its node's core), pumped together by the Net harness."""

from __future__ import annotations

from meshq.core.cluster.agreement import OFFSETS_TOPIC
from meshq.core.events import JoinGroup, LeaveGroup, ReleaseGroup, RequestReceived, WatchGroup
from meshq.core.partitions.coordinator import SESSION_MARGIN_S
from tests.core.rooms.conftest import Net, create_topic, error_of

FAILURE_TIMEOUT_S = 3.0
SESSION_S = FAILURE_TIMEOUT_S + SESSION_MARGIN_S


def mesh(*clients: str) -> Net:
    """A lone storage node n1 with a 6-partition topic ``t``, and client nodes that know it."""
    net = Net("n1", partitions=2)
    for client in clients:
        net.add(client, role="client", data_dir=None)
    net.introduce()
    net.run(1.0)
    create_topic(net["n1"], "t", 6)
    net["n1"].request("metadata", {"topics": [OFFSETS_TOPIC], "auto_create": False})
    net.run(0.5)
    return net


class Member:
    """A consumer as the tests drive it: joins through its node, lets go when told, like ``meshq.Consumer``."""

    def __init__(self, net: Net, node_id: str) -> None:
        self.net, self.h = net, net[node_id]
        token = self.h.command(JoinGroup("g", "t", 6))
        net.pump()
        self.member_id = self.h.resolved[token]
        self.released: list[int] = []

    def view(self):
        return self.h.core.group_client.view(self.member_id)

    def held(self) -> tuple[int, ...]:
        view = self.view()
        return view.partitions if view is not None and view.state == "assigned" else ()

    def let_go_if_asked(self) -> None:
        view = self.view()
        if view is not None and view.state == "revoking":
            self.released.append(view.generation)
            self.h.command(ReleaseGroup(self.member_id, view.generation))


def run_members(net: Net, members: list[Member], seconds: float, check=None) -> None:
    """Let ``seconds`` pass; members let go as soon as asked; ``check`` runs after each step."""
    end = net.clock.now_s + seconds
    while net.clock.now_s < end:
        net.run(0.05)
        for m in members:
            m.let_go_if_asked()
        net.pump()
        if check is not None:
            check()


def no_overlap(members: list[Member]) -> None:
    held = [p for m in members for p in m.held()]
    assert len(held) == len(set(held)), [(m.member_id, m.held()) for m in members]


def test_members_on_two_nodes_split_the_partitions_and_never_hold_one_twice():
    net = mesh("c1", "c2")
    a = Member(net, "c1")
    run_members(net, [a], 1.0)
    assert a.held() == (0, 1, 2, 3, 4, 5)
    b = Member(net, "c2")
    members = [a, b]
    run_members(net, members, 2.0, check=lambda: no_overlap(members))
    assert sorted(a.held() + b.held()) == [0, 1, 2, 3, 4, 5] and a.held() and b.held()
    assert a.released  # a let go of everything before the new assignment went out
    status = net["n1"].core.groups.lag_report()
    assert [(g["group"], g["state"], g["mode"], len(g["members"])) for g in status] == [("g", "stable", "stream", 2)]


def test_a_member_whose_node_is_cut_off_lets_go_and_its_partitions_move_within_the_session():
    net = mesh("c1", "c2")
    a, b = Member(net, "c1"), Member(net, "c2")
    members = [a, b]
    run_members(net, members, 2.0)
    assert a.held() and b.held()
    net.cut("c2")
    cut_s = net.clock.now_s
    b_let_go_s = []

    def check() -> None:
        no_overlap(members)
        if b.view().state != "assigned" and not b_let_go_s:
            b_let_go_s.append(net.clock.now_s)

    run_members(net, members, SESSION_S + 2.0, check=check)
    assert a.held() == (0, 1, 2, 3, 4, 5)
    assert b_let_go_s and b_let_go_s[0] - cut_s < SESSION_S  # it let go by itself, before the eviction
    assert net["n1"].core.counters["group_members_evicted"] == 1


def test_a_leave_hands_the_partitions_to_the_others_at_once():
    net = mesh("c1", "c2")
    a, b = Member(net, "c1"), Member(net, "c2")
    run_members(net, [a, b], 2.0)
    token = net["c2"].command(LeaveGroup(b.member_id))
    net.pump()
    assert net["c2"].resolved[token] is True
    run_members(net, [a], 1.0)  # well within a session: no eviction needed
    assert a.held() == (0, 1, 2, 3, 4, 5)


def test_a_watch_is_answered_at_once_if_the_view_changed_else_when_it_does():
    net = mesh("c1", "c2")
    a = Member(net, "c1")
    token = net["c1"].command(WatchGroup(a.member_id, 0))
    view = net["c1"].resolved[token]  # the join was answered already: version 1
    assert (view.version, view.state, view.partitions) == (1, "assigned", (0, 1, 2, 3, 4, 5))
    token = net["c1"].command(WatchGroup(a.member_id, view.version))
    run_members(net, [a], 1.0)
    assert token not in net["c1"].resolved
    Member(net, "c2")
    net.run(1.0)  # a's next heartbeat hears of the rebalance
    assert net["c1"].resolved[token].state == "revoking"


def test_a_commit_naming_a_member_is_refused_unless_it_holds_the_partition_in_this_generation():
    net = mesh("c1")
    a = Member(net, "c1")
    run_members(net, [a], 0.5)
    generation = a.view().generation
    n1 = net["n1"]

    def commit(member: str, generation: int):
        return n1.request("offset_commit", {"group": "g", "offsets": [{"topic": "t", "partition": 0, "offset": 1}],
                                            "member": member, "generation": generation})

    assert commit(a.member_id, generation).type == "offset_commit_ok"
    assert error_of(commit(a.member_id, generation - 1))[0] == "stale_generation"
    assert error_of(commit("c9-ffffffff", generation))[0] == "unknown_member"
    plain = n1.request("offset_commit", {"group": "g", "offsets": [{"topic": "t", "partition": 0, "offset": 2}]})
    assert plain.type == "offset_commit_ok"  # without a member: as before (tools, explicit partitions)


def test_losing_the_offsets_partition_forgets_the_membership_and_members_rejoin_with_unknown_member():
    net = mesh("c1")
    a = Member(net, "c1")
    run_members(net, [a], 0.5)
    n1 = net["n1"]
    key = (OFFSETS_TOPIC, n1.core.groups.offsets_partition("g"))
    n1.core.groups.on_leadership(key, False)  # as if another node took over
    assert n1.core.coordinator.groups == {}
    n1.core.groups.on_leadership(key, True)
    run_members(net, [a], 1.0)
    assert a.released  # told unknown_member at its next heartbeat: it let go and joined again
    assert a.held() == (0, 1, 2, 3, 4, 5)


def test_a_group_that_emptied_and_was_dropped_does_not_hand_out_a_generation_twice():
    net = mesh("c1")
    a = Member(net, "c1")
    run_members(net, [a], 0.5)
    first = a.view().generation
    net["c1"].command(LeaveGroup(a.member_id))
    run_members(net, [], SESSION_S + 1.0)  # the empty group's timer drops it
    assert "g" not in net["n1"].core.coordinator.groups
    b = Member(net, "c1")
    run_members(net, [b], 0.5)
    assert b.view().generation > first


def hold_joins(net: Net, node_id: str, sender: str) -> list:
    """From now on, ``node_id`` does not take the join_group requests of ``sender`` while the returned
    list's first item is True: they are kept (after it) to be handed in later, as a network or a
    paused coordinator delays them."""
    h = net[node_id]
    handle = h.handle
    held: list = [True]

    def holding_handle(event):
        if (held[0] and isinstance(event, RequestReceived) and event.message.type == "join_group"
                and event.route == ("net", sender)):
            held.append(event)
            return None
        return handle(event)

    h.handle = holding_handle
    return held


def test_every_join_of_a_member_names_its_number_one_more_than_the_last():
    net = mesh("c1")
    held = hold_joins(net, "n1", "c1")  # the coordinator never answers: the member keeps asking
    token = net["c1"].command(JoinGroup("g", "t", 6))
    net.pump()
    net.run(2 * 1.5 + 1.0)
    assert net["c1"].resolved[token]
    assert [event.message.body["seq"] for event in held[1:]] == list(range(len(held) - 1))
    assert len(held) - 1 >= 2


def test_a_join_delayed_past_the_one_that_handed_out_the_partitions_does_not_end_a_rebalance():
    """Simulator seed 241: a join held by a paused coordinator arrived after its member had been
    handed every partition and a rebalance had begun; counted as the member's rejoin, it let the
    partitions go to another member while the first still held them."""
    net = mesh("c1", "c2")
    held = hold_joins(net, "n1", "c1")
    a = Member(net, "c1")
    net.run(0.5)
    assert len(held) == 2 and a.held() == ()  # a's join #0 is held on the way
    held[0] = False
    net.run_until(lambda: a.held() == (0, 1, 2, 3, 4, 5), 5.0)  # #0 timed out; #1 was answered
    delayed = held[1]
    assert delayed.message.body["seq"] == 0
    coordinator = net["n1"].core.coordinator
    b = Member(net, "c2")  # a rebalance begins; a hears of it only at its next heartbeat
    assert coordinator.groups["g"].state == "rebalancing"
    net["n1"].handle(delayed)  # the delayed join #0 arrives now
    net.pump()
    group = coordinator.groups["g"]
    assert group.state == "rebalancing" and not group.members[a.member_id].rejoined
    assert net["c1"].core.out.late_replies.get("join_group_ok") == 1  # a dropped its answer
    members = [a, b]
    run_members(net, members, 3.0, check=lambda: no_overlap(members))
    assert sorted(a.held() + b.held()) == [0, 1, 2, 3, 4, 5] and a.held() and b.held()
    assert a.released  # the rebalance ended only once a had let go and joined again
