"""The ``meshq`` command line: argument parsing (``parser``), the commands (``commands``) and
their output (``output``); the work itself is in ``meshq.Node``."""

from meshq.cli.main import main
from meshq.cli.parser import build_parser

__all__ = ["build_parser", "main"]
