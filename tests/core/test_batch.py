"""The record batch format (meshq.core.batch): round trips, CRC coverage, hostile bodies."""

from __future__ import annotations

import random
import struct
import zlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshq.core import batch as batch_format
from meshq.core.batch import (
    BATCH_MAGIC,
    HEADER_SIZE,
    crc_ok,
    decode_records,
    encode_batch,
    iter_batches,
    parse_header,
    stamp,
    verify_batch,
)
from meshq.core.records import Record
from meshq.errors import CorruptLogError, MessageTooLargeError, ProtocolError

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

T0 = 1_700_000_000_000
RECORDS = [
    (b"user-1", b"hello", {"trace": b"abc", "empty": b""}, T0),
    (None, b"", None, T0 + 5),
    (b"", b"\x00\xff" * 100, {"k": b"v"}, T0 - 20),  # timestamps need not be ordered
    (b"user-2", b"world", None, T0 + 3),
]

CRC_START = 21


def build_batch(records: Any, *, count: int | None = None, base_offset: int = 0, leader_epoch: int = 0,
                producer_id: int = -1, producer_epoch: int = -1, base_sequence: int = -1,
                first_ts: int = T0, max_ts: int = T0, raw_body: bytes | None = None) -> bytes:
    """Build a batch by hand with a *valid* CRC around an arbitrary records body (as encode_batch does)."""
    body = raw_body if raw_body is not None else msgpack.packb(records, use_bin_type=True)
    if count is None:
        count = len(records)
    tail = struct.pack(">hiqqqhii", 0, count - 1, first_ts, max_ts, producer_id, producer_epoch, base_sequence,
                       count) + body
    head = struct.pack(">qIiBI", base_offset, len(tail) + 9, leader_epoch, BATCH_MAGIC, zlib.crc32(tail))
    return head + tail


def expected_records(records: list, base_offset: int, topic: str = "t", partition: int = 0) -> list[Record]:
    return [Record(topic, partition, base_offset + i, key, value, headers or {}, ts)
            for i, (key, value, headers, ts) in enumerate(records)]


# ---------------------------------------------------------------- layout and round trip
def test_header_layout_matches_the_documented_table():
    assert HEADER_SIZE == 61
    data = encode_batch(RECORDS, producer_id=77, producer_epoch=3, base_sequence=10, base_offset=5, leader_epoch=9)
    fields = struct.unpack_from(">qIiBIhiqqqhii", data, 0)
    assert fields == (5, len(data) - 12, 9, BATCH_MAGIC, zlib.crc32(data[CRC_START:]), 0, len(RECORDS) - 1,
                      T0, T0 + 5, 77, 3, 10, len(RECORDS))
    assert msgpack.unpackb(data[HEADER_SIZE:], raw=False) == [
        [ts - T0 for _, _, _, ts in RECORDS],
        [key for key, _, _, _ in RECORDS],
        [value for _, value, _, _ in RECORDS],
        [headers or None for _, _, headers, _ in RECORDS],
    ]


def test_columns_that_need_no_data_are_encoded_as_a_single_nil():
    values = [b"v%d" % i for i in range(50)]
    data = encode_batch([(None, v, None, T0) for v in values])
    assert data[HEADER_SIZE:] == msgpack.packb([None, None, values, None], use_bin_type=True)
    # an empty headers dict counts as no headers
    mixed = encode_batch([(None, v, {} if i % 2 else None, T0) for i, v in enumerate(values)])
    assert mixed[HEADER_SIZE:] == data[HEADER_SIZE:]
    assert decode_records(data, "t", 0) == decode_records(mixed, "t", 0) == [
        Record("t", 0, i, None, v, {}, T0) for i, v in enumerate(values)]


def test_each_column_becomes_an_array_as_soon_as_one_record_needs_it():
    base = [(None, b"a", None, T0), (None, b"b", None, T0), (None, b"c", None, T0)]

    def columns(records):
        return msgpack.unpackb(encode_batch(records)[HEADER_SIZE:], raw=False)

    assert columns(base) == [None, None, [b"a", b"b", b"c"], None]
    assert columns([base[0], (None, b"b", None, T0 - 7), base[2]]) == [[0, -7, 0], None, [b"a", b"b", b"c"], None]
    # an empty key is a key: it is kept apart from nil
    assert columns([base[0], (b"", b"b", None, T0), base[2]]) == [None, [None, b"", None], [b"a", b"b", b"c"], None]
    assert columns([base[0], base[1], (None, b"c", {"h": b"x"}, T0)]) == [
        None, None, [b"a", b"b", b"c"], [None, None, {"h": b"x"}]]
    assert columns([(None, b"a", {}, T0), (None, b"b", {"h": b""}, T0)]) == [
        None, None, [b"a", b"b"], [None, {"h": b""}]]


