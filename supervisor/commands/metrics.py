"""``ipsec-supervisor metrics``: the running supervisor's Prometheus metrics, once (text or JSON)."""

from __future__ import annotations

import argparse
import json
import math
import sys

from . import writing_output
from ..config import load_config
from ..errors import ExitCode, SupervisorError

METRICS_EXIT_CODES = """\
exit codes:
  0  printed
  1  metrics are off (neither metrics.listen nor metrics.textfile is set), or unreadable; or the
     output cannot be written (closed, a full disk, an encoding without a character)
  3  the configuration file is invalid
  7  no supervisor serves them (nothing listens on metrics.listen; no textfile yet)
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "metrics", help="print the supervisor's Prometheus metrics once",
        description="Print the running supervisor's metrics: a scrape of metrics.listen (with charon's "
                    "view over VICI), else the metrics.textfile it writes.",
        epilog=METRICS_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="PATH", help="configuration file (for metrics.listen / metrics.textfile)")
    p.add_argument("--json", action="store_true",
                   help="print the metric families as JSON: [{name, type, help, samples: [{name, labels, value}]}]")
    p.set_defaults(func=metrics)


def scrape_url(listen: str) -> str:
    """The URL to scrape for LISTEN: wildcard hosts become the loopback address."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"


def fetch(cfg) -> str:
    """The exposition text from the listener, else the textfile; SupervisorError says why not."""
    import urllib.error
    import urllib.request
    m = cfg.metrics
    if m.listen:
        url = scrape_url(m.listen)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never through a proxy
        try:
            with opener.open(url, timeout=m.vici_timeout + 5.0) as resp:
                return resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            raise SupervisorError(f"{url} answered {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", None) or exc
            raise SupervisorError(f"no metrics on {url} ({why}); is ipsec-supervisor running (in this network "
                                  f"namespace)?", ExitCode.NOT_RUNNING) from None
    if m.textfile:
        try:
            with open(m.textfile, encoding="utf-8") as fh:
                return fh.read()
        except FileNotFoundError:
            raise SupervisorError(f"{m.textfile} does not exist (yet): the supervisor writes it once it runs",
                                  ExitCode.NOT_RUNNING) from None
        except OSError as exc:
            raise SupervisorError(f"cannot read {m.textfile}: {exc.strerror or exc}") from None
    raise SupervisorError(f"metrics are off: set metrics.listen or metrics.textfile in {cfg.source}")


def to_json(text: str) -> list[dict]:
    """The exposition parsed by prometheus_client's own parser, as plain JSON-safe data."""
    from prometheus_client.parser import text_string_to_metric_families

    def number(v: float):
        return v if math.isfinite(v) else str(v)
    return [{"name": f.name, "type": f.type, "help": f.documentation,
             "samples": [{"name": s.name, "labels": dict(s.labels), "value": number(s.value)} for s in f.samples]}
            for f in text_string_to_metric_families(text)]


def metrics(args) -> int:
    cfg = load_config(args.config)
    text = fetch(cfg)
    if args.json:
        try:
            data = to_json(text)
        except ValueError as exc:
            raise SupervisorError(f"the metrics are not valid exposition text: {exc}") from None
        with writing_output():
            json.dump(data, sys.stdout, indent=2)
            sys.stdout.write("\n")
    else:
        with writing_output():
            sys.stdout.write(text)
    return 0
