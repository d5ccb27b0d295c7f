"""Stable hashes: identical in every process and on every machine (never Python's ``hash()``)."""

from __future__ import annotations

import hashlib


def stable_hash64(data: bytes) -> int:
    """64-bit BLAKE2b hash of ``data`` as an unsigned integer."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition a keyed record goes to."""
    return stable_hash64(key) % partitions
