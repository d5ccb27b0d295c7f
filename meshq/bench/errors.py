"""Errors of ``meshq bench``.

Theory of operation
-------------------
A ``BenchError`` means the benchmark could not go on or its result failed verification.
Raised out of a scenario, it ends the run: ``meshq bench`` prints it and exits 1. The
cluster scenarios catch it around each part and record it with ``_error_text`` instead,
keeping what was measured before; a failure that is itself a result (for instance
``NotEnoughReplicasError`` at ``acks=quorum``) is recorded the same way and the run goes on.
"""

from __future__ import annotations


class BenchError(Exception):
    """The benchmark could not run or its result failed verification."""


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
