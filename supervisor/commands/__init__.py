"""CLI subcommands of ``ipsec-supervisor``: one module per command group.

Each module defines ``register(subparsers)``, which adds its parsers and sets
``func=handler`` on each; ``handler(args) -> int`` returns the exit code and
raises ``SupervisorError`` for failures.  Modules here are discovered
automatically by ``supervisor.cli``.
"""
