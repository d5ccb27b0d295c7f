"""What ``meshq bench`` prints besides the reports' own tables: progress lines and the pieces the renderers share.

Theory of operation
-------------------
``_progress`` writes one line on stderr per step of a long run, and ``_RoundsBar`` shows a bar of
the rounds done, only when stderr is a terminal, so ``--json`` output and pipes stay clean. The renderers (report.py) share the machine line, the
CPU table, the load warning and the rate formats written here; rich is imported only when
something is printed with it.
"""

from __future__ import annotations

import shutil
import sys
from typing import Any


def _progress(message: str) -> None:
    """One line on stderr per step of a long run, only when stderr is a terminal."""
    if sys.stderr.isatty():
        print(f"meshq bench: {message}", file=sys.stderr, flush=True)


class _RoundsBar:
    """A progress bar of a benchmark's rounds on stderr, only when stderr is a terminal (``--json`` output on
    stdout and pipes never see it); ``advance()`` after each round, ``close()`` at the end."""

    def __init__(self, description: str, total: int) -> None:
        from meshq.cli.output import TerminalBar

        self.done = 0
        self.bar = TerminalBar(description, total=total, unit="rounds")

    def advance(self) -> None:
        self.done += 1
        self.bar.update(self.done)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> _RoundsBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def _runs_text(row: dict) -> str:
    """Every timed run's rate, e.g. ``1.62M / 1.31M / 1.42M``."""
    return " / ".join(f"{r / 1e6:.2f}M" for r in row.get("runs_records_per_s", [])) or "1 run"


def _wide_console(scenario: str, machine: dict[str, Any]) -> Any:
    """A rich console at least 160 columns wide — the terminal's width on a wide terminal, else 160
    (the replication and rebalance tables need it; a pipe gets 160 too) — that has printed the
    scenario's machine line."""
    from rich.console import Console

    wide = sys.stdout.isatty() and shutil.get_terminal_size().columns >= 160
    console = Console(width=None if wide else 160)
    _print_machine(console, scenario, machine)
    return console


def _print_machine(console: Any, scenario: str, machine: dict[str, Any]) -> None:
    console.print(f"[bold]meshq bench {scenario}[/bold]  {machine['nproc']} CPU x {machine['cpu']}, Python "
                  f"{machine['python']}, pyzmq {machine['pyzmq']} / libzmq {machine['libzmq']}, msgpack "
                  f"{machine['msgpack']}")


def _print_cpu(console: Any, rows: list[tuple[str, dict]]) -> None:
    """The CPU table of the timed runs (``rows``: label, phase result with an optional ``cpu``)."""
    from rich.table import Table

    cpu = Table(title="CPU during the timed runs (% of one core; threads >= 1 %)")
    cpu.add_column("run")
    cpu.add_column("ours", justify="right")
    cpu.add_column("other procs", justify="right")
    cpu.add_column("process: thread cpu%")
    for label, row in rows:
        info = row.get("cpu")
        if info:
            cpu.add_row(label, f"{info.get('ours_percent', 0):.0f}", f"{info.get('other_percent', 0):.0f}",
                        ", ".join(f"{t['process']}: {t['thread']} {t['cpu_percent']:.0f}" for t in info["threads"]))
    console.print(cpu)


def _print_targets(console: Any, title: str, rows: list[tuple[str, str, bool | None]]) -> None:
    """A table of targets: (name, measured, met: True / False / None for not measured)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("target")
    table.add_column("measured", justify="right")
    table.add_column("met")
    for name, measured, met in rows:
        table.add_row(name, measured, {True: "[green]yes[/green]", False: "[red]no[/red]", None: "not measured"}[met])
    console.print(table)


def _print_load_warning(console: Any, report: dict[str, Any]) -> None:
    idle = report.get("machine_load_before_cores")
    if idle is not None and idle > 0.2:
        console.print(f"[yellow]warning: other processes used {idle:.2f} cores just before the run "
                      f"(see 'other procs' above); on a {report['machine']['nproc']}-core machine the figures "
                      "are pessimistic[/yellow]")
