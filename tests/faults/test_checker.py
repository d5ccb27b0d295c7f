"""The fault run's checker (``tests.faults.checker``) on small hand-made histories: a clean one passes, and each
rule fails when its violation is planted (so a fault run that reports lost = 0 could have reported otherwise)."""

from __future__ import annotations

from tests.faults.checker import check, percentile


def history():
    """Partition 0: three acks at 0, 1, 2; one failed attempt that was stored anyway (offset 3)."""
    attempts = [(0, 0, "a0", 1.0, 1.1, None), (0, 1, "a1", 2.0, 2.1, None),
                (0, None, "a2", 3.0, 8.0, "TimeoutError"), (0, 3, "a3", 9.0, 9.1, None)]
    drained = [(0, 0, "a0"), (0, 1, "a1"), (0, 2, "a2"), (0, 3, "a3")]
    return attempts, drained, {0: 4}


def test_a_clean_history_passes_and_an_unacknowledged_stored_value_is_allowed():
    attempts, drained, hws = history()
    verdict = check(attempts, drained, hws, live=[(0, 0, "a0"), (0, 2, "a2")])
    assert verdict.problems() == []
    assert (verdict.acked, verdict.stored_unacked, verdict.errors) == (3, 1, {"TimeoutError": 1})


def test_a_lost_acknowledged_record_is_reported():
    attempts, drained, hws = history()
    verdict = check(attempts, [r for r in drained if r[2] != "a1"], {0: 3})
    assert len(verdict.lost) == 1 and "a1 acked at (0, 1)" in verdict.lost[0]
    assert verdict.offsets  # and the hole in the offsets


def test_a_record_moved_to_another_offset_is_lost_there():
    attempts, _, hws = history()
    verdict = check(attempts, [(0, 0, "a0"), (0, 1, "a2"), (0, 2, "a1"), (0, 3, "a3")], hws)
    assert any("a1 acked at (0, 1)" in item for item in verdict.lost)


def test_a_second_copy_of_a_value_is_a_duplicate():
    attempts, drained, _ = history()
    verdict = check(attempts, [*drained, (0, 4, "a1")], {0: 5})
    assert verdict.duplicates == ["acknowledged a1 stored at [(0, 1), (0, 4)]"]


def test_acknowledged_offsets_going_backwards_are_an_order_violation():
    attempts = [(0, 1, "a0", 1.0, 1.1, None), (0, 0, "a1", 2.0, 2.1, None)]
    verdict = check(attempts, [(0, 0, "a1"), (0, 1, "a0")], {0: 2})
    assert verdict.order and not verdict.lost


def test_offsets_must_be_dense_once_each_and_reach_the_high_watermark():
    attempts, drained, _ = history()
    assert check(attempts, drained, {0: 5}).offsets  # short of the high watermark
    assert check(attempts, [*drained[:2], drained[1], *drained[2:]], {0: 4}).offsets  # a position twice


def test_a_value_nobody_produced_is_unexpected():
    attempts, drained, _ = history()
    assert check(attempts, [*drained, (0, 4, "zz")], {0: 5}).unexpected


def test_a_live_read_that_the_final_log_does_not_hold_is_divergence():
    attempts, drained, hws = history()
    verdict = check(attempts, drained, hws, live=[(0, 2, "other")])
    assert verdict.live_diverged and verdict.problems()


def test_replica_problems_filled_in_by_the_runner_fail_the_verdict():
    attempts, drained, hws = history()
    verdict = check(attempts, drained, hws)
    verdict.replicas.append("faults-0: replicas a and b differ at batch #2")
    assert any("REPLICAS DIVERGE" in p for p in verdict.problems())


def test_percentile_by_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == (50.0, 99.0, 100.0)
    assert percentile([], 0.5) is None
