"""The one error tree of meshq.

Split by who is at fault (STYLE habit 4):
- the caller misused the API or gave bad configuration: ``UsageError`` / ``ConfigError``;
- a peer sent something invalid: ``ProtocolError``;
- the cluster could not do it right now (retriable): ``TimeoutError``, ``NotEnoughReplicasError``,
  ``NotLeaderError``, ``NoRespondersError``;
- local storage is damaged or unusable: ``StorageError`` and its children.
"""

from __future__ import annotations

import builtins


class MeshqError(Exception):
    """Base class of every error meshq raises on purpose."""

    #: True when retrying the same operation later may succeed.
    retriable: bool = False


class UsageError(MeshqError, ValueError):
    """The caller used the API wrongly (bad argument, wrong state); fix the call."""


class ConfigError(UsageError):
    """A setting is invalid; the message names the setting and the accepted values."""


class InvalidTopicError(UsageError):
    """A topic name or topic configuration is invalid."""


class InvalidSubjectError(UsageError):
    """A pub/sub subject, pattern or queue group name breaks a rule (the message names it)."""


class SubscriptionClosedError(MeshqError):
    """``recv`` on a pub/sub subscription that was closed (or whose node stopped)."""


class UnknownTopicError(MeshqError):
    """The topic does not exist and was not auto-created."""


class ProtocolError(MeshqError):
    """A peer sent a frame that is malformed, of another version or another cluster."""


class AuthenticationError(MeshqError):
    """A peer could not be authenticated, or we were refused by one."""


class AuthorizationError(MeshqError):
    """An authenticated client key lacks the permission for what it asked (the message names the
    client, the permission, the topic, subject or service, and how to grant it); nothing was stored."""


class MessageTooLargeError(UsageError):
    """A record or batch exceeds the configured size limit."""


class TimeoutError(MeshqError, builtins.TimeoutError):  # noqa: A001 - the public name is part of the SPEC
    """The operation did not complete in time; it may or may not have taken effect."""

    retriable = True


class NotEnoughReplicasError(MeshqError):
    """Too few in-sync replicas are reachable to satisfy the requested acks level."""

    retriable = True


class NotLeaderError(MeshqError):
    """The node asked is not the leader of the partition; refresh metadata and retry.

    ``leader`` names the node the answering node believes leads, when it knows one (on the
    wire: the ``leader`` field of the ``error`` reply)."""

    retriable = True

    def __init__(self, message: str = "", leader: str | None = None) -> None:
        super().__init__(message)
        self.leader = leader


class NoRespondersError(MeshqError):
    """No live instance serves the requested service."""


class RemoteError(MeshqError):
    """The handler of a service raised: ``error_type`` and ``error_message`` are the remote error's."""

    def __init__(self, message: str, error_type: str = "", error_message: str = "", service: str = "",
                 node_id: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type
        self.error_message = error_message if error_type else message
        self.service = service
        self.node_id = node_id


class OutcomeUnknownError(MeshqError):
    """The instance handling a request went silent before answering; the request may or may not
    have run (a service not declared idempotent is never sent a request twice)."""


class OffsetOutOfRangeError(MeshqError):
    """The requested offset is below the log start or above the log end."""


class DuplicateSequenceError(MeshqError):
    """An idempotent producer batch was already stored (carries the original offsets)."""


class OutOfOrderSequenceError(MeshqError):
    """An idempotent producer batch arrived with a sequence gap; data would be lost."""


class ProducerFencedError(MeshqError):
    """A batch from an older epoch of an idempotent producer; a newer epoch superseded it."""


class RebalanceError(MeshqError):
    """This consumer-group member's generation is over (the group rebalanced, or the coordinator
    does not know the member): its partitions may belong to another member now. The member
    rejoins by itself; records handed out since its last commit are delivered again."""

    retriable = True


class UnknownMemberError(RebalanceError):
    """The group's coordinator does not know this member (it was evicted, or the coordinator moved)."""


class StaleGenerationError(RebalanceError):
    """The request carries an older generation of the group than the coordinator's (it rebalanced)."""


class NodeStoppedError(MeshqError):
    """The node was stopped before the operation completed."""


class StorageError(MeshqError):
    """Local storage failed or is unusable."""


class CorruptLogError(StorageError):
    """Stored bytes failed their checksum or structure check; they are never served."""


class DataDirLockedError(StorageError):
    """Another process already uses this data directory."""


class StorageFullError(StorageError):
    """This node's data disk is full (or below its ``min_free_bytes`` reserve): it refuses new
    writes until space returns, keeps serving reads, and lifts the refusal by itself once a
    periodic check finds room again. Free space on the node (delete files, grow the volume) or
    retry later; acknowledged records are not affected. Not ``retriable`` in the producer's sense:
    a full disk lasts until someone frees space, so the producer reports it at once instead of
    retrying it until its timeout; the caller decides when to try again."""


class DiskFullError(StorageFullError):
    """A write failed with ``ENOSPC`` or ``EDQUOT``; nothing was stored by the failed operation."""


#: Error codes carried on the wire, mapped to the exception raised by the receiver.
ERROR_CODES: dict[str, type[MeshqError]] = {
    "usage": UsageError,
    "invalid_topic": InvalidTopicError,
    "unknown_topic": UnknownTopicError,
    "protocol": ProtocolError,
    "authentication": AuthenticationError,
    "authorization": AuthorizationError,
    "too_large": MessageTooLargeError,
    "timeout": TimeoutError,
    "not_enough_replicas": NotEnoughReplicasError,
    "not_leader": NotLeaderError,
    "no_responders": NoRespondersError,
    "remote": RemoteError,
    "outcome_unknown": OutcomeUnknownError,
    "offset_out_of_range": OffsetOutOfRangeError,
    "out_of_order_sequence": OutOfOrderSequenceError,
    "producer_fenced": ProducerFencedError,
    "storage": StorageError,
    "corrupt_log": CorruptLogError,
    "disk_full": DiskFullError,
    "storage_full": StorageFullError,
    "stopped": NodeStoppedError,
    "unknown_member": UnknownMemberError,
    "stale_generation": StaleGenerationError,
}


def error_code(error: MeshqError) -> str:
    """Wire code of an error (the most specific registered class wins)."""
    for klass in type(error).__mro__:
        for code, registered in ERROR_CODES.items():
            if registered is klass:
                return code
    return "usage"


def error_from_code(code: str, message: str, leader: str | None = None) -> MeshqError:
    """Rebuild the exception a remote node reported (``leader``: the hint of a ``not_leader``)."""
    klass = ERROR_CODES.get(code, MeshqError)
    if leader is not None and issubclass(klass, NotLeaderError):
        return klass(message, leader=leader)
    return klass(message)
