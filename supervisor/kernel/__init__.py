"""One module per kernel object family; ``supervisor.kernel_state`` is the facade.

- ``netlink``: the shared netlink transport (errno mapping lives here once).
- ``xfrm``: XFRM SAs, policies and default policies, and the XFRM monitor.
- ``routes``, ``rules``, ``addresses``: rtnetlink objects (dumps decoded with struct; adds and
  rule/address deletes encoded by pyroute2, imported on first use), and the rtnl monitor.
- ``firewall``: iptables/ip6tables (nft and legacy backends) and native nftables rules.
- ``netns``: network namespace identity and entering one.
- ``common``: what every family shares (delete results, events).
"""
