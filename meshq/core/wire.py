"""The wire protocol: versioned msgpack frames with one strict schema per message type.

Theory of operation
-------------------
A message is a ZeroMQ multipart message::

    [header, payload_0, ..., payload_n]

``header`` is a msgpack array ``[version, cluster, sender, type, request_id, body]``;
``body`` is a map validated against the schema registered for ``type``. Payload frames
are raw bytes (record batches) passed through without copying into msgpack; each type
declares how many it may carry.

``decode`` trusts nothing: the header frame is size-limited, unpacked with every
msgpack limit set and ext types refused, and each field is type- and range-checked.
Any defect raises one ``ProtocolError``; the caller drops the frame and counts it, so
a bad frame can never change state. Unknown extra body fields are ignored (forward
compatible within one version); missing or mistyped fields are errors.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from meshq.config import PROTOCOL_VERSION
from meshq.errors import ProtocolError

MAX_HEADER_BYTES = 1024 * 1024
MAX_PAYLOAD_FRAMES = 64
RPC_BATCH_ITEMS = 1024  # requests (answers) one rpc_batch (rpc_batch_ok) may carry
_MAX_ITEMS = 100_000

Check = Callable[[Any, str], Any]

# Check every outgoing body against its schema too (a meshq bug otherwise). Off in production:
# incoming messages are always checked, and this one costs a few µs on every message of the hot
# path. The runtime module switches it on when MESHQ_CHECK_OUTGOING=1 (the tests set it; the
# nodes they start inherit it) — the core itself reads no environment.
CHECK_OUTGOING = False


# ---------------------------------------------------------------- field checks
_SHORT = reprlib.Repr()
_SHORT.maxlevel = 3
_SHORT.maxstring = 40
_SHORT.maxother = 40


def short_repr(value: Any) -> str:
    """A bounded repr: safe on hostile values (huge or nested ~1000 deep)."""
    return _SHORT.repr(value)


def _fail(path: str, what: str, value: Any) -> ProtocolError:
    return ProtocolError(f"field {path}: expected {what}, got {short_repr(value)}")


def Int(low: int = -(1 << 63), high: int = (1 << 63) - 1) -> Check:
    def check(value: Any, path: str) -> int:
        if type(value) is not int or not low <= value <= high:
            raise _fail(path, f"integer in [{low}, {high}]", value)
        return value

    return check


def Float(low: float = 0.0, high: float = 1e18) -> Check:
    def check(value: Any, path: str) -> float:
        if type(value) not in (int, float) or not low <= value <= high:
            raise _fail(path, f"number in [{low}, {high}]", value)
        return float(value)

    return check


def Str(max_len: int = 256, min_len: int = 0) -> Check:
    def check(value: Any, path: str) -> str:
        if type(value) is not str or not min_len <= len(value) <= max_len:
            raise _fail(path, f"string of {min_len}-{max_len} characters", value)
        return value

    return check


def Bytes(max_len: int = 1 << 20) -> Check:
    def check(value: Any, path: str) -> bytes:
        if type(value) is not bytes or len(value) > max_len:
            raise _fail(path, f"bytes of at most {max_len}", value)
        return value

    return check


def Bool() -> Check:
    def check(value: Any, path: str) -> bool:
        if type(value) is not bool:
            raise _fail(path, "boolean", value)
        return value

    return check


def OneOf(*choices: Any) -> Check:
    def check(value: Any, path: str) -> Any:
        if type(value) not in (int, str) or value not in choices:
            raise _fail(path, f"one of {choices}", value)
        return value

    return check


def Optional(inner: Check) -> Check:
    def check(value: Any, path: str) -> Any:
        return None if value is None else inner(value, path)

    return check


def ListOf(inner: Check, max_len: int = 10_000) -> Check:
    def check(value: Any, path: str) -> list:
        if type(value) not in (list, tuple) or len(value) > max_len:
            raise _fail(path, f"list of at most {max_len}", value)
        try:  # (an item's own path is spelled only for the error: an f-string per item cost ~0.15 µs)
            return [inner(item, path) for item in value]
        except ProtocolError:
            for i, item in enumerate(value):
                inner(item, f"{path}[{i}]")  # raises again, naming the item
            raise

    return check


def MapOf(key: Check, inner: Check, max_len: int = 10_000) -> Check:
    def check(value: Any, path: str) -> dict:
        if type(value) is not dict or len(value) > max_len:
            raise _fail(path, f"map of at most {max_len}", value)
        return {key(k, f"{path}.<key>"): inner(v, f"{path}.{k}") for k, v in value.items()}

    return check


class Default:
    """A field a sender may leave out (an addition to a message type): absent, it reads as ``default``."""

    __slots__ = ("inner", "default")

    def __init__(self, inner: Check, default: Any) -> None:
        self.inner = inner
        self.default = default

    def __call__(self, value: Any, path: str) -> Any:
        return self.inner(value, path)


def Struct(**fields: Check) -> Check:
    """A map with required fields (extra fields are ignored; a ``Default`` field may be absent)."""

    top_level = tuple((name, field_check, name) for name, field_check in fields.items())  # (the body's paths)

    def check(value: Any, path: str) -> dict:
        if type(value) is not dict:
            raise _fail(path or "body", "map", value)
        out = {}
        # A message body (path "") is checked on every message: its fields' paths are spelled once, above.
        for name, field_check, field_path in (top_level if not path else
                                             ((n, c, f"{path}.{n}") for n, c in fields.items())):
            if name not in value:
                if type(field_check) is Default:
                    out[name] = field_check.default
                    continue
                raise ProtocolError(f"field {field_path}: missing")
            out[name] = field_check(value[name], field_path)
        return out

    return check


def StructWithOptional(required: dict[str, Check], optional: dict[str, Check]) -> Check:
    """A map with ``required`` fields and ``optional`` ones (kept only when present and not None);
    extra fields are ignored."""
    check_required = Struct(**required)

    def check(value: Any, path: str) -> dict:
        out = check_required(value, path)
        for name, field_check in optional.items():
            item = value.get(name)
            if item is not None:
                out[name] = field_check(item, f"{path + '.' if path else ''}{name}")
        return out

    return check


def Any_(max_depth: int = 8) -> Check:
    """Any msgpack value (bounded depth); used for free-form maps such as status."""

    def walk(value: Any, path: str, depth: int) -> Any:
        if depth > max_depth:
            raise _fail(path, f"nesting of at most {max_depth}", value)
        if value is None or type(value) in (bool, int, float, str, bytes):
            return value
        if type(value) in (list, tuple):
            return [walk(v, path, depth + 1) for v in value]
        if type(value) is dict:
            return {walk(k, path, depth + 1): walk(v, path, depth + 1) for k, v in value.items()}
        raise _fail(path, "plain value", value)

    return lambda value, path: walk(value, path, 0)


# ---------------------------------------------------------------- schemas
NAME = Str(200, 1)
NODE = Str(64, 1)
PARTITION = Int(0, 9_999)
OFFSET = Int(-2, (1 << 62))
COUNT = Int(0, 1 << 31)

TOPIC_CONFIG = Struct(
    name=NAME,
    partitions=Int(1, 10_000),
    replication_factor=Int(1, 16),
    retention_bytes=Optional(Int(1, 1 << 62)),
    retention_ms=Optional(Int(1, 1 << 62)),
    cleanup_policy=OneOf("delete", "compact"),
    delete_retention_ms=Default(Optional(Int(0, 1 << 62)), 24 * 3600 * 1000),  # compact topics' tombstones
)
PARTITION_INFO = Struct(
    partition=PARTITION,
    leader=Optional(NODE),
    replicas=ListOf(NODE, 16),
    in_sync=ListOf(NODE, 16),
    high_watermark=Int(0, 1 << 62),
)
TOPIC_META = Struct(config=TOPIC_CONFIG, partitions=ListOf(PARTITION_INFO, 10_000))
MEMBER = Struct(node_id=NODE, address=Str(300), role=OneOf("storage", "client"), state=Str(16, 1))
_ENDPOINT = re.compile(r"^tcp://[A-Za-z0-9._\-\[\]:]{1,255}:[0-9]{1,5}$")


def Endpoint() -> Check:
    """A ZeroMQ TCP endpoint ``tcp://host:port`` (a peer must not make us connect to anything else)."""

    def check(value: Any, path: str) -> str:
        if type(value) is not str or not _ENDPOINT.fullmatch(value) or not 0 < int(value.rsplit(":", 1)[1]) < 65536:
            raise _fail(path, "an endpoint tcp://host:port", value)
        return value

    return check