def test_round_trip_encode_verify_stamp_decode():
    data = encode_batch(RECORDS, producer_id=77, producer_epoch=3, base_sequence=10)
    header = verify_batch(data)
    assert header.record_count == 4 and header.last_offset_delta == 3 and header.base_offset == 0
    assert (header.first_timestamp_ms, header.max_timestamp_ms) == (T0, T0 + 5)
    assert (header.producer_id, header.producer_epoch, header.base_sequence) == (77, 3, 10)
    assert header.last_sequence == 13 and header.size == len(data)

    stamped = stamp(data, 1000, 7)
    header2 = verify_batch(stamped)
    assert (header2.base_offset, header2.leader_epoch) == (1000, 7)
    assert header2.crc == header.crc and crc_ok(stamped, 0, header2)
    assert (header2.last_offset, header2.next_offset) == (1003, 1004)
    assert stamped[CRC_START:] == data[CRC_START:]
    assert decode_records(stamped, "t", 0) == expected_records(RECORDS, 1000)


@pytest.mark.parametrize("buffer_type", [bytes, bytearray, memoryview])
def test_functions_accept_any_buffer(buffer_type):
    data = encode_batch(RECORDS)
    stamped = stamp(buffer_type(data), 42, 1)
    assert type(stamped) is bytes
    assert verify_batch(buffer_type(stamped)).base_offset == 42
    assert decode_records(buffer_type(stamped), "t", 3) == expected_records(RECORDS, 42, partition=3)
    assert [pos for pos, _ in iter_batches(buffer_type(stamped))] == [0]


def test_stamp_leaves_the_crc_valid_for_any_offset_and_epoch():
    data = encode_batch(RECORDS)
    for base_offset, epoch in [(0, 0), (1, -1), ((1 << 62), (1 << 31) - 1), (123456789, -(1 << 31))]:
        stamped = stamp(data, base_offset, epoch)
        header = verify_batch(stamped)
        assert (header.base_offset, header.leader_epoch) == (base_offset, epoch)


def test_keys_none_and_bytes_headers_and_timestamps_round_trip():
    records = [
        (None, b"a", None, 0),
        (b"k", b"b", {}, -5),  # empty headers are stored as nil and read back as {}
        (b"\x00" * 300, b"c", {"h1": b"x", "h2": b"\xff" * 70_000}, (1 << 62)),
        (b"k2", b"d" * 100_000, {"unicode-ä": b"1"}, 1),
    ]
    data = stamp(encode_batch(records), 10, 0)
    header = verify_batch(data)
    assert (header.first_timestamp_ms, header.max_timestamp_ms) == (0, 1 << 62)
    assert decode_records(data, "t", 0) == expected_records(records, 10)


def test_many_records_round_trip():
    rng = random.Random(7)
    records = [(None if i % 3 == 0 else b"key-%d" % i, rng.randbytes(rng.randrange(0, 40)),
                {"i": str(i).encode()} if i % 5 == 0 else None, T0 + rng.randrange(-1000, 1000))
               for i in range(20_000)]
    data = stamp(encode_batch(records), 500, 2)
    header = verify_batch(data)
    assert header.record_count == 20_000 and header.max_timestamp_ms == max(r[3] for r in records)
    assert decode_records(data, "big", 1) == expected_records(records, 500, "big", 1)


def test_empty_batch_and_too_many_records_are_refused_by_the_encoder():
    with pytest.raises(ValueError):
        encode_batch([])
    with pytest.raises(MessageTooLargeError):
        encode_batch([(None, b"", None, 0)] * (batch_format.MAX_RECORDS_PER_BATCH + 1))


def test_verify_batch_enforces_the_size_limit():
    data = encode_batch(RECORDS)
    assert verify_batch(data, max_bytes=len(data)).size == len(data)
    with pytest.raises(MessageTooLargeError):
        verify_batch(data, max_bytes=len(data) - 1)


