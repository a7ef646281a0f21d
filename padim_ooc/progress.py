"""Progress bars (rich) with an images-per-second column, on stderr."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Images per second."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("  -- img/s" if speed is None else f"{speed:7.1f} img/s", style="progress.data.speed")


@contextmanager
def bar(description: str, total: int, *, enabled: bool = True):
    """A progress bar; yields ``advance(n)``. Disabled: a no-op."""
    if not enabled:
        yield lambda n=1: None
        return
    console = Console(file=sys.stderr)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
