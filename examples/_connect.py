"""Shared command-line options of the examples: how to reach the mesh."""

from __future__ import annotations

import argparse
import socket


def connection_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cluster", default="default")
    parser.add_argument("--seed", action="append", default=[], metavar="HOST:PORT",
                        help="a running `meshq node` (repeatable)")
    parser.add_argument("--interface", action="append", default=None, metavar="IP",
                        help="use mDNS on this interface address (repeatable); without it, only seeds are used")
    parser.add_argument("--host", default=None, metavar="IP",
                        help="this machine's address the other nodes reach it at (default: the first --interface, "
                             "else the local address that routes to the first --seed)")
    return parser


def node_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for meshq.Node: mDNS only when an interface is named (never all interfaces)."""
    if not args.seed and not args.interface:
        raise SystemExit("give --seed HOST:PORT of a running `meshq node`, or --interface IP for mDNS")
    return {"cluster": args.cluster, "seeds": args.seed, "mdns": bool(args.interface),
            "interfaces": args.interface, "host": own_address(args)}


def own_address(args: argparse.Namespace) -> str:
    """Where this process listens: pub/sub and request/reply peers connect back to it, so it must
    be an address of this machine they can reach, not 127.0.0.1 (unless the mesh is on loopback)."""
    if args.host:
        return args.host
    if args.interface:
        return args.interface[0]
    host = args.seed[0].rsplit(":", 1)[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # no packet is sent: only a route lookup
        probe.connect((host, 9))
        return probe.getsockname()[0]
