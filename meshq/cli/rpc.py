"""``meshq request`` and ``meshq serve``: request/reply from the shell (parsing and printing only)."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from typing import Any

from meshq.cli.parser import _connection_options, _positive_float
from meshq.errors import MeshqError

EXIT_OK = 0
EXIT_FAILED = 1


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def add_parsers(sub: Any) -> None:
    """Add ``request`` and ``serve`` to the ``meshq`` subcommands."""
    request = sub.add_parser("request", help="send each stdin line as one request to SERVICE; print each reply")
    request.add_argument("service")
    request.add_argument("--timeout", type=_positive_float, default=5.0, metavar="S",
                         help="seconds each request may take (default 5)")
    _connection_options(request)

    serve = sub.add_parser("serve", help="serve SERVICE until interrupted: run --exec CMD per request, or echo")
    serve.add_argument("service")
    serve.add_argument("--exec", dest="exec_command", default=None, metavar="CMD",
                       help="shell command run per request: the request on its stdin, its stdout the reply "
                            "(a non-zero exit answers an error carrying its stderr); without it: echo")
    serve.add_argument("--exec-timeout", type=_positive_float, default=60.0, metavar="S",
                       help="kill CMD after S seconds and answer an error (default 60)")
    serve.add_argument("--concurrency", type=_positive_int, default=1, metavar="N",
                       help="requests handled at once by this process (default 1)")
    serve.add_argument("--idempotent", action="store_true",
                       help="running a request twice is harmless: a request whose instance dies is retried elsewhere")
    _connection_options(serve)


def add_bench_options(bench: argparse.ArgumentParser) -> None:
    """The options of ``meshq bench rpc`` (meshq.bench.rpc)."""
    group = bench.add_argument_group("bench rpc")
    group.add_argument("--requests", type=_positive_int, default=100_000,
                       help="requests per pipelined round (default 100000)")
    group.add_argument("--sync-requests", type=_positive_int, default=5_000,
                       help="requests per one-at-a-time round (default 5000)")
    group.add_argument("--window", type=_positive_int, default=256,
                       help="requests in flight in the pipelined rounds (default 256)")
    group.add_argument("--server-concurrency", type=_positive_int, default=1,
                       help="concurrency of the served benchmark service (default 1)")


def cmd_request(args: argparse.Namespace) -> int:
    from meshq.cli.commands import _client, _read_lines, _setup_logging

    _setup_logging(args, "WARNING")
    node = _client(args)
    answered = 0
    try:
        for line in _read_lines(sys.stdin.buffer):
            try:
                reply = node.request(args.service, line, timeout=args.timeout)
            except MeshqError as exc:
                sys.stdout.flush()
                print(f"meshq request: {type(exc).__name__}: {exc}", file=sys.stderr)
                print(f"meshq request: {answered} requests answered before this one", file=sys.stderr)
                return EXIT_FAILED
            sys.stdout.buffer.write(reply + b"\n")
            sys.stdout.flush()
            answered += 1
    finally:
        node.stop()
    return EXIT_OK


class CommandFailed(Exception):
    """``meshq serve --exec CMD``: CMD exited non-zero (the caller gets it as a RemoteError)."""


class _Exec:
    """The handler of ``meshq serve --exec CMD``: one run of CMD per request."""

    def __init__(self, command: str, timeout_s: float) -> None:
        self.command = command
        self.timeout_s = timeout_s

    def __call__(self, payload: bytes) -> bytes:
        try:
            done = subprocess.run(self.command, shell=True, input=payload, capture_output=True,
                                  timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise CommandFailed(f"{self.command!r} ran longer than {self.timeout_s} s and was killed") from None
        if done.returncode != 0:
            stderr = done.stderr.decode(errors="replace").strip()
            raise CommandFailed(f"{self.command!r} exited with status {done.returncode}: {stderr[-2000:]}")
        return done.stdout


def cmd_serve(args: argparse.Namespace) -> int:
    from meshq.cli.commands import _client, _setup_logging, _StopRequest

    _setup_logging(args, "WARNING")
    handler = _Exec(args.exec_command, args.exec_timeout) if args.exec_command else (lambda payload: payload)
    stop = _StopRequest()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop.handler)
    node = _client(args)
    try:
        node.serve(args.service, handler, concurrency=args.concurrency, idempotent=args.idempotent)
        print(json.dumps({"event": "ready", "service": args.service, "node_id": node.node_id,
                          "cluster": args.cluster}), flush=True)
        while not stop.requested:
            time.sleep(0.1)
    finally:
        node.stop()
    return EXIT_OK


COMMANDS = {"request": cmd_request, "serve": cmd_serve}
