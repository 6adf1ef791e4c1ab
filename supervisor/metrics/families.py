"""Pure: the supervisor's status snapshot, its ledger and charon's VICI view -> metric families.

Names: ``ipsec_supervisor_*`` for what the supervisor knows, ``ipsec_charon_*`` for what charon
says over VICI; units in the names (seconds, bytes), counters end in ``_total``. Label values
come from small fixed sets (states, exit classes, families) or are bounded by
``metrics.max_children``.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections import Counter as _Tally
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from ..states import State
from .charon import CharonView, ChildSample

P = "ipsec_supervisor_"
C = "ipsec_charon_"
LEDGER_FAMILIES = ("xfrm_sa", "xfrm_policy", "route", "rule", "address")
LEFTOVER_FAMILIES = LEDGER_FAMILIES + ("firewall",)
RUNNING_STATES = ("settling", "running")
DAEMON_STATES = ("starting", "loading", "settling", "running", "stopping", "aborting", "killing")

# Aggregation levels of the per-CHILD_SA series (ipsec_charon_aggregated).
PER_CHILD, PER_CONNECTION, ALL = 0, 1, 2


@dataclass(frozen=True)
class Snapshot:
    """The supervisor's ``status()`` as taken in the loop thread (never changed afterwards)."""

    status: Mapping[str, Any]
    taken_mono: float
    taken_wall: float
    ledger: Any = None                       # supervisor.ledger.Ledger or None
    last_leftovers: Mapping[str, int] | None = None   # by family, at the last abnormal exit
    last_rules: Mapping[str, int] | None = None       # by ownership rule, at the last abnormal exit


