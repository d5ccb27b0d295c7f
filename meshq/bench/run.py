"""``meshq bench``'s entry point: checks the arguments, runs a scenario, prints its report, returns the exit status.

Theory of operation
-------------------
A scenario is a recipe of parts measured in order in one temporary directory (always removed),
after the machine's own load has been read for a second: ``produce`` — the raw pyzmq baseline
(baseline.py), then meshq on one node (produce.py); ``replication`` — the same baseline and the
single node at ``acks=leader``, then the replicated cluster and its failovers (replication.py);
``rebalance`` — a preloaded cluster, a join and a leave (rebalance.py). The report is printed
as tables (report.py) or, with ``--json``, as JSON. The exit status is 0, 1 when a part could
not be measured or a check failed (the report says which and why), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from meshq.bench.baseline import _run_baseline
from meshq.bench.console import _progress
from meshq.bench.cpu import _machine, _other_load
from meshq.bench.errors import BenchError
from meshq.bench.procs import PARTITIONS
from meshq.bench.produce import _run_meshq
from meshq.bench.queue import render_queue, run_queue
from meshq.bench.rebalance import REBALANCE_PARTITIONS, _run_rebalance_cluster
from meshq.bench.replication import _run_cluster
from meshq.bench.report import _render, _render_rebalance, _render_replication
from meshq.bench.targets import _rebalance_errors, _replication_errors, _replication_targets, _targets
from meshq.bench.throttle import copy_rate_errors, parse_copy_rates, render_copy_rates, run_copy_rates
from meshq.errors import MeshqError, UsageError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _run_replication(args: Any) -> int:
    """``meshq bench replication``: baseline, one node, ``--nodes`` replicated nodes, failover; returns the exit code."""
    problems = []
    if not 1 <= args.nodes <= 9:
        problems.append("--nodes must be from 1 to 9")
    if not 1 <= args.replication_factor <= args.nodes:
        problems.append("--replication-factor must be from 1 to --nodes")
    if args.failover_repeats < 0:
        problems.append("--failover-repeats must be 0 or more")
    if args.failover_repeats > 0 and args.nodes < 2:
        problems.append("failover needs --nodes 2 or more (or --failover-repeats 0)")
    if args.seed or args.interface:
        problems.append("bench replication starts its own nodes; --seed and --interface are for bench produce")
    if problems:
        return _refuse(problems)

    def measure(workdir: str) -> dict[str, Any]:
        report: dict[str, Any] = {
            "scenario": "replication",
            "machine": _machine(),
            "config": {"records": args.records, "sync_records": args.sync_records, "value_bytes": args.value_bytes,
                       "batch": args.batch, "fsync": args.fsync, "nodes": args.nodes,
                       "replication_factor": args.replication_factor, "partitions": PARTITIONS,
                       "failover_repeats": args.failover_repeats, "failover_acks": args.failover_acks,
                       "failover_timeout_s": args.failover_timeout, "failover_deadline_s": args.failover_deadline,
                       "in_sync_timeout_s": args.in_sync_timeout,
                       "command": "meshq " + " ".join(sys.argv[1:]) if sys.argv else ""},
        }
        report["machine_load_before_cores"] = _other_load(1.0)
        _progress("raw pyzmq baseline")
        report["baseline"] = _run_baseline(args.records, args.batch, args.value_bytes, args.sync_records, workdir)
        _progress("one node, replication factor 1, acks=leader")
        single_args = argparse.Namespace(**{**vars(args), "acks": "leader"})
        report["single_node"] = _run_meshq(single_args, workdir, [], with_async=False)
        report["cluster"] = _run_cluster(args, workdir)
        report["targets"] = _replication_targets(report)
        report["errors"] = _replication_errors(report)
        return report

    return _measure_and_report(args, measure, _render_replication, lambda report: bool(report["errors"]))


def _parse_load_rate(text: str) -> tuple[bool, int | None]:
    """``--load-rate``: ``0`` (no producer during the moves), ``max`` (as fast as it goes) or records/s.
    Returns (with_load, rate or None for max); raises ValueError."""
    if text.strip().lower() == "max":
        return True, None
    rate = int(text)
    if rate < 0:
        raise ValueError(text)
    return rate > 0, rate or None


def _run_rebalance(args: Any) -> int:
    """``meshq bench rebalance``: preload ``--nodes`` nodes, time a join and a leave; returns the exit code."""
    problems = []
    if not 1 <= args.nodes <= 8:
        problems.append("--nodes must be from 1 to 8 (one more joins)")
    if not 1 <= args.replication_factor <= args.nodes:
        problems.append("--replication-factor must be from 1 to --nodes")
    if args.seed or args.interface:
        problems.append("bench rebalance starts its own nodes; --seed and --interface are for bench produce")
    try:
        with_load, load_rate = _parse_load_rate(args.load_rate)
    except ValueError:
        problems.append("--load-rate must be 0 (none), max or a number of records/s")
    rates = None
    if getattr(args, "copy_rates", None):
        try:
            rates = parse_copy_rates(args.copy_rates)
        except ValueError:
            problems.append("--copy-rates must be comma-separated numbers of MB/s >= 0 (0: unlimited), e.g. 0,30")
        if args.rounds < 1:
            problems.append("--rounds must be at least 1")
        if not with_load:
            with_load, load_rate = True, 2000
    if problems:
        return _refuse(problems)
    if rates is not None:
        return _run_copy_rates(args, load_rate, rates)

    def measure(workdir: str) -> dict[str, Any]:
        report: dict[str, Any] = {
            "scenario": "rebalance",
            "machine": _machine(),
            "config": {"records": args.records, "value_bytes": args.value_bytes, "batch": args.batch,
                       "fsync": args.fsync, "nodes": args.nodes, "replication_factor": args.replication_factor,
                       "partitions": REBALANCE_PARTITIONS, "load_rate": args.load_rate,
                       "move_timeout_s": args.move_timeout, "skip_leave": args.skip_leave,
                       "command": "meshq " + " ".join(sys.argv[1:]) if sys.argv else ""},
        }
        report["machine_load_before_cores"] = _other_load(1.0)
        report["cluster"] = _run_rebalance_cluster(args, workdir, load_rate, with_load)
        report["errors"] = _rebalance_errors(report)
        return report

    return _measure_and_report(args, measure, _render_rebalance, lambda report: bool(report["errors"]))


def _run_copy_rates(args: Any, load_rate: int | None, rates: list[float]) -> int:
    """``meshq bench rebalance --copy-rates ...``: the producer's p99 during a join, per copy rate."""

    def measure(workdir: str) -> dict[str, Any]:
        report: dict[str, Any] = {
            "scenario": "rebalance-copy-rates",
            "machine": _machine(),
            "config": {"records": args.records, "value_bytes": args.value_bytes, "batch": args.batch,
                       "fsync": args.fsync, "nodes": args.nodes, "replication_factor": args.replication_factor,
                       "partitions": REBALANCE_PARTITIONS, "load_rate": load_rate, "copy_rates": rates,
                       "rounds": args.rounds, "command": "meshq " + " ".join(sys.argv[1:]) if sys.argv else ""},
        }
        report["machine_load_before_cores"] = _other_load(1.0)
        report["throttle"] = run_copy_rates(args, workdir, load_rate, rates)
        report["errors"] = copy_rate_errors(report)
        return report

    return _measure_and_report(args, measure, render_copy_rates, lambda report: bool(report["errors"]))


