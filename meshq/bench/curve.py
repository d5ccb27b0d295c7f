"""``meshq bench produce --curve``: the cost of CurveZMQ, CURVE off and on side by side in one run.

Theory of operation
-------------------
``--rounds`` rounds (at least 3); each measures the producer of ``bench produce`` (one child
``meshq node`` on 127.0.0.1 and an in-process client, a fresh node and data directory per
measurement) once without keys and once with a key set made by ``meshq.keys.keygen`` in the
bench's temporary directory. The order alternates between rounds (off-on, on-off, ...), so a
drift of the machine's load weighs on both alike. Per mode: pipelined ``produce_batch``
throughput, synchronous ``produce`` p50 latency, and CPU per record (the producer's and the
node's threads, from /proc, over the pipelined run): median, min and max; then the ratios on/off
of the medians against the goals (CURVE costs at most 15 % throughput and 20 % p50), reported
as PASS/MISS, never asserted.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
from typing import Any

from meshq.bench.cpu import _machine
from meshq.bench.produce import _run_meshq

THROUGHPUT_COST_GOAL = 0.15
P50_COST_GOAL = 0.20


def _one(args: Any, workdir: str, keys: str | None) -> dict[str, Any]:
    os.makedirs(workdir)
    run_args = copy.copy(args)
    run_args.curve_keys = keys
    result = _run_meshq(run_args, workdir, [], with_async=False)
    batch = result["produce_batch"]
    cpu_s = batch["cpu"].get("ours_percent", 0.0) / 100.0 * batch["seconds"]
    return {"records_per_s": batch["records_per_s"], "cpu_us_per_record": 1e6 * cpu_s / max(1, batch["records"]),
            "p50_us": result.get("produce", {}).get("p50_us"), "verified": result["verification"]["ok"]}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure_curve(args: Any, workdir: str) -> dict[str, Any]:
    from meshq.keys import keygen

    keys = str(keygen(os.path.join(workdir, "keys")))
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for index in range(args.rounds):
        order = ("off", "on") if index % 2 == 0 else ("on", "off")
        for mode in order:
            print(f"meshq bench: round {index + 1}/{args.rounds}, CURVE {mode}", file=sys.stderr, flush=True)
            runs[mode].append(_one(args, os.path.join(workdir, f"r{index}-{mode}"), keys if mode == "on" else None))
    summary: dict[str, Any] = {}
    for mode, results in runs.items():
        summary[mode] = {name: _spread([r[name] for r in results if r[name] is not None])
                         for name in ("records_per_s", "p50_us", "cpu_us_per_record")}
    throughput = summary["on"]["records_per_s"]["median"] / summary["off"]["records_per_s"]["median"]
    p50 = summary["on"]["p50_us"]["median"] / summary["off"]["p50_us"]["median"]
    cpu = summary["on"]["cpu_us_per_record"]["median"] / summary["off"]["cpu_us_per_record"]["median"]
    return {
        "machine": _machine(),
        "config": {"rounds": args.rounds, "records": args.records, "sync_records": args.sync_records,
                   "value_bytes": args.value_bytes, "batch": args.batch, "acks": args.acks, "fsync": args.fsync,
                   "command": "meshq " + " ".join(sys.argv[1:]) if sys.argv else ""},
        "runs": runs,
        "summary": summary,
        "ratios": {"throughput_on_over_off": throughput, "p50_on_over_off": p50, "cpu_per_record_on_over_off": cpu},
        "targets": {"throughput_cost": "PASS" if 1 - throughput <= THROUGHPUT_COST_GOAL else "MISS",
                    "p50_cost": "PASS" if p50 - 1 <= P50_COST_GOAL else "MISS"},
        "verified": all(r["verified"] for results in runs.values() for r in results),
    }


def render_curve(report: dict[str, Any]) -> None:
    summary, ratios = report["summary"], report["ratios"]
    print(f"CURVE off vs on — {report['config']['rounds']} alternating rounds, median (min..max)")
    rows = (("produce_batch records/s", "records_per_s", "{:,.0f}"), ("produce p50 µs", "p50_us", "{:,.0f}"),
            ("CPU µs/record (batch)", "cpu_us_per_record", "{:.2f}"))
    for label, key, fmt in rows:
        cells = []
        for mode in ("off", "on"):
            spread = summary[mode][key]
            cells.append(f"{mode}: {fmt.format(spread['median'])} ({fmt.format(spread['min'])}.."
                         f"{fmt.format(spread['max'])})")
        print(f"  {label:26} " + "   ".join(cells))
    print(f"  on/off: throughput {ratios['throughput_on_over_off']:.3f} (goal >= {1 - THROUGHPUT_COST_GOAL:.2f}: "
          f"{report['targets']['throughput_cost']}), p50 {ratios['p50_on_over_off']:.3f} (goal <= "
          f"{1 + P50_COST_GOAL:.2f}: {report['targets']['p50_cost']}), CPU/record "
          f"{ratios['cpu_per_record_on_over_off']:.3f}")
    print(f"  every acknowledged record stored: {'yes' if report['verified'] else 'NO'}")
    print(f"  command: {report['config']['command']}")


__all__ = ["measure_curve", "render_curve"]
