"""The meshq producer loops every scenario times, and ``bench produce``'s run against one node.

Theory of operation
-------------------
A ``meshq.Node(role="client")`` in this process produces to a ``meshq node`` child (``--fsync``
as given) or, with ``--seed HOST:PORT``, to an already running node (the topics get unique
names, so the check still holds):

a. ``produce_batch`` in chunks of ``--batch`` records with a bounded window of outstanding
   futures (the pipelined figure, ``_pipelined_batch``);
b. ``produce_async`` per record then ``flush()`` (``--records / 5`` records);
c. ``--sync-records`` sequential ``produce`` calls, each timed with ``perf_counter_ns`` after a
   warm-up (``_synchronous``).

Then the sum of the node's high watermarks over the benchmark topics must equal the number of
acknowledged records, so a benchmark that stores nothing cannot pass. The pipelined run is
repeated (``REPEATS``) and the median is reported with every run's rate; a phase that takes
longer than ``PHASE_TIMEOUT_S`` is aborted. ``bench replication`` and ``bench rebalance`` run
(a) and (c) against their clusters.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from collections import deque
from typing import Any

from meshq.bench.cpu import _CpuSampler, cpu_us_per_record
from meshq.bench.errors import BenchError
from meshq.bench.procs import PARTITIONS, READY_TIMEOUT_S, _Child, _start_node
from meshq.bench.stats import _percentiles_us, _summarize_runs
from meshq.bench.status import _high_watermarks

BATCH_WINDOW = 32  # produce_batch futures in flight (8 partitions x max 5 in flight each = 40)
SYNC_WARMUP = 500
PHASE_TIMEOUT_S = 60.0  # a phase that takes longer than this is aborted
REPEATS = 3  # timed repetitions of the meshq produce_batch run; the median is reported


def _values(count: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(count)]


def _check_deadline(start: float, what: str, limit_s: float = PHASE_TIMEOUT_S) -> None:
    if time.perf_counter() - start > limit_s:
        raise BenchError(f"{what} took longer than {limit_s:.0f} s; aborted")


def _pipelined_batch(client: Any, topic: str, records: int, values: list[bytes], acks: str,
                     sampler: _CpuSampler, repeats: int = REPEATS, limit_s: float = PHASE_TIMEOUT_S) -> dict[str, Any]:
    batch = len(values)
    # warm-up (metadata, connection, first segment files): not timed, but counted
    acknowledged = 0
    for _ in range(5):
        client.produce_batch(topic, values, acks=acks).result(PHASE_TIMEOUT_S)
        acknowledged += batch
    produce_batch = client.produce_batch
    runs = []
    for _ in range(repeats):
        window: deque = deque()
        sent = 0
        sampler.start()
        start = time.perf_counter()
        while sent < records:
            n = min(batch, records - sent)
            window.append((produce_batch(topic, values if n == batch else values[:n], acks=acks), n))
            sent += n
            if len(window) >= BATCH_WINDOW:
                future, count = window.popleft()
                future.result(PHASE_TIMEOUT_S)
                acknowledged += count
                _check_deadline(start, "the produce_batch run", limit_s)
        while window:
            future, count = window.popleft()
            future.result(PHASE_TIMEOUT_S)
            acknowledged += count
        elapsed = time.perf_counter() - start
        sampler.stop()
        runs.append({"records": records, "seconds": elapsed, "records_per_s": records / elapsed})
    result = _summarize_runs(runs, len(values[0]))
    cpu = sampler.summary()
    result.update({"window_futures": BATCH_WINDOW, "acknowledged": acknowledged, "cpu": cpu,
                   "cpu_us_per_record": cpu_us_per_record(cpu, records * repeats)})
    return result


def _pipelined_async(client: Any, topic: str, records: int, values: list[bytes], acks: str,
                     sampler: _CpuSampler) -> dict[str, Any]:
    warm = min(100, len(values))
    for value in values[:warm]:
        client.produce_async(topic, value, acks=acks)
    client.flush(PHASE_TIMEOUT_S)
    produce_async = client.produce_async
    nvalues = len(values)
    futures = []
    append = futures.append
    sampler.start()
    start = time.perf_counter()
    for i in range(records):
        append(produce_async(topic, values[i % nvalues], acks=acks))
    client.flush(PHASE_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    sampler.stop()
    failed = [f for f in futures if f.exception(0) is not None]
    if failed:
        raise BenchError(f"{len(failed)} of {records} produce_async records failed: {failed[0].exception(0)!r}")
    cpu = sampler.summary()
    return {"records": records, "seconds": elapsed, "records_per_s": records / elapsed,
            "mb_per_s": records * len(values[0]) / elapsed / 1e6, "acknowledged": records + warm,
            "cpu": cpu, "cpu_us_per_record": cpu_us_per_record(cpu, records)}


def _batch_vs_async(client: Any, topic: str, records: int, values: list[bytes], acks: str,
                    processes: dict[str, int], rounds: int = REPEATS) -> dict[str, Any]:
    """Issue #18 item 3: ``produce_batch`` (pipelined) and ``produce_async`` in a tight loop from one
    thread (then ``flush()``), ``records`` each, alternating round by round in one run. Reports the
    median round of each with min/max, wall and CPU µs per record, and the median ratio
    produce_async / produce_batch of records/s (each round's async run against the batch run just
    before it)."""
    batch_runs: list[dict[str, Any]] = []
    async_runs: list[dict[str, Any]] = []
    acknowledged = 0
    for _ in range(rounds):
        batch = _pipelined_batch(client, topic, records, values, acks, _CpuSampler(processes), repeats=1)
        acknowledged += batch["acknowledged"]
        batch_runs.append(batch)
        one = _pipelined_async(client, topic, records, values, acks, _CpuSampler(processes))
        acknowledged += one["acknowledged"]
        async_runs.append(one)

    def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
        rates = sorted(r["records_per_s"] for r in runs)
        median = sorted(runs, key=lambda r: r["records_per_s"])[len(runs) // 2]
        return {"records": records, "records_per_s": median["records_per_s"], "min_records_per_s": rates[0],
                "max_records_per_s": rates[-1], "runs_records_per_s": [round(r["records_per_s"]) for r in runs],
                "wall_us_per_record": 1e6 / median["records_per_s"],
                "cpu_us_per_record": median["cpu_us_per_record"], "cpu": median["cpu"]}

    ratios = sorted(a["records_per_s"] / b["records_per_s"] for a, b in zip(async_runs, batch_runs))
    return {"acks": acks, "rounds": rounds, "produce_batch": summary(batch_runs), "produce_async": summary(async_runs),
            "ratio": ratios[len(ratios) // 2], "ratio_min": ratios[0], "ratio_max": ratios[-1],
            "acknowledged": acknowledged}


def _synchronous(client: Any, topic: str, records: int, values: list[bytes], acks: str,
                 sampler: _CpuSampler, partition: int | None = None) -> dict[str, Any]:
    produce = client.produce if partition is None else functools.partial(client.produce, partition=partition)
    nvalues = len(values)
    warm = min(SYNC_WARMUP, records)
    for i in range(warm):
        produce(topic, values[i % nvalues], acks=acks)
    clock = time.perf_counter_ns
    samples: list[int] = []
    append = samples.append
    sampler.start()
    start = time.perf_counter()
    for i in range(records):
        t0 = clock()
        produce(topic, values[i % nvalues], acks=acks)
        append(clock() - t0)
    elapsed = time.perf_counter() - start
    sampler.stop()
    cpu = sampler.summary()
    result: dict[str, Any] = {"records": records, "seconds": elapsed,
                              "records_per_s": records / elapsed if elapsed > 0 else 0.0,
                              "acknowledged": records + warm, "cpu": cpu,
                              "cpu_us_per_request": cpu_us_per_record(cpu, records)}
    if samples:
        result.update(_percentiles_us(samples))
    return result


def _run_meshq(args: Any, workdir: str, seeds: list[str], with_async: bool = True) -> dict[str, Any]:
    from meshq.cli.connect import own_address
    from meshq.node import Node

    child: _Child | None = None
    client: Any = None
    try:
        if not seeds:
            child, hostport = _start_node(args, workdir)
            seeds = [hostport]
        host, advertised = own_address(args, seeds)  # reachable from an external cluster's nodes too
        keys = getattr(args, "curve_keys", None)
        client = Node(cluster=args.cluster, host=host, seeds=seeds, mdns=False, role="client",
                      keys=os.path.join(keys, "clients", "admin") if keys else None,
                      **({"advertised_host": advertised} if advertised else {}))
        client.start()
        client.wait_ready(timeout=READY_TIMEOUT_S)
        run_id = uuid.uuid4().hex[:8]
        topics = {name: f"bench-{run_id}-{name}" for name in ("batch", "async", "sync")}
        for topic in topics.values():
            client.create_topic(topic, partitions=PARTITIONS, replication_factor=1, retention_ms=None)
        values = _values(args.batch, args.value_bytes)
        processes = {"producer": os.getpid()}
        if child is not None:
            processes["node"] = child.pid
        result: dict[str, Any] = {"node_pid": child.pid if child else None, "fsync": args.fsync, "acks": args.acks,
                                  "partitions": PARTITIONS}
        result["produce_batch"] = _pipelined_batch(client, topics["batch"], args.records, values, args.acks,
                                                   _CpuSampler(processes))
        if with_async:
            async_records = max(1, args.records // 5)
            result["produce_async"] = _pipelined_async(client, topics["async"], async_records, values, args.acks,
                                                       _CpuSampler(processes))
        if args.sync_records > 0:
            result["produce"] = _synchronous(client, topics["sync"], args.sync_records, values, args.acks,
                                             _CpuSampler(processes))
        acknowledged = sum(result[k]["acknowledged"] for k in ("produce_batch", "produce_async", "produce")
                           if k in result)
        if args.acks == "none":
            time.sleep(0.5)  # fire-and-forget: give the node a moment to append what is in flight
        stored = _high_watermarks(client, set(topics.values()))
        result["verification"] = {"acknowledged": acknowledged, "high_watermark_sum": stored,
                                  "ok": stored == acknowledged}
        return result
    finally:
        try:
            if client is not None:
                client.stop()
        finally:
            if child is not None:
                child.stop()
