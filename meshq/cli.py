"""The ``meshq`` command line: argument parsing and output only; the work is in ``meshq.Node``."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from meshq.config import DEFAULT_PORT, parse_host_port
from meshq.errors import ConfigError, MeshqError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

log = logging.getLogger("meshq.cli")


# ---------------------------------------------------------------------- parsing
def _env_list(name: str) -> list[str]:
    raw = os.environ.get(name, "")
    return [item.strip() for item in raw.split(",") if item.strip()]


def _seed(text: str) -> str:
    try:
        parse_host_port(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
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


def _connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--cluster", default=os.environ.get("MESHQ_CLUSTER", "default"),
                       help="cluster name (env MESHQ_CLUSTER; default 'default')")
    group.add_argument("--seed", action="append", type=_seed, default=None, metavar="HOST:PORT",
                       help="a node to join through; repeatable (env MESHQ_SEEDS, comma-separated)")
    group.add_argument("--interface", action="append", default=None, metavar="IP",
                       help="mDNS interface address; repeatable (env MESHQ_INTERFACES)")
    group.add_argument("--no-mdns", action="store_true", help="do not use mDNS discovery")
    group.add_argument("--log-level", default=os.environ.get("MESHQ_LOG_LEVEL"),
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity (stderr)")


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
    node.add_argument("--metrics-port", type=_port, default=None, help="serve Prometheus metrics on this port")
    node.add_argument("--member-timeout", type=_positive_float, default=300.0, metavar="S",
                      help="remove a storage member silent for S seconds and re-replicate its partitions (default 300)")
    _connection_options(node)

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
    consume.add_argument("--group", default=None, help="consumer group; commits what was printed")
    consume.add_argument("--from", dest="start", choices=["earliest", "latest"], default="earliest",
                         help="where to start without a committed offset (default earliest)")
    consume.add_argument("--max", type=_non_negative_int, default=None, help="stop after N records")
    consume.add_argument("--timeout", type=_positive_float, default=None, metavar="S",
                         help="stop after S seconds without a record (default: run until interrupted)")
    consume.add_argument("--json", action="store_true", help="one JSON object per record")
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
    _connection_options(leave)

    topics = sub.add_parser("topics", help="create, list and describe topics")
    topics_sub = topics.add_subparsers(dest="topics_command", metavar="ACTION")
    topics_sub.required = True
    create = topics_sub.add_parser("create", help="create a topic")
    create.add_argument("name")
    create.add_argument("--partitions", type=int, default=None)
    create.add_argument("--replication-factor", type=int, default=None)
    create.add_argument("--retention-ms", type=int, default=7 * 24 * 3600 * 1000)
    create.add_argument("--retention-bytes", type=int, default=None)
    create.add_argument("--cleanup-policy", choices=["delete", "compact"], default="delete")
    _connection_options(create)
    listing = topics_sub.add_parser("list", help="list topics")
    listing.add_argument("--json", action="store_true")
    _connection_options(listing)
    describe = topics_sub.add_parser("describe", help="show a topic's configuration and partitions")
    describe.add_argument("name")
    describe.add_argument("--json", action="store_true")
    _connection_options(describe)

    bench = sub.add_parser("bench", help="measure throughput and latency (see docs/performance.md)")
    bench.add_argument("scenario", choices=["produce", "replication", "rebalance"],
                       help="produce: one node against a raw pyzmq baseline; replication: that, plus --nodes "
                            "replicated nodes at acks=leader and acks=quorum, plus failover after kill -9 of a leader; "
                            "rebalance: --records preloaded on --nodes nodes, then a node joins and one leaves")
    bench.add_argument("--records", type=int, default=1_000_000, help="records in the pipelined run")
    bench.add_argument("--sync-records", type=int, default=5_000, help="records in the synchronous run")
    bench.add_argument("--value-bytes", type=int, default=100)
    bench.add_argument("--batch", type=int, default=1000, help="records per produce_batch call / baseline frame")
    bench.add_argument("--acks", choices=["none", "leader", "quorum", "all"], default="leader",
                       help="acks of bench produce (bench replication measures leader and quorum)")
    bench.add_argument("--fsync", choices=["always", "interval", "never"], default="interval")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
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
    rebalance = bench.add_argument_group("bench rebalance (also --nodes, --replication-factor)")
    rebalance.add_argument("--load-rate", default="0", metavar="N|max",
                           help="a producer writes N records/s (max: as fast as it can) during the moves (default 0)")
    rebalance.add_argument("--move-timeout", type=_positive_float, default=600.0, metavar="S",
                           help="give up on a join or leave after S seconds (default 600)")
    rebalance.add_argument("--skip-leave", action="store_true", help="measure the join only")
    _connection_options(bench)
    return parser


# ---------------------------------------------------------------------- helpers
def _setup_logging(level: str | None, default: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level or default),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _seeds(args: argparse.Namespace) -> list[str]:
    seeds = args.seed if args.seed is not None else [_seed(s) for s in _env_list("MESHQ_SEEDS")]
    return list(seeds)


def _interfaces(args: argparse.Namespace) -> list[str] | None:
    values = args.interface if args.interface is not None else _env_list("MESHQ_INTERFACES")
    return list(values) or None


def _client(args: argparse.Namespace, ready_timeout_s: float | None = None) -> Any:
    from meshq.node import Node

    seeds = _seeds(args)
    if not seeds:
        raise ConfigError(
            "no way to reach the cluster: give --seed HOST:PORT (or set MESHQ_SEEDS) naming a running `meshq node`"
        )
    node = Node(cluster=args.cluster, seeds=seeds, mdns=not args.no_mdns, interfaces=_interfaces(args),
                role="client")
    node.start()
    try:
        node.wait_ready(timeout=ready_timeout_s or getattr(args, "timeout", None) or 10.0)
    except BaseException:
        node.stop()
        raise
    return node


def _text_or_b64(data: bytes | None, name: str, out: dict) -> None:
    if data is None:
        out[name] = None
        return
    try:
        out[name] = data.decode("utf-8")
    except UnicodeDecodeError:
        out[f"{name}_b64"] = base64.b64encode(data).decode("ascii")


def record_to_json(record: Any) -> dict:
    """The ``meshq consume --json`` shape of one record."""
    out: dict[str, Any] = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
    _text_or_b64(record.key, "key", out)
    _text_or_b64(record.value, "value", out)
    out["timestamp_ms"] = record.timestamp_ms
    headers: dict[str, str] = {}
    headers_b64: dict[str, str] = {}
    for name, value in record.headers.items():
        try:
            headers[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            headers_b64[name] = base64.b64encode(value).decode("ascii")
    out["headers"] = headers
    if headers_b64:
        out["headers_b64"] = headers_b64
    return out


class _Progress:
    """A progress line on stderr, only when stderr is a terminal."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.enabled = sys.stderr.isatty()
        self.last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.enabled and (force or now - self.last > 0.2):
            self.last = now
            sys.stderr.write(f"\r{self.what}: {done:,}")
            sys.stderr.flush()

    def close(self, done: int) -> None:
        if self.enabled:
            self.update(done, force=True)
            sys.stderr.write("\n")


