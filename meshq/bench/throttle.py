"""``meshq bench rebalance --copy-rates A,B,...``: live produce latency during a join, per copy rate.

Theory of operation
-------------------
For each of ``--rounds`` rounds and each copy rate (MB/s; 0 = unlimited), a fresh cluster of
``--nodes`` nodes started with ``meshq node --copy-rate RATE`` is preloaded and a node joins
while a producer (load.py, ``--load-rate``, ``acks=quorum``) writes throughout
(``_run_rebalance_cluster`` with the leave skipped). Per run: the producer's batch p99 in the
``LOAD_BEFORE_S`` before the join (*idle*) and during it, their ratio, how long the join took,
its copy rate, and CPU (rusage of every process: ours, and the machine's). Rates run in turn
within a round, so each round compares them on the same machine load; the summary gives the
median and min/max of each figure over the rounds.
"""

from __future__ import annotations

import copy
import os
import statistics
from typing import Any

from meshq.bench.console import _progress
from meshq.bench.rebalance import _run_rebalance_cluster


def parse_copy_rates(text: str) -> list[float]:
    """``"0,30"`` -> ``[0.0, 30.0]`` (ValueError when a value is not a finite number >= 0)."""
    rates = [float(part) for part in text.split(",") if part.strip()]
    if not rates or any(not 0 <= rate < float("inf") for rate in rates):
        raise ValueError(text)
    return rates


def _run_figures(cluster: dict[str, Any]) -> dict[str, Any]:
    join = cluster.get("join", {})
    before = (join.get("load_before") or {}).get("batch_latency", {})
    during = (join.get("load_during") or {}).get("batch_latency", {})
    out: dict[str, Any] = {"join_s": join.get("done_s"), "moved_mb_per_s": join.get("moved_mb_per_s"),
                           "idle_p99_ms": before.get("p99_us", 0) / 1000 or None,
                           "during_p99_ms": during.get("p99_us", 0) / 1000 or None,
                           "cpu_ours_percent": join.get("cpu", {}).get("ours_percent"),
                           "cpu_other_percent": join.get("cpu", {}).get("other_percent")}
    if out["idle_p99_ms"] and out["during_p99_ms"]:
        out["p99_ratio"] = out["during_p99_ms"] / out["idle_p99_ms"]
    for key in ("error",):
        if key in cluster:
            out[key] = cluster[key]
        elif key in join:
            out[key] = join[key]
    return out


def _spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run_copy_rates(args: Any, workdir: str, load_rate: int | None, rates: list[float]) -> dict[str, Any]:
    """Every round of every rate; returns ``{"runs": [...], "summary": {rate: figures}}``."""
    runs = []
    for round_index in range(args.rounds):
        for rate in rates:
            _progress(f"round {round_index + 1}/{args.rounds}: join with --copy-rate {rate:g}")
            run_args = copy.copy(args)
            run_args.copy_rate = rate
            run_args.skip_leave = True
            run_dir = os.path.join(workdir, f"round{round_index + 1}-rate{rate:g}")
            os.makedirs(run_dir)
            cluster = _run_rebalance_cluster(run_args, run_dir, load_rate, True)
            runs.append({"round": round_index + 1, "copy_rate_mb_per_s": rate, **_run_figures(cluster),
                         "cluster": cluster})
    summary = {}
    for rate in rates:
        mine = [run for run in runs if run["copy_rate_mb_per_s"] == rate and "error" not in run]
        summary[f"{rate:g}"] = {key: _spread([run.get(key) for run in mine])
                                for key in ("idle_p99_ms", "during_p99_ms", "p99_ratio", "join_s", "moved_mb_per_s",
                                            "cpu_ours_percent", "cpu_other_percent")}
    return {"rates": rates, "rounds": args.rounds, "runs": runs, "summary": summary}


def copy_rate_errors(report: dict[str, Any]) -> list[str]:
    return [f"round {run['round']}, --copy-rate {run['copy_rate_mb_per_s']:g}: {run['error']}"
            for run in report.get("throttle", {}).get("runs", []) if "error" in run]


def render_copy_rates(report: dict[str, Any]) -> None:
    throttle = report["throttle"]
    print(f"bench rebalance, copy rates {throttle['rates']} MB/s (0 = unlimited), {throttle['rounds']} rounds; "
          f"command: {report['config']['command']}")
    print("per run: round, rate, idle p99 ms, during-join p99 ms, ratio, join s, copy MB/s, CPU ours %, other %")
    for run in throttle["runs"]:
        cells = [run.get(k) for k in ("idle_p99_ms", "during_p99_ms", "p99_ratio", "join_s", "moved_mb_per_s",
                                      "cpu_ours_percent", "cpu_other_percent")]
        text = ", ".join("-" if v is None else f"{v:.2f}" for v in cells)
        print(f"  {run['round']}, {run['copy_rate_mb_per_s']:g}: {text}" + (f"  ERROR {run['error']}" if "error" in run
                                                                             else ""))
    print("median [min, max] over the rounds:")
    for rate, figures in throttle["summary"].items():
        parts = []
        for key, label in (("idle_p99_ms", "idle p99 ms"), ("during_p99_ms", "during p99 ms"),
                           ("p99_ratio", "ratio"), ("join_s", "join s"), ("moved_mb_per_s", "copy MB/s"),
                           ("cpu_ours_percent", "CPU ours %")):
            spread = figures.get(key)
            if spread:
                parts.append(f"{label} {spread['median']:.2f} [{spread['min']:.2f}, {spread['max']:.2f}]")
        print(f"  --copy-rate {rate}: " + "; ".join(parts))
