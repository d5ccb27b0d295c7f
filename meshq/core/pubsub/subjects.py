"""Subjects, patterns and the matcher that finds every pattern a subject matches.

Theory of operation
-------------------
A *subject* is a dot-separated list of tokens (``sensors.kitchen.temp``). A *pattern* is a
subject in which a token may be ``*`` (exactly one token) or, as the last token only, ``>``
(one or more tokens): NATS semantics. ``validate_subject`` and ``validate_pattern`` raise
``InvalidSubjectError`` (a ``ValueError``) naming the rule that was broken.

``Sublist`` is a token trie (NATS calls it a sublist): each level maps a literal token or
``*`` to the next level, and holds the values whose pattern ends there and those whose
pattern ends there with ``>``. Matching a subject of ``k`` tokens visits at most ``2**k``
levels (a literal and a ``*`` branch per token), however many patterns are stored, so the
cost is flat in the number of subscriptions. Results are cached per subject in a bounded
dict that every change replaces.

Thread safety: only one thread changes a ``Sublist`` (the runtime thread, through the core),
but publishing threads may call ``match`` at the same time. Matching only does dict ``get``
calls and reads tuples that are replaced, never mutated, so each read is atomic under the
GIL. A change swaps in a new cache dict *after* editing the trie; ``match`` takes the cache
object before walking and stores into that same object, so a result computed from the old
trie can only land in the discarded cache.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from meshq.errors import InvalidSubjectError

MAX_SUBJECT_BYTES = 1024
MAX_TOKENS = 64  # bounds the trie walk (2**k branches at worst with '*' at every level)
_CACHE_ENTRIES = 4096  # match results kept per Sublist (dropped wholesale when full)
_WHITESPACE = frozenset(" \t\r\n\v\f\x00")


def _check(text: Any, what: str) -> list[str]:
    if not isinstance(text, str):
        raise InvalidSubjectError(f"a {what} must be a str, not {type(text).__name__}")
    if not text:
        raise InvalidSubjectError(f"empty {what}: give dot-separated tokens, e.g. 'sensors.kitchen.temp'")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SUBJECT_BYTES:
        raise InvalidSubjectError(f"{what} of {size} bytes: at most {MAX_SUBJECT_BYTES} bytes are allowed")
    if any(c in _WHITESPACE or c.isspace() for c in text):
        raise InvalidSubjectError(f"{what} {text[:80]!r} contains whitespace: tokens may not contain spaces, "
                                  f"tabs or newlines")
    tokens = text.split(".")
    if "" in tokens:
        raise InvalidSubjectError(f"{what} {text[:80]!r} has an empty token: no leading, trailing or double dots")
    if len(tokens) > MAX_TOKENS:
        raise InvalidSubjectError(f"{what} {text[:80]!r} has {len(tokens)} tokens: at most {MAX_TOKENS}")
    return tokens


def validate_subject(subject: Any) -> str:
    """Return ``subject`` if it is a valid subject to publish to, else raise ``InvalidSubjectError``."""
    tokens = _check(subject, "subject")
    for token in tokens:
        if "*" in token or ">" in token:
            raise InvalidSubjectError(f"subject {subject[:80]!r} contains a wildcard ({token!r}): wildcards are for "
                                      f"subscribing; publish to a concrete subject")
    return subject


def validate_pattern(pattern: Any) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise ``InvalidSubjectError``."""
    tokens = _check(pattern, "pattern")
    last = len(tokens) - 1
    for index, token in enumerate(tokens):
        if token in ("*", ">"):
            if token == ">" and index != last:
                raise InvalidSubjectError(f"pattern {pattern[:80]!r}: '>' may only be the last token "
                                          f"(it matches the rest of the subject)")
            continue
        if "*" in token or ">" in token:
            raise InvalidSubjectError(f"pattern {pattern[:80]!r}: wildcard inside the token {token!r}: '*' and '>' "
                                      f"must be whole tokens (e.g. 'a.*.c', 'a.>')")
    return pattern


