"""Prometheus metrics: the supervisor's own, fed by an observer, and charon's view read over VICI.

Imported only when ``metrics.listen`` or ``metrics.textfile`` is set (and by ``ipsec-supervisor
metrics``), so prometheus_client costs the short commands nothing.

- ``charon``: charon's IKE_SAs, CHILD_SAs, traffic and trap policies over VICI (blocking, with a
  deadline and a short cache; called from the HTTP server's threads, never from the loop);
- ``families``: pure: status snapshots, ledgers and VICI views -> metric families;
- ``exporter``: the observer the Supervisor and KernelRecovery tell of events, the HTTP
  listener and the textfile writer.
"""
