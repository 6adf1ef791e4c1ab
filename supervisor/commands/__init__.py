"""CLI subcommands of ``ipsec-supervisor``: one module per command group.

Each module defines ``register(subparsers)``, which adds its parsers and sets
``func=handler`` on each; ``handler(args) -> int`` returns the exit code and
raises ``SupervisorError`` for failures.  Modules here are discovered
automatically by ``supervisor.cli``.
"""


def uint32(text: str) -> int:
    """argparse type: a whole number from 0 to 2**32-1 (route tables, rule priorities)."""
    import argparse
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"{value} is out of range (0 to 4294967295)")
    return value