def _measure_and_report(args: Any, measure: Callable[[str], dict[str, Any]], render: Callable[[dict[str, Any]], None],
                        failed: Callable[[dict[str, Any]], bool]) -> int:
    """Run ``measure(workdir)`` in a temporary directory (always removed), print the report as JSON
    or tables, and return the exit code (``failed(report)``: a part could not be measured or checked)."""
    workdir = tempfile.mkdtemp(prefix="meshq-bench-")
    try:
        report = measure(workdir)
    except BenchError as exc:
        print(f"meshq bench: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report)
    return EXIT_FAILED if failed(report) else EXIT_OK


def _run_queue(args: Any) -> int:
    """``meshq bench queue``: shared-subscription throughput with per-record acks (queue.py)."""
    problems = []
    if not 1 <= args.nodes <= 9:
        problems.append("--nodes must be from 1 to 9")
    if not 1 <= args.replication_factor <= args.nodes:
        problems.append("--replication-factor must be from 1 to --nodes")
    if args.jobs < 1 or args.workers < 1 or args.rounds < 1:
        problems.append("--jobs, --workers and --rounds must be at least 1")
    if args.seed or args.interface:
        problems.append("bench queue starts its own nodes; --seed and --interface are for bench produce")
    if problems:
        return _refuse(problems)

    def measure(workdir: str) -> dict[str, Any]:
        report: dict[str, Any] = {
            "scenario": "queue",
            "machine": _machine(),
            "config": {"jobs": args.jobs, "value_bytes": args.value_bytes, "batch": args.batch, "fsync": args.fsync,
                       "nodes": args.nodes, "replication_factor": args.replication_factor, "workers": args.workers,
                       "rounds": args.rounds, "command": "meshq " + " ".join(sys.argv[1:]) if sys.argv else ""},
        }
        report["machine_load_before_cores"] = _other_load(1.0)
        report["cluster"] = run_queue(args, workdir)
        return report

    return _measure_and_report(args, measure, render_queue, lambda report: "error" in report["cluster"])


def _run_compare(args: Any) -> int:
    """``meshq bench compare``: meshq RF 3 against NATS JetStream R3, Redis streams, RabbitMQ (compare.py)."""
    from meshq.bench.compare import PEER_NAMES, compare_errors, render_compare, run_compare

    problems = []
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if peers == ["none"]:
        peers = []
    unknown = [p for p in peers if p not in PEER_NAMES]
    if unknown:
        problems.append(f"--peers: unknown {', '.join(unknown)}; name some of {', '.join(PEER_NAMES)}, or none")
    if args.records < 1 or args.sync_records < 0 or args.value_bytes < 1:
        problems.append("--records must be at least 1, --sync-records 0 or more, --value-bytes at least 1")
    if not 1 <= args.batch <= 100_000:
        problems.append("--batch must be from 1 to 100000")
    if args.rounds < 1:
        problems.append("--rounds must be at least 1 (3 or more for a median with min and max)")
    if not 0 <= args.consumers <= PARTITIONS:
        problems.append(f"--consumers must be from 0 to {PARTITIONS} (the topic's partitions)")
    if args.seed or args.interface:
        problems.append("bench compare starts its own nodes; --seed and --interface are for bench produce")
    if problems:
        return _refuse(problems)
    args.peers = list(dict.fromkeys(peers))

    def measure(workdir: str) -> dict[str, Any]:
        report: dict[str, Any] = {
            "scenario": "compare",
            "machine": _machine(),
            "config": {"records": args.records, "sync_records": args.sync_records, "value_bytes": args.value_bytes,
                       "batch": args.batch, "fsync": args.fsync, "rounds": args.rounds, "peers": args.peers,
                       "consumers": args.consumers, "nodes": 3, "replication_factor": 3, "acks": "quorum",
                       "command": "meshq " + " ".join(sys.argv[1:]) if sys.argv else ""},
        }
        report["machine_load_before_cores"] = _other_load(1.0)
        report["compare"] = run_compare(args, workdir)
        report["errors"] = compare_errors(report)
        return report

    return _measure_and_report(args, measure, render_compare, lambda report: bool(report["errors"]))


def run_bench(args: Any) -> int:
    """``meshq bench produce``, ``replication``, ``rebalance``, ``queue``, ``pubsub``, ``rpc`` or ``compare``;
    returns the exit code."""
    if args.scenario == "compare":
        return _run_compare(args)
    if args.scenario == "pubsub":
        return _run_pubsub(args)
    if args.scenario == "rpc":
        from meshq.bench.rpc import run_rpc_bench

        return run_rpc_bench(args)
    if args.scenario not in ("produce", "replication", "rebalance", "queue"):
        print(f"meshq bench: unknown scenario {args.scenario!r}", file=sys.stderr)
        return EXIT_USAGE
    problems = []
    if args.records < 1:
        problems.append("--records must be at least 1")
    if args.sync_records < 0:
        problems.append("--sync-records must be 0 or more")
    if args.value_bytes < 1:
        problems.append("--value-bytes must be at least 1")
    if not 1 <= args.batch <= 100_000:
        problems.append("--batch must be from 1 to 100000")
    if problems:
        return _refuse(problems)
    if getattr(args, "curve", False):
        if args.scenario not in ("produce", "pubsub"):
            return _refuse([f"--curve measures bench produce and pubsub only, not {args.scenario}"])
        if args.rounds < 3:
            return _refuse(["--curve needs --rounds 3 or more (the report gives median, min and max)"])
        if args.seed or os.environ.get("MESHQ_SEEDS"):
            return _refuse(["--curve starts its own nodes (with and without keys): drop --seed / MESHQ_SEEDS"])
        if args.scenario == "pubsub":
            return _run_pubsub(args)
        from meshq.bench.curve import measure_curve, render_curve

        return _measure_and_report(args, lambda workdir: measure_curve(args, workdir), render_curve,
                                   lambda report: not report["verified"])
    if args.scenario == "replication":
        return _run_replication(args)
    if args.scenario == "rebalance":
        return _run_rebalance(args)
    if args.scenario == "queue":
        return _run_queue(args)
    try:
        seeds = _external_seeds(args)
    except MeshqError as exc:
        print(f"meshq bench: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED

    def measure(workdir: str) -> dict[str, Any]:
        report: dict[str, Any] = {
            "machine": _machine(),
            "config": {"records": args.records, "sync_records": args.sync_records, "value_bytes": args.value_bytes,
                       "batch": args.batch, "acks": args.acks, "fsync": args.fsync,
                       "node": "external " + ",".join(seeds) if seeds else "child process",
                       "command": "meshq " + " ".join(sys.argv[1:]) if sys.argv else ""},
        }
        report["machine_load_before_cores"] = _other_load(1.0)
        report["baseline"] = _run_baseline(args.records, args.batch, args.value_bytes, args.sync_records, workdir)
        report["meshq"] = _run_meshq(args, workdir, seeds)
        report["targets"] = _targets(report)
        return report

    return _measure_and_report(args, measure, _render, lambda report: not report["meshq"]["verification"]["ok"])


def _external_seeds(args: Any) -> list[str]:
    """The nodes of an existing cluster to measure: ``--seed``, or with ``--interface`` (``MESHQ_INTERFACES``) the
    storage nodes of ``--cluster`` found there by mDNS; none: bench produce starts its own node."""
    from meshq.cli.connect import find, seeds_of

    if seeds_of(args):
        return seeds_of(args)
    if not args.interface or args.no_mdns:  # the flag only: MESHQ_INTERFACES alone does not retarget the bench
        return []
    return find(args).seeds


def _refuse(problems: list[str]) -> int:
    """Print each problem with the arguments; the exit code of a usage error."""
    for problem in problems:
        print(f"meshq bench: {problem}", file=sys.stderr)
    return EXIT_USAGE


def _run_pubsub(args: Any) -> int:
    """``meshq bench pubsub``: pub -> 1 and 3 subscribers on other nodes, raw pyzmq and NATS core alongside."""
    from meshq.bench.pubsub import render, run_pubsub_bench

    problems = []
    if args.records < 1_000:
        problems.append("--records (messages per round) must be at least 1000")
    if not 1 <= args.value_bytes <= 1024 * 1024:
        problems.append("--value-bytes must be from 1 to 1048576 (the pub/sub limit)")
    if args.rounds < 1:
        problems.append("--rounds must be at least 1")
    if args.seed:
        problems.append("bench pubsub starts its own processes; --seed is for bench produce")
    if problems:
        return _refuse(problems)
    try:
        report = run_pubsub_bench(args.records, args.value_bytes, args.rounds, curve=getattr(args, "curve", False))
    except (RuntimeError, OSError, AssertionError) as exc:
        print(f"meshq bench pubsub: a worker failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    report["machine"] = _machine()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return EXIT_OK
