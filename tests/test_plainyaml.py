"""plainyaml reads the plain subset of YAML exactly as yaml.safe_load does, or declines (None).

`ipsec status` reads supervisor.yaml on every poll; plainyaml spares it importing PyYAML.
Whatever plainyaml accepts must equal PyYAML's reading; whatever it cannot vouch for, PyYAML reads.
"""

from __future__ import annotations

import glob
import os
import random

import pytest
import yaml

from supervisor import config, plainyaml
from supervisor.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCALARS = [
    "10s", "1m30s", "250ms", "720h", "1G", "1GiB", "1.5s", "0x1F", "0X1f", "0b1", "0b1s", "0b10", "010", "0o17",
    "1_000", "1_0s", "1:30", "1:30.5", "1.5", "1.", ".5", ".inf", "-.inf", ".nan", "1e5", "1.0e+5", "1.5e5",
    "2001-12-14", "2001-12-14t21:59:43.10-05:00", "yes", "Yes", "No", "ON", "off", "y", "n", "Y", "~", "null",
    "Null", "NULL", "nULL", "true", "True", "tRUE", "-5", "+5", "-0", "+0", "007", "0", "00", "-1.5", "+.5",
    "=", "<<", "a: b", "a:b", "a #b", "a#b", "'quoted'", "'it''s'", "''", '""', '"dq"', '"a\\tb"', '"a#b"',
    "'a # b'", "/usr/lib/ipsec/charon", "on-failure", "SIGTERM", "127.0.0.1:9089", ":9089", "[::1]:9089",
    "localhost:9089", "@x", "`x`", "%x", "!x", "!!str 5", "&a x", "*a", "|", ">", "-", "?", "? x", "a, b",
    "x y", "x  y", "--pid-file", "-x", "+x", ".x", "~x", "/a/b c", "{}", "{ }", "{a: 1}", "[]", "[ ]",
    "[1, 2]", "[a,b]", "[a, [b]]", "[a, ]", "['a', b]", "[a:b]", "[a: b]", "x:", "x: y: z", "é", "a\\b",
]


def same_or_declined(text: str) -> object:
    mine = plainyaml.load(text)
    if mine is not None:
        assert mine == yaml.safe_load(text) or (mine == {} and yaml.safe_load(text) is None), text
        assert repr(mine) == repr(yaml.safe_load(text) or {}), text       # types too: 1 is not 1.0 or True
    return mine


@pytest.mark.parametrize("scalar", SCALARS)
def test_a_scalar_is_read_as_pyyaml_reads_it_or_declined(scalar):
    for doc in (f"k: {scalar}\n", f"k: [{scalar}]\n", f"k:\n  - {scalar}\n", f"k:\n- {scalar}\n",
                f"a:\n  k: {scalar}  # note\n  z: 1\n", f"{scalar}: 1\n"):
        try:
            yaml.safe_load(doc)
        except yaml.YAMLError:
            assert plainyaml.load(doc) is None, doc      # PyYAML words the error
            continue
        same_or_declined(doc)


def test_the_shipped_configuration_and_every_test_configuration_are_read_without_pyyaml():
    files = [os.path.join(ROOT, "etc", "supervisor.yaml")]
    files += glob.glob(os.path.join(ROOT, "tests", "**", "*.yaml"), recursive=True)
    for path in files:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        same_or_declined(text)
    with open(files[0], encoding="utf-8") as fh:
        assert plainyaml.load(fh.read()) is not None


def test_the_usual_forms_are_read_and_the_rest_declined():
    text = ("# comment\ndaemon:\n  command: [/usr/lib/ipsec/charon, --debug-ike, 2]\n  pid_file: /run/c.pid  # x\n"
            "  environment: {}\n  load_commands:\n  - [swanctl, --load-all]\nrestart:\n  backoff:\n    step: 1s\n")
    assert plainyaml.load(text) is None                          # a list of lists: PyYAML
    text = text.replace("  load_commands:\n  - [swanctl, --load-all]\n", "  load_commands: null\n")
    assert plainyaml.load(text) == yaml.safe_load(text)
    for declined in ("a: 1\na: 2\n", "a: &x 1\nb: *x\n", "a: |\n  x\n", "a:\n  b: 1\n c: 2\n", "---\na: 1\n",
                     "a:\tb\n", "a: b\r\n", "  a: 1\n", "a: 'x'y'\n", "a:\n  - b: 1\n", "a: b\n  c\n"):
        assert plainyaml.load(declined) is None, declined
    assert plainyaml.load("") == {} and plainyaml.load("# only a comment\n\n") == {}


