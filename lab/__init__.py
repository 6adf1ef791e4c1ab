"""Two-namespace IPsec lab: moon and sun, a real charon in each, moon's optionally under ipsec-supervisor.

    moon (netns)                                   sun (netns)
    10.1.N.1/32 on lo                              10.2.N.1/32 on lo
    out0 192.0.2.1/24  <------ veth pair ------>   out0 192.0.2.2/24

One tunnel per N: initiator (N=1, moon starts it), responder (N=2, sun starts it), trap
(N=3, auto=route on both sides); each has its own IKE identities, so its own IKE_SA.

Modules: topology (namespaces, addresses, routes), charon (one charon tree per site with a
private /run and /etc binds: plain, strongSwan's starter, or ipsec-supervisor), traffic
(ping at 5/s, tcpdump for plaintext), kernel_view (iproute2/iptables listings, stale SAs,
another tool's "foreign" state), scenario (one kill -9 experiment end to end), report (the
recovery report), demo (`make demo`), preflight (tools, ESP, supervisor config keys).

Used by `make demo` (lab.demo), tests/test_tunnels_realkernel.py (VM tier) and
bench/bench_outage.py.  ESP needs a kernel that has it: on machines without, the demo and
the benchmark re-run themselves in the real-kernel VM (tools/vm-run).
"""