def _gauge(name: str, doc: str, value: float | None = None, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
    if value is not None:
        g.add_metric([], float(value))
    return g


def _iso_to_epoch(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return _dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def supervisor_families(snap: Snapshot, now_mono: float) -> list:
    """Gauges from one status snapshot; durations are advanced to NOW_MONO (the scrape's time)."""
    st = snap.status
    since = max(0.0, now_mono - snap.taken_mono)
    out = []
    state = st.get("state", "stopped")
    g = GaugeMetricFamily(P + "state", "1 for the supervisor's current state, 0 for the others "
                          "(see docs/state-machine.md)", labels=["state"])
    for s in State:
        g.add_metric([s.value], 1.0 if s.value == state else 0.0)
    out.append(g)
    out.append(_gauge(P + "state_seconds", "Seconds the supervisor has been in its current state",
                      (st.get("state_for_s") or 0.0) + since))
    d = st.get("daemon") or {}
    out.append(_gauge(P + "charon_up", "1 while charon is ready (pid file, VICI answer, configuration "
                      "loaded) under the supervisor, else 0", 1 if d.get("ready") else 0))
    if d.get("pid") and d.get("uptime_s") is not None:
        out.append(_gauge(P + "charon_start_time_seconds", "Unix time the running charon was started",
                          snap.taken_wall - d["uptime_s"]))
    if d.get("load_ok") is not None:
        out.append(_gauge(P + "charon_config_loaded", "1 if charon's configuration (load or reload "
                          "commands) loaded the last time, 0 if that failed", 1 if d["load_ok"] else 0))
    cl = st.get("crash_loop") or {}
    out.append(_gauge(P + "crash_loop_deaths", "Deaths of charon within the crash-loop window "
                      "(restart.crash_loop.window)", cl.get("deaths_in_window", 0)))
    out.append(_gauge(P + "crash_loop_max_deaths", "Deaths within the window that make the supervisor "
                      "give up (restart.crash_loop.max_deaths; 0: never)", cl.get("max_deaths", 0)))
    out.append(_gauge(P + "crash_loop_window_seconds", "The crash-loop window (restart.crash_loop.window)",
                      cl.get("window_s", 0)))
    out.append(_gauge(P + "crash_loop_active", "1 when the crash-loop limit was reached and charon is left "
                      "stopped (state gave-up), else 0", 1 if state == State.GAVE_UP.value else 0))
    if st.get("next_restart_in_s") is not None:
        out.append(_gauge(P + "next_restart_seconds", "Seconds until the scheduled restart of charon "
                          "(present only while one is scheduled)", max(0.0, st["next_restart_in_s"] - since)))
    h = st.get("health") or {}
    out.append(_gauge(P + "health_probe_consecutive_failures", "Health probes failed in a row "
                      "(health.failures of them mean charon hangs)", h.get("consecutive_failures", 0)))
    cfg = st.get("config") or {}
    out.append(_gauge(P + "config_last_reload_successful", "1 if the last reading of supervisor.yaml "
                      "succeeded (start or SIGHUP), 0 if the last reload failed and the old one runs",
                      0 if cfg.get("last_reload_error") else 1))
    loaded = _iso_to_epoch(cfg.get("loaded_at"))
    if loaded is not None:
        out.append(_gauge(P + "config_last_load_success_timestamp_seconds",
                          "Unix time supervisor.yaml was last read successfully", loaded))
    info = InfoMetricFamily(P + "build", "The supervisor's version and the recovery mode it runs",
                            labels=["version", "recovery_mode"])
    rec = st.get("recovery") or {}
    info.add_metric([], {"version": str((st.get("supervisor") or {}).get("version", "")),
                         "recovery_mode": str(rec.get("mode", "none"))})
    out.append(info)
    out += recovery_families(rec, snap.ledger, snap.last_leftovers, snap.last_rules)
    return out


def recovery_families(rec: Mapping[str, Any], ledger: Any, last_leftovers: Mapping[str, int] | None,
                      last_rules: Mapping[str, int] | None = None) -> list:
    """Blocks, adoption, leftovers and the ownership ledger (recovery.mode other than none)."""
    out = []
    if not rec:
        return out
    out.append(_gauge(P + "fail_closed_blocks", "Block policies of the supervisor installed now (they "
                      "stand in for charon's removed policies until charon installs its own)", rec.get("blocks", 0)))
    g = GaugeMetricFamily(P + "leftovers", "Objects charon owned that were left in the kernel at its last "
                          "abnormal exit, by family", labels=["family"])
    for family in LEFTOVER_FAMILIES:
        g.add_metric([family], float((last_leftovers or {}).get(family, 0)))
    out.append(g)
    g = GaugeMetricFamily(P + "leftovers_by_rule", "The same leftovers by the ownership rule that made them "
                          "charon's (ledger:*: attributed by charon's netlink port id; marker:*: by charon's "
                          "markers, without a ledger)", labels=["rule"])
    for rule, n in sorted((last_rules or {}).items()):
        g.add_metric([rule], float(n))
    out.append(g)
    a = rec.get("adoption")
    out.append(_gauge(P + "stale_leftovers", "Leftovers the last recovery could not remove (failed deletes of "
                      "a flush, or of an adoption after recovery.adopt_grace; undecided when the adoption ended)",
                      stale_leftovers(rec.get("last"), a)))
    out.append(_gauge(P + "adopt_in_progress", "1 while leftovers wait to be adopted by the restarted "
                      "charon (adopt mode, within recovery.adopt_grace), else 0",
                      1 if a and a.get("state") != "done" else 0))
    if a:
        results: Mapping[str, int] = a.get("results") or {}
        removed = sum(n for k, n in results.items() if k.startswith("delete ") and not k.endswith(" failed"))
        kept = sum(n for k, n in results.items() if k.startswith("keep ") and not k.endswith(" failed"))
        total, resolved, pending = a.get("leftovers", 0), a.get("resolved", 0), a.get("pending") or 0
        # kept: charon installed it again (or a larval SA); the rest not resolved nor pending went away
        claimed = kept + max(0, total - resolved - pending)
        g = GaugeMetricFamily(P + "adopt_leftovers", "The last adoption's leftovers by result: claimed (charon "
                              "installed them again, or they went away), removed (deleted: replaced, or "
                              "unclaimed after recovery.adopt_grace), pending (still waiting)", labels=["result"])
        for result, value in (("claimed", claimed), ("removed", removed), ("pending", pending)):
            g.add_metric([result], float(value))
        out.append(g)
        out.append(_gauge(P + "adopt_initiated_children", "Children the last adoption initiated (their new "
                          "IKE_SA's INITIAL_CONTACT makes the peer drop its stale SAs)", len(a.get("initiated") or ())))
        g = GaugeMetricFamily(P + "adopt_actions", "Actions of the last adoption by kind and outcome",
                              labels=["action", "outcome"])
        for key, n in sorted(results.items()):
            kind, _, outcome = key.rpartition(" ")
            g.add_metric([kind or key, outcome], float(n))
        out.append(g)
    out += ledger_families(ledger)
    return out


def stale_leftovers(last: Mapping[str, Any] | None, adoption: Mapping[str, Any] | None) -> int:
    """Leftovers the last recovery run and the last adoption failed to clear."""
    stale = 0
    if last and last.get("action") == "flush":
        stale += (last.get("results") or {}).get("failed", 0)
    if adoption:
        stale += sum(n for k, n in (adoption.get("results") or {}).items() if k == "delete failed")
        if adoption.get("state") == "done":
            stale += adoption.get("pending") or 0
    return stale


def ledger_families(ledger: Any) -> list:
    """The ownership ledger: objects by family, owner and how their owner was decided."""
    if ledger is None:
        return []
    tally: _Tally = _Tally()
    for family in LEDGER_FAMILIES:
        for entry in (ledger.entries.get(family) or {}).values():
            how = entry.how if entry.how != "added" else "port-id"
            tally[(family, entry.owner, how)] += 1
    g = GaugeMetricFamily(P + "ledger_objects", "Kernel objects in the ownership ledger by family, owner "
                          "(daemon: charon's; foreign) and attribution (port-id: seen added through that "
                          "netlink port; baseline: there when charon started; inherited: left by an earlier "
                          "charon)", labels=["family", "owner", "attribution"])
    for (family, owner, how), n in sorted(tally.items()):
        g.add_metric([family, owner, how], float(n))
    return [g, _gauge(P + "ledger_stale_families", "Families whose kernel notifications were lost and wait for a "
                   "re-read", len(ledger.stale))]


def disk_families(crash_dir: str, snapshot_dir: str) -> list:
    """Crash reports and snapshots on disk: how many and how many bytes."""
    out = []
    for what, directory, doc in (("crash_reports", crash_dir, "crash reports (crash_reports.keep)"),
                                 ("snapshots", snapshot_dir, "snapshots of leftovers (snapshots.keep, .max_age)")):
        count = size = 0
        try:
            with os.scandir(directory) as it:
                for entry in it:
                    if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
                        count += 1
                        size += entry.stat(follow_symlinks=False).st_size
        except OSError:
            pass
        out.append(_gauge(f"{P}{what}_on_disk", f"Files of {doc}", count))
        out.append(_gauge(f"{P}{what}_on_disk_bytes", f"Bytes of {doc}", size))
    return out


def aggregation_level(children: int, conns: int, bound: int) -> int:
    """PER_CHILD while CHILD_SAs and connections are at most BOUND each, PER_CONNECTION while the
    connections are, else ALL: no labelled series family grows past BOUND (per state) series."""
    if conns > bound:
        return ALL
    return PER_CHILD if children <= bound else PER_CONNECTION


def charon_families(view: CharonView, bound: int) -> list:
    """charon's view: up, connections, IKE_SAs and CHILD_SAs by state, traffic, trap policies."""
    out = [_gauge(C + "up", "1 if charon answered list-sas, list-conns and list-policies over VICI within "
                  "metrics.vici_timeout at this scrape, else 0 (the other ipsec_charon_ series are then absent)",
                  1 if view.up else 0),
           _gauge(C + "scrape_duration_seconds", "Seconds charon took to answer this scrape's VICI requests",
                  view.took)]
    if not view.up:
        return out
    conn_names = set(view.conns) | {c for c, _ in view.ikes}
    level = aggregation_level(len(view.children), len(conn_names), bound)
    established = {c for c, s in view.ikes if s == "ESTABLISHED"}
    out.append(_gauge(C + "connections_loaded", "Connections loaded into charon", len(view.conns)))
    out.append(_gauge(C + "connections_established", "Loaded connections with at least one ESTABLISHED IKE_SA",
                      len(established & set(view.conns))))
    out.append(_gauge(C + "trap_policies", "Trap policies charon has installed (start_action trap, auto=route)",
                      view.trap_policies))
    out.append(_gauge(C + "aggregated", f"0: the CHILD_SA series are per CHILD_SA; 1: summed per connection "
                      f"(more than metrics.max_children={bound} CHILD_SAs); 2: summed into connection=\"\" "
                      f"(more than {bound} connections)", level))
    out.append(_gauge(C + "child_sa_count", "CHILD_SAs charon reports (before any aggregation)",
                      len(view.children)))

    def conn_label(conn: str) -> str:
        return conn if level < ALL else ""

    if level < ALL:
        g = GaugeMetricFamily(C + "connection_established", "1 if the loaded connection has an ESTABLISHED "
                              "IKE_SA, else 0", labels=["connection"])
        for conn in sorted(view.conns):
            g.add_metric([conn], 1.0 if conn in established else 0.0)
        out.append(g)
    ikes = _Tally((conn_label(c), s) for c, s in view.ikes)
    g = GaugeMetricFamily(C + "ike_sas", "IKE_SAs by connection and state", labels=["connection", "state"])
    for (conn, state), n in sorted(ikes.items()):
        g.add_metric([conn, state], float(n))
    out.append(g)
    kids = _Tally((conn_label(c.conn), c.child if level == PER_CHILD else "", c.state) for c in view.children)
    g = GaugeMetricFamily(C + "child_sas", "CHILD_SAs by connection, child and state", labels=["connection", "child", "state"])
    for (conn, child, state), n in sorted(kids.items()):
        g.add_metric([conn, child, state], float(n))
    out.append(g)
    out += traffic_families(view.children, level, conn_label)
    return out


def _traffic_key(c: ChildSample, level: int, conn_label) -> tuple[str, ...]:
    if level == PER_CHILD:
        return (c.conn, c.child, c.local_ts, c.remote_ts, c.reqid)
    return (conn_label(c.conn), "", "", "", "")


def traffic_families(children: Iterable[ChildSample], level: int, conn_label) -> list:
    """Bytes and packets per CHILD_SA (two SAs of one child during a rekey are summed)."""
    labels = ["connection", "child", "local_ts", "remote_ts", "reqid", "direction"]
    nbytes = CounterMetricFamily(C + "child_sa_bytes", "Bytes through the CHILD_SA (resets when it is rekeyed; "
                                 "use rate()/increase())", labels=labels)
    npackets = CounterMetricFamily(C + "child_sa_packets", "Packets through the CHILD_SA (resets when it is "
                                   "rekeyed; use rate()/increase())", labels=labels)
    sums: dict[tuple[str, ...], list[int]] = {}
    for c in children:
        s = sums.setdefault(_traffic_key(c, level, conn_label), [0, 0, 0, 0])
        s[0] += c.bytes_in
        s[1] += c.bytes_out
        s[2] += c.packets_in
        s[3] += c.packets_out
    for key, (bi, bo, pi, po) in sorted(sums.items()):
        nbytes.add_metric([*key, "in"], float(bi))
        nbytes.add_metric([*key, "out"], float(bo))
        npackets.add_metric([*key, "in"], float(pi))
        npackets.add_metric([*key, "out"], float(po))
    return [nbytes, npackets]