# How long `meshq node` waits for its runtime thread to finish after SIGTERM (last iteration, goodbye, final
# fsyncs: milliseconds when idle, seconds at worst on a busy disk). A service manager's own stop timeout
# (systemd: 90 s) is the outer bound; a node that needs longer exits with EXIT_FAILED, not 0.
_NODE_STOP_TIMEOUT_S = 30.0


class _StopRequest:
    """SIGINT/SIGTERM asked the node command to stop.

    The handler only assigns an attribute. A Python signal handler runs in the main thread between two
    bytecodes of whatever it was doing; one that calls ``threading.Event.set`` while the main thread is
    inside ``wait`` on that same event (between taking the event's lock and releasing it, or after taking
    it back) blocks on a lock its own thread holds, and the process hangs for good (cpython#126434 is the
    same trap with multiprocessing.Event).
    """

    def __init__(self) -> None:
        self.requested = False

    def handler(self, signum: int, frame: Any) -> None:
        self.requested = True


# ---------------------------------------------------------------------- commands
def cmd_node(args: argparse.Namespace) -> int:
    from meshq.node import Node

    _setup_logging(args.log_level, "INFO")
    options: dict[str, Any] = {"fsync_interval_s": args.fsync_interval, "segment_bytes": args.segment_bytes,
                               "member_timeout_s": args.member_timeout}
    if args.advertise:
        options["advertised_host"] = args.advertise
    if args.metrics_port is not None:
        options["metrics_port"] = args.metrics_port
    node = Node(cluster=args.cluster, data_dir=args.data, host=args.host, port=args.port, seeds=_seeds(args),
                mdns=not args.no_mdns, interfaces=_interfaces(args), role="storage",
                replication_factor=args.replication_factor, partitions=args.partitions,
                node_id=args.node_id, pub_port=args.pub_port, fsync=args.fsync, **options)
    stop = _StopRequest()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop.handler)
    node.start()
    node_id = node.node_id
    print(json.dumps({"event": "ready", "node_id": node_id, "address": node.address,
                      "cluster": args.cluster}), flush=True)
    try:
        while not stop.requested and not node.has_left:
            time.sleep(0.1)  # a stop request is seen within 0.1 s
    finally:
        if not node.has_left:
            log.info("stopping node %s", node_id)
        stopping_s = time.monotonic()
        node.stop(timeout=_NODE_STOP_TIMEOUT_S)
    if node.runtime is not None and node.runtime.running:
        log.error("node %s: the runtime thread was still running %.0f s after the stop began; its last fsyncs may "
                  "not have run (exiting with code %d)", node_id, time.monotonic() - stopping_s, EXIT_FAILED)
        return EXIT_FAILED
    log.info("node %s stopped in %.2f s", node_id, time.monotonic() - stopping_s)
    if node.has_left:
        log.info("node %s left cluster %r for good (meshq leave): its partitions moved to the other members and "
                 "their copies here are deleted; exiting", node_id, args.cluster)
        print(json.dumps({"event": "left", "node_id": node_id, "cluster": args.cluster}), flush=True)
    return EXIT_OK


