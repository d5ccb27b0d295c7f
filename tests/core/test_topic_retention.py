"""Topic retention settings: keeping records forever, compaction's tombstone retention, and the
cluster-wide lost offsets merged from each replica's report."""

from __future__ import annotations

import argparse

import pytest

from meshq.cli.parser import _limit
from meshq.config import DEFAULT_DELETE_RETENTION_MS, KEEP_FOREVER, TopicConfig
from meshq.core.status import _common_ranges
from meshq.errors import ConfigError


def test_minus_one_and_none_keep_records_forever():
    for forever in (None, KEEP_FOREVER):
        config = TopicConfig("t", 1, 1, retention_ms=forever, retention_bytes=forever, delete_retention_ms=forever)
        assert (config.retention_ms, config.retention_bytes, config.delete_retention_ms) == (None, None, None)
        assert TopicConfig.from_wire(config.to_wire()) == config
    assert TopicConfig("t", 1, 1).delete_retention_ms == DEFAULT_DELETE_RETENTION_MS
    with pytest.raises(ConfigError, match="retention_ms must be an integer from 1"):
        TopicConfig("t", 1, 1, retention_ms=-2)
    with pytest.raises(ConfigError, match="retention_ms must be an integer from 1"):
        TopicConfig("t", 1, 1, retention_ms=0)


def test_the_cli_takes_minus_one_or_forever_for_no_limit():
    assert _limit("-1") is None and _limit("forever") is None and _limit("FOREVER") is None
    assert _limit("3600000") == 3_600_000
    for bad in ("-5", "soon"):
        with pytest.raises(argparse.ArgumentTypeError, match="-1 / forever for no limit"):
            _limit(bad)


def test_offsets_are_lost_for_the_cluster_only_where_every_replica_lost_them():
    assert _common_ranges([[[5, 9]], [[7, 12]], [[0, 8]]]) == [[7, 8]]
    assert _common_ranges([[[5, 5]], []]) == []
    assert _common_ranges([[[1, 2], [10, 20]]]) == [[1, 2], [10, 20]]
