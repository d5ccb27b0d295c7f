"""Frozen, validated node settings. Times carry their unit in the name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal

from meshq.errors import ConfigError, InvalidTopicError, UsageError

FsyncPolicy = Literal["always", "interval", "never"]
Role = Literal["storage", "client"]
CleanupPolicy = Literal["delete", "compact"]

TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
NODE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
CLUSTER_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

PROTOCOL_VERSION = 1
DEFAULT_PORT = 7450
MAX_FRAME_BYTES = 64 * 1024 * 1024


def parse_host_port(text: str) -> tuple[str, int]:
    """Parse ``host:port``; raises ConfigError naming the bad value."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"seed {text!r} is not HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT})")
    return host, int(port)


def check_data_dir(path: str) -> None:
    """Raise ``ConfigError`` when ``path`` cannot be a data directory: it, or a directory above it, is a file."""
    import os

    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return
        probe = parent
    if not os.path.isdir(probe):
        what = "is a file" if probe == os.path.abspath(path) else f"is inside {probe}, which is a file"
        raise ConfigError(f"--data {path} {what}, not a directory: give a directory (it is created if missing)")


def validate_group_name(name: str) -> str:
    """Return the consumer group name, or raise UsageError explaining the allowed form."""
    if not isinstance(name, str) or not TOPIC_NAME.match(name) or name in {".", ".."}:
        raise UsageError(
            f"invalid consumer group name {name!r}: use 1-200 characters from letters, digits, '.', '_' and '-'"
        )
    return name


def refuse_reserved_topic(name: str) -> None:
    """Raise ``InvalidTopicError`` for a name meshq keeps for itself (``__consumer_offsets``...)."""
    if name.startswith("__"):
        raise InvalidTopicError(f"topic names starting with '__' are reserved for meshq ({name!r})")


def validate_topic_name(name: str) -> str:
    """Return the name, or raise InvalidTopicError explaining the allowed form."""
    if not isinstance(name, str) or not TOPIC_NAME.match(name) or name in {".", ".."}:
        raise InvalidTopicError(
            f"invalid topic name {name!r}: use 1-200 characters from letters, digits, '.', '_' and '-'"
        )
    return name


