"""``meshq`` output: records as JSON lines, progress on a terminal, rich tables for status and topics."""

from __future__ import annotations

import base64
import sys
import time
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def _text_or_b64(data: bytes | None, name: str, out: dict) -> None:
    if data is None:
        out[name] = None
        return
    try:
        out[name] = data.decode("utf-8")
    except UnicodeDecodeError:
        out[f"{name}_b64"] = base64.b64encode(data).decode("ascii")


def record_to_json(record: Any) -> dict:
    """The ``meshq consume --json`` shape of one record."""
    out: dict[str, Any] = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
    _text_or_b64(record.key, "key", out)
    _text_or_b64(record.value, "value", out)
    out["timestamp_ms"] = record.timestamp_ms
    headers: dict[str, str] = {}
    headers_b64: dict[str, str] = {}
    for name, value in record.headers.items():
        try:
            headers[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            headers_b64[name] = base64.b64encode(value).decode("ascii")
    out["headers"] = headers
    if headers_b64:
        out["headers_b64"] = headers_b64
    return out


class _RateColumn(ProgressColumn):
    """``12,345/s``: the task's recent rate (rich's own speed column counts bytes)."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f}/s" if task.speed else "", style="progress.data.speed")


class TerminalBar:
    """A rich progress bar on stderr, only when stderr is a terminal (``enabled``): scripts, pipes
    and ``--json`` output never see it. With no ``total`` it shows a count and a rate."""

    def __init__(self, description: str, total: float | None = None, unit: str = "records",
                 enabled: bool | None = None, console: Console | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.progress: Progress | None = None
        if not self.enabled:
            return
        columns: list[Any] = [TextColumn("{task.description}"), BarColumn(),
                              TextColumn(f"{{task.completed:,.0f}}{{task.fields[of]}} {unit}"), _RateColumn(),
                              TimeElapsedColumn()]
        self.progress = Progress(*columns, console=console or Console(stderr=True), transient=False)
        self.task = self.progress.add_task(description, total=total, of=self._of(total))
        self.progress.start()

    @staticmethod
    def _of(total: float | None) -> str:
        return "" if total is None else f"/{total:,.0f}"

    def update(self, completed: float, total: float | None = None, description: str | None = None) -> None:
        if self.progress is None:
            return
        fields: dict[str, Any] = {"completed": completed}
        if total is not None:
            fields.update(total=total, of=self._of(total))
        if description is not None:
            fields["description"] = description
        self.progress.update(self.task, **fields)

    def close(self, completed: float | None = None) -> None:
        if self.progress is None:
            return
        if completed is not None:
            self.progress.update(self.task, completed=completed)
        self.progress.stop()
        self.progress = None


class _LeaveProgress:
    """What a leaving node reports, for a person: a bar of the partitions moved away from it on a
    terminal (stderr); otherwise, unless ``quiet`` (``--json``), a line on stdout when the count of
    partitions still naming it changes, and at least every 10 s; errors while retrying when they change."""

    def __init__(self, quiet: bool = False, bar: TerminalBar | None = None) -> None:
        self.quiet = quiet
        self.bar = bar if bar is not None else TerminalBar("moving partitions away", unit="partitions")
        self.last: tuple | None = None
        self.printed_s = 0.0
        self.first_assigned: int | None = None
        self.reports: list[dict] = []

    def __call__(self, answer: dict) -> None:
        self.reports.append(answer)
        if answer["state"] == "retrying":
            key: tuple = ("retrying", answer["error"])
            line = f"waiting for the cluster: {answer['error']}"
            self.bar.update(self.bar_done(), description="waiting for the cluster")
        elif answer["state"] == "left":
            if self.first_assigned is not None:
                self.bar.update(self.first_assigned)
            return
        else:
            key = ("draining", answer["assigned"])
            line = f"draining: {answer['assigned']} partition(s) still assigned"
            if self.first_assigned is None:
                self.first_assigned = answer["assigned"]
            self.bar.update(self.bar_done(answer["assigned"]), total=self.first_assigned,
                            description="moving partitions away")
        now = time.monotonic()
        if key != self.last or now - self.printed_s >= 10.0:
            self.last, self.printed_s = key, now
            if not self.quiet and not self.bar.enabled:
                print(line, flush=True)

    def bar_done(self, assigned: int | None = None) -> int:
        """Partitions moved so far (of the count the first answer named)."""
        if self.first_assigned is None:
            return 0
        if assigned is None:
            assigned = next((r["assigned"] for r in reversed(self.reports) if "assigned" in r), self.first_assigned)
        return max(0, self.first_assigned - assigned)

    def close(self) -> None:
        self.bar.close()


def render_status(status: dict, console: Console | None = None) -> None:
    """``meshq status`` for a person: one table per section, readable at 80 columns.

    No cell is ever cut short: lists of node ids are space-separated, so a narrow terminal
    wraps them one per line instead of truncating them, and long words fold.
    """
    console = console or Console()
    members = status["members"]
    storage = [m for m in members if m["role"] == "storage"]
    clients = [m for m in members if m["role"] != "storage"]
    console.print(f"[bold]cluster[/bold] {escape(status['cluster'])}: {len(storage)} storage member(s), "
                  f"answered by {escape(' '.join(status.get('answered_by') or [status.get('node_id', '?')]))}")
    _print_members(console, storage, clients)
    _print_partitions(console, status)
    _print_groups(console, status.get("groups", []))
    _print_subscriptions(console, status.get("pubsub", {}).get("nodes", []))
    _print_services(console, status)


_IDS = "ids"  # a column of node ids: no_wrap, so that rich narrows the other columns, never an id


def _table(title: str, *columns: str | tuple[str, str], rows_apart: bool = False) -> Table:
    """A compact table; ``(header, "right")`` right-aligns a numeric column, ``(header, _IDS)`` holds
    node ids. Every column is labelled; text folds rather than being cut with an ellipsis."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False,
                  show_edge=False, show_lines=rows_apart)
    for column in columns:
        header, kind = column if isinstance(column, tuple) else (column, "left")
        assert header, "every column has a header"
        table.add_column(header, justify="right" if kind == "right" else "left", overflow="fold",
                         no_wrap=kind == _IDS)
    return table