# ``key``: the CURVE public key (z85, 40 characters) a client node's ROUTER and PUB listen with, when the
# cluster runs with keys (absent without; storage nodes all use the cluster key, so they leave it out)
MEMBER_INFO = StructWithOptional(dict(node_id=NODE, address=Endpoint(), pub_address=Endpoint(),
                                      role=OneOf("storage", "client"), incarnation=Int(0, 1 << 62)),
                                 dict(key=Str(40, 40)))


def _raft_entry(value: Any, path: str) -> list:
    if type(value) not in (list, tuple) or len(value) != 2:
        raise _fail(path, "[term, command bytes]", value)
    return [Int(0, 1 << 62)(value[0], path + "[0]"), Bytes(1 << 20)(value[1], path + "[1]")]
MEMBER_ID = Str(128, 1)
GENERATION = Int(-1, 1 << 62)
TOPIC_PARTITION_OFFSET = Struct(topic=NAME, partition=PARTITION, offset=Int(0, 1 << 62))
EPOCH = Int(0, (1 << 31) - 1)  # stored in the batch header's signed 32-bit leader epoch field


def _lead(value: Any, path: str) -> list:
    """``[topic, partition, epoch, end offset, config version]``: a partition the heartbeat's sender
    leads, its log end offset (where a rebuild of the partition would start, ``metadata.py``) and
    the replica configuration version it leads in; a node of an older version sends neither."""
    if type(value) not in (list, tuple) or len(value) not in (3, 5):
        raise _fail(path, "[topic, partition, epoch, end offset, config version]", value)
    lead = [NAME(value[0], path + "[0]"), PARTITION(value[1], path + "[1]"), EPOCH(value[2], path + "[2]")]
    if len(value) == 5:
        lead += [Int(0, 1 << 62)(value[3], path + "[3]"), Int(0, (1 << 31) - 1)(value[4], path + "[4]")]
    return lead


