"""How a report is judged: the targets (PASS/MISS) and the parts that could not be measured or failed.

Theory of operation
-------------------
The targets come from the performance issues (docs/performance.md) and are printed, never
asserted. ``bench produce``: pipelined ``produce_batch`` >= 1,000,000 records/s and >= 40 % of
the raw pyzmq baseline, synchronous p50 <= 150 µs. ``bench replication`` (issue 5): pipelined
``acks=quorum`` >= 500,000 records/s, synchronous ``acks=quorum`` p50 <= 400 µs, failover <=
``failure_timeout_s`` + 2 s (the nodes run with the ``NodeConfig`` default); one it could not
measure is ``n/a``. The error lists, one line per part that could not be measured or failed its
check, decide the exit status of ``replication`` and ``rebalance``.
"""

from __future__ import annotations

from typing import Any

# Targets from the performance issue (docs/performance.md).
TARGET_PIPELINED_RPS = 1_000_000
TARGET_BASELINE_RATIO = 0.40
TARGET_SYNC_P50_US = 150.0

# Targets of `bench replication` (issue 5, docs/performance.md): printed as PASS/MISS, never asserted.
TARGET_QUORUM_PIPELINED_RPS = 500_000
TARGET_QUORUM_SYNC_P50_US = 400.0
TARGET_FAILOVER_SLACK_S = 2.0  # failover <= failure_timeout_s + this


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    base = report["baseline"]
    mq = report["meshq"]
    rps = mq["produce_batch"]["records_per_s"]
    ratio = rps / base["records_per_s"]
    out = [
        {"name": f"pipelined >= {TARGET_PIPELINED_RPS:,} records/s", "measured": f"{rps:,.0f}",
         "met": rps >= TARGET_PIPELINED_RPS, "value": rps},
        {"name": f"pipelined >= {TARGET_BASELINE_RATIO:.0%} of baseline", "measured": f"{ratio:.1%}",
         "met": ratio >= TARGET_BASELINE_RATIO, "value": ratio},
    ]
    if "produce" in mq and "p50_us" in mq["produce"]:
        p50 = mq["produce"]["p50_us"]
        out.append({"name": f"synchronous p50 <= {TARGET_SYNC_P50_US:.0f} µs", "measured": f"{p50:.1f} µs",
                    "met": p50 <= TARGET_SYNC_P50_US, "value": p50})
    return out


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("PASS" if met else "MISS")


def _short(error: str | None) -> str:
    """The exception name of an ``_error_text`` (the whole text is in the report's errors)."""
    return "not run" if error is None else error.split(":", 1)[0]


def _replication_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    quorum = report.get("cluster", {}).get("acks", {}).get("quorum", {})
    batch = quorum.get("produce_batch", {})
    sync = quorum.get("produce", {})
    out = []
    rps = batch.get("records_per_s")
    out.append({"name": f"pipelined acks=quorum >= {TARGET_QUORUM_PIPELINED_RPS:,} records/s",
                "measured": f"{rps:,.0f}" if rps is not None else f"not measured ({_short(batch.get('error'))})",
                "met": None if rps is None else rps >= TARGET_QUORUM_PIPELINED_RPS, "value": rps})
    p50 = sync.get("p50_us")
    out.append({"name": f"synchronous acks=quorum p50 <= {TARGET_QUORUM_SYNC_P50_US:.0f} µs",
                "measured": f"{p50:.1f} µs" if p50 is not None else f"not measured ({_short(sync.get('error'))})",
                "met": None if p50 is None else p50 <= TARGET_QUORUM_SYNC_P50_US, "value": p50})
    failover = report.get("cluster", {}).get("failover")
    if failover is not None:
        median = failover.get("median_s")
        repeats = len(failover["repeats"])
        if median is None:
            measured = "not measured (see errors)"
            met = None
        else:
            measured = f"{median:.2f} s (median; {failover['recovered']} of {repeats} repeats recovered)"
            met = median <= failover["target_s"] and failover["recovered"] == repeats
        out.append({"name": f"failover <= failure_timeout_s + {TARGET_FAILOVER_SLACK_S:.0f} s "
                            f"= {failover['target_s']:.1f} s", "measured": measured, "met": met, "value": median})
    return out


def _replication_errors(report: dict[str, Any]) -> list[str]:
    """Every part of the run that could not be measured or failed its check, one line each."""
    errors: list[str] = []
    single = report.get("single_node", {})
    if single and not single.get("verification", {}).get("ok", False):
        errors.append(f"single node: stored {single['verification']['high_watermark_sum']} records, "
                      f"acknowledged {single['verification']['acknowledged']}")
    cluster = report.get("cluster", {})
    if "error" in cluster:
        errors.append(f"cluster: {cluster['error']}")
    for acks, phase in cluster.get("acks", {}).items():
        for key in ("produce_batch", "produce"):
            if "error" in phase.get(key, {}):
                errors.append(f"{cluster['nodes']} nodes, acks={acks}, {key}: {phase[key]['error']}")
        verification = phase.get("verification")
        if verification is not None and not verification["ok"]:
            errors.append(f"{cluster['nodes']} nodes, acks={acks}: high watermarks sum "
                          f"{verification['high_watermark_sum']}, acknowledged {verification['acknowledged']}")
    for repeat in cluster.get("failover", {}).get("repeats", []):
        if "error" in repeat:
            errors.append(f"failover repeat {repeat['repeat'] + 1}: {repeat['error']}")
    return errors


def _rebalance_errors(report: dict[str, Any]) -> list[str]:
    """Every part of ``bench rebalance`` that could not be measured or failed its check, one line each."""
    cluster = report.get("cluster", {})
    errors = [f"cluster: {cluster['error']}"] if "error" in cluster else []
    for name in ("join", "leave"):
        move = cluster.get(name, {})
        if "error" in move:
            errors.append(f"{name}: {move['error']}")
        if move.get("done_s") is not None and not move.get("moved_as_predicted", True):
            errors.append(f"{name}: partitions {move['moved']} changed replica set, the ring predicts "
                          f"{move['predicted_moved']}")
    if (cluster.get("load") or {}).get("error"):
        errors.append(f"the producer during the moves stopped: {cluster['load']['error']}")
    verification = cluster.get("verification")
    if verification is not None and not verification["ok"]:
        errors.append(f"high watermarks sum {verification['high_watermark_sum']}, acknowledged "
                      f"{verification['acknowledged']} (+ {verification['unknown_fate']} of unknown fate)")
    return errors
