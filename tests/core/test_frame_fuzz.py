"""Property-based fuzzing of the decoders that read a peer's bytes (SPEC §3.6).

Each decoder is total: on any input it returns a value or raises its one documented error,
never anything else (an unexpected exception in the runtime thread is a logged bug; one
that escaped would kill the node).

- ``batch.verify_batch`` (a produced or replicated batch): ``ProtocolError`` /
  ``MessageTooLargeError``, also for mutated bodies whose CRC was recomputed (so the checks
  behind the CRC are reached: counts, column types, lengths);
- ``batch.iter_batches`` / ``decode_records`` / ``decode_control`` / ``next_offset_after``
  (what a fetch reply carries): ``CorruptLogError`` only;
- ``pubsub.frames.decode_batch`` (a pub/sub data frame): ``ProtocolError`` only;
- ``wire.decode`` of mutated valid frames of every type: ``ProtocolError`` only
  (``tests/core/test_wire.py`` fuzzes it with arbitrary bytes).
"""

from __future__ import annotations

import copy
import struct
import zlib

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshq.core import batch as batch_format
from meshq.core import wire
from meshq.core.pubsub import frames as pubsub_frames
from meshq.errors import CorruptLogError, MessageTooLargeError, ProtocolError
from tests.core.test_wire import CLUSTER, EXAMPLES, SENDER, all_paths

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=600,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

RECORD = st.tuples(st.one_of(st.none(), st.binary(max_size=8)), st.binary(max_size=16),
                   st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.binary(max_size=4), max_size=2)),
                   st.integers(0, 1 << 41))
BATCHES = st.lists(RECORD, min_size=1, max_size=6).map(batch_format.encode_batch)
MUTATION = st.tuples(st.integers(0, 1 << 20), st.integers(0, 255), st.sampled_from(["xor", "cut", "insert"]))


def _mutate(data: bytes, mutation: tuple[int, int, str], start: int = 0) -> bytes:
    position, value, how = mutation
    span = len(data) - start
    if span <= 0:
        return data
    i = start + position % span
    if how == "xor":
        return data[:i] + bytes([data[i] ^ (value or 1)]) + data[i + 1:]
    if how == "cut":
        return data[:i]
    return data[:i] + bytes([value]) + data[i:]


def _with_crc(data: bytes) -> bytes:
    """``data`` with its batch_length and CRC fields made consistent again (when long enough)."""
    if len(data) < batch_format.HEADER_SIZE:
        return data
    out = bytearray(data)
    struct.pack_into(">I", out, 8, len(out) - 12)
    struct.pack_into(">I", out, 17, zlib.crc32(out[21:]))
    return bytes(out)


@FUZZ
@given(batch=BATCHES, mutations=st.lists(MUTATION, min_size=1, max_size=4), fix_crc=st.booleans())
def test_verify_batch_of_mutated_batches_raises_only_protocol_errors(batch, mutations, fix_crc):
    for mutation in mutations:
        batch = _mutate(batch, mutation)
    if fix_crc:
        batch = _with_crc(batch)
    try:
        header = batch_format.verify_batch(batch)
    except (ProtocolError, MessageTooLargeError):
        return
    assert header.size == len(batch)
    batch_format.decode_records(batch, "t", 0)  # what verify_batch accepted, a reader can decode


@FUZZ
@given(values=st.lists(st.binary(max_size=6), min_size=1, max_size=5), count=st.integers(-5, 1 << 31),
       columns=st.sampled_from(["count", "types", "extra", "nested"]))
