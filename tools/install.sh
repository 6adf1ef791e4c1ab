#!/usr/bin/env bash
# Install ipsec-supervisor: the package in its own virtual environment, the systemd unit,
# the default configuration and the strongSwan snippet.  Run as root (`make install`).
# `install.sh uninstall` (`make uninstall`, same settings) removes it again, keeping the
# configuration files, and undoes IPSEC_DIVERT.
#
# Never overwrites a configuration file that differs from the shipped one: the new one
# goes next to it as FILE.dist.  Staged installs: DESTDIR=/some/root (the virtual
# environment's paths are rewritten to PREFIX, as it will be found after copying).
#
# Settings (environment or `make install VAR=...`):
#   PREFIX=/opt/ipsec-supervisor     the virtual environment
#   BINDIR=/usr/local/sbin           where `ipsec-supervisor` is linked
#   IPSEC_LINK=no                    yes: also link `ipsec` into BINDIR.  /usr/local/sbin
#                                    comes before /usr/sbin in root's PATH, so this shadows
#                                    Debian's /usr/sbin/ipsec (strongSwan's starter script)
#   IPSEC_DIVERT=no                  yes: /usr/sbin/ipsec becomes ours, for callers that use
#                                    the absolute path (Open vSwitch); strongSwan's script is
#                                    renamed to /usr/sbin/ipsec.strongswan (with dpkg-divert
#                                    --local where dpkg exists, so strongSwan upgrades keep it
#                                    there).  `make uninstall` puts it back.
#   UNITDIR=/usr/local/lib/systemd/system
#   CONFDIR=/etc/ipsec-supervisor    supervisor.yaml
#   STRONGSWAN_CONFDIR=/etc/strongswan.d
#   DOCDIR=/usr/local/share/doc/ipsec-supervisor
#   INSTALL_PYTHON=/usr/bin/python3  the interpreter of the virtual environment; keep it out
#                                    of /home and /root (the unit has ProtectHome=yes)
#   PIP_ARGS=                        extra pip arguments (e.g. --no-index --find-links DIR)
#   INSTALL_FROM=                    what pip installs (default: a clean copy of this tree)
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/ipsec-supervisor}
BINDIR=${BINDIR:-/usr/local/sbin}
IPSEC_LINK=${IPSEC_LINK:-no}
IPSEC_DIVERT=${IPSEC_DIVERT:-no}
UNITDIR=${UNITDIR:-/usr/local/lib/systemd/system}
CONFDIR=${CONFDIR:-/etc/ipsec-supervisor}
STRONGSWAN_CONFDIR=${STRONGSWAN_CONFDIR:-/etc/strongswan.d}
DOCDIR=${DOCDIR:-/usr/local/share/doc/ipsec-supervisor}
INSTALL_PYTHON=${INSTALL_PYTHON:-/usr/bin/python3}
PIP_ARGS=${PIP_ARGS:-}
INSTALL_FROM=${INSTALL_FROM:-}
PLACEHOLDER=/usr/local/bin/ipsec-supervisor     # ExecStart= of etc/ipsec-supervisor.service

say() { echo "install: $*"; }
die() { echo "install: $*" >&2; exit 1; }

SBIN_IPSEC=/usr/sbin/ipsec                       # strongSwan's script on Debian and others
DIVERTED_IPSEC=/usr/sbin/ipsec.strongswan        # the name the .deb diverts it to as well

divert_owner() {     # "" (none), LOCAL (an earlier `make install IPSEC_DIVERT=yes`) or a package
  if command -v dpkg-divert >/dev/null; then dpkg-divert --listpackage "$SBIN_IPSEC"; fi
}

check_divert() {     # before anything is installed: the .deb's diversion is not ours to change
  local owner
  owner=$(divert_owner)
  case "$owner" in
    ""|LOCAL) ;;
    *) die "$SBIN_IPSEC is already diverted by the package $owner (the ipsec-supervisor .deb?): remove it, or install without IPSEC_DIVERT" ;;
  esac
}

