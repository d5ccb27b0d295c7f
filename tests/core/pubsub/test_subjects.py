"""Subjects, patterns and the Sublist matcher (meshq.core.pubsub.subjects)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshq.core.pubsub.subjects import (
    MAX_SUBJECT_BYTES,
    Sublist,
    matches,
    validate_pattern,
    validate_queue,
    validate_subject,
)
from meshq.errors import InvalidSubjectError, UsageError


@pytest.mark.parametrize(("pattern", "subject", "expected"), [
    ("a.b.c", "a.b.c", True),
    ("a.b.c", "a.b", False),
    ("a.b", "a.b.c", False),
    ("a.*.c", "a.x.c", True),
    ("a.*.c", "a.x.y.c", False),
    ("a.*", "a", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c.d", True),
    ("a.>", "a", False),  # '>' takes one or more tokens
    (">", "a", True),
    (">", "a.b.c", True),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("a.*.>", "a.b.c", True),
    ("a.*.>", "a.b", False),
])
def test_nats_semantics(pattern, subject, expected):
    assert matches(pattern, subject) is expected
    table = Sublist()
    table.insert(pattern, "v")
    assert (table.match(subject) == ("v",)) is expected


@pytest.mark.parametrize(("text", "rule"), [
    ("", "empty"),
    ("a..b", "empty token"),
    (".a", "empty token"),
    ("a.", "empty token"),
    ("a b", "whitespace"),
    ("a.\tb", "whitespace"),
    ("a\n", "whitespace"),
    ("a." + "x" * MAX_SUBJECT_BYTES, "bytes"),
])
def test_malformed_subjects_and_patterns_name_the_rule(text, rule):
    for validate in (validate_subject, validate_pattern):
        with pytest.raises(ValueError, match=rule):
            validate(text)


@pytest.mark.parametrize(("pattern", "rule"), [
    ("a.>.b", "'>' may only be the last token"),
    (">.a", "'>' may only be the last token"),
    ("a.b*", "wildcard inside the token"),
    ("a.>b", "wildcard inside the token"),
    ("a*.b", "wildcard inside the token"),
])
def test_malformed_patterns(pattern, rule):
    with pytest.raises(InvalidSubjectError, match=rule):
        validate_pattern(pattern)


@pytest.mark.parametrize("subject", ["a.*", "a.>", "*", "a.b*"])
def test_a_publish_subject_may_not_hold_wildcards(subject):
    with pytest.raises(InvalidSubjectError, match="wildcard"):
        validate_subject(subject)


def test_the_errors_are_value_errors_and_usage_errors():
    with pytest.raises(InvalidSubjectError) as info:
        validate_subject(3)
    assert isinstance(info.value, ValueError) and isinstance(info.value, UsageError)


def test_a_subject_of_exactly_the_limit_is_accepted():
    subject = "a." + "x" * (MAX_SUBJECT_BYTES - 2)
    assert validate_subject(subject) == subject
    with pytest.raises(InvalidSubjectError, match="bytes"):
        validate_subject("é" * (MAX_SUBJECT_BYTES // 2 + 1))  # the limit is in UTF-8 bytes


def test_queue_names():
    assert validate_queue(None) is None and validate_queue("workers") == "workers"
    for bad in ("", "a b", "w*", "x" * 65, 5):
        with pytest.raises(InvalidSubjectError, match="queue group"):
            validate_queue(bad)


def test_remove_prunes_and_forgets_cached_results():
    table = Sublist()
    table.insert("a.*.c", 1)
    table.insert("a.>", 2)
    table.insert("a.b.c", 3)
    assert sorted(table.match("a.b.c")) == [1, 2, 3]
    assert table.remove("a.*.c", 1) and not table.remove("a.*.c", 1)
    assert sorted(table.match("a.b.c")) == [2, 3]
    assert table.remove("a.>", 2) and table.remove("a.b.c", 3)
    assert table.match("a.b.c") == () and table.count == 0
    assert table._root.children == {}  # every level left empty was pruned


def test_a_pair_inserted_twice_is_kept_once():
    table = Sublist()
    table.insert("a.b", 1)
    table.insert("a.b", 1)
    assert table.match("a.b") == (1,) and table.count == 1


TOKENS = st.sampled_from(["a", "b", "c", "kitchen"])
SUBJECTS = st.lists(TOKENS, min_size=1, max_size=5).map(".".join)
PATTERN_TOKENS = st.sampled_from(["a", "b", "c", "kitchen", "*"])
PATTERNS = st.builds(lambda tokens, tail: ".".join(tokens + ([">"] if tail else [])),
                     st.lists(PATTERN_TOKENS, min_size=0, max_size=4), st.booleans()).filter(bool)


def naive(pattern: str, subject: str) -> bool:
    """Matching written the other way round: recursion over both token lists."""
    def go(p: list[str], s: list[str]) -> bool:
        if not p:
            return not s
        if p[0] == ">":
            return len(s) >= 1
        return bool(s) and (p[0] == "*" or p[0] == s[0]) and go(p[1:], s[1:])
    return go(pattern.split("."), subject.split("."))


@settings(max_examples=300, deadline=None)
@given(st.lists(PATTERNS, max_size=30), st.lists(st.integers(0, 29), max_size=10), st.lists(SUBJECTS, max_size=20))
def test_the_sublist_agrees_with_a_naive_matcher(patterns, removals, subjects):
    table = Sublist()
    stored = {}
    for index, pattern in enumerate(patterns):
        validate_pattern(pattern)
        table.insert(pattern, index)
        stored[index] = pattern
    for subject in subjects[:3]:
        table.match(subject)  # fill the cache, which the removals below must invalidate
    for index in removals:
        if index in stored:
            assert table.remove(stored.pop(index), index)
    for subject in subjects:
        expected = sorted(i for i, p in stored.items() if naive(p, subject))
        assert sorted(table.match(subject)) == expected
        assert sorted(i for i, p in stored.items() if matches(p, subject)) == expected
