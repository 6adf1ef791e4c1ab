"""The ``ipsec`` command's parts: pid files, detached start, charon command forwarding, progress.

``supervisor.ipsec_cli`` is the entry point; these modules hold what it decides with
(pure functions, tested by tables) and the few places where it acts.
"""
