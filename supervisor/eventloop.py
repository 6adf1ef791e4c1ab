"""One selectors loop: fds, deadline timers and signals (through a wakeup fd) as callbacks.

Nothing here sleeps or polls: the loop blocks in select() until an fd is ready or the
earliest timer is due.  Callbacks run in the loop's thread, one at a time. A callback that
raises is logged with its traceback and counted (``callback_errors``), and the loop goes
on: a bug in one handler must not end the supervisor, and with it charon.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import selectors
import signal
import socket
import threading
import time
from typing import Callable

Callback = Callable[[], None]

log = logging.getLogger(__name__)
# Tracebacks logged in full for the first few failures, then one line per LOG_EVERY (a reader
# that raises on every wakeup must not flood the log).
LOG_FIRST, LOG_EVERY = 10, 1000


class Timer:
    """A deadline on the loop's clock; ``cancel()`` makes it never fire."""

    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback: Callback):
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """Selector + timer heap + call_soon queue, driven by ``run_once``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._soon: collections.deque[Callback] = collections.deque()
        self.callback_errors = 0

    def guard(self, callback: Callable[..., None], *args) -> None:
        """Run CALLBACK(*ARGS); an Exception is logged and counted, never raised into the loop."""
        try:
            callback(*args)
        except Exception:   # noqa: BLE001 - KeyboardInterrupt/SystemExit still end the loop
            self.callback_errors += 1
            n = self.callback_errors
            name = getattr(callback, "__qualname__", None) or repr(callback)
            if n <= LOG_FIRST:
                log.exception("event-loop callback %s failed (error %d); the supervisor goes on", name, n)
            elif n % LOG_EVERY == 0:
                log.error("event-loop callback %s failed (error %d; tracebacks of the first %d were logged); "
                          "the supervisor goes on", name, n, LOG_FIRST)

    # fds -----------------------------------------------------------------
    def _set(self, fd: int, reader: Callback | None, writer: Callback | None) -> None:
        events = (selectors.EVENT_READ if reader else 0) | (selectors.EVENT_WRITE if writer else 0)
        registered = fd in self.selector.get_map()
        if not events:
            if registered:
                self.selector.unregister(fd)
        elif registered:
            self.selector.modify(fd, events, (reader, writer))
        else:
            self.selector.register(fd, events, (reader, writer))

    def _get(self, fd: int) -> tuple[Callback | None, Callback | None]:
        key = self.selector.get_map().get(fd)
        return key.data if key else (None, None)

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._set(fd, callback, self._get(fd)[1])

    def remove_reader(self, fd: int) -> None:
        self._set(fd, None, self._get(fd)[1])

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._set(fd, self._get(fd)[0], callback)

    def remove_writer(self, fd: int) -> None:
        self._set(fd, self._get(fd)[0], None)

    def forget(self, fd: int) -> None:
        """Drop every callback of ``fd`` (call before closing it)."""
        self._set(fd, None, None)

    # time ----------------------------------------------------------------
    def call_at(self, deadline: float, callback: Callback) -> Timer:
        timer = Timer(deadline, callback)
        heapq.heappush(self._timers, (deadline, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(self.clock() + max(0.0, delay), callback)

    def call_soon(self, callback: Callback) -> None:
        self._soon.append(callback)

    def _next_timeout(self) -> float | None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._soon:
            return 0.0
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - self.clock())

    def run_once(self) -> None:
        """Wait for the next fd event or deadline and run what became due."""
        for key, mask in self.selector.select(self._next_timeout()):
            current = self.selector.get_map().get(key.fd)
            if current is None:
                continue  # an earlier callback in this batch closed it
            reader, writer = current.data
            if mask & selectors.EVENT_READ and reader:
                self.guard(reader)
            current = self.selector.get_map().get(key.fd)
            if current is not None and mask & selectors.EVENT_WRITE and current.data[1]:
                self.guard(current.data[1])
        now = self.clock()
        while self._timers and (self._timers[0][2].cancelled or self._timers[0][0] <= now):
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.cancelled = True
                self.guard(timer.callback)
        for _ in range(len(self._soon)):
            self.guard(self._soon.popleft())

    def close(self) -> None:
        self.selector.close()


class SignalWakeup:
    """Signals as loop events: C-level handlers write the signal number to a socketpair."""

    def __init__(self, loop: Loop, handlers: dict[int, Callable[[int], None]]):
        self._loop = loop
        self._handlers = handlers
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._wsock.fileno(), warn_on_full_buffer=False)
        # A Python-level handler must exist for the wakeup byte to be written; it does nothing
        # itself so that all work happens in the loop.
        self._old = {sig: signal.signal(sig, _ignore_in_handler) for sig in handlers}
        loop.add_reader(self._rsock.fileno(), self._drain)

    def _drain(self) -> None:
        try:
            data = self._rsock.recv(4096)
        except BlockingIOError:
            return
        for signo in data:
            handler = self._handlers.get(signo)
            if handler is not None:
                self._loop.guard(handler, signo)     # one failing handler must not swallow the next signal

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self._old_fd)
        self._loop.forget(self._rsock.fileno())
        self._rsock.close()
        self._wsock.close()


def _ignore_in_handler(signo, frame) -> None:  # pragma: no cover - trivial
    pass


class ThreadWakeup:
    """Lets other threads hand results to the loop: ``post(callback)`` is thread-safe."""

    def __init__(self, loop: Loop):
        self._loop = loop
        self._queue: collections.deque[Callback] = collections.deque()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._closed = False
        loop.add_reader(self._r, self._drain)

    def post(self, callback: Callback) -> None:
        # Under the lock: after close() the fd number may belong to something else.
        with self._lock:
            if self._closed:
                return
            self._queue.append(callback)
            try:
                os.write(self._w, b"\0")
            except BlockingIOError:
                pass  # the loop is already due to wake up

    def _drain(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._queue:
            self._loop.guard(self._queue.popleft())   # one failing callback must not drop the rest

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._loop.forget(self._r)
            os.close(self._r)
            os.close(self._w)