# ---------------------------------------------------------------- corruption
def medium_batch() -> bytes:
    rng = random.Random(11)
    records = [(b"k%d" % i, rng.randbytes(30), {"h": b"v"} if i % 2 else None, T0 + i) for i in range(40)]
    return stamp(encode_batch(records, producer_id=5, producer_epoch=0, base_sequence=0), 300, 4)


def test_every_sampled_byte_flip_in_the_crc_region_is_detected():
    data = medium_batch()
    rng = random.Random(20240601)
    positions = rng.sample(range(CRC_START - 4, len(data)), 200)  # the CRC field itself and what it covers
    for position in positions:
        corrupt = bytearray(data)
        corrupt[position] ^= rng.randrange(1, 256)
        with pytest.raises(ProtocolError):
            verify_batch(bytes(corrupt))
        with pytest.raises(CorruptLogError):
            list(iter_batches(bytes(corrupt)))


def test_every_single_bit_flip_of_a_small_batch_is_detected_where_it_matters():
    data = encode_batch([(b"k", b"v", None, T0)])
    for position in range(len(data)):
        for bit in range(8):
            corrupt = bytearray(data)
            corrupt[position] ^= 1 << bit
            if position < 8 and not (position == 0 and bit == 7):
                # base_offset is stamped by the leader, outside the CRC: a flip just moves the batch
                assert verify_batch(bytes(corrupt)).base_offset != 0
            elif 12 <= position < 16:
                # so is leader_epoch
                assert verify_batch(bytes(corrupt)).leader_epoch != 0
            else:
                with pytest.raises(ProtocolError):
                    verify_batch(bytes(corrupt))


def test_truncation_at_every_position_is_refused():
    data = encode_batch(RECORDS)
    for length in range(len(data)):
        with pytest.raises(ProtocolError):
            verify_batch(data[:length])


def test_trailing_bytes_are_refused():
    data = encode_batch(RECORDS)
    for extra in (b"\x00", b"garbage", data):
        with pytest.raises(ProtocolError):
            verify_batch(data + extra)


@pytest.mark.parametrize(("offset", "fmt", "value", "why"), [
    (16, ">B", 1, "magic"),
    (16, ">B", 2, "magic of the previous per-record layout"),
    (16, ">B", 4, "magic"),
    (8, ">I", 48, "batch length shorter than its header"),
    (0, ">q", -1, "negative base offset"),
])
def test_impossible_headers_are_refused(offset, fmt, value, why):
    data = bytearray(encode_batch(RECORDS))
    struct.pack_into(fmt, data, offset, value)
    with pytest.raises(ProtocolError):
        parse_header(bytes(data))
    with pytest.raises(ProtocolError):
        verify_batch(bytes(data))


def test_magic_2_batches_are_refused_with_a_clear_error():
    data = bytearray(encode_batch(RECORDS))
    data[16] = 2
    with pytest.raises(ProtocolError, match="magic 2"):
        verify_batch(bytes(data))
    with pytest.raises(CorruptLogError, match="magic 2"):
        list(iter_batches(bytes(data)))


@pytest.mark.parametrize(("count", "last_delta"), [(0, -1), (-1, -2), (2, 0), (batch_format.MAX_RECORDS_PER_BATCH + 1,
                                                                            batch_format.MAX_RECORDS_PER_BATCH)])
def test_impossible_record_counts_are_refused_even_with_a_valid_crc(count, last_delta):
    body = msgpack.packb([None, None, [b"v", b"v"], None], use_bin_type=True)
    tail = struct.pack(">hiqqqhii", 0, last_delta, T0, T0, -1, -1, -1, count) + body
    data = struct.pack(">qIiBI", 0, len(tail) + 9, 0, BATCH_MAGIC, zlib.crc32(tail)) + tail
    with pytest.raises(ProtocolError):
        verify_batch(data)


# ---------------------------------------------------------------- malformed records under a valid CRC
V1 = [b"v"]  # a valid values column for one record
V2 = [b"v", b"w"]  # ... for two records