def _ids(ids: list[str]) -> str:
    """Node ids one per line: an id column is never wrapped or cut inside an id (``_IDS``)."""
    return "\n".join(ids) if ids else "-"


def _print_members(console: Console, storage: list[dict], clients: list[dict]) -> None:
    table = _table("members", ("node id", _IDS), "address", "role", "state")
    gone = 0
    for member in storage + clients:
        if member["role"] != "storage" and member["state"] != "alive":
            gone += 1  # a client that ended: counted, not listed
            continue
        state = member["state"]
        style = {"alive": "green", "suspect": "yellow"}.get(state, "red")
        shown = f"[{style}]{escape(state)}[/{style}]"
        if member.get("storage_full"):
            shown += "\n[red]disk full:\nrefusing writes[/red]"
        table.add_row(escape(member["node_id"]), escape(member["address"].removeprefix("tcp://")), member["role"],
                      shown)
    console.print(table)
    if gone:
        console.print(f"[dim]{gone} client(s) that ended are not listed[/dim]")


def _print_partitions(console: Console, status: dict) -> None:
    table = _table("partitions", "topic/part", ("leader", _IDS), "epoch", ("replicas", _IDS), ("in sync", _IDS),
                   ("high\nwatermark", "right"), rows_apart=any(len(p["replicas"]) > 1 for t in status["topics"]
                                                                 for p in t["partitions"]))
    troubled: list[str] = []
    shown = 0
    for topic in status["topics"]:
        if topic["name"].startswith("__"):
            continue  # internal topics (e.g. committed offsets) are in --json output
        for p in topic["partitions"]:
            shown += 1
            name = f"{topic['name']}/{p['partition']}"
            known = p["in_sync"] is not None  # None: its leader did not answer the status request
            missing = [n for n in p["replicas"] if n not in p["in_sync"]] if known else []
            style = ""
            if p["leader"] is None:
                style = "bold red"
                troubled.append(f"{name} (no leader)")
            elif missing:
                style = "bold yellow"
                troubled.append(f"{name} ({len(p['in_sync'])} of {len(p['replicas'])} in sync)")
            replicas = escape(_ids(p["replicas"]))
            moving = handoff_note(p)
            if moving:
                replicas = f"{replicas}\n{moving}"
            in_sync = escape(_ids(p["in_sync"])) if known else "[dim]unknown[/dim]"
            if not known and p["leader"] is not None:
                troubled.append(f"{name} (in-sync set unknown: its leader {p['leader']} did not answer)")
            if missing:
                in_sync = f"{in_sync}\n[red]{len(p['in_sync'])} of {len(p['replicas'])}[/red]"
            table.add_row(escape(name), escape(p["leader"] or "none"), str(p.get("epoch", "-")), replicas, in_sync,
                          str(p["high_watermark"]), style=style)
    if shown:
        console.print(table)
    else:
        console.print("[dim]no topics yet[/dim]")
    if troubled:
        console.print(f"[yellow]{len(troubled)} partition(s) under-replicated, leaderless or unknown: "
                      f"{escape(', '.join(troubled))}[/yellow]")
    rebuilt = [rebuilt_note(f"{topic['name']}/{p['partition']}", p["rebuilt"])
               for topic in status["topics"] for p in topic["partitions"] if p.get("rebuilt")]
    if rebuilt:
        console.print(f"[bold red]{len(rebuilt)} partition(s) rebuilt empty after every replica was removed for "
                      f"good: {escape('; '.join(rebuilt))}[/bold red]")
    if status.get("handoffs"):
        console.print(f"[cyan]{status['handoffs']} handoff(s) in progress: partitions moving to their ring "
                      f"placement after a membership change[/cyan]")


