"""Translation of parsed conns into VICI load-conn parts, as the stroke plugin builds them."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.legacy.ipsec_conf import IpsecConfError, parse_ipsec_conf
from supervisor.legacy.translate import (ConnMessage, TranslateEnv, TranslateError, daemon_debug_args,
                                         daemon_settings, render_settings_overlay, to_jsonable,
                                         translate_ca, translate_conn)

IPSEC_D = Path(__file__).resolve().parent / "fixtures" / "ipsec_conf" / "ipsec.d"
LOCAL = frozenset({"192.168.0.1", "fec0::1", "127.0.0.1"})
ENV = TranslateEnv(ipsec_dir=str(IPSEC_D), local_addresses=LOCAL,
                   ca_files=(str(IPSEC_D / "cacerts" / "caCert.pem"),))


def tr(body: str, setup: str = "", env: TranslateEnv = ENV, name: str = "c") -> ConnMessage:
    c = parse_ipsec_conf(f"config setup\n{setup}conn {name}\n{body}")
    assert not c.errors, c.errors
    return translate_conn(c.conn(name), c.setup, env)


def fails(body: str, setup: str = "", env: TranslateEnv = ENV) -> TranslateError:
    with pytest.raises(TranslateError) as info:
        tr(body, setup, env)
    return info.value


def lines(*settings: str) -> str:
    return "".join(f"\t{s}\n" for s in settings)


BASE = lines("left=192.168.0.1", "right=192.168.0.2")


# --- IKE part ---------------------------------------------------------------------

def test_defaults_are_the_stroke_plugins():
    m = tr(BASE + lines("authby=secret"))
    assert m.ike == {
        "version": 0, "local_addrs": ["192.168.0.1"], "remote_addrs": ["192.168.0.2"], "remote_port": 500,
        "proposals": ["default"], "send_certreq": "yes", "send_cert": "ifasked", "encap": "no",
        "fragmentation": "yes", "keyingtries": 3, "mobike": "yes", "aggressive": "no", "pull": "yes",
        "dpd_delay": 0, "dpd_timeout": 150, "over_time": 540, "rand_time": 540, "reauth_time": 10260,
        "rekey_time": 0, "unique": "replace",
        "local-1": {"auth": "psk", "id": "192.168.0.1", "round": 1},
        "remote-1": {"auth": "psk", "id": "192.168.0.2", "round": 1},
    }
    assert m.child == {
        "mode": "tunnel", "rekey_time": 3060, "life_time": 3600, "rand_time": 540, "rekey_bytes": 0,
        "life_bytes": 0, "rand_bytes": 0, "rekey_packets": 0, "life_packets": 0, "rand_packets": 0,
        "local_ts": ["dynamic"], "remote_ts": ["dynamic"], "esp_proposals": ["default"],
        "dpd_action": "none", "close_action": "none",
    }


@pytest.mark.parametrize("settings,expect", [
    (["keyexchange=ikev1"], {"version": 1}),
    (["keyexchange=ikev2"], {"version": 2}),
    (["ike=aes256-sha256-modp2048!"], {"proposals": ["aes256-sha256-modp2048"]}),
    (["ike=aes128-sha1-modp2048, aes256-sha256-ecp256"],
     {"proposals": ["aes128-sha1-modp2048", "aes256-sha256-ecp256", "default"]}),
    (["mobike=no", "forceencaps=yes", "fragmentation=force", "aggressive=yes", "modeconfig=push"],
     {"mobike": "no", "encap": "yes", "fragmentation": "force", "aggressive": "yes", "pull": "no"}),
    (["leftikeport=4500", "rightikeport=4501"], {"local_port": 4500, "remote_port": 4501}),
    (["ikedscp=101110"], {"dscp": "101110"}),
    (["dpdaction=restart", "dpddelay=10", "dpdtimeout=60"], {"dpd_delay": 10, "dpd_timeout": 60}),
    (["dpdaction=none", "dpddelay=10"], {"dpd_delay": 0}),
    (["keyingtries=%forever"], {"keyingtries": 0}),
    (["leftsendcert=always", "rightsendcert=never"], {"send_cert": "always", "send_certreq": "no"}),
    (["reauth=no"], {"reauth_time": 0, "rekey_time": 10260}),
    (["ikelifetime=1h", "rekeymargin=3m", "rekeyfuzz=50%"],
     {"reauth_time": 3420, "over_time": 180, "rand_time": 90}),
    (["rekey=no"], {"rekey_time": 0, "reauth_time": 0, "over_time": 0, "rand_time": 0}),
    (["leftallowany=yes"], {"local_addrs": ["192.168.0.1", "0.0.0.0/0", "::/0"]}),
    (["right=192.168.0.2, fec0::2"], {"remote_addrs": ["192.168.0.2", "fec0::2"]}),
])
def test_ike_options(settings, expect):
    m = tr(BASE + lines("authby=secret", *settings))
    assert {k: m.ike.get(k) for k in expect} == expect


@pytest.mark.parametrize("setup,unique", [("", "replace"), ("uniqueids=no", "no"), ("uniqueids=yes", "replace"),
                                          ("uniqueids=keep", "keep"), ("uniqueids=never", "never")])
def test_uniqueids_becomes_every_conns_unique(setup, unique):
    assert tr(BASE, lines(setup) if setup else "").ike["unique"] == unique


@pytest.mark.parametrize("setup,revocation", [("strictcrlpolicy=yes", "strict"), ("strictcrlpolicy=ifuri", "ifuri"),
                                              ("strictcrlpolicy=no", None)])
def test_strictcrlpolicy_becomes_remote_pubkey_revocation(setup, revocation):
    m = tr(BASE + lines("rightauth=pubkey", "leftauth=pubkey", "rightauth2=psk"), lines(setup))
    assert m.ike["remote-1"].get("revocation") == revocation
    assert "revocation" not in m.ike["local-1"] and "revocation" not in m.ike["remote-2"]


# --- authentication --------------------------------------------------------------

def rounds(m: ConnMessage) -> dict:
    return {k: v for k, v in m.ike.items() if k.startswith(("local-", "remote-"))}


@pytest.mark.parametrize("settings,expect", [
    (["authby=rsasig"], {"local-1": "pubkey", "remote-1": "pubkey"}),
    (["authby=psk"], {"local-1": "psk", "remote-1": "psk"}),
    (["authby=xauthpsk", "xauth=server"], {"local-1": "psk", "remote-1": "psk", "remote-2": "xauth"}),
    (["authby=xauthrsasig"], {"local-1": "pubkey", "remote-1": "pubkey", "local-2": "xauth"}),
    (["authby=never"], {"local-1": "pubkey", "remote-1": "pubkey"}),
    ([], {"local-1": "pubkey", "remote-1": "pubkey"}),
    (["leftauth=psk", "authby=rsasig"], {"local-1": "psk", "remote-1": "pubkey"}),   # authby ignored
    (["leftauth=secret", "rightauth=eap-md5"], {"local-1": "psk", "remote-1": "eap-md5"}),
    (["leftauth=pubkey", "rightauth=any"], {"local-1": "pubkey", "remote-1": None}),
    (["leftauth=rsa-sha256", "rightauth=ecdsa-384"], {"local-1": "rsa-sha256", "remote-1": "ecdsa-384"}),
    (["leftauth2=eap-md5", "rightauth2=xauth-pam"],
     {"local-1": "pubkey", "local-2": "eap-md5", "remote-1": "pubkey", "remote-2": "xauth-pam"}),
])
def test_auth_methods(settings, expect):
    r = rounds(tr(BASE + lines(*settings)))
    assert {k: v.get("auth") for k, v in r.items()} == expect


def test_xauth_client_on_the_swapped_side_keeps_its_round_on_the_right_end():
    # authby applies to left/right before charon decides which end is local
    m = tr(lines("left=192.168.0.2", "right=192.168.0.1", "authby=xauthpsk", "xauth=client"))
    assert {k: v["auth"] for k, v in rounds(m).items()} == {"local-1": "psk", "remote-1": "psk", "remote-2": "xauth"}


def test_identities_default_to_addresses_and_any_is_left_out():
    r = rounds(tr(lines("left=%any", "right=192.168.0.2", "authby=psk")))
    assert "id" not in r["local-1"] and r["remote-1"]["id"] == "192.168.0.2"
    r = rounds(tr(BASE + lines("authby=psk", "leftid=%any", "rightid=@sun.example.org")))
    assert "id" not in r["local-1"] and r["remote-1"]["id"] == "@sun.example.org"


def test_eap_xauth_and_aaa_identities_go_to_rounds_of_their_class():
    m = tr(BASE + lines("leftauth=pubkey", "rightauth=eap-radius", "rightauth2=xauth", "eap_identity=%identity",
                        "aaa_identity=@aaa.example.org", "xauth_identity=john"))
    r = rounds(m)
    assert r["remote-1"]["eap_id"] == "%any" and r["remote-1"]["aaa_id"] == "@aaa.example.org"
    assert r["remote-2"]["xauth_id"] == "john"
    assert "eap_id" not in r["local-1"] and "xauth_id" not in r["remote-1"]


def test_second_local_round_inherits_the_first_id():
    r = rounds(tr(BASE + lines("leftid=@moon", "leftauth=pubkey", "leftauth2=eap", "rightauth2=eap")))
    assert r["local-2"]["id"] == "@moon" and "id" not in r["remote-2"]


def test_percent_local_id_is_stripped_and_loose_remote_id_is_refused():
    assert rounds(tr(BASE + lines("leftid=%moon")))["local-1"]["id"] == "moon"
    err = fails(BASE + lines("rightid=%sun"))
    d = err.diagnostic
    assert (d.option, d.section, d.origin.line) == ("rightid", "conn c", 5)
    assert "VICI has no such option" in d.message


def test_right_any4_without_rightid_accepts_any_identity():
    r = rounds(tr(lines("left=%any4", "right=%any4")))
    assert r["local-1"]["id"] == "any4" and "id" not in r["remote-1"]


def test_unknown_auth_method_is_refused_not_widened_to_any():
    assert "unknown authentication method 'magic'" in str(fails(BASE + lines("rightauth=magic")))


def test_groups_and_certificate_policies():
    r = rounds(tr(BASE + lines("rightgroups=Research, Sales", "rightgroups2=Ops", "rightauth2=eap",
                               "leftcertpolicy=1.2.3, 4.5.6")))
    assert r["remote-1"]["groups"] == ["Research", "Sales"] and r["remote-2"]["groups"] == ["Ops"]
    assert r["local-1"]["cert_policy"] == ["1.2.3", "4.5.6"]


# --- certificates and keys -------------------------------------------------------

@pytest.mark.parametrize("leftid,kept", [
    (None, "192.168.0.1"),                                          # the address is in the cert
    ("@moon.strongswan.org", "@moon.strongswan.org"),
    ("moon.strongswan.org", "moon.strongswan.org"),
    ("C=CH, O=strongSwan Project, CN=moon.strongswan.org", "C=CH, O=strongSwan Project, CN=moon.strongswan.org"),
    ("@other.example.org", None),                                   # not in the cert: its subject
    ("%any", None),
])
def test_an_id_the_certificate_does_not_contain_becomes_its_subject(leftid, kept):
    settings = ["leftcert=moonCert.pem"] + ([f'leftid="{leftid}"'] if leftid else [])
    r = rounds(tr(BASE + lines(*settings)))
    assert r["local-1"].get("id") == kept
    assert r["local-1"]["certs"][0].path == str(IPSEC_D / "certs" / "moonCert.pem")


def test_ca_constraint_is_resolved_to_the_ca_certificate():
    m = tr(BASE + lines('rightca="C=CH, O=strongSwan Project, CN=strongSwan Root CA"', "leftca=%same"))
    r = rounds(m)
    assert r["remote-1"]["cacerts"][0].path.endswith("cacerts/caCert.pem")
    assert r["local-1"]["cacerts"] == r["remote-1"]["cacerts"]
    err = fails(BASE + lines('rightca="C=CH, CN=Unknown CA"'))
    assert err.diagnostic.option == "rightca" and "silently drop" in err.diagnostic.message


def test_raw_public_keys():
    r = rounds(tr(BASE + lines("leftid=@moon", "leftsigkey=moonPub.pem", "rightrsasigkey=%cert")))
    assert r["local-1"]["pubkeys"][0].path.endswith("certs/moonPub.pem") and "pubkeys" not in r["remote-1"]
    assert "needs leftid" in str(fails(BASE + lines("leftsigkey=moonPub.pem", "left=%any")))
    assert "not supported" in str(fails(BASE + lines("leftid=@m", "leftsigkey=dns:AwEAAQ")))


@pytest.mark.parametrize("settings,message", [
    (["leftcert=missing.pem"], "cannot read certificate"),
    (["leftcert=%smartcard:1"], "smartcard"),
    (["leftcert=/etc/hostname"], "not an X.509 certificate"),
])
def test_certificate_problems_refuse_the_conn(settings, message, tmp_path):
    assert message in str(fails(BASE + lines(*settings)))


# --- ends: swap, virtual IPs, pools --------------------------------------------

def test_right_being_ours_swaps_the_ends():
    m = tr(lines("left=192.168.0.2", "leftsubnet=10.2.0.0/16", "leftid=@sun", "leftfirewall=yes",
                 "right=192.168.0.1", "rightsubnet=10.1.0.0/16", "rightid=@moon", "rightupdown=/bin/up",
                 "authby=psk"))
    assert m.ike["local_addrs"] == ["192.168.0.1"] and m.ike["remote_addrs"] == ["192.168.0.2"]
    assert rounds(m)["local-1"]["id"] == "@moon"
    assert m.child["local_ts"] == ["10.1.0.0/16"] and m.child["updown"] == "/bin/up"


def test_no_swap_when_disabled_and_a_warning_when_neither_end_is_ours():
    env = TranslateEnv(local_addresses=LOCAL, allow_swap=False)
    assert tr(lines("left=192.168.0.2", "right=192.168.0.1"), env=env).ike["local_addrs"] == ["192.168.0.2"]
    m = tr(lines("left=192.168.0.7", "right=192.168.0.8"))
    assert any("assuming left=local" in w.message for w in m.warnings)


def test_hostnames_are_resolved_for_the_swap():
    env = TranslateEnv(local_addresses=LOCAL, resolve=lambda n: ("192.168.0.1",) if n == "moon" else ())
    assert tr(lines("left=sun", "right=moon"), env=env).ike["local_addrs"] == ["moon"]


@pytest.mark.parametrize("settings,vips", [
    (["leftsourceip=%config", "rightsubnet=0.0.0.0/0"], ["0.0.0.0"]),
    (["leftsourceip=%config", "rightsubnet=fec2::/16"], ["::"]),
    (["leftsourceip=%modecfg", "leftsubnet=fec1::/16", "rightsubnet=10.0.0.0/8"], ["::"]),
    (["leftsourceip=%config4,%config6"], ["0.0.0.0", "::"]),
    (["leftsourceip=%cfg", "left=fec0::1", "right=fec0::2"], ["::"]),
    (["leftsourceip=10.3.0.5"], ["10.3.0.5"]),
])
def test_virtual_ips(settings, vips):
    assert tr(BASE + lines(*settings)).ike["vips"] == vips


def test_local_virtual_ip_is_dropped_when_the_remote_end_also_has_one():
    m = tr(BASE + lines("leftsourceip=%config", "rightsourceip=10.3.0.0/24"))
    assert "vips" not in m.ike and any("ignored" in w.message for w in m.warnings)


def test_pools():
    m = tr(lines("left=192.168.0.1", "right=%any", "rightsourceip=10.3.0.0/24,%radius,10.4.0.1-10.4.0.9,%config",
                 "rightdns=10.1.0.53"))
    assert m.ike["pools"] == ["10.3.0.0/24", "radius", "10.4.0.1-10.4.0.9", "c"]
    assert m.pools == {"10.3.0.0/24": {"addrs": "10.3.0.0/24", "dns": ["10.1.0.53"]},
                       "10.4.0.1-10.4.0.9": {"addrs": "10.4.0.1-10.4.0.9", "dns": ["10.1.0.53"]}}
    assert "needs an address pool" in str(fails(BASE + lines("rightsourceip=%config", "rightdns=1.1.1.1")))
    assert "neither a pool" in str(fails(BASE + lines("rightsourceip=10.3.0.0/99")))
    assert "not an address" in str(fails(BASE + lines("leftsourceip=10.3.0.x")))


# --- CHILD part -------------------------------------------------------------------

@pytest.mark.parametrize("settings,expect", [
    (["leftsubnet=10.1.0.0/16,fec1::/16", "rightsubnet=10.2.0.5/16"],
     {"local_ts": ["10.1.0.0/16", "fec1::/16"], "remote_ts": ["10.2.0.0/16"]}),
    (["leftprotoport=tcp/http", "rightsubnet=10.2.0.0/16[udp/53],10.3.0.0/16"],
     {"local_ts": ["dynamic[6/80]"], "remote_ts": ["10.2.0.0/16[17/53]", "10.3.0.0/16"]}),
    (["rightprotoport=tcp/1024-2048", "rightsubnet=10.2.0.0/16,10.3.0.0/16[udp]"],
     {"remote_ts": ["10.2.0.0/16[6/1024-2048]", "10.3.0.0/16[17/1024-2048]"]}),
    (["leftsubnet=%dynamic[icmp/%opaque]"], {"local_ts": ["dynamic[1/opaque]"]}),
    (["type=transport"], {"mode": "transport"}),
    (["type=transport_proxy"], {"mode": "transport_proxy"}),
    (["type=beet"], {"mode": "beet"}),
    (["type=passthrough"], {"mode": "pass"}),
    (["esp=aes128gcm16-ecp256!"], {"esp_proposals": ["aes128gcm16-ecp256"]}),
    (["esp=aes128-sha256"], {"esp_proposals": ["aes128-sha256", "default"]}),
    (["ah=sha256!", "esp=aes128"], {"ah_proposals": ["sha256"], "esp_proposals": None}),
    (["dpdaction=hold", "closeaction=restart"], {"dpd_action": "trap", "close_action": "start"}),
    (["dpdaction=clear"], {"dpd_action": "none"}),
    (["mark=0x10/0xff"], {"mark_in": "0x10/0xff", "mark_out": "0x10/0xff"}),
    (["mark_in=%unique"], {"mark_in": "%unique", "mark_out": None}),
    (["reqid=42", "replay_window=128", "inactivity=30m"], {"reqid": 42, "replay_window": 128, "inactivity": 1800}),
    (["compress=yes", "installpolicy=no", "sha256_96=yes"], {"ipcomp": "yes", "policies": "no", "sha256_96": "yes"}),
    (["tfc=%mtu"], {"tfc_padding": "mtu"}),
    (["tfc=1500"], {"tfc_padding": 1500}),
    (["leftfirewall=yes", "lefthostaccess=yes"], {"updown": "ipsec _updown iptables", "hostaccess": "yes"}),
    (["rightfirewall=yes"], {"updown": None}),                      # only the local end's script runs
    (["lifetime=20m", "rekeymargin=3m", "rekeyfuzz=50%"], {"rekey_time": 1020, "life_time": 1200, "rand_time": 90}),
    (["lifebytes=1000", "marginbytes=100", "lifepackets=50", "marginpackets=5", "rekeyfuzz=200%"],
     {"rekey_bytes": 900, "life_bytes": 1000, "rand_bytes": 200, "rekey_packets": 45, "life_packets": 50,
      "rand_packets": 10}),
    (["rekey=no"], {"rekey_time": 0, "life_time": 0, "rand_time": 0}),
])
def test_child_options(settings, expect):
    m = tr(BASE + lines(*settings))
    assert {k: m.child.get(k) for k in expect} == expect


@pytest.mark.parametrize("settings,option", [
    (["leftsubnet=10.1.0.0/33"], "leftsubnet"),
    (["rightsubnet=10.1.0.0/16[nosuch/1]"], "rightsubnet"),
    (["ike=aes128,,sha1"], "ike"),
    (["rekeymargin=2h"], "rekeymargin"),
    (["lifebytes=10", "marginbytes=20"], "marginbytes"),
    (["mediation=yes"], "mediation"),
    (["mediated_by=peer"], "mediated_by"),
])
def test_untranslatable_options_name_the_option(settings, option):
    assert fails(BASE + lines(*settings)).diagnostic.option == option


def test_conn_named_percent_auto_is_refused():
    c = parse_ipsec_conf("conn %auto\n\tauto=add\n")
    with pytest.raises(TranslateError):
        translate_conn(c.conns[0], c.setup, ENV)


# --- merging -----------------------------------------------------------------------

def test_merge_key_ignores_what_charon_does_not_compare():
    a = tr(BASE + lines("rightsubnet=10.2.0.0/16", "dpdtimeout=60", "ikedscp=000001", "leftsourceip=%config4"))
    b = tr(BASE + lines("rightsubnet=10.3.0.0/16", "leftsourceip=%config6"))
    c = tr(BASE + lines("dpddelay=99", "dpdaction=clear"))
    assert a.merge_key() == b.merge_key() != c.merge_key()
    assert a.key() != b.key()


def test_json_form_names_files_and_hides_bytes():
    m = tr(BASE + lines("leftcert=moonCert.pem"))
    j = to_jsonable(m.ike)
    assert j["local-1"]["certs"][0]["file"].endswith("moonCert.pem") and j["local-1"]["certs"][0]["bytes"] > 100


# --- ca sections and config setup -------------------------------------------------

def test_ca_section_becomes_load_authority():
    c = parse_ipsec_conf("ca sw\n\tcacert=caCert.pem\n\tcrluri=http://crl\n\tcrluri2=ldap://x\n"
                         "\tocspuri=http://ocsp\n\tcerturibase=http://certs/\n\tauto=route\n")
    msg = translate_ca(c.cas[0], ENV)
    body = msg["sw"]
    assert body["cacert"].path.endswith("cacerts/caCert.pem") and c.cas[0].auto == "add"
    assert (body["crl_uris"], body["ocsp_uris"], body["cert_uri_base"]) == \
        (["http://crl", "ldap://x"], ["http://ocsp"], "http://certs/")
    with pytest.raises(TranslateError):
        translate_ca(parse_ipsec_conf("ca x\n\tcacert=none.pem\n").cas[0], ENV)


def test_charondebug_becomes_daemon_arguments():
    c = parse_ipsec_conf('config setup\n\tcharondebug="ike 2, knl 3,cfg -1"\n')
    assert daemon_debug_args(c.setup) == ["--debug-ike", "2", "--debug-knl", "3", "--debug-cfg", "-1"]
    assert daemon_debug_args(parse_ipsec_conf("config setup\n").setup) == []


@pytest.mark.parametrize("value", ["ike", "foo 1", "ike 9", "ike two"])
def test_bad_charondebug_is_a_config_error_naming_the_line(value):
    c = parse_ipsec_conf(f'config setup\n\tcharondebug="{value}"\n')
    with pytest.raises(IpsecConfError) as info:
        daemon_debug_args(c.setup)
    assert info.value.diagnostic.origin.line == 2 and info.value.diagnostic.option == "charondebug"


def test_cachecrls_becomes_a_strongswan_conf_setting():
    setup = parse_ipsec_conf("config setup\n\tcachecrls=yes\n").setup
    assert daemon_settings(setup) == {"charon.cache_crls": "yes"}
    assert daemon_settings(parse_ipsec_conf("").setup) == {}
    assert render_settings_overlay(daemon_settings(setup)) == \
        "include /etc/strongswan.conf\n\ncharon {\n  cache_crls = yes\n}\n"