MALFORMED_BODIES = {
    # the body and the record count
    "count_too_high": dict(records=[None, None, V1, None], count=2),
    "count_too_low": dict(records=[None, None, [b"v"] * 3, None], count=2),
    "body_a_map": dict(records={"values": V1}, count=1),
    "body_nil": dict(records=None, count=1),
    "body_bin": dict(records=b"v", count=1),
    "body_int": dict(records=0, count=1),
    "no_columns": dict(records=[], count=1),
    "too_few_columns": dict(records=[None, None, V1], count=1),
    "one_column": dict(records=[V1], count=1),
    "too_many_columns": dict(records=[None, None, V1, None, None], count=1),
    "extra_column_with_data": dict(records=[None, None, V1, None, ["future"]], count=1),
    "old_per_record_layout": dict(records=[[0, None, b"v", None]], count=1),
    "old_per_record_layout_4_records": dict(records=[[0, None, b"v", None]] * 4, count=4),
    # values
    "values_nil": dict(records=[None, None, None, None], count=1),
    "values_bin_not_array": dict(records=[None, None, b"v", None], count=1),
    "values_a_map": dict(records=[None, None, {"0": b"v"}, None], count=1),
    "values_empty": dict(records=[None, None, [], None], count=1),
    "values_too_short": dict(records=[None, None, V1, None], count=2),
    "values_too_long": dict(records=[None, None, [b"v"] * 3, None], count=2),
    "value_str": dict(records=[None, None, ["text"], None], count=1),
    "value_nil": dict(records=[None, None, [None], None], count=1),
    "value_int": dict(records=[None, None, [5], None], count=1),
    "value_list": dict(records=[None, None, [[b"v"]], None], count=1),
    "second_value_str": dict(records=[None, None, [b"v", "w"], None], count=2),
    # timestamp deltas
    "ts_int_not_array": dict(records=[0, None, V1, None], count=1),
    "ts_bin_not_array": dict(records=[b"\x00", None, V1, None], count=1),
    "ts_empty": dict(records=[[], None, V1, None], count=1),
    "ts_too_short": dict(records=[[0], None, V2, None], count=2),
    "ts_too_long": dict(records=[[0, 1, 2], None, V2, None], count=2),
    "ts_float": dict(records=[[0.5], None, V1, None], count=1),
    "ts_bool": dict(records=[[True], None, V1, None], count=1),
    "ts_nil": dict(records=[[None], None, V1, None], count=1),
    "ts_bin": dict(records=[[b"0"], None, V1, None], count=1),
    "second_ts_bool": dict(records=[[0, False], None, V2, None], count=2),
    # keys
    "keys_bin_not_array": dict(records=[None, b"k", V1, None], count=1),
    "keys_a_map": dict(records=[None, {"0": b"k"}, V1, None], count=1),
    "keys_empty": dict(records=[None, [], V1, None], count=1),
    "keys_too_short": dict(records=[None, [b"k"], V2, None], count=2),
    "keys_too_long": dict(records=[None, [b"k", None, b"k"], V2, None], count=2),
    "key_int": dict(records=[None, [42], V1, None], count=1),
    "key_bool": dict(records=[None, [False], V1, None], count=1),
    "key_str": dict(records=[None, ["key"], V1, None], count=1),
    "key_list": dict(records=[None, [[b"k"]], V1, None], count=1),
    "second_key_str": dict(records=[None, [b"k", "k"], V2, None], count=2),
    # headers
    "headers_map_not_array": dict(records=[None, None, V1, {"h": b"v"}], count=1),
    "headers_bin_not_array": dict(records=[None, None, V1, b"h=v"], count=1),
    "headers_empty": dict(records=[None, None, V1, []], count=1),
    "headers_too_short": dict(records=[None, None, V2, [{"h": b"v"}]], count=2),
    "headers_too_long": dict(records=[None, None, V2, [None, None, {"h": b"v"}]], count=2),
    "headers_list": dict(records=[None, None, V1, [[b"h", b"v"]]], count=1),
    "headers_bytes": dict(records=[None, None, V1, [b"h=v"]], count=1),
    "headers_int": dict(records=[None, None, V1, [0]], count=1),
    "header_value_str": dict(records=[None, None, V1, [{"h": "v"}]], count=1),
    "header_value_nil": dict(records=[None, None, V1, [{"h": None}]], count=1),
    "header_value_int": dict(records=[None, None, V1, [{"h": 1}]], count=1),
    "header_value_map": dict(records=[None, None, V1, [{"h": {"x": b"v"}}]], count=1),
    "header_int_key": dict(records=[None, None, V1, [{1: b"v"}]], count=1),
    "header_bytes_key": dict(records=[None, None, V1, [{b"h": b"v"}]], count=1),
    "header_second_key_bytes": dict(records=[None, None, V1, [{"a": b"v", b"h": b"v"}]], count=1),
    "second_headers_bad_value": dict(records=[None, None, V2, [{"h": b"v"}, {"h": "v"}]], count=2),
    "second_headers_bad_key": dict(records=[None, None, V2, [None, {b"h": b"v"}]], count=2),
    "second_headers_list": dict(records=[None, None, V2, [{}, [b"h"]]], count=2),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_BODIES))
