"""argparse without shutil: the parsers of ``ipsec`` and ``ipsec-supervisor``.

argparse builds a help formatter on every ``add_argument`` and asks ``shutil`` for the
terminal width; importing shutil (with zlib, bz2, lzma, fnmatch) costs about 2 ms of every
polled ``ipsec status``. ``Parser`` passes the width itself, computed as shutil would.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ExitCode, SupervisorError, writing_output


def terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else the terminal of stdout, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
        columns = columns or 80
    return columns


class Parser(argparse.ArgumentParser):
    def _get_formatter(self):
        # HelpFormatter subtracts 2 from the width it measures itself, not from one it is given
        return self.formatter_class(prog=self.prog, width=terminal_columns() - 2)

    def _print_message(self, message: str, file=None) -> None:
        if file is not sys.stdout:      # (what stderr cannot take, argparse passes over)
            return super()._print_message(message, file)
        with writing_output():          # --help, --version: the output, whose failure argparse would drop
            if message:
                file.write(message)


class UsageErrorParser(Parser):
    """``ipsec``'s parsers: a usage error is a SupervisorError (exit 2), worded by argparse."""

    def error(self, message: str):
        raise SupervisorError(f"{self.prog}: {message}", ExitCode.USAGE)
