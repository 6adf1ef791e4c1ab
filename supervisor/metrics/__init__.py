"""Prometheus metrics: the supervisor's own, fed by an observer, and charon's view read over VICI.

Imported only when ``metrics.listen`` or ``metrics.textfile`` is set (and by ``ipsec-supervisor
metrics``), so prometheus_client costs the short commands nothing.

- ``charon``: charon's IKE_SAs, CHILD_SAs, traffic and trap policies over VICI (blocking, with a
  deadline and a short cache; called from the HTTP server's threads, never from the loop);
- ``families``: pure: status snapshots, ledgers and VICI views -> metric families;
- ``exporter``: the observer the Supervisor and KernelRecovery tell of events, the HTTP
  listener and the textfile writer.
"""

import logging

_log = logging.getLogger("supervisor")


def tell(observer, name: str, *args) -> None:
    """Call OBSERVER.NAME(*args) if it has it; its errors are logged, never raised (metrics must never
    disturb supervision or recovery)."""
    hook = getattr(observer, name, None)
    if hook is not None:
        try:
            hook(*args)
        except Exception:  # noqa: BLE001
            _log.exception("metrics observer %s failed; going on", name)
