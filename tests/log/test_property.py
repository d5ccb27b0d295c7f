"""Random operation sequences: both logs agree with a plain model after every step."""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshq.core.batch import parse_header
from meshq.errors import OffsetOutOfRangeError
from tests.log.helpers import Harness, make_batch, read_all

SEGMENT_BYTES = 300
SEGMENT_MS = 300


@dataclass
class ModelSegment:
    base_offset: int
    batches: list[bytes] = field(default_factory=list)
    created_ms: int | None = None

    @property
    def size(self) -> int:
        return sum(len(batch) for batch in self.batches)


@dataclass
class Model:
    """The log contract written as plainly as possible."""

    segments: list[ModelSegment] = field(default_factory=lambda: [ModelSegment(0)])
    synced_offset: int = 0

    @property
    def batches(self) -> list[bytes]:
        return [batch for segment in self.segments for batch in segment.batches]

    @property
    def start_offset(self) -> int:
        return self.segments[0].base_offset

    @property
    def end_offset(self) -> int:
        batches = self.batches
        return parse_header(batches[-1]).next_offset if batches else self.segments[-1].base_offset

    def append(self, batch: bytes, now_ms: int) -> None:
        active = self.segments[-1]
        if active.batches and (active.size + len(batch) > SEGMENT_BYTES or now_ms - active.created_ms >= SEGMENT_MS):
            active = ModelSegment(self.end_offset)
            self.segments.append(active)
        active.batches.append(batch)
        if active.created_ms is None:
            active.created_ms = now_ms

    def truncate_to(self, offset: int) -> None:
        self.segments = [s for s in self.segments if s.base_offset <= offset] or self.segments[:1]
        last = self.segments[-1]
        last.batches = [b for b in last.batches if parse_header(b).base_offset < offset]
        if not last.batches:
            last.created_ms = None
        self.synced_offset = min(self.synced_offset, offset)

    def apply_retention(self, now_ms: int, retention_bytes: int | None, retention_ms: int | None) -> int:
        removed = 0
        while len(self.segments) > 1:
            oldest = self.segments[0]
            too_big = retention_bytes is not None and sum(s.size for s in self.segments) > retention_bytes
            newest_ms = max(parse_header(b).max_timestamp_ms for b in oldest.batches)
            too_old = retention_ms is not None and newest_ms < now_ms - retention_ms
            if not (too_big or too_old):
                break
            self.segments.pop(0)
            removed += self.segments[0].base_offset - oldest.base_offset
        self.synced_offset = max(self.synced_offset, self.start_offset)
        return removed

    def read(self, offset: int, max_bytes: int) -> bytes:
        out, total = [], 0
        for batch in self.batches:
            header = parse_header(batch)
            if header.next_offset <= offset:
                continue
            if out and total + len(batch) > max_bytes:
                break
            out.append(batch)
            total += len(batch)
        return b"".join(out)

    def offset_for_timestamp(self, timestamp_ms: int) -> int:
        for batch in self.batches:
            if parse_header(batch).max_timestamp_ms >= timestamp_ms:
                return parse_header(batch).base_offset
        return self.end_offset

    def boundaries(self) -> list[int]:
        return [parse_header(b).base_offset for b in self.batches] + [self.end_offset]


operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 4), st.integers(0, 120), st.integers(-30, 150)),
        st.tuples(st.just("append"), st.integers(1, 2), st.integers(0, 40), st.integers(0, 20)),
        st.tuples(st.just("fill"), st.integers(1, 15), st.integers(0, 2**32)),
        st.tuples(st.just("truncate"), st.integers(0, 10**6)),
        st.tuples(st.just("retain"), st.none() | st.integers(0, 1_500), st.none() | st.integers(0, 400)),
        st.tuples(st.just("sync")),
        st.tuples(st.just("restart")),
        st.tuples(st.just("read"), st.integers(0, 10**6), st.integers(0, 1_500)),
        st.tuples(st.just("lookup"), st.integers(-100, 6_000)),
    ),
    max_size=60,
)


@pytest.mark.parametrize("kind", ["memory", "file"])
@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=operations)
def test_random_operations_agree_with_the_model(kind, steps):
    with tempfile.TemporaryDirectory() as directory:
        harness = Harness(kind, directory)
        try:
            run(harness, steps)
        finally:
            harness.close()


def run(harness: Harness, steps: list[tuple]) -> None:
    options = {"segment_bytes": SEGMENT_BYTES, "segment_ms": SEGMENT_MS, "index_interval_bytes": 128}
    log = harness.open(**options).open_log("p", 0)
    model = Model()
    now_ms = 1_000
    for step in steps:
        kind = step[0]
        if kind in ("append", "fill"):
            if kind == "append":
                appends = [step[1:]]
            else:
                rng = random.Random(step[2])
                appends = [(rng.randint(1, 3), rng.randint(0, 80), rng.randint(-10, 60)) for _ in range(step[1])]
            for count, value_size, step_ms in appends:
                now_ms += step_ms
                timestamps = [now_ms - index % 3 for index in range(count)]  # not sorted within a batch
                batch = make_batch(log.end_offset, count, value_size=value_size, timestamps_ms=timestamps)
                header = log.append(batch, now_ms=max(timestamps))
                model.append(batch, max(timestamps))
                assert header.base_offset == model.end_offset - count
        elif kind == "truncate":
            boundaries = model.boundaries()
            offset = boundaries[step[1] % len(boundaries)]
            log.truncate_to(offset)
            model.truncate_to(offset)
        elif kind == "retain":
            assert log.apply_retention(now_ms, step[1], step[2]) == model.apply_retention(now_ms, step[1], step[2])
        elif kind == "sync":
            log.sync()
            model.synced_offset = model.end_offset
        elif kind == "restart":
            if harness.kind == "file":
                model.synced_offset = model.end_offset  # a clean close syncs
            else:
                model.truncate_to(model.synced_offset)  # the twin's restart is power loss
            log = harness.restart().open_log("p", 0)
            assert log.recovery == []
        elif kind == "read":
            span = model.end_offset - model.start_offset + 1
            offset = model.start_offset + step[1] % span
            assert log.read(offset, step[2]) == model.read(offset, step[2])
        elif kind == "lookup":
            assert log.offset_for_timestamp(step[1]) == model.offset_for_timestamp(step[1])
        check(log, model)
    with pytest.raises(OffsetOutOfRangeError):
        log.read(model.end_offset + 1, 100)


def check(log, model: Model) -> None:
    assert (log.start_offset, log.end_offset, log.synced_offset) == (
        model.start_offset,
        model.end_offset,
        model.synced_offset,
    )
    assert log.size_bytes == sum(segment.size for segment in model.segments)
    assert log.segment_base_offsets == [segment.base_offset for segment in model.segments]
    assert read_all(log, max_bytes=500) == b"".join(model.batches)
