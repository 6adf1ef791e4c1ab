"""ipsec.secrets parsing and the load-shared / load-key messages made from it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from supervisor.legacy.secrets import load_secrets, parse_secrets

IPSEC_D = Path(__file__).resolve().parent / "fixtures" / "ipsec_conf" / "ipsec.d"
KEY = (IPSEC_D / "private" / "moonKey.pem").read_bytes()


def parse(text: str, files: dict | None = None):
    return parse_secrets(text, "/etc/ipsec.secrets", files)


@pytest.mark.parametrize("line,owners,secret", [
    ('@moon @sun : PSK "a secret"', ("@moon", "@sun"), b"a secret"),
    ("192.168.0.1 192.168.0.2 : PSK 'single quoted'", ("192.168.0.1", "192.168.0.2"), b"single quoted"),
    (": PSK 0x666f6f", (), b"foo"),
    ("%any : PSK 0sZm9vYmFy", ("%any",), b"foobar"),
    ("carol : PSK bareword # comment", ("carol",), b"bareword"),
    ('"C=CH, CN=x" @y : PSK "s"', ("C=CH, CN=x", "@y"), b"s"),
    ("  @indented\t:\tPSK \"tabs\"", None, None),     # " : " is required: tabs do not count
    ('x : PSK "0x41"', ("x",), b"0x41"),                 # quoted: literal
])
def test_psk_forms(line, owners, secret):
    s = parse(line + "\n")
    if owners is None:
        assert not s.shared and "missing ' : ' separator" in s.errors[0].message
        return
    assert not s.errors, s.errors
    (entry,) = s.shared
    assert (entry.kind, entry.owners, entry.secret) == ("PSK", owners, secret)


def test_shared_types_become_vici_types_with_stable_ids():
    s = parse("a : PSK x\na : PSK y\ncarol : EAP e\njohn : XAUTH x\nbob : NTLM 0x00\n: PSK z\n")
    msgs = s.shared_messages()
    assert [(m["id"], m["type"]) for m in msgs] == [
        ("ipsec.secrets:PSK:a", "IKE"), ("ipsec.secrets:PSK:a#2", "IKE"), ("ipsec.secrets:EAP:carol", "EAP"),
        ("ipsec.secrets:XAUTH:john", "XAUTH"), ("ipsec.secrets:NTLM:bob", "NTLM"), ("ipsec.secrets:PSK:%any", "IKE")]
    assert msgs[0] == {"id": "ipsec.secrets:PSK:a", "type": "IKE", "data": b"x", "owners": ["a"]}
    assert "owners" not in msgs[-1]


def test_private_keys_are_read_relative_to_ipsec_d_private():
    s = parse(": ECDSA moonKey.pem\n: RSA /abs/key.pem\n: PKCS8 \"k 8.pem\"\n",
              {"/etc/ipsec.d/private/moonKey.pem": KEY, "/abs/key.pem": b"RSAKEY",
               "/etc/ipsec.d/private/k 8.pem": b"P8"})
    assert not s.errors
    assert [(k.kind, k.path) for k in s.keys] == [("ECDSA", "/etc/ipsec.d/private/moonKey.pem"),
                                                  ("RSA", "/abs/key.pem"), ("PKCS8", "/etc/ipsec.d/private/k 8.pem")]
    msgs = s.key_messages()
    assert [m["type"] for m in msgs] == ["ecdsa", "rsa", "any"] and msgs[0]["data"] == KEY
    assert msgs[0]["data"].path == "/etc/ipsec.d/private/moonKey.pem"


def test_include_globs_relative_to_the_including_file():
    s = parse("include secrets.d/*.secrets\n# include not-this\n: PSK top\n",
              {"/etc/secrets.d/b.secrets": ": PSK b\n", "/etc/secrets.d/a.secrets": "include ../nested.txt\n",
               "/etc/nested.txt": "n : EAP n\n"})
    assert [(e.kind, e.secret, e.origin.path, e.origin.line) for e in s.shared] == [
        ("EAP", b"n", "/etc/nested.txt", 1), ("PSK", b"b", "/etc/secrets.d/b.secrets", 1),
        ("PSK", b"top", "/etc/ipsec.secrets", 3)]


@pytest.mark.parametrize("line,message", [
    (": PSK", "missing secret type"),
    (": PSK \"unterminated", "missing second delimiter"),
    (": PSK 0xZZ", "bad hex"),
    (": FOO bar", "unknown secret type 'FOO'"),
    (": P12 x.p12", "PKCS#12 containers are not supported"),
    (": PIN %smartcard:1 1234", "smartcard PINs"),
    (": RSA missing.pem", "cannot read private key /etc/ipsec.d/private/missing.pem"),
    (": RSA enc.pem %prompt", "%prompt"),
    (": RSA enc.pem secret", "passphrase-protected"),
    ("no separator PSK x", "missing ' : ' separator"),
])
def test_bad_entries_are_skipped_with_file_and_line(line, message):
    s = parse(f": PSK good\n{line}\n: PSK after\n",
              {"/etc/ipsec.d/private/enc.pem": b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nxx\n"})
    assert [e.secret for e in s.shared] == [b"good", b"after"]
    (err,) = s.errors
    assert message in err.message and err.origin.line == 2 and err.message.endswith("entry skipped")
    assert str(err).startswith("/etc/ipsec.secrets:2: ipsec.secrets: ")


def test_unreadable_top_level_file_raises(tmp_path):
    with pytest.raises(OSError):
        load_secrets(str(tmp_path / "none"))


def test_real_files(tmp_path):
    (tmp_path / "ipsec.secrets").write_text(": ECDSA moonKey.pem\n@a @b : PSK \"x\"\n")
    s = load_secrets(str(tmp_path / "ipsec.secrets"), ipsec_dir=str(IPSEC_D))
    assert not s.errors and s.keys[0].data == KEY and s.shared[0].owners == ("@a", "@b")


def test_an_include_loop_is_an_error_naming_file_and_line_and_reads_each_file_once(tmp_path):
    """A file including itself 4 times fanned out to 1.4M PSKs in 56 s (issue 11 point 7)."""
    top = tmp_path / "ipsec.secrets"
    top.write_text(": PSK top\n" + f"include {top}\n" * 4)
    t0 = time.monotonic()
    s = load_secrets(str(top))
    assert time.monotonic() - t0 < 2.0
    assert [e.secret for e in s.shared] == [b"top"]
    assert len(s.errors) == 4 and {e.origin.line for e in s.errors} == {2, 3, 4, 5}
    err = s.errors[0]
    assert err.origin.path == str(top) and "makes a loop" in err.message and str(top) in err.message


def test_an_include_loop_through_another_file_and_a_symlink_is_found_by_real_path(tmp_path):
    (tmp_path / "a.secrets").write_text(": PSK a\ninclude b.secrets\n")
    (tmp_path / "b.secrets").write_text(": PSK b\ninclude link.secrets\n")
    (tmp_path / "link.secrets").symlink_to(tmp_path / "a.secrets")
    s = load_secrets(str(tmp_path / "a.secrets"))
    assert [e.secret for e in s.shared] == [b"a", b"b"]
    (err,) = s.errors
    assert (err.origin.path, err.origin.line) == (str(tmp_path / "b.secrets"), 2)
    assert f"{tmp_path}/a.secrets -> {tmp_path}/b.secrets -> {tmp_path}/a.secrets" in err.message


def test_a_file_included_twice_without_a_loop_is_read_once():
    s = parse("include a\ninclude b\n", {"/etc/a": "include c\n", "/etc/b": "include c\n", "/etc/c": ": PSK c\n"})
    assert [e.secret for e in s.shared] == [b"c"] and not s.errors
