"""What ``meshq leave`` does on the asking side: ask, one question at a time, until ``left``.

Theory of operation
-------------------
Leaving is driven by the leaving node itself (``meshq.core.cluster.leave``); whoever asked for
it (``Node.leave``, ``meshq leave``, the simulator's workload) asks that node again and again
how far it got, one question at a time, each ``poll_s`` after the last answer, until the answer
is ``left`` or the deadline passes. ``LeaveLoop`` holds that asking as pure state, so the real
client and the simulator run the same decisions:

* an answer (``{"state": "draining"|"left", "assigned": N}``) is reported; ``left`` ends it;
* a node leaving itself that sees it was let go (``has_left``) has left, whatever the error;
* another node that stopped while the question was in flight, or that a retriable error hides,
  has left if the agreed membership no longer lists it (the caller looks that up: its last
  ``left`` answer may have been lost);
* any other retriable error is reported as ``retrying`` and asked again; a non-retriable one
  is raised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from meshq.errors import MeshqError, NodeStoppedError, TimeoutError

LEAVE_POLL_S = 0.25  # between two ``leave`` questions while a node drains (each is one small request)
LEFT = {"state": "left", "assigned": 0}


@dataclass(frozen=True, slots=True)
class LeaveStep:
    """What to do after one question: report ``report`` (if any), stop when ``done``."""

    report: dict | None
    done: bool


@dataclass(slots=True)
class LeaveLoop:
    """The asking side of one leave (see the module docstring)."""

    target: str
    own: bool  # the asking node is the one leaving
    deadline_s: float
    poll_s: float = LEAVE_POLL_S
    answer: dict = field(default_factory=dict)  # the last answer
    last_error: MeshqError | None = None

    def expired(self, now_s: float) -> bool:
        return now_s >= self.deadline_s

    def wait_s(self, now_s: float) -> float:
        """How long to wait before the next question."""
        return max(0.0, min(self.poll_s, self.deadline_s - now_s))

    def answered(self, answer: dict) -> LeaveStep:
        self.answer = answer
        return LeaveStep(answer, answer.get("state") == "left")

    def failed(self, error: MeshqError, *, own_has_left: bool, left_membership: Callable[[], bool]) -> LeaveStep:
        """A question failed with ``error``. ``own_has_left``: the asking node itself was let go;
        ``left_membership()``: whether the agreed membership no longer lists the target."""
        if self.own and own_has_left:
            self.answer = dict(LEFT)
            return LeaveStep(dict(LEFT), True)
        if not self.own and isinstance(error, NodeStoppedError) and left_membership():
            # the target stopped itself (it left) while our question was in flight
            self.answer = dict(LEFT)
            return LeaveStep(dict(LEFT), True)
        if not error.retriable:
            raise error
        self.last_error = error
        if not self.own and left_membership():
            self.answer = dict(LEFT)  # it left, and its ``left`` answer was lost
            return LeaveStep(None, True)
        return LeaveStep({"state": "retrying", "error": f"{type(error).__name__}: {error}"}, False)

    def timeout_error(self, timeout_s: float) -> TimeoutError:
        where = (f"{self.answer['assigned']} partition(s) still name it" if "assigned" in self.answer
                 else f"it never answered (last error: {self.last_error})")
        return TimeoutError(f"node {self.target} did not finish leaving within {timeout_s:g} s: {where}. Leaving "
                            f"goes on in the background: ask again to keep waiting, and watch the handoffs in "
                            f"`meshq status`")
