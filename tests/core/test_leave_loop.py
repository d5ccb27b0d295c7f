"""The asking side of ``meshq leave`` (meshq.core.client.leave.LeaveLoop), driven by hand."""

from __future__ import annotations

import pytest

from meshq.core.client.leave import LeaveLoop
from meshq.errors import NodeStoppedError, NotLeaderError, UsageError


def never() -> bool:
    raise AssertionError("membership looked up when it should not be")


def test_answers_are_reported_and_left_ends_it():
    loop = LeaveLoop("n2", own=False, deadline_s=10.0)
    step = loop.answered({"state": "draining", "assigned": 3})
    assert step.report == {"state": "draining", "assigned": 3} and not step.done
    assert loop.answered({"state": "left", "assigned": 0}).done
    assert loop.wait_s(9.9) == pytest.approx(0.1) and loop.wait_s(0.0) == loop.poll_s
    assert loop.expired(10.0) and not loop.expired(9.0)


def test_a_retriable_error_is_reported_and_asked_again():
    loop = LeaveLoop("n2", own=False, deadline_s=10.0)
    step = loop.failed(NotLeaderError("no leader"), own_has_left=False, left_membership=lambda: False)
    assert not step.done and step.report["state"] == "retrying" and "NotLeaderError" in step.report["error"]
    assert "never answered" in str(loop.timeout_error(10.0))


def test_a_target_out_of_the_membership_has_left_even_if_its_answer_was_lost():
    loop = LeaveLoop("n2", own=False, deadline_s=10.0)
    step = loop.failed(NotLeaderError("timeout"), own_has_left=False, left_membership=lambda: True)
    assert step.done and step.report is None and loop.answer["state"] == "left"
    stopped = LeaveLoop("n2", own=False, deadline_s=10.0).failed(
        NodeStoppedError("stopped"), own_has_left=False, left_membership=lambda: True)
    assert stopped.done and stopped.report == {"state": "left", "assigned": 0}


def test_the_leaving_node_itself_has_left_once_it_was_let_go():
    loop = LeaveLoop("n1", own=True, deadline_s=10.0)
    step = loop.failed(NodeStoppedError("left"), own_has_left=True, left_membership=never)
    assert step.done and step.report == {"state": "left", "assigned": 0}


def test_a_non_retriable_error_is_raised():
    loop = LeaveLoop("n2", own=False, deadline_s=10.0)
    with pytest.raises(UsageError):
        loop.failed(UsageError("not known"), own_has_left=False, left_membership=lambda: False)


def test_the_timeout_names_what_is_still_assigned():
    loop = LeaveLoop("n2", own=False, deadline_s=10.0)
    loop.answered({"state": "draining", "assigned": 2})
    assert "2 partition(s) still name it" in str(loop.timeout_error(10.0))