def test_random_documents_are_read_as_pyyaml_reads_them_or_declined():
    rng = random.Random(12)
    alphabet = ["a", "b", "1", "0", " ", ":", "-", "#", "'", '"', ".", "[", "]", ",", "x", "s", "_", "~", "/",
                "{", "}", "e", "+", "y", "n", "o"]
    accepted = 0
    for _ in range(3000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        doc = rng.choice([f"k: {value}\n", f"k:\n  - {value}\n", f"k: [{value}]\n", f"s:\n  k: {value}\n"])
        try:
            yaml.safe_load(doc)
        except (yaml.YAMLError, ValueError):          # PyYAML's int('0b') raises ValueError
            assert plainyaml.load(doc) is None, doc
            continue
        accepted += same_or_declined(doc) is not None
    assert accepted > 500          # the subset is not empty: most simple values are read


@pytest.mark.parametrize("text", [
    "", "daemon:\n  pid_file: /run/x.pid\n", open(os.path.join(ROOT, "etc", "supervisor.yaml")).read(),
    "restart:\n  backoff:\n    step: 2s\n    maximum: 1m\n  prevent_exit_codes: [64, 65]\nhealth:\n  enabled: false\n"
    "snapshots:\n  max_bytes: 2G\nmetrics:\n  textfile: /var/lib/node/ipsec.prom\n",
])
def test_a_configuration_read_without_pyyaml_equals_the_one_pyyaml_reads(text, monkeypatch):
    fast = config._parse_plain(text, "f.yaml")
    assert fast is not None
    monkeypatch.setattr(plainyaml, "load", lambda text: None)
    assert config.parse_config(text, "f.yaml") == fast


@pytest.mark.parametrize("text, message", [
    ("restart:\n  backoff:\n    factor: 0.5\n", "restart.backoff.factor must be >= 1.0, not 0.5 (f.yaml line 3)"),
    ("daemon:\n  pid_fle: /x\n", "daemon.pid_fle is not a known key; did you mean daemon.pid_file? (f.yaml line 2)"),
    ("health:\n  timeout: 20s\n", "health.timeout must be <= health.interval (10s), not 20s (f.yaml line 2)"),
    ("daemon: 5\n", "daemon must be a mapping, not 5 (f.yaml line 1)"),
])
def test_an_invalid_plain_configuration_is_worded_by_the_pyyaml_path_with_its_line(text, message):
    assert plainyaml.load(text) is not None
    with pytest.raises(ConfigError) as exc:
        config.parse_config(text, "f.yaml")
    assert str(exc.value) == f"invalid configuration f.yaml: {message}"


# Spaces and line breaks that Python's str.strip()/split() and YAML see differently, and characters
# PyYAML refuses: plainyaml leaves all of them to PyYAML (found by review: a key after U+2028 was lost).
UNUSUAL = ["a: x\xa0\n", "a: \xa0x\n", "a:\n  - x\xa0\n", "a: [x\xa0, y]\n", "a: 1\n\xa0\nb: 2\n", "a: x\x0c\n",
           "a: 1 # c\u2028b: 2\n", "a: 'x\x85y'\n", "a: 'x\x01'\n", 'a: "\x7f"\n', "a: x # c\x7f\n", "a: x\x1c\n",
           "a: 1\u2029b: 2\n", "a: 1\r\nb: 2\r\n", "a:\tb\n", "\ufeffa: 1\n", "a: é\n"]


@pytest.mark.parametrize("text", UNUSUAL)
def test_text_beyond_printable_ascii_is_left_to_pyyaml(text):
    assert plainyaml.load(text) is None


@pytest.mark.parametrize("text", [
    "stop:\n  signal: SIGTERM\xa0\n", "daemon:\n  pid_file: \xa0/run/c.pid\n", "stop:\n  signal: SIGTERM\x0c\n",
    "stop:\n  timeout: 5 # x\u2028  signal: SIGBOGUS\n", "stop:\n  timeout: 5 # x\x85  signal: SIGKILL\n",
])
def test_a_configuration_with_unusual_characters_is_what_pyyaml_makes_of_it(text, monkeypatch):
    def read():
        try:
            return config.parse_config(text, "f.yaml")
        except ConfigError as exc:
            return str(exc)
    mine = read()
    monkeypatch.setattr(config, "_parse_plain", lambda text, source: None)
    assert mine == read()
