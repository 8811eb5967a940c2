"""Terminal output: progress bars on stderr when it is a terminal, nothing when it is not."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

# Under `--mp N` the ranks' stderr is a pipe to the launching process, which ends on a terminal.
stderr = Console(stderr=True, highlight=False, force_terminal=True if os.environ.get("CPMGEN_STDERR_TTY") else None)
stdout = Console(highlight=False, soft_wrap=True)


def silence() -> None:
    """Model-parallel ranks other than 0 show nothing but errors (printed by cli.main)."""
    stderr.quiet = True
    stdout.quiet = True


@contextlib.contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield an `advance(n)` callback; draws a bar on a terminal, stays silent otherwise."""
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=stderr, transient=True, disable=not stderr.is_terminal)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def warn(message: str) -> None:
    stderr.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)
