"""Loggers that import ``logging`` when they first log, for the quick commands whose paths rarely
do (``ipsec-supervisor snapshot``: logging and what it imports are about 3 ms of a 190 ms run).

The CLI sets logging up with ``configure`` (every other command) or ``configure_when_used`` (the
quick ones): then the set-up happens when one of these loggers first logs. A module on a quick
command's path logs through ``Logger`` (tests/test_cli_plain.py checks that such a run imports no
logging, and that -v still shows the debug lines).
"""

from __future__ import annotations

import sys
from _thread import allocate_lock

_pending: bool | None = None        # the verbosity configure_when_used left for the first log
_setting_up = allocate_lock()       # (threads logging first at once: one sets up, all log after it)


def configure(verbose: bool) -> None:
    """The CLI's logging: level INFO (DEBUG when VERBOSE), "LEVEL name: message" on stderr."""
    import logging
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def configure_when_used(verbose: bool) -> None:
    """configure(VERBOSE) now if logging is imported already, else when a Logger first logs."""
    global _pending
    if "logging" in sys.modules:
        configure(verbose)
    else:
        _pending = verbose


class Logger:
    """``logging.getLogger(name)``, imported (and the CLI's set-up applied) on first use."""

    def __init__(self, name: str):
        self.name = name

    def debug(self, msg, *args, **kwargs) -> None:
        # The CLI's set-up would drop it, and nothing else can have set logging up: no import.
        if _pending is False and "logging" not in sys.modules:
            return
        kwargs.setdefault("stacklevel", 2)      # the record names our caller, not this method
        self._real().debug(msg, *args, **kwargs)

    def __getattr__(self, attr: str):
        return getattr(self._real(), attr)

    def _real(self):
        global _pending
        import logging
        if _pending is not None:
            with _setting_up:
                if _pending is not None:
                    configure(_pending)
                    _pending = None
        return logging.getLogger(self.name)
