"""Progress on a terminal for long operations (flushing tens of thousands of objects).

Only when the stream is a terminal: scripts and pipes get the final output alone.  One line,
rewritten in place at most ten times a second, erased when done.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator, TextIO


class Progress:
    """``update(done, total)`` redraws "LABEL: done/total (pct%)"; ``finish()`` clears the line."""

    def __init__(self, label: str, stream: TextIO | None = None, enabled: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, interval: float = 0.1):
        self.stream = stream or sys.stderr
        self.label = label
        if enabled is None:
            try:
                enabled = self.stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self._clock = clock
        self._interval = interval
        self._last = float("-inf")
        self._shown = False

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        if not self.enabled:
            return
        now = self._clock()
        if now - self._last < self._interval and (total is None or done < total):
            return
        self._last = now
        text = f"{self.label}: {done}"
        if total:
            text += f"/{total} ({100 * done // total}%)"
        if note:
            text += f" {note}"
        self.stream.write("\r\x1b[K" + text[:200])
        self.stream.flush()
        self._shown = True

    def message(self, text: str) -> None:
        """A line of its own (kept on the screen)."""
        if not self.enabled:
            return
        self.stream.write("\r\x1b[K" + text + "\n")
        self.stream.flush()
        self._shown = False

    def finish(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


@contextlib.contextmanager
def executor_progress(module, progress: Progress) -> Iterator[None]:
    """Make MODULE's ``execute(plan, handlers, on_result)`` report each action to PROGRESS.

    The flush command calls the executor without a progress callback; this wraps the name
    it calls for the duration of one command (nothing changes when PROGRESS is off).
    """
    original = getattr(module, "execute", None)
    if original is None or not progress.enabled:
        yield
        return

    def execute(plan, handlers=None, on_result=None):
        total = len(getattr(plan, "actions", ()))

        def report(i, result):
            progress.update(i + 1, total)
            if on_result is not None:
                on_result(i, result)

        try:
            return original(plan, handlers, report)
        finally:
            progress.finish()

    module.execute = execute
    try:
        yield
    finally:
        module.execute = original