def test_malformed_records_under_a_valid_crc_are_refused(case):
    data = build_batch(**MALFORMED_BODIES[case])
    header = parse_header(data)
    assert crc_ok(data, 0, header)  # the CRC is fine: only the structure check can catch it
    with pytest.raises(ProtocolError):
        verify_batch(data)
    with pytest.raises(CorruptLogError):
        decode_records(data, "t", 0)


@pytest.mark.parametrize("raw_body", [
    b"", b"\xc1", b"\x94", b"\x94\xc0\xc0\x91\xc4\x01v\xc0\x00",  # trailing byte after the array
    b"\x94\xc0\xc0\x91\xc4\x01v",  # a column missing at the end of the body
    b"\x94\xc0\xc0\x91\xc7\x01\x05v\xc0",  # ext type where bytes belong
    b"\x94\xc0\xc0\x91\xc4\xffv\xc0",  # bin length beyond the body
    b"\x94\xc0\xc0\x91\xa2\xff\xfe\xc0",  # invalid UTF-8 str
    b"\x94\xc0\xc0\x91\xc4\x01v\x91\x81\xa2\xff\xfe\xc4\x01v",  # invalid UTF-8 header key
    b"\xdd\x7f\xff\xff\xff",  # array length far beyond the declared count
    b"\x94\xc0\xc0\xdd\x7f\xff\xff\xff\xc0",  # a column length far beyond the declared count
    b"\x94\xc0\xc0\x91\xc4\x01v\x91\xdf\x7f\xff\xff\xff",  # a header map length beyond the body
    b"\x91" * 3000 + b"\xc0",  # nesting beyond the unpacker stack
])
def test_undecodable_record_bodies_under_a_valid_crc_are_refused(raw_body):
    data = build_batch(None, count=1, raw_body=raw_body)
    with pytest.raises(ProtocolError):
        verify_batch(data)
    with pytest.raises(CorruptLogError):
        decode_records(data, "t", 0)


@pytest.mark.parametrize("count", [1, 2, 5, 100])
def test_mismatched_column_lengths_are_refused_for_every_column(count):
    good = [[0] * count, [b"k"] * count, [b"v"] * count, [{"h": b"v"}] * count]
    assert verify_batch(build_batch(good, count=count)).record_count == count
    for column in range(4):
        for length in (0, count - 1, count + 1, 2 * count):
            if length == count:
                continue
            body = list(good)
            body[column] = good[column][:1] * length
            data = build_batch(body, count=count)
            with pytest.raises(ProtocolError):
                verify_batch(data)
            with pytest.raises(CorruptLogError):
                decode_records(data, "t", 0)


def test_the_array_forms_of_the_nil_columns_are_accepted():
    values = [b"a", b"b", b"c"]
    expected = [Record("t", 0, i, None, v, {}, T0) for i, v in enumerate(values)]
    for body in ([[0, 0, 0], None, values, None], [None, [None, None, None], values, None],
                 [None, None, values, [None, None, None]], [None, None, values, [{}, {}, {}]],
                 [[0, 0, 0], [None, None, None], values, [None, {}, None]]):
        data = build_batch(body, count=3)
        assert verify_batch(data).record_count == 3
        assert decode_records(data, "t", 0) == expected


def test_records_decode_as_independent_objects():
    values = [b"a", b"b"]
    for body in ([None, None, values, None], [None, None, values, [{}, None]]):
        first, second = decode_records(build_batch(body, count=2), "t", 0)
        assert first.headers == {} and second.headers == {} and first.headers is not second.headers


def test_header_keys_must_be_strings():
    data = build_batch([None, None, [b"v"], [{b"h": b"v"}]], count=1)
    with pytest.raises(ProtocolError):
        verify_batch(data)


def test_decode_records_filters_by_min_offset_in_every_column():
    records = [(b"k%d" % i if i % 2 else None, b"v%d" % i, {"i": b"%d" % i} if i % 3 == 0 else None, T0 + i % 4)
               for i in range(10)]
    data = stamp(encode_batch(records), 100, 0)
    flat = expected_records(records, 100)
    for min_offset in range(95, 112):
        assert decode_records(data, "t", 0, min_offset) == flat[max(0, min_offset - 100):]