KEEP_FOREVER = -1  # retention_ms / retention_bytes / delete_retention_ms: no limit (stored as None)
DEFAULT_DELETE_RETENTION_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class TopicConfig:
    """Configuration of one topic, agreed cluster-wide and persisted.

    ``retention_ms`` and ``retention_bytes`` bound a ``delete`` topic by age and size; ``None``
    (or ``-1``, ``KEEP_FOREVER``, turned into ``None``) keeps records forever. A ``compact``
    topic keeps the latest record per key instead, and drops a key whose latest record has an
    empty value once that record is ``delete_retention_ms`` old (``None``/``-1``: never).
    """

    name: str
    partitions: int
    replication_factor: int
    retention_bytes: int | None = None
    retention_ms: int | None = 7 * 24 * 3600 * 1000
    cleanup_policy: CleanupPolicy = "delete"
    delete_retention_ms: int | None = DEFAULT_DELETE_RETENTION_MS

    def __post_init__(self) -> None:
        validate_topic_name(self.name)
        _check_int("partitions", self.partitions, 1, 10_000)
        _check_int("replication_factor", self.replication_factor, 1, 16)
        for name in ("retention_bytes", "retention_ms", "delete_retention_ms"):
            value = getattr(self, name)
            if value == KEEP_FOREVER and type(value) is int:
                object.__setattr__(self, name, None)
            elif value is not None:
                _check_int(name, value, 0 if name == "delete_retention_ms" else 1, 1 << 62)
        if self.cleanup_policy not in ("delete", "compact"):
            raise ConfigError(f"cleanup_policy must be 'delete' or 'compact', not {self.cleanup_policy!r}")

    def to_wire(self) -> dict:
        return {
            "name": self.name,
            "partitions": self.partitions,
            "replication_factor": self.replication_factor,
            "retention_bytes": self.retention_bytes,
            "retention_ms": self.retention_ms,
            "cleanup_policy": self.cleanup_policy,
            "delete_retention_ms": self.delete_retention_ms,
        }

    @classmethod
    def from_wire(cls, data: dict) -> TopicConfig:
        return cls(
            name=data["name"],
            partitions=data["partitions"],
            replication_factor=data["replication_factor"],
            retention_bytes=data.get("retention_bytes"),
            retention_ms=data.get("retention_ms"),
            cleanup_policy=data.get("cleanup_policy", "delete"),
            delete_retention_ms=data.get("delete_retention_ms", DEFAULT_DELETE_RETENTION_MS),
        )


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, not {value!r}")


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a node needs to start. Build with ``NodeConfig(...)``; it validates itself."""

    cluster: str = "default"
    node_id: str | None = None
    data_dir: str | None = None
    role: Role = "storage"
    host: str = "127.0.0.1"
    port: int = 0
    pub_port: int = 0
    advertised_host: str | None = None
    seeds: tuple[str, ...] = ()
    mdns: bool = True
    interfaces: tuple[str, ...] | None = None
    replication_factor: int = 3
    partitions: int = 8
    auto_create_topics: bool = True
    fsync: FsyncPolicy = "interval"
    fsync_interval_s: float = 1.0
    failure_timeout_s: float = 3.0
    member_timeout_s: float = 300.0
    heartbeat_interval_s: float = 0.5
    election_timeout_s: float = 1.0
    raft_heartbeat_interval_s: float = 0.15
    bootstrap_wait_s: float = 1.0
    linger_s: float = 0.002
    batch_max_records: int = 2000
    batch_max_bytes: int = 1024 * 1024
    max_in_flight_per_partition: int = 5
    request_timeout_s: float = 30.0
    max_frame_bytes: int = MAX_FRAME_BYTES
    segment_bytes: int = 64 * 1024 * 1024
    segment_ms: int = 24 * 3600 * 1000
    retention_check_interval_s: float = 60.0
    # New records are refused (StorageFullError) while the data disk has less free space than
    # this, so that the small metadata writes (votes, epochs, the metadata log) still fit.
    min_free_bytes: int = 16 * 1024 * 1024
    storage_check_interval_s: float = 1.0  # how often free space is measured (a full disk is lifted)
    # Bytes a leader sends per second, over all its partitions, to replicas that are catching up
    # (a rebalance's new copies, followers far behind); in-sync followers are never throttled. 0: unlimited.
    copy_rate_mb_per_s: float = 30.0
    scrub_rate_mb_s: float = 4.0  # background CRC scrub of sealed segments (meshq.core.partitions.repair); 0: off
    metrics_port: int | None = None
    keys: str | None = None  # a key set directory (meshq keygen): CurveZMQ on every socket (meshq.keys)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.cluster, str) or not CLUSTER_NAME.match(self.cluster):
            raise ConfigError(f"cluster name {self.cluster!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if self.node_id is not None and (not isinstance(self.node_id, str) or not NODE_ID.match(self.node_id)):
            raise ConfigError(f"node id {self.node_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if self.role not in ("storage", "client"):
            raise ConfigError(f"role must be 'storage' or 'client', not {self.role!r}")
        if self.host in ("0.0.0.0", "*", "") and not self.advertised_host:
            raise ConfigError("binding to all interfaces (host 0.0.0.0) needs advertised_host (--advertise HOST) "
                              "so that peers know which address to connect to")
        if self.role == "storage" and not self.data_dir:
            raise ConfigError("a storage node needs data_dir (the directory that holds its logs)")
        for name in ("port", "pub_port"):
            _check_int(name, getattr(self, name), 0, 65535)
        for seed in self.seeds:
            parse_host_port(seed)
        _check_int("replication_factor", self.replication_factor, 1, 16)
        _check_int("partitions", self.partitions, 1, 10_000)
        if self.fsync not in ("always", "interval", "never"):
            raise ConfigError(f"fsync must be one of always, interval, never — not {self.fsync!r}")
        for name in ("fsync_interval_s", "failure_timeout_s", "member_timeout_s", "heartbeat_interval_s",
                     "request_timeout_s", "retention_check_interval_s", "election_timeout_s",
                     "raft_heartbeat_interval_s", "storage_check_interval_s"):
            _check_positive(name, getattr(self, name))
        if self.heartbeat_interval_s * 2 > self.failure_timeout_s:
            raise ConfigError("failure_timeout_s must be at least twice heartbeat_interval_s")
        if not isinstance(self.bootstrap_wait_s, (int, float)) or self.bootstrap_wait_s < 0:
            raise ConfigError(f"bootstrap_wait_s must be >= 0, not {self.bootstrap_wait_s!r}")
        if (not isinstance(self.scrub_rate_mb_s, (int, float)) or isinstance(self.scrub_rate_mb_s, bool)
                or not 0 <= self.scrub_rate_mb_s <= 100_000):
            raise ConfigError(f"scrub_rate_mb_s must be between 0 (off) and 100000 MB/s, not {self.scrub_rate_mb_s!r}")
        if not isinstance(self.linger_s, (int, float)) or self.linger_s < 0:
            raise ConfigError(f"linger_s must be >= 0, not {self.linger_s!r}")
        _check_int("batch_max_records", self.batch_max_records, 1, 1_000_000)
        _check_int("batch_max_bytes", self.batch_max_bytes, 1024, self.max_frame_bytes)
        # At most the leader's per-producer dedupe window (5, as in Kafka), or retries could
        # fall outside it and be mistaken for gaps.
        _check_int("max_in_flight_per_partition", self.max_in_flight_per_partition, 1, 5)
        _check_int("segment_bytes", self.segment_bytes, 4096, 1 << 40)
        _check_int("min_free_bytes", self.min_free_bytes, 0, 1 << 50)
        if (not isinstance(self.copy_rate_mb_per_s, (int, float)) or isinstance(self.copy_rate_mb_per_s, bool)
                or not 0 <= self.copy_rate_mb_per_s <= 1_000_000):
            raise ConfigError(f"copy_rate_mb_per_s must be a number of MB/s from 0 (unlimited) to 1000000, "
                              f"not {self.copy_rate_mb_per_s!r}")
        if self.metrics_port is not None:
            _check_int("metrics_port", self.metrics_port, 0, 65535)
        if self.keys is not None and (not isinstance(self.keys, str) or not self.keys):
            raise ConfigError(f"keys must be the path of a key set directory made by `meshq keygen`, not "
                              f"{self.keys!r}")

    def with_changes(self, **changes: object) -> NodeConfig:
        return replace(self, **changes)

    @property
    def advertised(self) -> str:
        return self.advertised_host or self.host
