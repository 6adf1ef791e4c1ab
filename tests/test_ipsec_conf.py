"""ipsec.conf parsing: syntax as the 5.9 starter reads it, also=/%default, keyword values."""

from __future__ import annotations

import pytest

from supervisor.errors import ConfigError, ExitCode
from supervisor.legacy.ipsec_conf import (Conn, IpsecConfError, has_loadable_conns, load_ipsec_conf,
                                          parse_ipsec_conf, parse_protoport, read_sections, _Bad)


def conf(text: str, files: dict | None = None, path: str = "/etc/ipsec.conf"):
    return parse_ipsec_conf(text, path, files)


def settings(c: Conn) -> dict:
    return {s.key: s.value for s in c.settings}


def error_of(text: str) -> IpsecConfError:
    with pytest.raises(IpsecConfError) as info:
        conf(text)
    return info.value


# --- syntax -------------------------------------------------------------------------

def test_settings_need_indentation_and_the_error_names_file_and_line():
    err = error_of("conn a\n\tleft=1.2.3.4\nright=5.6.7.8\n")
    assert err.diagnostic.origin.line == 3
    assert str(err).startswith("/etc/ipsec.conf:3: syntax error")
    assert "indented" in str(err)
    assert isinstance(err, ConfigError) and err.exit_code == ExitCode.CONFIG


def test_tabs_spaces_comments_blank_lines_and_version_line():
    c = conf("version 2.0  # old\n\n# comment\nconn a   # trailing comment\n  \tleft=1.2.3.4 # here\n"
             "    \n\t# indented comment\n\tauto=add\n").conn("a")
    assert settings(c) == {"left": "1.2.3.4", "auto": "add"}


@pytest.mark.parametrize("line,value", [
    ('leftid="C=CH, O=strongSwan, CN=moon"', "C=CH, O=strongSwan, CN=moon"),
    ('leftid="a \\"quoted\\" word"', 'a "quoted" word'),
    ('leftid="tab\\there"', "tab\there"),
    ('leftid="multi\\\nline"', "multiline"),
    ("leftsubnet=10.1.0.0/24, 10.1.1.0/24", "10.1.0.0/24, 10.1.1.0/24"),   # words joined by one blank
    ("leftsubnet=a    b", "a b"),
    ('leftid=@#0123abcd', "@#0123abcd"),                                    # @# is not a comment
    ("leftupdown=/bin/x#comment", "/bin/x"),
])
def test_values_quoting_and_escapes(line, value):
    assert settings(conf(f"conn a\n\t{line}\n").conn("a"))[line.split("=")[0]] == value


def test_unquoted_equals_in_a_value_is_a_syntax_error():
    err = error_of("conn a\n\tleftid=C=CH, CN=x\n")
    assert err.diagnostic.origin.line == 2


@pytest.mark.parametrize("text,message,line", [
    ('conn a\n\tleftid="open\n', "unterminated string", 2),
    ("conn\n\tleft=1\n", "section name missing", 1),
    ("conn a\n\tleft\n", "missing value for setting 'left'", 2),
    ("conn a b\n", "syntax error", 1),
])
def test_syntax_errors_name_the_line(text, message, line):
    err = error_of(text)
    assert message in err.diagnostic.message
    assert err.diagnostic.origin.line == line


def test_sections_of_the_same_name_merge_later_values_win():
    c = conf("conn a\n\tleft=1.1.1.1\n\tauto=add\nconn b\nconn a\n\tleft=2.2.2.2\n").conn("a")
    assert settings(c)["left"] == "2.2.2.2"
    assert [x.name for x in conf("conn a\nconn b\nconn a\n").conns] == ["a", "b"]


def test_settings_before_any_section_are_ignored_with_a_warning():
    c = conf("  left=1.1.1.1\nconn a\n")
    assert any("outside of any section" in w.message for w in c.warnings)


