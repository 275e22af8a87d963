"""What every command prints with: `Printer` (rich on a terminal, plain text otherwise), the
progress bar, JSON documents and arrays.

`stdout_is_terminal` and `progress` are the seams the tests replace: look them up on this
module (`_output.progress`), never import them by name.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

PROGRESS_MIN_STEPS = 200  # checks shorter than this show no progress bar
ARRAY_PRINT_MAX = 36  # explain prints arrays up to this many elements in full
WRAP_WIDTH = 100  # plain-text lines are wrapped at this width


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


class Printer:
    """Plain text, or rich markup on a terminal (never under NO_COLOR, never without rich)."""

    def __init__(self, use_rich: bool | None = None) -> None:
        if use_rich is None:
            use_rich = stdout_is_terminal() and not os.environ.get("NO_COLOR")
        self.console: Any = None
        if use_rich:
            try:
                from rich.console import Console
            except ImportError:
                pass
            else:
                self.console = Console(highlight=False)

    def _emit(self, text: str, style: str | None = None) -> None:
        if self.console is None:
            print(_wrap(text))
        else:
            from rich.markup import escape

            self.console.print(f"[{style}]{escape(text)}[/]" if style else escape(text))

    def title(self, text: str) -> None:
        if self.console is None:
            print(f"\n== {text} ==")
        else:
            self.console.rule(f"[bold]{text}")

    def line(self, text: str = "") -> None:
        self._emit(text)

    def dim(self, text: str) -> None:
        self._emit(text, "dim")

    def verdict(self, ok: bool, text: str) -> None:
        label = "PASS" if ok else "FAIL"
        self._emit(f"{label}  {text}", "bold green" if ok else "bold red")


def _wrap(text: str, width: int = WRAP_WIDTH) -> str:
    from ..check._report import wrap

    return wrap(text, width)


@contextmanager
def progress(enabled: bool, description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A `progress(done, total)` callback drawing a rich bar on stderr for long checks.

    Plain (non-terminal, NO_COLOR, --json, or no rich): no callback, no output.
    """
    if not enabled or not sys.stderr.isatty() or os.environ.get("NO_COLOR"):
        yield None
        return
    try:
        from rich.console import Console
        from rich.progress import Progress
    except ImportError:
        yield None
        return
    bar = Progress(console=Console(stderr=True), transient=True)
    task: list[Any] = []

    def update(done: int, total: int) -> None:
        if total < PROGRESS_MIN_STEPS:
            return
        if not task:
            bar.start()
            task.append(bar.add_task(description, total=total))
        bar.update(task[0], completed=done, total=total)

    try:
        yield update
    finally:
        if task:
            bar.stop()


def print_json(doc: Any) -> None:
    from ..check._report import jsonable  # strict JSON: NaN and infinities become null

    print(json.dumps(jsonable(doc), indent=2, allow_nan=False))


def short_float(v: float) -> str:
    """Three significant digits, as every max |diff| is printed."""
    return f"{v:.3g}"


def format_array(a: np.ndarray) -> str:
    a = np.asarray(a)
    a = np.where(np.round(a, 6) == 0, 0.0, a)  # no "-0." for rounding noise below 6 decimals
    if a.size <= ARRAY_PRINT_MAX:
        flat = a.reshape(-1) if a.size == 1 else a
        with np.printoptions(precision=6, suppress=True, linewidth=96):
            return np.array2string(np.squeeze(flat) if a.size == 1 else flat)
    return (
        f"shape {'x'.join(map(str, a.shape))}: min {a.min():.6g}, max {a.max():.6g}, "
        f"mean {a.mean():.6g}"
    )


def indented(out: Printer, text: str, n: int = 2) -> None:
    for line in text.splitlines():
        out.line(" " * n + line)
