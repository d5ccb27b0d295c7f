"""Shared command-line options of the examples: how to reach the mesh."""

from __future__ import annotations

import argparse


def connection_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cluster", default="default")
    parser.add_argument("--seed", action="append", default=[], metavar="HOST:PORT",
                        help="a running `meshq node` (repeatable)")
    parser.add_argument("--interface", action="append", default=None, metavar="IP",
                        help="use mDNS on this interface address (repeatable); without it, only seeds are used")
    return parser


def node_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for meshq.Node: mDNS only when an interface is named (never all interfaces)."""
    if not args.seed and not args.interface:
        raise SystemExit("give --seed HOST:PORT of a running `meshq node`, or --interface IP for mDNS")
    return {"cluster": args.cluster, "seeds": args.seed, "mdns": bool(args.interface),
            "interfaces": args.interface}
