"""``meshq`` entry point: parse, run the command, turn errors into messages and exit codes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from meshq.cli.commands import COMMANDS, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from meshq.cli.parser import build_parser
from meshq.errors import ConfigError, MeshqError


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
