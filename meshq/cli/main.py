"""``meshq`` entry point: parse, run the command, turn errors into messages and exit codes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from meshq.cli.commands import COMMANDS, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from meshq.cli.logs import json_line
from meshq.cli.parser import build_parser
from meshq.errors import ConfigError, MeshqError, error_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except MeshqError as exc:
        if getattr(args, "log_format", "text") == "json":  # the failure as one more JSON line, like the logs
            print(json_line("ERROR", "meshq.cli", f"meshq {args.command}: {exc}", command=args.command,
                            error=error_code(exc)), file=sys.stderr)
        else:
            print(f"meshq {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