def test_record_columns_that_lie_about_their_shape_are_refused(values, count, columns):
    """A batch whose CRC is right but whose msgpack body does not match its header."""
    body: list = [None, None, values, None]
    if columns == "types":
        body = [values, values, [len(v) for v in values], values]
    elif columns == "extra":
        body = [None, None, values, None, None]
    elif columns == "nested":
        body = [None, None, [values] * len(values), None]
    packed = msgpack.packb(body, use_bin_type=True)
    record_count = count if columns == "count" else len(values)
    header = struct.pack(">qIiBIhiqqqhii", 0, 0, 0, batch_format.BATCH_MAGIC, 0, 0,
                         (record_count - 1) & 0xFFFFFFFF if record_count >= 1 else 0, 1, 1, -1, -1, -1,
                         record_count & 0x7FFFFFFF)
    batch = _with_crc(header + packed)
    expect_ok = columns == "count" and count == len(values)
    try:
        batch_format.verify_batch(batch)
    except ProtocolError:
        assert not expect_ok
    else:
        assert expect_ok


@FUZZ
@given(batches=st.lists(BATCHES, min_size=1, max_size=3), mutations=st.lists(MUTATION, max_size=3),
       fix_crc=st.booleans(), min_offset=st.integers(0, 20))
def test_fetched_bytes_decode_or_raise_corrupt_log_error(batches, mutations, fix_crc, min_offset):
    data = b""
    for i, one in enumerate(batches):
        data += batch_format.stamp(one, len(data) and i * 10, 1)
    for mutation in mutations:
        data = _mutate(data, mutation)
    if fix_crc:
        data = _with_crc(data)
    for decode in (lambda: batch_format.decode_records(data, "t", 0, min_offset),
                   lambda: batch_format.decode_control(data, min_offset),
                   lambda: list(batch_format.iter_batches(data)),
                   lambda: batch_format.next_offset_after(data)):
        try:
            decode()
        except CorruptLogError:
            pass


PREFIX = pubsub_frames.data_prefix("n1")


@FUZZ
@given(entries=st.lists(st.tuples(st.sampled_from(["a", "a.b", "orders.eu", "x" * 40]),
                                  st.one_of(st.none(), st.just(["q"])),
                                  st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.binary(max_size=3),
                                                                        max_size=2)),
                                  st.binary(max_size=20)), min_size=1, max_size=4),
       mutations=st.lists(MUTATION, max_size=3), payload_mutations=st.lists(MUTATION, max_size=2))
def test_pubsub_data_frames_decode_or_raise_protocol_error(entries, mutations, payload_mutations):
    frame, payloads = pubsub_frames.encode_batch(PREFIX, 7, "n2", entries)
    for mutation in mutations:
        frame = _mutate(frame, mutation, len(PREFIX))
    for mutation in payload_mutations:
        payloads = _mutate(payloads, mutation)
    try:
        first_seq, source, decoded = pubsub_frames.decode_batch(frame, len(PREFIX), payloads)
    except ProtocolError:
        return
    assert sum(len(entry[3]) for entry in decoded) <= len(payloads)


HOSTILE = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 64), (1 << 64) - 1), st.floats(),
                    st.text(max_size=20), st.binary(max_size=20), st.lists(st.integers(), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@FUZZ
@given(type_=st.sampled_from(sorted(wire.SCHEMAS)), data=st.data())
def test_wire_decode_of_mutated_valid_frames_raises_only_protocol_errors(type_, data):
    body, payloads = copy.deepcopy(EXAMPLES[type_][0]), list(EXAMPLES[type_][1])
    paths = all_paths(body)
    if paths:
        path = data.draw(st.sampled_from(paths))
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = data.draw(HOSTILE)
    header = [1, CLUSTER, SENDER, type_, data.draw(st.integers(-1, 1 << 64)), body]
    header[data.draw(st.integers(0, 5))] = data.draw(st.one_of(st.just(header[0]), HOSTILE))
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return  # (not representable in msgpack: nobody can send it)
    frames = [_mutate(packed, m) for m in data.draw(st.lists(MUTATION, max_size=1))] or [packed]
    frames += payloads[: data.draw(st.integers(0, len(payloads)))] + [b"x"] * data.draw(st.integers(0, 2))
    try:
        wire.decode(frames, CLUSTER)
    except ProtocolError:
        pass

