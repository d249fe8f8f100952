"""What a run reports while it trains: a rich progress bar, the per-epoch CSV log, TensorBoard when installed."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

from crosssite.ioutil import atomic_write_text

__all__ = ["ProgressBar", "write_log_csv", "TensorBoard"]


class ProgressBar:
    """A rich progress bar over the optimiser steps of the run (loss, images/s, ETA).

    With ``enabled`` False nothing is shown or printed. On a stdout that is not a terminal there is no bar, and
    `print` writes plain lines (one per epoch), which suits log files.
    """

    def __init__(self, total_steps: int, done_steps: int, enabled: bool = True, description: str = "train") -> None:
        self._progress = None
        self._echo = enabled
        if not (enabled and sys.stdout.isatty()):
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self._task = self._progress.add_task(description, total=total_steps, completed=done_steps, status="")
        self._progress.start()

    def update(self, step: int, status: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=status)

    def print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, highlight=False)
        elif self._echo:
            print(text, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def write_log_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite ``log.csv`` (one row per epoch) atomically; columns are the union of the rows' keys, in order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


class TensorBoard:
    """Scalars to ``out_dir/tb`` through `torch.utils.tensorboard` when the `tensorboard` package is installed."""

    def __init__(self, log_dir: Path, enabled: bool = True) -> None:
        self._writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