# ``cv``: the sender's configuration version of the partition (replica set changes, metadata.py)
_REPL = {"topic": NAME, "partition": PARTITION, "epoch": EPOCH, "cv": Int(0, (1 << 31) - 1)}
_CLOCK = Default(Float(-1.0, 1e18), -1.0)  # a sender's own monotonic clock, s


@dataclass(frozen=True, slots=True)
class Schema:
    body: Check
    min_payloads: int = 0
    max_payloads: int = 0


# one answer of an ``rpc_batch_ok`` that is an error: [reason, error_type, message] (as ``rpc_error``)
def _rpc_item_error(value: Any, path: str) -> list:
    if type(value) is not list or len(value) != 3:
        raise _fail(path, "a [reason, error_type, message] array", value)
    return [OneOf("raised", "busy", "not_serving")(value[0], path + "[0]"), Str(200)(value[1], path + "[1]"),
            Str(4096)(value[2], path + "[2]")]


_RPC_ITEM_ERROR = _rpc_item_error


# a reassignment step a partition leader proposes to the metadata leader (metadata.py)
REASSIGN = Struct(op=OneOf("reassign"), topic=NAME, partition=PARTITION, version=Int(0, (1 << 31) - 1),
                  replicas=ListOf(NODE, 64), learners=ListOf(NODE, 64))

_GRANT = dict(name=Str(64, 1), permission=OneOf("produce", "consume", "admin", "publish", "subscribe", "request",
                                                 "serve"), pattern=Str(1024, 1))
ACL_COMMAND = Struct(op=OneOf("acl"), action=OneOf("grant", "revoke"), **_GRANT)  # in a raft_propose (meshq.core.acl)

_FORMATION = Default(Str(200), "")  # a metadata group's identity (raft.RaftNode.formation)