def rebuilt_note(name: str, rebuilt: dict) -> str:
    """One rebuilt partition in words (``status`` ``rebuilt``: docs/operations.md)."""
    lost = ", ".join(f"{a}..{b}" for a, b in rebuilt["lost_offsets"]) or "none known"
    return f"{name} from offset {rebuilt['start_offset']} (lost: {lost})"


def _group_line(group: dict) -> str:
    """``stream, stable, 2 members`` — what the group's coordinator (or its shared leaders) reported."""
    parts = [group.get("mode", "stream")]
    if group.get("state"):
        parts.append(group["state"])
    if "members" in group:
        count = len(group["members"])
        parts.append(f"{count} member{'' if count == 1 else 's'}")
    return ", ".join(parts)


def _print_groups(console: Console, groups: list[dict]) -> None:
    stream = [g for g in groups if g.get("mode") != "shared"]
    shared = [g for g in groups if g.get("mode") == "shared"]
    if stream:
        table = _table("consumer groups (lag = high watermark - committed offset)", "group", "topic/part",
                       ("committed", "right"), ("high\nwatermark", "right"), ("lag", "right"))
        for group in stream:
            _group_rows(table, group, ("committed", "high_watermark", "lag"))
        console.print(table)
    if shared:
        table = _table("shared groups (ack floor: every record below it is done)", "group", "topic/part",
                       ("ack\nfloor", "right"), ("lag", "right"), ("in\nflight", "right"), ("delayed", "right"),
                       ("re-\ndelivered", "right"), ("dead\nletters", "right"))
        for group in shared:
            _group_rows(table, group, ("committed", "lag", "in_flight", "delayed", "redelivered", "dead_lettered"))
        console.print(table)


def _group_rows(table: Table, group: dict, fields: tuple[str, ...]) -> None:
    partitions = group["partitions"]
    # the group's name on its first row, what its coordinator reported on the second
    labels = [escape(group["group"]), f"[dim]{escape(_group_line(group))}[/dim]"]
    if len(partitions) < 2:
        labels = ["\n".join(labels)]
    if not partitions:
        table.add_row(labels[0], "-", *("-" for _ in fields), end_section=True)
        return
    for index, p in enumerate(partitions):
        table.add_row(labels[index] if index < len(labels) else "", escape(f"{p['topic']}/{p['partition']}"),
                      *(str(p.get(field, "-")) for field in fields), end_section=len(partitions) == 1)
    if len(partitions) > 1:  # the group's totals (a sum of offsets means nothing: only counts are summed)
        totals = [str(sum(p.get(field, 0) for p in partitions)) if field not in ("committed", "high_watermark")
                  else "" for field in fields]
        table.add_row("", "[bold]total[/bold]", *(f"[bold]{t}[/bold]" if t else "" for t in totals),
                      end_section=True)


