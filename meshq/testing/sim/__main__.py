"""``python -m meshq.testing.sim``: replay one seed (``--seed N``) or run many (``--seeds K``)."""

from __future__ import annotations

import sys

from meshq.testing.sim import main

sys.exit(main())
