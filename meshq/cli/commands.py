"""``meshq`` commands: each turns parsed arguments into calls on a ``meshq.Node`` and prints the outcome."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from typing import Any

from meshq.cli.acl import cmd_acl
from meshq.cli.connect import interfaces_of, keys_of, seeds_of, start_client
from meshq.cli.logs import add_fields, setup_logging
from meshq.cli.output import TerminalBar, _LeaveProgress, record_to_json, render_status, render_topic
from meshq.cli.pubsub import cmd_pub, cmd_sub
from meshq.cli.rpc import COMMANDS as RPC_COMMANDS
from meshq.config import check_data_dir, parse_host_port
from meshq.errors import ConfigError, MeshqError, error_code

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

log = logging.getLogger("meshq.cli")


def _setup_logging(args: argparse.Namespace, default: str) -> None:
    """``--log-level`` (else ``default``) and ``--log-format`` (text or json lines) on stderr."""
    setup_logging(args.log_level, default, getattr(args, "log_format", None))


def _client(args: argparse.Namespace) -> Any:
    """A started client node that the cluster answered (``meshq.cli.connect``)."""
    return start_client(args)


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


def cmd_node(args: argparse.Namespace) -> int:
    from meshq.node import Node

    _setup_logging(args, "INFO")
    check_data_dir(args.data)
    options: dict[str, Any] = {"fsync_interval_s": args.fsync_interval, "segment_bytes": args.segment_bytes,
                               "member_timeout_s": args.member_timeout, "min_free_bytes": args.min_free_bytes,
                               "copy_rate_mb_per_s": args.copy_rate, "scrub_rate_mb_s": args.scrub_rate}
    if args.advertise:
        options["advertised_host"] = args.advertise
    if args.metrics_port is not None:
        options["metrics_port"] = args.metrics_port
    node = Node(cluster=args.cluster, data_dir=args.data, host=args.host, port=args.port, seeds=seeds_of(args),
                mdns=not args.no_mdns, interfaces=interfaces_of(args), role="storage",
                replication_factor=args.replication_factor, partitions=args.partitions,
                node_id=args.node_id, pub_port=args.pub_port, fsync=args.fsync, keys=keys_of(args), **options)
    stop = _StopRequest()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop.handler)
    node.start()
    node_id = node.node_id
    fields = {"node_id": node_id, "cluster": args.cluster}  # (extra fields of --log-format json)
    add_fields(**fields)
    print(json.dumps({"event": "ready", "node_id": node_id, "address": node.address,
                      "cluster": args.cluster}), flush=True)
    try:
        while not stop.requested and not node.has_left:
            time.sleep(0.1)  # a stop request is seen within 0.1 s
    finally:
        if not node.has_left:
            log.info("stopping node %s", node_id, extra=fields)
        stopping_s = time.monotonic()
        node.stop(timeout=_NODE_STOP_TIMEOUT_S)
    if node.runtime is not None and node.runtime.running:
        log.error("node %s: the runtime thread was still running %.0f s after the stop began; its last fsyncs may "
                  "not have run (exiting with code %d)", node_id, time.monotonic() - stopping_s, EXIT_FAILED,
                  extra=fields)
        return EXIT_FAILED
    log.info("node %s stopped in %.2f s", node_id, time.monotonic() - stopping_s,
             extra={**fields, "stop_s": round(time.monotonic() - stopping_s, 3)})
    if node.has_left:
        log.info("node %s left cluster %r for good (meshq leave): its partitions moved to the other members and "
                 "their copies here are deleted; exiting", node_id, args.cluster, extra=fields)
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
    _setup_logging(args, "WARNING")
    node = _client(args)
    key = args.key.encode() if args.key is not None else None
    window: deque = deque()
    failures: list[str] = []
    sent = acknowledged = 0
    # on a terminal: a count of acknowledged records on stderr (not when --json output goes to that terminal too)
    progress = TerminalBar(f"produce {args.topic}", enabled=sys.stderr.isatty() and not (
        args.json and sys.stdout.isatty()))
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
    _setup_logging(args, "WARNING")
    shared = getattr(args, "shared", False)
    if shared and (args.group is None or args.start != "earliest"):
        raise ConfigError("--shared needs --group G (the shared group to join) and reads from the earliest "
                          "unacked record (drop --from)")
    node = _client(args)
    printed = 0
    stop = _StopRequest()
    signal.signal(signal.SIGTERM, stop.handler)
    consumer = None
    # a count of printed records on stderr when it is a terminal and the records go elsewhere (a file, a pipe)
    progress = TerminalBar(f"consume {args.topic}", total=args.max,
                           enabled=sys.stderr.isatty() and not sys.stdout.isatty())
    try:
        if shared:
            consumer = node.consumer(args.topic, group=args.group, mode="shared")
        else:
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
                progress.update(printed)
                if shared:
                    for record in records:  # printed: done
                        consumer.ack(record)
                elif args.group:
                    consumer.commit()
            elif args.timeout is not None and time.monotonic() - idle_since >= args.timeout:
                break
    except KeyboardInterrupt:
        pass
    finally:
        progress.close(printed)
        try:
            if consumer is not None and shared:
                consumer.close()  # sends the last acks and waits for them; gives back what was not printed
            elif consumer is not None:
                if args.group:
                    consumer.commit()
                consumer.close()  # a group member leaves its group: the others rebalance at once
        finally:
            node.stop()
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    _setup_logging(args, "WARNING")
    node = _client(args)
    try:
        status = _status_with_retry(node, args.timeout, args.node)
    finally:
        node.stop()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return EXIT_OK
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
    """``meshq leave``: progress for a person (a bar on a terminal, else lines), or with ``--json`` one
    object on stdout: ``{"event": "left"|"failed", "node_id", "cluster", "elapsed_s", ...}``."""
    _setup_logging(args, "WARNING")
    started_s = time.monotonic()
    target = args.node_id

    def outcome(event: str, **fields: Any) -> None:
        if args.json:
            print(json.dumps({"event": event, "node_id": target, "cluster": args.cluster,
                              "elapsed_s": round(time.monotonic() - started_s, 3), **fields}), flush=True)

    progress: _LeaveProgress | None = None
    try:
        if args.node_id is None and not args.seed:
            raise ConfigError("say which node should leave: --node-id ID, or --seed HOST:PORT of that very node "
                              "(a seed from MESHQ_SEEDS alone is not taken as the node to remove)")
        node = _client(args)
        try:
            if target is None:
                target = _node_at(_status_with_retry(node, min(args.timeout, 10.0), None), args.seed[0])
            if not args.json:
                print(f"asking node {target} to leave cluster {args.cluster!r}: it hands its partitions to the other "
                      f"members, leaves the storage membership and stops", flush=True)
            progress = _LeaveProgress(quiet=args.json)
            node.leave(timeout=args.timeout, node_id=target, progress=progress)
        except KeyboardInterrupt:
            print(f"meshq leave: interrupted; node {target} may already be handing its partitions over: run the same "
                  f"command again to finish", file=sys.stderr)
            outcome("interrupted", error="interrupted", message="interrupted; run the same command again to finish")
            raise
        finally:
            if progress is not None:
                progress.close()
            node.stop()
    except MeshqError as exc:
        outcome("failed", error=error_code(exc), message=str(exc), retriable=exc.retriable,
                **({"assigned": progress.reports[-1]["assigned"]} if progress and progress.reports
                   and "assigned" in progress.reports[-1] else {}))
        raise  # (main prints the reason on stderr and chooses the exit code)
    outcome("left", assigned=0)
    if not args.json:
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


def cmd_topics(args: argparse.Namespace) -> int:
    _setup_logging(args, "WARNING")
    node = _client(args)
    try:
        if args.topics_command == "create":
            config = node.create_topic(args.name, partitions=args.partitions,
                                       replication_factor=args.replication_factor,
                                       retention_ms=args.retention_ms, retention_bytes=args.retention_bytes,
                                       cleanup_policy=args.cleanup_policy,
                                       delete_retention_ms=args.delete_retention_ms)
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
                render_topic(described)
    finally:
        node.stop()
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from meshq.cli.demo import cmd_demo as run_demo

    return run_demo(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from meshq.bench import run_bench

    _setup_logging(args, "WARNING")
    return run_bench(args)


def cmd_keygen(args: argparse.Namespace) -> int:
    from meshq.keys import add_client, keygen

    if args.client is not None:
        path = add_client(args.dir, args.client)
        print(f"client {args.client!r}: {path} (give it to that client: --keys {path}); its public key is now in "
              f"{os.path.join(args.dir, 'cluster', 'trusted')}: copy that file to the same place on every node. It "
              f"holds no permission until granted: meshq acl grant {args.client} PERMISSION PATTERN --keys "
              f"{os.path.join(args.dir, 'clients', 'admin')}")
        return 0
    root = keygen(args.dir)
    print(f"cluster key set in {root}:\n  {root / 'cluster'}  every storage node: meshq node --keys "
          f"{root / 'cluster'}\n  {root / 'clients' / 'admin'}  the admin client: --keys {root / 'clients' / 'admin'}")
    return 0


COMMANDS = {
    "keygen": cmd_keygen,
    "node": cmd_node,
    "produce": cmd_produce,
    "consume": cmd_consume,
    "status": cmd_status,
    "topics": cmd_topics,
    "acl": cmd_acl,
    "leave": cmd_leave,
    "bench": cmd_bench,
    "demo": cmd_demo,
    "pub": cmd_pub,
    "sub": cmd_sub,
    **RPC_COMMANDS,
}