def _print_subscriptions(console: Console, nodes: list[dict]) -> None:
    rows = [(node["node_id"], sub) for node in nodes for sub in node.get("subscriptions", [])]
    if not rows:
        return
    table = _table("subscriptions (pub/sub)", "pattern", "queue group", ("node", _IDS), ("delivered", "right"),
                   ("dropped", "right"))
    for node_id, sub in rows:
        dropped = str(sub["dropped"])
        table.add_row(escape(sub["pattern"]), escape(sub["queue"] or "-"), escape(node_id), str(sub["delivered"]),
                      f"[yellow]{dropped}[/yellow]" if sub["dropped"] else dropped)
    console.print(table)
    dropped_from_peers = sum(peer["dropped"] for node in nodes for peer in node.get("peers", []))
    if dropped_from_peers:
        console.print(f"[yellow]{dropped_from_peers} pub/sub message(s) lost on the way between nodes "
                      f"(status --json: pubsub.nodes[].peers)[/yellow]")


def _print_services(console: Console, status: dict) -> None:
    counts: dict[str, list[dict]] = {}
    for service in status.get("services", []):
        counts.setdefault(service["service"], []).append(service)
    instances: dict[str, list[str]] = {name: list(ids) for name, ids in status.get("service_instances", {}).items()}
    for name, reports in counts.items():
        known = instances.setdefault(name, [])
        known.extend(r["node_id"] for r in reports if r["node_id"] not in known)
    if not instances:
        return
    table = _table("services (request/reply)", "service", ("instances", _IDS), ("in\nflight", "right"),
                   ("served", "right"), ("errors", "right"), ("p99\nms", "right"))
    partial = False
    for name in sorted(instances):
        reports = counts.get(name, [])
        partial |= len(reports) < len(instances[name])
        errors = sum(r["errors"] for r in reports)
        p99 = [r["p99_ms"] for r in reports if r.get("p99_ms") is not None]
        table.add_row(escape(name), escape(_ids(sorted(instances[name]))), str(sum(r["in_flight"] for r in reports)),
                      str(sum(r["served"] for r in reports)), f"[red]{errors}[/red]" if errors else "0",
                      f"{max(p99):.3g}" if p99 else "-")
    console.print(table)
    if partial:
        console.print("[dim]counts are those of the instances that answered status (storage nodes and this "
                      "client); other instances keep their own (meshq status --node ID)[/dim]")


def handoff_note(p: dict) -> str:
    """Lines ``+d`` for each member a partition is being copied to and ``-c`` for each replica
    leaving it (one per line, like the replica ids above them); empty if settled."""
    target = p.get("target", p["replicas"])
    adding = [n for n in target if n not in p["replicas"]]
    dropping = [n for n in p["replicas"] if n not in target]
    if not adding and not dropping and not p.get("learners") and target == p["replicas"]:
        return ""
    lines = [f"+{escape(n)}" for n in adding] + [f"-{escape(n)}" for n in dropping]
    return f"[cyan]{chr(10).join(lines) or 'new leader'}[/cyan]"


def render_topic(described: dict) -> None:
    console = Console()
    console.print(
        f"[bold]{described['name']}[/bold] partitions={described['partitions']} "
        f"replication_factor={described['replication_factor']} retention_ms={described['retention_ms']} "
        f"retention_bytes={described['retention_bytes']} cleanup_policy={described['cleanup_policy']}"
    )
    table = Table()
    for column in ("partition", "leader", "replicas", "in_sync", "high_watermark"):
        table.add_column(column)
    for p in described["partitions_detail"]:
        table.add_row(str(p["partition"]), str(p["leader"]), ",".join(p["replicas"]), ",".join(p["in_sync"]) if p["in_sync"] is not None else "unknown",
                      str(p["high_watermark"]))
    console.print(table)
