"""Progress bars for long loops (rich, on stderr so stdout stays clean for data)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
console = Console(stderr=True)  # bars and messages share it, so messages print above live bars


def enabled() -> bool:
    """False when XCTSAM_NO_PROGRESS is set (logs, CI)."""
    return not os.environ.get("XCTSAM_NO_PROGRESS")


def progress_bar(*extra: ProgressColumn) -> Progress:
    """The project's bar: description, bar, done/total, `extra` columns, elapsed, remaining."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra, TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=False)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar; XCTSAM_NO_PROGRESS=1 silences it."""
    if not enabled():
        yield from items
        return
    with progress_bar() as progress:
        yield from progress.track(items, total=total, description=description)