def _read_lines(stream: Any) -> Any:
    for line in stream:
        if line.endswith(b"\n"):
            line = line[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
        yield line


def cmd_produce(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, "WARNING")
    node = _client(args)
    key = args.key.encode() if args.key is not None else None
    window: deque = deque()
    failures: list[str] = []
    sent = acknowledged = 0
    progress = _Progress(f"produced to {args.topic}")
    chunk_size = 2000

    def settle(future: Any, count: int) -> None:
        nonlocal acknowledged
        try:
            results = future.result(args.timeout + 5)
        except MeshqError as exc:
            failures.append(f"{count} records not acknowledged: {type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # the Future wait itself timed out
            failures.append(f"{count} records not acknowledged: {type(exc).__name__}: {exc}")
            return
        acknowledged += count
        if args.json:
            sys.stdout.write("".join(
                json.dumps({"partition": md.partition, "offset": md.offset}) + "\n" for md in results))
        progress.update(acknowledged)

    try:
        chunk: list[bytes] = []
        for line in _read_lines(sys.stdin.buffer):
            chunk.append(line)
            if len(chunk) >= chunk_size:
                window.append((node.produce_batch(args.topic, chunk, keys=[key] * len(chunk) if key else None,
                                                  acks=args.acks, timeout=args.timeout, partition=args.partition),
                               len(chunk)))
                sent += len(chunk)
                chunk = []
                while len(window) > 16:
                    settle(*window.popleft())
        if chunk:
            window.append((node.produce_batch(args.topic, chunk, keys=[key] * len(chunk) if key else None,
                                              acks=args.acks, timeout=args.timeout, partition=args.partition),
                           len(chunk)))
            sent += len(chunk)
        while window:
            settle(*window.popleft())
    finally:
        sys.stdout.flush()
        progress.close(acknowledged)
        node.stop()
    if failures:
        for failure in failures:
            print(f"meshq produce: {failure}", file=sys.stderr)
        print(f"meshq produce: {acknowledged} of {sent} records acknowledged", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_consume(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, "WARNING")
    node = _client(args)
    printed = 0
    stop = _StopRequest()
    signal.signal(signal.SIGTERM, stop.handler)
    consumer = None
    try:
        consumer = node.consumer(args.topic, group=args.group, start=args.start, auto_commit=False)
        idle_since = time.monotonic()
        out = sys.stdout.buffer
        while not stop.requested:
            if args.max is not None and printed >= args.max:
                break
            wait = 0.5 if args.timeout is None else max(0.0, min(0.5, idle_since + args.timeout - time.monotonic()))
            limit = 500 if args.max is None else min(500, args.max - printed)
            records = consumer.poll(timeout=wait, max_records=limit)
            if records:
                idle_since = time.monotonic()
                if args.json:
                    out.write("".join(json.dumps(record_to_json(r)) + "\n" for r in records).encode())
                else:
                    out.write(b"".join(r.value + b"\n" for r in records))
                out.flush()
                printed += len(records)
                if args.group:
                    consumer.commit()
            elif args.timeout is not None and time.monotonic() - idle_since >= args.timeout:
                break
    except KeyboardInterrupt:
        pass
    finally:
        try:
            if consumer is not None and args.group:
                consumer.commit()
        finally:
            node.stop()
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, "WARNING")
    node = _client(args)
    try:
        status = _status_with_retry(node, args.timeout, args.node)
    finally:
        node.stop()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return EXIT_OK
    from meshq.cli_render import render_status

    render_status(status)
    return EXIT_OK


def _status_with_retry(node: Any, timeout_s: float, node_id: str | None) -> dict:
    """Ask for status until it succeeds or ``timeout_s`` passes (a named node may not be known yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return node.status(timeout=max(0.5, deadline - time.monotonic()), node_id=node_id)
        except MeshqError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def cmd_leave(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, "WARNING")
    if args.node_id is None and not args.seed:
        raise ConfigError("say which node should leave: --node-id ID, or --seed HOST:PORT of that very node "
                          "(a seed from MESHQ_SEEDS alone is not taken as the node to remove)")
    node = _client(args, ready_timeout_s=min(args.timeout, 10.0))
    target = args.node_id
    try:
        if target is None:
            target = _node_at(_status_with_retry(node, min(args.timeout, 10.0), None), args.seed[0])
        print(f"asking node {target} to leave cluster {args.cluster!r}: it hands its partitions to the other "
              f"members, leaves the storage membership and stops", flush=True)
        node.leave(timeout=args.timeout, node_id=target, progress=_LeaveProgress())
    except KeyboardInterrupt:
        print(f"meshq leave: interrupted; node {target} may already be handing its partitions over: run the same "
              f"command again to finish", file=sys.stderr)
        raise
    finally:
        node.stop()
    print(f"node {target} left the cluster: its partitions are on the other members and it stops", flush=True)
    return EXIT_OK


def _node_at(status: dict, seed: str) -> str:
    """The id of the cluster member listening at ``seed`` (HOST:PORT; names are resolved)."""
    wanted = _socket_addresses(seed)
    for member in status["members"]:
        if wanted & _socket_addresses(member["address"].removeprefix("tcp://")):
            return member["node_id"]
    listing = ", ".join(f"{m['node_id']} at {m['address'].removeprefix('tcp://')}" for m in status["members"]
                        if m["role"] == "storage")
    raise ConfigError(f"no member of the cluster advertises {seed}; name the node with --node-id ID "
                      f"(storage members: {listing or 'none'})")


def _socket_addresses(host_port: str) -> set[tuple[str, int]]:
    import socket

    host, port = parse_host_port(host_port)
    try:
        return {(info[4][0], port) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return {(host, port)}


class _LeaveProgress:
    """Prints what a leaving node reports: when the count of partitions still naming it changes,
    and at least every 10 s; errors while retrying when they change."""

    def __init__(self) -> None:
        self.last: tuple | None = None
        self.printed_s = 0.0

    def __call__(self, answer: dict) -> None:
        if answer["state"] == "retrying":
            key: tuple = ("retrying", answer["error"])
            line = f"waiting for the cluster: {answer['error']}"
        elif answer["state"] == "left":
            return
        else:
            key = ("draining", answer["assigned"])
            line = f"draining: {answer['assigned']} partition(s) still assigned"
        now = time.monotonic()
        if key != self.last or now - self.printed_s >= 10.0:
            self.last, self.printed_s = key, now
            print(line, flush=True)


def cmd_topics(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, "WARNING")
    node = _client(args)
    try:
        if args.topics_command == "create":
            config = node.create_topic(args.name, partitions=args.partitions,
                                       replication_factor=args.replication_factor,
                                       retention_ms=args.retention_ms, retention_bytes=args.retention_bytes,
                                       cleanup_policy=args.cleanup_policy)
            print(json.dumps(config.to_wire()))
        elif args.topics_command == "list":
            topics = node.list_topics()
            if args.json:
                print(json.dumps([t.to_wire() for t in topics]))
            else:
                for topic in topics:
                    print(topic.name)
        else:
            config = node.topic(args.name)
            status = node.status()
            partitions = next((t["partitions"] for t in status["topics"] if t["name"] == args.name), [])
            described = {**config.to_wire(), "partitions_detail": partitions}
            if args.json:
                print(json.dumps(described))
            else:
                from meshq.cli_render import render_topic

                render_topic(described)
    finally:
        node.stop()
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from meshq.bench import run_bench

    _setup_logging(args.log_level, "WARNING")
    return run_bench(args)


COMMANDS = {
    "node": cmd_node,
    "produce": cmd_produce,
    "consume": cmd_consume,
    "status": cmd_status,
    "topics": cmd_topics,
    "leave": cmd_leave,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except MeshqError as exc:
        print(f"meshq {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
