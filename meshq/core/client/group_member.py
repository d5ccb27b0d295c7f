"""One consumer-group member as its own node sees it: joining, holding partitions, letting go.

Theory of operation
-------------------
The coordinator side (``meshq.core.partitions.coordinator``) owns the group; this pure state
is the member's half, driven by the ``group_client`` room (which sends what ``next_request``
names and feeds the answers back) and read by the consumer (``view``):

* ``joining``: it sends ``join_group`` until the coordinator answers ``stable`` with its
  generation and partitions (while the group is ``rebalancing`` it asks again every
  ``JOIN_RETRY_S``);
* ``assigned``: it holds those partitions and sends ``group_heartbeat`` every heartbeat
  interval. Heartbeats are sent by the node's core, not by the user's poll loop, so user
  code that is slow between polls does not end the session;
* ``revoking``: a heartbeat said ``rebalancing`` or another generation, or ``unknown_member``,
  or no heartbeat was answered for a session: the consumer must stop fetching every
  partition, commit its positions and ``release``; heartbeats go on meanwhile. The consumer
  does this in its next ``poll`` (a consumer that does not poll within the session timeout
  of a rebalance is removed from the group, and its partitions go to the others);
* ``left``: closed (``leave``);
* ``refused``: the coordinator refused the join or a heartbeat with ``AuthorizationError``
  (this client key may not ``consume`` the topic): it sends nothing more, holds nothing, and
  the consumer raises the error (``view().error``).

Each join names its number (``seq``, growing by one per join sent). A member sends one join at a
time, none while it holds partitions, and drops the answer of a join it gave up on; so a join
numbered above the one whose answer handed it its partitions was sent after it let go of them.
The coordinator counts a join as the member's rejoin in a rebalance only then: a join delayed on
the wire (held by a paused coordinator) or duplicated does not end a rebalance while the member
still holds and reads its partitions.

The session rule that makes the coordinator's eviction safe: a member stops holding its
partitions once ``session_timeout_s - SESSION_SAFETY_S`` passed since it *sent* the last
heartbeat (or join) the coordinator answered for its generation. The coordinator evicts it no
earlier than ``session_timeout_s`` after it *received* that message, so the member has let go
first (assuming clocks that run at about the same rate).

Transitions::

    state      event                                           next
    --------   ---------------------------------------------   ---------
    joining    join answered stable (generation g, parts P)    assigned
    joining    join answered rebalancing / failed              joining (ask again)
    assigned   heartbeat answered stable, generation g         assigned (session renewed)
    assigned   heartbeat answered rebalancing or another g     revoking
    assigned   heartbeat refused unknown_member                revoking
    assigned   session lapsed (no answered heartbeat)          revoking
    revoking   the consumer released its partitions            joining
    *          join or heartbeat refused: authorization        refused
    *          leave                                           left

``version`` grows whenever what the consumer must act on changes (it waits on it).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshq.errors import AuthorizationError, MeshqError, RebalanceError

JOIN_RETRY_S = 0.2  # a join answered "rebalancing" (or failed) is sent again after this long
SESSION_SAFETY_S = 0.25  # a member lets go this long before the coordinator could evict it


@dataclass(frozen=True, slots=True)
class GroupView:
    """What the consumer acts on: hold ``partitions`` of ``generation`` (``assigned``), or let go
    of them (``revoking``); nothing is held while ``joining``."""

    version: int
    state: str
    generation: int
    partitions: tuple[int, ...]
    error: MeshqError | None = None  # with ``refused``: why


class GroupMember:
    """The member's half of the group protocol (see the module docstring)."""

    def __init__(self, group: str, topic: str, member_id: str, partition_count: int,
                 heartbeat_interval_s: float, session_timeout_s: float, now_s: float) -> None:
        self.group = group
        self.topic = topic
        self.member_id = member_id
        self.partition_count = partition_count
        self.heartbeat_interval_s = heartbeat_interval_s
        self.session_timeout_s = session_timeout_s  # until the coordinator tells its own
        self.state = "joining"
        self.generation = -1
        self.partitions: tuple[int, ...] = ()
        self.version = 0
        self.in_flight: str | None = None  # "join" | "heartbeat": one request at a time
        self.join_seq = -1  # joins sent so far - 1: each join names its number (``seq`` of join_group)
        self.next_send_s = now_s
        self.last_ok_sent_s = now_s  # send time of the last answered join/heartbeat of this generation
        self.error: MeshqError | None = None  # ``refused``: the AuthorizationError

    # ------------------------------------------------------------------ what to send, when
    def next_request(self, now_s: float) -> str | None:
        """``join`` or ``heartbeat`` to send now (marked in flight until answered), or None."""
        if self.in_flight is not None or self.state in ("left", "refused") or now_s < self.next_send_s:
            return None
        self.in_flight = "join" if self.state == "joining" else "heartbeat"
        if self.in_flight == "join":
            self.join_seq += 1
        return self.in_flight

    def next_deadline(self) -> float | None:
        deadlines = []
        if self.in_flight is None and self.state not in ("left", "refused"):
            deadlines.append(self.next_send_s)
        if self.state == "assigned":
            deadlines.append(self.session_end_s())
        return min(deadlines) if deadlines else None

    def session_end_s(self) -> float:
        return self.last_ok_sent_s + self.session_timeout_s - SESSION_SAFETY_S

    # ------------------------------------------------------------------ events
    def on_join_answer(self, state: str, generation: int, partitions: list[int], session_timeout_s: float,
                       sent_s: float, now_s: float) -> None:
        self.in_flight = None
        if self.state != "joining":
            return  # it left meanwhile
        self.session_timeout_s = session_timeout_s
        if state != "stable":
            self.next_send_s = now_s + JOIN_RETRY_S
            return
        self.state = "assigned"
        self.generation = generation
        self.partitions = tuple(sorted(partitions))
        self.last_ok_sent_s = sent_s
        self.next_send_s = now_s + self.heartbeat_interval_s
        self.version += 1

    def on_heartbeat_answer(self, state: str, generation: int, sent_s: float, now_s: float) -> None:
        self.in_flight = None
        self.next_send_s = now_s + self.heartbeat_interval_s
        if self.state != "assigned":
            return
        if state == "stable" and generation == self.generation:
            self.last_ok_sent_s = max(self.last_ok_sent_s, sent_s)
        else:
            self._revoke()

    def on_failed(self, error: MeshqError, now_s: float) -> None:
        """A join or heartbeat failed: asked again soon; ``unknown_member`` ends the generation."""
        self.in_flight = None
        self.next_send_s = now_s + JOIN_RETRY_S
        if isinstance(error, AuthorizationError) and self.state != "left":
            self.state, self.partitions, self.error = "refused", (), error
            self.version += 1
            return
        if isinstance(error, RebalanceError) and self.state == "assigned":
            self._revoke()

    def check_session(self, now_s: float) -> None:
        """No heartbeat answered for a session: let go before the coordinator can evict us."""
        if self.state == "assigned" and now_s >= self.session_end_s():
            self._revoke()

    def release(self, generation: int, now_s: float) -> None:
        """The consumer let go of the partitions of ``generation`` (and committed): join again."""
        if self.state == "revoking" and generation == self.generation:
            self.state = "joining"
            self.partitions = ()
            self.next_send_s = now_s

    def leave(self) -> None:
        self.state = "left"
        self.partitions = ()
        self.version += 1

    def view(self) -> GroupView:
        return GroupView(self.version, self.state, self.generation, self.partitions, self.error)

    def _revoke(self) -> None:
        self.state = "revoking"
        self.version += 1
