"""The real clock. The simulator provides a twin with the same two methods."""

from __future__ import annotations

import time


class RealClock:
    """Monotonic seconds for deadlines, wall milliseconds for record timestamps."""

    def now_s(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000
