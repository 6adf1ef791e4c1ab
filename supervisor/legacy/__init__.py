"""The legacy configuration: ipsec.conf and ipsec.secrets, loaded into charon over VICI.

Replaces the configuration role of strongSwan's ``starter`` (which pushes ipsec.conf over
the stroke socket).  Layers, each usable alone:

- ``ipsec_conf``: reads ipsec.conf the way the 5.9 starter does (syntax, includes, also=,
  %default, keyword values); conns with bad values are skipped with a diagnostic.
- ``secrets``: reads ipsec.secrets (PSK, EAP, XAUTH, NTLM and private-key entries).
- ``translate``: pure; a parsed conn becomes the ``load-conn`` pieces the stroke plugin
  would have built, and ``config setup`` becomes daemon arguments and settings.
- ``loader``: plans (pure) and executes load / update / reload against charon's VICI socket.

For the supervisor: ``loader.daemon_options()`` before starting charon, ``loader.load()``
once charon answers on VICI (after every start), ``loader.update(state)`` on SIGHUP and
``loader.reload(state)`` on SIGUSR1; see docs/legacy-ipsec-conf.md.
"""
