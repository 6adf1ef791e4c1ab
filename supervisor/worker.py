"""One thread for recovery's kernel and VICI work: jobs run one at a time, in order."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from typing import Any, Callable

log = logging.getLogger("supervisor.recovery")


class SerialWorker:
    """One thread for all kernel and VICI work: jobs run one at a time, in order."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, future, what = item
            if what is not None and self.closed:
                future.cancel()         # background work is dropped at exit; waited-for calls still run
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits, or logged
                future.set_exception(exc)
                if what is not None:
                    log.error("recovery job '%s' failed", what, exc_info=exc)

    def submit(self, fn: Callable[[], None], what: str) -> None:
        """Run FN in the worker, not waiting for it; a failure is logged naming WHAT."""
        if not self.closed:
            self._queue.put((fn, concurrent.futures.Future(), what))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run FN in the worker and wait for its result (its exception is raised here)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, future, None))
        return future.result()

    def close(self, wait: float = 5.0) -> None:
        self.closed = True
        self._queue.put(None)
        self._thread.join(wait)