def test_config_setup_and_ca_sections():
    c = conf("config setup\n\tuniqueids=never\n\tcachecrls=yes\nca x\n\tcacert=c.pem\n\tauto=add\n")
    assert c.setup.uniqueids == "never" and c.setup.cachecrls
    assert c.cas[0].name == "x" and c.cas[0].cacert == "c.pem" and c.cas[0].auto == "add"


# --- include ---------------------------------------------------------------------------

def test_include_globs_relative_to_the_including_file_in_sorted_order_inline():
    files = {
        "/etc/conf.d/b.conf": "conn b\n\tauto=add\n",
        "/etc/conf.d/a.conf": "conn a\n\tauto=add\n",
        "/etc/conf.d/sub/more.conf": "\tleft=9.9.9.9\n",    # continues the current section
        "/etc/other dir/x.conf": "conn x\n",
    }
    c = conf("conn first\ninclude conf.d/*.conf\ninclude conf.d/sub/more.conf # comment\n"
             'include "other dir/x.conf"\ninclude nothing/*.conf\nconn last\n', files)
    assert [x.name for x in c.conns] == ["first", "a", "b", "x", "last"]
    assert settings(c.conn("b"))["left"] == "9.9.9.9"
    assert c.files == ("/etc/ipsec.conf", "/etc/conf.d/a.conf", "/etc/conf.d/b.conf",
                       "/etc/conf.d/sub/more.conf", "/etc/other dir/x.conf")


def test_include_loops_are_refused():
    err = error_of("include ipsec.conf\n")
    assert "nested more than" in err.diagnostic.message


def test_included_file_errors_name_that_file():
    with pytest.raises(IpsecConfError) as info:
        conf("conn a\ninclude x.conf\n", {"/etc/x.conf": "conn b\nleft=1\n"})
    assert str(info.value.diagnostic.origin) == "/etc/x.conf:2"


def test_a_setting_named_include_is_not_an_include():
    c = conf("conn a\n\tinclude = x\n")   # "include =" is a (unknown) setting, not a directive
    assert any(w.option == "include" for w in c.warnings)


# --- also= and %default ---------------------------------------------------------------

def _parents_order(text: str, name: str) -> list[str]:
    # each section sets "dpddelay" only in itself: the winner shows the precedence
    raw = read_sections("/etc/ipsec.conf", read_text=lambda p: text, expand=lambda p: [])
    return [s.value for s in next(c for c in raw.conns if c.name == name).settings if s.key == "leftid"]


def test_also_linearisation_most_important_last_and_default_at_the_end():
    # conn D: also=C, also=B; B and C: also=A -> D B C A %default
    text = ("conn %default\n\tleftid=default\n\trightid=default\n\tleftca=default\n\tleftgroups=default\n"
            "\tleftcert=default\n"
            "conn A\n\tleftid=A\n\trightid=A\n\tleftca=A\n\tleftgroups=A\n"
            "conn B\n\talso=A\n\tleftid=B\n\trightid=B\n\tleftca=B\n"
            "conn C\n\talso=A\n\tleftid=C\n\trightid=C\n"
            "conn D\n\talso=C\n\talso=B\n\tleftid=D\n")
    d = settings(conf(text).conn("D"))
    assert (d["leftid"], d["rightid"], d["leftca"], d["leftgroups"], d["leftcert"]) == ("D", "B", "B", "A", "default")


def test_empty_value_hides_an_inherited_one():
    c = conf("conn %default\n\trightsubnet=10.2.0.0/16\n\tauto=add\nconn a\n\trightsubnet=\n").conn("a")
    assert "rightsubnet" not in settings(c) and c.right.subnet is None and c.auto == "add"


def test_default_is_not_a_conn_and_also_default_is_ignored():
    c = conf("conn %default\n\tauto=add\nconn a\n\talso=%default\n")
    assert [x.name for x in c.conns] == ["a"] and c.conns[0].auto == "add"


