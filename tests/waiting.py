"""Polling until a condition holds, for tests that watch another process or a kernel."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(pred: Callable[[], T], timeout: float = 10.0, what: str = "condition", poll: float = 0.05) -> T:
    """PRED's first truthy value within TIMEOUT seconds; AssertionError naming WHAT and the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(poll)
