"""Progress and messages for long steps: rich bars on a terminal, plain lines elsewhere (CI, logs)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Step:
    def __init__(self, progress: Progress | None, task, label: str, total: float | None, quiet: bool = False) -> None:
        self._progress, self._task, self.label, self.total, self.quiet = progress, task, label, total, quiet
        self._last_print = 0.0

    def update(self, completed: float, total: float | None = None, note: str = "") -> None:
        if total is not None:
            self.total = total
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, total=self.total,
                                  description=f"{self.label} {note}".strip())
        elif not self.quiet and time.monotonic() - self._last_print > 10:  # plain output: a line every 10 s at most
            self._last_print = time.monotonic()
            frac = f" {completed:.0f}/{self.total:.0f}" if self.total else ""
            print(f"  … {self.label}{frac} {note}".rstrip(), file=sys.stderr, flush=True)


class Reporter:
    """What the library tells the user; the CLI makes one, Python callers may pass quiet=True."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)  # log files keep whole lines

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def warn(self, message: str) -> None:
        self.console.print(f"warning: {message}", style="yellow", markup=False)

    @contextlib.contextmanager
    def step(self, label: str, total: float | None = None) -> Iterator[Step]:
        start = time.monotonic()
        if self.quiet or not self.console.is_terminal:
            if not self.quiet:
                print(f"→ {label}", file=sys.stderr, flush=True)
            yield Step(None, None, label, total, quiet=self.quiet)
        else:
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn()]
            with Progress(*columns, console=self.console, transient=True) as progress:
                task = progress.add_task(label, total=total)
                yield Step(progress, task, label, total)
        self.info(f"✓ {label} ({time.monotonic() - start:.1f}s)")
