"""The three scenarios' reports as rich tables; ``--json`` prints the same report dict instead.

Theory of operation
-------------------
A renderer reads the report that run.py built (targets' verdicts and error lists included) and
measures nothing. ``bench produce``: throughput against the baseline, per-thread CPU,
synchronous latency, targets, the stored-records check. ``bench replication`` adds the
replicated setups and the failovers; ``bench rebalance`` shows the moves, the bytes on disk
per node and the producer during the moves. The replication and rebalance tables need a wide
console (console.py).
"""

from __future__ import annotations

import sys
from typing import Any

from meshq.bench.console import (
    _fmt_rate,
    _print_cpu,
    _print_load_warning,
    _print_machine,
    _print_targets,
    _runs_text,
    _wide_console,
)
from meshq.bench.load import LOAD_BEFORE_S
from meshq.bench.procs import PARTITIONS
from meshq.bench.produce import BATCH_WINDOW
from meshq.bench.rebalance import REBALANCE_POLL_S
from meshq.bench.targets import _verdict


def _render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    c = report["config"]
    _print_machine(console, "produce", report["machine"])
    console.print(f"records={c['records']:,} sync_records={c['sync_records']:,} value_bytes={c['value_bytes']} "
                  f"batch={c['batch']} acks={c['acks']} fsync={c['fsync']}")
    base = report["baseline"]
    mq = report["meshq"]
    table = Table(title=f"Throughput, pipelined (median of {base['repeats']} baseline and {mq['produce_batch']['repeats']} "
                        "produce_batch timed runs)")
    table.add_column("run")
    table.add_column("records", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("records/s", justify="right")
    table.add_column("MB/s (values)", justify="right")
    table.add_column("vs baseline", justify="right")
    table.add_column("all runs", justify="right")
    table.add_row(f"baseline: pyzmq DEALER->ROUTER, window {base['window_frames']}",
                  f"{base['records']:,}", f"{base['seconds']:.3f}", _fmt_rate(base["records_per_s"]),
                  f"{base['mb_per_s']:.1f}", "100%", _runs_text(base))
    for key, label in (("produce_batch", f"meshq produce_batch, window {BATCH_WINDOW}"),
                       ("produce_async", "meshq produce_async + flush")):
        row = mq[key]
        table.add_row(label, f"{row['records']:,}", f"{row['seconds']:.3f}", _fmt_rate(row["records_per_s"]),
                      f"{row['mb_per_s']:.1f}", f"{row['records_per_s'] / base['records_per_s']:.1%}",
                      _runs_text(row))
    console.print(table)
    _print_cpu(console, [("baseline", base), ("produce_batch", mq["produce_batch"]),
                         ("produce_async", mq["produce_async"]), ("produce (sync)", mq.get("produce", {}))])
    _print_load_warning(console, report)
    lat = Table(title="Synchronous latency (one record per call, µs)")
    for name in ("run", "calls", "p50", "p90", "p99", "max", "mean"):
        lat.add_column(name, justify="right" if name != "run" else "left")
    if "sync" in base:
        s = base["sync"]
        lat.add_row("baseline: raw pyzmq round trip", f"{s['count']:,}", f"{s['p50_us']:.1f}", f"{s['p90_us']:.1f}",
                    f"{s['p99_us']:.1f}", f"{s['max_us']:.1f}", f"{s['mean_us']:.1f}")
    if "produce" in mq and "p50_us" in mq["produce"]:
        s = mq["produce"]
        lat.add_row(f"meshq produce(acks={c['acks']})", f"{s['count']:,}", f"{s['p50_us']:.1f}",
                    f"{s['p90_us']:.1f}", f"{s['p99_us']:.1f}", f"{s['max_us']:.1f}", f"{s['mean_us']:.1f}")
    console.print(lat)
    _print_targets(console, "Targets", [(t["name"], t["measured"], bool(t["met"])) for t in report["targets"]])
    v = mq["verification"]
    colour = "green" if v["ok"] else "red"
    console.print(f"[{colour}]verification: node high watermarks sum {v['high_watermark_sum']:,}, "
                  f"acknowledged {v['acknowledged']:,} -> {'OK' if v['ok'] else 'MISMATCH'}[/{colour}]")


def _render_replication(report: dict[str, Any]) -> None:
    from rich.table import Table

    console = _wide_console("replication", report["machine"])
    c = report["config"]
    console.print(f"records={c['records']:,} sync_records={c['sync_records']:,} value_bytes={c['value_bytes']} "
                  f"batch={c['batch']} fsync={c['fsync']} nodes={c['nodes']} replication_factor="
                  f"{c['replication_factor']} partitions={PARTITIONS} failover_repeats={c['failover_repeats']}")
    base = report["baseline"]
    single = report.get("single_node", {})
    cluster = report.get("cluster", {})
    table = Table(title=f"Produce, {c['value_bytes']}-byte values: pipelined (median of timed runs) and synchronous")
    for name, right in (("setup", False), ("pipelined records/s", True), ("all runs", True), ("vs baseline", True),
                        ("sync p50 µs", True), ("sync p99 µs", True), ("sync calls", True)):
        table.add_column(name, justify="right" if right else "left")

    def add(label: str, batch: dict, sync: dict | None) -> None:
        if "error" in batch:
            cells = [f"[red]{batch['error'].split(':')[0]}[/red]", "", ""]
        elif batch:
            cells = [_fmt_rate(batch["records_per_s"]), _runs_text(batch),
                     f"{batch['records_per_s'] / base['records_per_s']:.1%}"]
        else:
            cells = ["", "", ""]
        if sync is None or not sync:
            cells += ["", "", ""]
        elif "error" in sync:
            cells += [f"[red]{sync['error'].split(':')[0]}[/red]", "", ""]
        elif "p50_us" in sync:
            cells += [f"{sync['p50_us']:.1f}", f"{sync['p99_us']:.1f}", f"{sync['count']:,}"]
        else:
            cells += ["", "", ""]
        table.add_row(label, *cells)

    add(f"raw pyzmq DEALER->ROUTER (baseline), window {base['window_frames']}", base, base.get("sync"))
    if single:
        add("meshq, 1 node, replication factor 1, acks=leader", single["produce_batch"], single.get("produce"))
    for acks, phase in cluster.get("acks", {}).items():
        add(f"meshq, {cluster['nodes']} nodes, replication factor {cluster['replication_factor']}, acks={acks}",
            phase.get("produce_batch", {}), phase.get("produce"))
    console.print(table)

    rows = [("baseline", base), ("1 node produce_batch", single.get("produce_batch", {})),
            ("1 node produce (sync)", single.get("produce", {}))]
    for acks, phase in cluster.get("acks", {}).items():
        rows += [(f"{cluster['nodes']} nodes {acks} produce_batch", phase.get("produce_batch", {})),
                 (f"{cluster['nodes']} nodes {acks} produce (sync)", phase.get("produce", {}))]
    _print_cpu(console, rows)
    _print_cpu_per_request(console, single, cluster)
    _print_batch_vs_async(console, cluster)
    _print_load_warning(console, report)

    failover = cluster.get("failover")
    if failover is not None:
        ft = Table(title=f"Failover: kill -9 of a partition leader -> writes to its partitions succeed again "
                         f"(acks={failover['acks']}, write timeout {failover['write_timeout_s']} s, "
                         f"failure_timeout_s {failover['failure_timeout_s']})")
        for name in ("repeat", "killed", "its partitions", "first back s", "all back s", "per partition s",
                     "failed calls (outage)", "other partitions: longest stall s", "new leaders"):
            ft.add_column(name, justify="left" if name in ("killed", "its partitions", "per partition s",
                                                           "failed calls (outage)", "new leaders") else "right")
        for r in failover["repeats"]:
            if "recovery_s" not in r:
                ft.add_row(str(r["repeat"] + 1), r.get("victim_label", ""),
                           ",".join(str(p) for p in r.get("partitions", [])), "",
                           "[red]not measured[/red]", "", "[red]see the errors below[/red]", "", "")
                continue
            killed = r["victim_label"] + (" [metadata leader]" if r["victim_was_metadata_leader"] else "")
            if not r["in_sync_before_kill"]:
                killed += " [yellow][replicas not all in sync before the kill][/yellow]"
            ft.add_row(str(r["repeat"] + 1), killed, ",".join(str(p) for p in r["partitions"]),
                       "-" if r["first_s"] is None else f"{r['first_s']:.3f}",
                       "[red]not back[/red]" if r["all_s"] is None else f"{r['all_s']:.3f}",
                       " ".join(f"{p}:{'-' if s is None else f'{s:.2f}'}" for p, s in r["recovery_s"].items()),
                       ", ".join(f"{k} {v}" for k, v in sorted(r["failed_calls"].items())) or "none",
                       "" if "others_longest_stall_s" not in r else f"{r['others_longest_stall_s']:.3f}",
                       ", ".join(f"{p}:{_cluster_label(cluster, n)}" for p, n in r.get("new_leaders", {}).items()))
        console.print(ft)
        if failover["median_s"] is not None:
            console.print(f"failover, all partitions of the killed leader back: median {failover['median_s']:.3f} s "
                          f"over {failover['recovered']} repeat(s); first partition back: median "
                          f"{failover['median_first_s']:.3f} s")

    targets = Table(title="Targets (issue 5)")
    targets.add_column("target")
    targets.add_column("measured", justify="right")
    targets.add_column("result")
    colours = {"PASS": "green", "MISS": "red", "n/a": "yellow"}
    for t in report["targets"]:
        verdict = _verdict(t["met"])
        targets.add_row(t["name"], t["measured"], f"[{colours[verdict]}]{verdict}[/{colours[verdict]}]")
    console.print(targets)
    if single:
        v = single["verification"]
        console.print(f"verification, 1 node: high watermarks sum {v['high_watermark_sum']:,}, acknowledged "
                      f"{v['acknowledged']:,} -> {'OK' if v['ok'] else 'MISMATCH'}")
    for acks, phase in cluster.get("acks", {}).items():
        v = phase.get("verification")
        if v is not None:
            console.print(f"verification, {cluster['nodes']} nodes acks={acks}: high watermarks sum "
                          f"{v['high_watermark_sum']:,}, acknowledged {v['acknowledged']:,} -> "
                          f"{'OK' if v['ok'] else 'MISMATCH'}")
        if not phase.get("in_sync_before", True):
            console.print(f"[yellow]note, acks={acks}: not every replica was in sync when the run started "
                          f"({phase.get('in_sync_problem')})[/yellow]")
    for error in report["errors"]:
        console.print(f"[red]not measured / failed: {error}[/red]")


def _mb(value: int | None) -> str:
    return "" if value is None else f"{value / 1e6:,.1f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _render_rebalance(report: dict[str, Any]) -> None:
    from rich.table import Table

    console = _wide_console("rebalance", report["machine"])
    c = report["config"]
    console.print(f"records={c['records']:,} value_bytes={c['value_bytes']} batch={c['batch']} fsync={c['fsync']} "
                  f"nodes={c['nodes']}+1 replication_factor={c['replication_factor']} partitions={c['partitions']} "
                  f"load_rate={c['load_rate']}")
    cluster = report.get("cluster", {})
    preload = cluster.get("preload")
    if preload:
        console.print(f"preload: {preload['acknowledged']:,} records acknowledged at acks=quorum (produce_batch, "
                      f"window {BATCH_WINDOW}) in {preload['seconds']:.2f} s = {_fmt_rate(preload['records_per_s'])} "
                      f"records/s; high watermarks sum {preload.get('high_watermark_sum', 0):,}")
    moves = [(name, cluster[name]) for name in ("join", "leave") if name in cluster and "skipped" not in cluster[name]]
    if moves:
        table = Table(title=f"Partition moves ({cluster['partitions']} partitions, replication factor "
                            f"{cluster['replication_factor']}): from the start of the move to handoffs == 0 and "
                            "every replica in sync")
        for name, right in (("move", False), ("node", False), ("total s", True), ("node ready s", True),
                            ("ring changed s", True), ("partitions moved (ring predicts)", True),
                            ("leaders moved", True), ("moved MB", True), ("MB/s", True), ("received MB", True)):
            table.add_column(name, justify="right" if right else "left")
        for name, move in moves:
            ready = move.get("ready_s" if name == "join" else "leave_returned_s")
            moved = move.get("moved", [])
            predicted = move.get("predicted_moved", [])
            table.add_row(name, f"{move['node']} ({move.get('node_id', '')})"
                          + (" [metadata leader]" if move.get("was_metadata_leader") else ""),
                          "[red]not done[/red]" if move.get("done_s") is None else f"{move['done_s']:.2f}",
                          _seconds(ready), _seconds(move.get("ring_s")),
                          f"{len(moved)} ({len(predicted)}{'' if move.get('moved_as_predicted') else ', differs'})",
                          str(move.get("leaders_moved", "")), _mb(move.get("moved_bytes")),
                          "" if "moved_mb_per_s" not in move else f"{move['moved_mb_per_s']:.1f}",
                          _mb(move.get("received_bytes")))
        console.print(table)
        console.print("total s: from the start of the joining node's process / the leave call until status shows "
                      "handoffs == 0, the ring's replica sets and every replica in sync. node ready s: the joining "
                      "node printed ready / leave returned. moved MB: the size, when the move started, of the "
                      "partitions whose replica set changed (each got one new replica); MB/s = moved MB / total s. "
                      "received MB: growth of the receiving nodes' data directories (the new node; for a leave the "
                      "others), records written meanwhile included.")
        sizes = Table(title="Bytes on disk per node (MB, apparent size of the data directory)")
        sizes.add_column("node")
        columns = [("after preload", cluster.get("bytes_after_preload", {}))]
        columns += [(f"after {name}", move.get("bytes_after", {})) for name, move in moves]
        for label, _ in columns:
            sizes.add_column(label, justify="right")
        labels = sorted({label for _, column in columns for label in column}, key=lambda x: int(x[4:]))
        for label in labels:
            sizes.add_row(label, *[_mb(column.get(label)) for _, column in columns])
        console.print(sizes)
    load = cluster.get("load")
    if load:
        lt = Table(title=f"Producer during the moves: produce_batch of {load['batch']} records, {load['window_batches']} "
                         f"in flight, acks={load['acks']}, "
                         + ("as fast as it goes" if load["rate"] is None else f"paced to {load['rate']:,} records/s"))
        for name in ("window", "seconds", "records/s", "batch p50 ms", "batch p99 ms", "batch max ms",
                     "longest stall s", "failed batches"):
            lt.add_column(name, justify="left" if name in ("window", "failed batches") else "right")
        for name, move in moves:
            for key, label in (("load_before", f"{LOAD_BEFORE_S:.0f} s before the {name}"),
                               ("load_during", f"during the {name}")):
                w = move.get(key)
                if not w:
                    continue
                lat = w.get("batch_latency", {})
                lt.add_row(label, f"{w['seconds']:.2f}", _fmt_rate(w["records_per_s"]),
                           *[f"{lat[k] / 1000:.1f}" if k in lat else "" for k in ("p50_us", "p99_us", "max_us")],
                           f"{w['longest_stall_s']:.2f}",
                           ", ".join(f"{k} {v}" for k, v in w["failed_batches"].items()) or "none")
        console.print(lt)
    _print_cpu(console, [("preload (acks=quorum)", preload or {})] + [(name, move) for name, move in moves])
    _print_load_warning(console, report)
    for name, move in moves:
        if move.get("done_s") is not None:
            console.print(f"{name}: moved partitions {move['moved']}, the ring predicts {move['predicted_moved']}; "
                          f"replica lists in ring order {move['replicas_in_ring_order']}/{cluster['partitions']}, "
                          f"leaders at the ring owner {move['leaders_at_ring_owner']}/{cluster['partitions']}; "
                          f"status polls {move['status_polls']} (every {REBALANCE_POLL_S} s), failed "
                          f"{move['status_failures']}")
    leave = cluster.get("leave", {})
    if "skipped" in leave:
        console.print(f"[yellow]leave not measured: {leave['skipped']}[/yellow]")
    v = cluster.get("verification")
    if v is not None:
        console.print(f"verification: high watermarks sum {v['high_watermark_sum']:,}, acknowledged "
                      f"{v['acknowledged']:,} (+ {v['unknown_fate']:,} of unknown fate) -> "
                      f"{'OK' if v['ok'] else 'MISMATCH'}")
    for error in report["errors"]:
        console.print(f"[red]not measured / failed: {error}[/red]")


def _cluster_label(cluster: dict[str, Any], node_id: str | None) -> str:
    ids = cluster.get("node_ids", [])
    return f"node{ids.index(node_id) + 1}" if node_id in ids else str(node_id)


def _print_cpu_per_request(console: Any, single: dict, cluster: dict) -> None:
    """Issue #18 item 1: CPU µs per synchronous produce, per process (user + system, from the kernel)."""
    from rich.table import Table

    rows = [("1 node, acks=leader", single.get("produce", {}))]
    rows += [(f"{cluster['nodes']} nodes, acks={acks}", phase.get("produce", {}))
             for acks, phase in cluster.get("acks", {}).items()]
    for acks, phase in cluster.get("acks", {}).items():
        one = phase.get("produce_partition0", {})
        if one.get("cpu_us_per_request") and one.get("leader"):
            per = one["cpu_us_per_request"]
            roles = {name: ("leader" if name == one["leader"] else "follower") for name in per if name.startswith("node")}
            labelled = {f"{name} ({roles[name]})" if name in roles else name: us for name, us in per.items()}
            rows.append((f"{cluster['nodes']} nodes, acks={acks}, partition 0 only (p50 {one['p50_us']:.0f} µs)",
                         {"cpu_us_per_request": labelled}))
    rows = [(label, sync["cpu_us_per_request"]) for label, sync in rows if sync.get("cpu_us_per_request")]
    if not rows:
        return
    table = Table(title="Synchronous produce: CPU µs per request by process (each node leads 1/N of the "
                        "partitions and follows the rest)")
    table.add_column("run")
    table.add_column("CPU µs per request")
    for label, per in rows:
        table.add_row(label, ", ".join(f"{name} {us:.0f}" for name, us in per.items()))
    console.print(table)


def _print_batch_vs_async(console: Any, cluster: dict) -> None:
    """Issue #18 item 3: produce_async in a tight loop against produce_batch, alternating rounds."""
    from rich.table import Table

    phases = [(acks, phase["batch_vs_async"]) for acks, phase in cluster.get("acks", {}).items()
              if "batch_vs_async" in phase]
    if not phases:
        return
    table = Table(title=f"produce_async (tight loop, one thread, then flush) vs produce_batch, "
                        f"{cluster['nodes']} nodes, replication factor {cluster['replication_factor']} "
                        "(alternating rounds; median (min-max))")
    for name, right in (("acks", False), ("run", False), ("records/s", True), ("wall µs/rec", True),
                        ("CPU µs/rec (all procs)", True), ("async ÷ batch", True)):
        table.add_column(name, justify="right" if right else "left")
    for acks, result in phases:
        if "error" in result:
            table.add_row(acks, f"[red]{result['error']}[/red]", "", "", "", "")
            continue
        for name in ("produce_batch", "produce_async"):
            run = result[name]
            ratio = (f"{result['ratio']:.1%} ({result['ratio_min']:.1%}-{result['ratio_max']:.1%})"
                     if name == "produce_async" else "")
            table.add_row(acks, name,
                          f"{_fmt_rate(run['records_per_s'])} ({_fmt_rate(run['min_records_per_s'])}-"
                          f"{_fmt_rate(run['max_records_per_s'])})",
                          f"{run['wall_us_per_record']:.2f}", f"{run['cpu_us_per_record'].get('all', 0):.2f}", ratio)
    console.print(table)
