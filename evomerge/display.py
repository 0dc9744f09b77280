"""What a person sees of a run: the live progress line and the closing comparison table.

Progress goes to stderr (it redraws in place on a terminal and prints once when the run ends
otherwise), the table to stdout, so ``evomerge run ... > summary.txt`` keeps only the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table


class LiveProgress:
    """A one-line progress display: evaluations, failures, cache hits, best so far, candidates/hour."""

    def __init__(self, name: str, total: int | None, *, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=16),
            TextColumn("{task.completed}/{task.fields[total_text]} evaluations"),
            TextColumn("· best {task.fields[best]}"),
            TextColumn("· {task.fields[failed]} failed, {task.fields[cached]} cached"),
            TextColumn("· {task.fields[rate]}/h"),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._task: TaskID = self._progress.add_task(
            name, total=total, total_text="?" if total is None else str(total), failed=0, cached=0, best="-", rate="-"
        )

    def __enter__(self) -> LiveProgress:
        if self.enabled:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._progress.stop()

    def update(
        self, *, evaluations: int, failed: int, cached: int, best: float | None, best_ticket: int | None, rate: float | None
    ) -> None:
        if not self.enabled:
            return
        self._progress.update(
            self._task,
            completed=evaluations,
            failed=failed,
            cached=cached,
            best="-" if best is None else f"{best:.4f} (#{best_ticket})",
            rate="-" if rate is None else f"{rate:,.0f}",
        )


def summary_table(summary: Mapping[str, Any]) -> Table:
    """The closing table: the best merge vs the sources, the base and the uniform average."""
    columns: Sequence[str] = summary["columns"]
    table = Table()
    table.add_column("model")
    for column in columns:
        table.add_column(column, justify="right")
    for row in summary["rows"]:
        if row["error"] is not None:
            table.add_row(row["label"], f"[red]failed: {row['error']}", *[""] * (len(columns) - 1))
            continue
        table.add_row(row["label"], *(_number(row["objectives"].get(column)) for column in columns))
    return table


def print_summary(summary: Mapping[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    if summary["rows"]:
        console.print(f"[bold]{summary['name']}[/bold]: best merge vs sources on the {summary['split']} split")
        console.print(summary_table(summary))
    else:
        console.print(f"{summary['name']}: no successful candidate to compare")


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4f}"