SCHEMAS: dict[str, Schema] = {
    # a voter of a formed group also says which (its summary as in hello_ok; absent from others and older senders):
    # a node of another group of our name learns it at once (meshq.core.cluster.formation)
    "hello": Schema(Struct(member=MEMBER_INFO, formed=Default(Bool(), False), leader=Default(Optional(NODE), None),
                           size=Default(Int(0, 1 << 16), 0), trivial=Default(Bool(), False),
                           can_form=Default(Bool(), False), formation=_FORMATION, empty=Default(Bool(), False))),
    "hello_ok": Schema(Struct(member=MEMBER_INFO, members=ListOf(MEMBER_INFO, 1000), formed=Bool(),
                              leader=Optional(NODE), size=Int(0, 1 << 16), trivial=Bool(), can_form=Bool(),
                              formation=Default(Str(200), ""), empty=Default(Bool(), False))),
    "heartbeat": Schema(Struct(member=MEMBER_INFO, members=ListOf(MEMBER_INFO, 1000), formed=Bool(),
                               leader=Optional(NODE), term=Int(0, 1 << 62), size=Int(0, 1 << 16),
                               trivial=Bool(), can_form=Bool(), leads=ListOf(_lead, 100_000),
                               adverts=Default(Int(0, 1 << 62), 0), formation=Default(Str(200), ""),
                               empty=Default(Bool(), False))),
    "goodbye": Schema(Struct(node_id=NODE, incarnation=Int(0, 1 << 62))),
    # what a node offers the mesh (meshq.core.mesh.adverts): published on change, pulled when a
    # heartbeat names a newer version than the one known
    "advert": Schema(Struct(node_id=NODE, incarnation=Int(0, 1 << 62), version=Int(0, 1 << 62),
                            adverts=MapOf(Str(64, 1), Any_(), 64))),
    "advert_get": Schema(Struct()),
    "advert_ok": Schema(Struct(node_id=NODE, incarnation=Int(0, 1 << 62), version=Int(0, 1 << 62),
                               adverts=MapOf(Str(64, 1), Any_(), 64))),
    # the metadata group's messages carry the sender's formation (its log's entry 0; "" before it has one, and from
    # a sender older than this field): a node drops those of another formation (meshq.core.cluster.formation)
    "raft_vote": Schema(Struct(term=Int(0, 1 << 62), candidate=NODE, last_index=Int(-1, 1 << 62),
                               last_term=Int(0, 1 << 62), pre_vote=Bool(), formation=_FORMATION)),
    "raft_vote_ok": Schema(Struct(term=Int(0, 1 << 62), granted=Bool(), pre_vote=Bool(), voter=NODE,
                                  for_term=Int(0, 1 << 62), formation=_FORMATION)),
    "raft_append": Schema(Struct(term=Int(0, 1 << 62), leader=NODE, prev_index=Int(-1, 1 << 62),
                                 prev_term=Int(0, 1 << 62), commit=Int(-1, 1 << 62),
                                 entries=ListOf(_raft_entry, 256), formation=_FORMATION)),
    "raft_append_ok": Schema(Struct(term=Int(0, 1 << 62), success=Bool(), match_index=Int(-1, 1 << 62),
                                    follower=NODE, hint=Int(0, 1 << 62), formation=_FORMATION)),
    # partition replication (meshq.core.replica); all one-way
    "repl_vote": Schema(Struct(**_REPL, candidate=NODE, last_epoch=EPOCH, end_offset=Int(0, 1 << 62),
                               pre_vote=Bool())),
    "repl_vote_ok": Schema(Struct(**_REPL, voter=NODE, granted=Bool(), pre_vote=Bool(), for_epoch=EPOCH)),
    # ts / echo / held: round-trip probes (meshq.core.partitions.latency); -1 (absent): none in this message.
    # lag: with a probe, how late the leader's timers run (the median, s); -1 (absent): not known
    "repl_append": Schema(Struct(**_REPL, leader=NODE, prev_offset=Int(-1, 1 << 62), prev_epoch=EPOCH,
                                 hw=Int(0, 1 << 62), epoch_start=Int(0, 1 << 62), log_start=Int(0, 1 << 62),
                                 ts=_CLOCK, echo=_CLOCK, held=Default(Float(0.0, 1e9), 0.0),
                                 lag=Default(Float(-1.0, 1e9), -1.0)), 0, 1),
    "repl_append_ok": Schema(Struct(**_REPL, follower=NODE, ok=Bool(), match_end=Int(-1, 1 << 62),
                                    hint=Int(0, 1 << 62), ts=_CLOCK, echo=_CLOCK)),
    "repl_timeout_now": Schema(Struct(**_REPL)),
    "repl_step_aside": Schema(Struct(**_REPL)),
    "raft_join": Schema(Struct(member=MEMBER_INFO)),
    "raft_propose": Schema(Struct(command=Bytes(1 << 20))),
    "raft_propose_ok": Schema(Struct(index=Int(0, 1 << 62))),
    # ``meshq leave``: asks the node itself; answered with how far its partitions have moved away
    "leave": Schema(Struct(node_id=NODE)),
    "leave_ok": Schema(Struct(state=OneOf("draining", "left"), assigned=Int(0, 1 << 31))),
    "metadata": Schema(Struct(topics=Optional(ListOf(NAME, 10_000)), auto_create=Bool())),
    "metadata_ok": Schema(Struct(members=ListOf(MEMBER, 1000), topics=ListOf(TOPIC_META, 10_000))),
    "create_topic": Schema(Struct(config=TOPIC_CONFIG, if_not_exists=Bool())),
    "create_topic_ok": Schema(Struct(topic=TOPIC_META, created=Bool())),
    "produce": Schema(
        Struct(topic=NAME, partition=PARTITION, acks=OneOf("none", "leader", "quorum", "all"),
               timeout_ms=Int(0, 1 << 31)),
        1, 1,
    ),
    "produce_ok": Schema(
        Struct(topic=NAME, partition=PARTITION, base_offset=Int(0, 1 << 62), duplicate=Bool())
    ),
    "fetch": Schema(
        Struct(topic=NAME, partition=PARTITION, offset=Int(0, 1 << 62), max_bytes=Int(1, 1 << 30),
               max_wait_ms=Int(0, 1 << 31))
    ),
    "fetch_ok": Schema(
        Struct(topic=NAME, partition=PARTITION, high_watermark=Int(0, 1 << 62),
               log_start_offset=Int(0, 1 << 62)),
        0, 1,
    ),
    # self-healing storage (meshq.core.partitions.repair): a replica asks a member of the replica
    # set for the intact batches of offsets damaged on its disk; answered with them (CRC-checked
    # by the asker), or with no payload when the member has no intact copy
    "repair_fetch": Schema(Struct(topic=NAME, partition=PARTITION, first=Int(0, 1 << 62), last=Int(0, 1 << 62))),
    "repair_fetch_ok": Schema(Struct(topic=NAME, partition=PARTITION), 0, 1),
    "list_offsets": Schema(Struct(topic=NAME, partition=PARTITION, timestamp_ms=Int(-2, 1 << 62))),
    "list_offsets_ok": Schema(Struct(offset=Int(0, 1 << 62))),
    # ``member``/``generation``: a group member's commit, refused unless that generation is the
    # coordinator's and the member holds the partitions (meshq.core.partitions.coordinator)
    "offset_commit": Schema(StructWithOptional({"group": NAME, "offsets": ListOf(TOPIC_PARTITION_OFFSET, 100_000)},
                                               {"member": MEMBER_ID, "generation": GENERATION,
                                                "session": Int(0, 1 << 62), "seq": Int(0, 1 << 62)})),
    "offset_commit_ok": Schema(Struct()),
    "offset_fetch": Schema(Struct(group=NAME, topic=NAME)),
    "offset_fetch_ok": Schema(Struct(offsets=ListOf(TOPIC_PARTITION_OFFSET, 100_000))),
    # consumer-group membership, answered by the group's coordinator (meshq.core.partitions.coordinator)
    # ``seq``: the member's count of joins sent; during a rebalance only a join sent after the one that
    # handed the member its partitions counts as its rejoin (a delayed or duplicated one does not)
    "join_group": Schema(StructWithOptional({"group": NAME, "topic": NAME, "member": MEMBER_ID,
                                             "partitions": Int(1, 10_000)}, {"seq": Int(0, 1 << 62)})),
    "join_group_ok": Schema(Struct(state=OneOf("rebalancing", "stable"), generation=GENERATION,
                                   partitions=ListOf(PARTITION, 10_000), session_timeout_ms=Int(1, 1 << 31))),
    "group_heartbeat": Schema(Struct(group=NAME, member=MEMBER_ID, generation=GENERATION)),
    "group_heartbeat_ok": Schema(Struct(state=OneOf("rebalancing", "stable"), generation=GENERATION)),
    "leave_group": Schema(Struct(group=NAME, member=MEMBER_ID)),
    "leave_group_ok": Schema(Struct(left=Bool())),
    # shared subscriptions (meshq.core.partitions.shared): ``index`` packs ">qi" (offset, delivery
    # count) per record of the payload batch, in its order; a share_ack payload packs ">qBI" (offset,
    # kind 0 ack / 1 nack / 2 reject, nack delay ms) per answer
    "share_fetch": Schema(Struct(group=NAME, topic=NAME, partition=PARTITION, member=Str(200, 1),
                                 max_records=Int(1, 100_000), max_wait_ms=Int(0, 1 << 31),
                                 ack_timeout_ms=Int(1, 1 << 31), max_deliveries=Int(1, 1 << 20))),
    "share_fetch_ok": Schema(Struct(topic=NAME, partition=PARTITION, index=Bytes(12 * 100_000)), 0, 1),
    "share_ack": Schema(Struct(group=NAME, topic=NAME, partition=PARTITION, member=Str(200, 1)), 1, 1),
    "share_ack_ok": Schema(Struct(stale=Bytes(8 * 100_000))),  # ">q" per offset whose answer was stale
    # permissions (meshq.core.cluster.access): admin key only; ``changed`` false: it was already so
    "acl_change": Schema(Struct(action=OneOf("grant", "revoke"), **_GRANT)),
    "acl_change_ok": Schema(Struct(changed=Bool())),
    "acl_list": Schema(Struct()),
    "acl_list_ok": Schema(Struct(grants=ListOf(Struct(**_GRANT), 10_000))),
    # the grants client nodes check among themselves (acl.PEER_PERMISSIONS) and the names of the trusted
    # client keys (z85 public key -> name): served by storage nodes to any trusted key
    "acl_view": Schema(Struct()),
    "acl_view_ok": Schema(Struct(grants=ListOf(Struct(**_GRANT), 10_000), names=MapOf(Str(40, 40), Str(64, 1),
                                                                                        10_000))),
    "status": Schema(Struct()),
    "status_ok": Schema(Struct(status=Any_())),
    # ``leader``: with ``not_leader``, the node the sender believes leads (absent or nil: unknown)
    "error": Schema(Struct(code=Str(64, 1), message=Str(4096), retriable=Bool(),
                           leader=Default(Optional(NODE), None))),
    # request/reply (meshq.core.rpc): the payload is the one frame; ``incarnation`` is the caller's
    # (with its node id and the request id: the key that keeps a request from running twice)
    "rpc_request": Schema(Struct(service=Str(1024, 1), incarnation=Int(0, 1 << 62), timeout_ms=Int(0, 1 << 31)),
                          1, 1),
    "rpc_reply": Schema(Struct(), 1, 1),
    # ``raised``: the handler raised (error_type, message); ``busy`` / ``not_serving``: it did not
    # run here, the caller tries another instance
    "rpc_error": Schema(Struct(reason=OneOf("raised", "busy", "not_serving"), error_type=Str(200),
                               message=Str(4096))),
    # several requests to one service in one message (request id 0: the envelope itself is not
    # answered): item i is request ``ids[i]`` with ``timeouts_ms[i]``; the one payload frame holds
    # the requests back to back, item i's ``sizes[i]`` bytes after the previous ones (one frame,
    # not one per request: every frame costs a send and a receive). Each item is answered on its
    # own id: by ``rpc_reply`` / ``rpc_error``, or inside an ``rpc_batch_ok``.
    "rpc_batch": Schema(Struct(service=Str(1024, 1), incarnation=Int(0, 1 << 62),
                               ids=ListOf(Int(1, (1 << 63) - 1), RPC_BATCH_ITEMS),
                               timeouts_ms=ListOf(Int(0, 1 << 31), RPC_BATCH_ITEMS),
                               sizes=ListOf(Int(0, 1 << 31), RPC_BATCH_ITEMS)), 1, 1),
    # the answers to several requests of one caller (request id 0): item i answers request
    # ``ids[i]``; ``errors[i]`` nil: its reply is the next ``sizes[i]`` bytes of the payload frame,
    # else [reason, error_type, message] as in ``rpc_error`` (and ``sizes[i]`` is 0)
    "rpc_batch_ok": Schema(Struct(ids=ListOf(Int(1, (1 << 63) - 1), RPC_BATCH_ITEMS),
                                  errors=ListOf(Optional(_RPC_ITEM_ERROR), RPC_BATCH_ITEMS),
                                  sizes=ListOf(Int(0, 1 << 31), RPC_BATCH_ITEMS)), 1, 1),
}