def validate_queue(queue: Any) -> str | None:
    """Return ``queue`` (None: no queue group) if it is a valid queue group name, else raise."""
    if queue is None:
        return None
    if not isinstance(queue, str) or not queue or len(queue) > 64 or any(c.isspace() or c in "*>" for c in queue):
        raise InvalidSubjectError(f"queue group {queue!r}: give 1-64 characters without whitespace, '*' or '>'")
    return queue


def matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` matches ``pattern`` (one pair; ``Sublist`` for many patterns)."""
    pattern_tokens = pattern.split(".")
    subject_tokens = subject.split(".")
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return len(subject_tokens) > index
        if index >= len(subject_tokens) or (token != "*" and token != subject_tokens[index]):
            return False
    return len(subject_tokens) == len(pattern_tokens)


class _Level:
    __slots__ = ("children", "values", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Level] = {}  # literal token or '*' -> next level
        self.values: tuple = ()  # values whose pattern ends at this level
        self.rest: tuple = ()  # values whose pattern is this level's path followed by '>'


class Sublist:
    """Patterns mapped to values; ``match(subject)`` gives every value whose pattern matches."""

    __slots__ = ("_root", "_cache", "count")

    def __init__(self) -> None:
        self._root = _Level()
        self._cache: dict[str, tuple] = {}
        self.count = 0  # (pattern, value) pairs stored

    def insert(self, pattern: str, value: Hashable) -> None:
        """Store ``value`` under ``pattern`` (a validated pattern); a pair stored twice is kept once."""
        level = self._root
        tokens = pattern.split(".")
        for token in tokens[:-1]:
            level = self._child(level, token)
        last = tokens[-1]
        if last == ">":
            if value not in level.rest:
                level.rest = (*level.rest, value)
                self.count += 1
        else:
            level = self._child(level, last)
            if value not in level.values:
                level.values = (*level.values, value)
                self.count += 1
        self._cache = {}

    def remove(self, pattern: str, value: Hashable) -> bool:
        """Remove ``value`` from ``pattern``; False if it was not there. Empty levels are pruned."""
        tokens = pattern.split(".")
        path = [self._root]
        for token in tokens if tokens[-1] != ">" else tokens[:-1]:
            level = path[-1].children.get(token)
            if level is None:
                return False
            path.append(level)
        level = path[-1]
        if tokens[-1] == ">":
            if value not in level.rest:
                return False
            level.rest = tuple(v for v in level.rest if v != value)
        else:
            if value not in level.values:
                return False
            level.values = tuple(v for v in level.values if v != value)
        self.count -= 1
        walked = tokens if tokens[-1] != ">" else tokens[:-1]
        for depth in range(len(walked), 0, -1):  # prune levels left empty, deepest first
            child = path[depth]
            if child.children or child.values or child.rest:
                break
            del path[depth - 1].children[walked[depth - 1]]
        self._cache = {}
        return True

    def match(self, subject: str) -> tuple:
        """Every value whose pattern matches ``subject`` (a valid subject), in a stable order."""
        cache = self._cache
        found = cache.get(subject)
        if found is not None:
            return found
        out: list = []
        _walk(self._root, subject.split("."), 0, out)
        found = tuple(out)
        if len(cache) >= _CACHE_ENTRIES:
            cache.clear()
        cache[subject] = found
        return found

    @staticmethod
    def _child(level: _Level, token: str) -> _Level:
        child = level.children.get(token)
        if child is None:
            child = level.children[token] = _Level()
        return child


def _walk(level: _Level, tokens: list[str], index: int, out: list) -> None:
    if index == len(tokens):
        out.extend(level.values)
        return
    if level.rest:
        out.extend(level.rest)  # '>' takes the one or more tokens left
    children = level.children
    child = children.get(tokens[index])
    if child is not None:
        _walk(child, tokens, index + 1, out)
    star = children.get("*")
    if star is not None:
        _walk(star, tokens, index + 1, out)
