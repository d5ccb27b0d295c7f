"""``meshq acl grant|revoke|list``: permissions per client key, from the shell (parsing and printing only)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from meshq.core.acl import PERMISSIONS

EXIT_OK = 0


def add_parsers(sub: Any) -> None:
    """Add ``acl`` (grant, revoke, list) to the ``meshq`` subcommands."""
    from meshq.cli.parser import _connection_options  # (meshq.cli.parser imports this module)

    acl = sub.add_parser("acl", help="grant, revoke and list the permissions of client keys (with the admin key)")
    acl_sub = acl.add_subparsers(dest="acl_command", metavar="ACTION")
    acl_sub.required = True
    kinds = ", ".join(f"{permission} ({kind})" for permission, kind in PERMISSIONS.items())
    for action, text in (("grant", "let client NAME do PERMISSION on what PATTERN matches"),
                         ("revoke", "take back exactly one grant (the same NAME PERMISSION PATTERN)")):
        parser = acl_sub.add_parser(action, help=text)
        parser.add_argument("name", metavar="NAME", help="the client, as given to `meshq keygen DIR --client NAME`")
        parser.add_argument("permission", metavar="PERMISSION", choices=list(PERMISSIONS), help=kinds)
        parser.add_argument("pattern", metavar="PATTERN",
                            help="topics, subjects or services: dot-separated tokens, '*' one token, '>' the rest "
                                 "(e.g. 'orders.>')")
        _connection_options(parser)
    listing = acl_sub.add_parser("list", help="every grant the cluster holds")
    listing.add_argument("--json", action="store_true", help='one JSON array of {"name", "permission", "pattern"}')
    _connection_options(listing)


def cmd_acl(args: argparse.Namespace) -> int:
    from meshq.cli.commands import _client, _setup_logging

    _setup_logging(args, "WARNING")
    node = _client(args)
    try:
        if args.acl_command == "list":
            grants = node.acl_list()
            if args.json:
                print(json.dumps(grants))
            elif not grants:
                print("no grants (only the admin key can do anything)")
            else:
                width = max(len(g["name"]) for g in grants)
                for g in grants:
                    print(f"{g['name']:<{width}}  {g['permission']:<9}  {g['pattern']}")
            return EXIT_OK
        if args.acl_command == "grant":
            changed = node.acl_grant(args.name, args.permission, args.pattern)
            print(f"granted {args.permission} {args.pattern} to {args.name}" if changed else
                  f"{args.name} already holds {args.permission} {args.pattern}; nothing changed")
        else:
            node.acl_revoke(args.name, args.permission, args.pattern)
            print(f"revoked {args.permission} {args.pattern} from {args.name}")
        return EXIT_OK
    finally:
        node.stop()
