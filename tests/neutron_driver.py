"""Runs neutron-vpnaas's real strongSwan driver for one router; prints what each step did as JSON.

Run with the Python of a virtual environment that has PyPI's neutron-vpnaas (see
tests/test_real_clients.py, which builds it); run as root in a mount namespace where
/usr/sbin/ipsec is the `ipsec` under test and /etc/neutron/rootwrap.conf admits it.

    neutron_driver.py ROUTER_ID CONFIG_BASE EXTERNAL_IP PEER_IP [kill-charon-after-start]

The steps are the driver's own calls in the L3 agent's order: status, start (with `stroke up-nb`
per site), status, restart (`rereadsecrets` + `reload`), status, stop, status. Each command goes
through `ip netns exec qrouter-ID neutron-vpn-netns-wrapper --mount_paths=/etc:...,/var/run:...`,
exactly as the agent runs it; a command exiting with a code the driver does not accept raises.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time


def vpnservice(router_id: str, external_ip: str, peer_ip: str, n: int) -> dict:
    policy_ike = {"auth_algorithm": "sha256", "encryption_algorithm": "aes-128", "ike_version": "v2",
                  "lifetime_value": 3600, "lifetime_units": "seconds", "pfs": "group14",
                  "phase1_negotiation_mode": "main"}
    policy_esp = {"auth_algorithm": "sha256", "encryption_algorithm": "aes-128", "pfs": "group14",
                  "lifetime_value": 3600, "lifetime_units": "seconds", "transform_protocol": "esp",
                  "encapsulation_mode": "tunnel"}
    sites = []
    for i in range(n):
        sites.append({
            "id": f"{router_id[:8]}-0000-4000-8000-00000000000{i}",
            "peer_cidrs": [f"10.{100 + i}.0.0/24"], "local_cidrs": [f"10.{50 + i}.0.0/24"], "local_ip_vers": 4,
            "admin_state_up": True, "external_ip": external_ip, "local_id": external_ip,
            "peer_address": peer_ip, "peer_id": peer_ip, "mtu": 1500, "psk": f"not-a-secret-{i}",
            "initiator": "bi-directional", "ikepolicy": dict(policy_ike), "ipsecpolicy": dict(policy_esp),
            "dpd_action": "hold", "dpd_interval": 30, "dpd_timeout": 120, "status": "PENDING_CREATE"})
    return {"id": router_id, "router_id": router_id, "name": "vpn", "admin_state_up": True,
            "status": "PENDING_CREATE", "external_ip": external_ip, "ipsec_site_connections": sites}


def main(argv: list[str]) -> int:
    router_id, base, external_ip, peer_ip = argv[:4]
    kill_after_start = "kill-charon-after-start" in argv[4:]
    from oslo_config import cfg
    from neutron.conf.agent import common as agent_config
    agent_config.register_root_helper(cfg.CONF)
    cfg.CONF.register_opt(cfg.StrOpt("state_path", default=base))
    from neutron_vpnaas.services.vpn.device_drivers import strongswan_ipsec   # registers its options
    cfg.CONF(args=[], project="neutron")
    # What an L3 agent is configured with: "sudo neutron-rootwrap /etc/neutron/rootwrap.conf"; sudo
    # itself is a pass-through here (already root), rootwrap and its vpnaas filters are real.
    nosudo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "nosudo")
    cfg.CONF.set_override("root_helper", f"{nosudo} neutron-rootwrap /etc/neutron/rootwrap.conf", "AGENT")
    cfg.CONF.set_override("config_base_dir", base, "ipsec")

    namespace = f"qrouter-{router_id}"
    proc = strongswan_ipsec.StrongSwanProcess(cfg.CONF, router_id, vpnservice(router_id, external_ip, peer_ip, 2),
                                              namespace)
    steps: list[dict] = []
    calls: list[dict] = []
    wrapped = proc._execute
    exit_of = re.compile(r"Command: \['ipsec'[^\]]*\] Exit code: (-?\d+)")

    def recording(cmd, check_exit_code=True, extra_ok_codes=None):
        """Every `ipsec` call the driver makes, with the exit code the wrapper reports."""
        entry = {"cmd": " ".join(cmd[1:]), "step": steps_current[0]}
        calls.append(entry)
        try:
            out = wrapped(cmd, check_exit_code=check_exit_code, extra_ok_codes=extra_ok_codes)
        except RuntimeError as exc:         # neutron's ProcessExecutionError: a code it does not accept
            m = re.search(r"Exit code: (-?\d+)", str(exc))
            entry.update(exit=int(m.group(1)) if m else None, accepted=False, error=str(exc)[-1500:])
            raise
        m = exit_of.search(out or "")
        entry.update(exit=int(m.group(1)) if m else None, accepted=True)
        return out
    proc._execute = recording
    steps_current = [""]

    def step(name: str, fn) -> str | None:
        steps_current[0] = name
        started = time.monotonic()
        try:
            out = fn()
            steps.append({"step": name, "ok": True, "seconds": round(time.monotonic() - started, 3)})
            return out
        except RuntimeError as exc:
            steps.append({"step": name, "ok": False, "error": str(exc)[-1500:],
                          "seconds": round(time.monotonic() - started, 3)})
            return None

    def status(name: str) -> None:
        out = step(name, proc.get_status)
        proc.connection_status = {}
        proc._extract_and_record_connection_status(out or "")
        steps[-1]["connections"] = {k: v["status"] for k, v in sorted(proc.connection_status.items())}
        steps[-1]["lines"] = [line for line in (out or "").split("\n") if re.search(proc.STATUS_RE, line)]

    proc.ensure_configs()
    status("status-before-start")
    step("start", proc.start)                 # start, then `stroke up-nb` per site at once
    status("status-after-start")
    if kill_after_start:
        import signal
        with open(f"{base}/{router_id}/var/run/charon.pid") as fh:
            os.kill(int(fh.read()), signal.SIGKILL)
        time.sleep(3)
        status("status-after-kill")
    step("restart", proc.restart)             # rereadsecrets + reload
    status("status-after-restart")
    step("stop", proc.stop)
    status("status-after-stop")
    print(json.dumps({"router": router_id, "piddir": proc._strongswan_piddir, "steps": steps, "calls": calls}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