class InvalidRequest(ProtocolError):
    """A frame whose envelope is readable (version, cluster, sender, request id) but whose type,
    body or payloads are not: a request with an id can be answered with the defect."""

    def __init__(self, message: str, request_id: int, sender: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.sender = sender


@dataclass(slots=True)
class Message:
    """A decoded, validated message. Treated as read-only, but not ``frozen``: a frozen dataclass
    sets each field through ``object.__setattr__`` (1.0 µs per message here, against 0.2 µs), and
    every message a node receives is one."""

    type: str
    sender: str
    request_id: int
    body: dict
    payloads: tuple[bytes, ...] = ()


def encode(cluster: str, sender: str, type_: str, request_id: int, body: dict,
           payloads: Sequence[bytes] = ()) -> list[bytes]:
    """Encode a message into frames. The body must satisfy its schema (checked: our bug otherwise)."""
    if CHECK_OUTGOING:
        schema = SCHEMAS[type_]
        schema.body(body, "")
        assert schema.min_payloads <= len(payloads) <= schema.max_payloads, (type_, len(payloads))
    header = msgpack.packb([PROTOCOL_VERSION, cluster, sender, type_, request_id, body], use_bin_type=True)
    return [header, *payloads]


def _unpack_header(frame: bytes) -> Any:
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        return msgpack.unpackb(
            frame, raw=False, use_list=True, strict_map_key=True, max_str_len=len(frame),
            max_bin_len=len(frame), max_array_len=_MAX_ITEMS, max_map_len=_MAX_ITEMS, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"header does not decode as msgpack: {type(exc).__name__}: {exc}") from None


_SENDER = Str(64, 1)
_REQUEST_ID = Int(0, (1 << 63) - 1)


def decode(frames: Sequence[bytes], cluster: str) -> Message:
    """Decode and validate frames; raises ProtocolError on any defect."""
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) > 1 + MAX_PAYLOAD_FRAMES:
        raise ProtocolError(f"{len(frames)} frames; at most {1 + MAX_PAYLOAD_FRAMES}")
    header = _unpack_header(bytes(frames[0]))
    if type(header) is not list or len(header) != 6:
        raise ProtocolError("header is not a 6-element array")
    version, their_cluster, sender, type_, request_id, body = header
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise ProtocolError(
            f"protocol version {short_repr(version)} not supported (this node speaks {PROTOCOL_VERSION})")
    if their_cluster != cluster:
        raise ProtocolError(f"frame for cluster {short_repr(their_cluster)}, this node is in {cluster!r}")
    _SENDER(sender, "sender")
    _REQUEST_ID(request_id, "request_id")
    if type(type_) is not str or type_ not in SCHEMAS:
        raise InvalidRequest(f"unknown message type {short_repr(type_)}", request_id, sender)
    schema = SCHEMAS[type_]
    if len(frames) == 1:
        payloads: tuple[bytes, ...] = ()
    elif len(frames) == 2 and type(frames[1]) is bytes:  # (the hot path: one batch, already bytes)
        payloads = (frames[1],)
    else:
        payloads = tuple(bytes(f) for f in frames[1:])
    if not schema.min_payloads <= len(payloads) <= schema.max_payloads:
        raise InvalidRequest(
            f"{type_} carries {len(payloads)} payload frames; expected {schema.min_payloads}-{schema.max_payloads}",
            request_id, sender)
    try:
        checked = schema.body(body, "")
    except ProtocolError as exc:
        raise InvalidRequest(f"{type_}: {exc}", request_id, sender) from None
    return Message(type_, sender, request_id, checked, payloads)
