"""``python -m meshq`` runs the CLI."""

import sys

from meshq.cli import main

sys.exit(main())
