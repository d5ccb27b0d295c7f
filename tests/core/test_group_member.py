"""The member's pure half of the group protocol (meshq.core.client.group_member.GroupMember)."""

from __future__ import annotations

from meshq.core.client.group_member import JOIN_RETRY_S, SESSION_SAFETY_S, GroupMember
from meshq.errors import NotLeaderError, UnknownMemberError

HEARTBEAT_S = 0.5
SESSION_S = 4.0


def member(now_s: float = 0.0) -> GroupMember:
    return GroupMember("g", "t", "c1-00000001", 6, HEARTBEAT_S, SESSION_S, now_s)


def assigned(now_s: float = 0.0, generation: int = 7, partitions=(0, 1)) -> GroupMember:
    m = member(now_s)
    assert m.next_request(now_s) == "join"
    m.on_join_answer("stable", generation, list(partitions), SESSION_S, now_s, now_s)
    return m


def test_it_joins_until_the_coordinator_answers_stable():
    m = member()
    assert m.next_request(0.0) == "join"
    assert m.next_request(0.0) is None  # one request at a time
    m.on_join_answer("rebalancing", 7, [], SESSION_S, 0.0, 0.1)
    assert m.next_request(0.1) is None
    assert m.next_request(0.1 + JOIN_RETRY_S) == "join"
    m.on_join_answer("stable", 8, [3, 1], SESSION_S, 0.3, 0.35)
    view = m.view()
    assert (view.state, view.generation, view.partitions, view.version) == ("assigned", 8, (1, 3), 1)


def test_it_heartbeats_every_interval_and_a_stable_answer_renews_the_session():
    m = assigned()
    assert m.next_request(0.1) is None
    assert m.next_request(HEARTBEAT_S) == "heartbeat"
    m.on_heartbeat_answer("stable", 7, HEARTBEAT_S, 0.6)
    assert m.session_end_s() == HEARTBEAT_S + SESSION_S - SESSION_SAFETY_S
    assert m.view().state == "assigned"


def test_a_rebalance_or_another_generation_makes_it_let_go():
    for state, generation in (("rebalancing", 7), ("stable", 9)):
        m = assigned()
        m.next_request(HEARTBEAT_S)
        m.on_heartbeat_answer(state, generation, HEARTBEAT_S, 0.6)
        assert (m.view().state, m.view().version) == ("revoking", 2)


def test_unknown_member_makes_it_let_go_but_a_moved_coordinator_does_not():
    m = assigned()
    m.next_request(HEARTBEAT_S)
    m.on_failed(NotLeaderError("moved"), 0.6)
    assert m.view().state == "assigned"
    assert m.next_request(0.6 + JOIN_RETRY_S) == "heartbeat"
    m.on_failed(UnknownMemberError("who?"), 0.9)
    assert m.view().state == "revoking"


def test_without_an_answered_heartbeat_it_lets_go_before_the_coordinator_could_evict_it():
    m = assigned(now_s=0.0)
    m.check_session(SESSION_S - SESSION_SAFETY_S - 0.01)
    assert m.view().state == "assigned"
    assert m.next_deadline() <= SESSION_S - SESSION_SAFETY_S
    m.check_session(SESSION_S - SESSION_SAFETY_S)
    assert m.view().state == "revoking"


def test_after_the_consumer_released_it_joins_again():
    m = assigned()
    m.next_request(HEARTBEAT_S)
    m.on_heartbeat_answer("rebalancing", 7, HEARTBEAT_S, 0.6)
    m.release(6, 0.7)  # another generation's release does nothing
    assert m.view().state == "revoking"
    assert m.next_request(1.1) == "heartbeat"  # heartbeats go on while the consumer lets go
    m.on_heartbeat_answer("rebalancing", 7, 1.1, 1.1)
    m.release(7, 1.2)
    assert (m.view().state, m.view().partitions) == ("joining", ())
    assert m.next_request(1.2) == "join"


def test_leave_ends_it():
    m = assigned()
    m.leave()
    assert (m.view().state, m.next_request(100.0), m.next_deadline()) == ("left", None, None)


def test_a_refused_join_or_heartbeat_ends_the_membership_with_the_authorization_error():
    from meshq.errors import AuthorizationError

    m = member()
    assert m.next_request(0.0) == "join"
    refusal = AuthorizationError("client 'bob' may not consume topic 't'")
    m.on_failed(refusal, 0.1)
    view = m.view()
    assert (view.state, view.partitions, view.error, view.version) == ("refused", (), refusal, 1)
    assert m.next_request(10.0) is None and m.next_deadline() is None  # sends nothing more
    held = assigned()
    assert held.next_request(HEARTBEAT_S) == "heartbeat"
    held.on_failed(refusal, HEARTBEAT_S)  # a revoke while it held partitions: it lets go of them too
    assert (held.view().state, held.view().partitions) == ("refused", ())
