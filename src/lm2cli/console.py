"""Output conventions: human logs and progress on stderr, machine summaries on stdout.

Progress bars are Rich bars on a TTY and plain periodic log lines otherwise, so CI logs stay readable.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def log(msg: str) -> None:
    err.print(msg, markup=False) if not err.is_terminal else err.print(msg)


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {msg}" if err.is_terminal else f"warning: {msg}", markup=err.is_terminal)


def print_json(obj: Any) -> None:
    from .layout import to_jsonable

    sys.stdout.write(json.dumps(to_jsonable(obj), ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


class _PlainTask:
    """A progress task that logs a line at most every `every` seconds (non-TTY output)."""

    def __init__(self, desc: str, total: float | None, every: float = 10.0):
        self.desc, self.total, self.done, self.every = desc, total, 0.0, every
        self.last = time.monotonic()
        self.info = ""

    def advance(self, n: float = 1, info: str = "") -> None:
        self.done += n
        if info:
            self.info = info
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            tot = f"/{self.total:g}" if self.total else ""
            log(f"{self.desc}: {self.done:g}{tot} {self.info}".rstrip())

    def finish(self) -> None:
        tot = f"/{self.total:g}" if self.total else ""
        log(f"{self.desc}: {self.done:g}{tot} done {self.info}".rstrip())


class _RichTask:
    def __init__(self, progress: Progress, desc: str, total: float | None):
        self.progress = progress
        self.id = progress.add_task(desc, total=total, info="")

    def advance(self, n: float = 1, info: str = "") -> None:
        self.progress.update(self.id, advance=n, info=info)

    def finish(self) -> None:
        pass


@contextmanager
def progress(desc: str, total: float | None = None) -> Iterator[Any]:
    """`with progress("tokenize", total=n) as task: task.advance(k, info="...")`."""
    if err.is_terminal:
        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=err,
            transient=False,
        )
        with bar:
            yield _RichTask(bar, desc, total)
    else:
        task = _PlainTask(desc, total)
        yield task
        task.finish()
