"""meshq: a brokerless peer-to-peer messaging mesh for Python services on a LAN."""

from meshq.config import NodeConfig, TopicConfig
from meshq.consumer import Consumer
from meshq.core.records import Record, RecordMetadata
from meshq.errors import (
    AuthenticationError,
    AuthorizationError,
    ConfigError,
    CorruptLogError,
    DataDirLockedError,
    DiskFullError,
    InvalidSubjectError,
    InvalidTopicError,
    MeshqError,
    MessageTooLargeError,
    NodeStoppedError,
    NoRespondersError,
    NotEnoughReplicasError,
    NotLeaderError,
    OffsetOutOfRangeError,
    OutcomeUnknownError,
    ProtocolError,
    RemoteError,
    StorageError,
    StorageFullError,
    SubscriptionClosedError,
    TimeoutError,
    UnknownTopicError,
    UsageError,
)
from meshq.node import Node
from meshq.pubsub import Subscription

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "AuthorizationError",
    "ConfigError",
    "Consumer",
    "CorruptLogError",
    "DataDirLockedError",
    "DiskFullError",
    "InvalidSubjectError",
    "InvalidTopicError",
    "MeshqError",
    "MessageTooLargeError",
    "Node",
    "NodeConfig",
    "NodeStoppedError",
    "NoRespondersError",
    "NotEnoughReplicasError",
    "NotLeaderError",
    "OffsetOutOfRangeError",
    "OutcomeUnknownError",
    "ProtocolError",
    "Record",
    "RecordMetadata",
    "RemoteError",
    "StorageError",
    "StorageFullError",
    "Subscription",
    "SubscriptionClosedError",
    "TimeoutError",
    "TopicConfig",
    "UnknownTopicError",
    "UsageError",
    "__version__",
]