# ---------------------------------------------------------------- concatenations
def log_of(batch_sizes: list[int]) -> tuple[bytes, list[list]]:
    """Batches stamped at consecutive offsets, concatenated as in a log segment."""
    out, groups, offset = b"", [], 0
    for n, size in enumerate(batch_sizes):
        records = [(b"k%d-%d" % (n, i), b"v%d-%d" % (n, i), None, T0 + i) for i in range(size)]
        out += stamp(encode_batch(records), offset, 1)
        groups.append(records)
        offset += size
    return out, groups


def test_iter_batches_yields_every_whole_batch():
    data, groups = log_of([3, 1, 5])
    found = list(iter_batches(data))
    assert [h.base_offset for _, h in found] == [0, 3, 4]
    assert [h.record_count for _, h in found] == [3, 1, 5]
    assert found[0][0] == 0 and sum(h.size for _, h in found) == len(data)


def test_a_partial_trailing_batch_ends_iteration_silently():
    data, groups = log_of([3, 1, 5])
    whole = data[: sum(h.size for _, h in list(iter_batches(data))[:2])]
    for cut in range(len(whole), len(data)):
        found = list(iter_batches(data[:cut]))
        assert [h.base_offset for _, h in found] == [0, 3]
        flat = [r for group in groups[:2] for r in group]
        assert decode_records(data[:cut], "t", 0) == expected_records(flat, 0)


def test_empty_buffer_yields_nothing():
    assert list(iter_batches(b"")) == []
    assert decode_records(b"", "t", 0) == []


def test_a_corrupt_batch_in_the_middle_raises_corrupt_log_error():
    data, _ = log_of([3, 1, 5])
    first = parse_header(data).size
    corrupt = bytearray(data)
    corrupt[first + HEADER_SIZE + 2] ^= 0xFF  # inside the second batch's records
    with pytest.raises(CorruptLogError):
        list(iter_batches(bytes(corrupt)))
    assert len(list(iter_batches(bytes(corrupt), verify_crc=False))) == 3
    bad_magic = bytearray(data)
    bad_magic[first + 16] = 9
    with pytest.raises(CorruptLogError):
        list(iter_batches(bytes(bad_magic), verify_crc=False))


def test_decode_records_filters_by_min_offset():
    data, groups = log_of([3, 1, 5])
    flat = expected_records([r for group in groups for r in group], 0)
    for min_offset in range(0, 11):
        assert decode_records(data, "t", 0, min_offset) == flat[min_offset:]


# ---------------------------------------------------------------- properties
RECORD = st.tuples(
    st.none() | st.binary(max_size=16),
    st.binary(max_size=64),
    st.none() | st.dictionaries(st.text(max_size=8), st.binary(max_size=8), min_size=1, max_size=3),
    st.integers(-(1 << 40), 1 << 45),
)


@FUZZ
@given(records=st.lists(RECORD, min_size=1, max_size=40), base_offset=st.integers(0, 1 << 62),
       epoch=st.integers(-(1 << 31), (1 << 31) - 1))
def test_decode_of_encode_is_identity(records, base_offset, epoch):
    data = stamp(encode_batch(records), base_offset, epoch)
    header = verify_batch(data)
    assert header.record_count == len(records)
    assert header.first_timestamp_ms == records[0][3]
    assert header.max_timestamp_ms == max(r[3] for r in records)
    assert decode_records(data, "p", 0) == expected_records(records, base_offset, "p", 0)


@FUZZ
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_verify_or_raise_protocol_error(data):
    try:
        header = verify_batch(data)
    except ProtocolError as exc:
        assert type(exc) is ProtocolError
    else:
        assert header.size == len(data)


@FUZZ
@given(records=st.lists(RECORD, min_size=1, max_size=5), position=st.floats(0, 1, exclude_max=True),
       value=st.integers(1, 255))
def test_any_single_byte_change_in_the_crc_region_is_detected(records, position, value):
    data = bytearray(encode_batch(records))
    index = CRC_START - 4 + int(position * (len(data) - CRC_START + 4))
    data[index] ^= value
    with pytest.raises(ProtocolError):
        verify_batch(bytes(data))
