"""The same PSK tunnel from ipsec.conf/ipsec.secrets comes up with either loader (real kernel, ESP).

Two namespaces (moon, sun) joined by a veth, one charon in each.  Each side's
configuration is loaded either by Debian's starter (stroke) or by our loader (VICI,
stroke plugin disabled); sun has auto=start and initiates.  For every combination the
IKE_SA and CHILD_SA must be established with the proposals of the config, and a ping
between the protected subnets must go through ESP.  Runs in the VM tier
(``tools/vm-run -- .venv/bin/pytest -m realkernel tests/test_legacy_psk_realkernel.py``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from supervisor.legacy import loader
from test_legacy_differential import CHARON, IPSEC_D, STARTER, Daemon, _swanctl, parse_pretty

pytestmark = pytest.mark.realkernel

MOON_CONF = """\
conn %default
	keyexchange=ikev2
	authby=secret
	ike=aes128-sha256-modp2048!
	esp=aes128-sha256!
	keyingtries=1

conn net-net
	left=192.168.0.1
	leftid=@moon.strongswan.org
	leftsubnet=10.1.0.1/32
	right=192.168.0.2
	rightid=@sun.strongswan.org
	rightsubnet=10.2.0.1/32
	auto=add
"""
SUN_CONF = MOON_CONF.replace("auto=add", "auto=start")   # left/right swapped by charon
SECRETS = "@moon.strongswan.org @sun.strongswan.org : PSK 0sv+NkxY9LLZvwj4qCC2o/gGrWDF2d21jL\n"


def _setup(netns_factory):
    moon, sun = netns_factory(), netns_factory()
    moon.run("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", sun.name)
    moon.sh("ip addr add 192.168.0.1/24 dev v0 && ip link set v0 up && ip addr add 10.1.0.1/32 dev lo")
    sun.sh("ip addr add 192.168.0.2/24 dev v1 && ip link set v1 up && ip addr add 10.2.0.1/32 dev lo")
    return moon, sun


def _start(ns, tmp: Path, side: str, how: str, conf: str) -> Daemon:
    conf_path = tmp / f"{side}.conf"
    conf_path.write_text(conf)
    secrets = tmp / f"{side}.secrets"
    secrets.write_text(SECRETS)
    if how == "starter":
        return Daemon(ns, tmp, [STARTER, "--nofork", "--conf", str(conf_path)],
                      f"    stroke {{ secrets_file = {secrets} }}")
    daemon = Daemon(ns, tmp, [CHARON], "    stroke { load = no }")
    daemon.conf_path, daemon.secrets = conf_path, secrets
    return daemon


def _load(daemon: Daemon, addresses: set[str]) -> None:
    config = loader.read_legacy_config(str(daemon.conf_path), str(daemon.secrets), ipsec_dir=str(IPSEC_D),
                                       addresses=frozenset(addresses))
    with loader.ViciClient(daemon.vici) as client:
        report = loader.execute_plan(loader.plan_load(config, None, "load"), client)
    assert report.ok, report.to_json()


def _established(daemon: Daemon) -> dict | None:
    for header, ev in parse_pretty(_swanctl(daemon, "--list-sas")):
        if header != "list-sa event":
            continue
        (name, sa), = ev.items()
        children = sa.get("child-sas", {})
        if sa.get("state") == "ESTABLISHED" and any(c.get("state") == "INSTALLED" for c in children.values()):
            return sa
    return None


@pytest.mark.parametrize("moon_how,sun_how", [("starter", "starter"), ("vici", "vici"), ("starter", "vici"),
                                              ("vici", "starter")])
def test_psk_tunnel_comes_up_with_either_loader(moon_how, sun_how, netns_factory, tmp_path):
    moon, sun = _setup(netns_factory)
    a = _start(moon, tmp_path, "moon", moon_how, MOON_CONF)
    b = _start(sun, tmp_path, "sun", sun_how, SUN_CONF)
    try:
        a.wait_ready(60)
        if moon_how == "vici":
            _load(a, {"192.168.0.1", "10.1.0.1", "127.0.0.1"})
        b.wait_ready(60)
        if sun_how == "vici":
            _load(b, {"192.168.0.2", "10.2.0.1", "127.0.0.1"})   # auto=start: initiates
        deadline = time.monotonic() + 90
        while (sa := _established(b)) is None:
            assert time.monotonic() < deadline, f"no tunnel:\n{a.output()}\n{b.output()}"
            time.sleep(0.5)
        assert sa["encr-alg"] == "AES_CBC" and sa["integ-alg"] == "HMAC_SHA2_256_128", sa
        assert sa["dh-group"] == "MODP_2048", sa
        child = next(iter(sa["child-sas"].values()))
        assert (child["encr-alg"], child["integ-alg"]) == ("AES_CBC", "HMAC_SHA2_256_128"), child
        assert child["local-ts"] == ["10.2.0.1/32"] and child["remote-ts"] == ["10.1.0.1/32"], child

        ping = moon.run("ping", "-c", "3", "-i", "0.3", "-W", "5", "-I", "10.1.0.1", "10.2.0.1", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        states = moon.run("ip", "-s", "xfrm", "state").stdout
        assert "proto esp" in states
        packets = [int(n) for n in re.findall(r"(\d+)\(packets\)", states)]
        assert sum(packets) >= 6, states   # 3 requests out, 3 replies in
    except AssertionError:
        print("=== moon ===\n" + a.output())
        print("=== sun ===\n" + b.output())
        raise
    finally:
        a.stop()
        b.stop()