@pytest.mark.parametrize("text,message,line", [
    ("conn a\n\talso=missing\n", "conn 'missing' referenced by also= not found", 2),
    ("conn a\n\talso=b\nconn b\n\talso=a\n", "also=a makes a loop", 4),
])
def test_bad_also_rejects_the_file(text, message, line):
    err = error_of(text)
    assert message in err.diagnostic.message and err.diagnostic.option == "also"
    assert err.diagnostic.origin.line == line


def test_options_apply_in_the_starters_order():
    # The starter applies a conn's own settings by key, then its parents'.  leftsourceip
    # forces tunnel mode: before type= (own settings) type wins, from a parent it loses.
    own = conf("conn a\n\ttype=transport\n\tleftsourceip=%config\n").conn("a")
    assert own.mode == "transport"
    inherited = conf("conn %default\n\tleftsourceip=%config\nconn a\n\ttype=transport\n").conn("a")
    assert inherited.mode == "tunnel"


# --- keyword values --------------------------------------------------------------------

def test_defaults_match_the_starters():
    c = conf("conn a\n").conn("a")
    assert (c.auto, c.keyexchange, c.mode, c.mobike, c.fragmentation, c.rekey, c.reauth) == \
        ("ignore", "ike", "tunnel", True, "yes", True, True)
    assert (c.ike_lifetime, c.ipsec_lifetime, c.rekey_margin, c.rekey_fuzz, c.keying_tries) == \
        (10800, 3600, 540, 100, 3)
    assert (c.dpd_delay, c.dpd_timeout, c.dpd_action, c.left.sendcert, c.left.ikeport) == \
        (30, 150, "none", "ifasked", 500)


@pytest.mark.parametrize("line,field,value", [
    ("ikelifetime=2h", "ike_lifetime", 7200),
    ("lifetime=20m", "ipsec_lifetime", 1200),
    ("keylife=1d", "ipsec_lifetime", 86400),
    ("margintime=90s", "rekey_margin", 90),
    ("rekeyfuzz=50%", "rekey_fuzz", 50),
    ("keyingtries=%forever", "keying_tries", 0),
    ("type=passthrough", "mode", "pass"),
    ("type=reject", "mode", "drop"),
    ("type=transport_proxy", "proxy_mode", True),
    ("mark=0x10/0xff", "mark_out", "0x10/0xff"),
    ("mark_in=%unique-dir", "mark_in", "%unique-dir"),
    ("modeconfig=push", "modecfg_push", True),
    ("xauth=server", "xauth_server", True),
    ("compress=yes", "compress", True),
    ("installpolicy=no", "install_policy", False),
    ("ikedscp=000110", "ikedscp", "000110"),
    ("tfc=%mtu", "tfc", "%mtu"),
    ("replay_window=0", "replay_window", 0),
])
def test_conn_values(line, field, value):
    assert getattr(conf(f"conn a\n\t{line}\n").conn("a"), field) == value


@pytest.mark.parametrize("line,field,value", [
    ("left=%defaultroute", "host", "%any"),
    ("left=%any6", "host", "%any6"),
    ("left=%192.0.2.1", "host", "192.0.2.1"),
    ("left=%192.0.2.1", "allow_any", True),
    ("leftsendcert=yes", "sendcert", "always"),
    ("leftsendcert=no", "sendcert", "never"),
    ("leftfirewall=yes", "updown", "ipsec _updown iptables"),
    ("leftsubnetwithin=10.0.0.0/8", "subnet", "10.0.0.0/8"),
    ("leftrsasigkey=%cert", "sigkey", "%cert"),
    ("leftprotoport=tcp/http", "protocol", 6),
    ("leftprotoport=17/1024-2048", "from_port", 1024),
    ("leftprotoport=17/1024-2048", "to_port", 2048),
    ("leftprotoport=%any/%opaque", "from_port", 0xFFFF),
])
def test_end_values(line, field, value):
    assert getattr(conf(f"conn a\n\t{line}\n").conn("a").left, field) == value


