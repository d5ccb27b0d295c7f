"""``meshq`` output: records as JSON lines, progress on a terminal, rich tables for status and topics."""

from __future__ import annotations

import base64
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table


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


class _Progress:
    """A progress line on stderr, only when stderr is a terminal."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.enabled = sys.stderr.isatty()
        self.last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.enabled and (force or now - self.last > 0.2):
            self.last = now
            sys.stderr.write(f"\r{self.what}: {done:,}")
            sys.stderr.flush()

    def close(self, done: int) -> None:
        if self.enabled:
            self.update(done, force=True)
            sys.stderr.write("\n")


class _LeaveProgress:
    """Prints what a leaving node reports: when the count of partitions still naming it changes,
    and at least every 10 s; errors while retrying when they change."""

    def __init__(self) -> None:
        self.last: tuple | None = None
        self.printed_s = 0.0

    def __call__(self, answer: dict) -> None:
        if answer["state"] == "retrying":
            key: tuple = ("retrying", answer["error"])
            line = f"waiting for the cluster: {answer['error']}"
        elif answer["state"] == "left":
            return
        else:
            key = ("draining", answer["assigned"])
            line = f"draining: {answer['assigned']} partition(s) still assigned"
        now = time.monotonic()
        if key != self.last or now - self.printed_s >= 10.0:
            self.last, self.printed_s = key, now
            print(line, flush=True)


def render_status(status: dict) -> None:
    console = Console()
    console.print(f"[bold]cluster[/bold] {status['cluster']}  (answered by {status.get('node_id', '?')})")
    members = Table(title="members")
    for column in ("node_id", "address", "role", "state", "disk"):
        members.add_column(column)
    disk_text = {True: "[red]FULL: refusing writes[/red]", False: "ok", None: ""}
    for member in status["members"]:
        members.add_row(member["node_id"], member["address"], member["role"], member["state"],
                        disk_text.get(member.get("storage_full"), ""))
    console.print(members)
    partitions = Table(title="partitions")
    for column in ("topic", "partition", "leader", "epoch", "replicas", "in_sync", "high_watermark", ""):
        partitions.add_column(column)
    under = 0
    for topic in status["topics"]:
        if topic["name"].startswith("__"):
            continue  # internal topics (e.g. committed offsets) are in --json output
        for p in topic["partitions"]:
            note = ""
            if p["leader"] is None:
                note = "[red]no leader[/red]"
            elif len(p["in_sync"]) < len(p["replicas"]):
                note = "[yellow]under-replicated[/yellow]"
            under += bool(note)
            moving = handoff_note(p)
            if moving:
                note = f"{note} {moving}".strip()
            partitions.add_row(topic["name"], str(p["partition"]), str(p["leader"]), str(p.get("epoch", "")),
                               ",".join(p["replicas"]), ",".join(p["in_sync"]), str(p["high_watermark"]), note)
    console.print(partitions)
    if under:
        console.print(f"[yellow]{under} partition(s) without a leader or with replicas out of sync[/yellow]")
    if status.get("handoffs"):
        console.print(f"[cyan]{status['handoffs']} handoff(s) in progress: partitions moving to their ring "
                      f"placement after a membership change[/cyan]")
    if status.get("groups"):
        groups = Table(title="consumer groups")
        for column in ("group", "topic", "partition", "committed", "high_watermark", "lag"):
            groups.add_column(column)
        shared = any(group.get("mode") == "shared" for group in status["groups"])
        if shared:  # shared groups: "committed" is the ack floor (every record below it is done)
            for column in ("in_flight", "delayed", "redelivered", "dead_lettered"):
                groups.add_column(column)
        for group in status["groups"]:
            for p in group["partitions"]:
                extra = [str(p.get(k, "")) for k in ("in_flight", "delayed", "redelivered", "dead_lettered")]
                groups.add_row(group["group"], p["topic"], str(p["partition"]), str(p["committed"]),
                               str(p["high_watermark"]), str(p["lag"]), *(extra if shared else ()))
        console.print(groups)


def handoff_note(p: dict) -> str:
    """``moving +d -c`` for a partition being copied to d while c is still a replica; empty if settled."""
    target = p.get("target", p["replicas"])
    adding = [n for n in target if n not in p["replicas"]]
    dropping = [n for n in p["replicas"] if n not in target]
    if not adding and not dropping and not p.get("learners") and target == p["replicas"]:
        return ""
    parts = [f"+{n}" for n in adding] + [f"-{n}" for n in dropping]
    return f"[cyan]moving {' '.join(parts) or '(new preferred leader)'}[/cyan]"


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
        table.add_row(str(p["partition"]), str(p["leader"]), ",".join(p["replicas"]), ",".join(p["in_sync"]),
                      str(p["high_watermark"]))
    console.print(table)
