"""``meshq pub`` and ``meshq sub``: ephemeral pub/sub from the shell (argument parsing and output only)."""

from __future__ import annotations

import argparse
import base64
import json
import signal
import sys
import time
from typing import Any

from meshq.errors import MeshqError, SubscriptionClosedError, TimeoutError

_SYNC_WAIT_S = 3.0  # how long `meshq pub` waits to learn every known node's subscriptions first


def add_parsers(sub: Any, connection_options: Any, positive_float: Any, non_negative_int: Any) -> None:
    pub = sub.add_parser("pub", help="publish each stdin line as one message (ephemeral pub/sub)")
    pub.add_argument("subject", help="dot-separated subject, e.g. sensors.kitchen.temp (no wildcards)")
    pub.add_argument("--header", action="append", default=None, metavar="NAME=VALUE",
                     help="a header on every message; repeatable")
    connection_options(pub)

    subscribe = sub.add_parser("sub", help="print messages published to subjects matching a pattern")
    subscribe.add_argument("pattern", help="subject pattern: '*' matches one token, '>' the rest (e.g. sensors.>)")
    subscribe.add_argument("--queue", default=None, metavar="Q",
                           help="join queue group Q: each message goes to one member of the group only")
    subscribe.add_argument("--count", type=non_negative_int, default=None, metavar="N", help="stop after N messages")
    subscribe.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                           help="stop after S seconds without a message (default: run until interrupted)")
    subscribe.add_argument("--json", action="store_true",
                           help="one JSON object per message: subject, data (or data_b64), headers, source")
    connection_options(subscribe)


def _wait_synced(node: Any, timeout_s: float) -> None:
    """Learn the subscriptions of every node this one knows before publishing (best effort)."""
    deadline = time.monotonic() + timeout_s
    time.sleep(0.2)  # the first gossip names the other members
    while time.monotonic() < deadline and not node.core.pubsub.synced():
        time.sleep(0.05)


def cmd_pub(args: argparse.Namespace) -> int:
    from meshq.cli.commands import EXIT_OK, _client, _read_lines, _setup_logging
    from meshq.core.pubsub.subjects import validate_subject

    _setup_logging(args, "WARNING")
    validate_subject(args.subject)  # before connecting: a typo fails at once
    headers = {}
    for item in args.header or ():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise MeshqError(f"--header {item!r} is not NAME=VALUE")
        headers[name] = value.encode()
    node = _client(args)
    published = 0
    try:
        _wait_synced(node, _SYNC_WAIT_S)
        for line in _read_lines(sys.stdin.buffer):
            node.publish(args.subject, line, headers or None)
            published += 1
        time.sleep(0.2)  # let the PUB socket hand the last messages to the network
    finally:
        node.stop()
    print(f"meshq pub: published {published} messages to {args.subject}", file=sys.stderr)
    return EXIT_OK


def message_to_json(message: Any) -> dict:
    out: dict[str, Any] = {"subject": message.subject, "source": message.source}
    try:
        out["data"] = message.data.decode()
    except UnicodeDecodeError:
        out["data_b64"] = base64.b64encode(message.data).decode()
    headers = {}
    for name, value in (message.headers or {}).items():
        try:
            headers[name] = value.decode()
        except UnicodeDecodeError:
            headers[name] = {"b64": base64.b64encode(value).decode()}
    out["headers"] = headers
    return out


def cmd_sub(args: argparse.Namespace) -> int:
    from meshq.cli.commands import EXIT_OK, _client, _setup_logging, _StopRequest
    from meshq.core.pubsub.subjects import validate_pattern, validate_queue

    _setup_logging(args, "WARNING")
    validate_pattern(args.pattern)
    validate_queue(args.queue)
    node = _client(args)
    stop = _StopRequest()
    signal.signal(signal.SIGTERM, stop.handler)
    printed = 0
    out = sys.stdout.buffer
    try:
        sub = node.subscribe(args.pattern, queue=args.queue)
        group = f" in queue group {args.queue}" if args.queue else ""
        print(f"meshq sub: node {node.node_id} subscribed to {args.pattern}{group}", file=sys.stderr, flush=True)
        idle_since = time.monotonic()
        while not stop.requested and (args.count is None or printed < args.count):
            wait = 0.5 if args.timeout is None else max(0.0, min(0.5, idle_since + args.timeout - time.monotonic()))
            try:
                message = sub.recv(timeout=wait)
            except TimeoutError:
                if args.timeout is not None and time.monotonic() - idle_since >= args.timeout:
                    break
                continue
            except SubscriptionClosedError:
                break
            idle_since = time.monotonic()
            if args.json:
                out.write(json.dumps(message_to_json(message)).encode() + b"\n")
            else:
                out.write(message.data + b"\n")
            out.flush()
            printed += 1
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return EXIT_OK


__all__ = ["add_parsers", "cmd_pub", "cmd_sub", "message_to_json"]