divert_ipsec() {     # /usr/sbin/ipsec -> ipsec.strongswan; ours in its place
  if command -v dpkg-divert >/dev/null; then
    if [ -z "$(divert_owner)" ]; then
      dpkg-divert --local --add --rename --divert "$DIVERTED_IPSEC" "$SBIN_IPSEC" >/dev/null
    fi
  elif [ -e "$SBIN_IPSEC" ] && [ "$(readlink "$SBIN_IPSEC")" != "$PREFIX/bin/ipsec" ]; then
    [ ! -e "$DIVERTED_IPSEC" ] || die "both $SBIN_IPSEC and $DIVERTED_IPSEC exist: move one of them away first"
    mv "$SBIN_IPSEC" "$DIVERTED_IPSEC"
  fi
  ln -sfn "$PREFIX/bin/ipsec" "$SBIN_IPSEC"
  say "command: $SBIN_IPSEC is ours (strongSwan's script: $DIVERTED_IPSEC)"
}

undivert_ipsec() {   # the reverse: strongSwan's script back at /usr/sbin/ipsec
  if [ -L "$SBIN_IPSEC" ] && [ "$(readlink "$SBIN_IPSEC")" = "$PREFIX/bin/ipsec" ]; then
    rm -f "$SBIN_IPSEC"
  fi
  if [ "$(divert_owner)" = LOCAL ]; then
    dpkg-divert --local --remove --rename --divert "$DIVERTED_IPSEC" "$SBIN_IPSEC" >/dev/null
    say "command: $SBIN_IPSEC is strongSwan's again"
  elif [ -e "$DIVERTED_IPSEC" ] && [ ! -e "$SBIN_IPSEC" ]; then
    mv "$DIVERTED_IPSEC" "$SBIN_IPSEC"
    say "command: $SBIN_IPSEC is strongSwan's again"
  fi
}