@pytest.mark.parametrize("text,ports", [
    ("udp", (17, 0, 0xFFFF)), ("17/53", (17, 53, 53)), ("tcp/0x50", (6, 80, 80)),
    ("icmp/%opaque", (1, 0xFFFF, 0)), ("%any/%any", (0, 0, 0xFFFF)), ("6/010", (6, 8, 8)),
])
def test_protoport(text, ports):
    assert parse_protoport(text) == ports


@pytest.mark.parametrize("text", ["nosuchproto", "300", "tcp/70000", "tcp/1-x"])
def test_bad_protoport(text):
    with pytest.raises(_Bad):
        parse_protoport(text)


@pytest.mark.parametrize("line,expect", [
    ("dpdaction=maybe", "must be one of none, clear, hold, restart"),
    ("ikelifetime=3 hours", "must be a duration"),
    ("rekeyfuzz=50", "percentage"),
    ("mark=0x10/zz", "VALUE[/MASK]"),
    ("leftprotoport=tcp/99999", "bad port"),
    ("auto=sometimes", "must be one of ignore, add, route, start"),
    ("uniqueids=no", "not allowed in a conn"),
    ("cacert=x.pem", "not allowed in a conn"),
])
def test_a_bad_value_skips_the_conn_naming_file_line_conn_and_option(line, expect):
    c = conf(f"conn ok\n\tauto=add\nconn bad\n\tauto=add\n\t{line}\n")
    assert [x.name for x in c.conns] == ["ok"]
    first = c.errors[0]
    assert expect in first.message
    assert (first.origin.path, first.origin.line, first.section, first.option) == \
        ("/etc/ipsec.conf", 5, "conn bad", line.split("=")[0])
    assert str(first).startswith(f"/etc/ipsec.conf:5: conn bad: option '{line.split('=')[0]}': ")
    assert c.errors[-1].message.startswith("conn skipped")


def test_firewall_and_updown_together_skip_the_conn():
    c = conf("conn a\n\tleftfirewall=yes\n\tleftupdown=/bin/true\n")
    assert not c.conns and "cannot have both leftfirewall and leftupdown" in c.errors[0].message


def test_esp_and_ah_together_are_accepted_as_by_the_starter():
    c = conf("conn a\n\tesp=aes128\n\tah=sha1\n").conn("a")
    assert (c.esp, c.ah) == ("aes128", "sha1")


def test_unknown_and_deprecated_keywords_are_warnings():
    c = conf("conn a\n\tleftfoo=1\n\tpfs=yes\n\tleftnexthop=%direct\nconfig setup\n\tplutodebug=all\n")
    assert [x.name for x in c.conns] == ["a"]
    assert [(w.option, w.message.split(",")[0]) for w in c.warnings] == [
        ("plutodebug", "deprecated keyword"), ("leftfoo", "unknown keyword"),
        ("leftnexthop", "deprecated keyword"), ("pfs", "deprecated keyword")]


@pytest.mark.parametrize("text,message", [
    ("config setup\n\tleft=1.2.3.4\n", "keyword not allowed in config setup"),
    ("config setup\n\tuniqueids=maybe\n", "bad value 'maybe'"),
])
def test_config_setup_errors_reject_the_file(text, message):
    err = error_of(text)
    assert message in err.diagnostic.message and err.diagnostic.section == "config setup"


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(IpsecConfError) as info:
        load_ipsec_conf(str(tmp_path / "nope.conf"))
    assert "cannot read" in str(info.value)


def test_has_loadable_conns(tmp_path):
    p = tmp_path / "ipsec.conf"
    assert not has_loadable_conns(str(p))
    p.write_text("config setup\nconn a\n\tauto=ignore\n")
    assert not has_loadable_conns(str(p))
    p.write_text("conn a\n\tauto=add\n")
    assert has_loadable_conns(str(p))
