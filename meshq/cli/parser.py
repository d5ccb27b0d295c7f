"""``meshq`` argument parsing: every command's flags, their environment variables and checks."""

from __future__ import annotations

import argparse
import os

from meshq.cli.logs import FORMATS as LOG_FORMATS
from meshq.config import DEFAULT_PORT, parse_host_port, validate_group_name
from meshq.errors import ConfigError, UsageError


def _env_list(name: str) -> list[str]:
    raw = os.environ.get(name, "")
    return [item.strip() for item in raw.split(",") if item.strip()]


def _seed(text: str) -> str:
    try:
        parse_host_port(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _group(text: str) -> str:
    try:
        return validate_group_name(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _scrub_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MB/s") from None
    if not 0 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 (off) and 100000 MB/s")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range (0-65535)")
    return value


def _connection_options(parser: argparse.ArgumentParser, client: bool = True, keys: bool = True) -> None:
    """``--cluster``, ``--seed``, ``--interface``, ``--no-mdns``, ``--keys`` (and ``--advertise`` for a client
    command)."""
    group = parser.add_argument_group("connection")
    if keys:
        group.add_argument("--keys", default=None, metavar="DIR",
                           help="CurveZMQ keys (env MESHQ_KEYS): DIR/clients/NAME made by `meshq keygen` for a client "
                                "command, DIR/cluster for `meshq node`; default: no encryption")
    group.add_argument("--cluster", default=os.environ.get("MESHQ_CLUSTER", "default"),
                       help="cluster name (env MESHQ_CLUSTER; default 'default')")
    group.add_argument("--seed", action="append", type=_seed, default=None, metavar="HOST:PORT",
                       help="a node to join through; repeatable (env MESHQ_SEEDS, comma-separated); optional "
                            "while mDNS is on")
    group.add_argument("--interface", action="append", default=None, metavar="IP",
                       help="address of the interface mDNS uses; repeatable (env MESHQ_INTERFACES, "
                            "comma-separated; default every interface)")
    group.add_argument("--no-mdns", action="store_true", help="do not use mDNS discovery (then --seed is needed)")
    if client:
        group.add_argument("--advertise", default=None, metavar="HOST",
                           help="address the cluster's nodes should use to reach this client (default: the local "
                                "address of the interface that reaches the cluster)")
    group.add_argument("--log-level", default=os.environ.get("MESHQ_LOG_LEVEL"),
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity (stderr)")
    _log_format_option(group)


def _log_format_option(parser: argparse._ActionsContainer) -> None:
    # (the environment's value is checked when logging is set up: a bad one is a usage error, not a traceback)
    parser.add_argument("--log-format", default=os.environ.get("MESHQ_LOG_FORMAT", "").strip() or "text",
                        choices=LOG_FORMATS, help="text lines (default) or one JSON object per line with ts, level, "
                                                  "logger, message and extra fields (env MESHQ_LOG_FORMAT)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshq", description="meshq: a brokerless messaging mesh")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    node = sub.add_parser("node", help="run a storage node in the foreground")
    node.add_argument("--data", required=True, metavar="DIR", help="data directory (one node per directory)")
    node.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    node.add_argument("--advertise", default=None, metavar="HOST", help="address peers should use, if not --host")
    node.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"ROUTER port (default {DEFAULT_PORT}; 0 = any)")
    node.add_argument("--pub-port", type=_port, default=0, help="PUB port (default: any free port)")
    node.add_argument("--node-id", default=None, help="node id (default: kept in the data directory)")
    node.add_argument("--replication-factor", type=int, default=3, help="default replication factor (3)")
    node.add_argument("--partitions", type=int, default=8, help="default partitions per topic (8)")
    node.add_argument("--fsync", choices=["always", "interval", "never"], default="interval",
                      help="when appends reach the disk (default interval)")
    node.add_argument("--fsync-interval", type=_positive_float, default=1.0, metavar="S",
                      help="seconds between fsyncs with --fsync interval (default 1.0)")
    node.add_argument("--segment-bytes", type=int, default=64 * 1024 * 1024, metavar="N",
                      help="roll to a new log segment at this size (default 64 MiB)")
    node.add_argument("--min-free-bytes", type=_non_negative_int, default=16 * 1024 * 1024, metavar="N",
                      help="refuse new records (StorageFullError) while the data disk has less free space than N "
                           "bytes, keeping room for metadata writes; lifted by itself when space returns "
                           "(default 16 MiB; 0: only a write that finds the disk full)")
    node.add_argument("--copy-rate", type=_non_negative_float, default=30.0, metavar="MB/S",
                      help="at most this many MB/s (10^6 bytes) sent by this node, over all partitions it leads, to "
                           "replicas catching up (a rebalance's new copies); in-sync followers are never throttled "
                           "(default 30; 0: unlimited)")
    node.add_argument("--scrub-rate", type=_scrub_rate, default=4.0, metavar="MB/S",
                      help="MB/s of sealed log segments CRC-checked in the background; damaged batches are "
                           "repaired from a replica (default 4; 0 turns the scrub off)")
    node.add_argument("--metrics-port", type=_port, default=None, help="serve Prometheus metrics on this port")
    node.add_argument("--member-timeout", type=_positive_float, default=300.0, metavar="S",
                      help="remove a storage member silent for S seconds and re-replicate its partitions (default 300)")
    _connection_options(node, client=False)

    produce = sub.add_parser("produce", help="send each stdin line as one record")
    produce.add_argument("topic")
    produce.add_argument("--key", default=None, help="key for every record (default: none)")
    produce.add_argument("--acks", choices=["none", "leader", "quorum", "all"], default="quorum")
    produce.add_argument("--timeout", type=_positive_float, default=30.0, metavar="S",
                         help="seconds each record may take to be acknowledged (default 30)")
    produce.add_argument("--partition", type=_non_negative_int, default=None, help="send every record to this partition")
    produce.add_argument("--json", action="store_true", help='print {"partition": P, "offset": O} per record')
    _connection_options(produce)

    consume = sub.add_parser("consume", help="print records of a topic")
    consume.add_argument("topic")
    consume.add_argument("--group", default=None, type=_group, help="consumer group; commits what was printed")
    consume.add_argument("--from", dest="start", choices=["earliest", "latest"], default="earliest",
                         help="where to start without a committed offset (default earliest)")
    consume.add_argument("--max", type=_non_negative_int, default=None, help="stop after N records")
    consume.add_argument("--timeout", type=_positive_float, default=None, metavar="S",
                         help="stop after S seconds without a record (default: run until interrupted)")
    consume.add_argument("--json", action="store_true", help="one JSON object per record")
    consume.add_argument("--shared", action="store_true",
                         help="join --group as a shared (work-queue) member: each record goes to one member of the "
                              "group and is acked after it is printed")
    _connection_options(consume)

    status = sub.add_parser("status", help="members, partitions and group lag")
    status.add_argument("--json", action="store_true")
    status.add_argument("--node", default=None, metavar="NODE_ID",
                        help="show this node's own view instead of the merged cluster view")
    status.add_argument("--timeout", type=_positive_float, default=10.0, metavar="S")
    _connection_options(status)

    leave = sub.add_parser("leave", help="make a storage node leave the cluster for good (its partitions move "
                                         "to the other members, then it stops)")
    leave.add_argument("--node-id", default=None, metavar="ID",
                       help="the node that leaves (default: the node listening at the first --seed)")
    leave.add_argument("--timeout", type=_positive_float, default=300.0, metavar="S",
                       help="give up waiting after S seconds (default 300); the node keeps handing over")
    leave.add_argument("--json", action="store_true",
                       help='print one JSON object with the outcome: {"event": "left"|"failed", "node_id", ...}')
    _connection_options(leave)

    topics = sub.add_parser("topics", help="create, list and describe topics")
    topics_sub = topics.add_subparsers(dest="topics_command", metavar="ACTION")
    topics_sub.required = True
    create = topics_sub.add_parser("create", help="create a topic")
    create.add_argument("name")
    create.add_argument("--partitions", type=int, default=None)
    create.add_argument("--replication-factor", type=int, default=None)
    create.add_argument("--retention-ms", type=_limit, default=7 * 24 * 3600 * 1000, metavar="MS",
                        help="delete records older than this (default 7 days); -1 or 'forever' keeps them forever")
    create.add_argument("--retention-bytes", type=_limit, default=None, metavar="BYTES",
                        help="delete the oldest segments beyond this size per partition (default: no limit; "
                             "-1 or 'forever' says so explicitly)")
    create.add_argument("--cleanup-policy", choices=["delete", "compact"], default="delete",
                        help="delete: retention by age and size; compact: keep the latest record per key")
    create.add_argument("--delete-retention-ms", type=_limit, default=24 * 3600 * 1000, metavar="MS",
                        help="compact topics: drop a key whose latest record has an empty value once it is "
                             "this old (default 1 day; -1 or 'forever': never)")
    _connection_options(create)
    listing = topics_sub.add_parser("list", help="list topics")
    listing.add_argument("--json", action="store_true")
    _connection_options(listing)
    describe = topics_sub.add_parser("describe", help="show a topic's configuration and partitions")
    describe.add_argument("name")
    describe.add_argument("--json", action="store_true")
    _connection_options(describe)

    demo = sub.add_parser("demo", help="start a 3-node mesh on 127.0.0.1, produce, kill a node, show that nothing "
                                       "acknowledged was lost, stop everything")
    demo.add_argument("--data", default=None, metavar="DIR",
                      help="keep the nodes' data and logs under DIR/<cluster>/ (default: a temporary directory, "
                           "removed at the end)")
    demo.add_argument("--records", type=int, default=2000, metavar="N",
                      help="records produced before the kill, and again after it (default 2000)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON on stdout (the story on stderr)")
    demo.add_argument("--log-level", default=os.environ.get("MESHQ_LOG_LEVEL"),
                      choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity of the demo's client (stderr)")
    _log_format_option(demo)

    from meshq.cli.pubsub import add_parsers as add_pubsub_parsers

    add_pubsub_parsers(sub, _connection_options, _positive_float, _non_negative_int)

    from meshq.cli.acl import add_parsers as add_acl_parsers

    add_acl_parsers(sub)
    from meshq.cli.rpc import add_parsers as add_rpc_parsers  # (here: meshq.cli.rpc imports this module)

    add_rpc_parsers(sub)

    bench = sub.add_parser("bench", help="measure throughput and latency (see docs/performance.md)")
    bench.add_argument("scenario", choices=["produce", "replication", "rebalance", "queue", "pubsub", "rpc", "compare"],
                       help="produce: one node against a raw pyzmq baseline; replication: that, plus --nodes "
                            "replicated nodes at acks=leader and acks=quorum, plus failover after kill -9 of a leader; "
                            "rebalance: --records preloaded on --nodes nodes, then a node joins and one leaves; queue: "
                            "--workers shared consumers acking each of --jobs records on --nodes replicated nodes; "
                            "pubsub: --records messages pub -> 1 and -> 3 subscribers against raw pyzmq and NATS core; "
                            "compare: 3 meshq nodes (RF 3, acks=quorum) against NATS JetStream R3, Redis streams "
                            "and RabbitMQ quorum queues, alternating --rounds rounds")
    bench.add_argument("--records", type=int, default=1_000_000, help="records in the pipelined run")
    bench.add_argument("--sync-records", type=int, default=5_000, help="records in the synchronous run")
    bench.add_argument("--value-bytes", type=int, default=100)
    bench.add_argument("--batch", type=int, default=1000, help="records per produce_batch call / baseline frame")
    bench.add_argument("--acks", choices=["none", "leader", "quorum", "all"], default="leader",
                       help="acks of bench produce (bench replication measures leader and quorum)")
    bench.add_argument("--fsync", choices=["always", "interval", "never"], default="interval")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument("--rounds", type=int, default=3, help="bench pubsub, queue, rpc and compare: rounds per system; the report "
                                                              "gives median, min, max (default 3)")
    bench.add_argument("--curve", action="store_true",
                       help="bench produce: CURVE off and on side by side (own key set, --rounds alternating rounds); "
                            "bench pubsub: adds meshq-keyed (CURVE and pub/sub grants) to the same run")
    from meshq.cli.rpc import add_bench_options as add_rpc_bench_options

    add_rpc_bench_options(bench)
    replicated = bench.add_argument_group("bench replication")
    replicated.add_argument("--nodes", type=int, default=3, help="storage nodes to start (default 3)")
    replicated.add_argument("--replication-factor", type=int, default=3, help="of the benchmark topics (default 3)")
    replicated.add_argument("--failover-repeats", type=_non_negative_int, default=3,
                            help="leader kills, each timed, the killed node restarted in between (default 3; 0: none)")
    replicated.add_argument("--failover-acks", choices=["leader", "quorum", "all"], default="quorum",
                            help="acks of the writers during the failover (default quorum)")
    replicated.add_argument("--failover-timeout", type=_positive_float, default=0.5, metavar="S",
                            help="timeout of each write during the failover (default 0.5)")
    replicated.add_argument("--failover-deadline", type=_positive_float, default=20.0, metavar="S",
                            help="give up waiting for writes to succeed again after S seconds (default 20)")
    replicated.add_argument("--in-sync-timeout", type=_positive_float, default=20.0, metavar="S",
                            help="wait at most S seconds for every replica to be in sync before measuring (default 20)")
    queue = bench.add_argument_group("bench queue (also --nodes, --replication-factor, --value-bytes, --batch)")
    queue.add_argument("--jobs", type=int, default=20_000, help="records acked per round (default 20000)")
    queue.add_argument("--workers", type=int, default=3, help="shared-consumer worker processes (default 3)")
    compare = bench.add_argument_group("bench compare (also --records, --sync-records, --rounds, --fsync, --batch)")
    compare.add_argument("--peers", default="nats,redis,rabbitmq", metavar="LIST",
                         help="peers to start when installed: some of nats,redis,rabbitmq, or none "
                              "(default all three)")
    compare.add_argument("--consumers", type=int, default=3, metavar="N",
                         help="members of the meshq consumer group read in each round (worker processes; "
                              "default 3, 0: none)")
    rebalance = bench.add_argument_group("bench rebalance (also --nodes, --replication-factor)")
    rebalance.add_argument("--load-rate", default="0", metavar="N|max",
                           help="a producer writes N records/s (max: as fast as it can) during the moves (default 0)")
    rebalance.add_argument("--move-timeout", type=_positive_float, default=600.0, metavar="S",
                           help="give up on a join or leave after S seconds (default 600)")
    rebalance.add_argument("--skip-leave", action="store_true", help="measure the join only")
    rebalance.add_argument("--copy-rates", default=None, metavar="MB/S,...",
                           help="compare copy rates (meshq node --copy-rate; 0 = unlimited): for each of --rounds "
                                "rounds and each rate, a fresh cluster, a join under --load-rate (default 2000 "
                                "records/s here); reports the producer's p99 before vs during the join, median "
                                "[min, max]")
    _connection_options(bench, client=False, keys=False)

    keygen = sub.add_parser("keygen", help="create a cluster key set for CurveZMQ (or add a client to one)")
    keygen.add_argument("dir", metavar="DIR", help="directory of the key set (DIR/cluster, DIR/clients/NAME)")
    keygen.add_argument("--client", default=None, metavar="NAME",
                        help="add the client NAME (DIR/clients/NAME) to the existing key set in DIR")
    return parser


# ---------------------------------------------------------------------- helpers


def _limit(text: str) -> int | None:
    """A positive integer limit, or ``-1``/``forever`` for none (None)."""
    if text.strip().lower() in ("-1", "forever"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give an integer, or -1 / forever for no limit") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give a positive integer, or -1 / forever for no limit")
    return value