if [ "${1:-}" = uninstall ]; then
  [ -z "$DESTDIR" ] || die "uninstall works on this system, not on DESTDIR"
  [ "$(id -u)" = 0 ] || die "run as root"
  if [ -d /run/systemd/system ] && [ -e "$UNITDIR/ipsec-supervisor.service" ]; then
    systemctl disable --now ipsec-supervisor.service || true    # its code is about to go
  fi
  undivert_ipsec
  for link in "$BINDIR/ipsec-supervisor" "$BINDIR/ipsec"; do
    case "$(readlink "$link" 2>/dev/null)" in "$PREFIX"/*) rm -f "$link" ;; esac
  done
  rm -f "$UNITDIR/ipsec-supervisor.service"
  rm -rf "$PREFIX" "$DOCDIR"
  [ ! -d /run/systemd/system ] || systemctl daemon-reload
  say "removed $PREFIX, the unit and the commands; kept $CONFDIR and $STRONGSWAN_CONFDIR/ipsec-supervisor.conf"
  exit 0
fi
[ "$#" = 0 ] || die "unknown argument '$1' (none installs, 'uninstall' removes)"
[ "$IPSEC_DIVERT" != yes ] || [ -z "$DESTDIR" ] \
  || die "IPSEC_DIVERT=yes changes this system's $SBIN_IPSEC: not with DESTDIR (the .deb diverts it when installed: make deb)"
[ "$IPSEC_DIVERT" != yes ] || check_divert

[ -n "$DESTDIR" ] || [ "$(id -u)" = 0 ] || die "run as root (or stage with DESTDIR=...)"
case "$PREFIX" in /*) ;; *) die "PREFIX must be an absolute path, not '$PREFIX'" ;; esac
[ -x "$INSTALL_PYTHON" ] || die "no Python at $INSTALL_PYTHON (Debian: apt-get install python3 python3-venv; or set INSTALL_PYTHON)"
"$INSTALL_PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
  || die "$INSTALL_PYTHON cannot create virtual environments (Debian: apt-get install python3-venv)"

VENV=$DESTDIR$PREFIX

# 1. The package, in a virtual environment of its own.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment $PREFIX"
  "$INSTALL_PYTHON" -m venv "$VENV"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -z "$INSTALL_FROM" ]; then
  # A clean copy: building in place would leave build/ and *.egg-info in the checkout.
  mkdir "$work/src"
  cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/supervisor" "$work/src/"
  find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
  INSTALL_FROM="$work/src[fast]"     # with msgspec: snapshots 5-7x faster (works without it)
fi
say "installing ipsec-supervisor into $PREFIX (pip; needs the package registry unless PIP_ARGS says otherwise)"
# Same version number, newer code: pip would keep the installed copy.
"$VENV/bin/python" -m pip uninstall -q -y ipsec-supervisor >/dev/null 2>&1 || true
# shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade $PIP_ARGS "$INSTALL_FROM"

if [ -n "$DESTDIR" ]; then
  # The environment will live at PREFIX: scripts must not name the staging directory.
  { grep -rlI --null -- "$VENV" "$VENV/bin" "$VENV/pyvenv.cfg" || true; } | xargs -0 -r sed -i "s#$VENV#$PREFIX#g"
  find "$VENV" -path '*/site-packages/supervisor/*' -name __pycache__ -prune -exec rm -rf {} +
fi

# 2. The unit, with the real path of ipsec-supervisor.
install -d -m 0755 "$DESTDIR$UNITDIR"
sed "s#$PLACEHOLDER#$PREFIX/bin/ipsec-supervisor#g" "$SRC/etc/ipsec-supervisor.service" \
  > "$DESTDIR$UNITDIR/ipsec-supervisor.service"
chmod 0644 "$DESTDIR$UNITDIR/ipsec-supervisor.service"
say "unit: $UNITDIR/ipsec-supervisor.service (ExecStart=$PREFIX/bin/ipsec-supervisor run)"

# 3. Configuration files: installed when absent, left alone when changed (new one as .dist).
install_config() {   # SOURCE TARGET MODE
  local source=$1 target=$DESTDIR$2 mode=$3
  install -d -m 0755 "$(dirname "$target")"
  if [ ! -e "$target" ]; then
    install -m "$mode" "$source" "$target"
    say "config: $2"
  elif cmp -s "$source" "$target"; then
    rm -f "$target.dist"
    say "config: $2 is up to date"
  else
    install -m "$mode" "$source" "$target.dist"
    say "config: $2 was changed locally and is kept; the shipped version is $2.dist"
  fi
}
install_config "$SRC/etc/supervisor.yaml" "$CONFDIR/supervisor.yaml" 0644
if [ -f "$SRC/etc/strongswan.d/ipsec-supervisor.conf" ]; then
  install_config "$SRC/etc/strongswan.d/ipsec-supervisor.conf" "$STRONGSWAN_CONFDIR/ipsec-supervisor.conf" 0644
fi

# 4. Commands on PATH, and the README the unit's Documentation= names.
install -d -m 0755 "$DESTDIR$BINDIR"
ln -sfn "$PREFIX/bin/ipsec-supervisor" "$DESTDIR$BINDIR/ipsec-supervisor"
say "command: $BINDIR/ipsec-supervisor"
if [ "$IPSEC_LINK" = yes ]; then
  ln -sfn "$PREFIX/bin/ipsec" "$DESTDIR$BINDIR/ipsec"
  say "command: $BINDIR/ipsec (shadows /usr/sbin/ipsec for PATHs that list $BINDIR first)"
elif [ "$IPSEC_DIVERT" != yes ]; then
  say "command: $PREFIX/bin/ipsec (not linked onto PATH; IPSEC_LINK=yes links it into $BINDIR)"
fi
if [ "$IPSEC_DIVERT" = yes ]; then
  divert_ipsec
fi
install -d -m 0755 "$DESTDIR$DOCDIR"
install -m 0644 "$SRC/README.md" "$DESTDIR$DOCDIR/README.md"
# Not enabled: only for charon.user in strongswan.conf (README "Security").
install -m 0644 "$SRC/etc/ipsec-supervisor.service.d/charon-user.conf" "$DESTDIR$DOCDIR/charon-user.conf"
say "drop-in for charon.user: $DOCDIR/charon-user.conf (not enabled; see its header)"
# Prometheus alert rules: for the Prometheus server's rule_files, usually on another host (README "Monitoring").
install -m 0644 "$SRC/etc/prometheus/ipsec-supervisor-rules.yml" "$DESTDIR$DOCDIR/ipsec-supervisor-rules.yml"
say "Prometheus alert rules: $DOCDIR/ipsec-supervisor-rules.yml (copy them to the Prometheus server)"

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
say "done.  Next: systemctl enable --now ipsec-supervisor  (it stops and conflicts with"
say "strongswan-starter.service and strongswan.service: only one of them may run charon)"
